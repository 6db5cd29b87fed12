#!/usr/bin/env python3
"""Make Mistral-shaped model sets for tests and benchmarks: a base plus fine-tunes (base + seeded deltas).

Each model is a Hugging Face folder: config.json, a small word-level tokenizer,
generation_config.json, and bf16 safetensors shards with model.safetensors.index.json.
Tensors are generated one at a time and written in place, so making a set of 15
560 MB models needs a few tensors of memory, not a model.

  python tools/make_models.py set OUT --preset small --count 3
  python tools/make_models.py seed CACHE --preset tiny     # the seed configs' 16 models, as an HF cache
  python tools/make_models.py link CACHE org/name FOLDER    # put a folder into an HF cache under an id
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from streammerge.dtypes import code_of  # noqa: E402
from streammerge.format import build_header  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool = False
    arch: str = "mistral"  # mistral, llama, qwen2 (q/k/v biases), gemma (tied, no lm_head), llava


ARCHS = {  # arch: (architectures[0], model_type, extra config keys)
    "mistral": ("MistralForCausalLM", "mistral", {"sliding_window": 4096, "hidden_act": "silu"}),
    "llama": ("LlamaForCausalLM", "llama", {"hidden_act": "silu"}),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", {"hidden_act": "silu", "use_sliding_window": False}),
    "gemma": ("GemmaForCausalLM", "gemma", {"hidden_act": "gelu_pytorch_tanh",
                                            "hidden_activation": "gelu_pytorch_tanh"}),
    "llava": ("LlavaForConditionalGeneration", "llava", {}),
}
# Llava's CLIP vision tower: hidden, intermediate, layers (not the language stack's), heads, image, patch
VISION = {"hidden": 48, "intermediate": 96, "layers": 3, "heads": 4, "image": 28, "patch": 14}


def arch_shape(arch: str, base: Shape | None = None) -> Shape:
    """A tiny model of another architecture (Gemma always ties its embeddings)."""
    b = base or PRESETS["tiny"]
    return Shape(b.hidden, b.intermediate, b.layers, b.heads, b.kv_heads, b.vocab, tie=arch == "gemma", arch=arch)


PRESETS = {
    "tiny": Shape(64, 160, 4, 4, 2, 128),  # ~0.2 MB: unit tests
    "tiny32": Shape(32, 96, 32, 4, 2, 96),  # ~0.7 MB, 32 layers: the seed configs end to end
    "small": Shape(384, 1344, 32, 6, 2, 32000),  # ~174 MB per model in bf16, 32 layers
    "medium": Shape(1024, 3584, 16, 32, 8, 32000),  # ~560 MB per model in bf16
    # Mistral-7B's own hidden, intermediate and vocabulary sizes with 2 layers: ~1.4 GB per model in
    # bf16, so benchmarks see 4096 x 14336 rows and 32000 x 4096 embeddings as the real files have
    "7b": Shape(4096, 14336, 2, 32, 8, 32000),
}

SEED_STAGE1 = [
    "mistralai/Mistral-7B-v0.1", "ehartford/dolphin-2.2.1-mistral-7b", "SciPhi/SciPhi-Mistral-7B-32k",
    "ehartford/samantha-1.2-mistral-7b", "Arc53/docsgpt-7b-mistral", "berkeley-nest/Starling-LM-7B-alpha",
    "Q-bert/MetaMath-Cybertron-Starling", "Open-Orca/Mistral-7B-OpenOrca",
    "v1olet/v1olet_marcoroni-go-bruins-merge-7B", "beowolx/MistralHermes-CodePro-7B-v1",
    "TIGER-Lab/MAmmoTH-7B-Mistral", "teknium/OpenHermes-2.5-Mistral-7B",
    "Weyaxi/OpenHermes-2.5-neural-chat-v3-3-Slerp", "mlabonne/NeuralHermes-2.5-Mistral-7B",
    "mistralai/Mistral-7B-Instruct-v0.2",
]
SEED_OTHER = "janai-hq/trinity-v1"


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor names and shapes, in model order: a Mistral-shaped decoder, or for
    `llava` that decoder under `language_model.` beside a CLIP vision tower of its own depth and a
    projector, named as Llava checkpoints on the Hub are (two numbered layer stacks)."""
    if s.arch == "llava":
        return _llava_specs(s)
    hd = s.hidden // s.heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "self_attn.q_proj.weight", (s.heads * hd, s.hidden)),
            (p + "self_attn.k_proj.weight", (s.kv_heads * hd, s.hidden)),
            (p + "self_attn.v_proj.weight", (s.kv_heads * hd, s.hidden)),
        ]
        if s.arch == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (s.heads * hd,)), (p + "self_attn.k_proj.bias", (s.kv_heads * hd,)),
                    (p + "self_attn.v_proj.bias", (s.kv_heads * hd,))]
        out += [
            (p + "self_attn.o_proj.weight", (s.hidden, s.heads * hd)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
        ]
    out.append(("model.norm.weight", (s.hidden,)))
    if not s.tie:
        out.append(("lm_head.weight", (s.vocab, s.hidden)))
    return out


def _llava_specs(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    text = tensor_specs(Shape(s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.vocab, arch="llama"))
    out = [("language_model." + n, shp) for n, shp in text]  # language_model.model.layers.N, language_model.lm_head
    v, p = VISION, "vision_tower.vision_model."
    hv, iv, positions = v["hidden"], v["intermediate"], (v["image"] // v["patch"]) ** 2 + 1
    out += [(p + "embeddings.class_embedding", (hv,)),
            (p + "embeddings.patch_embedding.weight", (hv, 3, v["patch"], v["patch"])),
            (p + "embeddings.position_embedding.weight", (positions, hv)),
            (p + "pre_layrnorm.weight", (hv,)), (p + "pre_layrnorm.bias", (hv,))]
    for i in range(v["layers"]):
        q = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out += [(f"{q}self_attn.{proj}.weight", (hv, hv)), (f"{q}self_attn.{proj}.bias", (hv,))]
        out += [(q + "layer_norm1.weight", (hv,)), (q + "layer_norm1.bias", (hv,)),
                (q + "mlp.fc1.weight", (iv, hv)), (q + "mlp.fc1.bias", (iv,)),
                (q + "mlp.fc2.weight", (hv, iv)), (q + "mlp.fc2.bias", (hv,)),
                (q + "layer_norm2.weight", (hv,)), (q + "layer_norm2.bias", (hv,))]
    out += [(p + "post_layernorm.weight", (hv,)), (p + "post_layernorm.bias", (hv,)),
            ("multi_modal_projector.linear_1.weight", (s.hidden, hv)),
            ("multi_modal_projector.linear_1.bias", (s.hidden,)),
            ("multi_modal_projector.linear_2.weight", (s.hidden, s.hidden)),
            ("multi_modal_projector.linear_2.bias", (s.hidden,))]
    return out


def _gen(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little"))
    return g


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _gen(seed, name)
    if len(shape) == 1 and name.endswith(".bias"):  # attention biases: small
        return 0.02 * torch.randn(shape, generator=g)
    if len(shape) == 1:  # norms: around 1
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def delta_tensor(name: str, shape: tuple[int, ...], seed: int, model: int) -> torch.Tensor:
    """A fine-tune's change: small dense noise plus a few larger entries, seeded per (model, tensor)."""
    g = _gen(seed * 1000 + model, name)
    d = 0.002 * torch.randn(shape, generator=g)
    big = torch.rand(shape, generator=g) < 0.01
    return d + big * 0.02 * torch.randn(shape, generator=g)


def shard_groups(specs: list[tuple[str, tuple[int, ...]]], isz: int,
                 shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors split into shards in order, each at most `shard_bytes` unless one tensor is larger."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in specs:
        nbytes = math.prod(shp) * isz
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shp))
        size += nbytes
    return groups


def write_set(folders: list[str], shape: Shape, seed: int = 0, shard_bytes: int = 2_000_000_000,
              dtype: torch.dtype = torch.bfloat16) -> None:
    """Write models: folders[0] is the base, folders[k] is the base plus delta k."""
    specs = tensor_specs(shape)
    code = code_of(dtype)
    isz = torch.tensor([], dtype=dtype).element_size()
    groups = shard_groups(specs, isz, shard_bytes)
    n = len(groups)
    shard_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        _write_meta(folder, shape, specs, shard_names, groups, isz)
    for shard_name, group in zip(shard_names, groups):
        group = sorted(group)  # the safetensors library writes names sorted
        header, ranges = build_header([(nm, code, shp) for nm, shp in group], {"format": "pt"})
        fds = []
        for folder in folders:
            fd = os.open(os.path.join(folder, shard_name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, header)
            os.ftruncate(fd, ranges[-1][1])
            fds.append(fd)
        for (name, shp), (begin, _) in zip(group, ranges):
            base = base_tensor(name, shp, seed)
            for k, fd in enumerate(fds):
                t = base if k == 0 else base + delta_tensor(name, shp, seed, k)
                os.pwrite(fd, t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes(), begin)
        for fd in fds:
            os.close(fd)


def _write_meta(folder: str, s: Shape, specs: list[tuple[str, tuple[int, ...]]], shard_names: list[str],
                groups: list[list[tuple[str, tuple[int, ...]]]], isz: int) -> None:
    arch_name, model_type, extra = ARCHS[s.arch]
    cfg = _llava_config(s) if s.arch == "llava" else {
        "architectures": [arch_name], "model_type": model_type, "hidden_size": s.hidden,
        "intermediate_size": s.intermediate, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "head_dim": s.hidden // s.heads, "vocab_size": s.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": s.tie, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "bfloat16", **extra,
    }
    _dump(os.path.join(folder, "config.json"), cfg)
    weight_map = {name: shard_names[i] for i, g in enumerate(groups) for name, _ in g}
    total = sum(math.prod(shp) * isz for _, shp in specs)
    _dump(os.path.join(folder, "model.safetensors.index.json"),
          {"metadata": {"total_size": total}, "weight_map": weight_map})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, s.vocab)})
    _dump(os.path.join(folder, "tokenizer.json"), {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in list(vocab.items())[:3]],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    })
    _dump(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 4096})
    _dump(os.path.join(folder, "special_tokens_map.json"),
          {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    _dump(os.path.join(folder, "generation_config.json"), {"bos_token_id": 1, "eos_token_id": 2})


def _llava_config(s: Shape) -> dict[str, object]:
    v = VISION
    text = {"model_type": "llama", "hidden_size": s.hidden, "intermediate_size": s.intermediate,
            "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
            "head_dim": s.hidden // s.heads, "vocab_size": s.vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False}
    vision = {"model_type": "clip_vision_model", "hidden_size": v["hidden"], "intermediate_size": v["intermediate"],
              "num_hidden_layers": v["layers"], "num_attention_heads": v["heads"], "image_size": v["image"],
              "patch_size": v["patch"], "projection_dim": v["hidden"], "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
            "vision_config": vision, "image_token_index": s.vocab - 1, "projector_hidden_act": "gelu",
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": s.vocab,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _dump(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def cache_folder(cache: str, repo_id: str) -> str:
    """Where a model with id `repo_id` lives in an HF cache: a snapshot folder (created, with refs/main)."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return os.path.join(repo, "snapshots", commit)


def link(cache: str, repo_id: str, folder: str) -> str:
    """Make `folder` appear in the HF cache `cache` as model `repo_id` (a symlinked snapshot)."""
    snap = cache_folder(cache, repo_id)
    os.makedirs(os.path.dirname(snap), exist_ok=True)
    if os.path.lexists(snap):
        os.unlink(snap)
    os.symlink(os.path.abspath(folder), snap)
    return snap


def make_seed_cache(cache: str, shape: Shape, seed: int = 0, shard_bytes: int = 2_000_000_000) -> list[str]:
    """The seed configs' 16 input models in an HF cache layout; returns their snapshot folders."""
    folders = [cache_folder(cache, rid) for rid in SEED_STAGE1 + [SEED_OTHER]]
    write_set(folders, shape, seed, shard_bytes)
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("set", "seed"):
        p = sub.add_parser(name)
        p.add_argument("out", help="folder for the set (set) or HF cache folder (seed)")
        p.add_argument("--preset", choices=sorted(PRESETS), default="tiny32" if name == "seed" else "tiny")
        p.add_argument("--arch", choices=sorted(ARCHS), default="mistral")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--shard-mb", type=int, default=2000, help="largest input shard, MB")
        if name == "set":
            p.add_argument("--count", type=int, default=3, help="models: the base and count-1 fine-tunes")
    p = sub.add_parser("link")
    p.add_argument("cache")
    p.add_argument("repo_id")
    p.add_argument("folder")
    a = ap.parse_args()
    if a.cmd == "link":
        print(link(a.cache, a.repo_id, a.folder))
        return
    shape = arch_shape(a.arch, PRESETS[a.preset]) if a.arch != "mistral" else PRESETS[a.preset]
    if a.cmd == "set":
        folders = [os.path.join(a.out, "base")] + [os.path.join(a.out, f"ft{k}") for k in range(1, a.count)]
        write_set(folders, shape, a.seed, a.shard_mb * 1_000_000)
    else:
        folders = make_seed_cache(a.out, shape, a.seed, a.shard_mb * 1_000_000)
    for f in folders:
        print(f)


if __name__ == "__main__":
    main()
