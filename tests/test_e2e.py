"""Both seed configs end to end, verbatim, on tiny 32-layer models found in a Hugging Face cache:
stage 1 (14-model DARE-TIES) checked against the float64 reference, stage 2 (gradient SLERP) on
its output; transformers loads the result and runs a forward pass; output bytes do not depend on
the chunk budget; a finished output is never overwritten; bad input exits with a clear message."""

from __future__ import annotations

import json
import os
import shutil

import make_models
import numpy as np
import pytest
import reference as ref
import torch
from click.testing import CliRunner
from helpers import assert_golden
from safetensors import safe_open

from streammerge.budget import widest_row
from streammerge.cli import main
from streammerge.config import parse_config
from streammerge.executor import Executor
from streammerge.options import RunOptions
from streammerge.planner import make_plan
from streammerge.schedule import make_schedule

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
STAGE1 = os.path.join(EXAMPLES, "mistral-7b-merge-14-v0.yml")
STAGE2 = os.path.join(EXAMPLES, "mistral-7b-merge-14-v0.1.yml")


def cli(args: list[str], cache: str):
    return CliRunner().invoke(main, args, env={"HF_HUB_CACHE": cache}, catch_exceptions=False)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def open_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def stage1(seed_cache, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("stage1") / "out")
    r = cli(["run", STAGE1, out, "--out-shard-size", "300K"], seed_cache)
    assert r.exit_code == 0, r.output
    assert_golden("seed/stage1", out)
    make_models.link(seed_cache, "EmbeddedLLM/Mistral-7B-Merge-14-v0", out)
    return out


def test_stage1_output_folder(stage1) -> None:
    files = set(os.listdir(stage1))
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and not any(f.endswith(".partial") for f in files)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
            "mergekit_config.yml", "model.safetensors.index.json", "streammerge.manifest.json"} <= files
    assert ".streammerge" not in files
    assert read(os.path.join(stage1, "mergekit_config.yml")) == read(STAGE1)
    index = json.loads(read(os.path.join(stage1, "model.safetensors.index.json")))
    tensors = load(stage1)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    card = read(os.path.join(stage1, "README.md"))
    assert card.startswith("---\nbase_model:\n") and "- mistralai/Mistral-7B-v0.1" in card
    assert "base_model_relation: merge" in card and "streammerge verify" in card
    assert json.loads(read(os.path.join(stage1, "config.json")))["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.5.self_attn.k_proj.weight",
                                  "model.layers.31.mlp.down_proj.weight", "model.norm.weight"])
def test_stage1_matches_reference(stage1, seed_cache, name) -> None:
    cfg = parse_config(read(STAGE1))
    refs = [s.model for s in cfg.slices[0].sources]
    folders = make_models_folders(seed_cache, [str(r) for r in refs])
    xs = [load(f)[name].double().numpy() for f in folders]
    densities = [0.4] * 13 + [0.5]
    keeps = [ref.dare_keep(0, k, name, xs[0].size, d).reshape(xs[0].shape)
             for k, d in enumerate(densities, start=1)]
    want = ref.task_arithmetic(xs[0], xs[1:], [0.08] * 14, keeps, consensus=True, normalize=False, rescale=True)
    got = load(stage1)[name].double().numpy()
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-7)
    assert not np.array_equal(got, xs[0])


def make_models_folders(cache: str, ids: list[str]) -> list[str]:
    from streammerge.config import ModelRef
    from streammerge.hub import resolve_model

    old = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = cache
    try:
        return [resolve_model(ModelRef(i)) for i in ids]
    finally:
        if old is None:
            del os.environ["HF_HUB_CACHE"]
        else:
            os.environ["HF_HUB_CACHE"] = old


def test_stage2_gradient_slerp_and_transformers_forward(stage1, seed_cache, tmp_path) -> None:
    os.environ["HF_HUB_CACHE"] = seed_cache
    try:
        plan = make_plan(parse_config(read(STAGE2)))
    finally:
        del os.environ["HF_HUB_CACHE"]
    pts = np.linspace(0, 1, 5)
    for t in plan.tasks:
        if ".layers." in t.name:
            x = int(t.name.split(".")[2]) / 31
            want = (np.interp(x, pts, [0, .5, .3, .7, 1]) if "self_attn" in t.name
                    else np.interp(x, pts, [1, .5, .7, .3, 0]) if "mlp" in t.name else 0.5)
        else:
            want = 0.5  # t = 0 for non-layer tensors, but no filter matches them
        assert t.ctx.shared["t"] == pytest.approx(want, abs=1e-12), t.name
    out = str(tmp_path / "stage2")
    r = cli(["run", STAGE2, out, "-q"], seed_cache)
    assert r.exit_code == 0, r.output
    assert_golden("seed/stage2", out)
    got = load(out)
    trinity = make_models_folders(seed_cache, ["janai-hq/trinity-v1"])[0]
    name = "model.layers.12.self_attn.q_proj.weight"
    t = float(np.interp(12 / 31, pts, [0, .5, .3, .7, 1]))
    want = ref.slerp(t, load(stage1)[name].double().numpy(), load(trinity)[name].double().numpy())
    np.testing.assert_allclose(got[name].double().numpy(), want, rtol=2**-8, atol=1e-7)

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w5 w17 w40 w3", return_tensors="pt").input_ids
    assert ids.shape == (1, 4)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
    assert model.config.num_hidden_layers == 32


