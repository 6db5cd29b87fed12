"""Helpers shared by the tests: build a method's context, feed an operation in row chunks."""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import load_file

from streammerge.methods import METHODS, Tally, TaskContext
from streammerge.schedule import pass_steps


def context(method: str, input_params: list[dict], shared: dict | None = None, base: int | None = None,
            tensor: str = "t", shape: tuple[int, ...] = (2, 3), seed: int = 0) -> TaskContext:
    """A TaskContext with the method's defaults for unset shared and per-model parameters."""
    m = METHODS[method]
    sh = {p.name: p.default for p in m.params if p.scope == "shared"}
    sh.update(shared or {})
    per = []
    for k, ip in enumerate(input_params):
        full = {p.name: p.default for p in m.params
                if p.scope == "input" or (p.scope == "nonbase" and k != base)}
        full.update(ip)
        per.append(full)
    return TaskContext(tensor, shape, base, tuple(per), sh, seed, tuple(range(len(input_params))))


def run_chunked(method: str, ctx: TaskContext, x: torch.Tensor, chunk_rows: int,
                remember: bool = False, tally: Tally | None = None, raw: list[int] | None = None) -> torch.Tensor:
    """Feed x (n, rows, cols) through the method's operation in chunks of chunk_rows rows;
    with `remember`, the op keeps state between passes as the executor allows for one block; with
    `tally`, the op counts every other row of each chunk into it (as the runner picks rows). x of
    bfloat16 goes to the op as it is in the passes whose op takes it so (MergeOp.takes_raw: those
    passes are appended to `raw`, given), widened to float32 in the others, as the runner does. A
    method whose statistics passes may see the rows in any order (Cost.any_order) is given them
    alternately backwards and forwards, the apply pass forwards, in the schedule's directions."""
    op = METHODS[method].make(ctx)
    op.tally = tally
    if remember:
        op.hold_state()
    rows = x.shape[1]
    spans = [(r, min(rows, r + chunk_rows)) for r in range(0, rows, chunk_rows)]
    cost = METHODS[method].cost(ctx)
    passes = cost.stat_passes

    def given(p: int) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return x
        if raw is not None and op.takes_raw(p, x):
            raw.append(p)
            return x
        return x.float()

    for p in range(passes):
        xp = given(p)
        for r0, r1 in [b for b, ps in pass_steps(spans, passes, cost.any_order) if p in ps]:
            chunk = xp[:, r0:r1].clone()
            op.observe(p, chunk, r0)
            # bytes, not values: a NaN is not equal to itself
            assert torch.equal(chunk.view(torch.uint8), xp[:, r0:r1].contiguous().view(torch.uint8)), \
                "a statistics pass modified its input"
        op.end_pass(p)
    out = []
    xp = given(passes)
    for r0, r1 in spans:
        if tally is not None:
            tally.pick = slice(0, None, 2)
        out.append(op.apply(xp[:, r0:r1].clone(), r0))
    return torch.cat(out)


