"""Layer detection from tensor names works beyond Mistral: Llama-, Qwen2- (attention biases) and
Gemma-shaped (tied embeddings, no lm_head) models made by tools/ merge with ties, keep their
architecture's tensors, and load and run in transformers."""

from __future__ import annotations

import json
import os

import make_models
import pytest
import torch
from safetensors.torch import load_file

from streammerge.config import parse_config
from streammerge.executor import Executor
from streammerge.options import RunOptions
from streammerge.planner import make_plan


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_architecture_merges_and_runs(arch, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    folders = [str(tmp_path / n) for n in ("base", "a", "b")]
    make_models.write_set(folders, make_models.arch_shape(arch), seed=7, shard_bytes=150_000)
    models = "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for f in folders[1:])
    cfg = parse_config(f"merge_method: ties\nbase_model: {folders[0]}\nmodels:\n  - model: {folders[0]}\n{models}")
    plan = make_plan(cfg)
    names = {t.name for t in plan.tasks}
    assert ("lm_head.weight" in names) == (arch != "gemma")
    assert ("model.layers.2.self_attn.q_proj.bias" in names) == (arch == "qwen2")
    out = str(tmp_path / "out")
    Executor(plan, out, RunOptions(max_memory=1 << 33)).run()
    written = load_file(os.path.join(out, "model.safetensors"))
    assert set(written) == names
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [make_models.ARCHS[arch][0]]
    assert config["tie_word_embeddings"] == (arch == "gemma")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 17, 40, 5]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
