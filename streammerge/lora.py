"""A model with a PEFT LoRA adapter applied, read as rows: W + scale · B·A, one row chunk at a time.

Imports index, format, dtypes, errors (and torch). mergekit's `BASE+ADAPTER` reference: the
adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`). For an
adapted linear weight W (out × in), rows r0..r1 of the adapted weight are
`W[r0:r1] + scale · B[r0:r1] @ A` with A (rank × in) and B (out × rank), computed in float32 in
slices of at most 1 MiB and rounded to W's dtype, as PEFT's merge_and_unload leaves it; the dense
delta never exists whole. Embedding adapters (`lora_embedding_A/B`) and fan-in-fan-out layers add
`(A[:, r0:r1])ᵀ @ Bᵀ`. `modules_to_save` tensors replace the base's. scale = lora_alpha / r, or
lora_alpha / √r with use_rslora, with rank_pattern / alpha_pattern applied per module.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import xxhash

from .dtypes import torch_dtype
from .errors import InputError
from .index import ModelIndex

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SLICE_BYTES = 1 << 20  # float32 temporaries per slice of rows: a few, cache-sized
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Lora:
    """The low-rank factors of one adapted tensor."""

    a: str  # adapter tensor names
    b: str
    scale: float
    transposed: bool  # embedding or fan_in_fan_out: delta = (B @ A)ᵀ
    rank: int


class AdaptedIndex(ModelIndex):
    """A base model's index whose tensors read as the adapted model's.

    Example:
        >>> idx = AdaptedIndex(ModelIndex("/models/base"), "/adapters/my-lora", "base+my-lora")
        >>> idx.adaptation("model.layers.0.self_attn.q_proj.weight")
        'LoRA r=16, scale 2'
    """

    def __init__(self, base: ModelIndex, adapter_folder: str, label: str) -> None:
        self.base, self.adapter_folder = base, adapter_folder
        self.folder, self.label = base.folder, label
        cfg = self._adapter_config()
        self.adapter = ModelIndex(adapter_folder, f"adapter of {label}", files=ADAPTER_FILES)
        self.headers, self._fds, self._lock = base.headers, base._fds, base._lock
        self.tensors, self.listed_missing = dict(base.tensors), base.listed_missing
        self.loras: dict[str, Lora] = {}
        self.replaced: set[str] = set()
        self._factor_cache: dict[str, torch.Tensor] = {}
        self._read_adapter(cfg)

    def _adapter_config(self) -> dict:
        path = os.path.join(self.adapter_folder, "adapter_config.json")
        try:
            with open(path) as f:
                cfg = json.load(f)
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read the adapter's config ({e}); is {self.adapter_folder} a PEFT "
                             "adapter folder?") from e
        kind = cfg.get("peft_type", "LORA")
        if kind != "LORA":
            raise InputError(f"{path}: peft_type {kind!r}; only LoRA adapters can be merged")
        if cfg.get("use_dora"):
            raise InputError(f"{path}: a DoRA adapter (use_dora), whose weights depend on column norms of the whole "
                             "tensor; merge it with PEFT first (merge_and_unload) and use the result")
        return cfg

    def _read_adapter(self, cfg: dict) -> None:
        names = set(self.adapter.tensors)
        for name in sorted(names):
            m = re.fullmatch(r"(.*)\.lora_(embedding_)?A(\.[^.]+)?(\.weight)?", name)
            if m:
                self._add_lora(cfg, name, m, names)
            elif ".lora_" in name or "lora_magnitude" in name:
                continue  # B factors are found from their A; anything else is refused below
            else:
                self._add_replacement(name)
        stray = [n for n in names if ("lora_B" in n or "lora_embedding_B" in n)
                 and not any(n in (lo.a, lo.b) for lo in self.loras.values())]
        if stray:
            raise InputError(f"{self.adapter_folder}: LoRA factor {stray[0]!r} has no matching A factor")
        if not self.loras and not self.replaced:
            raise InputError(f"{self.adapter_folder}: the adapter holds no LoRA factors")

    def _add_lora(self, cfg: dict, name: str, m: re.Match[str], names: set[str]) -> None:
        module, embedding, adapter_name, suffix = m.group(1), bool(m.group(2)), m.group(3) or "", m.group(4) or ""
        b = f"{module}.lora_{'embedding_' if embedding else ''}B{adapter_name}{suffix}"
        target = _strip(module) + ".weight"
        if b not in names:
            raise InputError(f"{self.adapter_folder}: LoRA factor {name!r} has no matching {b!r}")
        if target not in self.tensors:
            raise InputError(f"{self.adapter_folder}: the adapter changes {target!r}, which the base model "
                             f"{self.base.label} does not have; is it an adapter for another model?")
        a_shape, b_shape = self.adapter.tensors[name].entry.shape, self.adapter.tensors[b].entry.shape
        w_shape = self.tensors[target].entry.shape
        rank = a_shape[0]
        transposed = embedding or bool(cfg.get("fan_in_fan_out"))
        want = (w_shape[1], w_shape[0]) if transposed else tuple(w_shape)
        got = (b_shape[0], a_shape[1])
        if len(w_shape) != 2 or got != want or a_shape[0] != b_shape[1]:
            raise InputError(f"{self.adapter_folder}: LoRA factors of {target!r} are {list(a_shape)} and "
                             f"{list(b_shape)}, which do not fit the base tensor {list(w_shape)}")
        r = _pattern(cfg.get("rank_pattern"), module, cfg.get("r", rank))
        alpha = _pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
        scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))
        self.loras[target] = Lora(name, b, scale, transposed, rank)

    def _add_replacement(self, name: str) -> None:
        target = _strip(re.sub(r"\.modules_to_save(\.[^.]+)?", "", name))
        if target not in self.tensors:
            raise InputError(f"{self.adapter_folder}: the adapter holds {name!r}, which is neither a LoRA factor "
                             f"nor a tensor of the base model {self.base.label}")
        if self.adapter.tensors[name].entry.shape != self.tensors[target].entry.shape:
            raise InputError(f"{self.adapter_folder}: {name!r} replaces {target!r} but has another shape")
        self.tensors[target] = self.adapter.tensors[name]
        self.replaced.add(target)

    def adaptation(self, name: str) -> str | None:
        """How the adapter changes tensor `name`, in words (for plan --explain), or None."""
        if name in self.replaced:
            return "replaced by the adapter (modules_to_save)"
        lo = self.loras.get(name)
        return f"LoRA r={lo.rank}, scale {lo.scale:.6g}" if lo else None

    def identity(self) -> dict[str, object]:
        ident = self.base.identity()
        ident["adapter"] = self.adapter.identity()
        with open(os.path.join(self.adapter_folder, "adapter_config.json"), "rb") as f:
            ident["adapter_config_xxh3_128"] = xxhash.xxh3_128_hexdigest(f.read())
        return ident

    def read_rows(self, name: str, row0: int, row1: int, out: torch.Tensor | None = None,
                  hasher: xxhash.xxh3_128 | None = None, stage: torch.Tensor | None = None,
                  via: torch.dtype | None = None) -> torch.Tensor:
        if name in self.replaced:
            return self.adapter.read_rows(name, row0, row1, out, hasher, stage, via)
        lo = self.loras.get(name)
        if lo is None:
            return self.base.read_rows(name, row0, row1, out, hasher, stage, via)
        stored, cols = torch_dtype(self.tensors[name].entry.dtype), self.tensors[name].cols
        if out is None:
            own = torch.empty((row1 - row0, cols), dtype=stored)
            self.base.read_rows(name, row0, row1, own, hasher)
            self._add_delta(name, lo, row0, own)
            return own
        if via is not None and via != stored:  # adapted in W's dtype, then rounded to the config's: a slice at a time
            step = max(1, SLICE_BYTES // max(1, cols * stored.itemsize))
            for s in range(row0, row1, step):
                e = min(row1, s + step)
                own = torch.empty((e - s, cols), dtype=stored)
                self.base.read_rows(name, s, e, own, hasher)
                self._add_delta(name, lo, s, own)
                out[s - row0:e - row0].copy_(own.to(via))
            return out
        self.base.read_rows(name, row0, row1, out, hasher, stage)
        self._add_delta(name, lo, row0, out)
        return out

    def pread_rows(self, name: str, row0: int, row1: int, out: torch.Tensor,
                   hasher: xxhash.xxh3_128 | None = None) -> None:
        if name in self.replaced:
            return self.adapter.pread_rows(name, row0, row1, out, hasher)
        self.base.pread_rows(name, row0, row1, out, hasher)
        lo = self.loras.get(name)
        if lo is not None:
            self._add_delta(name, lo, row0, out.view(row1 - row0, self.tensors[name].cols))
        return None

    def release(self, name: str, row0: int = 0, row1: int | None = None) -> None:
        (self.adapter if name in self.replaced else self.base).release(name, row0, row1)

    def prefetch(self, name: str, row0: int, row1: int) -> None:
        (self.adapter if name in self.replaced else self.base).prefetch(name, row0, row1)

    def _add_delta(self, name: str, lo: Lora, row0: int, rows: torch.Tensor) -> None:
        """rows (n, cols), holding W's rows from row0 in some dtype, become the adapted rows, rounded to
        W's dtype as a merged adapter is stored.

        B·A is summed one rank at a time, each a separate multiply and add over whole rows: a BLAS
        matmul's summation order changes with the number of rows and threads, and the output bytes
        must not depend on the chunking."""
        stored = torch_dtype(self.tensors[name].entry.dtype)
        a = self._factor(lo.a)  # (rank, in), or (rank, out rows) when transposed
        bt = self._factor(lo.b).t() if lo.transposed else None  # (rank, cols)
        step = max(1, SLICE_BYTES // (4 * rows.shape[1]))
        for s in range(0, rows.shape[0], step):
            e = min(rows.shape[0], s + step)
            if bt is not None:
                left, right = a[:, row0 + s:row0 + e].t(), bt  # (n, rank), (rank, cols)
            else:
                left = self.adapter.read_rows(lo.b, row0 + s, row0 + e, torch.empty((e - s, lo.rank)))
                right = a
            delta = left[:, 0:1] * right[0]  # (n, cols) fp32
            for k in range(1, lo.rank):
                delta.add_(left[:, k:k + 1] * right[k])
            part = rows[s:e]
            part.copy_((part.float() + delta.mul_(lo.scale)).to(stored))

    def _factor(self, name: str) -> torch.Tensor:
        """A whole factor in float32 (A is rank × in: small), kept for the tensor being read."""
        if name not in self._factor_cache:
            if len(self._factor_cache) > 4:
                self._factor_cache.clear()
            ref = self.adapter.tensors[name]
            self._factor_cache[name] = self.adapter.read_rows(name, 0, ref.rows, torch.empty((ref.rows, ref.cols)))
        return self._factor_cache[name]

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def _strip(module: str) -> str:
    """`base_model.model.model.layers.0.q_proj` -> `model.layers.0.q_proj` (PEFT's wrapper prefix)."""
    return module[len(_PREFIX):] if module.startswith(_PREFIX) else module


def _pattern(patterns: object, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module's name."""
    if isinstance(patterns, dict):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?{key}$", module):
                return float(value)
    return float(default)
