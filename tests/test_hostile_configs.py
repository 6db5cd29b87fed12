"""Generated configs — wrong types, out-of-range and non-finite numbers, huge integers, deep
nesting, alias bombs, duplicate keys, bytes that are not UTF-8 — each end, within seconds, in exit
0, 3, 4 or 5 with a message naming the config path, never a traceback or a hang. And the ranges a
user would expect hold: density, gamma, select_topk and slerp's t lie in [0, 1] (gradients too);
int64 output dtypes, --max-memory 0 and a manifest of the wrong shape are refused clearly."""

from __future__ import annotations

import json
import signal

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammerge.cli import main
from streammerge.methods import METHODS
from streammerge.params import FLOAT32_MAX

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(10**300, 10**400),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["0.5", "1e-5", "nan", "inf", "-0.5", "1.5", "abc"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["filter", "value", "x"]), inner, max_size=3)),
    max_leaves=8)
PARAMS = st.dictionaries(st.sampled_from(["weight", "density", "t", "gamma", "epsilon", "lambda", "normalize",
                                          "select_topk", "rescale", "int8_mask", "bogus"]), VALUES, max_size=4)


@st.composite
def configs(draw, model: str) -> str:  # type: ignore[no-untyped-def]
    if draw(st.integers(0, 2)) != 0:  # a valid config with one key changed: reaches planning and inputs
        doc = {"merge_method": draw(st.sampled_from(["linear", "ties", "slerp", "dare_ties"])),
               "base_model": model, "models": [{"model": model, "parameters": {"weight": 0.5, "density": 0.5}}],
               "parameters": {"t": 0.5}}
        key = draw(st.sampled_from(["dtype", "out_dtype", "tokenizer_source", "chat_template", "base_model",
                                    "parameters", "models", "merge_method"]))
        if draw(st.booleans()):
            doc[key] = draw(st.one_of(VALUES, PARAMS, st.sampled_from([model, "bfloat16", "chatml", "union"])))
        return yaml.safe_dump(doc, allow_unicode=True)
    doc = {"merge_method": draw(st.sampled_from([*METHODS, "linaer", 3, None]))}
    models = draw(st.lists(st.fixed_dictionaries({"model": st.sampled_from([model, 7, "", "nope/none"]),
                                                  "parameters": PARAMS}), max_size=3))
    if draw(st.booleans()):
        doc["models"] = models
    else:
        doc["slices"] = [{"sources": [{"model": m["model"], "layer_range": draw(st.one_of(
            st.lists(st.integers(-3, 10**12), min_size=2, max_size=2), VALUES))} for m in models]}]
    for key in ("parameters", "base_model", "dtype", "out_dtype", "tokenizer_source", "chat_template", "tokenizer"):
        if draw(st.booleans()):
            doc[key] = draw(PARAMS if key == "parameters" else st.one_of(
                VALUES, st.sampled_from([model, "bfloat16", "int64", "union", "chatml", "auto"])))
    text = yaml.safe_dump(doc, allow_unicode=True)
    twist = draw(st.sampled_from(["none", "duplicate", "nested", "bomb", "bytes"]))
    if twist == "duplicate":
        text += f"merge_method: {doc['merge_method']}\n"
    elif twist == "nested":
        text += "deep: " + "[" * 5000 + "]" * 5000 + "\n"
    elif twist == "bomb":
        text += "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)) + "base_model: *a8\n"
    return text + ("\udcff" if twist == "bytes" else "")


class _Hang(Exception):
    pass


def _alarm(*_: object) -> None:
    raise _Hang()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_generated_configs_exit_cleanly(tiny_set, tmp_path_factory, data) -> None:
    text = data.draw(configs(tiny_set[0]))
    path = tmp_path_factory.mktemp("cfg") / "merge.yml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        r = CliRunner().invoke(main, ["plan", str(path)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not isinstance(r.exception, _Hang), "plan hung"
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 3, 4, 5), r.output
    assert "Traceback" not in r.output
    if r.exit_code == 3:
        assert str(path) in r.output
    _log(r.exit_code)


