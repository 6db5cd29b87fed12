"""`streammerge report OUT`: what a merge did, from what the run recorded, as one self-contained
HTML page (images embedded, opens offline) and a short text summary.

Imports output, errors (and matplotlib, an optional dependency: `pip install "streammerge[report]"`).
Reads only manifests: OUT's, and for a pipeline each earlier stage's (an input folder holding a
streammerge manifest). Per stage: the parameter schedules over layers, a layer × model heatmap of
the output's cosine similarity to each input, the share of each delta kept and the sign agreement
per layer (sparsifying and TIES-style methods), and tables of the largest and most contested tensors.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field

from .errors import InputError, OutputError
from .output import MANIFEST

MARKER = "<!-- streammerge report -->"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Stage:
    folder: str
    method: str
    config: str
    models: list[str]  # every input model, in the order the tensors name them first
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> the manifest's "report" record

    @property
    def name(self) -> str:
        return os.path.basename(os.path.abspath(self.folder))


def load(out: str) -> list[Stage]:
    """OUT's stage and, for a pipeline, the stages whose outputs it read, earliest first.

    Raises:
        InputError: OUT holds no streammerge manifest, or one written before runs recorded statistics.
    """
    stages: list[Stage] = []
    seen: set[str] = set()

    def visit(folder: str, required: bool) -> None:
        real = os.path.realpath(folder)
        if real in seen:
            return
        seen.add(real)
        manifest = _manifest(folder, required)
        if manifest is None:
            return
        for inp in manifest.get("inputs", []):
            if isinstance(inp, dict) and isinstance(inp.get("folder"), str):
                visit(inp["folder"], False)  # an earlier stage's output, if streammerge made it
        tensors = {k: v["report"] for k, v in manifest.get("tensors", {}).items()
                   if isinstance(v, dict) and isinstance(v.get("report"), dict)}
        if not tensors:
            if required:
                raise InputError(f"{folder}: its manifest has no merge statistics (an earlier streammerge "
                                 "wrote it); run the merge again with --overwrite to record them")
            return
        models = list(dict.fromkeys(m for r in tensors.values() for m in r["models"]))
        stages.append(Stage(folder, str(manifest.get("merge_method", "?")), str(manifest.get("config", "")), models,
                            tensors))

    visit(out, True)
    return stages


def _manifest(folder: str, required: bool) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
        if isinstance(obj, dict):
            return obj
    except (OSError, ValueError):
        pass
    if required:
        raise InputError(f"{folder}: no readable {MANIFEST}; `streammerge report` reads what a streammerge run "
                         "recorded in its output folder")
    return None


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str) -> str:
    return "self_attn" if "self_attn" in name else "mlp" if ".mlp." in name else "rest"


def per_model(stage: Stage, key: str) -> dict[str, list[tuple[int, float]]]:
    """model -> [(layer, mean of `key` over that layer's tensors)], for layer tensors."""
    acc: dict[tuple[str, int], list[float]] = {}
    for name, r in stage.tensors.items():
        layer, stats = layer_of(name), r.get("stats")
        values = stats.get(key) if isinstance(stats, dict) else None
        if layer is None or not values:
            continue
        for model, v in zip(r["models"], values):
            if v is not None and math.isfinite(v):
                acc.setdefault((model, layer), []).append(v)
    out: dict[str, list[tuple[int, float]]] = {}
    for (model, layer), vs in sorted(acc.items(), key=lambda kv: kv[0][1]):
        out.setdefault(model, []).append((layer, sum(vs) / len(vs)))
    return out


def schedules(stage: Stage) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """parameter -> line label -> [(layer, value)]: shared parameters per tensor group (self_attn, mlp,
    rest), per-input parameters per model; only those that are numbers."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, r in sorted(stage.tensors.items(), key=lambda kv: (layer_of(kv[0]) or -1, kv[0])):
        layer = layer_of(name)
        if layer is None:
            continue
        for p, v in r.get("shared", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                _append(out.setdefault(p, {}).setdefault(group_of(name), []), layer, float(v))
        for model, params in zip(r["models"], r.get("per_input", [])):
            for p, v in params.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    _append(out.setdefault(p, {}).setdefault(_short(model), []), layer, float(v))
    return out


def _append(points: list[tuple[int, float]], layer: int, value: float) -> None:
    if not points or points[-1][0] != layer:
        points.append((layer, value))


def _short(model: str) -> str:
    return model.rstrip("/").split("/")[-1][:40]


def constants(stage: Stage) -> list[tuple[str, str, str]]:
    """(parameter, line, value) for each schedule line that does not change over the layers."""
    out = []
    for param, lines in sorted(schedules(stage).items()):
        for label, pts in lines.items():
            values = {v for _, v in pts}
            if len(values) == 1:
                out.append((param, label, f"{values.pop():.6g}"))
    return out


def tables(stage: Stage, top: int = 10) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(largest changes: the output's distance from the base relative to the base's norm, or the mean
    delta norm; most contested: lowest mean sign agreement, else lowest mean cosine to the inputs)."""
    change, contested = [], []
    for name, r in stage.tensors.items():
        s = r.get("stats")
        if not isinstance(s, dict):
            continue
        deltas = [d for k, d in enumerate(s.get("delta") or []) if k != r.get("base") and d is not None]
        norms = s.get("norm") or []
        base_norm = norms[r["base"]] if r.get("base") is not None and norms else None
        if deltas:
            change.append((name, (sum(deltas) / len(deltas)) / base_norm if base_norm else sum(deltas) / len(deltas)))
        agree = [a for a in (s.get("agree") or []) if a is not None]
        cos = [c for c in (s.get("cosine") or []) if c is not None]
        if agree:
            contested.append((name, sum(agree) / len(agree)))
        elif cos:
            contested.append((name, sum(cos) / len(cos)))
    change.sort(key=lambda kv: -kv[1])
    contested.sort(key=lambda kv: kv[1])
    return change[:top], contested[:top]


def summary(stages: list[Stage]) -> str:
    lines = []
    for i, st in enumerate(stages):
        head = f"stage {i + 1}/{len(stages)} " if len(stages) > 1 else ""
        lines.append(f"{head}{st.name}: {st.method}, {len(st.tensors)} tensors, {len(st.models)} models")
        cos, kept, agree = per_model(st, "cosine"), per_model(st, "kept"), per_model(st, "agree")
        for m in st.models:
            parts = [f"cosine to output {_mean(cos.get(m)):.4f}" if cos.get(m) else ""]
            if kept.get(m):
                parts.append(f"kept {_mean(kept.get(m)):.1%}")
            if agree.get(m):
                parts.append(f"sign agreement {_mean(agree.get(m)):.1%}")
            lines.append(f"  {_short(m):40s} " + ", ".join(p for p in parts if p))
    return "\n".join(lines)


def _mean(points: list[tuple[int, float]] | None) -> float:
    return sum(v for _, v in points) / len(points) if points else float("nan")


def write_html(stages: list[Stage], path: str) -> None:
    """The report as one HTML file at `path` (replaced only if an earlier report is there).

    Raises:
        OutputError: `path` holds something else.
    """
    if os.path.lexists(path):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                ours = MARKER in f.read(4096)
        except OSError:
            ours = False
        if not ours or os.path.islink(path):
            raise OutputError(f"{path} exists and is not a streammerge report; choose another --html path")
    parts = [f"<!DOCTYPE html>\n{MARKER}\n<html><head><meta charset='utf-8'><title>streammerge report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}</style></head><body>",
             "<h1>What the merge did</h1>"]
    for i, st in enumerate(stages):
        title = f"Stage {i + 1} of {len(stages)}: " if len(stages) > 1 else ""
        parts.append(f"<h2>{title}{html.escape(st.name)} ({html.escape(st.method)})</h2>")
        parts.append(f"<pre>{html.escape(summary([st]))}</pre>")
        constant = constants(st)
        if constant:
            body = "".join(f"<tr><td>{html.escape(p)}</td><td>{html.escape(who)}</td><td>{html.escape(v)}</td></tr>"
                           for p, who, v in constant)
            parts.append("<h3>Parameters constant over the layers</h3><table><tr><th>parameter</th><th>for</th>"
                         f"<th>value</th></tr>{body}</table>")
        for caption, png in _figures(st):
            parts.append(f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' "
                         f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        change, contested = tables(st)
        for caption, rows, fmt in (("Largest changes (mean delta norm, relative to the base)", change, "{:.4g}"),
                                   ("Most contested (lowest sign agreement, or cosine to the inputs)", contested,
                                    "{:.4f}")):
            if rows:
                body = "".join(f"<tr><td>{html.escape(n)}</td><td>{fmt.format(v)}</td></tr>" for n, v in rows)
                parts.append(f"<h3>{caption}</h3><table><tr><th>tensor</th><th>value</th></tr>{body}</table>")
        parts.append(f"<details><summary>config</summary><pre>{html.escape(st.config)}</pre></details>")
    parts.append("<script>window.addEventListener('load',function(){var im=document.images,n=0;"
                 "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)n++;}"
                 "document.title='streammerge report: '+n+'/'+im.length+' images loaded';"
                 "document.body.setAttribute('data-images-loaded',n+'/'+im.length);});</script></body></html>")
    # a fresh file of our own (O_EXCL: never through a link someone left), then renamed over the report
    try:
        fd, tmp = tempfile.mkstemp(prefix=".streammerge-report-", suffix=".tmp", dir=os.path.dirname(path) or ".")
    except OSError as e:
        raise OutputError(f"{path}: cannot write the report there ({e.strerror}); choose another --html path") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))
        os.chmod(tmp, 0o644)  # a page to share, as the output's other files (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _figures(st: Stage) -> list[tuple[str, bytes]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("streammerge report draws with matplotlib: pip install 'streammerge[report]'") from None
    figs: list[tuple[str, bytes]] = []
    for param, lines in sorted(schedules(st).items()):
        if all(len({v for _, v in pts}) <= 1 for pts in lines.values()):
            continue  # constant over layers: listed in the stage's table of constant parameters instead
        fig, ax = plt.subplots(figsize=(9, 3.2))
        for label, pts in lines.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel(param)
        ax.legend(fontsize=7, ncol=3)
        figs.append((f"Parameter '{param}' over layers", _png(fig, plt)))
    cos = per_model(st, "cosine")
    if cos:
        layers = sorted({x for pts in cos.values() for x, _ in pts})
        grid = [[dict(cos.get(m, [])).get(x, float("nan")) for x in layers] for m in st.models]
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(st.models) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(st.models)), [_short(m) for m in st.models], fontsize=7)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, label="cosine(output, input)")
        figs.append(("Which model shaped which layers: cosine similarity of the output to each input", _png(fig, plt)))
    for key, caption in (("kept", "Share of each delta kept, per layer"),
                         ("agree", "Sign agreement with the elected sign, per layer")):
        data = per_model(st, key)
        if data:
            fig, ax = plt.subplots(figsize=(9, 3.2))
            for m, pts in data.items():
                ax.plot([x for x, _ in pts], [y for _, y in pts], lw=0.8, label=_short(m))
            ax.set_xlabel("layer")
            ax.set_ylabel(key)
            ax.legend(fontsize=6, ncol=4)
            figs.append((caption, _png(fig, plt)))
    return figs


def _png(fig: object, plt: object) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(buf, format="png", dpi=90)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return buf.getvalue()
