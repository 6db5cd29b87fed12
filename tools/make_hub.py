#!/usr/bin/env python3
"""Stand-ins for the seed merge's sixteen Hub repositories, laid out as the Hub serves them.

A local Hugging Face cache (`models--org--name/{blobs,refs,snapshots}`, snapshot files being
symlinks into `blobs/`) whose repositories differ the way the real ones do: sharded and single
PyTorch `.bin` checkpoints, sharded and single safetensors, repositories holding both formats,
bfloat16 / float16 / float32 weights, Mistral's 32000-row vocabulary or ChatML's 32002 rows with
`added_tokens.json`, and chat templates in `tokenizer_config.json`. The weights are the base plus
seeded deltas (tools/make_models.py), so every stand-in is a fine-tune of the same base.

  python tools/make_hub.py CACHE [--preset tiny32|small] [--seed 0] [--shard-mb 2000]
  python tools/make_hub.py CACHE --list        # the layouts only

Each repository gets its own tensors in its own dtype; a `.bin` shard is written with torch.save
(one shard in memory at a time), a safetensors shard in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_models  # noqa: E402
from make_models import PRESETS, Shape, base_tensor, delta_tensor, shard_groups, tensor_specs  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
           "{% endif %}{% endfor %}")
CHATML_TOKENS = ("<|im_end|>", "<|im_start|>")


@dataclass(frozen=True)
class Repo:
    """How one stand-in repository is laid out."""

    repo_id: str
    formats: str  # "st" sharded safetensors, "st1" single, "bin" sharded .bin, "bin1" single, "both"
    dtype: str  # bfloat16, float16, float32
    chatml: bool  # 32002 rows (ChatML tokens appended), chat template chatml
    template: str | None = None  # chat template, if not chatml's


SEED_REPOS = [
    Repo("mistralai/Mistral-7B-v0.1", "both", "bfloat16", False),
    Repo("ehartford/dolphin-2.2.1-mistral-7b", "bin", "bfloat16", True),
    Repo("SciPhi/SciPhi-Mistral-7B-32k", "bin1", "float32", False),
    Repo("ehartford/samantha-1.2-mistral-7b", "bin", "float16", False),
    Repo("Arc53/docsgpt-7b-mistral", "st", "float16", False),
    Repo("berkeley-nest/Starling-LM-7B-alpha", "st", "bfloat16", True),
    Repo("Q-bert/MetaMath-Cybertron-Starling", "st", "bfloat16", True),
    Repo("Open-Orca/Mistral-7B-OpenOrca", "both", "bfloat16", True),
    Repo("v1olet/v1olet_marcoroni-go-bruins-merge-7B", "st1", "float16", False),
    Repo("beowolx/MistralHermes-CodePro-7B-v1", "st", "bfloat16", True),
    Repo("TIGER-Lab/MAmmoTH-7B-Mistral", "bin", "float32", False),
    Repo("teknium/OpenHermes-2.5-Mistral-7B", "both", "bfloat16", True),
    Repo("Weyaxi/OpenHermes-2.5-neural-chat-v3-3-Slerp", "st", "float16", True),
    Repo("mlabonne/NeuralHermes-2.5-Mistral-7B", "st", "float16", True),
    Repo("mistralai/Mistral-7B-Instruct-v0.2", "both", "bfloat16", False, MISTRAL),
    Repo("janai-hq/trinity-v1", "st", "bfloat16", False),
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def describe(repo: Repo, vocab: int) -> str:
    fmt = {"st": "sharded safetensors", "st1": "single model.safetensors", "bin": "sharded pytorch_model .bin",
           "bin1": "single pytorch_model.bin", "both": "sharded safetensors and sharded .bin"}[repo.formats]
    rows = vocab + (len(CHATML_TOKENS) if repo.chatml else 0)
    tmpl = "chatml" if repo.chatml else ("mistral" if repo.template else "none")
    return f"{repo.repo_id:48s} {fmt:38s} {repo.dtype:9s} vocab {rows:6d} template {tmpl}"


def model_tensors(shape: Shape, chatml: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of model k, in model order; ChatML models have two more vocabulary rows."""
    extra = len(CHATML_TOKENS) if chatml else 0
    return [(n, (s[0] + extra, *s[1:]) if is_vocab(n) else s) for n, s in tensor_specs(shape)]


