"""The counter-based generator: the numpy (CPU) and torch (GPU) arithmetic equal the
plain-integer definition, including far into a tensor (indices past 2^32, where the block key
changes) and across a block boundary; the draws are uniform and independent enough."""

from __future__ import annotations

import numpy as np
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.methods.rng import _hash32_torch, bernoulli_mask, draws32, draws53, keep_threshold, stream_key


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


@settings(max_examples=40, deadline=None)
@given(start=st.one_of(st.integers(0, 2**40), st.integers(2**32 - 20, 2**32 + 5), st.integers(2**31 - 20, 2**31 + 5)),
       count=st.integers(1, 40), seed=st.integers(0, 2**31), position=st.integers(0, 20))
def test_32_bit_draws_match_integer_definition(start: int, count: int, seed: int, position: int) -> None:
    key = stream_key(seed, position, "model.layers.0.mlp.up_proj.weight")
    want = [ref.draw32(key & ref.MASK64, start + i) for i in range(count)]
    assert draws32(key, start, count).tolist() == want  # the CPU's numpy path
    # the torch int32 path a GPU takes, run here on the CPU's torch
    gpu_rule = (_hash32_torch(key, start, count, "cpu").to(torch.int64) + (1 << 31)).tolist()
    assert gpu_rule == want


@settings(max_examples=25, deadline=None)
@given(run=st.one_of(st.integers(0, 2**24), st.sampled_from([65535, 65536, 131072])),
       offset=st.integers(-300, 300), count=st.integers(1, 200_000), seed=st.integers(0, 2**31))
def test_draws_across_runs_of_2_16_indices_match_the_plain_form(run: int, offset: int, count: int,
                                                                seed: int) -> None:
    """The CPU folds lowbias32's first step into one xor per run of 2^16 indices sharing their high
    half: over long spans starting near any run boundary (and across 2^32, where the block key
    changes) it gives the plain form's bits, and the definition's at every run's first and last
    element."""
    key = stream_key(seed, 1, "model.layers.3.mlp.down_proj.weight")
    start = max(0, run * 65536 + offset)
    got = draws32(key, start, count)
    plain = _hash32_torch(key, start, count, "cpu").to(torch.int64) + (1 << 31)
    assert torch.equal(got, plain)
    edges = {i for i in range(start, start + count) if i % 65536 in (0, 65535)} | {start, start + count - 1}
    for i in sorted(edges):
        assert int(got[i - start]) == ref.draw32(key & ref.MASK64, i)


def test_any_split_gives_the_same_draws_and_masks() -> None:
    key = stream_key(3, 1, "model.layers.0.mlp.up_proj.weight")
    start = 2**32 - 50  # the split and the block boundary both fall inside
    whole = draws32(key, start, 100)
    assert torch.equal(torch.cat([draws32(key, start, 37), draws32(key, start + 37, 63)]), whole)
    for p in (0.0, 1e-6, 0.3, 0.5, 0.999):
        mask = bernoulli_mask(key, start, 100, p)
        assert torch.equal(mask, whole < keep_threshold(p))
        torch_rule = _hash32_torch(key, start, 100, "cpu") < keep_threshold(p) - (1 << 31)
        assert torch.equal(mask, torch_rule)


def test_masks_keep_the_density_and_streams_are_independent() -> None:
    n = 400_000
    a = bernoulli_mask(stream_key(0, 1, "w"), 0, n, 0.3).numpy()
    b = bernoulli_mask(stream_key(0, 2, "w"), 0, n, 0.3).numpy()
    assert abs(a.mean() - 0.3) < 0.004 and abs(b.mean() - 0.3) < 0.004
    assert abs((a & b).mean() - 0.09) < 0.003  # two inputs' masks: independent, not shifted copies
    # neighbouring elements too (a weak hash of consecutive counters correlates them)
    assert abs((a[1:] & a[:-1]).mean() - 0.09) < 0.003
    u = draws32(stream_key(5, 0, "v"), 2**32 - n // 2, n).numpy()  # across a block boundary
    counts = np.bincount((u >> 28).astype(np.int64), minlength=16)
    assert counts.min() > n / 16 * 0.95 and counts.max() < n / 16 * 1.05
