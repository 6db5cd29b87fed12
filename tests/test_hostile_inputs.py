"""Hostile and broken inputs get a clear error naming the file, never a traceback or a hang:
generated corruptions of safetensors headers, shard indexes whose entries climb out of the model
folder, duplicate tensor names, absurd layer numbers, a donor config.json that is missing or not
an object (found at plan time, before OUT is touched); and a finished output missing a shard is
not "up to date" but merged again."""

from __future__ import annotations

import json
import os
import shutil
import struct

import make_models
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_all_methods import RECIPES, config_text

from streammerge.cli import main

SHAPE = make_models.PRESETS["tiny"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("hostile") / "model")
    make_models.write_set([folder], SHAPE, seed=2, shard_bytes=80_000)
    return folder


def copy(src: str, dest: str) -> str:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    return dest


def plan(folder: str, tmp: str) -> tuple[int, str]:
    cfg = os.path.join(tmp, "m.yml")
    with open(cfg, "w") as f:
        f.write(f"merge_method: linear\nmodels: [{{model: {folder}}}]\nparameters: {{weight: 1}}\n")
    r = CliRunner().invoke(main, ["plan", cfg])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    return r.exit_code, r.output


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_headers_are_clear_errors(pristine, tmp_path_factory, data) -> None:
    tmp = str(tmp_path_factory.mktemp("h"))
    folder = copy(pristine, os.path.join(tmp, "m"))
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0])
    with open(shard, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, 8 + n - 1))
            f.seek(pos)
            f.write(bytes([data.draw(st.integers(0, 255))]))
    code, out = plan(folder, tmp)
    assert code in (0, 4, 5), out
    if code == 4:
        assert os.path.basename(shard) in out


@pytest.mark.parametrize("entry", ["/etc/hostname", "../outside.safetensors", "a/../../outside.safetensors",
                                   "", "sub/../../../x.safetensors"])
def test_a_shard_index_may_not_leave_the_model_folder(pristine, tmp_path, entry) -> None:
    folder = copy(pristine, str(tmp_path / "m"))
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0]
    shutil.copy(os.path.join(folder, shard), tmp_path / "outside.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        wm = json.load(f)
    wm["weight_map"][next(iter(wm["weight_map"]))] = entry
    with open(index, "w") as f:
        json.dump(wm, f)
    code, out = plan(folder, str(tmp_path))
    assert code == 4 and "outside the model folder" in out, out
    r = CliRunner().invoke(main, ["hash", folder])
    assert r.exit_code == 4 and "outside the model folder" in r.output


def test_a_text_file_as_shard_and_duplicate_names(pristine, tmp_path) -> None:
    folder = copy(pristine, str(tmp_path / "m"))
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0])
    with open(shard, "wb") as f:
        f.write(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    code, out = plan(folder, str(tmp_path))
    assert code == 4 and "first 8 bytes are not a header length" in out and "1936876918" not in out, out
    folder = copy(pristine, str(tmp_path / "d"))
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0])
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = f.read(n)
        rest = f.read()
    obj = json.loads(head)
    name = next(k for k in obj if k != "__metadata__")
    text = head.decode().rstrip()
    doubled = text[:-1] + "," + json.dumps(name) + ":" + json.dumps(obj[name]) + "}"
    doubled += " " * (-len(doubled) % 8)
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", len(doubled)) + doubled.encode() + rest)
    code, out = plan(folder, str(tmp_path))
    assert code == 4 and f"names {name!r} twice" in out, out


def test_an_absurd_layer_number_is_refused_at_once(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"model.layers.99999999999.x.weight": torch.ones(2, 2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    code, out = plan(str(folder), str(tmp_path))
    assert code == 5 and "a layer number past" in out, out


@pytest.mark.parametrize("content", [None, "[1, 2]", "{not json", "\xff\xfe"])
def test_the_donor_config_is_checked_before_any_work(pristine, tmp_path, content) -> None:
    folder = copy(pristine, str(tmp_path / "m"))
    path = os.path.join(folder, "config.json")
    if content is None:
        os.remove(path)
    else:
        with open(path, "w", encoding="latin-1") as f:
            f.write(content)
    code, out = plan(folder, str(tmp_path))
    assert code == 4 and "config.json" in out, out
    cfg = tmp_path / "m.yml"
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out")])
    assert r.exit_code == 4 and not (tmp_path / "out").exists(), r.output


def test_a_finished_output_missing_a_shard_is_merged_again(pristine, tmp_path) -> None:
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {pristine}}}]\nparameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["run", str(cfg), str(out), "--out-shard-size", "60K", "-q"]).exit_code == 0
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    want = (out / shards[1]).read_bytes()
    os.remove(out / shards[1])
    r = CliRunner().invoke(main, ["run", str(cfg), str(out), "--out-shard-size", "60K"])
    assert r.exit_code == 0 and "missing or changed since; merging again" in r.output, r.output
    assert (out / shards[1]).read_bytes() == want
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_nan_in_an_input_is_reported(pristine, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy(pristine, str(tmp_path / "m"))
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1])
    t = load_file(shard)
    name = sorted(t)[0]
    t[name].view(-1)[3] = float("nan")
    save_file(t, shard, metadata={"format": "pt"})
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {pristine}}}, {{model: {folder}}}]\n"
                   "parameters: {weight: 0.5}\n")
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0 and f"tensor {name!r}: the merged values hold NaN or Inf" in r.output, r.output
    assert r.output.count("NaN or Inf") == 1


