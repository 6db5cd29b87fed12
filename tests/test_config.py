"""Config parsing and the parameter language (SEMANTICS §1.4): every problem reported at once with
its path, gradients (numeric, typed, step), filters (first match, substring), lax typing."""

from __future__ import annotations

import numpy as np
import pytest

from streammerge.config import ConfigWarning, ModelRef, check_parameters, parse_config
from streammerge.errors import ConfigError
from streammerge.methods import METHODS
from streammerge.params import Conditional, CondList, Gradient, evaluate


def test_every_problem_reported_with_its_path() -> None:
    text = """
merge_method: ties
models:
  - model: a@v1@v2
  - {parameters: {weight: 1}}
  - model: c
    parameters: {weight: [0.1, {x: 1}]}
dtype: bf16
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "merge.yml")
    probs = e.value.problems
    assert any(p.startswith("models[0].model:") and "more than one '@'" in p for p in probs)
    assert any(p.startswith("models[1]:") for p in probs)
    assert any(p.startswith("models[2].parameters.weight:") for p in probs)
    assert any(p.startswith("dtype:") and "bfloat16" in p for p in probs)
    assert len(probs) == 4
    assert str(e.value).startswith("merge.yml: 4 problems found")


def test_models_and_slices_exclusive_and_layer_range_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one of 'models' or 'slices'"):
        parse_config("merge_method: linear\n")
    with pytest.raises(ConfigError, match=r"slices\[0\]\.sources\[0\]\.layer_range: expected \[start, end\]"):
        parse_config("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [4, 2]}]}]\n")


def test_parameter_types_checked_against_the_method() -> None:
    cfg = parse_config("""
merge_method: ties
base_model: b
models:
  - model: a
    parameters: {weight: 0.5, density: "0,4"}
  - model: b
parameters: {normalize: maybe, lambda: "1e-1"}
""")
    probs, _ = check_parameters(cfg, METHODS["ties"].specs)
    assert sorted(probs) == ["models[0].parameters.density: expected a number, got '0,4'",
                             "parameters.normalize: expected true or false, got 'maybe'"]


def test_unknown_keys_and_parameters_warn_with_suggestion() -> None:
    with pytest.warns(ConfigWarning, match="did you mean 'base_model'"):
        cfg = parse_config("merge_method: linear\nbase_modle: x\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    specs = {name: m.specs for name, m in METHODS.items()}
    with pytest.warns(ConfigWarning, match="did you mean 'density'"):
        parse_config("merge_method: ties\nmodels: [{model: a, parameters: {densty: 1}}]\n", "c", specs)
    with pytest.warns(ConfigWarning, match="shared by all models and is ignored here"):
        parse_config("merge_method: slerp\nmodels: [{model: a, parameters: {t: 1}}]\n", "c", specs)
    assert cfg.slices[0].sources[0].model == ModelRef("a")


def test_model_reference_forms() -> None:
    cfg = parse_config("merge_method: linear\nmodels:\n  - model: org/m@rev1\n"
                       "  - model: {model: {path: /x/y, revision: abc}}\n")
    assert [s.model for s in cfg.slices[0].sources] == [ModelRef("org/m", "rev1"), ModelRef("/x/y", "abc")]
    cfg = parse_config("merge_method: linear\nmodels: [{model: a@r+org/lora@v2}, "
                       "{model: {model: {path: a}, lora: {path: l}}}]\n")
    assert [s.model for s in cfg.slices[0].sources] == [ModelRef("a", "r", "org/lora", "v2"), ModelRef("a", None, "l")]
    assert str(cfg.slices[0].sources[0].model) == "a@r+org/lora@v2"
    with pytest.raises(ConfigError, match="nothing after '\\+'"):
        parse_config("merge_method: linear\nmodels: [{model: a+}]\n")


@pytest.mark.parametrize("values,t,kind,want", [
    ((1e-5, 1e-3), 0.5, "float", 0.000505),
    ((2, 4), 0.5, "int", 3),
    ((False, True), 0.5, "bool", False),
    ((False, True), 1.0, "bool", True),
    (("1e-5", "1e-3"), 0.5, "str", "1e-5"),
    ((0.0, 1.0), 0.0, "float", 0.0),
])
def test_gradients(values, t, kind, want) -> None:
    got = evaluate(Gradient(values), "x", t, kind)
    assert type(got) is type(want)
    assert got == (pytest.approx(want) if kind == "float" else want)


def test_gradient_equals_numpy_interp() -> None:
    pts = (0, 0.5, 0.3, 0.7, 1)
    for i in range(32):
        t = i / 31
        got = evaluate(Gradient(pts), "x", t, "float")
        assert got == pytest.approx(float(np.interp(t, np.linspace(0, 1, 5), pts)), abs=1e-12)


def test_int_gradient_not_integral_is_an_error() -> None:
    with pytest.raises(ValueError, match="whole number"):
        evaluate(Gradient((1, 2)), "x", 0.5, "int")


def test_filters_first_match_substring_and_fallthrough() -> None:
    s = CondList((Conditional("self_attn", 0.1), Conditional("mlp", Gradient((1.0, 0.0))), Conditional("*", 0.7)))
    assert evaluate(s, "model.layers.3.self_attn.q_proj.weight", 0.5, "float") == 0.1
    assert evaluate(s, "model.layers.3.mlp.up_proj.weight", 0.25, "float") == 0.75
    assert evaluate(s, "model.norm.weight", 0.5, "float") == 0.7
    assert evaluate(CondList((Conditional("MLP", 1.0),)), "model.layers.0.mlp.x", 0, "float") is None
    assert evaluate(Gradient(()), "x", 0.5, "float") is None


def test_method_and_values_join_the_structural_report() -> None:
    specs = {name: m.specs for name, m in METHODS.items()}
    with pytest.raises(ConfigError) as e:
        parse_config("merge_method: dare_tie\nmodels: [{model: a}]\ndtype: bf16\n", "c", specs)
    assert e.value.problems[0].startswith("merge_method: unknown method 'dare_tie'; did you mean 'dare_ties'?")
    assert any(p.startswith("dtype:") for p in e.value.problems) and len(e.value.problems) == 2
    with pytest.raises(ConfigError) as e:
        parse_config("merge_method: ties\nmodels: [{model: a, parameters: {density: 'x'}}]\nout_dtype: fp8\n",
                     "c", specs)
    assert len(e.value.problems) == 2
