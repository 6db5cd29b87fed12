#!/usr/bin/env python3
"""The seed merge end to end on models this script makes itself, printing each command it runs.

1. makes stand-ins for the seed configs' 16 input repositories (Mistral-shaped, tiny by default)
   laid out as the Hub serves them (tools/make_hub.py: .bin and safetensors, bf16/f16/f32, 32000-
   and 32002-row vocabularies) in a Hugging Face cache under DEMO_DIR/hf-cache, so the configs run
   verbatim with no network;
2. runs both seed stages as one pipeline: `streammerge run mistral-7b-merge-14-pipeline.yml
   --unsafe-truncate-embeddings` (the 14-model DARE-TIES, then the gradient SLERP of its result with
   trinity-v1; the flag keeps the 32000 rows all vocabularies share, as the published merge did);
3. verifies every output byte against the manifest: `streammerge verify --inputs`;
4. loads the result with transformers (if installed) and runs a forward pass.

  python tools/demo.py [--dir demo] [--preset tiny32|small] [--max-memory 1GiB]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_hub  # noqa: E402

EXAMPLES = [os.path.join(HERE, "..", "examples")]


def find_example(name: str) -> str:
    for d in EXAMPLES:
        if os.path.isfile(os.path.join(d, name)):
            return os.path.abspath(os.path.join(d, name))
    raise SystemExit(f"cannot find {name} in {EXAMPLES}")


def sh(args: list[str], env: dict[str, str]) -> None:
    print("$ HF_HUB_CACHE=" + env["HF_HUB_CACHE"] + " " + shlex.join(args), flush=True)
    subprocess.run(args, env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="demo")
    ap.add_argument("--preset", default="tiny32", choices=["tiny32", "small"])
    ap.add_argument("--max-memory", default=None)
    a = ap.parse_args()
    root = os.path.abspath(a.dir)
    cache = os.path.join(root, "hf-cache")
    env = dict(os.environ, HF_HUB_CACHE=cache)
    if not os.path.isdir(cache):
        print(f"making stand-ins for the seed's 16 Hub repositories ({a.preset}) in {cache}:", flush=True)
        for repo in make_hub.SEED_REPOS:
            print("  " + make_hub.describe(repo, make_hub.PRESETS[a.preset].vocab), flush=True)
        shard_bytes = 250_000 if a.preset == "tiny32" else 2_000_000_000  # tiny models still come in shards
        make_hub.make_hub(cache, make_hub.PRESETS[a.preset], shard_bytes=shard_bytes)
    mem = ["--max-memory", a.max_memory] if a.max_memory else []
    exe = [sys.executable, "-m", "streammerge"]
    out = os.path.join(root, "merged")
    sh(exe + ["run", find_example("mistral-7b-merge-14-pipeline.yml"), out, "--unsafe-truncate-embeddings", *mem],
       env)
    sh(exe + ["verify", out, "--inputs"], env)
    try:
        import torch
        import transformers
    except ImportError:
        print("transformers is not installed; skipping the forward pass (pip install -e '.[test]')")
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("w5 w17 w40", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    print(f"transformers loaded {out}: {model.config.num_hidden_layers} layers, logits {tuple(logits.shape)}, "
          f"finite: {bool(torch.isfinite(logits).all())}")


if __name__ == "__main__":
    main()
