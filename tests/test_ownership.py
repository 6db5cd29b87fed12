"""streammerge removes or replaces only files it can prove it wrote: generated output-folder states
(a finished merge with the user's own files beside it, files named like ours but changed, symlinks,
a stray work folder beside the user's model, an input's own folder as OUT) either merge leaving
every foreign file byte-for-byte as it was, or are refused with exit 6 naming the files in the way
— the tree outside streammerge's own files is hashed before and after. And `verify` covers every
file a loader reads (config.json, tokenizer, shard index), not only the shards."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammerge.cli import main

OURS = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "README.md", "mergekit_config.yml", "streammerge.manifest.json", "model.safetensors.index.json"}


def tree(root: str) -> dict[str, str]:
    """Every file and link under root (relative path -> sha256 of its bytes, or the link target)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def ours(name: str) -> bool:
    return name in OURS or (name.startswith("model") and name.endswith(".safetensors")) or \
        name.startswith(".streammerge")


@pytest.fixture(scope="module")
def recipe(tiny_set, tmp_path_factory) -> str:
    cfg = tmp_path_factory.mktemp("own") / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_set[0]}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {tiny_set[1]}\n    parameters: {{weight: 0.5}}\n")
    return str(cfg)


def merge(cfg: str, out: str, *extra: str):  # type: ignore[no-untyped-def]
    r = CliRunner().invoke(main, ["run", cfg, out, "--out-shard-size", "60K", "-q", *extra])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    return r


FOREIGN = st.sampled_from(["model_v1_backup.safetensors", "model-card-draft.safetensors.md", "notes.txt",
                           "model.safetensors", "config.json", "README.md", "model-00001-of-00009.safetensors",
                           "tokenizer.json", "model.safetensors.index.json"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(finished=st.booleans(), stray_work=st.booleans(), foreign=st.lists(FOREIGN, max_size=3, unique=True),
       link=st.booleans(), flags=st.sampled_from([(), ("--overwrite",), ("--restart",)]))
def test_foreign_files_are_never_changed(recipe, tmp_path_factory, finished, stray_work, foreign, link,
                                        flags) -> None:
    root = tmp_path_factory.mktemp("state")
    out = root / "out"
    victim = root / "victim.txt"
    victim.write_text("the user's file outside OUT")
    if finished:
        assert merge(recipe, str(out)).exit_code == 0
    out.mkdir(exist_ok=True)
    if stray_work:
        (out / ".streammerge").mkdir(exist_ok=True)
    for name in foreign:
        (out / name).write_text(f"the user's own {name}")
    if link:
        os.symlink(victim, out / "tokenizer_config.json") if not (out / "tokenizer_config.json").exists() else None
    before = tree(str(root))
    r = merge(recipe, str(out), *flags)
    after = tree(str(root))
    if r.exit_code == 6:
        assert "streammerge did not write" in r.output or "not empty" in r.output or "unfinished" in r.output
        after.pop(os.path.join("out", ".streammerge", "lock"), None)  # the run lock: streammerge's own
        assert before == after, "a refused run changed something"
        return
    assert r.exit_code == 0, r.output
    for name, digest in before.items():
        top = name.split(os.sep)[0]
        if top == "out" and ours(name.split(os.sep)[1]) and name.split(os.sep)[1] not in foreign:
            continue
        if name == os.path.join("out", "tokenizer_config.json") and link:
            continue
        assert after.get(name) == digest, f"{name} was changed or removed"
    assert victim.read_text() == "the user's file outside OUT"
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_overwrite_keeps_the_users_files_beside_a_finished_merge(recipe, tmp_path) -> None:
    out = tmp_path / "out"
    assert merge(recipe, str(out)).exit_code == 0
    (out / "model_v1_backup.safetensors").write_bytes(b"precious")
    (out / "model-card-draft.safetensors.md").write_text("draft")
    assert merge(recipe, str(out), "--overwrite").exit_code == 0
    assert (out / "model_v1_backup.safetensors").read_bytes() == b"precious"
    assert (out / "model-card-draft.safetensors.md").read_text() == "draft"


def test_a_changed_file_of_ours_is_in_the_way(recipe, tmp_path) -> None:
    out = tmp_path / "out"
    assert merge(recipe, str(out)).exit_code == 0
    (out / "README.md").write_text("my own notes about this merge")
    r = merge(recipe, str(out), "--overwrite")
    assert r.exit_code == 6 and "README.md" in r.output, r.output
    assert (out / "README.md").read_text() == "my own notes about this merge"


def test_a_stray_work_folder_beside_the_users_model(recipe, tmp_path) -> None:
    out = tmp_path / "out"
    (out / ".streammerge").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"the user's model")
    for flags in ((), ("--restart",)):
        r = merge(recipe, str(out), *flags)
        assert r.exit_code == 6 and "model" in r.output, r.output
        assert (out / "model.safetensors").read_bytes() == b"the user's model"


def test_an_input_folder_is_never_the_output(tiny_set, tmp_path, recipe) -> None:
    r = merge(recipe, tiny_set[1], "--overwrite")
    assert r.exit_code == 6 and "folder of the input model" in r.output, r.output


def test_verify_covers_config_tokenizer_and_index(recipe, tmp_path) -> None:
    out = tmp_path / "out"
    assert merge(recipe, str(out)).exit_code == 0
    manifest = json.loads((out / "streammerge.manifest.json").read_text())
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(manifest["files"])
    for name, change in (("config.json", lambda t: t.replace('"num_hidden_layers": 4', '"num_hidden_layers": 5')),
                         ("tokenizer.json", lambda t: t + " "),
                         ("model.safetensors.index.json", lambda t: t.replace("00001-of", "00002-of", 1))):
        path = out / name
        old = path.read_text()
        path.write_text(change(old))
        r = CliRunner().invoke(main, ["verify", str(out)])
        assert r.exit_code == 7 and f"file {name}: content differs" in r.output, (name, r.output)
        path.write_text(old)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


@pytest.mark.parametrize("name", ["../escaped", "/tmp/elsewhere", "a/b/c", ".", "x/.."])
def test_stage_names_stay_inside_the_intermediate_folder(tiny_set, tmp_path, name) -> None:
    cfg = tmp_path / "p.yml"
    cfg.write_text(f"name: {name}\nmerge_method: linear\nmodels: [{{model: {tiny_set[0]}}}]\n"
                   f"parameters: {{weight: 1}}\n---\nmerge_method: linear\nmodels: [{{model: {name}}}]\n"
                   "parameters: {weight: 1}\n")
    before = tree(str(tmp_path.parent))
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out")])
    assert r.exit_code == 3 and "a stage name is a folder name" in r.output, r.output
    assert tree(str(tmp_path.parent)) == before


def test_an_unrelated_merge_where_a_stage_would_go_is_refused(tiny_set, recipe, tmp_path) -> None:
    inter = tmp_path / "inter"
    assert merge(recipe, str(inter / "stage-one")).exit_code == 0  # somebody's finished merge
    before = tree(str(inter))
    cfg = tmp_path / "p.yml"
    cfg.write_text(f"name: stage-one\nmerge_method: linear\nmodels: [{{model: {tiny_set[2]}}}]\n"
                   f"parameters: {{weight: 1}}\n---\nmerge_method: linear\nmodels: [{{model: stage-one}}]\n"
                   "parameters: {weight: 1}\n")
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "--intermediate-dir", str(inter)])
    assert r.exit_code == 6 and "already holds a finished merge" in r.output, r.output
    assert tree(str(inter)) == before
    # the pipeline's own intermediate, from an earlier recipe of the same pipeline, is replaced
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out2"), "-q"])
    assert r.exit_code == 0, r.output
    cfg.write_text(cfg.read_text().replace("{weight: 1}\n---", "{weight: 0.5}\n---", 1))
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out2"), "-q", "--overwrite"])
    assert r.exit_code == 0, r.output


