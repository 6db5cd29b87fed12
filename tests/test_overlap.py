"""The helper threads and the block arena (overlap.py): order kept, capacity kept, errors raised
to the caller, nothing hangs; and the fixed-order row sums every device uses, against plain Python."""

from __future__ import annotations

import queue
import random
import threading
import time
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import pairwise_sum

from streammerge import overlap
from streammerge.methods import fused
from streammerge.methods.base import row_sums, tree_row_sums
from streammerge.overlap import ArenaClosed, ReadAhead, RingArena, WriteBehind


def test_read_ahead_keeps_order_and_capacity() -> None:
    sizes = [random.Random(k).randint(1, 40) for k in range(200)]
    held = {"now": 0, "max": 0}
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            held["now"] += sizes[i]
            held["max"] = max(held["max"], held["now"])
        return i * i

    ahead = ReadAhead(list(range(200)), load, lambda i: sizes[i], capacity=50, threaded=True)
    for i in range(200):
        spec, block = ahead.take()
        assert (spec, block) == (i, i * i)
        time.sleep(0.0005)
        with lock:
            held["now"] -= sizes[i]
        ahead.done(spec)
    ahead.close()
    assert held["max"] <= 50 + 40 - 1  # the gate admits a block while the total fits (or nothing is held)
    assert held["max"] > 40  # it did read ahead


def test_read_ahead_raises_the_loaders_error_and_closes() -> None:
    def load(i: int) -> int:
        if i == 3:
            raise OSError("disk gone")
        return i

    ahead = ReadAhead(list(range(10)), load, lambda i: 1, capacity=100, threaded=True)
    for i in range(3):
        assert ahead.take()[0] == i
    with pytest.raises(OSError, match="disk gone"):
        ahead.take()
    ahead.close()


def test_read_ahead_inline_loads_on_demand() -> None:
    loaded = []
    ahead = ReadAhead([1, 2, 3], lambda i: loaded.append(i) or i, lambda i: 1, capacity=1, threaded=False)
    assert ahead.take() == (1, 1) and loaded == [1]
    assert ahead.take() == (2, 2) and loaded == [1, 2]
    ahead.close()


@pytest.mark.parametrize("threaded", [True, False])
def test_write_behind_runs_in_order_and_reports_errors(threaded: bool) -> None:
    seen: list[int] = []
    behind = WriteBehind(capacity=10, threaded=threaded)
    for i in range(100):
        behind.submit(lambda i=i: seen.append(i), nbytes=3)
    behind.drain()
    assert seen == list(range(100))

    def boom() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        behind.submit(boom)
        behind.drain()
    with pytest.raises(OSError):  # it stays failed: nothing more runs
        behind.submit(lambda: seen.append(-1))
        behind.drain()
    behind.close()
    assert -1 not in seen


def test_closing_wakes_waiting_helpers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """close() wakes a helper waiting for work (the write-behind) or for room (the read-ahead)
    instead of leaving it to notice at its next poll: with the poll made a minute long, both
    close well within it (before, every run's end waited out the write-behind's poll)."""
    monkeypatch.setattr(overlap, "POLL_S", 60.0)
    behind = WriteBehind(capacity=10, threaded=True)
    behind.submit(lambda: None, nbytes=3)
    behind.drain()
    time.sleep(0.05)  # the thread is waiting for work again
    ahead = ReadAhead([1, 2, 3], lambda i: i, lambda i: 1, capacity=1, threaded=True)
    assert ahead.take() == (1, 1)  # not given back: the thread waits for room for 2
    time.sleep(0.05)
    t0 = time.monotonic()
    behind.close()
    ahead.close()
    assert time.monotonic() - t0 < 20.0


def test_ring_arena_blocks_never_overlap_and_wrap() -> None:
    """A producer thread takes blocks of random sizes (waiting for room), fills each with its
    number; the consumer checks each is intact, then gives it back, oldest first."""
    arena = RingArena(1000)
    rng = random.Random(0)
    sizes = [rng.randint(1, 120) for _ in range(400)]
    ready: queue.Queue[torch.Tensor] = queue.Queue()

    def produce() -> None:
        for k, n in enumerate(sizes):
            t = arena.take(n * 4, torch.float32, (n,))
            t.fill_(k)
            ready.put(t)

    threading.Thread(target=produce, daemon=True).start()
    for k, n in enumerate(sizes):
        t = ready.get(timeout=10)
        time.sleep(rng.random() * 0.001)
        assert t.numel() == n and bool((t == k).all())  # nobody wrote over it meanwhile
        del t
        arena.give_back()
    assert arena._head < 1000