def is_vocab(name: str) -> bool:
    return name in ("model.embed_tokens.weight", "lm_head.weight")


def tensor(name: str, shp: tuple[int, ...], seed: int, k: int, base_rows: int) -> torch.Tensor:
    """Model k's tensor: the base's (k = 0) or the base plus delta k; appended vocabulary rows are new."""
    rows = shp[0] if is_vocab(name) else None
    core = (base_rows, *shp[1:]) if rows is not None else shp
    t = base_tensor(name, core, seed)
    if k:
        t = t + delta_tensor(name, core, seed, k)
    if rows is not None and rows > base_rows:
        g = torch.Generator().manual_seed(seed * 7919 + k)
        t = torch.cat([t, 0.02 * torch.randn((rows - base_rows, *shp[1:]), generator=g)])
    return t


def write_weights(folder: str, kind: str, specs, dtype: torch.dtype, shard_bytes: int,  # type: ignore[no-untyped-def]
                  make) -> None:
    """One format's shards (and index, when sharded) into `folder`."""
    isz = torch.tensor([], dtype=dtype).element_size()
    single = kind in ("st1", "bin1")
    groups = [specs] if single else shard_groups(specs, isz, shard_bytes)
    n = len(groups)
    is_bin = kind.startswith("bin")
    if single:
        names = ["pytorch_model.bin" if is_bin else "model.safetensors"]
    else:
        stem, ext = ("pytorch_model", "bin") if is_bin else ("model", "safetensors")
        names = [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]
    for shard, group in zip(names, groups):
        path = os.path.join(folder, shard)
        if is_bin:
            torch.save({name: make(name, shp).to(dtype).contiguous() for name, shp in group}, path)
        else:
            from safetensors.torch import save_file
            save_file({name: make(name, shp).to(dtype).contiguous() for name, shp in group}, path,
                      metadata={"format": "pt"})
    if not single:
        total = sum(math.prod(s) * isz for _, s in specs)
        index = "pytorch_model.bin.index.json" if is_bin else "model.safetensors.index.json"
        make_models._dump(os.path.join(folder, index), {
            "metadata": {"total_size": total},
            "weight_map": {name: names[i] for i, g in enumerate(groups) for name, _ in g}})


def write_meta(folder: str, shape: Shape, repo: Repo) -> None:
    """config.json, tokenizer files, generation_config.json: make_models' files, adjusted per repo."""
    make_models._write_meta(folder, shape, tensor_specs(shape), ["x"], [[]], 2)
    os.remove(os.path.join(folder, "model.safetensors.index.json"))  # written per format below
    rows = shape.vocab + (len(CHATML_TOKENS) if repo.chatml else 0)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(vocab_size=rows, torch_dtype=repo.dtype)
    make_models._dump(os.path.join(folder, "config.json"), cfg)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    if repo.chatml:
        with open(os.path.join(folder, "tokenizer.json")) as f:
            tok = json.load(f)
        added = {t: shape.vocab + i for i, t in enumerate(CHATML_TOKENS)}
        tok["added_tokens"] += [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                 "normalized": False, "special": True} for t, i in added.items()]
        make_models._dump(os.path.join(folder, "tokenizer.json"), tok)
        make_models._dump(os.path.join(folder, "added_tokens.json"), added)
        tcfg["chat_template"] = CHATML
        tcfg["eos_token"] = "<|im_end|>"
    elif repo.template:
        tcfg["chat_template"] = repo.template
    make_models._dump(os.path.join(folder, "tokenizer_config.json"), tcfg)


