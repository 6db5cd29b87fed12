"""A merge on Ray: the driver plans, journals and commits; workers on the nodes of a cluster run
tensor tasks with the runner.

Imports executor, planner, schedule, reader, runner, stats, journal, writer, format, dtypes,
errors, options, budget (and ray, lazily: it is an optional dependency). The driver is an
Executor whose tasks run elsewhere: it prepares OUT, reads the journal and finalises exactly
as a local run does. Before any work every node plans the merge itself and reports what it
found: its input files (names, sizes, headers), its plan's content fingerprint, its
streammerge version, and whether it sees a probe file the driver wrote in OUT's work folder.
A node that differs is refused, by name. When every node sees the probe, workers write their
rows in place at the planned offsets and sync them before reporting a tensor; otherwise rows
travel back through Ray's object store and the driver writes them. Either way the driver
journals finished tensors once their bytes are on disk (in groups: by size, at each
shard's end, and at least every COMMIT_EVERY_S seconds). At the end every shard is read back once
(by the workers in parallel when they share OUT, else by the driver): the shard hashes (writes
now arrive out of order) and a check of each tensor's bytes against its worker's hash.

Tasks go to Ray in groups of consecutive tensors (a Ray generator task each): every group
yields a start record, then a record per fixed piece of each tensor (rows, or just its size
when the worker wrote them), then a record per finished tensor. Pieces are cut by rows alone,
so a group retried after its worker died yields the same records, and Ray skips those the
driver already has; rewriting a piece writes the same bytes at the same offsets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from . import errors, pagecache
from ._version import __version__
from .budget import choose_loops, default_max_memory
from .committer import GROUP_COMMIT_BYTES, Committer, bytes_of, output_rows, warn_non_finite
from .config import MergeConfig
from .errors import ClusterError, InputError, IntegrityError, StreamMergeError
from .executor import Committed, Executor, expected_hold, peak_rss, readahead_fits, start_cuda
from .format import blocks, preader
from .journal import WORK_DIR, Entry, Journal, crash_point
from .limits import memory_limit
from .methods import ARITHMETIC
from .options import RunOptions
from .overlap import RingArena
from .planner import Plan, Task, content_fingerprint, content_identities, make_plan
from .progress import Progress
from .reader import InputReader, ReadBlocks, raw_bytes
from .runner import Workers, run_task
from .schedule import Schedule, make_schedule
from .stats import TensorStats
from .units import size_str
from .writer import PARTIAL, ShardWriter, disk_error, pwrite_all

__all__ = ["RayExecutor", "ray_session"]

PIECE_BYTES = 8 << 20  # rows travel (or are reported) in pieces of about this size, cut by rows alone
GROUP_READ_BYTES = 256 << 20  # a Ray task reads at least this much (or one tensor): overhead stays small
COMMIT_EVERY_S = 10.0  # and at each shard's end: a killed driver loses at most this much finished work
AHEAD = 4  # pieces a worker may have in Ray's object store before the driver takes them
RETRIES = 3  # times Ray reruns a group whose worker died
INSTALL = 'pip install "streammerge[ray]"'


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None, cpus: int | None = None) -> Iterator[None]:
    """Connected to Ray for the block's duration: `address` "local" starts an instance here (with
    `cpus` CPUs), anything else ("auto", "ray://host:port", "host:port") joins that cluster; None
    does nothing. A connection made before (ray.init in a notebook) is used and left open.

    Raises:
        ClusterError: Ray is missing, or the cluster cannot be reached.
    """
    if address is None:
        yield
        return
    ray = _ray()
    if ray.is_initialized():
        yield
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray's own deprecation notes are not the user's to act on
            if address == "local":
                # a new instance, even where another runs; its workers at the merge's own priority (Ray
                # nices them to 15 by default: beside busy programs they got 2% of a core, and a merge
                # that takes 3 minutes on a loaded laptop made no progress in 7)
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR, _system_config={"worker_niceness": 0})
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local Ray instance" if address == "local" else f"the Ray cluster at {address}"
        token = "" if address in ("local", "auto") else (
            "; a cluster started by `ray start` may want its token: set RAY_AUTH_MODE=token (the token is read "
            "from ~/.ray/auth_token or RAY_AUTH_TOKEN), or pass --ray auto on one of its nodes")
        raise ClusterError(f"cannot start or reach {where}: {e}{token}; start one with `ray start --head` and "
                           "pass its address, or give --ray alone to start one on this machine") from None
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class Job:
    """What every worker needs to plan the same merge and run its tasks; sent once, by reference."""

    run_id: str
    config: MergeConfig
    cwd: str  # the driver's working folder: relative paths in the config mean the same there
    aliases: dict[str, str]  # a pipeline's earlier stages, by name
    shard_bytes: int
    seed: int
    truncate_vocab: bool
    device: str
    max_memory: int | None  # each worker process's budget; None: its share of its node's memory
    chunk_bytes: int | None
    threads: int
    cpus: float  # each task's CPUs (to share a node's memory among its tasks)
    out_dir: str
    write: bool  # workers write rows in place (OUT is shared); else rows travel to the driver
    probe: str  # a file in OUT's work folder holding run_id
    version: tuple[str, int]  # the driver's streammerge and kernel arithmetic
    files: dict[str, Any]  # per model: content_identity of its files, as the driver has them
    digest: str  # planner.content_fingerprint of the driver's plan


@dataclass
class _Group:
    tasks: list[int]
    node: str = "?"


class RayExecutor(Executor):
    """An Executor whose tasks run on Ray workers; OUT, the journal and finalisation as a local run.

    Example:
        >>> with ray_session("local"):
        ...     RayExecutor(plan, "merged", RunOptions(ray="local"), aliases={}).run()
    """

    def __init__(self, plan: Plan, out_dir: str, options: RunOptions | None = None, progress: Progress | None = None,
                 replace_changed: bool = False, stage: str | None = None,
                 aliases: dict[str, str] | None = None) -> None:
        super().__init__(plan, out_dir, options, progress, replace_changed, stage)
        self.aliases = dict(aliases or {})
        self.device = torch.device("cpu")  # the driver computes nothing: it needs no GPU of its own
        self.worker_peak_rss = 0
        self.nodes_used: set[str] = set()

    def _run_tasks(self, journal: Journal, schedule: Schedule) -> tuple[int, int, Committed]:
        ray = _ray()
        plan = self.plan
        todo, done = self._todo(journal)
        reads = schedule.only(todo).reads()
        read_of = {ti: 0 for ti in todo}
        for r in reads:
            read_of[r.task] += raw_bytes(plan.tasks[r.task], r)
        self._start_progress(reads, done)
        for shard in plan.shards:
            self.folder.unrename(shard.name)
        gather = _Gatherer(self.out_dir, plan, journal, self.progress, done)
        try:
            job = self._job(gather.probe_token())
            write = self._check_nodes(ray, job)
            job = dataclasses.replace(job, write=write)
            if todo:
                self._dispatch(ray, job, todo, read_of, gather)
            gather.commit()
        finally:
            gather.close()
            self.progress.close()
        gather.finish(self._read_back(ray, job, gather))
        return len(done), sum(plan.tasks[ti].nbytes for ti in todo), gather

    def _read_back(self, ray: Any, job: Job, gather: _Gatherer) -> dict[int, tuple[str, list[str]]]:
        """Every shard read back once (read_shard): by the workers, in parallel, when they share OUT;
        by the driver otherwise (it wrote the bytes: they are in its page cache)."""
        plan = self.plan
        if not job.write:
            return {si: read_shard(self.out_dir, plan, si, gather.expected(si)) for si in range(len(plan.shards))}
        remote = ray.remote(_read_shard_remote).options(num_cpus=self.options.ray_cpus, max_retries=RETRIES)
        job_ref = ray.put(job)
        refs = {si: remote.remote(job_ref, si, gather.expected(si)) for si in range(len(plan.shards))}
        try:
            return {si: ray.get(ref) for si, ref in refs.items()}
        except ray.exceptions.RayError as e:
            raise ClusterError(f"a Ray worker failed while reading the output shards back ({_short(e)}); what is "
                               "journaled is kept: run the same command again to finish") from None

    def _schedule(self) -> Schedule:
        """The reads as a CPU run would make them, for the progress totals (workers schedule their own)."""
        plan = dataclasses.replace(self.plan, device="cpu")
        return make_schedule(plan, self.max_memory, False, self.options.chunk_bytes)

    def _job(self, token: str) -> Job:
        opts, plan = self.options, self.plan
        out = os.path.abspath(self.out_dir)
        device = "cuda" if plan.device.startswith("cuda") else plan.device  # Ray gives each task its own GPU
        contents = content_identities(plan)
        return Job(token, plan.config, os.getcwd(), self.aliases, opts.shard_bytes, plan.seed, opts.truncate_vocab,
                   device, opts.memory_bytes, opts.chunk_bytes, max(1, int(opts.ray_cpus)), opts.ray_cpus, out,
                   False, os.path.join(out, WORK_DIR, PROBE_FILE), (__version__, ARITHMETIC),
                   {str(m.ref): c for m, c in zip(plan.models, contents)}, content_fingerprint(plan, contents))

    def _gpus(self) -> float:
        opts = self.options
        return opts.ray_gpus if opts.ray_gpus is not None else (1.0 if self.plan.device.startswith("cuda") else 0.0)

    def _check_nodes(self, ray: Any, job: Job) -> bool:
        """Every node plans the merge and reports; returns whether workers write OUT in place.

        Raises:
            InputError: a node's input files differ from the driver's (node and file named).
            ClusterError: a node runs another streammerge, plans another merge, or fails to answer.
        """
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        confirm = ray.remote(_confirm)
        cpus, gpus = self.options.ray_cpus, self._gpus()
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= cpus
                 and n["Resources"].get("GPU", 0) >= gpus]  # those that can run a task: a bare head need not
        if not nodes:
            raise ClusterError(f"no node of the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) for a task; "
                               "lower --ray-cpus or --ray-gpus, or add nodes")
        refs = [confirm.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(job) for n in nodes]
        try:
            answers = ray.get(refs, timeout=600)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError("a Ray node did not answer within 10 minutes while checking its inputs; is a "
                               "node stuck (`ray status`)?") from None
        except ray.exceptions.RayError as e:
            raise ClusterError(f"a Ray node failed while checking its inputs: {_short(e)}") from None
        for a in answers:
            if "error" in a:
                raise _rebuilt(a["error"], f"node {a['node']}: {a['message']}")
        seen = all(a["probe"] for a in answers)
        mode = self.options.ray_write
        if mode == "workers" and not seen:
            blind = ", ".join(a["node"] for a in answers if not a["probe"])
            raise ClusterError(f"--ray-write workers: node(s) {blind} do not see {self.out_dir} (the probe file "
                               f"{job.probe} is not there): put OUT on storage every node shares, or use "
                               "--ray-write driver")
        niced = sorted({a["nice"] for a in answers if a["nice"] > 0})
        if niced:
            self.progress.note(f"ray: the workers run at niceness {niced[-1]} (Ray's default): beside other busy "
                               "programs they get little CPU; start the nodes with RAY_worker_niceness=0 to "
                               "merge at normal priority")
        write = seen if mode == "auto" else mode == "workers"
        self.progress.note(f"ray: {len(answers)} node(s) hold the same inputs; "
                           + ("workers write OUT in place" if write else "rows travel to the driver, which writes"))
        return write

    def _dispatch(self, ray: Any, job: Job, todo: list[int], read_of: dict[int, int], gather: _Gatherer) -> None:
        opts, plan = self.options, self.plan
        gpus = self._gpus()
        workers = opts.workers or _slots(ray, opts.ray_cpus, gpus)
        groups = deque(_groups(todo, read_of, workers))
        count = len(groups)
        run = ray.remote(_run_group).options(num_cpus=opts.ray_cpus, num_gpus=gpus, max_retries=RETRIES,
                                             retry_exceptions=False,
                                             _generator_backpressure_num_objects=AHEAD)
        job_ref = ray.put(job)
        running: dict[Any, _Group] = {}
        try:
            while groups or running:
                while groups and len(running) < workers:
                    g = groups.popleft()
                    running[run.remote(job_ref, g.tasks)] = g
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for gen in ready:
                    group = running[gen]
                    try:
                        record = ray.get(next(gen))
                    except StopIteration:
                        del running[gen]
                        continue
                    except ray.exceptions.RayError as e:
                        raise ClusterError(
                            f"a Ray worker on node {group.node} failed while merging "
                            f"{_span(plan, group.tasks)} ({_short(e)}), after {RETRIES} retries; what is "
                            "journaled is kept: run the same command again to resume") from None
                    self._record(record, group, read_of, gather)
        finally:
            for gen in running:
                with contextlib.suppress(Exception):
                    ray.cancel(gen, force=True)
        self.progress.note(f"ray: {len(self.nodes_used)} node(s) ran {count} task group(s); the workers' peak "
                           f"RSS {size_str(self.worker_peak_rss)}")

    def _record(self, record: tuple[Any, ...], group: _Group, read_of: dict[int, int], gather: _Gatherer) -> None:
        kind = record[0]
        if kind == "start":
            group.node = record[1]
            self.nodes_used.add(group.node)
        elif kind == "piece":
            _, ti, offset, nbytes, rows = record
            task = self.plan.tasks[ti]
            if rows is not None:
                gather.write_piece(task, offset, rows)
            self.progress.tensor(task.name)
            self.progress.read(int(read_of[ti] * nbytes / max(1, task.nbytes)))
            self.progress.written(nbytes)
        elif kind == "done":
            _, ti, digest, inputs, stats, non_finite_row, rss = record
            self.worker_peak_rss = max(self.worker_peak_rss, rss)
            task = self.plan.tasks[ti]
            if non_finite_row is not None:
                warn_non_finite(task.name, non_finite_row)
            gather.finished(task, digest, inputs, stats)
        elif kind == "error":
            _, cls, message, tensor = record
            where = "" if f"tensor {tensor!r}" in message else f", tensor {tensor!r}"
            raise _rebuilt(cls, f"node {group.node}{where}: {message}")


PROBE_FILE = "ray-probe"


class _Gatherer(Committer):
    """The driver's committer for rows that arrive out of order: writes the pieces it is sent,
    journals finished tensors in groups once their bytes are synced, and reads every shard back
    at the end."""

    SYNC_BEHIND = False  # its syncs cover several shards, which the pieces it is sent keep dirtying

    def __init__(self, out_dir: str, plan: Plan, journal: Journal, progress: Progress, done: dict[int, Entry]) -> None:
        super().__init__(out_dir, plan, journal, progress)
        self.entries.update({plan.tasks[ti].name: e for ti, e in done.items()})
        self._written: set[str] = set()  # tensors this run wrote
        self._writers = {si: ShardWriter(out_dir, s) for si, s in enumerate(plan.shards)}  # created if missing
        self._dirty: set[int] = set()
        self._left = {si: sum(1 for ti in s.tasks if ti not in done) for si, s in enumerate(plan.shards)}
        self._last_commit = time.monotonic()
        self._probe = os.path.join(out_dir, WORK_DIR, PROBE_FILE)

    def probe_token(self) -> str:
        """A new token in the probe file: a worker that reads it back sees OUT as the driver does."""
        token = secrets.token_hex(16)
        try:  # in the work folder, which is ours; never written through a link
            fd = os.open(self._probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(token)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise disk_error(self._probe, e) from e
        return token

    def write_piece(self, task: Task, offset: int, rows: np.ndarray) -> None:
        self._writers[task.shard].write(offset, memoryview(rows))  # type: ignore[arg-type]  # numpy's stubs
        self._dirty.add(task.shard)

    def finished(self, task: Task, digest: str, inputs: dict[str, str], stats: dict[str, object] | None) -> None:
        """A worker reported `task` done (its bytes synced, if it wrote them): journaled with others
        when enough wait, at its shard's end, or COMMIT_EVERY_S after the last commit."""
        self._uncommitted.append(Entry(task.name, task.fingerprint, self.plan.shards[task.shard].name, task.begin,
                                       task.nbytes, digest, inputs, stats))
        self._uncommitted_bytes += task.nbytes
        self._written.add(task.name)
        self._left[task.shard] -= 1
        if (self._uncommitted_bytes >= GROUP_COMMIT_BYTES or self._left[task.shard] == 0
                or time.monotonic() - self._last_commit >= COMMIT_EVERY_S):
            self.commit()
            self._last_commit = time.monotonic()

    def _sync(self) -> None:
        """The driver's own writes synced (a worker that wrote in place synced before it reported)."""
        for si in sorted(self._dirty):
            self._writers[si].sync()
        self._dirty.clear()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        with contextlib.suppress(OSError):
            os.unlink(self._probe)

    def expected(self, si: int) -> dict[str, str]:
        """Shard `si`'s tensors written this run, with the hashes their workers reported."""
        names = (self.plan.tasks[ti].name for ti in self.plan.shards[si].tasks)
        return {n: self.entries[n].xxh3_128 for n in names if n in self._written}

    def finish(self, read_back: dict[int, tuple[str, list[str]]]) -> None:
        """Each shard's hash and the tensors whose bytes differ from their worker's hash, as
        `read_shard` found them (on the driver, or on workers sharing OUT).

        Raises:
            IntegrityError: a tensor's bytes differ from what its worker reported; it is forgotten,
                so the next run merges it again.
        """
        wrong = [name for si in sorted(read_back) for name in read_back[si][1]]
        for si, (digest, _) in read_back.items():
            self.shard_hashes[self.plan.shards[si].name] = digest
        if wrong:
            self.journal.forget(wrong)
            raise IntegrityError(f"{len(wrong)} tensor(s) in {self.out_dir} do not hold the bytes their worker "
                                 f"reported (e.g. {wrong[0]}); is OUT's shared storage coherent between nodes? "
                                 "Run the same command again: they are merged again")


