"""The Python API, for notebooks and scripts: merge, plan, verify.

Imports pipeline, executor, verify, plan, config, budget. Same behaviour as the command line,
errors raised as StreamMergeError subclasses instead of exit codes.
"""

from __future__ import annotations

import os
from typing import Any

from .budget import default_max_memory
from .config import MergeConfig
from .executor import Executor, Progress, RunStats, resolve_device
from .pipeline import run_pipeline
from .planner import DEFAULT_SEED, DEFAULT_SHARD_BYTES, Plan, make_plan, parse
from .verifier import Report
from .verifier import verify as _verify


def _configs(config: str | os.PathLike[str] | MergeConfig) -> list[MergeConfig]:
    if isinstance(config, MergeConfig):
        return [config]
    text = str(config)
    if "\n" not in text and os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            return parse(f.read(), text)
    return parse(text, "config")


def plan(config: str | os.PathLike[str] | MergeConfig, out_shard_size: int = DEFAULT_SHARD_BYTES,
         seed: int = DEFAULT_SEED) -> Plan:
    """Plan a merge without reading tensor data.

    Args:
        config: a YAML file path, YAML text, or a parsed MergeConfig (a pipeline's first stage is planned).
        out_shard_size: largest output shard in bytes.
        seed: the DARE mask seed.
    Returns:
        The Plan: `plan.tasks` (one per output tensor, with resolved parameters), `plan.shards`.
    Example:
        >>> p = streammerge.plan("merge.yml")
        >>> [t.ctx.shared["t"] for t in p.tasks[:3]]
    """
    return make_plan(_configs(config)[0], out_shard_size, seed)


def merge(config: str | os.PathLike[str] | MergeConfig, out: str | os.PathLike[str], max_memory: int | None = None,
          out_shard_size: int = DEFAULT_SHARD_BYTES, seed: int = DEFAULT_SEED, overwrite: bool = False,
          restart: bool = False, progress: Progress | None = None, device: str = "cpu", overlap: bool | None = None,
          max_gpu_memory: int | None = None) -> list[RunStats]:
    """Merge into folder `out`; resumes an interrupted run there. Pipelines run every stage.

    Args:
        config: a YAML file path, YAML text, or a parsed MergeConfig.
        out: the output folder.
        max_memory: the process's memory budget in bytes (default: half the available RAM).
        overwrite: replace a finished output; restart: discard an unfinished one.
        device: "cpu", "cuda", "cuda:N" or "auto"; max_gpu_memory: the GPU's budget in bytes.
        overlap: read ahead and write behind on helper threads (default: with 4 or more cores);
            output bytes are the same either way.
    Returns:
        One RunStats per stage (one for a plain config).
    Example:
        >>> streammerge.merge("merge.yml", "merged", max_memory=2 << 30)[-1].manifest_hash
    """
    configs = _configs(config)
    budget = max_memory or default_max_memory()
    dev = resolve_device(device)
    options: dict[str, Any] = {"overlap": overlap, "max_gpu_memory": max_gpu_memory}
    if len(configs) > 1:
        return run_pipeline(configs, str(out), budget, progress, None, overwrite, restart, out_shard_size, seed,
                            device=dev, **options)
    p = make_plan(configs[0], out_shard_size, seed, device=dev)
    return [Executor(p, str(out), budget, progress, overwrite=overwrite, restart=restart, **options).run()]


def verify(out: str | os.PathLike[str], inputs: bool = False) -> Report:
    """Re-hash every tensor and shard of `out` against its manifest (and the inputs, if asked).

    Raises:
        IntegrityError: listing every problem.
    Example:
        >>> streammerge.verify("merged").tensors
    """
    return _verify(str(out), inputs)
