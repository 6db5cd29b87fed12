#!/usr/bin/env python3
"""streammerge against mergekit 0.1.5, side by side, on the Hub stand-ins (tools/make_hub.py).

Runs each case with both tools (mergekit from its own environment, given by --mergekit) on
local snapshot paths (mergekit cannot resolve Hub ids offline) and prints, per case, the largest
relative difference over all tensors (max |a - b| / max |b|, float32 outputs), whether the
tensor names and shapes agree, and for chat templates whether the written templates render the
same conversations identically (rendered with transformers, as a chat model would).

  python tools/parity_mergekit.py --mergekit /path/to/mk-venv/bin/mergekit-yaml [--dir parity]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_hub  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def load(folder: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compare(a: str, b: str) -> tuple[float, bool]:
    """(largest normwise relative difference, same names and shapes) of two model folders."""
    ta, tb = load(a), load(b)
    same = ta.keys() == tb.keys() and all(ta[k].shape == tb[k].shape for k in ta)
    worst = 0.0
    for k in set(ta) & set(tb):
        x, y = ta[k].double(), tb[k].double()
        if x.shape == y.shape:
            scale = y.abs().max().item() or 1.0
            worst = max(worst, (x - y).abs().max().item() / scale)
    return worst, same


def unexplained(a: str, b: str, cfg: dict) -> int:
    """Tensors that differ although no input's |delta| ties at its top-k threshold: mergekit keeps an
    arbitrary one of tied elements (torch.topk), streammerge the lowest flat index (SEMANTICS
    deviation 3), so only tensors with such a tie may differ."""
    ta, tb = load(a), load(b)
    base = load_any(cfg["base_model"])
    others = [(load_any(m["model"]), m["parameters"]["density"])
              for m in cfg["models"] if m["model"] != cfg["base_model"]]
    count = 0
    for k in ta:
        if torch.equal(ta[k], tb[k]):
            continue
        tied = False
        for model, density in others:
            d = (model[k].float() - base[k].float()).abs().flatten().sort(descending=True).values
            n = int(density * d.numel())
            tied |= 0 < n < d.numel() and bool(d[n - 1] == d[n])
        count += not tied
    return count


def load_any(folder: str) -> dict[str, torch.Tensor]:
    """A model's tensors, safetensors first, else .bin (torch.load, weights only)."""
    files = sorted(os.listdir(folder))
    if any(f.endswith(".safetensors") for f in files):
        return load(folder)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.endswith(".bin"):
            out.update(torch.load(os.path.join(folder, f), weights_only=True))
    return out


def renders(folder: str) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for conv in CONVERSATIONS:
        for gen in (False, True):
            try:
                out.append(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen))
            except Exception as e:  # noqa: BLE001 - a template may refuse a conversation; compare that too
                out.append(f"error: {type(e).__name__}")
    return out


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def cases(snap: dict[str, str], adapter: str) -> dict[str, str]:
    base = snap["mistralai/Mistral-7B-v0.1"]
    mixed = [snap[r] for r in ("SciPhi/SciPhi-Mistral-7B-32k", "ehartford/samantha-1.2-mistral-7b",
                               "Arc53/docsgpt-7b-mistral", "TIGER-Lab/MAmmoTH-7B-Mistral")]
    models = "".join(f"  - model: {m}\n    parameters: {{weight: {w}, density: 0.5}}\n"
                     for m, w in zip(mixed, (0.3, 0.2, 0.4, 0.1)))
    common = f"base_model: {base}\nmodels:\n  - model: {base}\n{models}out_dtype: float32\n"
    two = (f"models:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
           f"  - model: {snap['mistralai/Mistral-7B-Instruct-v0.2']}\n    parameters: {{weight: 0.5}}\n"
           "merge_method: linear\ndtype: float32\n")
    chat_auto = ("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {snap[r]}\n    parameters: {{weight: 0.25}}\n"
        for r in ("mistralai/Mistral-7B-v0.1", "teknium/OpenHermes-2.5-Mistral-7B",
                  "ehartford/dolphin-2.2.1-mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2"))
        + "dtype: float32\nchat_template: auto\ntokenizer: {source: base}\n")
    lora = (f"merge_method: linear\nmodels:\n  - model: {snap['SciPhi/SciPhi-Mistral-7B-32k']}+{adapter}\n"
            f"    parameters: {{weight: 0.6}}\n  - model: {snap['TIGER-Lab/MAmmoTH-7B-Mistral']}\n"
            "    parameters: {weight: 0.4}\nout_dtype: float32\n")
    return {
        "linear of base+adapter (LoRA on q/v/down) and a model, f32 .bin": lora,
        "task_arithmetic, .bin + safetensors, bf16/f16/f32": "merge_method: task_arithmetic\n" + common,
        "ties, .bin + safetensors, bf16/f16/f32": "merge_method: ties\n" + common,
        "ties at density 1 (sign election only)": "merge_method: ties\n" + common.replace("density: 0.5",
                                                                                         "density: 1.0"),
        "chat_template: chatml": two + "chat_template: chatml\n",
        "chat_template: auto (.bin and safetensors inputs)": chat_auto.replace(
            "merge_method: linear\n", "merge_method: linear\nbase_model: " + base + "\n", 1),
    }