def test_a_merged_nan_is_written_as_the_one_quiet_nan(pristine, tmp_path) -> None:
    """A NaN's sign and payload follow the instruction that made it (CPU, GPU, compiled loop); the
    output holds the dtype's quiet NaN, sign clear, whatever NaN an input held."""
    from safetensors.torch import load_file, save_file

    folder = copy(pristine, str(tmp_path / "m"))
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1])
    t = load_file(shard)
    name = sorted(t)[0]
    ints = {2: torch.int16, 4: torch.int32}[t[name].element_size()]
    negative_nan = {2: -63, 4: -4194303}[t[name].element_size()]  # 0xFFC1, 0xFFC00001: sign set, a payload
    t[name].view(-1).view(ints)[3] = negative_nan
    assert torch.isnan(t[name].view(-1)[3])
    save_file(t, shard, metadata={"format": "pt"})
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {pristine}}}, {{model: {folder}}}]\n"
                   "parameters: {weight: 0.5}\n")
    assert CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q"]).exit_code == 0
    out = tmp_path / "out"
    merged = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(out / f).items()}[name]
    nans = merged.isnan().view(-1)
    assert nans.tolist() == [i == 3 for i in range(merged.numel())]
    quiet = torch.tensor([float("nan")], dtype=merged.dtype).view(ints)
    assert torch.equal(merged.view(-1).view(ints)[nans], quiet)


def test_an_input_changed_during_the_run_leaves_nothing_finished(pristine, tmp_path) -> None:
    from streammerge.config import parse_config
    from streammerge.errors import InputError
    from streammerge.executor import Executor
    from streammerge.options import RunOptions
    from streammerge.planner import make_plan

    folder = copy(pristine, str(tmp_path / "m"))
    cfg = parse_config(f"merge_method: linear\nmodels: [{{model: {folder}}}]\nparameters: {{weight: 1}}\n")
    plan = make_plan(cfg)
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0])
    os.utime(shard, ns=(0, 0))  # what a re-download or an edit during the merge does to the file's time
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match="changed during the merge"):
        Executor(plan, out, RunOptions(max_memory=1 << 32)).run()
    assert not os.path.exists(os.path.join(out, "streammerge.manifest.json"))
    assert not any(f.endswith(".safetensors") for f in os.listdir(out))  # only .partial shards: unfinished
    Executor(make_plan(cfg), out, RunOptions(max_memory=1 << 32)).run()  # the same merge, planned again, finishes
    assert CliRunner().invoke(main, ["verify", out]).exit_code == 0


def test_a_tensor_missing_from_its_shard_is_named(pristine, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy(pristine, str(tmp_path / "m"))
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1])
    t = load_file(shard)
    gone = sorted(t)[0]
    del t[gone]
    save_file(t, shard, metadata={"format": "pt"})
    code, out = plan(folder, str(tmp_path))
    assert code == 5 and f"tensor {gone!r} required but not present" in out and "lists it in" in out, out


def test_writes_never_follow_a_link_out_of_the_output(pristine, tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    (out / ".streammerge").mkdir(parents=True)
    os.symlink(victim, out / "model.safetensors.partial")
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {pristine}}}]\nparameters: {{weight: 1}}\n")
    r = CliRunner().invoke(main, ["run", str(cfg), str(out)])
    assert r.exit_code == 6 and "Traceback" not in r.output, r.output
    assert victim.read_bytes() == b"precious"