def _log(code: int) -> None:
    """With CASE_LOG set, each generated case's exit code is appended there (for counts in reports)."""
    import os

    if os.environ.get("CASE_LOG"):
        with open(os.environ["CASE_LOG"], "a") as f:
            f.write(f"{code}\n")


@pytest.mark.parametrize("method,params,want", [
    ("dare_ties", "{weight: 1, density: -0.5}", "density must lie in [0, 1], got -0.5"),
    ("ties", "{weight: 1, density: 1.5}", "density must lie in [0, 1], got 1.5"),
    ("ties", "{weight: 1, density: [0.2, 2]}", "density[1]: density must lie in [0, 1], got 2"),
    ("breadcrumbs", "{weight: 1, gamma: 3}", "gamma must lie in [0, 1]"),
])
def test_shares_lie_in_zero_one(tiny_set, tmp_path, method, params, want) -> None:
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: {method}\nbase_model: {tiny_set[0]}\nmodels:\n  - model: {tiny_set[0]}\n"
                   f"  - model: {tiny_set[1]}\n    parameters: {params}\n")
    r = CliRunner().invoke(main, ["plan", str(cfg)])
    assert r.exit_code == 3 and want in r.output, r.output


@pytest.mark.parametrize("t", ["1.5", "-0.5", "[0, 1.2]"])
def test_slerp_t_lies_in_zero_one(tiny_set, tmp_path, t) -> None:
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {tiny_set[0]}\nmodels: [{{model: {tiny_set[0]}}}, "
                   f"{{model: {tiny_set[1]}}}]\nparameters: {{t: {t}}}\n")
    r = CliRunner().invoke(main, ["plan", str(cfg)])
    assert r.exit_code == 3 and "t must lie in [0, 1]" in r.output, r.output


def test_other_refusals(tiny_set, tmp_path) -> None:
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {tiny_set[0]}}}]\nparameters: {{weight: 1}}\n"
                   "out_dtype: int64\n")
    r = CliRunner().invoke(main, ["plan", str(cfg)])
    assert r.exit_code == 3 and "out_dtype: int64 would cast every merged weight" in r.output, r.output
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {tiny_set[0]}}}]\nparameters: {{weight: 1}}\n")
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "o"), "--max-memory", "0"])
    assert r.exit_code == 2 and "must be more than 0 bytes" in r.output
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["run", str(cfg), str(out), "-q"]).exit_code == 0
    manifest = out / "streammerge.manifest.json"
    good = json.loads(manifest.read_text())
    for bad in ([1, 2], {**good, "tensors": {"x": {"offset": "a"}}},
                {**good, "tensors": {k: {kk: vv for kk, vv in v.items() if kk != "shard"}
                                     for k, v in good["tensors"].items()}}):
        manifest.write_text(json.dumps(bad))
        r = CliRunner().invoke(main, ["verify", str(out)])
        assert r.exit_code == 7 and "Traceback" not in r.output and "manifest" in r.output, r.output


@pytest.mark.parametrize("depth", [100, 101, 5000])
def test_brackets_nested_deep_are_refused_at_once(tiny_set, tmp_path, depth) -> None:
    """The YAML scanner's work per token grows with the depth: 5,000 levels took seconds to reach
    the composer's recursion limit. 100 levels still parse (an unknown key: a warning)."""
    from streammerge.config import MAX_FLOW_DEPTH

    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {tiny_set[0]}}}]\nparameters: {{weight: 1}}\n"
                   f"deep: {'[' * depth}{']' * depth}\n")
    r = CliRunner().invoke(main, ["plan", str(cfg)])
    assert str(cfg) in r.output and "Traceback" not in r.output, r.output
    if depth > MAX_FLOW_DEPTH:
        assert r.exit_code == 3 and f"nests brackets more than {MAX_FLOW_DEPTH} deep" in r.output, r.output
    else:
        assert r.exit_code == 0 and "deep: unknown key, ignored" in r.output, r.output