def llava_cases(root: str) -> tuple[dict[str, str], dict[str, str]]:
    """Llava-shaped float32 models (two layer stacks), and linear/slerp/ties configs for streammerge
    (real folders) and for mergekit (copies whose architectures name no transformers class, so that
    mergekit infers modules from the checkpoint's tensor names: given the real class, mergekit 0.1.5
    with transformers 5 plans by the model's internal names, which Hub Llava checkpoints do not use,
    and writes only the projector's 4 of 98 tensors)."""
    import shutil

    folders = [os.path.abspath(os.path.join(root, n)) for n in ("llava-base", "llava-a", "llava-b")]
    if not os.path.isdir(folders[0]):
        make_hub.make_models.write_set(folders, make_hub.make_models.arch_shape("llava"), seed=9,
                                       dtype=torch.float32)
    raw = []
    for f in folders:
        r = f + "-raw"
        if not os.path.isdir(r):
            shutil.copytree(f, r)
            with open(os.path.join(r, "config.json")) as fh:
                cfg = json.load(fh)
            cfg["architectures"] = ["LlavaCheckpointNames"]
            with open(os.path.join(r, "config.json"), "w") as fh:
                json.dump(cfg, fh)
        raw.append(r)

    def texts(fs: list[str]) -> dict[str, str]:
        b, x, y = fs
        return {
            "llava linear": f"merge_method: linear\nmodels:\n  - model: {x}\n    parameters: {{weight: 0.3}}\n"
                            f"  - model: {y}\n    parameters: {{weight: 0.7}}\n",
            "llava slerp, gradient t over each stack's depth": (
                f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {x}\n"
                "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n    - value: 0.3\n"),
            "llava ties": f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {b}\n" + "".join(
                f"  - model: {m}\n    parameters: {{weight: 0.5, density: 1.0}}\n" for m in (x, y)),
        }
    return texts(folders), texts(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", required=True, help="mergekit-yaml of mergekit 0.1.5, in its own environment")
    ap.add_argument("--dir", default="parity")
    ap.add_argument("--preset", default="tiny32")
    a = ap.parse_args()
    cache = os.path.join(a.dir, "hub")
    if not os.path.isdir(cache):
        make_hub.make_hub(cache, make_hub.PRESETS[a.preset], seed=11, shard_bytes=250_000)
    snap = {r.repo_id: os.path.abspath(make_hub_snapshot(cache, r.repo_id)) for r in make_hub.SEED_REPOS}
    adapter = os.path.abspath(os.path.join(a.dir, "adapter"))
    if not os.path.isdir(adapter):
        make_hub.make_adapter(adapter, make_hub.PRESETS[a.preset], rank=4, alpha=8, seed=3)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print("| case | max rel. diff | names and shapes | templates / ties | mergekit s | streammerge s |")
    print("|---|---|---|---|---|---|")
    for i, (name, text) in enumerate(cases(snap, adapter).items()):
        cfg = os.path.abspath(os.path.join(a.dir, f"case{i}.yml"))
        with open(cfg, "w") as f:
            f.write(text)
        mk, sm = os.path.join(a.dir, f"mk{i}"), os.path.join(a.dir, f"sm{i}")
        t_mk = run([a.mergekit, cfg, mk, "--allow-crimes", "--lora-merge-cache", os.path.join(a.dir, "lora-cache")],
                   env)
        t_sm = run([sys.executable, "-m", "streammerge", "run", cfg, sm, "--overwrite", "-q"], env)
        diff, same = compare(sm, mk)
        tmpl = "-"
        if name.startswith("ties") and "density: 0.5" in text:
            import yaml

            with open(cfg) as f:
                n = unexplained(sm, mk, yaml.safe_load(f))
            tmpl = f"differing tensors not explained by a top-k tie: {n}"
        if "chat_template" in text:
            tmpl = "yes" if renders(sm) == renders(mk) else "NO"
            if "auto" in name:
                with open(os.path.join(sm, "chat_template.jinja")) as f1, \
                        open(os.path.join(mk, "chat_template.jinja")) as f2:
                    tmpl += ", same text" if f1.read().strip() == f2.read().strip() else ", text differs"
        print(f"| {name} | {diff:.2e} | {'same' if same else 'DIFFER'} | {tmpl} | {t_mk:.1f} | {t_sm:.1f} |",
              flush=True)
    ours, theirs = llava_cases(a.dir)
    for i, name in enumerate(ours):
        paths = []
        for who, text in (("sm", ours[name]), ("mk", theirs[name])):
            cfg = os.path.abspath(os.path.join(a.dir, f"{who}-llava{i}.yml"))
            with open(cfg, "w") as f:
                f.write(text)
            paths.append((cfg, os.path.join(a.dir, f"{who}-llava{i}")))
        t_sm = run([sys.executable, "-m", "streammerge", "run", paths[0][0], paths[0][1], "--overwrite", "-q"], env)
        t_mk = run([a.mergekit, paths[1][0], paths[1][1], "--allow-crimes"], env)
        diff, same = compare(paths[0][1], paths[1][1])
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(paths[0][1])
        with torch.no_grad():
            ok = bool(torch.isfinite(model(input_ids=torch.tensor([[1, 5, 17, 40]])).logits).all())
        print(f"| {name} | {diff:.2e} | {'same' if same else 'DIFFER'} | transformers loads and runs it: "
              f"{'yes' if ok else 'NO'} | {t_mk:.1f} | {t_sm:.1f} |", flush=True)
    print(json.dumps({"dir": os.path.abspath(a.dir)}))


def make_hub_snapshot(cache: str, repo_id: str) -> str:
    snaps = os.path.join(cache, "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.join(snaps, os.listdir(snaps)[0])


if __name__ == "__main__":
    main()
