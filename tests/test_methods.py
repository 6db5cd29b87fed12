"""Merge kernels: SEMANTICS.md §9 reference vectors, and every method against the independent
float64 reference (tests/reference.py) on random tensors, for chunks of one row, an odd number
of rows and the whole tensor, with bit-identical results across chunk sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from helpers import context, run_chunked
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.methods.sparsify import _select_from_top

A = [[1, 2, 3], [4, 5, 6]]
B = [[2, 0, -1], [3, 7, 1]]
C = [[0.5, 1, 2], [3, 4, 5.5]]
E = [[1.5, -1, 2.5], [2, 6, 4]]
R0, R1, R2 = [[0, 0, 0], [0, 0, 0]], [[1, 0, 2], [0, 0, -1]], [[3, 0, 0], [4, 0, 1]]
dA = np.array([[0.5, -1.25, 2], [-0.125, 3, 0.75]])
dB = np.array([[-1.5, 0.25, 2.5], [1, -0.375, -2.25]])
dE = np.array([[0.3, 0.6, -0.9], [1.2, -1.5, 0.45]])
A2, B2, E2 = np.array(C) + dA, np.array(C) + dB, np.array(C) + dE


def t64(*xs: object) -> torch.Tensor:
    return torch.tensor(np.array(xs, dtype=np.float64))


def merged(method: str, xs: torch.Tensor, params: list[dict], shared: dict | None = None,
           base: int | None = None) -> np.ndarray:
    ctx = context(method, params, shared, base, shape=tuple(xs.shape[1:]))
    outs = [run_chunked(method, ctx, xs, rows) for rows in (1, xs.shape[1])]
    assert torch.equal(outs[0], outs[1])
    return outs[0].numpy()


VECTORS = [
    ("linear", [A, B], [{"weight": 0.3}, {"weight": 0.7}], {}, None, [[1.7, 0.6, 0.2], [3.3, 6.4, 2.5]]),
    ("linear", [A, B], [{"weight": 1}, {"weight": 2}], {"normalize": False}, None, [[5, 2, 1], [10, 19, 8]]),
    ("slerp", [A, B], [{}, {}], {"t": 0.3}, 0,
     [[1.40913976679, 1.4855809517, 1.89519678208], [3.97068583981, 6.04617489754, 4.78991750058]]),
    ("slerp", [A, B], [{}, {}], {"t": 0.3}, 1,
     [[1.81875559717, 0.666349290938, 0.256733460556], [3.56107000943, 6.8654065583, 2.74183834867]]),
    ("slerp", [A, (2 * np.array(A)).tolist()], [{}, {}], {"t": 0.25}, 0, [[1.25, 2.5, 3.75], [5, 6.25, 7.5]]),
    ("task_arithmetic", [C, A2, B2], [{}, {"weight": 0.5}, {"weight": 0.8}], {}, 0,
     [[-0.45, 0.575, 5], [3.7375, 5.2, 4.075]]),
    ("task_arithmetic", [C, A2, B2], [{}, {"weight": 0.5}, {"weight": 0.8}], {"normalize": True, "lambda": 0.5}, 0,
     [[0.134615384615, 0.836538461538, 3.15384615385], [3.28365384615, 4.46153846154, 4.95192307692]]),
    ("ties", [C, A2, B2], [{}, {"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.5}], {}, 0,
     [[-1, -0.25, 4.25], [3, 7, 3.25]]),
    ("ties", [C, A2, B2], [{}, {"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.5}], {}, 0,
     [[-1, -0.25, 4.15], [3, 7, 3.25]]),
    ("ties", [C, A2, B2], [{}, {"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.5}],
     {"normalize": False}, 0, [[0.05, 0.125, 4.15], [3, 6.1, 4.825]]),
    ("ties", [C, A2, B2], [{}, {"weight": 1, "density": 1.0}, {"weight": -1, "density": 1.0}], {}, 0,
     [[2.5, -0.5, 4.5], [1.875, 7.375, 8.5]]),
    ("ties", [C, A2, B2], [{}, {"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.34}], {"rescale": True}, 0,
     [[0.5, -0.525, 5.29236842105], [3, 7.66, 1.76973684211]]),
    ("breadcrumbs", [C, A2, B2], [{}, {"weight": 1, "density": 0.5, "gamma": 0.2},
                                  {"weight": 1, "density": 0.5, "gamma": 0.2}], {}, 0, [[-1, -0.25, 4], [4, 4, 4]]),
    ("breadcrumbs_ties", [C, A2, B2], [{}, {"weight": 1, "density": 0.5, "gamma": 0.2},
                                       {"weight": 1, "density": 0.5, "gamma": 0.2}], {}, 0,
     [[-1, -0.25, 4], [4, 4, 3.25]]),
    ("nearswap", [A, B], [{}, {}], {"t": 0.5}, 0, [[1.5, 1.5, 2.5], [3.5, 5.5, 5.5]]),
    ("ram", [R0, R1, R2], [{}, {}, {}], {}, 0, [[2, 0, 2], [4, 0, 0]]),
    ("ramplus_tl", [R0, R1, R2], [{}, {}, {}], {"r": 0.5, "alpha": 1.0}, 0, [[2, 0, 3], [6, 0, 0]]),
    ("ramplus_tl", [R0, R1, R2], [{}, {}, {}], {}, 0, [[2, 0, 2.03999996185], [4.07999992371, 0, 0]]),
    ("passthrough", [A], [{"scale": 0.5}], {}, None, [[0.5, 1, 1.5], [2, 2.5, 3]]),
    ("model_stock", [C, A, B, E], [{}] * 4, {}, 0,
     [[0.793351334074, 0.80443244395, 1.85332433296], [3, 4.58670266815, 4.96218922086]]),
    ("model_stock", [C, A, B, E], [{}] * 4, {"filter_wise": True}, 0,
     [[-0.680527356646, 1.78701823776, 2.59026367832], [3, 5.22126866287, 4.3805037257]]),
    ("model_stock", [C, A2, B2, E2], [{}] * 4, {}, 0,
     [[1.01607178993, 1.29489816568, -0.654083491092], [1.47021576555, 3.17059890903, 6.2741076849]]),
    ("model_stock", [C, A2, B2, E2], [{}] * 4, {"filter_wise": True}, 0,
     [[1.4792779228, 1.55958738446, -3.0362864601], [1.28434337438, 3.06982472105, 6.36816359369]]),
    ("multislerp", [A, B, E], [{"weight": 1}] * 3, {}, None,
     [[1.65552471478, 0.263871023964, 1.52746822346], [3.19181710991, 6.56027665638, 3.82555521999]]),
    ("multislerp", [C, A, B], [{}, {"weight": 1}, {"weight": 2}], {}, 0,
     [[2.1981017554, 1.38965313204, 0.886377942653], [4.14129072673, 7.39620351081, 2.68827618725]]),
    ("karcher", [A, B, E], [{}] * 3, {}, None,
     [[1.65797418061, 0.270442907075, 1.51229009842], [3.19861532503, 6.56614244285, 3.81430760638]]),
    ("nuslerp", [A, B], [{"weight": 0.4}, {"weight": 0.6}], {}, None,
     [[1.73319773064, 0.881464693263, 0.67596434789], [3.70162746254, 6.72729057719, 3.29062677179]]),
    ("nuslerp", [A, B], [{"weight": 0.4}, {"weight": 0.6}], {"nuslerp_flatten": False}, None,
     [[2.34093674654, 1.2607712295, 1.03588127835], [3.59340816077, 6.53823061298, 3.18622102821]]),
    ("nuslerp", [A, B], [{"weight": 0.4}, {"weight": 0.6}], {"nuslerp_flatten": False, "nuslerp_row_wise": True},
     None, [[1.62191266445, 0.816474922284, 0.796948662129], [3.44955536977, 6.30699127977, 3.74810325715]]),
    ("nuslerp", [C, A, B], [{}, {"weight": 0.4}, {"weight": 0.6}], {}, 0,
     [[2.1540184219, 0.773001307054, 0.00548353868156], [3.65676019124, 7.3080368438, 1.85146511678]]),
    ("sce", [C, A2, B2, E2], [{}] * 4, {"select_topk": 1.0}, 0,
     [[-1, -0.25, 4.24481865285], [4.05173679751, 7, 3.25]]),
    ("sce", [C, A2, B2, E2], [{}] * 4, {"select_topk": 0.5}, 0,
     [[0.5, 1, 4.22891942536], [3, 7, 3.25]]),
    ("arcee_fusion", [A, B], [{}, {}], {}, 0, [[1, 2, -1], [4, 5, 1]]),
    # base listed last, as mergekit appends an unlisted base_model
    ("ties", [A2, B2, C], [{"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.5}, {}], {}, 2,
     [[-1, -0.25, 4.25], [3, 7, 3.25]]),
]


@pytest.mark.parametrize("method,xs,params,shared,base,expected", VECTORS)
def test_reference_vectors(method, xs, params, shared, base, expected) -> None:
    out = merged(method, t64(*xs), params, shared, base)
    np.testing.assert_allclose(out, np.array(expected), rtol=0, atol=1e-9)


def test_dare_linear_density_one_is_task_arithmetic() -> None:
    xs = t64(C, A2, B2)
    params = [{}, {"weight": 0.5, "density": 1.0}, {"weight": 0.8, "density": 1.0}]
    np.testing.assert_allclose(merged("dare_linear", xs, params, {}, 0),
                               merged("task_arithmetic", xs, params, {}, 0), atol=1e-12)


def test_ties_worked_example_divisor() -> None:
    """SEMANTICS §9 worked TIES check: the masked divisor is [[1,1,2],[0->1,1,1]]."""
    out = merged("ties", t64(C, A2, B2), [{}, {"weight": 1, "density": 0.5}, {"weight": 1, "density": 0.5}],
                 {"normalize": False}, 0)
    np.testing.assert_allclose(out - np.array(C), [[-1.5, -1.25, 4.5], [0, 3, -2.25]], atol=1e-12)


# --- every method against the float64 reference, on random tensors ---------------------------

SHAPES = [(1,), (7,), (5, 3), (13, 9), (4, 2, 3)]  # 1-D = one row; 3-D rows are axis 0


def rand_inputs(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    g = np.random.default_rng(seed)
    base = g.normal(0, 1, shape)
    xs = [base] + [base + g.normal(0, 0.3, shape) for _ in range(n - 1)]
    rows = shape[0] if len(shape) >= 2 else 1
    x = torch.tensor(np.stack([a.reshape(rows, -1) for a in xs]), dtype=torch.float32)
    return x, [a.astype(np.float32).astype(np.float64) for a in xs]


def chunked_all(method: str, ctx, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[1]
    outs = [run_chunked(method, ctx, x, r) for r in sorted({1, 3, max(1, rows // 2 + 1), rows})]
    outs += [run_chunked(method, ctx, x, r, remember=True) for r in (1, rows)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "result depends on chunk size"
    return outs[0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_vs_reference(shape, normalize) -> None:
    x, xs = rand_inputs(3, shape, 1)
    ws = [0.2, 0.5, -0.1]
    ctx = context("linear", [{"weight": w} for w in ws], {"normalize": normalize}, shape=shape)
    out = chunked_all("linear", ctx, x)
    want = ref.linear(xs, ws, normalize)
    np.testing.assert_allclose(out.numpy().reshape(shape), want, rtol=2e-5, atol=2e-6)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([[1.0], [0.5, 0.5], [0.5, 0.3, 0.2], [0.25, 0.25, 0.5], [0.7, 0.3], [0.7, 0.2, 0.1], [0.3] * 3,
                        [2.0, -1.0]]),
       st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32)
                | st.sampled_from([0.0, -0.0, 1e-40, -1e-40, 3.4e38, -3.4e38]), min_size=1, max_size=30),
       st.randoms(use_true_random=False), st.sampled_from([torch.float32, torch.float64]))
def test_linear_weights_summing_to_one_divide_by_nothing(ws, atoms, rnd, dtype) -> None:
    """Weights whose sum is 1 in the work dtype skip the normalising division (Linear.divisor); the
    bits are those of the division SEMANTICS §2.2 states — signed zeros, subnormals, infinities and
    NaN (as its quiet NaN) included. [0.7, 0.2, 0.1] sums to 0.9999999999999999 in float64: there it
    divides (in float32 the sum rounds to 1 and it does not)."""
    from streammerge.methods.linear import Linear

    cols = len(atoms)
    x = torch.tensor([[[rnd.choice(atoms) for _ in range(cols)]] for _ in ws], dtype=dtype)
    ctx = context("linear", [{"weight": w} for w in ws], {}, shape=(1, cols))
    op = Linear(ctx)
    got = op.apply(x, 0)
    want = torch.zeros(1, cols, dtype=dtype)
    for w, xi in zip(ws, x):
        want.add_(xi, alpha=w)
    want /= torch.tensor(ws, dtype=torch.float64).sum().to(dtype)  # the division, always
    total = float(torch.tensor(ws, dtype=torch.float64).sum().to(dtype))
    assert (op.divisor(dtype) is None) == (total == 1.0)
    int_view = torch.int32 if dtype == torch.float32 else torch.int64
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(int_view), want[~nan].view(int_view))  # same bits, the sign of zero too


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.4])
def test_slerp_vs_reference(shape, t) -> None:
    x, xs = rand_inputs(2, shape, 2)
    ctx = context("slerp", [{}, {}], {"t": t}, base=1, shape=shape)
    out = chunked_all("slerp", ctx, x)
    np.testing.assert_allclose(out.numpy().reshape(shape), ref.slerp(t, xs[1], xs[0]), rtol=2e-5, atol=2e-6)


def test_slerp_zero_vector_and_colinear() -> None:
    zero = torch.zeros(1, 4, 5)
    v = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    for pair in (torch.cat([zero, v]), torch.cat([v, 3 * v])):
        ctx = context("slerp", [{}, {}], {"t": 0.25}, base=0, shape=(4, 5))
        out = chunked_all("slerp", ctx, pair)
        want = ref.slerp(0.25, pair[0].double().numpy(), pair[1].double().numpy())
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)


FAMILY = {  # method: (sparsify, consensus)
    "task_arithmetic": ("none", False), "ties": ("magnitude", True),
    "dare_linear": ("random", False), "dare_ties": ("random", True),
    "breadcrumbs": ("outliers", False), "breadcrumbs_ties": ("outliers", True),
    "della": ("della", True), "della_linear": ("della", False),
}


@pytest.mark.parametrize("method", list(FAMILY))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize,rescale", [(False, False), (True, True), (False, True)])
def test_task_arithmetic_family_vs_reference(method, shape, normalize, rescale) -> None:
    x, xs = rand_inputs(4, shape, 3)
    weights, densities = [0.7, -0.2, 0.5], [0.6, 0.35, 1.0]
    params = [{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    if FAMILY[method][0] == "outliers":
        params = [{}] + [{**p, "gamma": 0.1} for p in params[1:]]
    if FAMILY[method][0] == "della":
        params = [{}] + [{**p, "epsilon": 0.1} for p in params[1:]]
        row_len = shape[1] if len(shape) >= 2 else int(np.prod(shape))
        if row_len < 2:  # a row of one: mergekit fails (0/0 rank), so must we, clearly, at plan time
            from streammerge.methods import METHODS

            problems = METHODS[method].check(context(method, params, {}, base=0, shape=shape))
            assert any("ranks along axis 1, which has length 1" in p for p in problems), problems
            return
    ctx = context(method, params, {"normalize": normalize, "rescale": rescale, "lambda": 0.8}, base=0,
                  tensor="model.layers.3.mlp.up_proj.weight", shape=shape, seed=7)
    out = chunked_all(method, ctx, x)
    sparsify, consensus = FAMILY[method]
    keeps = []
    for k, (xi, d) in enumerate(zip(xs[1:], densities), start=1):
        if sparsify == "magnitude":
            keeps.append(ref.topk_keep(xi - xs[0], d))
        elif sparsify == "outliers":
            keeps.append(ref.band_keep(xi - xs[0], d, 0.1))
        elif sparsify == "della":
            keeps.append(ref.della_keep(xi - xs[0], d, 0.1, 7, k, ctx.tensor))
        elif sparsify == "random" and d < 1:
            keeps.append(ref.dare_keep(7, k, ctx.tensor, xi.size, d).reshape(shape))
        else:
            keeps.append(np.ones(shape, bool))
    want = ref.task_arithmetic(xs[0], xs[1:], weights, keeps, consensus, normalize, rescale, 0.8)
    np.testing.assert_allclose(out.numpy().reshape(shape), want, rtol=1e-4, atol=1e-5)


def test_topk_ties_keep_exactly_k_lowest_indices() -> None:
    """All-equal magnitudes: exactly k survive, the lowest flat indices, whatever the chunking."""
    base = torch.zeros(1, 6, 5)
    other = torch.where(torch.arange(30).view(1, 6, 5) % 2 == 0, 1.0, -1.0)
    ctx = context("ties", [{}, {"weight": 1.0, "density": 0.3}], {"normalize": False}, base=0, shape=(6, 5))
    out = chunked_all("ties", ctx, torch.cat([base, other]))
    kept = out.flatten().nonzero().flatten().tolist()
    assert kept == list(range(9))  # k = floor(0.3 * 30) = 9


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 4), min_size=0, max_size=40), lo=st.integers(0, 3), need=st.integers(1, 90))
def test_selection_from_a_histogram_is_the_need_th_largest(counts, lo, need) -> None:
    """_select_from_top on the counts of bins lo, lo + 1, ...: the bin of the need-th largest element
    in sorted order, the elements above it and in it (fewer than need: bin 0, all, bin 0's)."""
    hist = np.array(counts, dtype=np.int64)
    elements = sorted((lo + b for b, n in enumerate(counts) for _ in range(n)), reverse=True)
    got = _select_from_top(hist, need, lo)
    if len(elements) < need:
        assert got == (0, len(elements), elements.count(0))
    else:
        b = elements[need - 1]
        assert got == (b, sum(e > b for e in elements), elements.count(b))


@settings(max_examples=120, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 9), density=st.floats(0.05, 0.95), gamma=st.floats(0, 0.5),
       high=st.integers(0x3A00, 0x3F00), data=st.data())
