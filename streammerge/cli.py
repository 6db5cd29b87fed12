"""The `streammerge` command line: run, plan. The only module that imports click.

Exit codes belong to error classes (errors.py); bad option values are usage errors (2).
"""

from __future__ import annotations

import json
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .config import ConfigWarning, MergeConfig, parse_documents
from .errors import ConfigError, OutputError, StreamMergeError
from .executor import RunStats
from .plan import DEFAULT_SEED, DEFAULT_SHARD_BYTES, Plan, make_plan

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "b": 10**9,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ByteSize(click.ParamType):
    """A size in bytes: 512M, 2GiB, 5B (mergekit's billions), 1000000."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            self.fail(f"{value!r} is not a size; write e.g. 512M, 2GiB or 5B", param, ctx)
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _load(config_path: str) -> list[MergeConfig]:
    """The configs in a file: one, or a pipeline's stages."""
    try:
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"cannot read the config file ({e.strerror})"], config_path) from e
    return parse_documents(text, config_path)


def _guard(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn library errors into a message and their exit code; a traceback only with -v."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        verbose = kwargs.get("verbose", 0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", ConfigWarning)
                warnings.showwarning = _show_warning
                fn(*args, **kwargs)
        except StreamMergeError as e:
            if verbose:
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume", err=True)
            sys.exit(130)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _show_warning(message: Any, category: Any, *_: Any, **__: Any) -> None:
    click.echo(f"warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streammerge")
def main() -> None:
    """Merge large language models with mergekit configs, streaming, inside a memory budget."""


_shard = click.option("--out-shard-size", type=ByteSize(), default=DEFAULT_SHARD_BYTES, show_default="5B",
                      help="Largest output shard, in bytes (K/M/B suffixes: 10^3/10^6/10^9).")
_seed = click.option("--random-seed", "--seed", "seed", type=int, default=DEFAULT_SEED, show_default=True,
                     help="Seed of the DARE keep-masks (counter-based: the same bytes every run).")
_mem = click.option("--max-memory", type=ByteSize(), default=None,
                    help="Memory budget for the merge (e.g. 1GiB). Default: half the available RAM.")
_verbose = click.option("-v", "--verbose", count=True, help="Show tracebacks for errors.")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@_mem
@_shard
@_seed
@click.option("--overwrite", is_flag=True, help="Replace a finished output in OUT.")
@click.option("--restart", is_flag=True, help="Discard an unfinished run in OUT instead of resuming it.")
@click.option("--intermediate-dir", type=click.Path(file_okay=False), default=None,
              help="Pipelines: where earlier stages are written (default: OUT.stages/).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the final summary.")
@_verbose
@_guard
def run(config_path: str, out: str, max_memory: int | None, out_shard_size: int, seed: int, overwrite: bool,
        restart: bool, intermediate_dir: str | None, quiet: bool, verbose: int) -> None:
    """Merge the models CONFIG describes into the folder OUT.

    Rerunning the same command after an interruption resumes where it stopped. CONFIG may be
    a pipeline: several YAML documents, each with a `name` later ones can use as a model.
    """
    from .budget import default_max_memory
    from .executor import Executor
    from .pipeline import run_pipeline

    configs = _load(config_path)
    budget = max_memory or default_max_memory()
    progress = None if quiet else (lambda msg: click.echo(msg, err=True))
    if len(configs) > 1:
        results = run_pipeline(configs, out, budget, progress, intermediate_dir, overwrite, restart,
                               out_shard_size, seed)
        for i, st in enumerate(results):
            _summary(st, f"stage {i + 1}: ")
        return
    plan = make_plan(configs[0], out_shard_size, seed)
    _summary(Executor(plan, out, budget, progress, overwrite=overwrite, restart=restart).run(), "", plan)


def _summary(stats: RunStats, prefix: str, plan: Plan | None = None) -> None:
    if stats.up_to_date:
        click.echo(f"{prefix}up to date: {stats.tensors} tensors, nothing to do", err=True)
        return
    size = f", {plan.total_bytes / 1e9:.3f} GB in {len(plan.shards)} shard(s)" if plan else ""
    click.echo(f"{prefix}done: {stats.tensors} tensors ({stats.resumed} resumed){size}, {stats.seconds:.1f} s, "
               f"peak RSS {stats.peak_rss / 2**20:.0f} MiB, manifest xxh3-128 {stats.manifest_hash}", err=True)


