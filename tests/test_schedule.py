"""The pass schedule's order of reads: a tensor read in several blocks is read once per pass, the
apply pass in row order; where the method's statistics find the same in any block order the
passes alternate direction and share the block at each turn, one read fewer per statistics pass."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streammerge.schedule import pass_steps


@st.composite
def blockings(draw):  # type: ignore[no-untyped-def]
    """Contiguous blocks of 1..60 rows, cut at drawn places."""
    rows = draw(st.integers(1, 60))
    cuts = sorted(draw(st.sets(st.integers(1, rows - 1), max_size=8))) if rows > 1 else []
    edges = [0, *cuts, rows]
    return list(zip(edges, edges[1:]))


@given(blockings(), st.integers(0, 3), st.booleans())
def test_every_pass_sees_every_block_once_and_the_apply_pass_in_row_order(blocks, passes, any_order) -> None:
    steps = pass_steps(blocks, passes, any_order)
    visits = [(p, b) for b, ps in steps for p in ps]
    assert [p for p, _ in visits] == sorted(p for p, _ in visits)  # pass after pass, in order
    for p in range(passes + 1):
        seen = [b for q, b in visits if q == p]
        assert sorted(seen) == blocks  # each block once
        if p == passes or not any_order:
            assert seen == blocks  # row order: the apply pass always (its reads are hashed, its rows written)
    # a block is never read twice running: the one a pass ended with serves the next where it begins
    assert all(a[0] != b[0] for a, b in zip(steps, steps[1:]))
    n, k = len(blocks), passes + 1
    if n == 1:
        assert steps == [(blocks[0], tuple(range(k)))]
    elif any_order:
        assert len(steps) == k * n - passes  # one read saved at each turn between passes
        # alternating: the last statistics pass runs backwards, ending where the apply pass begins
        assert all(len(ps) == 1 or ps == (ps[0], ps[0] + 1) for _, ps in steps)
    else:
        assert len(steps) == k * n and all(len(ps) == 1 for _, ps in steps)
