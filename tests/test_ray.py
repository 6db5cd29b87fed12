"""Merges on Ray, on a local cluster of two nodes (ray.cluster_utils.Cluster, one CPU each): the
seed's stage 1 byte for byte what a local run writes, whether workers write OUT in place or
rows travel to the driver; a worker SIGKILLed mid-run (Ray reruns its tasks); the driver
SIGKILLed and the same command resumed, with or without Ray; a node whose copy of an input
differs refused before any work, naming the node and the file; a worker's error reported with
its node and tensor and the exit code a local run gives; --ray without Ray says how to install it;
a worker chooses the kernel's read-ahead for its inputs as a local run does."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator

import make_hub
import make_models
import pytest
import ray
from click.testing import CliRunner
from helpers import ROOMY, assert_golden, output_digest
from launch import Finished
from launch import streammerge as launch_streammerge
from ray.cluster_utils import Cluster

import streammerge
from streammerge.cli import main
from streammerge.errors import ClusterError, InputError, PlanError
from streammerge.journal import JOURNAL_FILE, WORK_DIR
from streammerge.progress import Progress

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
STAGE1 = os.path.join(EXAMPLES, "mistral-7b-merge-14-v0.yml")
STORE = 100 << 20  # each node's object store
REPO = os.path.join(os.path.dirname(__file__), "..")


class Notes(Progress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, msg: str) -> None:
        self.notes.append(msg)


@contextlib.contextmanager
def two_nodes(head_cache: str, other_cache: str) -> Iterator[Cluster]:
    """A head and one more node, one CPU each; HF_HUB_CACHE is `head_cache` for this driver and the
    head's workers (which inherit it), `other_cache` for the other node's."""
    before = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = head_cache
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                      "include_dashboard": False})
    session = c.head_node.get_session_dir_path()
    try:
        c.add_node(num_cpus=1, object_store_memory=STORE, env_vars={"HF_HUB_CACHE": other_cache})
        yield c
    finally:
        c.shutdown()
        # the cluster's logs and sockets under Ray's temporary folder (/tmp/ray/session_*): ~0.5 MB a
        # cluster, two clusters a suite run, kept by Ray for ever; this test made it, so it goes
        shutil.rmtree(session, ignore_errors=True)
        if before is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = before


@pytest.fixture(scope="module")
def cluster(seed_cache):
    """Every worker finds the seed's models in the same cache (as nodes sharing a filesystem, or
    holding the same cache ids, would)."""
    with two_nodes(seed_cache, seed_cache) as c:
        yield c


@pytest.mark.parametrize("write", ["auto", "driver"])
def test_stage1_on_two_nodes_is_byte_identical(cluster, tmp_path, write) -> None:
    out = str(tmp_path / "out")
    notes = Notes()
    stats = streammerge.merge(STAGE1, out, ray=cluster.address, ray_write=write, out_shard_size="300K",
                              max_memory=ROOMY, progress=notes)[-1]
    assert_golden("seed/stage1", out)  # what the local executor writes (test_e2e checks that too)
    streammerge.verify(out)
    how = "workers write OUT in place" if write == "auto" else "rows travel to the driver"
    assert any("2 node(s) hold the same inputs" in n and how in n for n in notes.notes), notes.notes
    assert any("2 node(s) ran" in n for n in notes.notes), notes.notes  # both nodes merged tensors
    # the test cluster keeps Ray's default niceness for its workers; the run says what that costs
    assert any("RAY_worker_niceness=0" in n for n in notes.notes), notes.notes
    assert stats.tensors == stats.tensors and stats.resumed == 0 and len(os.listdir(out)) > 3
    assert not os.path.exists(os.path.join(out, WORK_DIR))  # finished: the probe went with the work folder


@pytest.mark.parametrize("write", ["workers", "driver"])
def test_worker_killed_mid_run_is_rerun(cluster, tmp_path, write) -> None:
    """The first worker to compute its second piece of rows dies (SIGKILL); Ray reruns its task
    group on a fresh worker, which writes the same bytes at the same offsets."""
    marker = str(tmp_path / "killed")
    env = {"STREAMMERGE_CRASH_AT": "2", "STREAMMERGE_CRASH_ONCE": marker}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        out = str(tmp_path / "out")
        streammerge.merge(STAGE1, out, ray=cluster.address, ray_write=write, out_shard_size="300K")
    finally:
        ray.shutdown()
    assert os.path.exists(marker)  # a worker did die: the process that made the marker killed itself
    assert_golden("seed/stage1", out)


def _driver(args: list[str], env: dict[str, str]) -> Finished:
    return launch_streammerge("run", *args, env={**os.environ, **env}, cwd=REPO)


@pytest.mark.parametrize("again_on_ray", [True, False])
def test_driver_killed_then_the_same_command_resumes(cluster, seed_cache, tmp_path, again_on_ray) -> None:
    out = str(tmp_path / "out")
    args = [STAGE1, out, "--out-shard-size", "300K", "-q"]
    on_ray = [*args, "--ray", cluster.address]
    killed = _driver(on_ray, {"HF_HUB_CACHE": seed_cache, "STREAMMERGE_CRASH_AT": "8"})
    assert killed.returncode == -9, killed.stderr
    with open(os.path.join(out, WORK_DIR, JOURNAL_FILE)) as f:
        journaled = sum(1 for line in f if '"name"' in line)
    assert journaled > 0  # some tensors were finished and journaled before the kill
    done = _driver(on_ray if again_on_ray else args, {"HF_HUB_CACHE": seed_cache})
    assert done.returncode == 0, done.stderr
    assert f"({journaled} resumed)" in done.stderr  # only the tensors not journaled were merged
    assert_golden("seed/stage1", out)


def test_node_whose_input_differs_is_refused_before_work(tmp_path) -> None:
    """Nodes with their own Hugging Face caches: one holds another file under the same model id
    (same names, sizes and headers: only the bytes differ). The merge stops before any tensor
    is merged, naming the node and the file; OUT holds no shard."""
    shape = make_models.PRESETS["tiny"]
    repos = [r for r in make_hub.SEED_REPOS if r.formats.startswith("st") and not r.chatml][:3]
    same, odd = str(tmp_path / "cache-a"), str(tmp_path / "cache-b")
    make_hub.make_hub(same, shape, seed=1, shard_bytes=10**9, repos=repos)
    make_hub.make_hub(odd, shape, seed=1, shard_bytes=10**9, repos=repos[:2])
    make_hub.make_repo(odd, repos[2], 2, shape, seed=7, shard_bytes=10**9)  # another fine-tune, same id
    config = tmp_path / "linear.yml"
    config.write_text("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {r.repo_id}\n    parameters: {{weight: 1.0}}\n" for r in repos))
    with two_nodes(same, odd) as c:
        out = str(tmp_path / "out")
        with pytest.raises(InputError) as e:
            streammerge.merge(str(config), out, ray=c.address)
        msg = str(e.value)
        assert "node " in msg and f"model {repos[2].repo_id}" in msg and "holds other bytes on this node" in msg, msg
        assert not [n for n in os.listdir(out) if n.endswith(".safetensors")]
        # the same cluster with the odd node gone merges, and the output equals a local run's
        c.remove_node(c.list_all_nodes()[-1])
        streammerge.merge(str(config), out, ray=c.address)
        local = str(tmp_path / "local")
        streammerge.merge(str(config), local)
        assert output_digest(out)["shards"] == output_digest(local)["shards"]


def test_worker_error_names_node_and_tensor(cluster, tiny_set, tmp_path) -> None:
    """multislerp over three copies of one model with weights 1, 1, -2: the weighted sum is zero,
    which only the merge itself finds. On Ray it is the same error and exit code as a local run,
    with the node and the tensor named."""
    copies = []
    for k in range(3):
        link = tmp_path / f"copy{k}"
        os.symlink(tiny_set[1], link)
        copies.append(str(link))
    config = tmp_path / "zero.yml"
    config.write_text("merge_method: multislerp\nparameters: {normalize_weights: false}\nmodels:\n" + "".join(
        f"  - model: {c}\n    parameters: {{weight: {w}}}\n" for c, w in zip(copies, (1, 1, -2))))
    with pytest.raises(PlanError) as local:
        streammerge.merge(str(config), str(tmp_path / "local"))
    r = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--ray", cluster.address, "-q"])
    assert r.exit_code == PlanError.exit_code, r.output
    assert "node " in r.output and "tensor '" in r.output and "weighted sum of the input tensors is zero" in r.output
    assert "Traceback" not in r.output and r.output.count("tensor '") == 1  # named once (whichever failed first)
    assert "weighted sum of the input tensors is zero" in str(local.value)


def test_ray_missing_says_how_to_install(tiny_set, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as it does where Ray is not installed
    config = tmp_path / "linear.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_set[0]}\n    parameters: {{weight: 1}}\n")
    r = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--ray"])
    assert r.exit_code == ClusterError.exit_code, r.output
    assert 'pip install "streammerge[ray]"' in r.output
    assert not os.path.exists(tmp_path / "out")


def test_ray_options_reach_the_run(tiny_set, tmp_path) -> None:
    """--workers, --ray-cpus and --ray-write are checked like every option; plan takes them too."""
    config = tmp_path / "linear.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_set[0]}\n    parameters: {{weight: 1}}\n")
    r = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--ray-write", "somewhere"])
    assert r.exit_code == 2 and "somewhere" in r.output
    r = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--workers", "0"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["run", "--ray", str(config), str(tmp_path / "out")])  # --ray took CONFIG
    assert r.exit_code == 2 and "is a file, not a Ray address" in r.output, r.output
    r = CliRunner().invoke(main, ["plan", str(config), "--ray", "--workers", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tensors"]
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_gpu_tasks_on_a_cluster_without_gpus_are_refused(cluster, tmp_path) -> None:
    """--device cuda with --ray asks the workers' GPUs, not this machine's: refused before any work
    when no node has one, saying what to change."""
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", STAGE1, str(out), "--ray", cluster.address, "--device", "cuda", "-q"])
    assert r.exit_code == ClusterError.exit_code, r.output
    assert "no node of the Ray cluster has 1 CPU(s) and 1 GPU(s)" in r.output
    assert not [n for n in os.listdir(out) if n.endswith(".safetensors")]


def test_read_back_hashes_the_whole_shard_and_names_tensors_that_differ(tiny_set, tmp_path) -> None:
    """The read-back after a Ray run: a shard's hash is the xxh3-128 of the whole file (what a
    local run streams), and a tensor whose bytes on disk differ from its worker's report is named."""
    import xxhash

    from streammerge.distributed import read_shard
    from streammerge.planner import make_plan, parse
    from streammerge.writer import PARTIAL, ShardWriter

    plan = make_plan(parse(f"merge_method: linear\nmodels:\n  - model: {tiny_set[0]}\n    parameters: {{weight: 1}}\n"
                           f"  - model: {tiny_set[1]}\n    parameters: {{weight: 1}}\n")[0], 60_000)
    shard = plan.shards[0]
    with ShardWriter(str(tmp_path), shard) as w:  # header, then zeros where the tensors go
        first, second = (plan.tasks[ti] for ti in shard.tasks[:2])
        w.write(first.begin, b"\x01" * first.nbytes)
    with open(tmp_path / (shard.name + PARTIAL), "rb") as f:
        whole = f.read()
    ones = xxhash.xxh3_128_hexdigest(b"\x01" * first.nbytes)
    zeros = xxhash.xxh3_128_hexdigest(b"\x00" * second.nbytes)
    digest, wrong = read_shard(str(tmp_path), plan, 0, {first.name: ones, second.name: zeros})
    assert digest == xxhash.xxh3_128_hexdigest(whole) and wrong == []
    _, wrong = read_shard(str(tmp_path), plan, 0, {first.name: zeros, second.name: zeros})
    assert wrong == [first.name]


