"""The numba-compiled loops (streammerge/methods/fused.py) give the bits of the numpy/torch forms they
replace: the same masks from the same draws, and, for every method of the task-arithmetic family,
the same merged values, signed zeros, infinities and NaNs, and the same report tallies, whatever
the weights, densities, flags, chunking and values (tests/test_kernel_forms.py checks those
forms against the plain formulas)."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from helpers import ROOMY, context, output_digest, run_chunked
from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import della_keep, pairwise_sum
from test_kernel_forms import VALUE, WEIGHT, bits, quiet

from streammerge.methods import METHODS, Tally, fused, rng
from streammerge.methods.base import tree_row_sums
from streammerge.methods.rng import _hash32_numpy, bernoulli_mask, keep_threshold
from streammerge.methods.sparsify import QUIET_NAN, RankedDrop, magnitude_bits
from streammerge.stats import TensorStats


@pytest.fixture(autouse=True)
def loops_on(monkeypatch):
    """The compiled loops in use, whatever size of merge this process ran before (fused.use_for)."""
    monkeypatch.setitem(fused._use, "on", True)


pytestmark = pytest.mark.skipif(fused.kernels() is None, reason="numba is not installed")



@contextlib.contextmanager
def without_loops() -> Iterator[None]:
    """The torch forms inside, as on a machine without numba: the loaded kernels set aside, then back."""
    jit = fused._state["jit"]
    fused._state["jit"] = None
    try:
        yield
    finally:
        fused._state["jit"] = jit


def test_streammerge_jit_is_asked_at_each_call(monkeypatch) -> None:
    """STREAMMERGE_JIT=0 turns the loops off even after they were loaded, and a 0 seen once is not
    kept: `plan` and the run it describes agree whatever the variable said earlier in the process."""
    monkeypatch.setenv("STREAMMERGE_JIT", "0")
    assert fused.kernels() is None
    monkeypatch.setenv("STREAMMERGE_JIT", "1")
    assert fused.kernels() is not None
    monkeypatch.setenv("STREAMMERGE_JIT", "0")
    assert fused.kernels() is None


FAMILY = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs",
          "breadcrumbs_ties"]
KEY = st.integers(-2**63, 2**63 - 1)
# a factor as SLERP's apply pass takes one (|c| < 32 for t in [0, 1]), rounded to float32 there
COEFFICIENT = st.one_of(st.floats(-32, 32), st.sampled_from([0.0, -0.0, 1.0, 1 / 3, 1e-30, 1e-45]))


@settings(max_examples=200, deadline=None)
@given(key=KEY, start=st.one_of(st.integers(0, 2**34), st.integers(2**32 - 3000, 2**32 + 10)),
       count=st.integers(0, 5000), probability=st.floats(0, 1))
@example(key=7, start=2**32 - 5, count=10, probability=0.5)  # across a block boundary: a new key
def test_fused_draws_are_the_numpy_draws(key, start, count, probability) -> None:
    t = keep_threshold(probability)
    fast = fused.bernoulli(key, start, count, t)
    assert fast is not None
    assert np.array_equal(fast, _hash32_numpy(key, start, count) < np.uint32(min(t, 2**32 - 1)))


@st.composite
def rows_of_values(draw):
    """float32 rows (several 512-element tiles at most), as bit patterns: any NaN payload and sign,
    infinities, signed zeros, subnormals; few distinct magnitudes, so bins and thresholds repeat."""
    n = draw(st.integers(1, 1300))
    pool = draw(st.lists(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(
        [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 1, 0x3F800000])), min_size=1, max_size=6))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    words = np.array([pool[i] for i in picks], dtype=np.uint32)
    return torch.from_numpy(words.view(np.float32).copy()).view(1, n)


@settings(max_examples=60, deadline=None)
@given(x=rows_of_values(), base=rows_of_values(), rows=st.integers(1, 3), keys=st.lists(KEY, min_size=1, max_size=3),
       start=st.one_of(st.integers(0, 2**34), st.integers(2**32 - 3000, 2**32 + 10)),
       probabilities=st.lists(st.floats(0, 1), min_size=3, max_size=3), pack=st.booleans(),
       base_at=st.integers(0, 3), gap=st.sampled_from([0, 1, 7, 64]), bf16=st.booleans())
def test_dare_sums_are_the_torch_statistics_pass(x, base, rows, keys, start, probabilities, pack, base_at, gap,
                                                 bf16) -> None:
    """DARE's compiled statistics pass, every other input of a chunk in one call, gives each input the
    row sums of |δ| and |δ|·keep that RandomDrop.observe's float32 arrays give row_sums (and the
    plain-Python pairwise reference), bit for bit, and the same mask's bits, np.packbits' order, on
    rows that cross a 2^32 block boundary too (a new key); in a chunk whose inputs lie `gap`
    elements apart (a block's rows), the base anywhere among them, float32 or bfloat16 as read."""
    base = base.repeat(1, x.shape[1] // base.shape[1] + 1)[:, :x.shape[1]]
    x, base = x.repeat(rows, 1), base.repeat(rows, 1)
    others = [x, x.flip(1), -base][:len(keys)]  # inputs that differ from each other
    inputs = others[:base_at] + [base] + others[base_at:]
    b = min(base_at, len(others))
    count = x.numel()
    dtype = torch.bfloat16 if bf16 else torch.float32
    store = torch.zeros(len(inputs), count + gap, dtype=dtype)
    for i, t in enumerate(inputs):
        store[i, :count] = t.reshape(-1).to(dtype)
    chunk = store[:, :count].view(len(inputs), rows, -1)
    idx = [i for i in range(len(inputs)) if i != b]
    thresholds = np.array([keep_threshold(p) for p in probabilities[:len(idx)]], dtype=np.int64)
    total, kept, packed = fused.dare_sums(chunk, b, idx, tuple(keys), start, thresholds, pack)
    assert total.shape == kept.shape == (len(idx), rows) and total.dtype == kept.dtype == np.float64
    assert (packed is not None) is pack
    for r, (i, key, p) in enumerate(zip(idx, keys, probabilities)):
        want_keep = bernoulli_mask(key, start, count, p, x.device).view(x.shape)
        want_mag = (chunk[i].float() - chunk[b].float()).abs()
        want_kept = want_mag * want_keep
        if packed is not None:
            assert np.array_equal(packed[r], np.packbits(want_keep.numpy().reshape(-1)))
        for got, want in ((torch.from_numpy(total[r]), want_mag), (torch.from_numpy(kept[r]), want_kept)):
            ref = torch.tensor([pairwise_sum([float(v) for v in row]) for row in want.double().tolist()],
                               dtype=torch.float64)
            for w in (tree_row_sums(want), ref):
                assert torch.equal(got.isnan(), w.isnan()) and torch.equal(got[~w.isnan()], w[~w.isnan()])


@settings(max_examples=100, deadline=None)
@given(x=rows_of_values(), base=rows_of_values(), pick=st.integers(0, 2**16 - 1))
def test_radix_counts_are_the_torch_counts(x, base, pick) -> None:
    """Both radix passes, over δ = x − base and over δ given, count what TopK's torch form counts; the
    first also how many of each high half's bit patterns have a low half that is not zero."""
    base = base.repeat(1, x.shape[1] // base.shape[1] + 1)[:, :x.shape[1]].contiguous()
    for delta, b in ((x - base, base), (x, None)):
        v = magnitude_bits(delta).flatten().to(torch.int64)
        hi = int(v[pick % v.numel()]) >> 16  # a bin that is not empty
        for pass_hi, want in ((-1, torch.bincount(v >> 16, minlength=1 << 16)),
                              (hi, torch.bincount(v[(v >> 16) == hi] & 0xFFFF, minlength=1 << 16))):
            got_bins, counts, inexact = fused.radix_count(x if b is not None else delta, b, pass_hi)
            bins = np.arange(1 << 16)[got_bins]  # a range in the first pass, an index array in the second
            assert len(set(bins.tolist())) == bins.size == counts.size  # each bin once
            got = torch.zeros(1 << 16, dtype=torch.int64)
            got[torch.from_numpy(bins)] = torch.from_numpy(counts)
            assert torch.equal(got, want)
            if pass_hi < 0:  # the range touched, no wider
                assert counts.size == 0 or (counts[0] > 0 and counts[-1] > 0)
                assert inexact is not None and inexact.size == counts.size
                got[:] = 0
                got[torch.from_numpy(bins)] = torch.from_numpy(inexact)
                assert torch.equal(got, torch.bincount(v[(v & 0xFFFF) != 0] >> 16, minlength=1 << 16))
            else:  # the bins touched, no other
                assert (counts > 0).all() and inexact is None
        _, counts, inexact = fused.radix_count(x if b is not None else delta, b, -1)  # the scratch was cleared
        assert int(counts.sum()) == x.numel() and inexact is not None
        assert int(inexact.sum()) == int(((v & 0xFFFF) != 0).sum())


def test_every_nan_has_one_magnitude_in_both_forms() -> None:
    """x − base of two NaNs carries one of their payloads, and which one follows the instruction
    (torch's and numba's differ here): ranked by magnitude, every NaN is the quiet NaN."""
    words = np.array([0x7FC00000, 0xFFC00001, 0x7F812345, 0xFFFFFFFF, 0x7F800000, 0], dtype=np.uint32)
    x = torch.from_numpy(np.repeat(words, 6).view(np.float32)).view(1, -1)
    base = torch.from_numpy(np.tile(words, 6).view(np.float32)).view(1, -1)
    v = magnitude_bits(x - base)
    assert int((x - base).isnan().sum()) == 33  # all but inf − 0, 0 − inf and 0 − 0
    assert int((v == QUIET_NAN).sum()) == 33 and int(v.max()) == QUIET_NAN
    bins, counts, _ = fused.radix_count(x, base, QUIET_NAN >> 16)
    assert list(np.arange(1 << 16)[bins]) == [QUIET_NAN & 0xFFFF] and list(counts) == [33]


@settings(max_examples=200, deadline=None)
@given(d=rows_of_values(), pick=st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)),
       edge=st.sampled_from([None, -1, 1 << 31, (1 << 31) - 1]))
def test_ranked_keep_is_the_compare_of_the_bit_patterns(d, pick, edge) -> None:
    v = magnitude_bits(d).to(torch.int64)
    above, not_above = sorted(int(v.flatten()[p % d.numel()]) for p in pick)
    if edge is not None:
        above = edge
    keep, ties = fused.ranked_keep(d, above, not_above)
    assert torch.equal(torch.from_numpy(keep).view(d.shape), (v > above) & (v <= not_above))
    assert ties == int((v == above).sum())
    keep, _ = fused.ranked_keep(d, above, 1 << 32)
    assert torch.equal(torch.from_numpy(keep).view(d.shape), v > above)
    # the codes: 1 above, 2 a tie; settled, the first `quota` ties in flat order join those above, no
    # others (quota -1 .. ties + 1: none, some, every tie, and more than there are)
    codes, n = fused.ranked_codes(d, above)
    assert n == ties
    assert torch.equal(torch.from_numpy(codes.astype(np.int64)).view(d.shape),
                       (v > above).to(torch.int64) + 2 * (v == above).to(torch.int64))
    quota = pick[0] % (ties + 3) - 1
    settled = fused.settle_ties(codes, n, quota)
    assert settled.dtype == np.bool_ and set(np.unique(settled.view(np.uint8)).tolist()) <= {0, 1}
    tie_rank = torch.cumsum((v == above).flatten(), 0).view(v.shape)
    assert torch.equal(torch.from_numpy(settled).view(d.shape), (v > above) | ((v == above) & (tie_rank <= quota)))


def _merge(method: str, ctx, x: torch.Tensor, chunk_rows: int, remember: bool) -> tuple[torch.Tensor, Tally]:
    tally = Tally(x.shape[0])
    return run_chunked(method, ctx, x, chunk_rows, remember, tally), tally


@st.composite
def merges(draw):
    method = draw(st.sampled_from(FAMILY))
    n = draw(st.integers(2, 5))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    finite = st.floats(-4, 4, width=32)
    values = draw(st.lists(st.one_of(finite, finite, finite, VALUE), min_size=n * rows * cols,
                           max_size=n * rows * cols))
    params = [{}] + [{"weight": draw(WEIGHT), "density": draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0])),
                      **({"epsilon": 0.05} if method.startswith("della") else {})} for _ in range(n - 1)]
    if method.startswith("della"):
        for p in params[1:]:
            p["density"] = min(max(p["density"], 0.3), 0.9)
    names = {p.name for p in METHODS[method].params}
    shared = {"normalize": draw(st.booleans()), "lambda": draw(st.sampled_from([1.0, 0.5, -2.0]))}
    if "rescale" in names:
        shared["rescale"] = draw(st.booleans())
    ctx = context(method, params, shared, base=0, shape=(rows, cols), seed=draw(st.integers(0, 2**31)))
    x = torch.tensor(values, dtype=torch.float32).view(n, rows, cols)
    return method, ctx, x, draw(st.integers(1, rows)), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(case=merges())
