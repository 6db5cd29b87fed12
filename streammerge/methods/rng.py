"""Counter-based random draws: a pure function of (seed, input position, tensor, element index).

Imports torch and xxhash only. splitmix64's output function applied to `key + (i+1)·γ`
gives the draw for flat element i, so the same element gets the same draw whatever the
chunking, order, device or resume (SEMANTICS deviation 2). It runs on int64 tensors,
whose multiplication wraps modulo 2^64 on every torch backend; shifts are made logical
with a mask, since torch's >> on int64 is arithmetic.
"""

from __future__ import annotations

import torch
import xxhash

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def _signed(u: int) -> int:
    """A uint64 as the int64 with the same bits."""
    u &= _MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


def stream_key(seed: int, input_position: int, tensor_name: str) -> int:
    """The 64-bit key of one input's draws for one tensor, as a signed int64."""
    digest = xxhash.xxh3_64_intdigest(f"{seed}\x00{input_position}\x00{tensor_name}".encode())
    return _signed(digest)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def draws53(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """53-bit uniform integers in [0, 2^53) for flat indices start..start+count-1 (int64)."""
    idx = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z = idx * _signed(_GAMMA) + key
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    z = z ^ _shr(z, 31)
    return _shr(z, 11)


def keep_threshold(probability: float) -> int:
    """The integer t with P(draw < t) = probability for 53-bit draws."""
    p = min(1.0, max(0.0, probability))
    return int(p * (1 << 53))


def bernoulli_mask(key: int, start: int, count: int, probability: float,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep-mask (bool) with P(keep) = probability for flat indices start..start+count-1."""
    return draws53(key, start, count, device) < keep_threshold(probability)