def _with_param(method: str, folders: list[str], name: str, scope: str, value: float) -> tuple[str, str]:
    """The method's end-to-end recipe (test_all_methods) with parameter `name` set to `value`; and
    the config path an error about it names."""
    from test_all_methods import config_text

    doc = yaml.safe_load(config_text(method, folders))
    if scope == "shared":
        doc.setdefault("parameters", {})[name] = value
        return yaml.safe_dump(doc), f"parameters.{name}"
    i = next(i for i, m in enumerate(doc["models"]) if scope == "input" or m["model"] != doc.get("base_model"))
    doc["models"][i].setdefault("parameters", {})[name] = value
    return yaml.safe_dump(doc), f"models[{i}].parameters.{name}"


FLOAT_PARAMS = sorted((m, s.name, s.scope) for m, d in METHODS.items() for s in d.params if s.kind == "float")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(FLOAT_PARAMS), size=st.floats(min_value=FLOAT32_MAX, max_value=1.7e308, exclude_min=True),
       negative=st.booleans())
def test_numbers_past_float32s_range_are_refused_by_path(tiny_set, tmp_path_factory, case, size, negative) -> None:
    """The merge computes in float32: a weight of 1e39 made torch raise mid-run (a traceback, and the
    run left unfinished) for linear, the TIES family and ramplus_tl's alpha."""
    method, name, scope = case
    text, where = _with_param(method, tiny_set, name, scope, -size if negative else size)
    cfg = tmp_path_factory.mktemp("cfg") / "m.yml"
    cfg.write_text(text)
    r = CliRunner().invoke(main, ["run", str(cfg), str(cfg.parent / "out"), "-q"])
    assert r.exit_code == 3, r.output
    assert f"{where}: expected a number of float32's range" in r.output and str(cfg) in r.output, r.output
    assert not (cfg.parent / "out").exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(FLOAT_PARAMS), value=st.one_of(
    st.floats(min_value=1e30, max_value=FLOAT32_MAX), st.floats(min_value=-FLOAT32_MAX, max_value=-1e30),
    st.sampled_from([0.0, -0.0, 5e-324, -1.0, 2.0])))
def test_extreme_numbers_within_range_merge_or_are_refused_by_path(tiny_set, tmp_path_factory, case, value) -> None:
    """Numbers float32 holds, at its edges and at zero, run every method to a finished, verified
    output (NaN or Inf reported where the arithmetic gives them) or are refused naming the
    parameter, with no output that looks finished; never with a traceback (multislerp's `eps: 0`
    raised ZeroDivisionError; its `eps: 1e30` blamed the weights alone)."""
    method, name, scope = case
    text, where = _with_param(method, tiny_set, name, scope, value)
    cfg = tmp_path_factory.mktemp("cfg") / "m.yml"
    cfg.write_text(text)
    out = cfg.parent / "out"
    r = CliRunner().invoke(main, ["run", str(cfg), str(out), "-q"])
    assert r.exit_code in (0, 3, 5), (r.output, r.exception)  # 3: the config, 5: its plan
    assert "Traceback" not in r.output
    if r.exit_code:
        assert (where if r.exit_code == 3 else name) in r.output, r.output
        assert not (out / "streammerge.manifest.json").exists()  # (5 from the merge: an unfinished run)
    else:
        assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_multislerp_eps_zero_takes_the_exponential_maps_limit(tiny_set, tmp_path) -> None:
    """The tangent sum multislerp maps back is 0 but for rounding, so with `eps: 0` its norm s is
    often exactly 0: sin(s)/s is then its limit 1, the value every s below 1e-8 rounds it to, so
    the output is the bytes of an eps too small to change any sum (1e-30), not NaN or an error."""
    hashes = []
    for eps in (0.0, 1e-30):
        text, _ = _with_param("multislerp", tiny_set, "eps", "shared", eps)
        cfg = tmp_path / f"m{eps}.yml"
        cfg.write_text(text)
        r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / f"o{eps}"), "-q"])
        assert r.exit_code == 0 and "NaN" not in r.output, (r.output, r.exception)
        manifest = json.loads((tmp_path / f"o{eps}" / "streammerge.manifest.json").read_text())
        hashes.append({k: v["xxh3_128"] for k, v in manifest["tensors"].items()})
    assert hashes[0] == hashes[1]