def test_fused_merges_are_the_torch_merges(case) -> None:
    method, ctx, x, chunk_rows, remember = case
    assert fused.kernels() is not None
    _assert_torch_form_agrees(method, ctx, x, chunk_rows, remember, _merge(method, ctx, x, chunk_rows, remember))


def _bfloat16(x: torch.Tensor, patterns: list[int | None]) -> torch.Tensor:
    """x rounded to bfloat16, with any bit pattern (NaN payloads of either sign, subnormals) where
    `patterns` gives one."""
    words = x.to(torch.bfloat16).view(torch.int16).reshape(-1).numpy().view(np.uint16).copy()
    for k, w in enumerate(patterns[:words.size]):
        if w is not None:
            words[k] = w
    return torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).view(x.shape)


BF16_PATTERN = st.one_of(st.none(), st.none(), st.integers(0, 2**16 - 1),
                         st.sampled_from([0x7FC0, 0xFFC1, 0x7F81, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F]))


@settings(max_examples=100, deadline=None)
@given(x=rows_of_values(), base=rows_of_values(), rows=st.integers(1, 3), seed=st.integers(0, 2**31),
       start=st.one_of(st.just(0), st.integers(0, 2**34), st.integers(2**32 - 3000, 2**32 + 10)),
       density=st.floats(0.3, 0.9), epsilon=st.floats(0.01, 0.25), zero_all=st.booleans(),
       narrow=st.booleans(), patterns=st.lists(BF16_PATTERN, max_size=40))