def test_a_threshold_the_first_pass_finds_is_the_one_both_passes_find(rows, cols, density, gamma, high, data) -> None:
    """|δ| of a few bit patterns, most with a zero low half (δ of bfloat16 models), some not, in three
    adjacent high halves: TIES's top k and breadcrumbs's band keep what the reference keeps, whether
    the first radix pass finds the threshold (its high bin's patterns with a low half are fewer than
    the elements still to select there) or the second pass has to."""
    n = rows * cols
    lows = st.one_of(st.just(0), st.just(0), st.just(0), st.integers(1, 0xFFFF))
    bits = data.draw(st.lists(st.tuples(st.integers(0, 2), lows, st.booleans()), min_size=n, max_size=n))
    words = np.array([((1 << 31) if neg else 0) | ((high + h) << 16) | lo for h, lo, neg in bits], dtype=np.uint32)
    delta = words.view(np.float32).reshape(rows, cols)
    x = torch.stack([torch.zeros(rows, cols), torch.from_numpy(delta.copy())])
    ctx = context("ties", [{}, {"weight": 1.0, "density": density}], {"normalize": False}, base=0, shape=(rows, cols))
    kept = chunked_all("ties", ctx, x).numpy() != 0
    assert np.array_equal(kept.reshape(rows, cols), ref.topk_keep(delta.astype(np.float64), density))
    ctx = context("breadcrumbs", [{}, {"weight": 1.0, "density": density, "gamma": gamma}], {}, base=0,
                  shape=(rows, cols))
    kept = chunked_all("breadcrumbs", ctx, x).numpy() != 0
    assert np.array_equal(kept.reshape(rows, cols), ref.band_keep(delta.astype(np.float64), density, gamma))


