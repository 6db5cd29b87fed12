"""The task-arithmetic kernels' fast forms give the bits of the plain formulas they replace, for
every float32 value (signed zeros, subnormals, infinities, NaNs) and weight; and a tensor read in
several blocks keeps its DARE masks between passes when the budget has room, so each is drawn
once, with the same bytes as when it is drawn twice."""

from __future__ import annotations

import pytest
import torch
from helpers import context, output_digest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_all_methods import config_text

from streammerge.committer import all_finite
from streammerge.methods import METHODS, Tally, fused
from streammerge.methods.base import majority_sign
from streammerge.methods.sparsify import keep_scaled_

F32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
SPECIAL = st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.0, -3.0])
VALUE = st.one_of(F32, SPECIAL)
WEIGHT = st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from([0.0, -0.0, 1.0, 1e-30, 1e30]))


@pytest.fixture(autouse=True)
def loops_on(monkeypatch):
    """Where numba is installed, the compiled loops in use, whatever size of merge this process ran
    before (fused.use_for)."""
    monkeypatch.setitem(fused._use, "on", True)


def quiet(t: torch.Tensor) -> torch.Tensor:
    """t with every NaN the one quiet NaN, as the output is written (committer.output_rows)."""
    return t.masked_fill(t.isnan(), float("nan"))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.tuples(VALUE, st.booleans()), min_size=1, max_size=64), scale=WEIGHT,
       dtype=st.sampled_from([torch.float32, torch.float64]))
# inf·0: NaN as torch gives it, without a RuntimeWarning from numpy (the suite makes warnings errors)
@example(values=[(float("inf"), False), (1.0, True)], scale=1.0, dtype=torch.float32)
def test_keep_scaled_is_masking_then_scaling(values, scale, dtype) -> None:
    d = torch.tensor([v for v, _ in values], dtype=dtype)
    keep = torch.tensor([k for _, k in values])
    plain = d.clone()
    plain *= keep  # the plain form: mask, then scale by the factor·weight
    plain *= scale
    fast = d.clone()
    keep_scaled_(fast, keep, scale)
    assert torch.equal(bits(fast), bits(plain))


def test_a_weight_beyond_float32_masks_without_a_warning() -> None:
    """A weight that is inf once cast to float32: inf where kept, NaN where dropped (0·inf), as the
    plain form gives them (NaN's sign bit may differ), and no RuntimeWarning from numpy's cast."""
    d = torch.tensor([1.0, -2.0, 0.0, 3.0])
    keep = torch.tensor([True, True, False, False])
    fast = d.clone()
    keep_scaled_(fast, keep, 1e39)
    plain = d * keep * 1e39
    assert torch.equal(fast.isnan(), plain.isnan()) and torch.equal(fast[:2], plain[:2])
    assert fast[:2].tolist() == [float("inf"), float("-inf")]


@settings(max_examples=300, deadline=None)
@given(values=st.lists(VALUE, min_size=0, max_size=40), cols=st.integers(1, 4),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]),
       strided=st.booleans())
@example(values=[65504.0, -65504.0, 1e-45], cols=1, dtype=torch.float16, strided=False)  # f16's largest: finite
@example(values=[1e5], cols=1, dtype=torch.float16, strided=False)  # beyond f16: inf once cast
@example(values=[3.4e38, 3.4e38], cols=1, dtype=torch.float32, strided=False)  # finite, with an inf sum
def test_all_finite_is_isfinite_all(values, cols, dtype, strided) -> None:
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    t = t[: len(t) // cols * cols].reshape(-1, cols)
    if strided:
        t = t.t()  # not contiguous
    assert all_finite(t) == bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_finite_knows_every_16_bit_pattern(dtype) -> None:
    """Each of the 65,536 patterns alone among finite values, and all of them in one tensor."""
    patterns = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = torch.isfinite(patterns)
    ones = torch.ones(2, 7, dtype=dtype)
    for k in range(0, 65536, 1):
        ones[1, k % 7] = patterns[k]
        assert all_finite(ones) == bool(finite[k]), hex(k - 2**15)
        ones[1, k % 7] = 1
    assert not all_finite(patterns) and all_finite(patterns[finite])


@given(values=st.lists(st.integers(-2**63, 2**63 - 1), max_size=20),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]))
def test_a_tensor_of_integers_or_bools_is_all_finite(values, dtype) -> None:
    """The committer checks whatever it writes; a copied integer tensor holds no NaN or Inf, even
    where its float32 sum would overflow."""
    t = torch.tensor(values, dtype=torch.int64)
    if dtype != torch.int64:
        t = t.remainder(2**31 if dtype == torch.int32 else 256).to(dtype)
    assert all_finite(t)


