"""Counter-based random draws: a pure function of (seed, input position, tensor, element index).

Imports numpy, torch and xxhash only. A stream's 64-bit key is hashed (xxh3) from the seed, the
input's position and the tensor name. Masks take 32 bits per element: element i's draw is
lowbias32(lo ^ k), where lo is i's low 32 bits and k the low half of splitmix64's output for
counter i >> 32 of the key (one k per 2^32 elements, so any tensor size works); lowbias32 is
x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15 on uint32. Samples
(arcee_fusion) take the top 53 bits of splitmix64's output for counter c, `key + (c+1)·γ`
mixed. So the same element gets the same draw whatever the chunking, order, thread, device or
resume (SEMANTICS deviation 2).

On the CPU masks are computed with numpy's uint32 (wrapping multiplication, logical shifts):
five in-place operations per element, 2.2x faster than the 64-bit splitmix64 per element pair
this replaced (ARITHMETIC 3), the first of them (with the offset and the key) folded into one
xor of a precomputed range per 2^16 indices (_hash32_numpy; the same bits, 0.94-1.36 against
1.39-1.72 ns per element). Elsewhere torch int32 tensors do it, whose multiplication wraps on
every backend, with shifts made logical by a mask; int64 does the samples the same way.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import xxhash

_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
# lowbias32's multipliers (Chris Wellons's hash-prospector: shifts 16, 15, 15; bias 0.107)
_L1 = 0x21F0AAAD
_L2 = 0x735A2D97


def _signed(u: int) -> int:
    """A uint64 as the int64 with the same bits."""
    u &= _MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


def stream_key(seed: int, input_position: int, tensor_name: str) -> int:
    """The 64-bit key of one input's draws for one tensor, as a signed int64."""
    digest = xxhash.xxh3_64_intdigest(f"{seed}\x00{input_position}\x00{tensor_name}".encode())
    return _signed(digest)