def test_breadcrumbs_band_with_ties_and_edges() -> None:
    """All-equal magnitudes: the band is ascending ranks [bot, bot+keep); density 0 keeps nothing."""
    base = torch.zeros(1, 5, 4)
    other = torch.ones(1, 5, 4)
    x = torch.cat([base, other])
    ctx = context("breadcrumbs", [{}, {"weight": 1.0, "density": 0.5, "gamma": 0.2}], {}, base=0, shape=(5, 4))
    kept = chunked_all("breadcrumbs", ctx, x).flatten().nonzero().flatten().tolist()
    want = ref.band_keep(other[0].double().numpy(), 0.5, 0.2).ravel().nonzero()[0].tolist()
    assert kept == want and len(kept) == 10
    ctx = context("breadcrumbs", [{}, {"weight": 1.0, "density": 0.0, "gamma": 0.2}], {}, base=0, shape=(5, 4))
    assert not chunked_all("breadcrumbs", ctx, x).any()


def test_dare_density_and_rescale_statistics() -> None:
    """DARE keeps a fraction ≈ density, and the L1 rescale restores Σ|δ| exactly."""
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(1, 200, 100)
    other = torch.randn(1, 200, 100, generator=g)
    ctx = context("dare_linear", [{}, {"weight": 1.0, "density": 0.4}], {}, base=0, shape=(200, 100),
                  tensor="model.layers.0.mlp.up_proj.weight")
    out = chunked_all("dare_linear", ctx, torch.cat([base, other]))
    kept = (out != 0).double().mean().item()
    assert abs(kept - 0.4) < 0.01
    assert out.abs().double().sum().item() == pytest.approx(other.abs().double().sum().item(), rel=1e-5)


