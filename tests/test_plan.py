"""Planning against real (tiny) models: parameter resolution per tensor (gradients over layers,
t = 0 for non-layer tensors, precedence, filters on input names in frankenmerges), layout and
naming of shards, and plan-time errors for every mismatch — all before reading tensor data."""

from __future__ import annotations

import os

import make_models
import pytest

from streammerge.config import ModelRef, parse_config
from streammerge.errors import ConfigError, InputError, PlanError
from streammerge.hub import resolve_model
from streammerge.planner import make_plan


def plan_of(text: str, **kw):
    return make_plan(parse_config(text), **kw)


def by_name(plan):
    return {t.name: t for t in plan.tasks}


def test_linear_gradient_per_layer_and_zero_for_non_layers(tiny_set) -> None:
    """SEMANTICS §9: weights A:[0,1], B:[1,0] over 4 layers; embed and lm_head take t = 0."""
    base, ft1 = tiny_set[:2]
    p = plan_of(f"""
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: [0, 1]}}
  - model: {base}
    parameters: {{weight: [1, 0]}}
""")
    t = by_name(p)
    assert t["model.embed_tokens.weight"].ctx.input_params[0]["weight"] == 0
    assert t["lm_head.weight"].ctx.input_params[0]["weight"] == 0
    for i in range(4):
        assert t[f"model.layers.{i}.mlp.up_proj.weight"].ctx.input_params[0]["weight"] == pytest.approx(i / 3)
        assert t[f"model.layers.{i}.mlp.up_proj.weight"].ctx.input_params[1]["weight"] == pytest.approx(1 - i / 3)
    names = [x.name for x in p.tasks]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert [n.split(".")[2] for n in names[1:-2]] == sorted((n.split(".")[2] for n in names[1:-2]), key=int)


def test_precedence_model_over_slice_over_global_and_base_appended(tiny_set) -> None:
    base, ft1, ft2 = tiny_set[:3]
    p = plan_of(f"""
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.3, density: [{{filter: mlp, value: 0.9}}]}}
  - model: {ft2}
    parameters: {{weight: 0.6}}
parameters: {{density: 0.5, normalize: false}}
""")
    t = by_name(p)["model.layers.1.mlp.down_proj.weight"]
    assert t.ctx.base == 2 and len(t.inputs) == 3  # the unlisted base is appended last
    assert t.ctx.input_params[0] == {"weight": 0.3, "density": 0.9}
    assert t.ctx.input_params[1] == {"weight": 0.6, "density": 0.5}
    assert t.ctx.input_params[2] == {}  # nonbase parameters are never resolved for the base
    assert by_name(p)["model.layers.1.self_attn.q_proj.weight"].ctx.input_params[0]["density"] == 0.5
    assert t.ctx.shared == {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}


def test_frankenmerge_filters_on_input_names_and_rewrites_layer_count(tiny_set) -> None:
    base, ft1 = tiny_set[:2]
    p = plan_of(f"""
merge_method: linear
slices:
  - sources:
      - model: {base}
        layer_range: [2, 4]
        parameters: {{weight: [{{filter: layers.2., value: 0.9}}, {{value: 0.1}}]}}
      - model: {ft1}
        layer_range: [0, 2]
        parameters: {{weight: 1.0}}
""")
    t = by_name(p)
    assert t["model.layers.0.mlp.up_proj.weight"].inputs[0].tensor == "model.layers.2.mlp.up_proj.weight"
    assert t["model.layers.0.mlp.up_proj.weight"].inputs[1].tensor == "model.layers.0.mlp.up_proj.weight"
    assert t["model.layers.0.mlp.up_proj.weight"].ctx.input_params[0]["weight"] == 0.9
    assert t["model.layers.1.mlp.up_proj.weight"].ctx.input_params[0]["weight"] == 0.1
    assert "model.layers.2.mlp.up_proj.weight" not in t
    assert p.out_num_layers == 2