def load_folder(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors model folder, in float64 (read with the safetensors library)."""
    out = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            out.update({k: v.double().numpy() for k, v in load_file(os.path.join(folder, f)).items()})
    return out


# The budget for an in-process merge whose subject is not the budget. What the process holds
# counts against --max-memory, and a test worker holds what earlier tests left it: the
# allocator keeps freed heap, so after some orders of the suite a worker holds over 1 GiB,
# and a 1 GiB budget fails at planning in one order and passes in another.
ROOMY = 1 << 34

GOLDEN = os.path.join(os.path.dirname(__file__), "golden.json")
_UNSTABLE_FILES = ("README.md", "mergekit_config.yml")  # they name the inputs' temporary folders


def output_digest(out: str) -> dict:
    """What must not change between versions of the executor: every shard's bytes, each tensor's
    hash and place, the input hashes the merge read, and the hashes of the files beside the shards
    (less the two that name the temporary input folders)."""
    import json

    import xxhash

    with open(os.path.join(out, "streammerge.manifest.json")) as f:
        man = json.load(f)
    shards = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            with open(os.path.join(out, name), "rb") as fh:
                shards[name] = xxhash.xxh3_128_hexdigest(fh.read())
    return {
        "shards": shards,
        "manifest_shards": man["shards"],
        "tensors": {k: [v["xxh3_128"], v["shard"], v["offset"], v["nbytes"]] for k, v in man["tensors"].items()},
        "inputs": xxhash.xxh3_128_hexdigest(
            json.dumps([sorted(i["tensors"].items()) for i in man["inputs"]]).encode()),
        "files": {k: v for k, v in man["files"].items() if k not in _UNSTABLE_FILES},
    }


def cpu_capability() -> str:
    """The instruction set torch's CPU kernels were dispatched for (AVX2, AVX512, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def assert_golden(key: str, out: str) -> None:
    """The output in `out` is byte for byte what the executor of commit 0047f76 wrote for `key`
    (tests/golden.json, recorded from that commit with STREAMMERGE_RECORD_GOLDEN=1; the DARE and
    DELLA cases, and the seed's, were recorded again when the draw rule changed to ARITHMETIC 3). The models
    are generated with seeded torch generators, so the record holds for torch's CPU arithmetic; a
    key@CAPABILITY record (arcee_fusion@AVX2, written by commit 8f93332 on an AVX2 machine) is the
    same case where torch's kernels for that instruction set round differently."""
    import json

    got = json.loads(json.dumps(output_digest(out)))
    try:
        with open(GOLDEN) as f:
            golden = json.load(f)
    except FileNotFoundError:
        golden = {}
    if os.environ.get("STREAMMERGE_RECORD_GOLDEN") == "1":
        if key in golden and golden[key] != got:
            raise AssertionError(f"{key}: two runs of one golden case differ")
        golden[key] = got
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    assert key in golden, f"no golden record for {key}"
    # A case whose bytes follow torch's vectorized kernels (arcee_fusion's softmax and log round
    # differently under AVX2 and AVX-512) holds a record per CPU capability besides the first one.
    want = golden.get(f"{key}@{cpu_capability()}", golden[key])
    for part in want:
        assert got[part] == want[part], f"{key}: {part} differ from the recorded output"


def in_child_cgroup(controller: str, v1_files: dict[str, str], v2_files: dict[str, str], code: str) -> str:
    """What `code` prints, run by a Python that moved itself into a new child cgroup of this
    process's own, with `v1_files` written in v1's `controller` hierarchy (else `v2_files` in the
    unified one); skips where none can be made (not root, no controller)."""
    import subprocess
    import sys

    import pytest

    if not os.access("/sys/fs/cgroup", os.W_OK):
        pytest.skip(f"THIS MACHINE CANNOT MAKE A {controller.upper()} CGROUP (not root): the real limit is untested")
    with open("/proc/self/cgroup") as f:
        lines = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    v1 = f"/sys/fs/cgroup/{controller}"
    if os.path.isdir(v1):
        own = next((path for _, controllers, path in lines if controller in controllers.split(",")), "/")
        cg, files = os.path.join(v1, own.strip("/"), f"sm-test-{os.getpid()}"), v1_files
    else:
        own = next((path for n, _, path in lines if n == "0"), "/")
        cg, files = os.path.join("/sys/fs/cgroup", own.strip("/"), f"sm-test-{os.getpid()}"), v2_files
    try:
        os.mkdir(cg)
        for name, value in files.items():
            with open(os.path.join(cg, name), "w") as f:
                f.write(value)
    except OSError as e:
        if os.path.isdir(cg):
            os.rmdir(cg)
        pytest.skip(f"THIS MACHINE CANNOT MAKE A {controller.upper()} CGROUP ({e}): the real limit is untested")
    try:
        enter = f"import os; open({os.path.join(cg, 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
        out = subprocess.run([sys.executable, "-c", enter + code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout
    finally:
        os.rmdir(cg)