def test_dare_masks_differ_per_input_and_tensor() -> None:
    a = ref.dare_keep(0, 1, "x", 256, 0.5)
    assert (a != ref.dare_keep(0, 2, "x", 256, 0.5)).any()
    assert (a != ref.dare_keep(0, 1, "y", 256, 0.5)).any()
    assert (a != ref.dare_keep(1, 1, "x", 256, 0.5)).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_elementwise_methods_vs_reference(shape) -> None:
    x, xs = rand_inputs(4, shape, 11)
    ctx = context("nearswap", [{}, {}], {"t": 0.2}, base=1, shape=shape)
    out = chunked_all("nearswap", ctx, x[:2])
    np.testing.assert_allclose(out.numpy().reshape(shape), ref.nearswap(0.2, xs[1], xs[0]), rtol=1e-5, atol=1e-6)
    for plus, method in ((False, "ram"), (True, "ramplus_tl")):
        ctx = context(method, [{}] * 4, {"epsilon": 0.2}, base=0, shape=shape)
        out = chunked_all(method, ctx, x)
        want = ref.ram(xs[0], xs[1:], eps=0.2, plus=plus)
        np.testing.assert_allclose(out.numpy().reshape(shape), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_vs_reference(shape, filter_wise) -> None:
    x, xs = rand_inputs(4, shape, 12)
    ctx = context("model_stock", [{}] * 4, {"filter_wise": filter_wise}, base=0, shape=shape)
    out = chunked_all("model_stock", ctx, x)
    want = ref.model_stock(xs[0], xs[1:], filter_wise)
    np.testing.assert_allclose(out.numpy().reshape(shape), want, rtol=2e-4, atol=2e-5)


SHAPES_2D = [(1,), (7,), (5, 3), (13, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_and_karcher_vs_reference(shape, with_base) -> None:
    x, xs = rand_inputs(4, shape, 13)
    ws = [0.5, 1.5, 1.0]
    params = ([{}] if with_base else []) + [{"weight": w} for w in ws]
    xin = x if with_base else x[1:]
    ctx = context("multislerp", params, {}, base=0 if with_base else None, shape=shape)
    out = chunked_all("multislerp", ctx, xin)
    want = ref.multislerp(xs[1:], ws, xs[0] if with_base else None)
    np.testing.assert_allclose(out.numpy().reshape(shape), want, rtol=1e-4, atol=1e-5)
    if not with_base:
        ctx = context("karcher", [{}] * 3, {}, shape=shape)
        out = chunked_all("karcher", ctx, x[1:])
        np.testing.assert_allclose(out.numpy().reshape(shape), ref.karcher(xs[1:]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES_2D)
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_vs_reference(shape, flatten, row_wise, with_base) -> None:
    x, xs = rand_inputs(3, shape, 14)
    params = ([{}] if with_base else []) + [{"weight": 0.3}, {"weight": 0.9}]
    xin = x if with_base else x[1:]
    ctx = context("nuslerp", params, {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
                  base=0 if with_base else None, shape=shape)
    out = chunked_all("nuslerp", ctx, xin)
    want = ref.nuslerp(xs[1], xs[2], 0.3, 0.9, xs[0] if with_base else None, flatten, row_wise)
    np.testing.assert_allclose(out.numpy().reshape(shape), want, rtol=1e-4, atol=1e-5)


def test_karcher_regressions() -> None:
    """mergekit's cases (SEMANTICS §7): [1,0],[2,0] -> [1.5,0]; near-zero inputs -> zeros."""
    x = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]], dtype=torch.float64)
    ctx = context("karcher", [{}, {}], {}, shape=(1, 2))
    np.testing.assert_allclose(run_chunked("karcher", ctx, x, 1).numpy(), [[1.5, 0.0]], atol=1e-12)
    tiny = torch.full((2, 1, 2), 1e-9, dtype=torch.float64)
    assert not run_chunked("karcher", ctx, tiny, 1).any()


def test_nuslerp_colinear_rows_stay_finite() -> None:
    """mergekit's regression: rows that are colinear in one input pair, not in another."""
    a = torch.tensor([[[1.0, 2.0], [1.0, 0.0]]], dtype=torch.float64)
    b = torch.tensor([[[2.0, 4.0], [0.0, 1.0]]], dtype=torch.float64)
    ctx = context("nuslerp", [{"weight": 0.5}, {"weight": 0.5}], {"nuslerp_flatten": False}, shape=(2, 2))
    out = run_chunked("nuslerp", ctx, torch.cat([a, b]), 1).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], [1.5, 3.0], atol=1e-12)