def test_shards_split_by_bytes_and_named_like_mergekit(tiny_set) -> None:
    base, ft1 = tiny_set[:2]
    text = f"merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: 1}}}}\n" \
           f"  - {{model: {ft1}, parameters: {{weight: 1}}}}\n"
    one = plan_of(text)
    assert [s.name for s in one.shards] == ["model.safetensors"]
    many = plan_of(text, max_shard_bytes=60_000)
    n = len(many.shards)
    assert n > 2 and many.shards[0].name == f"model-00001-of-{n:05d}.safetensors"
    assert all(s.size - len(s.header) <= 60_000 for s in many.shards)
    assert many.fingerprint != one.fingerprint
    assert plan_of(text, max_shard_bytes=60_000).fingerprint == many.fingerprint


def test_plan_errors_are_collected_and_specific(tiny_set, tmp_path) -> None:
    base, ft1 = tiny_set[:2]
    with pytest.raises(PlanError, match="missing required parameter 'weight'"):
        plan_of(f"merge_method: linear\nmodels: [{{model: {base}}}, {{model: {ft1}, parameters: {{weight: 1}}}}]\n")
    with pytest.raises(PlanError, match=r"goes past the 4 layers"):
        plan_of(f"merge_method: linear\nslices: [{{sources: [{{model: {base}, layer_range: [0, 6]}}]}}]\n"
                "parameters: {weight: 1}\n")
    with pytest.raises(PlanError, match="slerp takes exactly 2 inputs"):
        plan_of(f"merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft1}}}, "
                f"{{model: {tiny_set[2]}}}]\nparameters: {{t: 0.5}}\n")
    with pytest.raises(PlanError, match="listed twice"):
        plan_of(f"merge_method: linear\nmodels: [{{model: {base}}}, {{model: {base}}}]\nparameters: {{weight: 1}}\n")
    with pytest.raises(ConfigError, match="did you mean 'dare_ties'"):
        plan_of(f"merge_method: dare_tie\nmodels: [{{model: {base}}}]\n")


def test_shape_mismatch_names_tensor_and_models(tiny_set, tmp_path) -> None:
    other = str(tmp_path / "wide")
    make_models.write_set([other], make_models.Shape(64, 160, 4, 4, 2, 200), seed=1)
    with pytest.raises(PlanError) as e:
        plan_of(f"merge_method: linear\nmodels: [{{model: {tiny_set[0]}}}, {{model: {other}}}]\n"
                "parameters: {weight: 1}\n")
    msg = str(e.value)
    assert "model.embed_tokens.weight" in msg and f"128 rows: {tiny_set[0]}" in msg and f"200 rows: {other}" in msg


def test_missing_tensor_names_model(tiny_set, tmp_path) -> None:
    small = str(tmp_path / "short")
    make_models.write_set([small], make_models.Shape(64, 160, 4, 4, 2, 128, tie=True), seed=1)
    p = plan_of(f"merge_method: linear\nmodels: [{{model: {small}}}, {{model: {tiny_set[1]}}}]\n"
                "parameters: {weight: 1}\n")
    head = by_name(p)["lm_head.weight"]  # the tied model contributes its embeddings (§3.5)
    assert [i.tensor for i in head.inputs] == ["model.embed_tokens.weight", "lm_head.weight"]
    os.remove(os.path.join(small, "model.safetensors.index.json"))
    with pytest.raises(InputError, match="no model.safetensors"):
        plan_of(f"merge_method: linear\nmodels: [{{model: {small}}}]\nparameters: {{weight: 1}}\n")