@main.command()
@click.argument("out", type=click.Path(file_okay=False, exists=True))
@click.option("--inputs", "check_inputs", is_flag=True, help="Also check the inputs still hold what the merge read.")
@_verbose
@_guard
def verify(out: str, check_inputs: bool, verbose: int) -> None:
    """Re-hash every tensor and shard of OUT against its streammerge.manifest.json."""
    from .verify import verify as run_verify

    rep = run_verify(out, check_inputs)
    extra = f", {rep.inputs_checked} input model(s)" if check_inputs else ""
    click.echo(f"ok: {rep.tensors} tensors in {rep.shards} shard(s){extra} match the manifest")


@main.command("hash")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--sha256", is_flag=True, help="Also the sha256 of each shard, as the Hugging Face Hub shows it.")
@click.option("--write", "write_to", is_flag=True,
              help=f"Write MODEL_DIR/{'streammerge.manifest.json'} (so `streammerge verify` can check it later).")
@_verbose
@_guard
def hash_cmd(model_dir: str, sha256: bool, write_to: bool, verbose: int) -> None:
    """Print (or write) a manifest of any safetensors model folder: xxh3-128 per tensor and shard."""
    import os

    from .output import MANIFEST
    from .verify import hash_folder

    text = json.dumps(hash_folder(model_dir, sha256), indent=2, sort_keys=True) + "\n"
    if not write_to:
        click.echo(text, nl=False)
        return
    path = os.path.join(model_dir, MANIFEST)
    if os.path.exists(path):
        raise OutputError(f"{path} exists; remove it first if you mean to replace it")
    with open(path, "w") as f:
        f.write(text)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@_mem
@_shard
@_seed
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_verbose
@_guard
def plan(config_path: str, max_memory: int | None, out_shard_size: int, seed: int, as_json: bool,
         verbose: int) -> None:
    """Show what merging CONFIG will do, reading no tensor data."""
    from .budget import baseline_bytes, chunk_budget, default_max_memory, expected_peak, smallest_budget, widest_row

    configs = _load(config_path)
    if len(configs) > 1:
        click.echo(f"pipeline of {len(configs)} stages: {', '.join(c.name or '?' for c in configs)}; "
                   "planning the first (later stages read earlier outputs)")
    p = make_plan(configs[0], out_shard_size, seed)
    need, worst = widest_row(p)
    budget = max_memory or default_max_memory()
    base = baseline_bytes()
    smallest = smallest_budget(p, base)
    peak = expected_peak(p, chunk_budget(p, budget, base), base)
    if as_json:
        click.echo(json.dumps(_plan_json(p, budget, peak, smallest), indent=2))
        return
    click.echo(f"method: {p.method.name}    models: {len(p.models)}    tensors: {len(p.tasks)}")
    for i, m in enumerate(p.models):
        click.echo(f"  model {i}: {m.ref}  ({m.folder})")
    click.echo(f"output: {p.total_bytes / 1e9:.3f} GB in {len(p.shards)} shard(s): "
               + ", ".join(s.name for s in p.shards))
    default = "" if max_memory else " (default: half the available RAM)"
    click.echo(f"memory: --max-memory {budget / 2**20:.0f} MiB{default}"
               f", expected peak {peak / 2**20:.0f} MiB; smallest that works {-(-smallest // 2**20)} MiB "
               f"(one row of {worst.name if worst else '-'} needs {need / 2**20:.2f} MiB)")
    click.echo("tensors:")
    for t in p.tasks:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.ctx.shared.items())
        per = "; ".join(",".join(f"{k}={_fmt(v)}" for k, v in ip.items()) for ip in t.ctx.input_params if ip)
        click.echo(f"  {t.name}  {list(t.shape)} {t.out_dtype}  {params}{'  [' + per + ']' if per else ''}")


def _fmt(v: object) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _plan_json(p: Plan, budget: int, peak: int, smallest: int) -> dict[str, object]:
    return {
        "fingerprint": p.fingerprint, "method": p.method.name, "seed": p.seed,
        "models": [{"ref": str(m.ref), "folder": m.folder} for m in p.models],
        "output_bytes": p.total_bytes, "max_memory_bytes": budget, "expected_peak_bytes": peak,
        "smallest_max_memory_bytes": smallest,
        "shards": [{"name": s.name, "size": s.size, "tensors": len(s.tasks)} for s in p.shards],
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.out_dtype, "shard": p.shards[t.shard].name,
                     "offset": t.begin, "inputs": [[str(p.models[i.model].ref), i.tensor] for i in t.inputs],
                     "base": t.ctx.base, "shared": t.ctx.shared, "per_input": list(t.ctx.input_params)}
                    for t in p.tasks],
    }
