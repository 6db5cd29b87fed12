"""What a new user sees: a copy-pasted mergekit-yaml command line works with only the program
name changed; progress lines in a non-terminal run and a final summary; `plan --explain` shows
where each parameter comes from (SEMANTICS §1.4); every kind of bad input gets a short message,
its own exit code and no traceback."""

from __future__ import annotations

import os
import re

import pytest
import torch
from click.testing import CliRunner
from helpers import ROOMY

from streammerge.cli import main

STAGE2 = os.path.join(os.path.dirname(__file__), "..", "examples", "mistral-7b-merge-14-v0.1.yml")


def invoke(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def ties_config(tmp_path, folders: list[str], extra: str = "") -> str:
    path = tmp_path / "merge.yml"
    path.write_text(f"merge_method: ties\nbase_model: {folders[0]}\nmodels:\n  - model: {folders[0]}\n"
                    + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for f in folders[1:])
                    + extra)
    return str(path)


def test_mergekit_tutorial_command_line(tiny_set, tmp_path) -> None:
    cfg = ties_config(tmp_path, tiny_set)
    out = str(tmp_path / "merged")
    r = invoke([cfg, out, "--cuda", "--allow-crimes", "--out-shard-size", "1B", "--lazy-unpickle",
                "--copy-tokenizer", "--write-model-card", "--low-cpu-memory", "--random-seed", "3", "-j", "2",
                "--trust-remote-code", "--clone-tensors"])
    assert r.exit_code == 0, r.output
    assert r.output.count("note: --allow-crimes") == 1 and "note: --lazy-unpickle: not needed" in r.output
    if not torch.cuda.is_available():
        assert "note: --cuda: torch sees no CUDA GPU here; merging on the CPU" in r.output
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(tiny_set, tmp_path) -> None:
    out = tmp_path / "merged"
    r = invoke([ties_config(tmp_path, tiny_set), str(out), "--device", "cuda"])
    assert r.exit_code == 5, r.output
    assert "--device cuda: torch sees no CUDA GPU here" in r.output and "--device cpu" in r.output
    assert "Traceback" not in r.output and not out.exists()
    r = invoke([ties_config(tmp_path, tiny_set), str(out), "--device", "tpu"])
    assert r.exit_code == 5 and "unknown device; use cpu, cuda, cuda:N or auto" in r.output


def test_no_copy_tokenizer_and_no_card(tiny_set, tmp_path) -> None:
    out = tmp_path / "merged"
    r = invoke([ties_config(tmp_path, tiny_set), str(out), "--no-copy-tokenizer", "--no-write-model-card", "-q"])
    assert r.exit_code == 0, r.output
    names = set(os.listdir(out))
    assert "tokenizer.json" not in names and "README.md" not in names and "config.json" in names


def test_progress_lines_and_summary_when_not_a_terminal(tiny_set, tmp_path) -> None:
    r = invoke(["run", ties_config(tmp_path, tiny_set), str(tmp_path / "o")])
    assert r.exit_code == 0
    lines = r.output.strip().splitlines()
    # binary units, as --max-memory; input bytes read (what the disk delivers) beside output written
    first = re.match(r"progress: 0/39 tensors, 0 B of ([0-9.]+ KiB) written, read 0 B of ([0-9.]+ [KM]iB) at ",
                     lines[0])
    assert first, lines[0]
    total, read = first.groups()
    assert lines[-2].startswith(f"progress: 39/39 tensors, {total} of {total} written, read {read} of {read} at ")
    assert "RSS " in lines[-2] and " of " in lines[-2].split("RSS ")[1]
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"done: 39 tensors (0 resumed), {total} in 1 shard(s)") and "peak RSS" in last
    assert "content xxh3-128" in last
    quiet = invoke(["run", ties_config(tmp_path, tiny_set), str(tmp_path / "q"), "-q"])
    assert "progress:" not in quiet.output and "done: 39 tensors" in quiet.output


def test_explain_shows_scope_filter_and_gradient(seed_cache) -> None:
    env = {"HF_HUB_CACHE": seed_cache}
    # stage 2 needs stage 1's output under its id; any 32-layer model of the set stands in for planning
    import make_models

    from streammerge.config import ModelRef
    from streammerge.hub import resolve_model

    os.environ["HF_HUB_CACHE"] = seed_cache
    try:
        base = resolve_model(ModelRef("mistralai/Mistral-7B-v0.1"))
    finally:
        del os.environ["HF_HUB_CACHE"]
    make_models.link(seed_cache, "EmbeddedLLM/Mistral-7B-Merge-14-v0", base)
    r = invoke(["plan", STAGE2, "--explain", "model.layers.12.self_attn.q_proj.weight"], env)
    assert r.exit_code == 0, r.output
    # t = 12/31 on [0, .5, .3, .7, 1]: s = 1.548, between 0.5 and 0.3 -> 0.5 - 0.548*0.2 = 0.390323
    assert "(layer 12; gradients read at position 0.387097 of its slice)" in r.output
    assert ("t = 0.390323    from parameters.t [0] (filter 'self_attn' matches), gradient [0, 0.5, 0.3, 0.7, 1] "
            "at t=0.387097") in r.output
    assert "(base)" in r.output
    r = invoke(["plan", STAGE2, "--explain", "model.layers.12.mlp.up_proj.weight"], env)
    assert "from parameters.t [1] (filter 'mlp' matches)" in r.output
    r = invoke(["plan", STAGE2, "--explain", "model.norm.weight"], env)
    assert "t = 0.5    from parameters.t [2] (no filter)" in r.output and "(not a layer tensor)" in r.output
    r = invoke(["plan", STAGE2, "--explain", "model.layers.12.self_attn.q_proj"], env)
    assert r.exit_code == 3 and "did you mean 'model.layers.12.self_attn.q_proj.weight'" in r.output