def test_a_shard_truncated_under_the_run_is_an_input_error_not_sigbus(pristine, tmp_path) -> None:
    """Reads go through pread: a shard cut short after planning (as a re-download or a full disk
    would) gives exit-4 InputError naming the file; with a memory map the process died of SIGBUS."""
    from streammerge.config import parse_config
    from streammerge.errors import InputError
    from streammerge.executor import Executor
    from streammerge.options import RunOptions
    from streammerge.planner import make_plan

    folder = copy(pristine, str(tmp_path / "m"))
    cfg = parse_config(f"merge_method: linear\nmodels: [{{model: {folder}}}]\nparameters: {{weight: 1}}\n")
    plan = make_plan(cfg)
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0])
    os.truncate(shard, os.path.getsize(shard) // 2)
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match=f"{os.path.basename(shard)}.*truncated during the merge"):
        Executor(plan, out, RunOptions(max_memory=1 << 32)).run()
    assert not os.path.exists(os.path.join(out, "streammerge.manifest.json"))


@pytest.mark.parametrize("method", ["slerp", "linear", "ties"])
def test_inputs_holding_both_infinities_merge_with_a_warning(method, tmp_path, monkeypatch) -> None:
    """A tensor whose rows hold +inf and -inf makes per-row sums of both signs (SLERP's dot product,
    the report's products); their exact total is NaN, as adding them gives, not a ValueError out
    of math.fsum: the merge ends with the warning that names the tensor, the same bytes with the
    compiled loops and without."""
    from safetensors.torch import load_file, save_file

    base, ft = str(tmp_path / "base"), str(tmp_path / "ft")
    make_models.write_set([base, ft], SHAPE, seed=4)
    shard = os.path.join(ft, sorted(f for f in os.listdir(ft) if f.endswith(".safetensors"))[0])
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    w = tensors[name]
    w[: w.shape[0] // 2, 0] = float("inf")  # one per row: each row's sum is ±inf, not NaN
    w[w.shape[0] // 2:, 0] = float("-inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    cfg = tmp_path / "m.yml"
    body = {"slerp": f"base_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft}}}]\nparameters: {{t: 0.3}}\n",
            "linear": f"models: [{{model: {base}, parameters: {{weight: 0.5}}}}, "
                      f"{{model: {ft}, parameters: {{weight: 0.5}}}}]\n",
            "ties": f"base_model: {base}\nmodels: [{{model: {base}}}, "
                    f"{{model: {ft}, parameters: {{weight: 0.5, density: 0.5}}}}]\n"}[method]
    cfg.write_text(f"merge_method: {method}\n{body}")
    digests = set()
    for jit in ("0", "1"):
        monkeypatch.setenv("STREAMMERGE_JIT", jit)
        out = tmp_path / f"out{jit}"
        r = CliRunner().invoke(main, ["run", str(cfg), str(out), "-q"])
        assert r.exit_code == 0 and r.exception is None, (jit, r.output, repr(r.exception))
        assert "Traceback" not in r.output
        assert f"tensor {name!r}: the merged values hold NaN or Inf" in r.output
        with open(out / "streammerge.manifest.json") as f:
            digests.add(json.load(f)["content_xxh3_128"])
    assert len(digests) == 1


@pytest.fixture(scope="module")
def special_set(tmp_path_factory) -> tuple[list[str], str]:
    """A base and three fine-tunes; the second fine-tune's up_proj of layer 1 holds +inf, -inf
    and NaN among its numbers (every fifth, sixth and seventh element)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("special")
    folders = [str(root / n) for n in ("base", "ft1", "ft2", "ft3")]
    make_models.write_set(folders, SHAPE, seed=5, shard_bytes=120_000)
    name = "model.layers.1.mlp.up_proj.weight"
    for shard in (os.path.join(folders[2], f) for f in os.listdir(folders[2]) if f.endswith(".safetensors")):
        tensors = load_file(shard)
        if name in tensors:
            flat = tensors[name].view(-1)
            flat[::5], flat[1::6], flat[2::7] = float("inf"), float("-inf"), float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
            return folders, name
    raise AssertionError(f"{name} not in {folders[2]}")


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_every_method_merges_infinities_and_nan_with_a_warning(special_set, tmp_path, method) -> None:
    """Each method's recipe (test_all_methods) over an input holding ±inf and NaN ends in a verified
    output with the warning naming the tensor when the recipe reads that input, never a traceback
    (SCE's variance of an infinite delta is NaN, whose bits, sign set, its histogram refused)."""
    folders, name = special_set
    cfg = tmp_path / "m.yml"
    cfg.write_text(config_text(method, folders))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(cfg), str(out), "-q"])
    assert r.exit_code == 0 and r.exception is None, (r.output, repr(r.exception))
    assert "Traceback" not in r.output
    warned = f"tensor {name!r}: the merged values hold NaN or Inf" in r.output
    assert warned == ("M2" in RECIPES[method][0]), r.output
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
