"""`streammerge report OUT` on the seed pipeline: a text summary per stage, one self-contained
HTML page rendered by headless Chromium with every image loaded, and the recorded figures (kept
share, sign agreement, cosine, delta norms) checked against values computed here from the inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import reference as ref
import torch
from click.testing import CliRunner
from safetensors import safe_open

from streammerge.cli import main
from streammerge.config import ModelRef, parse_config
from streammerge.hub import resolve_model

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
PIPELINE = os.path.join(EXAMPLES, "mistral-7b-merge-14-pipeline.yml")
STAGE1 = os.path.join(EXAMPLES, "mistral-7b-merge-14-v0.yml")


@pytest.fixture(scope="module")
def merged(seed_cache, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("report") / "merged")
    r = CliRunner().invoke(main, ["run", PIPELINE, out, "-q"], env={"HF_HUB_CACHE": seed_cache})
    assert r.exit_code == 0, r.output
    return out


def tensor(folder: str, name: str) -> np.ndarray:
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as st:
                if name in st.keys():
                    return st.get_tensor(name).double().numpy()
    raise KeyError(name)


def test_summary_and_html_with_every_image(merged, tmp_path) -> None:
    r = CliRunner().invoke(main, ["report", merged])
    assert r.exit_code == 0, r.output
    assert "stage 1/2 Mistral-7B-Merge-14-v0: dare_ties, 291 tensors, 15 models" in r.output
    assert "stage 2/2 merged: slerp, 291 tensors, 2 models" in r.output
    assert "kept 4" in r.output and "sign agreement" in r.output
    page = merged + ".report.html"
    with open(page, encoding="utf-8") as f:
        text = f.read()
    assert text.count("<img ") >= 5 and "src='data:image/png;base64," in text and "http" not in text.split("<h1>")[1]
    assert "Parameter &#x27;t&#x27; over layers" in text or "Parameter 't' over layers" in text
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        assert not os.environ.get("CI"), "CI installs chromium (.ci/run); it is missing"
        pytest.skip("no chromium here to render the report (Debian: apt install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", f"file://{page}"], capture_output=True, text=True,
                         timeout=120).stdout
    images = text.count("<img ")
    assert f'data-images-loaded="{images}/{images}"' in dom, dom[-500:]
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", f"file://{page}"],
                   capture_output=True, timeout=120)
    with open(shot, "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    again = CliRunner().invoke(main, ["report", merged])  # its own earlier report is replaced
    assert again.exit_code == 0
    foreign = tmp_path / "mine.html"
    foreign.write_text("<html>my notes</html>")
    r = CliRunner().invoke(main, ["report", merged, "--html", str(foreign)])
    assert r.exit_code == 6 and "not a streammerge report" in r.output and "my notes" in foreign.read_text()
    link = tmp_path / "link.html"
    link.symlink_to(foreign)  # a link is never written through, even to a report
    r = CliRunner().invoke(main, ["report", merged, "--html", str(link)])
    assert r.exit_code == 6 and "my notes" in foreign.read_text()
    r = CliRunner().invoke(main, ["report", merged, "--html", str(tmp_path / "no" / "such" / "dir.html")])
    assert r.exit_code == 6 and "cannot write the report there" in r.output


@pytest.mark.parametrize("name", ["model.layers.5.self_attn.k_proj.weight", "model.layers.30.mlp.down_proj.weight",
                                  "model.norm.weight"])
def test_recorded_figures_match_an_independent_computation(merged, seed_cache, name) -> None:
    stage1 = os.path.join(merged + ".stages", "EmbeddedLLM", "Mistral-7B-Merge-14-v0")
    with open(os.path.join(stage1, "streammerge.manifest.json")) as f:
        rec = json.load(f)["tensors"][name]["report"]
    with open(STAGE1) as f:
        cfg = parse_config(f.read())
    refs = [s.model for s in cfg.slices[0].sources]
    old = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = seed_cache
    try:
        folders = [resolve_model(ModelRef(str(r))) for r in refs]
    finally:
        os.environ.pop("HF_HUB_CACHE") if old is None else os.environ.update(HF_HUB_CACHE=old)
    xs = [tensor(f, name) for f in folders]
    assert rec["models"] == [str(r) for r in refs] and rec["base"] == 0
    densities = [0.4] * 13 + [0.5]
    keeps = [ref.dare_keep(0, k, name, xs[0].size, d).reshape(xs[0].shape) for k, d in enumerate(densities, 1)]
    s = rec["stats"]
    # the statistics look at one row in rows // 8 (at most 32, at least 1)
    stride = min(32, max(1, xs[0].shape[0] // 8))
    assert stride > 1 or xs[0].ndim < 2 or xs[0].shape[0] < 16
    rows = (lambda a: a[::stride]) if xs[0].ndim >= 2 else (lambda a: a)
    for k, keep in enumerate(keeps, 1):
        assert s["kept"][k] == pytest.approx(rows(keep).mean(), abs=1e-12)  # the same draws: exact
        assert s["delta"][k] == pytest.approx(np.linalg.norm(rows(xs[k] - xs[0])), rel=1e-6)  # squares in float32
    assert s["kept"][0] is None and s["agree"][0] is None
    # sign agreement: of each weighted, rescaled, kept delta's nonzero elements, the share whose sign
    # is the sign of their sum (zero counts as +)
    ds = []
    for k, keep in enumerate(keeps, 1):
        d = xs[k] - xs[0]
        ds.append(0.08 * ref.l1_rescaled(d, keep))
    sign = np.where(sum(ds) >= 0, 1.0, -1.0)
    for k, d in enumerate(ds, 1):
        d, sg = rows(d), rows(sign)
        want = ((d * sg) > 0).sum() / max(1, (d != 0).sum())
        assert s["agree"][k] == pytest.approx(want, abs=2e-3)
    # the output's figures are the output's as written: rounded to the config's bfloat16
    out = ref.task_arithmetic(xs[0], xs[1:], [0.08] * 14, keeps, consensus=True, normalize=False, rescale=True)
    out = torch.from_numpy(out.astype(np.float32)).bfloat16().double().numpy()
    written = tensor(stage1, name)
    for k, x in enumerate(xs):
        v = rows(x)
        for o, tol in ((rows(out), 1e-5), (rows(written), 1e-7)):
            want = float((o * v).sum() / np.sqrt((o * o).sum() * (v * v).sum()))
            assert s["cosine"][k] == pytest.approx(want, abs=tol)
    o = rows(written)
    assert s["out_norm"] == pytest.approx(float(np.sqrt((o * o).sum())), rel=1e-6)