def test_hub_ids_resolve_from_cache_with_revisions(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    snap = make_models.cache_folder(str(cache), "org/model")
    os.makedirs(snap)
    (cache / "models--org--model" / "refs" / "v2").write_text("feedbeef")
    os.makedirs(cache / "models--org--model" / "snapshots" / "feedbeef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model(ModelRef("org/model")) == os.path.abspath(snap)
    assert resolve_model(ModelRef("org/model", "v2")).endswith("feedbeef")
    with pytest.raises(InputError) as e:
        resolve_model(ModelRef("org/missing"))
    assert str(cache / "models--org--missing") in str(e.value) and " download org/missing" in str(e.value)


def test_vocabulary_mismatch_error_or_truncation(tiny_set, tmp_path) -> None:
    from streammerge.config import ConfigWarning

    wide = str(tmp_path / "wide")
    make_models.write_set([wide], make_models.Shape(64, 160, 4, 4, 2, 200), seed=1)
    text = f"merge_method: linear\nmodels: [{{model: {tiny_set[0]}}}, {{model: {wide}}}]\nparameters: {{weight: 1}}\n"
    ways_out = r"128 rows: .*200 rows: .*tokenizer: \{source: base\}.*--unsafe-truncate-embeddings \(keep the first 128"
    with pytest.raises(PlanError, match=ways_out):
        plan_of(text)
    with pytest.warns(ConfigWarning, match="keeping the first 128 rows"):
        p = plan_of(text, truncate_vocab=True)
    assert by_name(p)["model.embed_tokens.weight"].shape == (128, 64)
    assert by_name(p)["lm_head.weight"].shape == (128, 64)


def test_truncated_merge_takes_the_first_rows(tiny_set, tmp_path) -> None:
    import warnings

    import numpy as np
    from safetensors.torch import load_file

    from streammerge.executor import Executor
    from streammerge.options import RunOptions

    wide = str(tmp_path / "wide")
    make_models.write_set([wide], make_models.Shape(64, 160, 4, 4, 2, 200), seed=5)
    text = f"merge_method: linear\nmodels: [{{model: {tiny_set[0]}}}, {{model: {wide}}}]\nparameters: {{weight: 1}}\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = plan_of(text, truncate_vocab=True)
    Executor(p, str(tmp_path / "out"), RunOptions(max_memory=1 << 33)).run()
    out = load_file(str(tmp_path / "out" / "model.safetensors"))["model.embed_tokens.weight"].double().numpy()

    def emb(folder: str) -> np.ndarray:
        tensors = {}
        for n in os.listdir(folder):
            if n.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(folder, n)))
        return tensors["model.embed_tokens.weight"].double().numpy()

    want = (emb(tiny_set[0]) + emb(wide)[:128]) / 2
    np.testing.assert_allclose(out, want, rtol=2**-8, atol=1e-6)


def test_frankenmerge_loads_in_transformers_with_its_layer_count(tiny_set, tmp_path) -> None:
    import torch
    import transformers

    from streammerge.executor import Executor
    from streammerge.options import RunOptions

    base, ft1 = tiny_set[:2]
    p = plan_of(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 3]}}]
  - sources: [{{model: {ft1}, layer_range: [1, 4]}}]
  - sources: [{{model: {base}, layer_range: [3, 4]}}]
""")
    out = str(tmp_path / "franken")
    Executor(p, out, RunOptions(max_memory=1 << 33)).run()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 7 and len(model.model.layers) == 7
    with torch.no_grad():
        logits = model(torch.tensor([[3, 17, 40, 5]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
    q = {n: t for n, t in model.state_dict().items() if n.endswith("self_attn.q_proj.weight")}
    from safetensors.torch import load_file

    src = {}
    for n in os.listdir(ft1):
        if n.endswith(".safetensors"):
            src.update(load_file(os.path.join(ft1, n)))
    assert torch.equal(q["model.layers.3.self_attn.q_proj.weight"], src["model.layers.1.self_attn.q_proj.weight"])


def test_gpu_plans_fingerprint_merged_tensors_by_device(tiny_set) -> None:
    """A GPU may round differently: its merged tensors are not taken for the CPU's on a resume;
    copied tensors (same bytes anywhere) and the layout are the same."""
    cfg = parse_config(f"merge_method: ties\nbase_model: {tiny_set[0]}\nmodels:\n  - model: {tiny_set[0]}\n"
                       + "".join(f"  - model: {f}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                                 for f in tiny_set[1:]))
    cpu, gpu = make_plan(cfg), make_plan(cfg, device="cuda")
    assert cpu.layout_fingerprint == gpu.layout_fingerprint and cpu.fingerprint != gpu.fingerprint
    for a, b in zip(cpu.tasks, gpu.tasks):
        assert (a.fingerprint == b.fingerprint) == a.copy_exact
    assert any(not t.copy_exact for t in cpu.tasks)
