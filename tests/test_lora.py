"""LoRA adapters (`BASE+ADAPTER`, and mergekit's dict form): the adapted weight W + scale·B·A is
formed row chunk by row chunk and matches a float64 reference written from the PEFT formula, for
linear layers, embeddings (lora_embedding_A/B), rank/alpha patterns and rsLoRA; the bytes do not
depend on the chunk size; plan --explain says which tensors are adapted; adapters that do not fit
the base, DoRA adapters and folders without an adapter are clear errors."""

from __future__ import annotations

import json
import math
import os

import make_hub
import make_models
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_golden, load_folder
from safetensors.torch import load_file

from streammerge.budget import widest_row
from streammerge.cli import main
from streammerge.config import parse_config
from streammerge.executor import Executor
from streammerge.options import RunOptions
from streammerge.planner import make_plan

SHAPE = make_models.PRESETS["tiny"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("lora") / "base")
    make_models.write_set([folder], SHAPE, seed=7, dtype=torch.float32)
    return folder


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _dump(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def reference(base: str, adapter: str) -> dict[str, np.ndarray]:
    """The adapted model in float64, from the files (PEFT's formula, read independently)."""
    w = {}
    for f in os.listdir(base):
        if f.endswith(".safetensors"):
            w.update({k: v.double().numpy() for k, v in load_file(os.path.join(base, f)).items()})
    cfg = _json(os.path.join(adapter, "adapter_config.json"))
    ad = {k: v.double().numpy() for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items()}
    for k in ad:
        if ".lora_A" in k or ".lora_embedding_A" in k:
            module = k.split(".lora_")[0].removeprefix("base_model.model.")
            b = ad[k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            r = cfg["rank_pattern"].get(module.split(".")[-1], cfg["r"]) if cfg.get("rank_pattern") else cfg["r"]
            alpha = cfg.get("alpha_pattern", {}).get(module.split(".")[-1], cfg["lora_alpha"])
            scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            delta = b @ ad[k]
            w[module + ".weight"] = w[module + ".weight"] + scale * (delta.T if "embedding" in k else delta)
    return w


def merged(out: str) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(os.path.join(out, "model.safetensors")).items()}


@pytest.mark.parametrize("variant", ["plain", "embeddings+bin", "patterns+rslora"])
def test_adapted_model_matches_the_peft_formula(base, tmp_path, variant) -> None:
    adapter = str(tmp_path / "adapter")
    make_hub.make_adapter(adapter, SHAPE, rank=4, alpha=8, seed=3, embeddings="embeddings" in variant)
    if "patterns" in variant:
        cfg = _json(os.path.join(adapter, "adapter_config.json"))
        cfg.update(rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 3.0}, use_rslora=True)
        _dump(os.path.join(adapter, "adapter_config.json"), cfg)
    want = reference(base, adapter)
    if "bin" in variant:  # the same factors, as adapter_model.bin
        t = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        os.remove(os.path.join(adapter, "adapter_model.safetensors"))
        torch.save(t, os.path.join(adapter, "adapter_model.bin"))
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}\n    parameters: {{weight: 1}}\n")
    out = str(tmp_path / "out")
    r = CliRunner().invoke(main, ["run", str(cfg), out, "-q"])
    assert r.exit_code == 0, r.output
    got = merged(out)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    adapted = [k for k in want if "q_proj" in k or ("embed" in k and "embeddings" in variant)]
    assert adapted and all(not np.allclose(got[k], load_folder(base)[k]) for k in adapted)


def test_the_configs_dtype_rounds_the_adapted_weights(base, tmp_path) -> None:
    """`dtype: bfloat16` over a float32 base with an adapter: W + B·A is formed in float32 and then
    rounded, as a merged adapter loaded in that dtype is (not W rounded first and the delta added)."""
    adapter = make_hub.make_adapter(str(tmp_path / "a"), SHAPE, rank=4, alpha=8, seed=3)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tmp_path / f"{dtype}.yml"
        cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}\n    parameters: {{weight: 1}}\n"
                       f"dtype: {dtype}\nout_dtype: float32\n")
        r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / dtype), "-q"])
        assert r.exit_code == 0, r.output
        outs[dtype] = load_file(os.path.join(str(tmp_path / dtype), "model.safetensors"))
    adapted = [k for k in outs["float32"] if "q_proj" in k]
    assert adapted
    for k, wide in outs["float32"].items():
        assert torch.equal(outs["bfloat16"][k], wide.to(torch.bfloat16).to(torch.float32)), k


def test_bytes_do_not_depend_on_chunking_and_explain_names_the_adapter(base, tmp_path) -> None:
    adapter = make_hub.make_adapter(str(tmp_path / "a"), SHAPE, seed=5, embeddings=True)
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - model: {{model: {{path: {base}}}, lora: {{path: {adapter}}}}}\n    parameters: {{weight: 0.7}}\n")
    outs = []
    for k, factor in enumerate((1, 3, None)):
        plan = make_plan(parse_config(text))
        need, _ = widest_row(plan)
        out = str(tmp_path / f"o{k}")
        Executor(plan, out, RunOptions(max_memory=1 << 34, chunk_bytes=need * factor if factor else 1 << 30)).run()
        assert_golden("lora/task_arithmetic", out)
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            outs.append(f.read())
    assert outs[0] == outs[1] == outs[2]
    cfg = tmp_path / "m.yml"
    cfg.write_text(text)
    r = CliRunner().invoke(main, ["plan", str(cfg), "--explain", "model.layers.2.mlp.down_proj.weight"])
    assert r.exit_code == 0 and "adapted model: LoRA r=4, scale 2" in r.output, r.output
    r = CliRunner().invoke(main, ["plan", str(cfg), "--explain", "model.norm.weight"])
    assert "adapted" not in r.output


def test_adapters_that_do_not_fit_are_clear_errors(base, tmp_path) -> None:
    def plan_of(adapter: str) -> str:
        cfg = tmp_path / "m.yml"
        cfg.write_text(f"merge_method: linear\nmodels: [{{model: {base}+{adapter}}}]\nparameters: {{weight: 1}}\n")
        r = CliRunner().invoke(main, ["plan", str(cfg)])
        assert r.exit_code == 4 and "Traceback" not in r.output, r.output
        return r.output

    wide = make_models.Shape(96, 160, 4, 4, 2, 128)
    other = make_hub.make_adapter(str(tmp_path / "other"), wide)
    assert "do not fit the base tensor" in plan_of(other)
    dora = make_hub.make_adapter(str(tmp_path / "dora"), SHAPE)
    _dump(os.path.join(dora, "adapter_config.json"), {**_json(os.path.join(dora, "adapter_config.json")),
                                                      "use_dora": True})
    assert "DoRA" in plan_of(dora)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text("{}")
    assert "adapter_model.safetensors or adapter_model.bin" in plan_of(str(empty))
    assert "adapter_config.json" in plan_of(str(tmp_path / "other" / ".."))