def draws53(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """53-bit uniform integers in [0, 2^53) for counters start..start+count-1 (int64): the top
    53 bits of each splitmix64 output."""
    return _shr(draws64(key, start, count, device), 11)


def _xor_shr(z: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    """z ^= z >>> s (logical shift), using tmp as scratch."""
    torch.bitwise_right_shift(z, s, out=tmp)
    tmp.bitwise_and_((1 << (64 - s)) - 1)
    z.bitwise_xor_(tmp)


def draws32(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """32-bit uniform integers in [0, 2^32) for flat indices start..start+count-1 (int64): the
    keyed lowbias32 hash of each index (module docstring)."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(_hash32_numpy(key, start, count).astype(np.int64))
    return _hash32_torch(key, start, count, device).to(torch.int64).add_(1 << 31)


def block_key(key: int, block: int) -> int:
    """The 32-bit key of indices block·2^32 .. (block+1)·2^32 − 1: the low half of splitmix64's
    output for counter `block` of the stream key."""
    z = (key + (block + 1) * _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return (z ^ (z >> 31)) & 0xFFFFFFFF


def _blocks(start: int, count: int) -> list[tuple[int, int, int]]:
    """[start, start+count) cut at multiples of 2^32: (block, first low index, length) each."""
    out = []
    i, stop = start, start + count
    while i < stop:
        block, lo = i >> 32, i & 0xFFFFFFFF
        n = min(stop - i, (1 << 32) - lo)
        out.append((block, lo, n))
        i += n
    return out


_local = threading.local()  # per thread: the uint32 scratch buffers of bernoulli_mask
_LOW16 = np.arange(1 << 16, dtype=np.uint32)  # every low half of an index, read-only
_LOW16.flags.writeable = False


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's two uint32 buffers of at least n elements (a fresh pair per sub-chunk cost page
    faults), as views of n."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].size < n:
        bufs = _local.bufs = (np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.uint32))
    return bufs[0][:n], bufs[1][:n]


def _hash32_numpy(key: int, start: int, count: int, out: np.ndarray | None = None,
                  tmp: np.ndarray | None = None) -> np.ndarray:
    """Element draws as uint32, on the CPU (into `out`, with `tmp` as scratch, when given): numpy's
    uint32 arithmetic wraps and its shifts are logical, so lowbias32's steps run in place on one
    buffer (torch's >> is arithmetic and needs a mask, and its int32 multiply was half numpy's speed).

    Its first step is folded into one xor. Within an aligned run of 2^16 indices, index i's high
    half is a constant w, so y = i ^ k has the high half h = w ^ (k >> 16) throughout, and
    y ^ (y >> 16) is i's low half xor c, c = (h << 16) | ((k ^ h) & 0xFFFF): one xor of a
    precomputed 0..65535 per run, where adding the offset, xoring the key, shifting and xoring
    were four passes. The bits are those of the plain form (_hash32_torch, tests/reference.py).
    """
    out = np.empty(count, dtype=np.uint32) if out is None else out
    at = 0
    for block, lo, n in _blocks(start, count):
        k = block_key(key, block)
        x = out[at:at + n]
        t = np.empty_like(x) if tmp is None else tmp[at:at + n]
        i, stop = lo, lo + n
        while i < stop:  # runs of indices sharing their high half
            w, low = i >> 16, i & 0xFFFF
            m = min(stop - i, (1 << 16) - low)
            h = w ^ (k >> 16)
            np.bitwise_xor(_LOW16[low:low + m], np.uint32((h << 16) | ((k ^ h) & 0xFFFF)),
                           out=x[i - lo:i - lo + m])
            i += m
        np.multiply(x, np.uint32(_L1), out=x)
        np.right_shift(x, 15, out=t)
        np.bitwise_xor(x, t, out=x)
        np.multiply(x, np.uint32(_L2), out=x)
        np.right_shift(x, 15, out=t)
        np.bitwise_xor(x, t, out=x)
        at += n
    return out


def _hash32_torch(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """The same draws with torch ops (a GPU's), as int32 holding u − 2^31, so that signed order is
    u's order: int32 multiplication wraps on every torch backend; shifts are made logical with a
    mask."""
    parts = []
    for block, lo, n in _blocks(start, count):
        x = torch.arange(lo, lo + n, dtype=torch.int64, device=device).to(torch.int32)  # wraps past 2^31
        tmp = torch.empty_like(x)
        x.bitwise_xor_(_signed32(block_key(key, block)))
        for shift, mult in ((16, _L1), (15, _L2)):
            _xor_shr32(x, shift, tmp)
            x.mul_(_signed32(mult))
        _xor_shr32(x, 15, tmp)
        parts.append(x.bitwise_xor_(-(1 << 31)))  # u − 2^31: u's bits with the top one flipped
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _xor_shr32(z: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    """z ^= z >>> s on int32 (a logical shift), using tmp as scratch."""
    torch.bitwise_right_shift(z, s, out=tmp)
    tmp.bitwise_and_((1 << (32 - s)) - 1)
    z.bitwise_xor_(tmp)


def _signed32(u: int) -> int:
    """A uint32 as the int32 with the same bits."""
    return u - (1 << 32) if u >= 1 << 31 else u


def draws64(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The full splitmix64 outputs (as int64 bit patterns) for counters start..start+count-1.

    In-place arithmetic on one scratch buffer: fresh temporaries per step cost more in page
    faults than the arithmetic itself.
    """
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(_GAMMA)).add_(key)
    tmp = torch.empty_like(z)
    for shift, mult in ((30, _M1), (27, _M2)):
        _xor_shr(z, shift, tmp)
        z.mul_(_signed(mult))
    _xor_shr(z, 31, tmp)
    return z


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    return torch.bitwise_right_shift(z, s).bitwise_and_((1 << (64 - s)) - 1)


def keep_threshold(probability: float) -> int:
    """The integer t with P(draw < t) = probability for 32-bit draws."""
    p = min(1.0, max(0.0, probability))
    return int(p * (1 << 32))


def bernoulli_mask(key: int, start: int, count: int, probability: float,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep-mask (bool) with P(keep) = probability for flat indices start..start+count-1:
    draws32 < keep_threshold (on a GPU compared as int32: u < t  ⟺  u − 2^31 < t − 2^31)."""
    t = keep_threshold(probability)
    if t >= 1 << 32:
        return torch.ones(count, dtype=torch.bool, device=device)
    if torch.device(device).type == "cpu":
        from .fused import bernoulli  # (fused imports this module)
        keep = bernoulli(key, start, count, t)  # one compiled loop where numba is installed
        if keep is None:
            keep = _hash32_numpy(key, start, count, *_scratch(count)) < np.uint32(t)
        return torch.from_numpy(keep)
    return _hash32_torch(key, start, count, device) < t - (1 << 31)