def test_workers_choose_the_kernels_read_ahead_as_a_local_run_does(cluster, tiny_set, tmp_path) -> None:
    """A Ray worker reads its inputs under the policy Executor.run sets for a local run: the kernel's
    read-ahead where the node's memory holds its windows beside what the worker is expected to hold
    (expected_hold), not only where it holds them beside the budget, and not where they fit nowhere
    (before, every worker read with read-ahead off, as only a tight cgroup needs)."""
    import dataclasses

    from streammerge.config import parse_config
    from streammerge.distributed import RayExecutor
    from streammerge.options import RunOptions
    from streammerge.planner import make_plan

    config = tmp_path / "linear.yml"
    config.write_text("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 1}}\n" for m in tiny_set[:3]))
    def reads_ahead(job, window):  # type: ignore[no-untyped-def]  # (defined here: Ray sends it by value)
        """On a worker: its plan made for `job` (every device's read-ahead window `window` bytes,
        where given), then whether the kernel reads ahead for it."""
        from streammerge import distributed, pagecache

        real = pagecache.readahead_bytes
        if window is not None:
            pagecache.readahead_bytes = lambda path, default=0: window
        try:
            distributed._worker_plan(job)
        finally:
            pagecache.readahead_bytes = real
        return pagecache.kernel_readahead()

    plan = make_plan(parse_config(config.read_text()))
    job = RayExecutor(plan, str(tmp_path / "out"), RunOptions(ray=cluster.address))._job("probe")
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        remote = ray.remote(reads_ahead).options(num_cpus=1)
        roomy = ray.get(remote.remote(dataclasses.replace(job, run_id="roomy", max_memory=1 << 30), None))
        whole = ray.get(remote.remote(dataclasses.replace(job, run_id="whole", max_memory=1 << 50), None))
        wide = ray.get(remote.remote(dataclasses.replace(job, run_id="wide", max_memory=1 << 30), 1 << 40))
    finally:
        ray.shutdown()
    assert roomy is True  # 1 GiB leaves the windows room on any machine that runs the suite
    assert whole is True  # a budget of all the memory there is: the tiny merge holds a sliver of it
    assert wide is False  # windows of a TiB fit beside nothing