def test_della_checks_epsilon_and_keeps_expected_density() -> None:
    from streammerge.methods import METHODS

    bad = context("della", [{}, {"weight": 1, "density": 0.1, "epsilon": 0.15}], {}, base=0, shape=(4, 4))
    assert any("lower epsilon" in p for p in METHODS["della"].check(bad))
    ok = context("della", [{}, {"weight": 1, "density": 0.2, "epsilon": 0.15}], {}, base=0, shape=(4, 4))
    assert METHODS["della"].check(ok) == []
    base, other = torch.zeros(1, 300, 64), torch.randn(1, 300, 64, generator=torch.Generator().manual_seed(3))
    ctx = context("della_linear", [{}, {"weight": 1, "density": 0.4, "epsilon": 0.2}], {"rescale": False}, base=0,
                  shape=(300, 64), tensor="model.layers.1.mlp.up_proj.weight")
    out = chunked_all("della_linear", ctx, torch.cat([base, other]))
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.4) < 0.01
    big = other[0].abs() > other[0].abs().median(dim=1, keepdim=True).values
    assert kept[big].double().mean() > kept[~big].double().mean() + 0.15  # larger magnitudes kept more often


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_vs_reference(shape, topk) -> None:
    x, xs = rand_inputs(4, shape, 15)
    ctx = context("sce", [{}] * 4, {"select_topk": topk}, base=0, shape=shape)
    out = chunked_all("sce", ctx, x)
    np.testing.assert_allclose(out.numpy().reshape(shape), ref.sce(xs[0], xs[1:], topk), rtol=1e-4, atol=1e-5)


