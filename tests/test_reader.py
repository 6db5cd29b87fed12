"""The reader (reader.InputReader): a block read by several threads holds exactly every input's rows,
and each input's digest is the xxh3-128 of its bytes in order, however the block's bytes are
split between the threads (any number of inputs, of any dtypes, in blocks of any size, 2-5
threads) and whichever thread reaches a shared input first; a failing read fails the block and
leaves no thread waiting."""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from unittest import mock

import make_models
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from streammerge import reader as reader_module
from streammerge import schedule as schedule_module
from streammerge.errors import InputError
from streammerge.overlap import RingArena
from streammerge.planner import INPUT_KEY_SEP, make_plan, parse
from streammerge.reader import InputReader
from streammerge.runner import Workers
from streammerge.schedule import make_schedule

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Five tiny models in each of bfloat16, float16 and float32 (one shard each)."""
    root = tmp_path_factory.mktemp("mixed")
    sets = {}
    for name, dtype in DTYPES.items():
        sets[name] = [str(root / f"{name}-{k}") for k in range(5)]
        make_models.write_set(sets[name], make_models.PRESETS["tiny"], seed=3, dtype=dtype)
    return sets


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def _in_order(fn: Callable[[int], None], items: list[int]) -> None:
    for item in items:
        fn(item)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.sampled_from(list(DTYPES)), st.integers(0, 4)), min_size=1, max_size=5, unique=True),
       chunk=st.integers(2_000, 200_000), ways=st.integers(2, 5),
       order=st.sampled_from(["threads", "in order", "last first"]), raw=st.booleans(),
       dtype=st.sampled_from(list(DTYPES)), wide=st.booleans())
def test_a_block_read_by_several_threads_is_every_input_and_its_bytes_in_order(mixed, picks, chunk, ways,
                                                                               order, raw, dtype, wide) -> None:
    """`raw`: the block as a GPU's host staging holds it (InputReader._stage_raw), each input's
    raw bytes at its offset, rather than converted to the block's dtype. `dtype`: the config's,
    each input's values rounded to it (where it is not the input's) before the block's dtype;
    `wide`: a float32 block (as for methods whose passes each widen it) rather than the config's."""
    folders = [mixed[d][k] for d, k in picks]
    text = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {f}\n    parameters: {{weight: 1.0}}\n" for f in folders) + f"dtype: {dtype}\n"
    plan = make_plan(parse(text)[0])
    with contextlib.ExitStack() as stack:
        if wide:  # the reader's blocks and the schedule's room for them, as budget.block_dtype gives a 2-pass method
            stack.enter_context(mock.patch.object(reader_module, "block_dtype", lambda t: t.compute))
            stack.enter_context(mock.patch.object(schedule_module, "block_dtype", lambda t: t.compute))
        _read_every_block(plan, folders, chunk, ways, order, raw, dtype)


def _read_every_block(plan, folders: list[str], chunk: int, ways: int, order: str, raw: bool, dtype: str) -> None:
    schedule = make_schedule(plan, 1 << 34, overlap=False, chunk_bytes=chunk)
    truth = [_tensors(f) for f in folders]
    workers = Workers(ways)

    def each(fn: Callable[[int], None], items: list[int], abort: Callable[[], None]) -> None:
        if order == "in order":  # one thread, the parts in turn
            return _in_order(fn, items)

        def late_first(t: int) -> None:  # the last part's thread starts first, the others after it
            if t != items[-1]:
                time.sleep(0.002)
            fn(t)
        workers.each(late_first if order == "last first" else fn, items, lambda _: None, abort)

    try:
        # every block is split between the two threads, however small
        with mock.patch.object(reader_module, "PARALLEL_MIN_ELEMENTS", 0):
            for ti, task in enumerate(plan.tasks):
                if task.copy_exact or task.vocab is not None:
                    continue
                sched = schedule.only([ti])
                # (raw: a GPU's host staging holds the raw bytes, wider than the block where the config narrows)
                staged = task.rows * task.cols * 4 * len(task.inputs) if raw else 0
                reader = InputReader(plan, torch.device("cpu"), RingArena(sched.arena + staged),
                                     each, ways)
                for read in sched.reads():
                    if raw:  # (the GPU's own upload and conversion are tests/test_gpu.py's)
                        stage, offsets, sizes = reader._stage_raw(
                            task, read, reader._task_hashers(ti) if read.hash else None)
                        for k, inp in enumerate(task.inputs):
                            want = truth[k][inp.tensor].reshape(task.rows, -1)[read.r0:read.r1].contiguous()
                            assert torch.equal(stage[offsets[k]:offsets[k] + sizes[k]],
                                               want.view(torch.uint8).reshape(-1)), (task.name, k, read)
                        del stage
                        reader.arena.give_back()
                        continue
                    x = reader.load(read)
                    assert isinstance(x, torch.Tensor)
                    for k, inp in enumerate(task.inputs):
                        want = truth[k][inp.tensor].reshape(task.rows, -1)[read.r0:read.r1]
                        want = want.to(DTYPES[dtype]).to(x.dtype)
                        assert torch.equal(x[k], want), (task.name, k, read)
                    del x
                    reader.release(read)
                got = reader.input_digests(ti)
                want_digests = {
                    f"{plan.models[inp.model].ref}{INPUT_KEY_SEP}{inp.tensor}":
                        xxhash.xxh3_128_hexdigest(truth[k][inp.tensor].contiguous().view(torch.uint8).numpy().tobytes())
                    for k, inp in enumerate(task.inputs)}
                assert got == want_digests, task.name
    finally:
        workers.close()