def test_ring_arena_waits_for_room_and_closes() -> None:
    arena = RingArena(4096)
    first = arena.take(3000, torch.uint8, (3000,))
    got: list[object] = []

    def second() -> None:
        try:
            got.append(arena.take(3000, torch.uint8, (3000,)))
        except ArenaClosed:
            got.append("closed")

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.2)
    assert got == []  # no room while the first is held
    del first
    arena.give_back()
    t.join(5)
    assert len(got) == 1 and isinstance(got[0], torch.Tensor)
    t = threading.Thread(target=second)
    t.start()
    arena.close()
    t.join(5)
    assert got[-1] == "closed"


def test_tree_row_sums_follow_the_stated_order() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 13, generator=g) * torch.logspace(-6, 6, 13)
    want = [pairwise_sum([float(v) for v in r]) for r in x.tolist()]
    assert tree_row_sums(x).tolist() == want
    assert tree_row_sums(x[2:4]).tolist() == want[2:4]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.one_of(st.integers(0, 300), st.sampled_from([1023, 1024, 3584, 4097, 14336])),
       spread=st.sampled_from([0.0, 4.0, 12.0]), seed=st.integers(0, 2**31 - 1), step=st.sampled_from([1, 2]),
       dtype=st.sampled_from([torch.float32, torch.float64]), loops=st.booleans())
def test_cpu_row_sums_are_the_pairwise_tree(rows, cols, spread, seed, step, dtype, loops) -> None:
    """row_sums on a CPU, compiled or torch's form, adds in the stated pairwise order (the plain-Python
    reference's, every add one IEEE double add), on rows whose magnitudes span up to e^±80, where any
    other order shows in the last bits; float32 and float64 rows, contiguous or not."""
    if loops and fused.kernels() is None:
        loops = False  # no numba here: the torch form is all there is
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols * step, generator=g) * torch.exp(spread * torch.randn(rows, cols * step, generator=g)))
    x = x.to(dtype)[:, ::step]
    want = [pairwise_sum([float(v) for v in r]) for r in x.tolist()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fused._use, "on", loops)
        got = row_sums(x)
        assert (fused.tree_sums(x) is not None) == loops
    assert got.dtype == torch.float64 and got.tolist() == want


def test_pread_rows_are_the_mapped_rows(tiny_set) -> None:
    import xxhash

    from streammerge.dtypes import torch_dtype
    from streammerge.index import ModelIndex

    idx = ModelIndex(tiny_set[1])
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        ref = idx.tensors[name]
        rows = ref.rows
        r0, r1 = min(1, rows - 1), rows
        out = torch.empty((r1 - r0, ref.cols), dtype=torch_dtype(ref.entry.dtype))
        h1, h2 = xxhash.xxh3_128(), xxhash.xxh3_128()
        idx.pread_rows(name, r0, r1, out, h1)
        assert torch.equal(out, idx.read_rows(name, r0, r1, hasher=h2))
        assert h1.hexdigest() == h2.hexdigest()
    idx.close()


def test_rows_that_are_the_block_itself_are_written_before_its_room_is_reused(tmp_path) -> None:
    """A passthrough of float32 models in float32 yields rows of the input block itself (no cast,
    no arithmetic). With the helper threads, the writer may write them after the runner is done
    with the block, whose arena room the next read then takes: at tight budgets every tensor must
    still be its input's bytes (they held other tensors' bytes, verified as written)."""
    import json
    import re

    import make_models
    import numpy as np
    from helpers import load_folder
    from launch import streammerge

    folder = str(tmp_path / "a")
    make_models.write_set([folder], make_models.Shape(256, 768, 6, 4, 2, 4096), seed=3, dtype=torch.float32)
    cfg = tmp_path / "pt.yml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {folder}\ndtype: float32\n")
    smallest = json.loads(streammerge("plan", str(cfg), "--json").stdout)["smallest_max_memory_bytes"] >> 20
    want = load_folder(folder)
    for extra in (2, 6, 12):
        out = str(tmp_path / f"out{extra}")
        budget = smallest + extra
        for _ in range(3):  # a run's process may hold a few MiB more than plan's did: it says how much
            r = streammerge("run", str(cfg), out, "-q", "--overlap", "--max-memory", f"{budget}MiB")
            more = re.search(r"use at least --max-memory (\d+)MiB", r.stderr)
            if r.returncode != 5 or more is None:
                break
            budget = int(more.group(1)) + extra
        assert r.returncode == 0, r.stderr
        got = load_folder(out)
        assert got.keys() == want.keys()
        wrong = [k for k in want if not np.array_equal(got[k], want[k])]
        assert not wrong, f"--max-memory {budget}MiB: {len(wrong)} tensors differ, {wrong[:3]}"


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 1 << 16), blocks=st.lists(st.integers(1, 1 << 16), min_size=1, max_size=6))
def test_ring_arena_holds_blocks_that_add_up_to_its_capacity(capacity, blocks) -> None:
    """Blocks whose bytes add up to the capacity asked fit at once, whatever their sizes (each is
    rounded up to 64 bytes): a block of exactly the capacity, not a multiple of 64, was refused as
    larger than the arena."""
    arena = RingArena(capacity)
    held = []
    total = 0
    for n in blocks[:RingArena.ROUNDED_BLOCKS]:
        n = min(n, capacity - total)
        if n <= 0:
            break
        with mock.patch.object(arena._cv, "wait", side_effect=AssertionError("waited for room")):
            held.append(arena.take(n, torch.uint8, (n,)))
        total += n
    assert held