def test_sce_zero_variance_falls_back_to_uniform() -> None:
    """mergekit's case: identical task vectors (zero variance) still merge, with uniform weights."""
    base = torch.zeros(1, 3, 4, dtype=torch.float64)
    same = torch.ones(2, 3, 4, dtype=torch.float64)
    ctx = context("sce", [{}] * 3, {"select_topk": 0.5}, base=0, shape=(3, 4))
    out = run_chunked("sce", ctx, torch.cat([base, same]), 1).numpy()
    np.testing.assert_allclose(out, ref.sce(np.zeros((3, 4)), [np.ones((3, 4))] * 2, 0.5), atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_vs_reference(shape) -> None:
    x, xs = rand_inputs(2, shape, 16)
    ctx = context("arcee_fusion", [{}, {}], {}, base=0, shape=shape)
    out = chunked_all("arcee_fusion", ctx, x)
    np.testing.assert_allclose(out.numpy().reshape(shape), ref.arcee_fusion(xs[0], xs[1]), rtol=1e-5, atol=1e-6)


def test_arcee_fusion_samples_large_tensors_reproducibly() -> None:
    """Over a million elements the threshold comes from a million counter-based draws."""
    g = torch.Generator().manual_seed(4)
    shape = (1100, 1000)
    x = torch.stack([torch.randn(shape, generator=g), torch.randn(shape, generator=g)])
    ctx = context("arcee_fusion", [{}, {}], {}, base=0, shape=shape, tensor="model.embed_tokens.weight", seed=9)
    outs = [run_chunked("arcee_fusion", ctx, x, rows, remember=held) for rows in (1100, 37) for held in (False, True)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])  # KL held between passes or computed again
    want = ref.arcee_fusion(x[0].double().numpy(), x[1].double().numpy(), 9, "model.embed_tokens.weight")
    # a + (b - a) in float32 is b only up to rounding; a different mask would differ by |b - a|
    flipped = (np.abs(outs[0].numpy() - want) > 1e-5).mean()
    assert flipped < 1e-5  # float32 vs float64 importance: only elements at the threshold may differ
    assert 0.01 < (np.abs(outs[0].numpy() - x[0].numpy()) > 0).mean() < 0.5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, -0.0, 1.0]),
                min_size=1, max_size=40),
       st.integers(1, 60), st.randoms(use_true_random=False),
       st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0]), min_size=1, max_size=4))