def read_shard(out_dir: str, plan: Plan, si: int, expected: dict[str, str]) -> tuple[str, list[str]]:
    """Shard `si` read back once, opened afresh (a shared filesystem then shows what other nodes
    wrote): its xxh3-128 (header and tensors in order, as a local run streams it), and the names
    of the `expected` tensors whose bytes do not hash as expected."""
    shard = plan.shards[si]
    path = os.path.join(out_dir, shard.name + PARTIAL)
    whole = xxhash.xxh3_128()
    wrong = []
    with open(path, "rb") as f:
        read = preader(f)
        for block in blocks(read, 0, len(shard.header)):
            whole.update(block)
        for ti in shard.tasks:
            task = plan.tasks[ti]
            h = xxhash.xxh3_128()
            for block in blocks(read, task.begin, task.nbytes):
                h.update(block)
                whole.update(block)
            if task.name in expected and h.hexdigest() != expected[task.name]:
                wrong.append(task.name)
    return whole.hexdigest(), wrong


def _groups(todo: list[int], read_of: dict[int, int], workers: int) -> list[_Group]:
    """Consecutive tasks in groups of at least GROUP_READ_BYTES of reads, yet small enough that
    every worker gets about four groups (a slow node then holds up little at the end)."""
    total = sum(read_of[ti] for ti in todo)
    target = max(1, min(GROUP_READ_BYTES, total // max(1, 4 * workers)))
    groups: list[_Group] = []
    size = target
    for ti in todo:
        if size >= target:
            groups.append(_Group([]))
            size = 0
        groups[-1].tasks.append(ti)
        size += read_of[ti]
    return groups


def _slots(ray: Any, cpus: float, gpus: float) -> int:
    """Tasks the cluster can run at once with these resources each (at least one: the node check
    found a node with them)."""
    have = ray.cluster_resources()
    n = int(have.get("CPU", 1) // cpus)
    if gpus > 0:
        n = min(n, int(have.get("GPU", 0) // gpus))
    return max(1, n)


def _span(plan: Plan, tasks: list[int]) -> str:
    names = [plan.tasks[ti].name for ti in tasks]
    return names[0] if len(names) == 1 else f"{len(names)} tensors from {names[0]} to {names[-1]}"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:300]


def _rebuilt(cls_name: str, message: str) -> StreamMergeError:
    """The error a worker raised, as the same class here (so the exit code is the same)."""
    cls = getattr(errors, cls_name, None)
    if isinstance(cls, type) and issubclass(cls, StreamMergeError) and cls not in (errors.ConfigError,):
        return cls(message)
    return ClusterError(message)


def _difference(mine: Any, theirs: Any) -> str | None:
    """How this node's content identity of a model (`theirs`) differs from the driver's, naming the file."""
    if mine is None:
        return "the driver's plan has no such model"
    if mine == theirs:
        return None
    ms, ts = mine.get("shards", {}), theirs.get("shards", {})
    for name in sorted(set(ms) | set(ts)):
        if name not in ts:
            return f"{name} is missing on this node"
        if name not in ms:
            return f"this node has {name}, which the driver's copy has not"
        if ms[name]["size"] != ts[name]["size"]:
            return f"{name} is {ts[name]['size']} bytes on this node, {ms[name]['size']} on the driver"
        if ms[name].get("blob") != ts[name].get("blob"):
            return (f"{name} holds other bytes on this node (Hugging Face blob {str(ts[name].get('blob'))[:12]}…, "
                    f"the driver's {str(ms[name].get('blob'))[:12]}…)")
        if ms[name] != ts[name]:
            return f"{name}'s header differs on this node"
    return "its adapter files differ on this node"


# ---- on the workers -------------------------------------------------------------------------------

_PLANS: dict[str, tuple[Plan, Schedule]] = {}  # this worker process's plan and schedule, by run


def _node() -> str:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, id {node_id[:8]})"


def _worker_plan(job: Job) -> tuple[Plan, Schedule]:
    """The merge planned here (once per worker process and run), and its schedule in this worker's budget."""
    if job.run_id in _PLANS:
        return _PLANS[job.run_id]
    for old, _ in _PLANS.values():  # an earlier run's plan: its input files are closed
        for m in old.models:
            m.index.close()
    _PLANS.clear()
    here = os.getcwd()
    try:
        if os.path.isdir(job.cwd):
            os.chdir(job.cwd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver already said them
            plan = make_plan(job.config, job.shard_bytes, job.seed, dict(job.aliases), job.truncate_vocab,
                             job.device)
    finally:
        os.chdir(here)
    torch.set_num_threads(job.threads)
    if plan.device != "cpu":
        start_cuda(torch.device(plan.device))  # its host memory counts in the baseline the budget is left from
    tasks = _node_tasks(job.cpus)
    whole = budget = job.max_memory or int(default_max_memory() // tasks)
    if not job.write:  # pieces on their way to the driver: being filled, copied, and in the object store
        budget -= (3 + AHEAD) * PIECE_BYTES
    plan = choose_loops(plan, budget)  # (as a local run does: Executor.run)
    threads = job.threads if plan.device == "cpu" else 1
    schedule = make_schedule(plan, budget, overlap=False, chunk_bytes=job.chunk_bytes, threads=threads)
    # this worker reads its inputs as a local run does (Executor.run): the kernel reads ahead where
    # its share of the node's memory holds the read-ahead windows beside what the worker is expected
    # to hold (cold inputs were read with read-ahead off and each next block asked for, as only a
    # tight cgroup needs)
    held = expected_hold(plan, budget, job.chunk_bytes, False, threads) + whole - budget
    pagecache.kernel_readahead(readahead_fits(plan, held, memory_limit() // tasks))
    _check_same(job, plan)  # before the plan is kept: a node that differs never merges
    _PLANS[job.run_id] = (plan, schedule)
    return plan, schedule


def _node_tasks(cpus: float) -> int:
    """Tasks of `cpus` CPUs each this worker's node runs at once (at least one): they share its
    memory (without --max-memory, the default budget; and the read-ahead's room beside each)."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    node_cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == me), 1)
    return max(1, int(node_cpus // cpus))


def _confirm(job: Job) -> dict[str, Any]:
    """This node plans the merge and checks it against the driver's (see RayExecutor._check_nodes)."""
    node = _node()
    try:
        _worker_plan(job)
    except StreamMergeError as e:
        return {"node": node, "error": type(e).__name__, "message": str(e)}
    try:
        with open(job.probe) as f:
            seen = f.read() == job.run_id
    except OSError:
        seen = False
    return {"node": node, "probe": seen, "nice": os.nice(0)}


def _check_same(job: Job, plan: Plan) -> None:
    """This worker's plan is the driver's: same streammerge, same input files, same merge.

    Raises:
        InputError: an input file differs here (named, with how).
        ClusterError: another streammerge version, or another merge planned from the same files.
    """
    if job.version != (__version__, ARITHMETIC):
        raise ClusterError(f"this node runs streammerge {__version__} (kernels {ARITHMETIC}), the driver "
                           f"{job.version[0]} (kernels {job.version[1]}); install the same version on every node")
    contents = content_identities(plan)
    for m, content in zip(plan.models, contents):
        problem = _difference(job.files.get(str(m.ref)), content)
        if problem:
            raise InputError(f"model {m.ref}: {problem}; every node must hold the same input files (a shared "
                             "filesystem, or the same Hugging Face cache ids): fix this node's copy, or run "
                             "without --ray")
    if content_fingerprint(plan, contents) != job.digest:
        raise ClusterError("this node plans a different merge from the same config and input files (its "
                           "tokenizer or config files differ?); give every node the same files")


def _run_group(job: Job, tasks: list[int]) -> Iterator[tuple[Any, ...]]:
    """A Ray generator task: merge `tasks` in order; yields start, piece, done and error records."""
    yield ("start", _node())
    current = ["(planning)"]  # the tensor being merged, for an error's message
    try:
        plan, schedule = _worker_plan(job)
        yield from _merge_group(job, plan, schedule, tasks, current)
    except StreamMergeError as e:
        yield ("error", type(e).__name__, str(e), current[0])
    except Exception as e:  # noqa: BLE001 - reported with its node and tensor, then the run stops
        yield ("error", "ClusterError", f"internal error in a worker: {type(e).__name__}: {e}", current[0])


def _merge_group(job: Job, plan: Plan, schedule: Schedule, tasks: list[int],
                 current: list[str]) -> Iterator[tuple[Any, ...]]:
    sched = schedule.only(tasks)
    device = torch.device(plan.device)
    reader = InputReader(plan, device, RingArena(sched.arena, pin=device.type == "cuda"))
    source = ReadBlocks(reader, sched.reads(), sched.capacity, threaded=False, statistics_only=sched.statistics_only())
    steps = {t.task: t for t in sched.tasks}
    files: dict[int, tuple[int, str]] = {}  # shard index -> (fd, path), when writing in place
    waiting: list[tuple[Any, ...]] = []  # done records whose bytes are not yet synced
    waiting_bytes = 0
    workers = Workers(job.threads if plan.device == "cpu" else 1)
    try:
        for ti in tasks:
            task = plan.tasks[ti]
            current[0] = task.name
            stats = None if task.copy_exact else TensorStats(len(task.inputs), task.rows, task.ctx.base)
            if job.write and task.shard not in files:
                files[task.shard] = _open_shard(job, plan, task.shard)
            pieces = _Pieces(ti, task, files.get(task.shard))
            non_finite_row = None  # the first row holding NaN or Inf, said once by the driver
            for row0, y in run_task(task, steps[ti], source, plan.method, stats, workers):
                cast, finite = output_rows(task, y)
                del y
                if non_finite_row is None and not finite:
                    non_finite_row = row0
                yield from pieces.add(row0, cast)
            record = stats.record() if stats is not None else None
            waiting.append(("done", ti, pieces.digest(), reader.input_digests(ti), record, non_finite_row))
            waiting_bytes += task.nbytes
            if waiting_bytes >= GROUP_COMMIT_BYTES:
                yield from _synced(files, waiting)
                waiting, waiting_bytes = [], 0
        yield from _synced(files, waiting)
    finally:
        workers.close()
        source.close()
        for fd, _path in files.values():
            os.close(fd)


def _read_shard_remote(job: Job, si: int, expected: dict[str, str]) -> tuple[str, list[str]]:
    """read_shard on a worker that shares OUT with the driver."""
    plan, _ = _worker_plan(job)
    return read_shard(job.out_dir, plan, si, expected)


def _synced(files: dict[int, tuple[int, str]], waiting: list[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """The tensors' bytes this worker wrote in place are on disk; then they are reported, with
    this process's peak memory so far."""
    for fd, path in files.values():
        try:
            os.fdatasync(fd)
        except OSError as e:
            raise disk_error(path, e) from e
    crash_point("worker-synced")
    rss = peak_rss()
    for w in waiting:
        yield (*w, rss)


def _open_shard(job: Job, plan: Plan, si: int) -> tuple[int, str]:
    path = os.path.join(job.out_dir, plan.shards[si].name + PARTIAL)
    try:
        return os.open(path, os.O_WRONLY | os.O_NOFOLLOW), path  # the driver created it; never created here
    except OSError as e:
        raise ClusterError(f"cannot open {path} to write ({e.strerror}); is OUT shared with this node? "
                           "Use --ray-write driver") from None


class _Pieces:
    """A tensor's rows in pieces of a fixed number of rows (about PIECE_BYTES): each written in
    place (`file`) and reported by its size, or sent whole; the tensor's hash over all of them."""

    def __init__(self, ti: int, task: Task, file: tuple[int, str] | None) -> None:
        self.ti, self.task, self.file = ti, task, file
        self.row_bytes = task.nbytes // max(1, task.rows)
        self.rows = max(1, PIECE_BYTES // max(1, self.row_bytes))
        self.hasher = xxhash.xxh3_128()
        self.buf = bytearray()  # rows not yet sent (rows travel to the driver)
        self.start = 0  # first row of the piece being filled

    def add(self, row0: int, cast: torch.Tensor) -> Iterator[tuple[Any, ...]]:
        data = bytes_of(cast)
        self.hasher.update(data)
        if self.file is not None:
            pwrite_all(*self.file, data, self.task.begin + row0 * self.row_bytes)
        else:
            self.buf += data
        crash_point("rows-computed")
        end = row0 + len(data) // max(1, self.row_bytes)
        while end - self.start >= self.rows or (end == self.task.rows and end > self.start):
            stop = min(self.start + self.rows, end)
            n = (stop - self.start) * self.row_bytes
            rows = None
            if self.file is None:
                rows = np.frombuffer(self.buf, dtype=np.uint8, count=n).copy()  # the view is gone before the del
                del self.buf[:n]
            yield ("piece", self.ti, self.task.begin + self.start * self.row_bytes, n, rows)
            self.start = stop

    def digest(self) -> str:
        return self.hasher.hexdigest()