@pytest.mark.parametrize("source,via", [("float32", torch.bfloat16), ("float16", torch.bfloat16),
                                        ("bfloat16", torch.float16)])
def test_rows_read_through_the_configs_dtype_are_cast_a_staged_slice_at_a_time(mixed, monkeypatch, source,
                                                                              via) -> None:
    """A config dtype other than the input's rounds the rows read through it; each cast is of one
    slice of the staging buffer, never of all the rows at once (with several reading threads, one
    input's rows each, that had taken memory no budget counted)."""
    folder = mixed[source][0]
    plan = make_plan(parse(f"merge_method: linear\nmodels:\n  - model: {folder}\n    parameters: {{weight: 1.0}}\n"
                           "dtype: float32\n")[0])
    task = max((t for t in plan.tasks if not t.copy_exact), key=lambda t: t.rows * t.cols)
    index = plan.models[task.inputs[0].model].index
    stage = torch.empty(1 << 12, dtype=torch.uint8)
    casts: list[int] = []
    real_to = torch.Tensor.to

    def counted(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = real_to(self, *args, **kwargs)
        if y.dtype == via and y is not self:
            casts.append(y.numel() * y.element_size() + self.numel() * self.element_size())
        return y

    out = torch.empty(task.rows, task.cols, dtype=torch.float32)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "to", counted)
        index.read_rows(task.inputs[0].tensor, 0, task.rows, out=out, stage=stage, via=via)
    truth = _tensors(folder)[task.inputs[0].tensor].reshape(task.rows, -1)
    assert torch.equal(out, truth.to(via).to(torch.float32))
    assert len(casts) > 1 and max(casts) <= stage.numel()  # each slice with its cast fits the stage


@settings(max_examples=300, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=1, max_size=6), row0=st.integers(0, 5), rows=st.integers(1, 40),
       ways=st.integers(1, 9))
def test_parts_cover_every_row_once_in_order_in_near_equal_shares(widths, row0, rows, ways) -> None:
    """`ways` parts: every input's rows once, in order (inputs in order, rows in order), no empty
    piece, and each part's bytes within one row of the widest input of an equal share."""
    task = SimpleNamespace(cols=1, inputs=[SimpleNamespace(dtype={1: "U8", 2: "BF16", 4: "F32", 8: "F64"}.get(w, "U8"))
                                           for w in widths])
    width = [{"U8": 1, "BF16": 2, "F32": 4, "F64": 8}[i.dtype] for i in task.inputs]
    parts = reader_module._parts(task, row0, row0 + rows, ways)  # type: ignore[arg-type]
    assert len(parts) == ways
    walk = [(k, r) for part in parts for k, a, b in part for r in range(a, b)]
    assert walk == [(k, r) for k in range(len(widths)) for r in range(row0, row0 + rows)]
    assert all(a < b for part in parts for _, a, b in part)
    share = sum(width) * rows / ways
    for part in parts:
        assert abs(sum(width[k] * (b - a) for k, a, b in part) - share) <= 2 * max(width)