def test_explain_names_defaults_and_model_scopes(tiny_set, tmp_path) -> None:
    r = invoke(["plan", ties_config(tmp_path, tiny_set, "parameters: {lambda: 0.9}\n"), "--explain",
                "model.layers.1.mlp.up_proj.weight"])
    assert "lambda = 0.9    from parameters.lambda" in r.output
    assert "normalize = True    from default of ties" in r.output
    assert "density[1] = 0.5    from models[1].parameters.density" in r.output


ERRORS = [  # (config body, exit code, message fragment)
    ("merge_method: tie\nmodels: [{model: MODEL0}]\n", 3, "merge_method: unknown method 'tie'; did you mean 'ties'?"),
    ("merge_method: linear\nmodels: [{model: MODEL0}]\nparameters: {weigth: 1}\n", 5,
     "missing required parameter 'weight'"),
    ("merge_method: linear\nmodels: [{model: /no/such/model}]\nparameters: {weight: 1}\n", 4,
     "model /no/such/model: not a local folder and not in the local Hugging Face cache"),
    ("merge_method: arcee_fusion\nbase_model: MODEL0\nmodels: [{model: MODEL0}]\n", 5,
     "arcee_fusion takes exactly 2 inputs, got 1"),
    ("merge_method: linear\nslices: [{sources: [{model: MODEL0, layer_range: [0, 9]}]}]\n"
     "parameters: {weight: 1}\n", 5, "slices[0].sources[0].layer_range: [0, 9] goes past the 4 layers"),
    ("merge_method: linear\nmodels: [{model: MODEL0}, {model: WIDE}]\nparameters: {weight: 1}\n", 5,
     "vocabulary sizes differ"),
]


@pytest.mark.parametrize("body,code,fragment", ERRORS)
def test_error_messages(tiny_set, tmp_path, body, code, fragment) -> None:
    import make_models

    wide = str(tmp_path / "wide")
    make_models.write_set([wide], make_models.Shape(64, 160, 4, 4, 2, 200), seed=1)
    cfg = tmp_path / "bad.yml"
    cfg.write_text(body.replace("MODEL0", tiny_set[0]).replace("WIDE", wide))
    r = invoke(["run", str(cfg), str(tmp_path / "out")])
    assert r.exit_code == code, r.output
    assert fragment in r.output and "Traceback" not in r.output
    assert r.output.startswith(("error:", "warning:"))
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_and_output_folder_errors(tiny_set, tmp_path) -> None:
    import shutil

    broken = shutil.copytree(tiny_set[1], str(tmp_path / "broken"))
    shard = os.path.join(broken, sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))[0])
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"}}}}")
    r = invoke(["run", ties_config(tmp_path, [tiny_set[0], broken]), str(tmp_path / "out")])
    assert r.exit_code == 4 and f"{shard}: not a valid safetensors file: header is not valid JSON" in r.output
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("x")
    r = invoke(["run", ties_config(tmp_path, tiny_set), str(full)])
    assert r.exit_code == 6 and "is not empty and holds no streammerge run" in r.output
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        r = invoke(["run", ties_config(tmp_path, tiny_set), str(ro / "sub")])
        if os.geteuid() != 0:  # root may write anywhere
            assert r.exit_code == 6 and "cannot create the output folder" in r.output
    finally:
        os.chmod(ro, 0o700)


def test_verbose_shows_traceback(tiny_set, tmp_path) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text("merge_method: linear\nmodels: [{model: /no/such}]\nparameters: {weight: 1}\n")
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "o"), "-v"])
    assert r.exit_code == 4 and "Traceback" in r.output


def test_python_api(tiny_set, tmp_path) -> None:
    import streammerge

    cfg = ties_config(tmp_path, tiny_set)
    p = streammerge.plan(cfg)
    assert len(p.tasks) == 39 and p.method.name == "ties"
    (stats,) = streammerge.merge(cfg, tmp_path / "api-out", max_memory=ROOMY)
    assert stats.tensors == 39 and len(stats.manifest_hash) == 32
    assert streammerge.verify(tmp_path / "api-out", inputs=True).tensors == 39
    with open(cfg) as f:
        (again,) = streammerge.merge(f.read(), tmp_path / "api-out")
    assert again.up_to_date