class _Cudart:
    """torch.cuda.cudart()'s two calls the pinned arena makes, recorded; registering answers `code`."""

    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.calls: list[tuple[str, int, int]] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 (CUDA's name)
        self.calls.append(("register", ptr, size))
        return self.code

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.calls.append(("unregister", ptr, 0))
        return 0


@pytest.mark.parametrize("pinned_seen", [True, False])
def test_a_pinned_arena_pins_exactly_its_capacity_until_its_readers_are_done(monkeypatch, tiny_set,
                                                                             pinned_seen) -> None:
    """A GPU run's arena is torch.empty's pages registered with CUDA, exactly its capacity (torch's
    pin_memory=True rounds up to a power of two: up to twice the budget's bytes pinned), kept
    registered after close() (the reading thread may be copying from it) until unpin(), which
    ReadBlocks.close calls once its reading thread is joined; unregistered once. Where torch does
    not see the registered pages as pinned, they are unregistered at once and torch's own pinned
    allocation serves, as where registering fails."""
    from streammerge.config import parse_config
    from streammerge.planner import make_plan
    from streammerge.reader import InputReader, ReadBlocks
    from streammerge.schedule import make_schedule

    rt = _Cudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: pinned_seen)
    fallback: list[int] = []
    monkeypatch.setattr(overlap, "_torch_pinned", lambda n: fallback.append(n) or torch.empty(n, dtype=torch.uint8))
    arena = RingArena(1_000_000 + 3, pin=True)
    x = arena.take(4096, torch.float32, (1024,))
    ptr = x.data_ptr()
    if not pinned_seen:
        assert [c[0] for c in rt.calls] == ["register", "unregister"] and fallback == [arena.capacity]
        return
    assert rt.calls == [("register", ptr, arena.capacity)] and not fallback
    assert arena._buf is not None and arena._buf.numel() == arena.capacity  # not rounded up to 2^20
    arena.close()
    assert len(rt.calls) == 1  # still registered: a reading thread may be copying from it
    arena.unpin()
    arena.unpin()
    assert rt.calls[1:] == [("unregister", ptr, 0)]

    # through ReadBlocks, with its reading thread: unpinned only after that thread was joined
    text = (f"merge_method: linear\nmodels:\n  - model: {tiny_set[1]}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {tiny_set[2]}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    plan = make_plan(parse_config(text))
    sched = make_schedule(plan, 1 << 30, overlap=True)  # every tensor: the thread waits for room at close
    rt.calls.clear()
    reader = InputReader(plan, torch.device("cpu"), RingArena(sched.arena, pin=True))
    source = ReadBlocks(reader, sched.reads(), sched.capacity, threaded=True)
    seen: list[bool] = []
    real_unpin = reader.arena.unpin
    monkeypatch.setattr(reader.arena, "unpin", lambda: (seen.append(source._ahead._thread.is_alive()
                                                                     if source._ahead._thread else False),
                                                      real_unpin()))
    source.take()
    source.close()
    assert seen == [False] and [c[0] for c in rt.calls] == ["register", "unregister"]


def test_a_registered_buffer_dropped_uncalled_is_unregistered(monkeypatch) -> None:
    """An _Unpin never called unregisters its buffer when it is dropped (before the buffer's pages
    can be freed: it holds them); registering that fails pins as torch does, and nothing is
    unregistered."""
    import gc

    rt = _Cudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    buf, unpin = overlap.pinned_buffer(4096)
    ptr = buf.data_ptr()
    del buf, unpin
    gc.collect()
    assert rt.calls == [("register", ptr, 4096), ("unregister", ptr, 0)]
    failing = _Cudart(code=1)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: failing)
    monkeypatch.setattr(overlap, "_torch_pinned", lambda n: torch.zeros(n, dtype=torch.uint8))
    buf, unpin = overlap.pinned_buffer(4096)
    unpin()
    assert [c[0] for c in failing.calls] == ["register"] and buf.numel() == 4096