def plain_apply(op, x: torch.Tensor, counts: dict) -> torch.Tensor:
    """TaskArithmetic.apply without sparsification, as SEMANTICS §2.7 reads: weighted δ summed in
    input order; TIES keeps the δ whose sign is the weighted sum's (0 counts as +) as δ·[δ·sign > 0]
    and divides by their weights' sum (1 where none agree). `counts` gets, per input, its nonzero
    weighted δ and how many of them agree (the report's figures)."""
    base = x[op.base]
    deltas = [(x[i] - base) * w for i, w in zip(op.others, op.weights)]
    total = torch.zeros_like(base)
    for d in deltas:
        total += d
    divisor: torch.Tensor | float
    if op.consensus:
        sign = majority_sign(total)
        total = torch.zeros_like(base)
        div = torch.zeros_like(base)
        for i, d, w in zip(op.others, deltas, op.weights):
            agree = (d * sign) > 0
            total += d * agree
            div.add_(agree, alpha=w)
            counts[i] = (int(torch.count_nonzero(agree)), int(torch.count_nonzero(d)))
        divisor = torch.where(div == 0, 1.0, div)
    else:
        weight_sum = sum(op.weights)
        divisor = 1.0 if abs(weight_sum) < 1e-8 else weight_sum
    if op.normalize:
        total /= divisor
    if op.lam != 1.0:
        total *= op.lam
    return base + total


@settings(max_examples=200, deadline=None)
@given(data=st.data(), method=st.sampled_from(["ties", "task_arithmetic", "dare_ties", "breadcrumbs_ties"]),
       n=st.integers(1, 5), cols=st.integers(1, 9), normalize=st.booleans(),
       lam=st.sampled_from([1.0, 0.5, -2.0]))
def test_consensus_gives_the_bits_of_the_masked_sum(data, method, n, cols, normalize, lam) -> None:
    values = data.draw(st.lists(VALUE, min_size=(n + 1) * 2 * cols, max_size=(n + 1) * 2 * cols))
    x = torch.tensor(values, dtype=torch.float32).view(n + 1, 2, cols)
    weights = data.draw(st.lists(WEIGHT, min_size=n, max_size=n))
    params = [{}] + [{"weight": w, "density": 1.0} for w in weights]  # density 1: nothing sparsified
    ctx = context(method, params, {"normalize": normalize, "lambda": lam}, base=0, shape=(2, cols))
    op = METHODS[method].make(ctx)
    assert METHODS[method].cost(ctx).stat_passes == 0
    counts: dict = {}
    expected = plain_apply(op, x.clone(), counts)
    for jit in (fused.kernels(), None):  # the compiled loop where numba is installed, and the torch form
        saved = dict(fused._state)  # (no "jit" where it was never loaded: STREAMMERGE_JIT=0)
        fused._state["jit"] = jit
        try:
            op = METHODS[method].make(ctx)
            op.tally = Tally(n + 1)
            op.tally.pick = slice(0, 2)  # every row counted
            got = op.apply(x.clone(), 0)
        finally:
            fused._state.clear()
            fused._state.update(saved)
        # the torch form's NaNs are the plain form's; the compiled loop's may differ in sign and
        # payload (the order of an addition's operands), which the output never shows (quiet)
        assert torch.equal(bits(got if jit is None else quiet(got)), bits(expected if jit is None else quiet(expected)))
        if op.consensus:
            assert {i: (op.tally.agree[i], op.tally.nonzero[i]) for i in op.others} == counts


@settings(max_examples=100, deadline=None)
@given(values=st.lists(VALUE, min_size=1, max_size=120), n=st.integers(1, 3), cols=st.integers(1, 8),
       start=st.integers(0, 7), step=st.integers(1, 4), as_bool=st.booleans())
