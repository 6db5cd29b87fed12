"""`streammerge diff A B`: identical folders, an independent float64 implementation of the same
linear merge rounded to bfloat16 (equal within rounding), and two recipes (different, per layer),
its figures checked against numpy."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from click.testing import CliRunner
from helpers import load_folder
from safetensors.torch import save_file

import streammerge
from streammerge.cli import main


def linear(folders: list[str], weights: list[float]) -> str:
    lines = ["merge_method: linear", "models:"]
    for f, w in zip(folders, weights):
        lines += [f"  - model: {f}", f"    parameters: {{weight: {w}}}"]
    return "\n".join(lines) + "\n"


def test_diff_identical_rounding_and_recipes(tiny_set, tmp_path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    streammerge.merge(linear(tiny_set[:2], [1, 3]), a, max_memory="4GiB", out_shard_size="0")
    streammerge.merge(linear(tiny_set[:2], [3, 1]), b, max_memory="4GiB", out_shard_size="0")
    runner = CliRunner()

    copy = str(tmp_path / "copy")
    shutil.copytree(a, copy)
    r = runner.invoke(main, ["diff", a, copy])
    assert r.exit_code == 0 and "39 tensors in both (39 identical)" in r.output and "IDENTICAL" in r.output, r.output

    # the same recipe computed independently in float64 (weights 1 and 3, normalised), kept in float32:
    # a bfloat16 output differs from it by rounding only
    xs = [load_folder(f) for f in tiny_set[:2]]
    ref = {k: torch.from_numpy((xs[0][k] * 1 + xs[1][k] * 3) / 4).to(torch.float32) for k in xs[0]}
    other = tmp_path / "independent"
    other.mkdir()
    save_file(ref, str(other / "model.safetensors"))
    shutil.copy(os.path.join(a, "config.json"), other / "config.json")
    r = runner.invoke(main, ["diff", a, str(other)])
    assert r.exit_code == 0 and "EQUAL WITHIN ROUNDING" in r.output, r.output
    name = "model.layers.2.mlp.up_proj.weight"
    ref[name] = ref[name] * 1.01  # one tensor 1% off: more than rounding
    save_file(ref, str(other / "model.safetensors"))
    r = runner.invoke(main, ["diff", a, str(other)])
    assert r.exit_code == 1 and "DIFFERENT" in r.output and f"  {name}  [BF16/F32]" in r.output, r.output

    r = runner.invoke(main, ["diff", a, b, "--json"])
    assert r.exit_code == 1
    rep = json.loads(r.output)
    assert rep["verdict"] == "different" and len(rep["tensors"]) == 39
    got_a, got_b = load_folder(a), load_folder(b)
    for t in rep["tensors"][:6]:
        x, y = got_a[t["name"]].ravel(), got_b[t["name"]].ravel()
        assert t["cosine"] == np.float64(x @ y / np.sqrt((x @ x) * (y @ y))).item() or \
            abs(t["cosine"] - x @ y / np.sqrt((x @ x) * (y @ y))) < 1e-12
        assert abs(t["rel"] - np.linalg.norm(x - y) / np.linalg.norm(x)) < 1e-12
        assert t["max_abs"] == np.abs(x - y).max()
    table = runner.invoke(main, ["diff", a, b]).output
    assert "DIFFERENT" in table and "   layer 0" in table and "   layer 3" in table and "most different:" in table