def test_della_masks_and_sums_are_the_torch_and_reference_ones(x, base, rows, seed, start, density, epsilon,
                                                               zero_all, narrow, patterns) -> None:
    """DELLA's compiled loop (a radix sort of each row's |δ| bit patterns for the ranks, then the
    draws) keeps exactly the elements torch's stable argsort form keeps, on rows of ties, NaNs of
    any payload, infinities and signed zeros, across a 2^32 block boundary too, from δ or from the
    inputs as read (float32 or bfloat16); from index 0 the plain-numpy reference's mask; and its
    statistics pass's row sums are RandomDrop.observe's."""
    epsilon = min(epsilon, density - 0.01, 0.99 - density)
    base = base.repeat(1, x.shape[1] // base.shape[1] + 1)[:, :x.shape[1]]
    x, base = x.repeat(rows, 1).contiguous(), base.repeat(rows, 1).contiguous()
    if narrow:
        x, base = _bfloat16(x, patterns), _bfloat16(base, patterns[::-1])
    cols = x.shape[1]
    if cols < 2 and not zero_all:
        return  # della_check refuses a row of one at plan time
    tensor = "model.layers.0.mlp.down_proj.weight"
    key = rng.stream_key(seed, 2, tensor)
    sp = RankedDrop(0.0 if zero_all else density, epsilon, key, True, cols, True)
    delta = x.float() - base.float()
    made = fused.della_keep(x, key, start, cols, sp._prob(), base, sums=True)
    assert made is not None
    keep, total, kept = made
    from_delta = fused.della_keep(delta, key, start, cols, sp._prob())
    assert from_delta is not None and np.array_equal(from_delta[0], keep)
    fused._use["on"] = False
    try:
        want = sp._draw(delta.clone(), start)  # the torch form
    finally:
        fused._use["on"] = True
    assert torch.equal(torch.from_numpy(keep).view(x.shape), want)
    if start == 0 and not zero_all:
        assert np.array_equal(keep.reshape(x.shape), della_keep(delta.numpy(), density, epsilon, seed, 2, tensor))
    mag = delta.abs()
    for got, w in ((total, tree_row_sums(mag)), (kept, tree_row_sums(mag * want))):
        assert torch.equal(got.isnan(), w.isnan()) and torch.equal(got[~w.isnan()], w[~w.isnan()])


@st.composite
def rows_differing_in_one_byte(draw):
    """A float32 row of few bit patterns that differ from one another in one or two bytes only: the
    bits that the sort's narrowing (less the smallest, past the low bits zero in all) must keep."""
    n = draw(st.integers(2, 600))
    word = draw(st.integers(0, 2**31 - 1))
    shifts = draw(st.lists(st.sampled_from([0, 8, 16, 24]), min_size=1, max_size=2))
    pool = [word]
    for _ in range(draw(st.integers(1, 3))):
        w = word
        for s in shifts:
            w = (w & ~(0xFF << s)) | (draw(st.integers(0, 255)) << s)
        pool.append(w)
    words = np.array([pool[draw(st.integers(0, len(pool) - 1))] for _ in range(n)], dtype=np.uint32)
    return torch.from_numpy(words.view(np.float32).copy()).view(1, n)


@settings(max_examples=60, deadline=None)
@given(d=st.one_of(rows_of_values(), rows_differing_in_one_byte()), rows=st.integers(1, 2))
def test_della_ranks_are_the_stable_argsort_ranks(d, rows) -> None:
    """The ranks themselves, which a draw reveals only where it falls between two neighbouring
    probabilities: with the probability table 1 from rank t on (a draw is below 1) and 0 before, the
    loop keeps the elements ranked t or above, so the counts over every t are the ranks — those of
    numpy's stable argsort of |δ| in float32 (every NaN after +inf, in index order)."""
    d = d.repeat(rows, 1).contiguous()
    n = d.shape[1]
    ranks = np.zeros(d.numel(), dtype=np.int64)
    for t in range(1, n):
        made = fused.della_keep(d, 5, 0, n, (np.arange(n) >= t).astype(np.float64))
        assert made is not None
        ranks += made[0]
    mag = np.abs(d.numpy())
    want = np.argsort(np.argsort(mag, axis=1, kind="stable"), axis=1, kind="stable")
    assert np.array_equal(ranks.reshape(d.shape), want)


@settings(max_examples=200, deadline=None)
@given(case=merges(), patterns=st.lists(BF16_PATTERN, max_size=210))
def test_bfloat16_rows_as_read_merge_as_widened_ones(case, patterns) -> None:
    """An op given bfloat16 rows as read (MergeOp.takes_raw: DARE's sums and apply, TIES's radix
    passes) widens each element as its compiled loops load it: the same output bits and report
    counts as the torch forms on the rows widened to float32 first — and it takes them so in as
    many passes as its Cost says (budget.block_dtype keeps the block bfloat16 on that count)."""
    method, ctx, x, chunk_rows, remember = case
    xb = _bfloat16(x, patterns)
    taken: list[int] = []
    tally = Tally(x.shape[0])
    got = run_chunked(method, ctx, xb, chunk_rows, remember, tally, taken)
    assert len(set(taken)) == len(taken) == METHODS[method].cost(ctx).raw_passes, (method, taken)
    _assert_torch_form_agrees(method, ctx, xb.float(), chunk_rows, remember, (got, tally))


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 700), chunk_rows=st.integers(1, 5), t=st.floats(0, 1),
       patterns=st.lists(BF16_PATTERN, max_size=300), seed=st.integers(0, 2**31))
def test_slerp_sums_of_bfloat16_rows_as_read(rows, cols, chunk_rows, t, patterns, seed) -> None:
    """SLERP's statistics pass and its apply pass take bfloat16 rows as read (the sums' loop, then
    weighted_pair): the norms, the dot product and the output are those of the torch form on rows
    widened first."""
    g = torch.Generator().manual_seed(seed)
    xb = _bfloat16(torch.randn(2, rows, cols, generator=g) * 3, patterns)
    ctx = context("slerp", [{}, {}], {"t": t}, base=0, shape=(rows, cols))
    taken: list[int] = []
    got = run_chunked("slerp", ctx, xb, min(chunk_rows, rows), raw=taken)
    assert taken == [0, 1] and METHODS["slerp"].cost(ctx).raw_passes == 2
    with without_loops():
        plain = run_chunked("slerp", ctx, xb.float(), min(chunk_rows, rows))
    assert torch.equal(bits(quiet(got)), bits(quiet(plain)))


@settings(max_examples=100, deadline=None)
@given(x=rows_of_values(), y=rows_of_values(), c=st.tuples(COEFFICIENT, COEFFICIENT), narrow=st.booleans(),
       patterns=st.lists(BF16_PATTERN, max_size=40))
def test_weighted_pair_is_torchs_two_products_and_their_sum(x, y, c, narrow, patterns) -> None:
    """SLERP's apply loop gives, bit for bit, torch's (a·c0).add_(b·c1) on float32 rows (bfloat16's
    widened first), whatever the values (infinities, subnormals, ±0; NaN as NaN) and coefficients."""
    a, b = x[:, :y.shape[1]], y[:x.shape[0], :x.shape[1]]
    if narrow:
        a, b = _bfloat16(torch.stack([a, b]), patterns)
    want = (a.float() * c[0]).add_(b.float() * c[1])
    got = fused.weighted_pair(a.contiguous(), b.contiguous(), *c)
    assert got is not None and got.dtype == torch.float32
    assert torch.equal(bits(quiet(got)), bits(quiet(want)))
    # and cast to bfloat16 in the same loop, as the output is written: torch's cast's bits
    narrowed = fused.weighted_pair(a.contiguous(), b.contiguous(), *c, torch.bfloat16)
    assert narrowed is not None and narrowed.dtype == torch.bfloat16
    assert torch.equal(quiet(narrowed).view(torch.int16), quiet(want.bfloat16()).view(torch.int16))


needs_fused_add = pytest.mark.skipif(bool(fused.add_unfused()), reason="this machine's torch rounds a product "
                                     "before adding it; linear's loop is not used here (test_linear_loop_only_"
                                     "where_torch_fuses)")


