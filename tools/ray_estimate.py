#!/usr/bin/env python3
"""A worked estimate of the seed merge's wall time on Ray, from figures measured here.

  python tools/ray_estimate.py --worker-rate 40 [--node-read 2000] [--cores 32] [--nodes 1,8,64]

The seed merge: stage 1 reads 15 models (the base and 14 fine-tunes, DARE-TIES), stage 2 reads
2 (stage 1's output and one more model, gradient SLERP); every model in bfloat16. Shapes are
the real ones: Mistral-7B (the seed), Llama-2-70B and Llama-3.1-405B (the same recipe at those
sizes).

Model of a node: `cores` workers of one CPU each (--ray-cpus 1: single-threaded kernels in
separate processes scale with cores, where torch's threads in one process did not), each
merging `worker-rate` MB/s of input (bench_ray.py's one-worker row measures it), and the node
reading at most `node-read` MB/s from its storage. A stage takes the longer of
  - its input bytes / (nodes x min(node-read, cores x worker-rate)), and
  - its largest tensor's input bytes / min(worker-rate, node-read): one task is one tensor, on
    one worker (the critical path: the embeddings, 15 inputs of vocab x hidden),
plus reading the stage's output back once (the shard hashes), one shard per worker in parallel
(OUT on shared storage). Stage 2 is taken as bound by reading (SLERP is cheap: bench_speed.py
measures it near the I/O floor).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_heads: int
    heads: int

    @property
    def params(self) -> int:
        kv = self.hidden * self.kv_heads // self.heads
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        return self.layers * (per_layer + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


SHAPES = [
    Shape("7B (Mistral-7B)", 4096, 14336, 32, 32000, 8, 32),
    Shape("70B (Llama-2-70B)", 8192, 28672, 80, 32000, 8, 64),
    Shape("405B (Llama-3.1-405B)", 16384, 53248, 126, 128256, 8, 128),
]
BYTES = 2  # bfloat16
SHARD = 5e9  # the output's shards (--out-shard-size 5B, mergekit's default)


def estimate(s: Shape, nodes: int, cores: int, worker: float, node_read: float) -> float:
    model = s.params * BYTES
    largest = s.vocab * s.hidden * BYTES
    node = min(node_read, cores * worker)
    read_back = max(model / (nodes * node_read), SHARD / node_read)  # workers, one shard each, in parallel
    stage1 = max(15 * model / (nodes * node), 15 * largest / min(worker, node_read)) + read_back
    stage2 = max(2 * model / (nodes * node_read), 2 * largest / node_read) + read_back
    return stage1 + stage2


def hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker-rate", type=float, required=True, help="MB/s of input one single-threaded worker merges")
    ap.add_argument("--node-read", type=float, default=2000.0, help="MB/s a node reads from its storage")
    ap.add_argument("--cores", type=int, default=32, help="cores (workers) per node")
    ap.add_argument("--nodes", default="1,8,64")
    a = ap.parse_args()
    mb = 1e6
    nodes = [int(n) for n in a.nodes.split(",")]
    print(f"worker {a.worker_rate:g} MB/s, node read {a.node_read:g} MB/s, {a.cores} workers per node\n")
    print("| seed merge at | reads (both stages) | " + " | ".join(f"{n} node(s)" for n in nodes) + " |")
    print("|---|---|" + "---|" * len(nodes))
    for s in SHAPES:
        reads = 17 * s.params * BYTES
        cells = [hms(estimate(s, n, a.cores, a.worker_rate * mb, a.node_read * mb)) for n in nodes]
        print(f"| {s.name} | {reads / 1e12:.2f} TB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
