"""The seed merge on stand-ins for the files the Hub really serves (tools/make_hub.py): sharded and
single `.bin` and safetensors, both formats in one repository, bfloat16 / float16 / float32, 32000-
and 32002-row (ChatML) vocabularies, as symlinks into an HF cache's blobs.

The seed pipeline runs verbatim with --unsafe-truncate-embeddings and with `tokenizer: {source:
base}`; its stage 1 matches a float64 reference computed from the inputs as torch itself loads
them; without either way out the plan refuses and names both; a pipeline's stage 2 mistake is
reported before stage 1 runs; every missing model is listed at once; a merge of mixed input dtypes
promotes as torch does and matches the reference to float32 rounding; the budget a refusal asks
for merges the pipeline in a fresh run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import make_hub
import numpy as np
import pytest
import reference as ref
import torch
from click.testing import CliRunner
from safetensors import safe_open

from streammerge.cli import main

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
PIPELINE = os.path.join(EXAMPLES, "mistral-7b-merge-14-pipeline.yml")
STAGE1 = os.path.join(EXAMPLES, "mistral-7b-merge-14-v0.yml")


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> str:
    cache = str(tmp_path_factory.mktemp("hub"))
    make_hub.make_hub(cache, make_hub.PRESETS["tiny32"], seed=5, shard_bytes=250_000)
    return cache


def cli(args: list[str], cache: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, args, env={"HF_HUB_CACHE": cache}, catch_exceptions=False)


def snapshot(cache: str, repo_id: str) -> str:
    snaps = os.path.join(cache, "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.join(snaps, os.listdir(snaps)[0])


def load_any(folder: str) -> dict[str, torch.Tensor]:
    """A model's tensors as torch and safetensors load them (not through streammerge): safetensors
    first, as mergekit looks."""
    files = sorted(os.listdir(folder))
    st = [f for f in files if f.endswith(".safetensors")]
    out: dict[str, torch.Tensor] = {}
    for f in st or [f for f in files if f.endswith(".bin")]:
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        else:
            out.update(torch.load(os.path.join(folder, f), weights_only=True))
    return out


def test_the_stand_ins_have_the_hubs_variety(hub) -> None:
    kinds = set()
    for r in make_hub.SEED_REPOS:
        snap = snapshot(hub, r.repo_id)
        files = os.listdir(snap)
        assert all(os.path.islink(os.path.join(snap, f)) for f in files)  # into blobs/, as the Hub client does
        kinds.add((any(f.endswith(".bin") for f in files), any(f.endswith(".safetensors") for f in files),
                   "pytorch_model.bin" in files, "model.safetensors" in files))
        rows = json.loads(Path(os.path.join(snap, "config.json")).read_text())["vocab_size"]
        assert rows == 96 + 2 * r.chatml and (("added_tokens.json" in files) == r.chatml)
    assert len(kinds) == 5  # sharded/single .bin, sharded/single safetensors, both formats


def _reference_stage1(hub: str, name: str) -> np.ndarray:
    from streammerge.config import parse_config

    cfg = parse_config(Path(STAGE1).read_text())
    ms = [load_any(snapshot(hub, str(s.model)))[name] for s in cfg.slices[0].sources]
    xs = [m[:96].to(torch.bfloat16).double().numpy() for m in ms]  # config dtype: cast at load; common rows
    densities = [0.4] * 13 + [0.5]
    keeps = [ref.dare_keep(0, k, name, xs[0].size, d).reshape(xs[0].shape) for k, d in enumerate(densities, 1)]
    return ref.task_arithmetic(xs[0], xs[1:], [0.08] * 14, keeps, consensus=True, normalize=False, rescale=True)


def _forward(out: str) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 17, 40]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def truncated(hub, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("seed") / "merged")
    r = cli(["run", PIPELINE, out, "--unsafe-truncate-embeddings", "-q"], hub)
    assert r.exit_code == 0, r.output
    return out


def test_seed_pipeline_verbatim_with_unsafe_truncate(hub, truncated) -> None:
    r = cli(["verify", truncated, "--inputs"], hub)
    assert r.exit_code == 0, r.output
    stage1 = truncated + ".stages/EmbeddedLLM/Mistral-7B-Merge-14-v0"
    assert CliRunner().invoke(main, ["verify", stage1, "--inputs"]).exit_code == 0  # 15 inputs, .bin among them
    manifest = json.loads(Path(os.path.join(stage1, "streammerge.manifest.json")).read_text())
    bin_inputs = [i for i in manifest["inputs"] if "dolphin" in i["model"]]
    assert bin_inputs and bin_inputs[0]["tensors"]  # .bin inputs' bytes are hashed like any other
    got = load_any(stage1)
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.v_proj.weight", "lm_head.weight"):
        np.testing.assert_allclose(got[name].double().numpy(), _reference_stage1(hub, name), rtol=2**-8, atol=1e-7)
    _forward(truncated)


def test_seed_pipeline_with_the_base_tokenizer(hub, truncated, tmp_path) -> None:
    text = Path(PIPELINE).read_text()
    text = text.replace("dtype: bfloat16\n---", "dtype: bfloat16\ntokenizer:\n  source: base\n---")
    cfg = tmp_path / "pipeline.yml"
    cfg.write_text(text)
    out = str(tmp_path / "merged")
    r = cli(["run", str(cfg), out, "-q"], hub)
    assert r.exit_code == 0, r.output
    assert cli(["verify", out, "--inputs"], hub).exit_code == 0
    # the base's 96 tokens are the first 96 rows of every stand-in, so aligning by token keeps exactly
    # the rows truncation keeps: the two outputs agree tensor for tensor
    a, b = load_any(out), load_any(truncated)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _forward(out)


def test_vocabulary_mismatch_names_both_ways_out(hub) -> None:
    r = cli(["plan", STAGE1], hub)
    assert r.exit_code == 5
    assert "96 rows: mistralai/Mistral-7B-v0.1" in r.output and "98 rows: ehartford/dolphin" in r.output
    assert "tokenizer: {source: base}" in r.output and "--unsafe-truncate-embeddings" in r.output


def test_a_stage_2_mistake_is_reported_before_stage_1_runs(hub, tmp_path) -> None:
    cfg = tmp_path / "p.yml"
    cfg.write_text(Path(PIPELINE).read_text().replace("layer_range: [0, 32]", "layer_range: [0, 40]"))
    out = tmp_path / "merged"
    for cmd in (["run", str(cfg), str(out), "--unsafe-truncate-embeddings"],
                ["plan", str(cfg), "--unsafe-truncate-embeddings"]):
        r = cli(cmd, hub)
        assert r.exit_code == 5, r.output
        assert "stage 2/2" in r.output and "[0, 40] goes past the 32 layers of EmbeddedLLM/Mistral-7B-Merge-14-v0" \
            in r.output
    assert not os.path.exists(str(out) + ".stages") and not out.exists()
    r = cli(["plan", PIPELINE, "--unsafe-truncate-embeddings"], hub)
    assert r.exit_code == 0 and "== stage 2/2" in r.output and "(written by an earlier stage)" in r.output


def test_every_missing_model_is_listed_at_once(hub, tmp_path) -> None:
    r = cli(["plan", STAGE1], str(tmp_path / "empty-cache"))
    assert r.exit_code == 4
    assert "15 models are not local folders" in r.output
    for s in make_hub.SEED_REPOS[:15]:
        assert f"  - {s.repo_id}\n" in r.output and f" download {s.repo_id}\n" in r.output


def test_mixed_input_dtypes_promote_as_torch_does(hub, tmp_path) -> None:
    repos = ["mistralai/Mistral-7B-v0.1", "SciPhi/SciPhi-Mistral-7B-32k", "ehartford/samantha-1.2-mistral-7b",
             "Arc53/docsgpt-7b-mistral"]  # bf16 (both formats), f32 single .bin, f16 sharded .bin, f16 safetensors
    cfg = tmp_path / "ta.yml"
    cfg.write_text("merge_method: task_arithmetic\nbase_model: " + repos[0] + "\nmodels:\n"
                   + "".join(f"  - model: {r}\n    parameters: {{weight: {w}}}\n"
                             for r, w in zip(repos[1:], (0.5, 0.3, 0.7))))
    out = str(tmp_path / "out")
    r = cli(["run", str(cfg), out, "-q"], hub)
    assert r.exit_code == 0, r.output
    got = load_any(out)
    ins = [load_any(snapshot(hub, x)) for x in repos]
    for name in ("model.layers.3.mlp.down_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert got[name].dtype == torch.float32  # bf16 + f16 + f32 -> f32
        xs = [m[name].double().numpy() for m in ins]
        want = xs[0] + sum(w * (x - xs[0]) for w, x in zip((0.5, 0.3, 0.7), xs[1:]))
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=1e-6, atol=1e-8)
    only16 = tmp_path / "f16.yml"
    sciphi = "  - model: SciPhi/SciPhi-Mistral-7B-32k\n    parameters: {weight: 0.5}\n"
    only16.write_text(cfg.read_text().replace(sciphi, ""))
    r = cli(["plan", str(only16), "--json"], hub)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tensors"][0]["dtype"] == "F32"  # bf16 + f16 -> f32, as torch promotes


def test_the_budget_a_refusal_asks_for_merges_the_pipeline(hub, tmp_path) -> None:
    """As a user follows it, in fresh processes: the seed pipeline refused at 100MiB names a budget
    ("use at least --max-memory N"), and a run at N merges both stages. (Before, the figure was the
    smallest budget as measured then, and the next run was refused again: at the 322MiB asked for,
    three runs asked for 325 and 324 MiB (stage 1) and 336 MiB (stage 2).)"""
    out = str(tmp_path / "out")

    def run(max_memory: str) -> subprocess.CompletedProcess[str]:
        cmd = ["run", PIPELINE, out, "--unsafe-truncate-embeddings", "-q", "--max-memory", max_memory]
        return subprocess.run([sys.executable, "-m", "streammerge", *cmd], env={**os.environ, "HF_HUB_CACHE": hub},
                              capture_output=True, text=True, timeout=600)

    refused = run("100MiB")
    asked = re.search(r"use at least --max-memory (\d+MiB)", refused.stderr)
    assert refused.returncode == 5 and asked, refused.stderr
    assert not os.path.exists(out)  # refused before any stage ran
    done = run(asked.group(1))
    assert done.returncode == 0, f"at {asked.group(1)}: {done.stderr}"
