"""The Python API, for notebooks and scripts: merge, plan, verify. The command line calls these.

Imports pipeline, executor, verifier, planner, options, config. Same behaviour as the command
line, errors raised as StreamMergeError subclasses instead of exit codes. Every `run` option
is a RunOptions field, given to `merge` and `plan` as keyword arguments (or as one object).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .config import MergeConfig
from .distributed import ray_session
from .errors import OptionError
from .executor import Progress, RunStats, cores, default_threads, resolve_device
from .options import RunOptions
from .pipeline import check_pipeline, run_pipeline
from .planner import Plan, parse
from .verifier import Report
from .verifier import verify as _verify

Config = str | os.PathLike[str] | MergeConfig | list[MergeConfig]


def configs_of(config: Config) -> list[MergeConfig]:
    """The configs of a YAML file path, YAML text, a parsed MergeConfig, or a pipeline's list of them."""
    if isinstance(config, MergeConfig):
        return [config]
    if isinstance(config, list):
        return config
    text = str(config)
    if "\n" not in text and os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            return parse(f.read(), text)
    return parse(text, "config")


def options_of(options: RunOptions | None, overrides: dict[str, Any]) -> RunOptions:
    """`options` (default: the defaults) with keyword overrides, sizes parsed, the device resolved.

    Raises:
        OptionError: an unknown option, or a value that is not usable.
    """
    fields = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(fields))}")
    opts = dataclasses.replace(options or RunOptions(), **overrides).resolved()
    if opts.ray is not None and opts.device.strip().lower().split(":")[0] == "cuda":
        return dataclasses.replace(opts, device="cuda")  # the workers' GPUs, not this machine's: Ray assigns them
    return dataclasses.replace(opts, device=resolve_device(opts.device))


def plan(config: Config, out: str | os.PathLike[str] = "merged", options: RunOptions | None = None,
         **overrides: Any) -> Plan:
    """Plan a merge without reading tensor data; a pipeline is checked whole and its last stage returned.

    Args:
        config: a YAML file path, YAML text, a parsed MergeConfig, or a list of them (a pipeline).
        out: where the output would go (a pipeline's intermediate stages are named after it).
        options, overrides: as for `merge`; those that shape a plan are used (out_shard_size, seed,
            device, truncate_vocab, intermediate_dir).
    Returns:
        The Plan: `plan.tasks` (one per output tensor, with resolved parameters), `plan.shards`.
    Raises:
        ConfigError, InputError, PlanError: exactly what `merge` would raise before reading a tensor.
    Example:
        >>> p = streammerge.plan("merge.yml")
        >>> [t.ctx.shared["t"] for t in p.tasks[:3]]
    """
    return plans(config, out, options, **overrides)[-1]


def plans(config: Config, out: str | os.PathLike[str] = "merged", options: RunOptions | None = None,
          **overrides: Any) -> list[Plan]:
    """Every stage's plan (one for a plain config), each against what the stages before it will write."""
    return check_pipeline(configs_of(config), str(out), options_of(options, overrides), quiet=False)


def merge(config: Config, out: str | os.PathLike[str], options: RunOptions | None = None,
          progress: Progress | None = None, **overrides: Any) -> list[RunStats]:
    """Merge into folder `out`; resumes an interrupted run there. Pipelines run every stage.

    Args:
        config: a YAML file path, YAML text, a parsed MergeConfig, or a list of them (a pipeline).
        out: the output folder.
        options: a RunOptions; keyword arguments override its fields: max_memory (the whole
            process's budget: bytes or "512MiB"; default half the available RAM), out_shard_size,
            seed, device ("cpu", "cuda", "cuda:N", "auto"), max_gpu_memory, overwrite, restart,
            overlap, truncate_vocab, copy_tokenizer, write_card, intermediate_dir, num_threads.
        progress: told of the run's progress (the CLI's bar is one).
    Returns:
        One RunStats per stage (one for a plain config).
    Example:
        >>> streammerge.merge("merge.yml", "merged", max_memory="2GiB")[-1].manifest_hash
    """
    opts = options_of(options, overrides)
    import torch

    before = torch.get_num_threads()
    if opts.num_threads:
        torch.set_num_threads(opts.num_threads)
    else:  # torch counts the host's cores, not the container's quota
        torch.set_num_threads(default_threads(cores(), before))
    try:
        with ray_session(opts.ray, cores()):
            return run_pipeline(configs_of(config), str(out), opts, progress)
    except RuntimeError as e:
        if "can't start new thread" not in str(e):  # CPython's words when the system refuses a thread
            raise
        raise OptionError(f"the system refused another thread ({torch.get_num_threads()} compute threads asked "
                          "for, and their helpers): its limit on threads or processes is reached (ulimit -u, a "
                          "container's pids.max); run again with a smaller -j/--num-threads, and the merge resumes "
                          "where it stopped") from None
    finally:
        torch.set_num_threads(before)  # the caller's torch is left as it was


def verify(out: str | os.PathLike[str], inputs: bool = False) -> Report:
    """Re-hash every tensor and shard of `out` against its manifest (and the inputs, if asked).

    Raises:
        IntegrityError: listing every problem.
    Example:
        >>> streammerge.verify("merged").tensors
    """
    return _verify(str(out), inputs)
