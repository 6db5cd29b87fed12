"""The counter-based generator: torch int64 arithmetic equals the plain-integer definition,
including far into a tensor (indices past 2^32) where 64-bit wraparound matters."""

from __future__ import annotations

import reference as ref
import torch

from streammerge.methods.rng import draws32, draws53, stream_key


def test_draws_match_integer_definition() -> None:
    key = stream_key(42, 3, "model.layers.7.mlp.down_proj.weight")
    for start in (0, 1, 12345, 2**33 + 7):
        got = draws53(key, start, 16).tolist()
        want = [ref.splitmix_draw(key & ref.MASK64, start + i) for i in range(16)]
        assert got == want


def test_draws_are_uniform_enough() -> None:
    d = draws53(stream_key(0, 0, "x"), 0, 100_000).double() / 2**53
    assert abs(d.mean().item() - 0.5) < 0.005
    assert abs((d < 0.25).double().mean().item() - 0.25) < 0.005


def test_32_bit_draws_match_integer_definition() -> None:
    key = stream_key(3, 1, "model.layers.0.mlp.up_proj.weight")
    for start in (0, 1, 7, 2**33 + 3):  # odd starts begin on a pair's low half
        got = draws32(key, start, 9).tolist()
        assert got == [ref.draw32(key & ref.MASK64, start + i) for i in range(9)]
    whole = draws32(key, 0, 100)
    assert torch.equal(torch.cat([draws32(key, 0, 37), draws32(key, 37, 63)]), whole)  # any split