def test_output_bytes_do_not_depend_on_chunking(seed_cache, stage1, tmp_path, monkeypatch) -> None:
    """One-row blocks and sub-chunks against whole tensors (the stage1 fixture's default budget
    reads every tensor whole): the extremes; tests/test_all_methods.py takes every method through
    two-row blocks. The one-row run takes the compiled loops where numba is installed (a third
    faster here than torch's forms on one-row blocks); the fixture's, too small to load them,
    the torch forms."""
    monkeypatch.setenv("STREAMMERGE_JIT", "1")
    os.environ["HF_HUB_CACHE"] = seed_cache
    try:
        plan = make_plan(parse_config(read(STAGE1)), max_shard_bytes=300_000)
        assert all(len(t.steps) == 1 for t in make_schedule(plan, 1 << 34, overlap=False).tasks)  # whole, roomy
        out = str(tmp_path / "one-row")
        Executor(plan, out, RunOptions(max_memory=1 << 34, chunk_bytes=widest_row(plan)[0])).run()
    finally:
        del os.environ["HF_HUB_CACHE"]
    blobs = []
    for folder in (out, stage1):
        shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        blobs.append([open_bytes(os.path.join(folder, s)) for s in shards])
    assert len(blobs[0]) > 1 and blobs[0] == blobs[1]


def test_finished_output_is_not_overwritten(stage1, seed_cache) -> None:
    before = {f: os.path.getmtime(os.path.join(stage1, f)) for f in os.listdir(stage1)}
    r = cli(["run", STAGE1, stage1], seed_cache)
    assert r.exit_code == 6
    assert "already holds a finished merge" in r.output and "--overwrite" in r.output
    assert before == {f: os.path.getmtime(os.path.join(stage1, f)) for f in os.listdir(stage1)}


def test_overwrite_and_foreign_folder(seed_cache, tmp_path) -> None:
    out = tmp_path / "o"
    assert cli(["run", STAGE1, str(out), "-q"], seed_cache).exit_code == 0
    first = (out / "model.safetensors").read_bytes()
    r = cli(["run", STAGE1, str(out), "-q", "--overwrite"], seed_cache)
    assert r.exit_code == 0 and (out / "model.safetensors").read_bytes() == first
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = cli(["run", STAGE1, str(foreign)], seed_cache)
    assert r.exit_code == 6 and "not empty" in r.output
    assert os.listdir(foreign) == ["notes.txt"]


def test_corrupt_input_shard_is_a_clear_error(seed_cache, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    shutil.copytree(seed_cache, cache, symlinks=True)
    folder = make_models_folders(cache, ["SciPhi/SciPhi-Mistral-7B-32k"])[0]
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    r = cli(["run", STAGE1, str(tmp_path / "out")], cache)
    assert r.exit_code == 4
    assert shard in r.output and "truncated" in r.output and "Traceback" not in r.output
    assert not os.path.exists(tmp_path / "out")


def test_config_errors_exit_3_with_paths(tmp_path, seed_cache) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {density: '0,4', weight: 1}\n"
                   "dtype: bf16\n")
    r = cli(["run", str(cfg), str(tmp_path / "out")], seed_cache)
    assert r.exit_code == 3
    assert "dtype: unknown dtype 'bf16'" in r.output and "Traceback" not in r.output


def test_output_bytes_do_not_depend_on_thread_count_or_overlap(seed_cache, stage1, tmp_path) -> None:
    """-j 1 with read-ahead and write-behind threads, -j 3 without, and the stage1 fixture (the
    defaults: a thread per core, no helper threads under 4 cores) write the same tensors."""
    import json

    from launch import streammerge

    def tensors(out: str) -> dict[str, str]:
        with open(os.path.join(out, "streammerge.manifest.json")) as f:
            return {k: v["xxh3_128"] for k, v in json.load(f)["tensors"].items()}

    for threads, overlap in (("1", "--overlap"), ("3", "--no-overlap")):
        out = str(tmp_path / f"j{threads}{overlap}" / "out")
        r = streammerge(STAGE1, out, "-j", threads, overlap, "-q", env={**os.environ, "HF_HUB_CACHE": seed_cache})
        assert r.returncode == 0, r.stderr
        assert tensors(out) == tensors(stage1), f"-j {threads} {overlap} changed the output"