def make_repo(cache: str, repo: Repo, k: int, shape: Shape, seed: int, shard_bytes: int) -> str:
    """Write one repository into the cache as the Hub client does; returns its snapshot folder."""
    specs = model_tensors(shape, repo.chatml)
    dtype = _DTYPES[repo.dtype]

    def make(name: str, shp: tuple[int, ...]) -> torch.Tensor:
        return tensor(name, shp, seed, k, shape.vocab)

    stage = tempfile.mkdtemp(dir=cache, prefix=".stage-")
    try:
        write_meta(stage, shape, repo)
        for kind in (("st", "bin") if repo.formats == "both" else (repo.formats,)):
            write_weights(stage, kind, specs, dtype, shard_bytes, make)
        return _publish(cache, repo.repo_id, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(cache: str, repo_id: str, stage: str) -> str:
    """Move staged files into blobs/ named by content hash; the snapshot holds relative symlinks."""
    snap = make_models.cache_folder(cache, repo_id)  # writes refs/main
    repo = os.path.dirname(os.path.dirname(snap))
    blobs = os.path.join(repo, "blobs")
    os.makedirs(blobs, exist_ok=True)
    if os.path.lexists(snap):
        shutil.rmtree(snap) if not os.path.islink(snap) else os.unlink(snap)
    os.makedirs(snap)
    for name in sorted(os.listdir(stage)):
        h = hashlib.sha256()
        with open(os.path.join(stage, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        blob = os.path.join(blobs, h.hexdigest())
        if not os.path.exists(blob):
            os.replace(os.path.join(stage, name), blob)
        os.symlink(os.path.join("..", "..", "blobs", h.hexdigest()), os.path.join(snap, name))
    return snap


def make_hub(cache: str, shape: Shape, seed: int = 0, shard_bytes: int = 2_000_000_000,
             repos: list[Repo] | None = None) -> list[str]:
    """Every repository of `repos` (default: the seed's sixteen); returns their snapshot folders."""
    os.makedirs(cache, exist_ok=True)
    return [make_repo(cache, r, k, shape, seed, shard_bytes) for k, r in enumerate(repos or SEED_REPOS)]


def make_adapter(folder: str, shape: Shape, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                 targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"), embeddings: bool = False,
                 fmt: str = "safetensors", base: str = "") -> str:
    """A PEFT LoRA adapter for models of `shape`: adapter_config.json and adapter_model.safetensors
    (or .bin), with PEFT's tensor names (`base_model.model.<module>.lora_A.weight`: rank x in;
    `lora_B.weight`: out x rank; embeddings: `lora_embedding_A`: rank x vocab, `_B`: hidden x rank)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shp in tensor_specs(shape):
        module = name[: -len(".weight")]
        if any(module.endswith(t) for t in targets) and len(shp) == 2:
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.05 * torch.randn((rank, shp[1]), generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.05 * torch.randn((shp[0], rank), generator=g)
        if embeddings and name == "model.embed_tokens.weight":
            tensors[f"base_model.model.{module}.lora_embedding_A"] = 0.05 * torch.randn((rank, shp[0]), generator=g)
            tensors[f"base_model.model.{module}.lora_embedding_B"] = 0.05 * torch.randn((shp[1], rank), generator=g)
    target_modules = list(targets) + (["embed_tokens"] if embeddings else [])
    make_models._dump(os.path.join(folder, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": target_modules, "base_model_name_or_path": base, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True})
    if fmt == "bin":
        torch.save(tensors, os.path.join(folder, "adapter_model.bin"))
    else:
        from safetensors.torch import save_file
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", help="the Hugging Face cache folder to fill (HF_HUB_CACHE)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=float, default=2000, help="largest input shard, MB")
    ap.add_argument("--list", action="store_true", help="print the layouts and stop")
    a = ap.parse_args()
    shape = PRESETS[a.preset]
    for r in SEED_REPOS:
        print(describe(r, shape.vocab))
    if not a.list:
        for snap in make_hub(a.cache, shape, a.seed, int(a.shard_mb * 1_000_000)):
            print(snap)


if __name__ == "__main__":
    main()