def test_tally_counts_as_count_nonzero(values, n, cols, start, step, as_bool) -> None:
    rows = len(values) // (n * cols)
    if rows == 0:
        return
    x = torch.tensor(values[:n * rows * cols], dtype=torch.float32).view(n, rows, cols)
    tally = Tally(n + 1)
    tally.pick = slice(start, rows, step)
    picked = x[:, start:rows:step]
    for k in range(n):  # one input at a time, of a float or a bool chunk
        chunk = x[k] > 0 if as_bool else x[k]
        tally.count(tally.kept, k + 1, chunk, chunk)
        assert tally.kept[k + 1] == int(torch.count_nonzero(chunk[start:rows:step]))
    inputs = list(range(1, n + 1))
    tally.count_each(tally.nonzero, inputs, picked)  # several inputs' picked rows at once
    tally.count_each(tally.agree, inputs, picked, positive=True)
    assert tally.nonzero[1:] == [int(torch.count_nonzero(p)) for p in picked]
    assert tally.agree[1:] == [int(torch.count_nonzero(p > 0)) for p in picked]


class CountDraws:
    """Counts the elements whose DARE keep-mask is drawn (by bernoulli_mask, in the compiled
    statistics pass, or in the compiled apply loop: a Draw it is given)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import streammerge.methods.sparsify as sparsify

        self.n = 0
        real = sparsify.bernoulli_mask

        def counted(key, start, count, probability, device="cpu"):
            self.n += count
            return real(key, start, count, probability, device)

        monkeypatch.setattr(sparsify, "bernoulli_mask", counted)
        real_observe = fused.dare_sums

        def counted_observe(x, base, others, *args):  # the compiled statistics pass draws too, each other input's
            self.n += len(others) * x.shape[1] * x.shape[2]
            return real_observe(x, base, others, *args)

        monkeypatch.setattr(fused, "dare_sums", counted_observe)
        real_apply = fused.task_apply

        def counted_apply(x, base, others, keeps, *args, **kwargs):  # the apply loop draws a Draw's mask
            self.n += sum(isinstance(k, fused.Draw) for k in keeps) * x.shape[1] * x.shape[2]
            return real_apply(x, base, others, keeps, *args, **kwargs)

        monkeypatch.setattr(fused, "task_apply", counted_apply)


def test_masks_kept_between_passes_of_a_tensor_read_in_blocks(tiny_set, tmp_path, monkeypatch) -> None:
    from streammerge.budget import HOLD_SHARE, fits_whole, held_bytes, widest_row
    from streammerge.config import parse_config
    from streammerge.executor import Executor
    from streammerge.options import RunOptions
    from streammerge.planner import make_plan
    from streammerge.schedule import make_schedule

    plan = make_plan(parse_config(config_text("dare_ties", tiny_set)))
    dare = [t for t in plan.tasks if not t.copy_exact and t.cost.stat_passes]
    once = sum(t.rows * t.cols * (len(t.inputs) - 1) for t in dare)
    widest = widest_row(plan)[0]
    held_in_blocks = None
    for budget in range(widest, 60 * widest, widest // 2):
        sched = make_schedule(plan, 1 << 34, overlap=False, chunk_bytes=budget)
        reserve = budget - sched.capacity
        assert 0 <= reserve <= HOLD_SHARE * budget
        for t, ts in zip(plan.tasks, sched.tasks):
            assert ts.whole or not fits_whole(t, budget), "the reserve cost a tensor its single read"
            assert ts.hold == (ts.whole or 0 < held_bytes(t) <= reserve)
        if held_in_blocks is None and any(ts.hold and not ts.whole and len(ts.steps) > 2 for ts in sched.tasks):
            held_in_blocks = budget
    assert held_in_blocks is not None  # some budget keeps a tensor's masks across its blocks

    drawn = CountDraws(monkeypatch)
    Executor(plan, str(tmp_path / "held"), RunOptions(max_memory=1 << 34, chunk_bytes=held_in_blocks)).run()
    sched = make_schedule(plan, 1 << 34, overlap=False, chunk_bytes=held_in_blocks)
    again = sum(t.rows * t.cols * (len(t.inputs) - 1) for t, s in zip(plan.tasks, sched.tasks)
                if t in dare and not s.hold)
    assert drawn.n == once + again  # masks of tensors that hold drawn once, in the statistics pass

    # no room for the state beside a row of the widest tensor: tensors read in blocks draw again
    sched = make_schedule(plan, 1 << 34, overlap=False, chunk_bytes=widest)
    more = sum(t.rows * t.cols * (len(t.inputs) - 1) for t, s in zip(plan.tasks, sched.tasks)
               if t in dare and not s.hold)
    assert more > again
    drawn.n = 0
    Executor(plan, str(tmp_path / "drawn"), RunOptions(max_memory=1 << 34, chunk_bytes=widest)).run()
    assert drawn.n == once + more
    assert output_digest(str(tmp_path / "held")) == output_digest(str(tmp_path / "drawn"))


# The CLI in a fresh process whose every merge counts as large enough for the compiled loops
# (budget.jit_work patched: the tiny models are far below the 67M element-inputs that load numba),
# then a line of JSON: whether numba was imported.
_LARGE_SCRIPT = r"""
import json, sys
from streammerge import budget, cli
budget.jit_work = lambda plan: 1 << 40
sys.argv = ["streammerge", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as e:
    code = e.code
print(json.dumps({"numba": "numba" in sys.modules, "code": code}))
"""


def test_a_budget_too_small_for_the_loops_merges_with_torchs_forms(tiny_set, tmp_path) -> None:
    """The compiled loops add ~80-90 MiB to what a run starts from (numba, its kernels): a budget
    above what torch's forms need but below that was refused (3-model TIES on the medium set at
    400 MiB: "use at least 432MiB", where torch's forms merge in 344 MiB). Now such a run merges
    with torch's forms, never importing numba, and says so; with room, the loops run; the same
    bytes either way."""
    import json
    import os
    import re
    import subprocess
    import sys

    from streammerge.budget import LOOPS_BYTES

    cfg = tmp_path / "ties.yml"
    cfg.write_text(config_text("ties", tiny_set))
    env = {k: v for k, v in os.environ.items() if k != "STREAMMERGE_JIT"}

    def cli(*args: str) -> tuple[dict, str]:
        """(the script's line, what the CLI printed: stdout, then stderr)"""
        got = subprocess.run([sys.executable, "-c", _LARGE_SCRIPT, *args], env=env, capture_output=True, text=True,
                             timeout=600)
        *printed, last = got.stdout.strip().splitlines()
        return json.loads(last), "\n".join(printed) + "\n" + got.stderr

    seen, text = cli("run", str(cfg), str(tmp_path / "refused"), "--max-memory", "64MiB")
    asked = re.search(r"use at least --max-memory (\d+)MiB", text)
    assert seen == {"numba": False, "code": 5} and asked, text  # refused before numba was imported
    tight = int(asked.group(1))  # torch's forms' figure: their smallest and 24 MiB, less than the loops add
    seen, plan_text = cli("plan", str(cfg), "--json", "--max-memory", f"{tight}MiB")
    plan = json.loads(plan_text[:plan_text.rindex("}") + 1])
    assert not seen["numba"] and not plan["kernels"]["compiled"]
    assert plan["kernels"]["why"].startswith("torch's forms: the compiled loops (numba, about")
    seen, text = cli("run", str(cfg), str(tmp_path / "tight"), "--max-memory", f"{tight}MiB")
    assert seen == {"numba": False, "code": 0}, text
    assert f"do not fit in --max-memory {tight}MiB" in text
    roomy = tight + (2 * LOOPS_BYTES["family"] >> 20)
    seen, loops_text = cli("run", str(cfg), str(tmp_path / "roomy"), "--max-memory", f"{roomy}MiB")
    assert seen == {"numba": True, "code": 0}, loops_text
    seen, plan_text = cli("plan", str(cfg), "--max-memory", f"{roomy}MiB")
    torch_figure = re.search(r"; (\d+) MiB with torch's forms, slower", plan_text)  # beside the loops' figure
    assert seen["numba"] and torch_figure and "kernels: compiled loops" in plan_text, plan_text
    assert abs(int(torch_figure.group(1)) - tight) <= 8  # (each process measures itself)
    digest = re.compile(r"content xxh3-128 ([0-9a-f]+)")
    assert digest.search(text).group(1) == digest.search(loops_text).group(1)  # type: ignore[union-attr]
