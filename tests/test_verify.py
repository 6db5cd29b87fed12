"""`streammerge verify` finds every kind of damage — a flipped byte, a truncated or missing shard,
a missing manifest, changed inputs (--inputs) — naming tensor, shard and byte range; `hash`
makes a manifest for any safetensors folder (sha256 as the Hub shows it) that verify checks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from streammerge.cli import main


@pytest.fixture(scope="module")
def merged(tiny_set, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("merged")
    cfg = root / "cfg.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {tiny_set[0]}\nmodels:\n"
                   + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for f in tiny_set[1:]))
    out = str(root / "out")
    r = CliRunner().invoke(main, ["run", str(cfg), out, "-q", "--out-shard-size", "60K"])
    assert r.exit_code == 0, r.output
    return out


def copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def verify(out: str, *extra: str):
    return CliRunner().invoke(main, ["verify", out, *extra])


def manifest(out: str) -> dict:
    with open(os.path.join(out, "streammerge.manifest.json")) as f:
        return json.load(f)


def test_clean_output_verifies(merged) -> None:
    r = verify(merged, "--inputs")
    assert r.exit_code == 0 and "ok: 39 tensors in" in r.output and "4 input model(s)" in r.output


def test_flipped_byte_names_tensor_shard_and_range(merged, tmp_path) -> None:
    out = copy(merged, tmp_path)
    t = manifest(out)["tensors"]["model.layers.2.mlp.up_proj.weight"]
    path = os.path.join(out, t["shard"])
    with open(path, "r+b") as f:
        f.seek(t["offset"] + 17)
        b = f.read(1)
        f.seek(t["offset"] + 17)
        f.write(bytes([b[0] ^ 0x10]))
    r = verify(out)
    assert r.exit_code == 7
    assert (f"tensor model.layers.2.mlp.up_proj.weight: shard {t['shard']} bytes {t['offset']}.."
            f"{t['offset'] + t['nbytes']}: content differs") in r.output
    assert "1 problem(s)" in r.output


def test_truncated_and_missing_shards(merged, tmp_path) -> None:
    out = copy(merged, tmp_path)
    shards = sorted(manifest(out)["shards"])
    with open(os.path.join(out, shards[0]), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(out, shards[0])) - 10)
    os.remove(os.path.join(out, shards[1]))
    r = verify(out)
    assert r.exit_code == 7
    assert f"shard {shards[0]}: " in r.output and "truncated" in r.output and "past the end of the file" in r.output
    assert f"shard {shards[1]}: missing" in r.output and f"in missing shard {shards[1]}" in r.output


def test_missing_manifest(merged, tmp_path) -> None:
    out = copy(merged, tmp_path)
    os.remove(os.path.join(out, "streammerge.manifest.json"))
    r = verify(out)
    assert r.exit_code == 7 and "no streammerge.manifest.json" in r.output and "streammerge hash" in r.output


def test_changed_input_is_found_with_inputs_flag(tiny_set, tmp_path) -> None:
    inputs = [shutil.copytree(f, str(tmp_path / os.path.basename(f))) for f in tiny_set]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {f}\n" for f in inputs)
                   + "parameters: {weight: 1.0}\n")
    out = str(tmp_path / "out")
    assert CliRunner().invoke(main, ["run", str(cfg), out, "-q"]).exit_code == 0
    shard = sorted(f for f in os.listdir(inputs[2]) if f.endswith(".safetensors"))[0]
    with open(os.path.join(inputs[2], shard), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x01\x02\x03")
    assert verify(out).exit_code == 0  # the output itself is intact
    r = verify(out, "--inputs")
    assert r.exit_code == 7 and f"input {inputs[2]}: tensor" in r.output
    assert "differs from what the merge read" in r.output


def test_hash_any_folder_then_verify(tiny_set, tmp_path) -> None:
    folder = shutil.copytree(tiny_set[1], str(tmp_path / "m"))
    r = CliRunner().invoke(main, ["hash", folder, "--sha256"])
    assert r.exit_code == 0
    m = json.loads(r.output)
    for name, s in m["shards"].items():
        with open(os.path.join(folder, name), "rb") as f:
            assert s["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert len(m["tensors"]) == 39
    assert CliRunner().invoke(main, ["hash", folder, "--write"]).exit_code == 0
    assert verify(folder).exit_code == 0
    assert CliRunner().invoke(main, ["hash", folder, "--write"]).exit_code == 6  # never overwrites
    name = sorted(m["shards"])[0]
    with open(os.path.join(folder, name), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff")
    assert verify(folder).exit_code == 7


def test_a_hashed_model_folder_is_never_replaced(tiny_set, tmp_path) -> None:
    folder = shutil.copytree(tiny_set[1], str(tmp_path / "someones-model"))
    assert CliRunner().invoke(main, ["hash", folder, "--write"]).exit_code == 0
    before = sorted(os.listdir(folder))
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {tiny_set[0]}}}]\nparameters: {{weight: 1}}\n")
    r = CliRunner().invoke(main, ["run", str(cfg), folder, "--overwrite"])
    assert r.exit_code == 6 and "not empty and holds no streammerge run" in r.output
    assert sorted(os.listdir(folder)) == before
