"""The reader (reader.InputReader): a block read by two threads holds exactly every input's rows,
and each input's digest is the xxh3-128 of its bytes in order, however the block's bytes are
split between the threads (any number of inputs, of any dtypes, in blocks of any size) and
whichever thread reaches the shared input first."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from unittest import mock

import make_models
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from streammerge import reader as reader_module
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


def _serial(reverse: bool) -> Callable[[Callable[[int], None], list[int]], None]:
    def each(fn: Callable[[int], None], items: list[int]) -> None:
        for item in reversed(items) if reverse else items:
            fn(item)
    return each


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.sampled_from(list(DTYPES)), st.integers(0, 4)), min_size=1, max_size=5, unique=True),
       chunk=st.integers(2_000, 200_000), order=st.sampled_from(["threads", "in order", "second first"]))
def test_a_block_read_by_two_threads_is_every_input_and_its_bytes_in_order(mixed, picks, chunk, order) -> None:
    folders = [mixed[d][k] for d, k in picks]
    text = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {f}\n    parameters: {{weight: 1.0}}\n" for f in folders) + "dtype: float32\n"
    plan = make_plan(parse(text)[0])
    schedule = make_schedule(plan, 1 << 34, overlap=False, chunk_bytes=chunk)
    truth = [_tensors(f) for f in folders]
    workers = Workers(2)
    each = (lambda fn, items: workers.each(fn, items, lambda _: None, lambda: None)) if order == "threads" \
        else _serial(order == "second first")
    try:
        # every block is split between the two threads, however small
        with mock.patch.object(reader_module, "PARALLEL_MIN_ELEMENTS", 0):
            for ti, task in enumerate(plan.tasks):
                if task.copy_exact or task.vocab is not None:
                    continue
                sched = schedule.only([ti])
                reader = InputReader(plan, torch.device("cpu"), RingArena(sched.arena), each)
                for read in sched.reads():
                    x = reader.load(read)
                    assert isinstance(x, torch.Tensor)
                    for k, inp in enumerate(task.inputs):
                        want = truth[k][inp.tensor].reshape(task.rows, -1)[read.r0:read.r1].to(x.dtype)
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
