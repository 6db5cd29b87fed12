"""Models with several numbered layer stacks (Llava: a language model and a CLIP vision tower, plus a
projector): each stack keeps its own numbering and depth, gradients run over each stack's own depth,
slices and layer_range address the language stack (its layer count is what the output config's
text_config records), a linear merge matches a float64 reference on both stacks, the outputs load
and run in transformers, and a model lacking a stack is a clear plan error."""

from __future__ import annotations

import json
import os

import make_models
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import load_folder

from streammerge.arch import layout_of
from streammerge.cli import main
from streammerge.config import parse_config
from streammerge.index import ModelIndex
from streammerge.planner import make_plan

LLAVA = make_models.arch_shape("llava")
VISION = "vision_tower.vision_model.encoder.layers"


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("llava")
    folders = [str(root / n) for n in ("base", "a", "b")]
    make_models.write_set(folders, LLAVA, seed=9, dtype=torch.float32)
    return folders


def run(tmp_path, text: str) -> str:
    cfg = tmp_path / "m.yml"
    cfg.write_text(text)
    out = str(tmp_path / "out")
    r = CliRunner().invoke(main, ["run", str(cfg), out, "-q"])
    assert r.exit_code == 0, r.output
    return out


def forward(out: str) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 17, 40]])).logits
    assert logits.shape == (1, 4, LLAVA.vocab) and torch.isfinite(logits).all()


def test_the_language_stack_is_the_main_one(llava) -> None:
    lay = layout_of(ModelIndex(llava[0]))
    assert lay.prefix == "language_model.model.layers" and lay.num_layers == LLAVA.layers
    assert [(s.prefix, s.num_layers) for s in lay.others] == [(VISION, make_models.VISION["layers"])]
    assert "language_model.lm_head.weight" == lay.post[-1]


def test_gradients_run_over_each_stacks_own_depth(llava) -> None:
    cfg = parse_config(f"merge_method: slerp\nbase_model: {llava[0]}\nmodels: [{{model: {llava[0]}}}, "
                       f"{{model: {llava[1]}}}]\nparameters: {{t: [0, 1]}}\n")
    ts = {t.name: t.ctx.shared["t"] for t in make_plan(cfg).tasks}
    nv, nl = make_models.VISION["layers"], LLAVA.layers
    for i in range(nv):
        assert ts[f"{VISION}.{i}.mlp.fc1.weight"] == pytest.approx(i / (nv - 1))
    for i in range(nl):
        assert ts[f"language_model.model.layers.{i}.mlp.up_proj.weight"] == pytest.approx(i / (nl - 1))


def test_linear_matches_the_reference_on_both_stacks_and_runs(llava, tmp_path) -> None:
    out = run(tmp_path, f"merge_method: linear\nmodels:\n  - model: {llava[1]}\n    parameters: {{weight: 0.3}}\n"
                        f"  - model: {llava[2]}\n    parameters: {{weight: 0.7}}\n")
    got, a, b = load_folder(out), load_folder(llava[1]), load_folder(llava[2])
    assert got.keys() == a.keys()
    for k in got:
        np.testing.assert_allclose(got[k], 0.3 * a[k] + 0.7 * b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    forward(out)


def test_slices_address_the_language_stack(llava, tmp_path) -> None:
    out = run(tmp_path, "merge_method: passthrough\nslices:\n"
                        f"  - sources: [{{model: {llava[0]}, layer_range: [0, 2]}}]\n"
                        f"  - sources: [{{model: {llava[1]}, layer_range: [1, 4]}}]\n")
    got, base, a = load_folder(out), load_folder(llava[0]), load_folder(llava[1])
    lang = "language_model.model.layers"
    assert {int(k.split(".")[3]) for k in got if k.startswith(lang)} == set(range(5))
    np.testing.assert_array_equal(got[f"{lang}.1.mlp.up_proj.weight"], base[f"{lang}.1.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got[f"{lang}.2.mlp.up_proj.weight"], a[f"{lang}.1.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got[f"{VISION}.2.mlp.fc1.weight"], base[f"{VISION}.2.mlp.fc1.weight"])
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["text_config"]["num_hidden_layers"] == 5 and "num_hidden_layers" not in cfg
    assert cfg["vision_config"]["num_hidden_layers"] == make_models.VISION["layers"]
    forward(out)


def test_a_model_without_the_vision_stack_is_refused(llava, tmp_path) -> None:
    plain = str(tmp_path / "plain")
    make_models.write_set([plain], make_models.PRESETS["tiny"], seed=1)
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {llava[0]}}}, {{model: {plain}}}]\n"
                   "parameters: {weight: 1}\n")
    r = CliRunner().invoke(main, ["plan", str(cfg)])
    assert r.exit_code == 5 and f"has no such stack under '{VISION}'" in r.output, r.output