@needs_fused_add
@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 5), rows=st.integers(1, 4), cols=st.one_of(st.integers(1, 40), st.integers(1000, 2100)),
       chunk_rows=st.integers(1, 4), weights=st.lists(WEIGHT, min_size=5, max_size=5), normalize=st.booleans(),
       narrow=st.booleans(), patterns=st.lists(BF16_PATTERN, max_size=300), seed=st.integers(0, 2**31))
def test_linear_loop_is_torchs_form(n, rows, cols, chunk_rows, weights, normalize, narrow, patterns, seed) -> None:
    """Linear's apply pass takes bfloat16 rows as read and sums them in one loop (fused.linear_sum):
    the bits of its torch form, a sum of zeros and one add_(x_i, alpha=w_i) per input (the rows
    widened first), divided by the weight sum where `normalize` asks and it is not 1, whatever the
    values, weights and chunking; tiles of the loop's 1024 elements are crossed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rows, cols, generator=g) * 3
    x = _bfloat16(x, patterns) if narrow else x
    ctx = context("linear", [{"weight": w} for w in weights[:n]], {"normalize": normalize}, shape=(rows, cols))
    taken: list[int] = []
    got = run_chunked("linear", ctx, x, min(chunk_rows, rows), raw=taken)
    assert taken == ([0] if narrow else []) and METHODS["linear"].cost(ctx).raw_passes == 1
    with without_loops():
        plain = run_chunked("linear", ctx, x.float(), min(chunk_rows, rows))
    assert torch.equal(bits(quiet(got)), bits(quiet(plain)))


@needs_fused_add
@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 4), rows=st.integers(1, 3), extra=st.integers(0, 3),
       weights=st.lists(WEIGHT, min_size=4, max_size=4), divisor=st.one_of(st.none(), WEIGHT),
       narrow=st.booleans(), patterns=st.lists(BF16_PATTERN, max_size=60))
def test_linear_sum_of_a_blocks_rows_is_torchs_fused_adds(data, n, rows, extra, weights, divisor, narrow,
                                                         patterns) -> None:
    """fused.linear_sum on a sub-chunk of a block (each input's rows one run, the inputs a block's rows
    apart) gives torch's form's bits in float32 and cast to bfloat16 in the same loop, on values of
    every kind (infinities, subnormals, ±0; NaN as NaN), any weights and divisor."""
    cols = data.draw(st.integers(1, 1300))
    block = torch.stack([torch.cat([data.draw(rows_of_values()).repeat(1, cols)[:, :cols]
                                    for _ in range(rows + extra)]) for _ in range(n)])
    block = _bfloat16(block, patterns) if narrow else block
    first = data.draw(st.integers(0, extra))
    x = block[:, first:first + rows]
    assert n == 1 or not x.is_contiguous() or extra == 0
    w = np.array(weights[:n], dtype=np.float32)
    acc = torch.zeros(rows, cols)
    for i in range(n):
        acc.add_(x[i].float(), alpha=float(w[i]))
    if divisor is not None:
        acc /= torch.tensor(divisor, dtype=torch.float32)
    for dtype in fused.LOADED:
        got = fused.linear_sum(x, w, divisor, dtype)
        assert got is not None and got.dtype == dtype and got.shape == (rows, cols)
        want = acc.to(dtype)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(quiet(got).view(torch.int16), quiet(want).view(torch.int16))


_UNFUSED_SCRIPT = r"""
import json, sys
sys.path[:0] = sys.argv[1:2]
from test_all_methods import config_text
from streammerge.budget import kernel_forms, loops_for
from streammerge.config import parse_config
from streammerge.methods import fused
from streammerge.planner import make_plan
plan = make_plan(parse_config(open(sys.argv[2]).read()))
print(json.dumps({"why": fused.add_unfused(), "loops": loops_for(plan), "forms": kernel_forms(plan)}))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="torch's baseline kernels are asked for by ATEN_CPU_CAPABILITY on x86 only")
def test_linear_loop_only_where_torch_fuses(tiny_set, tmp_path) -> None:
    """Where torch's kernels round each product before adding it (x86 without AVX2, here asked for by
    ATEN_CPU_CAPABILITY=default), linear's loop would write other bytes than torch's forms, and so
    other bytes at a budget too small for the loops: the loops are not chosen, even when
    STREAMMERGE_JIT=1 asks for them, and `streammerge plan` says why. Where torch fuses (this
    machine's own kernels), the same merge takes them."""
    import json
    import os
    import subprocess
    import sys

    from test_all_methods import config_text

    config = tmp_path / "linear.yml"
    config.write_text(config_text("linear", tiny_set))
    seen = {}
    for capability in ("default", ""):
        env = dict(os.environ, STREAMMERGE_JIT="1", ATEN_CPU_CAPABILITY=capability)
        got = subprocess.run([sys.executable, "-c", _UNFUSED_SCRIPT, os.path.dirname(__file__), str(config)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stderr[-3000:]
        seen[capability] = json.loads(got.stdout.strip().splitlines()[-1])
    unfused = seen["default"]
    assert "rounds a product before adding it" in unfused["why"] and "DEFAULT" in unfused["why"]
    assert unfused["loops"] is False and unfused["forms"] == [False, "torch's forms: " + unfused["why"]]
    native = seen[""]
    assert native["why"] == "" and native["loops"] is True and native["forms"][0] is True


# float32 patterns at bfloat16's rounding edges: ties to even both ways, the largest finite rounding
# up to Inf, subnormals, and NaNs whose payload is in the low half only (which the plain rounding
# carries into Inf, or into -0 from 0x7FFFFFFF)
ROUNDING_EDGES = [0x3F808000, 0x3F818000, 0xBF808000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F8000,
                  0x7F7F7FFF, 0x00008000, 0x00018000, 0x80007FFF, 0x00000001, 0x7F800001, 0x7FFFFFFF,
                  0xFF800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x80000000, 0]


@settings(max_examples=100, deadline=None)
@given(patterns=st.lists(st.one_of(st.sampled_from(ROUNDING_EDGES), st.integers(0, 2**32 - 1)), min_size=1,
                         max_size=200))
def test_weighted_pair_rounds_to_bfloat16_as_torch_casts(patterns) -> None:
    """The loop's bfloat16 output is torch's cast of the float32 sum: to nearest, ties to even,
    overflow to Inf, subnormals kept; every NaN a NaN (the committer writes one quiet NaN for all)."""
    a = torch.tensor(np.array(patterns, dtype=np.uint32).view(np.int32)).view(torch.float32)[None]
    zero = torch.zeros_like(a)
    for c in ((1.0, 0.0), (0.5, 0.0), (1.0, 1.0)):
        want = (a * c[0]).add_(zero * c[1]).bfloat16()
        got = fused.weighted_pair(a, zero, *c, torch.bfloat16)
        assert got is not None
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(quiet(got).view(torch.int16), quiet(want).view(torch.int16))


@settings(max_examples=8, deadline=None)
@given(method=st.sampled_from(["ties", "dare_ties", "breadcrumbs_ties"]), rows=st.integers(1, 7),
       cols=st.integers(500, 1300), chunk_rows=st.integers(1, 7), seed=st.integers(0, 2**31))
def test_fused_tallies_of_rows_across_tiles(method, rows, cols, chunk_rows, seed) -> None:
    """The loop's agreement tallies where a picked row spans the loop's 512-element tiles (the rows
    of test_fused_merges_are_the_torch_merges are shorter than a tile)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, rows, cols, generator=g)
    params = [{}] + [{"weight": 0.7, "density": 0.5}, {"weight": -0.4, "density": 0.3}]
    ctx = context(method, params, {"normalize": True}, base=0, shape=(rows, cols), seed=seed)
    _assert_torch_form_agrees(method, ctx, x, min(chunk_rows, rows), True,
                              _merge(method, ctx, x, min(chunk_rows, rows), True))


def _assert_torch_form_agrees(method: str, ctx, x: torch.Tensor, chunk_rows: int, remember: bool,
                              fused_merge: tuple[torch.Tensor, Tally]) -> None:
    """The merge without numba (the torch forms) gives fused_merge's output and report counts."""
    fast, fast_tally = fused_merge
    with without_loops():
        plain, plain_tally = _merge(method, ctx, x, chunk_rows, remember)
    # the output's NaNs are written as one quiet NaN (committer.output_rows): their sign and payload
    # follow the order of an addition's operands, which the compiler may choose
    assert torch.equal(bits(quiet(fast)), bits(quiet(plain))), method
    for counts in ("seen", "kept", "nonzero", "agree"):
        assert getattr(fast_tally, counts) == getattr(plain_tally, counts), (method, counts)


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(["dare_ties", "dare_linear"]), n=st.integers(2, 4), rows=st.integers(1, 9),
       cols=st.sampled_from([1, 5, 8, 16, 100, 128, 520]), chunk_rows=st.integers(1, 9),
       density=st.sampled_from([0.1, 0.5, 0.9]), seed=st.integers(0, 2**31))
def test_kept_masks_reach_the_compiled_apply_as_bits(method, n, rows, cols, chunk_rows, density, seed) -> None:
    """DARE's masks kept bit-packed between passes go to the compiled apply as those bits, unpacked
    there a tile (512 elements) at a time, where the report's kept elements of its picked rows are
    counted too: the same output and counts as the torch form, which unpacks each mask whole. Rows
    of 520 put tiles across rows and a partial byte at a chunk's end; rows of 8 and 16 are whole
    bytes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rows, cols, generator=g)
    params = [{}] + [{"weight": 0.7, "density": density} for _ in range(n - 1)]
    ctx = context(method, params, {"rescale": True}, base=0, shape=(rows, cols), seed=seed)
    got_bits = []
    task_apply = fused.task_apply

    def spy(x, base, others, keeps, *args, **kwargs):
        got_bits.append(all(isinstance(k, np.ndarray) for k in keeps))
        return task_apply(x, base, others, keeps, *args, **kwargs)

    fused.task_apply = spy
    try:
        fast = _merge(method, ctx, x, chunk_rows, True)
    finally:
        fused.task_apply = task_apply
    assert got_bits and all(got_bits)
    _assert_torch_form_agrees(method, ctx, x, chunk_rows, True, fast)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 4), rows=st.integers(1, 5), cols=st.sampled_from([1, 7, 300, 513, 1100]),
       start=st.one_of(st.integers(0, 2**34), st.integers(2**32 - 2000, 2**32 + 10)), key=KEY,
       densities=st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=3, max_size=3),
       consensus=st.booleans(), narrow=st.booleans(), pick=st.tuples(st.integers(0, 4), st.integers(1, 3)),
       seed=st.integers(0, 2**31))
def test_masks_drawn_in_the_apply_loop_are_bernoullis(n, rows, cols, start, key, densities, consensus, narrow,
                                                      pick, seed) -> None:
    """A Draw (DARE's mask where none was kept) is drawn in task_apply's loop a tile at a time: the same
    output as the bool masks of the numpy draws (rng's form without numba), across 512-element tiles,
    rows and a 2^32 block's edge (a new key), and the report's kept count of the picked rows is the
    masks' set bits there; the agreement counts are those of the bool masks' call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rows, cols, generator=g)
    if narrow:
        x = x.to(torch.bfloat16)
    others = list(range(1, n))
    keys = [key + 7919 * j for j in others]
    thresholds = [keep_threshold(densities[j - 1]) for j in others]
    with without_loops():  # rng.bernoulli_mask's numpy form: the reference draws
        bools = [bernoulli_mask(k, start, rows * cols, densities[j - 1]).view(rows, cols)
                 for j, k in zip(others, keys)]
    picked = slice(min(pick[0], rows - 1), rows, pick[1])
    scales, weights = [0.7, -1.3, 2.0][:n - 1], [0.5, 0.25, 1.0][:n - 1]
    args = (scales, weights, False, consensus, True, 1.0, 1.0, picked)
    want_tally = np.zeros((3, n - 1), dtype=np.int64)
    want = fused.task_apply(x, 0, others, bools, *args, want_tally, start=start)
    got_tally = np.zeros((3, n - 1), dtype=np.int64)
    draws = [fused.Draw(k, t) for k, t in zip(keys, thresholds)]
    got = fused.task_apply(x, 0, others, draws, *args, got_tally, start=start)
    assert torch.equal(bits(quiet(got)), bits(quiet(want)))
    assert np.array_equal(got_tally[:2], want_tally[:2])
    assert got_tally[2].tolist() == [int(b[picked].sum()) for b in bools]
    assert want_tally[2].tolist() == [0] * (n - 1)  # bool masks are counted by the caller, not the loop


def test_a_bernoulli_mask_on_the_cpu_takes_the_compiled_loop(monkeypatch) -> None:
    expected = torch.from_numpy(_hash32_numpy(12345, 2**32 - 100, 1000) < np.uint32(keep_threshold(0.4)))

    def refuse(*args, **kwargs):
        raise AssertionError("the numpy form ran")

    monkeypatch.setattr(rng, "_hash32_numpy", refuse)
    keep = bernoulli_mask(12345, 2**32 - 100, 1000, 0.4)
    assert torch.equal(keep, expected)
    assert 300 < int(keep.sum()) < 500


@pytest.mark.parametrize("method", FAMILY)
def test_the_base_alone_merges_to_itself_in_both_forms(method) -> None:
    """models: [the base] — no δ to sum, elect or count (the report's tally once crashed on it)."""
    x = torch.randn(1, 4, 3)
    ctx = context(method, [{}], {}, base=0, shape=(4, 3))
    jit = fused._state["jit"]
    for form in (jit, None):
        fused._state["jit"] = form
        try:
            assert torch.equal(run_chunked(method, ctx, x, 3, tally=Tally(1)), x[0])
        finally:
            fused._state["jit"] = jit


@pytest.mark.parametrize("method", ["dare_ties", "linear"])
def test_a_small_merge_runs_the_torch_forms_to_the_same_bytes(tiny_set, tmp_path, monkeypatch, method) -> None:
    """Loading numba and the kernels costs about a second: a merge too small to repay it runs the
    torch forms unless STREAMMERGE_JIT=1 asks for the loops; the bytes are the same (linear's loop
    only where this machine's torch fuses as it does: fused.add_unfused)."""
    from test_all_methods import config_text

    import streammerge
    from streammerge.budget import jit_work
    from streammerge.config import parse_config
    from streammerge.planner import make_plan

    least = METHODS[method].jit_min_work
    config = tmp_path / f"{method}.yml"
    config.write_text(config_text(method, tiny_set))
    assert jit_work(make_plan(parse_config(config.read_text()))) < least
    digests, used = {}, {}
    for mode in ("", "1", "0"):
        monkeypatch.setenv("STREAMMERGE_JIT", mode)
        out = str(tmp_path / f"out{mode}")
        streammerge.merge(str(config), out, max_memory=ROOMY)
        used[mode] = fused.loaded() is not None
        digests[mode] = output_digest(out)["shards"]
    assert used == {"": False, "1": not METHODS[method].jit_mismatch(), "0": False}
    assert digests[""] == digests["1"] == digests["0"]
    monkeypatch.setenv("STREAMMERGE_JIT", "")
    assert fused.use_for(least, least) and not fused.use_for(least - 1, least)


@pytest.mark.parametrize("method", ["slerp", "task_arithmetic", "ties", "dare_ties"])
def test_each_method_loads_the_loops_from_its_own_least_work(tiny_set, monkeypatch, method) -> None:
    """Whether a merge takes the compiled loops is its method's jit_min_work against the plan's
    element-inputs (SLERP's and task arithmetic's loops save less, so they ask for more than the
    family default), and `streammerge plan` names the figure it compared."""
    import dataclasses

    from test_all_methods import config_text

    from streammerge.budget import jit_work, kernel_forms, loops_for
    from streammerge.config import parse_config
    from streammerge.methods import METHODS
    from streammerge.planner import make_plan

    monkeypatch.setenv("STREAMMERGE_JIT", "")
    least = METHODS[method].jit_min_work
    assert least == (fused.MIN_WORK if method in ("ties", "dare_ties") else
                     fused.SLIM_WORK if method == "slerp" else fused.SUM_WORK)
    plan = make_plan(parse_config(config_text(method, tiny_set)))
    work = jit_work(plan)
    for threshold, takes in ((work, True), (work + 1, False)):
        at = dataclasses.replace(plan, method=dataclasses.replace(plan.method, jit_min_work=threshold))
        assert loops_for(at) is takes
        used, why = kernel_forms(at)
        assert used is takes and f"{threshold / 1e6:,.0f}M" in why
    assert loops_for(plan) is (work >= least)


@settings(max_examples=60, deadline=None)
@given(cols=st.one_of(st.integers(1, 40), st.integers(41, 2100)), rows=st.integers(1, 4), seed=st.integers(0, 2**31),
       spread=st.integers(0, 30))
def test_tree_sums_add_in_the_trees_order(cols, rows, seed, spread) -> None:
    """The compiled tree sums (tree_rows, and product_sums' and slerp_sums' sums of products) add in
    tree_row_sums' order bit for bit on values whose sums depend on the order: many distinct
    values, magnitudes up to 2^spread apart — where the few repeated values of rows_of_values
    often sum the same in any order. Fails for a loop that adds the right values in another tree."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(0, spread + 1, (rows, cols), generator=g).float())
    x = torch.randn(rows, cols, generator=g) * scale
    y = torch.randn(rows, cols, generator=g)
    got = fused.tree_sums(x)
    assert got is not None and torch.equal(got, tree_row_sums(x))
    assert torch.equal(fused.tree_sums(x.double()), tree_row_sums(x.double()))
    sums = fused.slerp_sums(x, y)
    for k, (p, q) in enumerate(((x, x), (y, y), (x, y))):
        assert torch.equal(sums[k], tree_row_sums(p * q))


@settings(max_examples=50, deadline=None)
@given(a=rows_of_values(), b=rows_of_values(), rows=st.integers(1, 3))
def test_slerp_sums_are_the_torch_statistics_pass(a, b, rows) -> None:
    """SLERP's compiled statistics loop gives the float64 row sums of a·a, b·b and a·b that the torch
    form's float32 products and tree_row_sums give (and the plain-Python pairwise reference), NaN
    where theirs is NaN, on values of every kind: infinities, signed zeros, subnormals."""
    b = b.repeat(1, a.shape[1] // b.shape[1] + 1)[:, :a.shape[1]]
    a, b = a.repeat(rows, 1).contiguous(), b.repeat(rows, 1).contiguous()
    got = fused.slerp_sums(a, b)
    for k, (p, q) in enumerate(((a, a), (b, b), (a, b))):
        prod = p * q
        want = tree_row_sums(prod)
        ref = torch.tensor([pairwise_sum([float(v) for v in r]) for r in prod.double().tolist()], dtype=torch.float64)
        for w in (want, ref):
            assert torch.equal(got[k].isnan(), w.isnan()) and torch.equal(got[k][~w.isnan()], w[~w.isnan()])


@settings(max_examples=50, deadline=None)
@given(data=st.data(), n=st.integers(1, 3), rows=st.integers(1, 3), with_base=st.booleans())
def test_report_sums_are_the_products_summed_in_the_tree(data, n, rows, with_base) -> None:
    """The report's per-row figures from one compiled loop: Σx_i², Σ(x_i − x_base)², Σx_i·out and
    Σout², each the plain-Python pairwise sum of the float32 products (and the torch form's), NaN
    where it is NaN, on values of every kind."""
    first = data.draw(rows_of_values())
    cols = first.shape[1]

    def like(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(1, cols // t.shape[1] + 1)[:, :cols]

    x = torch.stack([torch.cat([like(data.draw(rows_of_values())) for _ in range(rows)]) for _ in range(n)])
    x[0, 0] = first[0]
    y = torch.cat([like(data.draw(rows_of_values())) for _ in range(rows)])
    base = data.draw(st.integers(0, n - 1)) if with_base else None
    got = fused.product_sums(x, y, base)
    assert got is not None
    stats = TensorStats(n, rows, base)
    products = [x[i] * x[i] for i in range(n)]
    if base is not None:
        products += [(x[i] - x[base]) * (x[i] - x[base]) for i in range(n)]
    products += [x[i] * y for i in range(n)] + [y * y]
    with np.errstate(all="ignore"):
        ref = np.array([[pairwise_sum([float(v) for v in r]) for r in p.double().tolist()] for p in products])
    for want in (ref, stats._torch_sums(x, y)):
        assert want.shape == got.shape
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[~np.isnan(want)],
                                                                                  want[~np.isnan(want)])


# run in a fresh process (numba's loaded forms are the process's): merges of each case's methods on a
# bfloat16 and a float32 tiny set with the loops on; prints the kernels' forms after the run's
# fused.warm and after every merge
_FORMS_SCRIPT = r"""
import json, os, sys
sys.path[:0] = sys.argv[1:3]
import torch, make_models, streammerge
from test_all_methods import config_text
from streammerge.methods import fused

def forms():
    jit = fused._state.get("jit")
    return {n: sorted(map(str, d.signatures)) for n, d in vars(jit).items() if hasattr(d, "signatures")}

warmed = {}
real = fused.warm
def warm(group):
    real(group)
    warmed[group] = forms()
fused.warm = warm
root = sys.argv[3]
for dt in (torch.bfloat16, torch.float32):
    folders = [os.path.join(root, f"{dt}".split(".")[1], n) for n in ("base", "ft1", "ft2", "ft3")]
    make_models.write_set(folders, make_models.PRESETS["tiny"], seed=3, dtype=dt)
    for method in sys.argv[4].split(","):
        config = os.path.join(root, f"{method}.yml")
        with open(config, "w") as f:
            f.write(config_text(method, folders))
        streammerge.merge(config, os.path.join(root, f"out-{method}-{dt}"), max_memory=1 << 30)
print(json.dumps({"warmed": warmed, "after": forms()}))
"""


@pytest.mark.parametrize("group, methods", [
    ("slerp", "slerp"),
    ("linear", "linear"),
    ("family", "task_arithmetic,ties,dare_ties,dare_linear,della,breadcrumbs_ties"),
])
def test_warm_loads_every_kernel_form_a_merge_calls_and_no_other_group(group, methods, tmp_path) -> None:
    """A merge's fused.warm (its method's group of kernels) loads every compiled form the merges
    then call, for bfloat16 and float32 models (so the memory they hold is in the baseline the
    budget is measured from), and no kernel of the other method group (loading each costs time)."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    tools = os.path.join(here, "..", "tools")
    env = dict(os.environ, STREAMMERGE_JIT="1")
    got = subprocess.run([sys.executable, "-c", _FORMS_SCRIPT, here, tools, str(tmp_path), methods], env=env,
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    seen = json.loads(got.stdout.strip().splitlines()[-1])
    assert list(seen["warmed"]) == [group]  # once, for the first merge: the others found it loaded
    warmed, after = seen["warmed"][group], seen["after"]
    assert after == warmed  # nothing loaded during the merges
    loaded = {name for name, sigs in warmed.items() if sigs}
    assert {"tree_rows", "product_sums"} <= loaded
    assert ("weighted_pair" in loaded) is (group == "slerp")
    assert ("linear_sum" in loaded) is (group == "linear")
    assert ({"task_apply", "dare_sums", "bernoulli"} <= loaded) is (group == "family")
    assert all(len(warmed[k]) >= 2 for k in ("tree_rows", "product_sums"))  # float32 and float64 / bfloat16


_COLLECTOR_SCRIPT = r"""
import gc, json
from streammerge.methods.fused import collector_off

seen = []
gc.callbacks.append(lambda phase, info: seen.append(info["generation"]) if phase == "start" else None)
out = {}
assert gc.isenabled()
with collector_off():
    out["inside_enabled"] = gc.isenabled()
    made = [[i] for i in range(100_000)]  # far past the young generation's threshold
    out["collections_inside"] = len(seen)
out["after_enabled"] = gc.isenabled()
out["frozen_unfrozen_process"] = gc.get_freeze_count()
gc.freeze()  # a process that freezes what lives as long as it, as the CLI does
before = gc.get_freeze_count()
with collector_off():
    made2 = [[i] for i in range(1000)]
out["frozen_grew"] = gc.get_freeze_count() - before
import weakref

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle, as an earlier pipeline stage's reader and its thread make
gc.collect()  # it survives a full collection: oldest generation, which only a full one looks at
alive = weakref.ref(a)
del a, b
with collector_off():
    pass
out["old_cycle_freed"] = alive() is None  # collected before the freeze, not frozen for good
gc.disable()
with collector_off():
    pass
out["disabled_stays"] = not gc.isenabled()
print(json.dumps(out))
"""


def test_the_collector_is_held_off_while_numba_loads_and_left_as_it_was() -> None:
    """fused.collector_off (around numba's import and the kernels' warm): no collection inside,
    the collector as it was after (off stays off); what was made inside is frozen only in a
    process that freezes (the CLI), never in one that does not (a program calling the API); and
    before it freezes, garbage is collected, so no dead cycle is frozen for good."""
    import json
    import subprocess
    import sys

    got = subprocess.run([sys.executable, "-c", _COLLECTOR_SCRIPT], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    out = json.loads(got.stdout.strip().splitlines()[-1])
    assert out == {"inside_enabled": False, "collections_inside": 0, "after_enabled": True,
                   "frozen_unfrozen_process": 0, "frozen_grew": out["frozen_grew"], "old_cycle_freed": True,
                   "disabled_stays": True}
    assert out["frozen_grew"] >= 1000  # the lists made inside, at least


# A merge's warm in a fresh process whose numba cache is the folder argv[1]: reports whether it ran
# a helper process, and what this process itself compiled (cache misses) and loaded (cache hits).
# argv[2]: "fail" makes the helper fail, "oom" makes it die of SIGKILL (as the OOM killer kills),
# "none" makes running one an error; argv[3], where given, is the memory cgroup's limit in bytes
# ("" for none), in place of this machine's.
_AHEAD_SCRIPT = r"""
import json, subprocess, sys, warnings
from streammerge import limits
from streammerge.methods import fused

real, helpers = subprocess.run, []
def run(cmd, *a, **k):
    helpers.append(cmd[-1])
    if sys.argv[2] == "none":
        raise AssertionError("a helper ran where the cache was marked")
    if sys.argv[2] == "fail":
        cmd = [cmd[0], "-c", "import sys; sys.exit('no room')"]
    if sys.argv[2] == "oom":
        cmd = [cmd[0], "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    return real(cmd, *a, **k)
subprocess.run = run
if len(sys.argv) > 3:
    limits.cgroup_memory = lambda: int(sys.argv[3]) if sys.argv[3] else None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fused.warm("slerp")
jit = fused._state["jit"]
disp = [] if jit is None else [d for d in vars(jit).values() if hasattr(d, "stats")]
print(json.dumps({
    "helpers": helpers,
    "misses": sum(sum(d.stats.cache_misses.values()) for d in disp),
    "hits": sum(sum(d.stats.cache_hits.values()) for d in disp),
    "loops": fused.kernels() is not None and fused.use_for(0, 0),
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
}))
"""


def _warm_in_fresh_process(cache: str, helper: str, *limit: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, STREAMMERGE_JIT="1", NUMBA_CACHE_DIR=cache)
    got = subprocess.run([sys.executable, "-c", _AHEAD_SCRIPT, cache, helper, *limit], env=env, capture_output=True,
                         text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    return json.loads(got.stdout.strip().splitlines()[-1])


def test_a_merge_never_compiles_the_loops_itself_a_helper_fills_the_cache_once(tmp_path) -> None:
    """With numba's cache empty (a first merge after an install), the kernels are compiled in a helper
    process and the merge's own process only loads them from the cache: compiling holds LLVM's memory
    for good (272 MiB more than loading them, in a merge), which the budget then counted as the
    process's and refused the 512 MiB every later run merged in. The next merge finds the cache
    marked and runs no helper."""
    cache = str(tmp_path / "numba-cache")
    first = _warm_in_fresh_process(cache, "compile")
    assert first["helpers"] == ["slerp"] and first["loops"] and not first["warnings"]
    assert first["misses"] == 0 and first["hits"] > 0  # every kernel this process runs came from the cache
    second = _warm_in_fresh_process(cache, "none")
    assert second["helpers"] == [] and second["misses"] == 0 and second["hits"] == first["hits"]


def test_a_helper_that_fails_leaves_the_merge_on_torchs_forms_with_a_warning(tmp_path) -> None:
    """Where the helper cannot compile (killed by a memory cap that holds the merge but not both, or
    numba failing), the merge goes on without the loops, saying so, and compiles nothing itself."""
    got = _warm_in_fresh_process(str(tmp_path / "numba-cache"), "fail")
    assert got["helpers"] == ["slerp"] and not got["loops"] and got["misses"] == 0
    assert len(got["warnings"]) == 1 and got["warnings"][0].startswith("KernelWarning: ")
    assert "no room" in got["warnings"][0] and "torch's forms" in got["warnings"][0]


def test_a_helper_killed_under_a_memory_limit_is_not_started_again_under_it(tmp_path) -> None:
    """A helper killed for memory under a cgroup's limit would be killed again under that limit: it
    cost every later run its time (under a 400 MiB cap, 7 s of a 13 s 3-model TIES merge) before
    the torch forms ran. Under the same limit or a smaller one, no helper starts and the warning says
    what to do; a larger limit, or none, tries again."""
    cache = str(tmp_path / "numba-cache")
    mib = 1 << 20
    first = _warm_in_fresh_process(cache, "oom", str(400 * mib))
    assert first["helpers"] == ["slerp"] and not first["loops"]
    assert len(first["warnings"]) == 1 and "killed, out of memory most likely" in first["warnings"][0]
    for smaller in (400 * mib, 300 * mib):
        again = _warm_in_fresh_process(cache, "none", str(smaller))
        assert again["helpers"] == [] and not again["loops"] and again["misses"] == 0
        assert len(again["warnings"]) == 1 and "under a memory limit of 400.00 MiB" in again["warnings"][0]
        assert "torch's forms" in again["warnings"][0] and "a run with more memory" in again["warnings"][0]
    assert _warm_in_fresh_process(cache, "oom", "")["helpers"] == ["slerp"]  # no limit: tried again
    larger = _warm_in_fresh_process(cache, "compile", str(600 * mib))
    assert larger["helpers"] == ["slerp"] and larger["loops"] and not larger["warnings"]
    assert _warm_in_fresh_process(cache, "none", str(400 * mib))["loops"]  # compiled: the note is moot


def test_no_folder_to_cache_the_loops_in_runs_torchs_forms_with_a_warning(tiny_set, tmp_path) -> None:
    """An install numba finds no writable folder for (the package's folder read-only, HOME not
    writable, no NUMBA_CACHE_DIR: a container run as a user without a home) raised numba's
    RuntimeError out of the merge, a traceback; it now merges with torch's forms, the same bytes,
    and says how to give numba a folder."""
    import os
    import shutil
    import subprocess
    import sys

    from test_all_methods import config_text

    import streammerge

    here = os.path.dirname(os.path.dirname(os.path.abspath(streammerge.__file__)))
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(here, "streammerge"), pkg / "streammerge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "streammerge" / "methods" / "__pycache__").write_text("")  # a file: no folder can be made there
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # nor under it: the home and the user cache folder
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(pkg), HOME=str(blocked / "home"), XDG_CACHE_HOME=str(blocked / "cache"),
               PYTHONDONTWRITEBYTECODE="1", STREAMMERGE_JIT="1")
    config = tmp_path / "ties.yml"
    config.write_text(config_text("ties", tiny_set))
    got = subprocess.run([sys.executable, "-m", "streammerge", "run", str(config), str(tmp_path / "out"), "-q",
                          "--max-memory", "1GiB"], env=env, capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path))
    assert got.returncode == 0, got.stderr[-3000:]
    assert "Traceback" not in got.stderr
    assert "warning: numba cannot load streammerge's loops here" in got.stderr
    assert "NUMBA_CACHE_DIR" in got.stderr
    env.update(STREAMMERGE_JIT="0")
    ref = subprocess.run([sys.executable, "-m", "streammerge", "run", str(config), str(tmp_path / "ref"), "-q",
                          "--max-memory", "1GiB"], env=env, capture_output=True, text=True, timeout=600,
                         cwd=str(tmp_path))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "warning" not in ref.stderr
    assert output_digest(str(tmp_path / "out"))["shards"] == output_digest(str(tmp_path / "ref"))["shards"]


def test_the_first_merge_says_it_compiles_the_loops_and_the_next_does_not(tiny_set, tmp_path) -> None:
    """The helper's compiling takes 10-60 s before the first tensor: the run says why it waits, once."""
    import os
    import subprocess
    import sys

    from test_all_methods import config_text

    config = tmp_path / "slerp.yml"
    config.write_text(config_text("slerp", tiny_set))
    env = dict(os.environ, STREAMMERGE_JIT="1", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    said = []
    for run in ("first", "second"):
        got = subprocess.run([sys.executable, "-m", "streammerge", "run", str(config), str(tmp_path / run),
                              "--max-memory", "1GiB"], env=env, capture_output=True, text=True, timeout=600)
        assert got.returncode == 0, got.stderr[-3000:]
        said.append("compiling the merge's loops with numba" in got.stderr)
    assert said == [True, False]


def test_the_helper_never_writes_through_a_link_planted_at_its_mark(tmp_path) -> None:
    """The mark is an empty file made beside numba's cache: a symbolic link found in its place (to a
    file the user has) is not followed, and the file behind it keeps its bytes; the helper fails,
    which the merge survives on torch's forms (test above)."""
    import os
    import subprocess
    import sys

    victim = tmp_path / "yours.txt"
    victim.write_text("user data")
    code = (
        "import os, sys\n"
        "from streammerge.methods import fused\n"
        "fused.use_for(0, 0); fused.kernels()\n"
        "for g in ('slerp', 'sums'):\n"
        "    os.symlink(sys.argv[1], fused._mark(g))\n"
        "fused.compile_group('slerp')\n"
    )
    env = dict(os.environ, STREAMMERGE_JIT="1", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    got = subprocess.run([sys.executable, "-c", code, str(victim)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert got.returncode != 0 and "OSError" in got.stderr
    assert victim.read_text() == "user data"


# float64 row sums as RowSums sees them, and the values that make an exact sum hard: both zeros,
# subnormals, exponents far apart (cancellation, ties at half an ulp), and what the loop leaves to fsum
FSUM_VALUE = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-2.0**899, max_value=2.0**899),
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1.0, -1.0, 2.0**-53, 2.0**53, 1e16, -1e16, 2.0**899]),
    st.integers(-2**60, 2**60).map(lambda k: k * 2.0**-30),
)


@settings(max_examples=400, deadline=None)
@given(values=st.lists(FSUM_VALUE, max_size=60), cuts=st.lists(st.integers(0, 60), max_size=6),
       odd=st.sampled_from([None, float("inf"), float("-inf"), float("nan"), 2.0**900, -2.0**1000]))
@example(values=[-0.0, -0.0], cuts=[1], odd=None)
@example(values=[1.0, 2.0**-53, -1.0], cuts=[], odd=None)
@example(values=[2.0**53, 1.0, 2.0**-53 * 1.5], cuts=[1], odd=None)
def test_exact_partials_sum_as_fsum_does(values, cuts, odd) -> None:
    """RowSums sums its row sums as fused.exact_partials's few floats: math.fsum over the
    chunks' partials is math.fsum over the values, bit for bit (zeros' signs too), however the
    values are cut into chunks; where a chunk holds a value the loop leaves to fsum (not finite,
    or beyond _jit.PARTIALS_BIG) it says so, and the values themselves are added. Fails for a loop
    that rounds as it adds (a float64 running sum, Kahan's) or drops a sign."""
    import math

    from streammerge.methods.base import RowSums
    if odd is not None:
        values = values + [odd]
    bounds = sorted({0, len(values), *(c for c in cuts if c <= len(values))})
    chunks = [np.array(values[a:b], dtype=np.float64) for a, b in zip(bounds, bounds[1:])]
    parts: list[float] = []
    for c in chunks:
        p = fused.exact_partials(c)
        bad = any(not math.isfinite(v) or abs(v) >= 2.0**900 for v in c.tolist())
        assert (p is None) == bad
        if p is not None:
            assert len(p) <= max(1, len(c)) and len(p) <= fused.PARTIALS_MAX
        parts += c.tolist() if p is None else p
    try:
        want = math.fsum(values)
    except ValueError:  # +inf and -inf: exact_total's NaN
        want = math.nan
    try:
        got = math.fsum(parts)
    except ValueError:
        got = math.nan
    assert np.array(got).tobytes() == np.array(want).tobytes() or (math.isnan(got) and math.isnan(want))
    # and RowSums itself, through torch's float64 tensors, with the loops and without
    for loops in (True, False):
        with contextlib.nullcontext() if loops else without_loops():
            sums = RowSums()
            for c in chunks:
                sums.add(torch.from_numpy(c))
            total = sums.total()
            assert np.array(total).tobytes() == np.array(want).tobytes() or (math.isnan(total) and math.isnan(want))