def test_fusion_quantiles_are_the_sorted_values_elements(atoms, repeats, rnd, qs) -> None:
    """quantiles selects; the reference sorts (SEMANTICS §2.12: the element at floor(q·(n−1)) of the
    values sorted ascending, NaN last) — equal values, a zero of either sign counting as one. The
    values are drawn atoms repeated and shuffled: up to 2,400, past the lengths np.partition sorts."""
    from streammerge.methods.arcee_fusion import quantiles

    values = atoms * repeats
    rnd.shuffle(values)
    ordered = sorted(values, key=lambda v: (math.isnan(v), 0.0 if math.isnan(v) else v))
    want = [ordered[math.floor(q * (len(values) - 1))] for q in qs]
    got = quantiles(torch.tensor(values, dtype=torch.float64), tuple(qs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (math.isnan(g) and math.isnan(w)) or g == w, (g, w)


def test_regressions_tiny_biases_and_zero_weight_sums() -> None:
    """mergekit's cases (SEMANTICS §7, §2.15): TIES on a one-element bias with density 0 gives the
    base; linear with a zero weight sum is IEEE division (NaN/inf); task arithmetic without
    consensus uses divisor 1 when |Σw| < 1e-8; nuslerp with wa + wb = 0 takes t = 0.5."""
    one = torch.tensor([[[0.5]], [[2.0]], [[-1.0]]], dtype=torch.float64)
    ctx = context("ties", [{}, {"weight": 1, "density": 0.0}, {"weight": 1, "density": 0.0}], {}, base=0, shape=(1,))
    assert run_chunked("ties", ctx, one, 1).item() == 0.5
    x = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]], dtype=torch.float64)
    out = run_chunked("linear", context("linear", [{"weight": 1.0}, {"weight": -1.0}], {}, shape=(1, 2)), x, 1)
    assert torch.isinf(out[0, 0]) and torch.isnan(out[0, 1])
    ctx = context("task_arithmetic", [{}, {"weight": 1.0}, {"weight": -1.0}], {"normalize": True}, base=0,
                  shape=(1, 1))
    assert run_chunked("task_arithmetic", ctx, one, 1).item() == 0.5 + (2.0 - 0.5) - (-1.0 - 0.5)
    a, b = np.array(A, float), np.array(B, float)
    ctx = context("nuslerp", [{"weight": 1.0}, {"weight": -1.0}], {}, shape=(2, 3))
    out = run_chunked("nuslerp", ctx, t64(A, B), 1).numpy()
    np.testing.assert_allclose(out, ref.nuslerp(a, b, 0.5, 0.5), atol=1e-12)