def test_an_output_nested_in_an_input_folder_leaves_the_input_untouched(tiny_set, tmp_path) -> None:
    import shutil

    model = str(tmp_path / "model")
    shutil.copytree(tiny_set[0], model)
    before = tree(model)
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {model}}}]\nparameters: {{weight: 1}}\n")
    out = os.path.join(model, "merged")
    for flags in ((), ("--overwrite",)):
        assert merge(str(cfg), out, *flags).exit_code == 0
    after = tree(model)
    assert {k: v for k, v in after.items() if not k.startswith("merged")} == before
    elsewhere = str(tmp_path / "elsewhere")
    assert merge(str(cfg), elsewhere).exit_code == 0
    shutil.rmtree(model)
    r = CliRunner().invoke(main, ["verify", elsewhere, "--inputs"])
    assert r.exit_code == 7 and "is gone" in r.output, r.output


@pytest.mark.parametrize("where", ["work folder", "lock", "journal"])
def test_links_in_the_work_folder_are_never_followed(recipe, tmp_path, where) -> None:
    victim_dir = tmp_path / "home"
    victim_dir.mkdir()
    (victim_dir / "thesis.txt").write_text("years of work")
    out = tmp_path / "out"
    out.mkdir()
    if where == "work folder":
        os.symlink(victim_dir, out / ".streammerge")
    else:
        (out / ".streammerge").mkdir()
        name = "lock" if where == "lock" else "journal.jsonl"
        os.symlink(victim_dir / "thesis.txt", out / ".streammerge" / name)
    before = tree(str(victim_dir))
    r = merge(recipe, str(out))
    assert r.exit_code == 6, r.output
    r = merge(recipe, str(out), "--restart")  # may drop a link inside its own work folder, never follow it
    assert r.exit_code in (0, 6), r.output
    assert tree(str(victim_dir)) == before