def test_a_failing_read_fails_the_block_and_leaves_no_thread_waiting(mixed) -> None:
    folders = mixed["bfloat16"][:3]
    text = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {f}\n    parameters: {{weight: 1.0}}\n" for f in folders) + "dtype: float32\n"
    plan = make_plan(parse(text)[0])
    ti = next(i for i, t in enumerate(plan.tasks) if not t.copy_exact and t.vocab is None and t.rows >= 8)
    sched = make_schedule(plan, 1 << 34, overlap=False).only([ti])
    read = sched.reads()[-1]  # the apply pass's: hashed, so later pieces wait for earlier ones
    assert read.hash
    index = plan.models[plan.tasks[ti].inputs[0].model].index
    real = index.read_rows

    def broken(name, r0, r1, *args, **kwargs):  # the first input's first rows cannot be read
        if r0 == read.r0:
            raise InputError("shard vanished")
        return real(name, r0, r1, *args, **kwargs)

    def each(fn: Callable[[int], None], items: list[int], abort: Callable[[], None]) -> None:
        """Each item on a thread of its own (daemon: one left waiting cannot keep the tests alive);
        abort is not called, so a waiting thread must stop on the failure itself."""
        errors: list[BaseException] = []

        def run(item: int) -> None:
            try:
                fn(item)
            except BaseException as e:  # noqa: BLE001 (raised below, on the caller's thread)
                errors.append(e)

        threads = [threading.Thread(target=run, args=(item,), daemon=True) for item in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads), "a reading thread still waits 5 s after a read failed"
        if errors:
            raise errors[0]

    with mock.patch.object(reader_module, "PARALLEL_MIN_ELEMENTS", 0), mock.patch.object(index, "read_rows", broken):
        reader = InputReader(plan, torch.device("cpu"), RingArena(sched.arena), each, 4)
        with pytest.raises(InputError, match="shard vanished"):
            reader.load(read)


def test_a_merge_read_ahead_by_several_threads_writes_and_records_the_same_bytes(tiny_set, tmp_path,
                                                                                monkeypatch) -> None:
    """With a read-ahead (as on 4 cores or more), its 3 reading threads split every block: the
    output's tensors and the manifest's digests of every input tensor are those of a run that
    reads everything on one thread, in blocks small enough that inputs are split between threads."""
    import json

    import streammerge.executor as executor_mod
    from streammerge.config import parse_config
    from streammerge.executor import Executor
    from streammerge.options import RunOptions

    text = ("merge_method: ties\nbase_model: " + tiny_set[0] + "\nmodels:\n"
            + "".join(f"  - {{model: {f}, parameters: {{weight: 0.5, density: 0.6}}}}\n" for f in tiny_set[1:])
            + "dtype: float32\n")
    ways: list[int] = []
    real_parts = reader_module._parts

    def parts(task, row0, row1, n):  # noqa: ANN001, ANN202
        ways.append(n)
        return real_parts(task, row0, row1, n)

    def run(out: str, overlap: bool) -> dict:
        plan = make_plan(parse_config(text), 200_000)
        Executor(plan, out, RunOptions(max_memory="64MiB", chunk_bytes=40_000, overlap=overlap)).run()
        with open(os.path.join(out, "streammerge.manifest.json")) as f:
            manifest = json.load(f)
        return {"tensors": {k: v["xxh3_128"] for k, v in manifest["tensors"].items()},
                "inputs": [m["tensors"] for m in manifest["inputs"]], "content": manifest["content_xxh3_128"]}

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run(str(tmp_path / "alone"), overlap=False)
        monkeypatch.setattr(executor_mod, "read_threads", lambda cores: 3)
        monkeypatch.setattr(reader_module, "PARALLEL_MIN_ELEMENTS", 0)
        monkeypatch.setattr(reader_module, "_parts", parts)
        ahead = run(str(tmp_path / "ahead"), overlap=True)
    finally:
        torch.set_num_threads(before)
    assert ways and set(ways) == {3}  # the blocks were split three ways
    assert all(alone["inputs"]) and ahead == alone


def test_a_block_given_up_leaves_no_thread_waiting(mixed) -> None:
    """When `each` gives up on a block (its first part never started: cancelled at a shutdown), it
    calls abort, and the parts waiting for that part's pieces stop instead of waiting forever."""
    folders = mixed["float32"][:3]
    text = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {f}\n    parameters: {{weight: 1.0}}\n" for f in folders) + "dtype: float32\n"
    plan = make_plan(parse(text)[0])
    ti = next(i for i, t in enumerate(plan.tasks) if not t.copy_exact and t.vocab is None and t.rows >= 8)
    read = make_schedule(plan, 1 << 34, overlap=False).only([ti]).reads()[-1]
    assert read.hash

    class GivenUp(Exception):
        pass

    def each(fn: Callable[[int], None], items: list[int], abort: Callable[[], None]) -> None:
        threads = [threading.Thread(target=fn, args=(item,), daemon=True) for item in items[1:]]
        for t in threads:
            t.start()
        time.sleep(0.2)  # they wait for the first part's pieces
        abort()
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads), "a reading thread still waits after the block was given up"
        raise GivenUp

    with mock.patch.object(reader_module, "PARALLEL_MIN_ELEMENTS", 0):
        reader = InputReader(plan, torch.device("cpu"), RingArena(1 << 26), each, 4)
        with pytest.raises(GivenUp):
            reader.load(read)