def test_regressions_fusion_quantiles_scalar_fusion_and_stock_singularity() -> None:
    """mergekit's cases (SEMANTICS §7): fusion quantiles of arange(12) are 2, 5, 8 and the threshold
    14; a 0-D fusion takes the other input; model_stock with opposite offsets (1 + (k-1)c = 0)
    keeps the base."""
    from streammerge.methods.arcee_fusion import quantiles

    values = torch.arange(12, dtype=torch.float64)[torch.randperm(12, generator=torch.Generator().manual_seed(2))]
    qs = quantiles(values, (0.25, 0.5, 0.75))
    assert qs == [2.0, 5.0, 8.0] and qs[1] + 1.5 * (qs[2] - qs[0]) == 14.0
    scalars = torch.tensor([[[1.5]], [[-2.0]]], dtype=torch.float64)
    ctx = context("arcee_fusion", [{}, {}], {}, base=0, shape=())
    assert run_chunked("arcee_fusion", ctx, scalars, 1).item() == -2.0
    base = torch.zeros(1, 2, 3, dtype=torch.float64)
    off = torch.randn(1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ctx = context("model_stock", [{}] * 3, {}, base=0, shape=(2, 3))
    out = run_chunked("model_stock", ctx, torch.cat([base + 1, base + 1 + off, base + 1 - off]), 1)
    np.testing.assert_allclose(out.numpy(), np.ones((2, 3)), atol=1e-12)
