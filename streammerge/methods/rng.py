"""Counter-based random draws: a pure function of (seed, input position, tensor, element index).

Imports torch and xxhash only. splitmix64's output function applied to `key + (c+1)·γ`
gives counter c's 64 bits; masks take 32 bits per element (element i: counter i // 2, low
half for even i, high half for odd, with its top bit flipped), samples 53 bits per counter.
So the same element gets the same draw whatever the chunking, order, device or resume
(SEMANTICS deviation 2). It runs on int64 tensors, whose multiplication wraps modulo 2^64
on every torch backend; shifts are made logical with a mask, since torch's >> on int64 is
arithmetic.
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
    """32-bit uniform integers in [0, 2^32) for flat indices start..start+count-1 (int64).

    One splitmix64 output serves two elements: element i takes the low 32 bits of the output
    for pair i // 2 when i is even, the high 32 bits when it is odd, with the top bit flipped
    (u = half XOR 2^31). That is the int32 view of the outputs plus 2^31, read without a copy:
    half the hashing of one output per element, which is most of the cost of a DARE mask.
    """
    return _halves(key, start, count, device).to(torch.int64).add_(1 << 31)


def _halves(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """Each element's 32-bit half as int32 (u − 2^31, so signed order is u's order); a view."""
    first, last = start // 2, (start + count - 1) // 2
    z = draws64(key, first, last - first + 1, device)  # (pairs,)
    offset = start - 2 * first
    # little-endian on every torch backend: the int32 view of a pair is [low half, high half]
    return z.view(torch.int32)[offset:offset + count]


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
    draws32 < keep_threshold, compared on the int32 halves (u < t  ⟺  u − 2^31 < t − 2^31)."""
    t = keep_threshold(probability)
    if t >= 1 << 32:
        return torch.ones(count, dtype=torch.bool, device=device)
    return _halves(key, start, count, device) < t - (1 << 31)
