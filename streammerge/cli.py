"""The `streammerge` command line: run (the default), plan, verify, hash. The only module that
imports click (and tqdm).

Exit codes belong to error classes (errors.py); bad option values are usage errors (2).
`streammerge CONFIG OUT --cuda ...` works like `mergekit-yaml CONFIG OUT --cuda ...`: every
mergekit-yaml flag is accepted, doing what it means here or saying once why it is not needed.
"""

from __future__ import annotations

import atexit
import collections
import gc
import json
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from ._version import __version__
from .config import ConfigWarning, MergeConfig
from .errors import ConfigError, OutputError, StreamMergeError
from .options import DEFAULT_SEED, MAX_THREADS, RunOptions
from .progress import Progress, Totals
from .units import parse_size, size_str

if TYPE_CHECKING:  # the modules that import torch load with the command that needs them, not with
    # --help, --version or a usage error (importing torch takes seconds)
    from .executor import RunStats
    from .planner import Plan, Task


class ByteSize(click.ParamType):
    """A size in bytes: 512M, 2GiB, 5B (mergekit's billions), 1000000."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_size(value, "size", self.positive)
        except ValueError as e:
            self.fail(str(e).removeprefix("size: "), param, ctx)

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive  # a memory budget must be; a shard size of 0 or less means no limit


def _load(config_path: str) -> list[MergeConfig]:
    """The configs in a file: one, or a pipeline's stages."""
    try:
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"cannot read the config file ({e.strerror})"], config_path) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); save the "
                           "config as UTF-8"], config_path) from None
    from .planner import parse

    return parse(text, config_path)


def _guard(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn library errors into a message and their exit code; a traceback only with -v."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        verbose = kwargs.get("verbose", 0)
        _loaded()
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


class _DefaultRun(click.Group):
    """`streammerge CONFIG OUT ...` means `streammerge run CONFIG OUT ...` (mergekit-yaml's shape)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultRun, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="streammerge")
def main() -> None:
    """Merge large language models with mergekit configs, streaming, inside a memory budget.

    `streammerge CONFIG OUT` is short for `streammerge run CONFIG OUT`.
    """


def _loaded() -> None:
    """Where entry() holds the cyclic garbage collector off, load what every command imports (torch,
    the planner, the executor) still without it, then freeze what the imports made and collect
    from here on.

    Importing them makes ~170,000 objects that live as long as the process, and the collector
    walked them all at each full collection: four while importing, one or two more during a merge
    (0.6-0.8 s of a 3-model TIES run on this project's 2-core machine; 0.1 s with them frozen and
    the import uncollected). In-process callers of main keep their collector as they set it."""
    if gc.isenabled():
        return
    from . import api  # noqa: F401

    gc.freeze()
    gc.enable()


def quiet_blas() -> None:
    """Before numpy is imported: its BLAS (OpenBLAS in pip's wheels) on the calling thread alone,
    unless OPENBLAS_NUM_THREADS says otherwise. OpenBLAS starts a thread per core but one at
    numpy's import, each spinning ~0.1 s for work before it sleeps (0.0996 s of CPU on this 2-core
    machine's one, with no BLAS call made); on the lent 16-core machine threads Python did not
    start took 3.8 s of CPU in every DARE-TIES run, beside the merge's own 23 s, and on a busy
    laptop that is CPU taken from everything else. streammerge's numpy products are of n x n
    matrices (n the models: the spherical methods), which one thread does at once."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def entry() -> None:
    """The console script and `python -m streammerge`: main(), then the process ends at once.

    When main has returned, every file it wrote is closed and synced; what is left of a normal
    exit is tearing the interpreter down, object by object (torch's and numba's modules among
    them), about a second on this project's 2-core machine (a linear merge of the medium set:
    8.5-8.9 s against 7.1-8.0 s of wall time). So, in the order interpreter exit does them: any
    thread that is not a daemon joined, the atexit handlers run (Ray's shutdown, logging's, weakref
    finalizers), the standard streams flushed; then os._exit with main's status (an exception that
    escapes main is left to the interpreter). In-process callers (tests, the API) call main.
    The garbage collector is off until a command has loaded its modules (_loaded).
    """
    gc.disable()
    quiet_blas()
    try:
        main()
        code = 0
    except SystemExit as e:  # sys.exit's rule: None is 0, an int itself, anything else printed and 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say there
            pass
    os._exit(code)


_shard = click.option("--out-shard-size", type=ByteSize(), default="5B", show_default=True,
                      help="Largest output shard, in bytes (K/M/B suffixes: 10^3/10^6/10^9); 0 or less: no limit, "
                           "one shard, as in mergekit.")
_seed = click.option("--random-seed", "--seed", "seed", type=int, default=DEFAULT_SEED, show_default=True,
                     help="Seed of the DARE keep-masks (counter-based: the same bytes every run).")
_mem = click.option("--max-memory", type=ByteSize(positive=True), default=None,
                    help="Memory budget for the whole process (e.g. 1GiB). Default: half the available RAM.")
_verbose = click.option("-v", "--verbose", count=True, help="Show tracebacks for errors.")

# mergekit-yaml flags that have nothing to do here, and why (said once when given)
_NOT_NEEDED = {
    "allow_crimes": "--allow-crimes: not needed, streammerge checks tensor names and shapes, not architecture names",
    "lazy_unpickle": "--lazy-unpickle: not needed, safetensors shards are memory-mapped and read by rows",
    "low_cpu_memory": "--low-cpu-memory: not needed, memory is bounded by --max-memory",
    "read_to_gpu": "--read-to-gpu: not needed, row chunks are moved to the device as they are merged",
    "trust_remote_code": "--trust-remote-code: not needed, streammerge never runs model code",
    "clone_tensors": "--clone-tensors: not needed, every output tensor is written from its own buffer",
    "async_write": "--async-write: not needed, output is written in place as it is merged",
    "write_threads": "--write-threads: not needed, output is written in place as it is merged",
    "multi_gpu": "--multi-gpu: one process uses one device; for one task stream per GPU run with --ray --device cuda",
    "lora_merge_cache": "--lora-merge-cache: not needed, adapters are applied row by row as they are read",
    "lora_merge_dtype": "--lora-merge-dtype: not needed, an adapted weight keeps its base tensor's dtype",
}


def _mergekit_options(fn: Callable[..., None]) -> Callable[..., None]:
    opts = [
        click.option("--cuda/--no-cuda", default=False, help="Merge on the GPU (same as --device cuda)."),
        click.option("--device", default="cpu", show_default=True,
                     help="Where the kernels run: cpu, cuda, cuda:N, or auto (cuda when a GPU is visible)."),
        click.option("--max-gpu-memory", type=ByteSize(), default=None,
                     help="GPU memory the merge may use, e.g. 8GiB [default: 80% of what is free]."),
        click.option("--overlap/--no-overlap", default=None,
                     help="Read ahead and write behind on helper threads while kernels run "
                          "[default: with 4 or more cores; with 2 or more for linear, slerp, task_arithmetic "
                          "and passthrough, which compute less than they read]."),
        click.option("--gpu-rich/--no-gpu-rich", default=False, help="mergekit's all-GPU switch: here, --device cuda."),
        click.option("-j", "--num-threads", type=click.IntRange(0, MAX_THREADS), default=None,
                     help=f"CPU threads for the kernels, at most {MAX_THREADS} (default, or 0: a thread per core "
                          "this process may use, at most 4, or 2 for linear, slerp, task_arithmetic and "
                          "passthrough: past that the merges wait on memory)."),
        click.option("--transformers-cache", type=click.Path(file_okay=False), default=None,
                     help="A Hugging Face cache folder to look in first."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
                     help="Copy the donor's tokenizer files."),
        click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
                     help="Write README.md and mergekit_config.yml."),
        click.option("--safe-serialization/--no-safe-serialization", default=True, hidden=True),
        # mergekit's switches with nothing to do here: both forms accepted (mergekit-yaml takes --no-X too)
        *(click.option(f"--{flag}/--no-{flag}", default=False, hidden=True)
          for flag in ("allow-crimes", "lazy-unpickle", "low-cpu-memory", "read-to-gpu", "trust-remote-code",
                       "clone-tensors", "async-write", "multi-gpu")),
        click.option("--write-threads", type=int, default=None, hidden=True),
        click.option("--lora-merge-cache", default=None, hidden=True),
        click.option("--lora-merge-dtype", default=None, hidden=True),
        click.option("--unsafe-truncate-embeddings", is_flag=True,
                     help="Merge embeddings and heads of different vocabulary sizes over their common first rows."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _apply_mergekit_options(opts: dict[str, Any]) -> str:
    """Do what the mergekit flags mean; say once why the others are not needed. Returns the device."""
    for key, why in _NOT_NEEDED.items():
        if opts.get(key):
            click.echo(f"note: {why}", err=True)
    if not opts.get("safe_serialization", True):
        click.echo("note: --no-safe-serialization: streammerge writes safetensors only", err=True)
    if opts.get("transformers_cache"):
        os.environ["HF_HUB_CACHE"] = os.path.abspath(opts["transformers_cache"])
    from .executor import resolve_device

    flag = "--cuda" if opts.get("cuda") else "--gpu-rich" if opts.get("gpu_rich") else None
    if flag is None:
        return str(opts.get("device", "cpu"))  # the API resolves it (Ray's workers' GPUs with --ray)
    if opts.get("ray") is not None:
        return "cuda"  # the Ray workers' GPUs, which need not be on this machine
    device = resolve_device("auto")  # mergekit's flags ask for a GPU where there is one
    if device == "cpu":
        click.echo(f"note: {flag}: torch sees no CUDA GPU here; merging on the CPU", err=True)
    return device


class _Live(Progress):
    """What both progress displays count, and a ticker thread that shows it every `every_s`
    seconds, so the clock, the rate and the memory move even inside one large tensor."""

    every_s = 0.5

    def __init__(self) -> None:
        self._stage = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.totals = Totals(0, 0, 0, 0, 0, 0)
        self.tensors_done = self.bytes_written = self.bytes_read = 0
        self.current = ""
        self.t0 = time.monotonic()
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(self.t0, 0)])

    def stage(self, index: int, count: int, name: str) -> None:
        self._stage = f"stage {index}/{count} {name}"

    def start(self, totals: Totals) -> None:
        with self._lock:
            self.totals = totals
            self.tensors_done, self.bytes_written, self.bytes_read = totals.done_tensors, totals.done_bytes, 0
            self.current, self.t0 = "", time.monotonic()
            self._samples = collections.deque([(self.t0, 0)])  # (when, bytes read by then)
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, name="streammerge-progress", daemon=True)
        self._ticker.start()

    def tensor(self, name: str) -> None:
        self.current = name

    def read(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def written(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_written += nbytes

    def committed(self, tensors: int, nbytes: int) -> None:
        with self._lock:
            self.tensors_done += tensors

    def close(self) -> None:
        """Stop the ticker and show the final counts (after an interruption too: what a resume keeps)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
            self.show(final=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            self.show()

    RATE_WINDOW_S = 60.0

    def rate(self) -> float:
        """Input bytes per second over the last minute (since the start, in the first one): bytes
        arrive in bursts (a tensor's passes, a busy machine), and a rate over a short span made the
        ETA swing tenfold."""
        now = time.monotonic()
        samples = self._samples
        samples.append((now, self.bytes_read))
        while len(samples) > 2 and now - samples[1][0] >= self.RATE_WINDOW_S:
            samples.popleft()
        t0, b0 = samples[0]
        return (self.bytes_read - b0) / (now - t0) if now > t0 else 0.0

    def eta(self, rate: float) -> str:
        left = self.totals.read_bytes - self.bytes_read
        if rate <= 0 or left <= 0:
            return ""
        secs = int(left / rate)
        return f", ETA {secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}" if secs >= 3600 else \
            f", ETA {secs // 60}:{secs % 60:02d}"

    def show(self, final: bool = False) -> None:
        raise NotImplementedError

    def memory(self) -> str:
        import psutil

        return f"RSS {size_str(psutil.Process().memory_info().rss)} of {size_str(self.totals.budget)}"


class _Bar(_Live):
    """A tqdm bar on a terminal over the input bytes read (the rate comparable to the disk's), with
    the tensors committed (what a resume keeps), the output written, memory against the budget,
    and the tensor being merged."""

    def __init__(self) -> None:
        super().__init__()
        self.bar: Any = None

    def note(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else lambda m: click.echo(m, err=True))(msg)

    def start(self, totals: Totals) -> None:
        from tqdm import tqdm

        class Bar(tqdm):  # type: ignore[misc]  # tqdm's stubs
            figures = ""

            @property
            def format_dict(self) -> dict[str, Any]:
                return {**super().format_dict, "figures": self.figures}

        # one unit style (size_str's KiB/MiB/GiB) for every figure: tqdm draws only the bar itself
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
            sized = size.columns > 0 and size.lines > 0
        except (OSError, ValueError):
            sized = False
        # a terminal that reports no size (some pseudo-terminals) gets 120 x 24, not a hidden bar
        self.bar = Bar(total=totals.read_bytes, file=sys.stderr, dynamic_ncols=sized, ncols=None if sized else 120,
                       nrows=None if sized else 24, mininterval=0.2,
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {figures}",
                       desc=f"{self._stage + ' ' if self._stage else ''}read")
        super().start(totals)
        self.show()

    def read(self, nbytes: int) -> None:
        super().read(nbytes)
        if self.bar is not None:
            self.bar.update(nbytes)  # the bar's length; the figures come from show()

    def show(self, final: bool = False) -> None:
        if self.bar is None:
            return
        with self._lock:
            t = self.totals
            elapsed = max(1e-9, time.monotonic() - self.t0)
            rate = self.rate()
            if final or rate <= 0:
                rate = self.bytes_read / elapsed  # the whole run's average
            secs = int(elapsed)
            post = (f"{size_str(self.bytes_read)} of {size_str(t.read_bytes)} at {size_str(rate)}/s, "
                    f"{secs // 60}:{secs % 60:02d}{'' if final else self.eta(rate)} | "
                    f"{self.tensors_done}/{t.tensors} tensors saved, wrote {size_str(self.bytes_written)}, "
                    f"{self.memory()}" + ("" if final or not self.current else f", {self.current}"))
        self.bar.figures = post
        self.bar.refresh()

    def close(self) -> None:
        super().close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Lines(_Live):
    """Plain progress lines, every `every_s` seconds, when stderr is not a terminal."""

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s = every_s

    def note(self, msg: str) -> None:
        click.echo(msg, err=True)

    def start(self, totals: Totals) -> None:
        super().start(totals)
        self.show()

    def show(self, final: bool = False) -> None:
        with self._lock:
            t = self.totals
            secs = max(1e-9, time.monotonic() - self.t0)
            rate = self.bytes_read / secs  # lines come every 10 s: the run's average is smooth enough
            left = t.read_bytes - self.bytes_read
            eta = f", ETA {left / rate:.0f} s" if rate > 0 and left > 0 and not final else ""
            line = (f"progress: {self._stage + ': ' if self._stage else ''}{self.tensors_done}/{t.tensors} tensors, "
                    f"{size_str(self.bytes_written)} of {size_str(t.output_bytes)} written, read "
                    f"{size_str(self.bytes_read)} of {size_str(t.read_bytes)} at {size_str(rate)}/s, "
                    f"{self.memory()}{eta}")
        click.echo(line, err=True)


def _progress(quiet: bool) -> Progress:
    if quiet:
        return Progress()
    return _Bar() if sys.stderr.isatty() else _Lines()


_run_options = [
    click.option("--overwrite", is_flag=True, help="Replace a finished output in OUT."),
    click.option("--restart", is_flag=True, help="Discard an unfinished run in OUT instead of resuming it."),
    click.option("--intermediate-dir", type=click.Path(file_okay=False), default=None,
                 help="Pipelines: where earlier stages are written (default: OUT.stages/)."),
    click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 callback=lambda _ctx, _param, value: _ray_address(value), is_eager=True,
                 help="Run the tensor tasks on Ray: a cluster's ADDRESS (auto, ray://host:port), or none to "
                      "start Ray on this machine. Needs: pip install \"streammerge[ray]\"."),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="Ray: tasks running at once [default: as many as the cluster's CPUs (GPUs) allow]."),
    click.option("--ray-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                 help="Ray: CPUs each task asks for (its kernels' threads)."),
    click.option("--ray-gpus", type=click.FloatRange(min=0), default=None,
                 help="Ray: GPUs each task asks for [default: 1 with --device cuda, else 0]."),
    click.option("--ray-write", type=click.Choice(["auto", "workers", "driver"]), default="auto", show_default=True,
                 help="Ray: workers write OUT in place (it must be on storage every node shares), or rows "
                      "travel to this machine, which writes them; auto probes OUT from every node."),
]


def _ray_address(value: str | None) -> str | None:
    """--ray's optional ADDRESS, refused when it is the config file (`run --ray CONFIG OUT`)."""
    if value is not None and (value.endswith((".yml", ".yaml")) or os.path.isfile(value)):
        raise click.BadParameter(f"{value!r} is a file, not a Ray address: --ray takes an optional ADDRESS, so "
                                 "put it after CONFIG OUT (`streammerge run CONFIG OUT --ray`) or write --ray=local",
                                 param_hint="--ray")
    return value


def _options(fn: Callable[..., None]) -> Callable[..., None]:
    """The options of `run`, which `plan` takes too (so a plan is made as the run will make it)."""
    for opt in reversed([_mem, _shard, _seed, *_run_options]):
        fn = opt(fn)
    return _mergekit_options(fn)


def _run_options_of(max_memory: int | None, out_shard_size: int, seed: int, overwrite: bool, restart: bool,
                    intermediate_dir: str | None, mk: dict[str, Any]) -> RunOptions:
    """The RunOptions the command line's options mean (the mergekit flags applied, noted once)."""
    device = _apply_mergekit_options(mk)
    return RunOptions(max_memory=max_memory, out_shard_size=out_shard_size, seed=seed, device=device,
                      max_gpu_memory=mk["max_gpu_memory"], overwrite=overwrite, restart=restart,
                      overlap=mk["overlap"], truncate_vocab=mk["unsafe_truncate_embeddings"],
                      copy_tokenizer=mk["copy_tokenizer"], write_card=mk["write_model_card"],
                      intermediate_dir=intermediate_dir, num_threads=mk["num_threads"], ray=mk.get("ray"),
                      workers=mk.get("workers"), ray_cpus=mk.get("ray_cpus", 1.0), ray_gpus=mk.get("ray_gpus"),
                      ray_write=mk.get("ray_write", "auto"))


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("-q", "--quiet/--no-quiet", default=False, help="Print only errors and the final summary.")
@_options
@_verbose
@_guard
def run(config_path: str, out: str, max_memory: int | None, out_shard_size: int, seed: int, overwrite: bool,
        restart: bool, intermediate_dir: str | None, quiet: bool, verbose: int, **mk: Any) -> None:
    """Merge the models CONFIG describes into the folder OUT.

    Rerunning the same command after an interruption resumes where it stopped. CONFIG may be
    a pipeline: several YAML documents, each with a `name` later ones can use as a model.
    """
    from .api import merge

    options = _run_options_of(max_memory, out_shard_size, seed, overwrite, restart, intermediate_dir, mk)
    configs = _load(config_path)
    results = merge(configs, out, options, _progress(quiet))
    for i, st in enumerate(results):
        _summary(st, f"stage {i + 1}: " if len(results) > 1 else "")


def seconds_str(s: float) -> str:
    """A run's time: to the hundredth of a second under 10 s (a short merge's 0.55 and 0.64 s are
    not both "0.6 s"), to the tenth above."""
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def _summary(stats: RunStats, prefix: str) -> None:
    if stats.up_to_date:
        click.echo(f"{prefix}up to date: {stats.tensors} tensors, nothing to do", err=True)
        return
    size = f", {size_str(stats.output_bytes)} in {stats.shards} shard(s)"
    click.echo(f"{prefix}done: {stats.tensors} tensors ({stats.resumed} resumed){size}, {seconds_str(stats.seconds)}, "
               f"peak RSS {stats.peak_rss / 2**20:.0f} MiB, content xxh3-128 {stats.content_hash}", err=True)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out_arg", metavar="[OUT]", required=False, type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Where the output would go (for the disk-space check; default: here).")
@click.option("--explain", "explain", metavar="TENSOR", default=None,
              help="Show where every parameter of one output tensor comes from.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_options
@_verbose
@_guard
def plan(config_path: str, out_arg: str | None, max_memory: int | None, out_shard_size: int, seed: int,
         overwrite: bool, restart: bool, intermediate_dir: str | None, out: str | None, explain: str | None,
         as_json: bool, verbose: int, **mk: Any) -> None:
    """Show what merging CONFIG into OUT will do, reading no tensor data; takes every option `run`
    takes. A pipeline is planned whole: each stage against what the stages before it will write."""
    from .api import plans as make_plans
    from .pipeline import stages

    out = out or out_arg
    options = _run_options_of(max_memory, out_shard_size, seed, overwrite, restart, intermediate_dir, mk)
    configs = _load(config_path)
    plans = make_plans(configs, out or "merged", options)
    names = [st.name for st in stages(configs, out or "merged")]
    if len(plans) > 1 and not as_json:
        click.echo(f"pipeline of {len(plans)} stages: {', '.join(names)}")
    shown = []
    for i, p in enumerate(plans):
        if explain is not None:
            if any(t.name == explain for t in p.tasks) or i == len(plans) - 1:
                click.echo((f"stage {i + 1}/{len(plans)} {names[i]}: " if len(plans) > 1 else "")
                           + _explain(p, explain))
                return
            continue
        if len(plans) > 1 and not as_json:
            click.echo(f"\n== stage {i + 1}/{len(plans)} {names[i]}")
        shown.append(_show_plan(p, max_memory, out, as_json, options))
    if as_json:
        click.echo(json.dumps(shown[0] if len(shown) == 1 else
                              {"stages": [{"name": n, **j} for n, j in zip(names, shown)]}, indent=2))


def _show_plan(p: Plan, max_memory: int | None, out: str | None, as_json: bool,
               options: RunOptions) -> dict[str, object]:
    """Print one plan (or return it as JSON)."""
    from .budget import (
        baseline_bytes,
        choose_loops_from,
        chunk_budget,
        default_max_memory,
        expected_peak,
        forms_budgets,
        kernel_forms,
        smallest_budget,
        suggested_budget,
        widest_row,
    )
    from .executor import planned_threads
    from .planner import PlannedIndex

    budget = max_memory or default_max_memory()
    both = forms_budgets(p)  # (before numba is loaded, for the loops' figure: measured without them)
    p = choose_loops_from(p, budget, both)
    need, worst = widest_row(p)
    base = baseline_bytes(p)
    smallest = smallest_budget(p, base)
    suggested = suggested_budget(smallest)
    peak = expected_peak(p, chunk_budget(p, budget, base), base)
    free = _free_space(out or ".")
    compiled, forms = kernel_forms(p)
    th = planned_threads(p, options)
    if as_json:
        return {**_plan_json(p, budget, peak, smallest, free), "suggested_max_memory_bytes": suggested,
                "kernels": {"compiled": compiled, "why": forms},
                "threads": {"compute": th.compute, "cores": th.cores, "read_ahead": th.read_ahead,
                            "reading": th.reading}}
    counts: dict[int, int] = {}
    for t in p.tasks:
        counts[len(t.inputs)] = counts.get(len(t.inputs), 0) + 1
    shape = ", ".join(f"{n} with {k} input(s)" for k, n in sorted(counts.items()))
    click.echo(f"method: {p.method.name}    models: {len(p.models)}    tensors: {len(p.tasks)} ({shape})")
    for i, m in enumerate(p.models):
        where = "written by an earlier stage" if isinstance(m.index, PlannedIndex) else m.folder
        click.echo(f"  model {i}: {m.ref}  ({where})")
    click.echo(f"output: {p.total_bytes / 1e9:.3f} GB in {len(p.shards)} shard(s): "
               + ", ".join(s.name for s in p.shards))
    enough = "enough" if free >= p.total_bytes else "NOT ENOUGH: free some space first"
    click.echo(f"disk: needs {p.total_bytes / 1e9:.3f} GB, {free / 1e9:.3f} GB free at {os.path.abspath(out or '.')}"
               f" ({enough})")
    default = "" if max_memory else " (default: half the available RAM)"
    click.echo(f"memory: --max-memory {budget / 2**20:.0f} MiB{default}"
               f", expected peak {peak / 2**20:.0f} MiB; use at least {suggested // 2**20} MiB "
               f"(one row of {worst.name if worst else '-'} needs {need / 2**20:.2f} MiB)"
               + (f"; {suggested_budget(both[0]) // 2**20} MiB with torch's forms, slower"
                  if compiled and both else ""))
    click.echo(f"kernels: {forms}")
    if p.device != "cpu":
        how = "1 thread queueing the GPU's kernels"
    else:
        why = f"-j {options.num_threads}" if options.num_threads else f"without -j a thread per core, at most {th.cap}"
        left = ", one core left to the reading" if th.reader_core else ""
        how = f"{th.compute} compute thread(s) of {th.cores} core(s) ({why}{left})"
    ahead = (f"reading ahead on {th.reading} thread(s), writing behind" if th.read_ahead else
             "reading and writing in turn (--overlap reads ahead)")
    click.echo(f"threads: {how}; {ahead}")
    click.echo("tensors:")
    for t in p.tasks:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.ctx.shared.items())
        per = _runs([",".join(f"{k}={_fmt(v)}" for k, v in ip.items()) for ip in t.ctx.input_params if ip])
        click.echo(f"  {t.name}  {list(t.shape)} {t.out_dtype}  {params}{'  [' + per + ']' if per else ''}")
    return {}


def _runs(items: list[str]) -> str:
    """Consecutive repeats collapsed: 'a ×13; b'."""
    out: list[list[object]] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1][1] = int(out[-1][1]) + 1  # type: ignore[call-overload]
        else:
            out.append([item, 1])
    return "; ".join(f"{item} ×{n}" if n != 1 else str(item) for item, n in out)


def _free_space(path: str) -> int:
    import shutil

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def _explain(p: Plan, name: str) -> str:
    task = next((t for t in p.tasks if t.name == name), None)
    if task is None:
        import difflib

        near = difflib.get_close_matches(name, [t.name for t in p.tasks], n=3)
        raise ConfigError([f"--explain: no output tensor {name!r}"
                           + (f"; did you mean {', '.join(repr(n) for n in near)}?" if near else "")])
    return "\n".join(_explain_lines(p, task))


def _explain_lines(p: Plan, t: Task) -> list[str]:
    from .lora import AdaptedIndex

    where = "not a layer tensor" if ".layers." not in t.name else f"layer {t.name.split('.layers.')[1].split('.')[0]}"
    if any("gradient" in how for how in t.provenance.values()):  # the position only where a gradient used it
        where += f"; gradients read at position {t.t:.6g} of its slice"
    lines = [f"{t.name}  {list(t.shape)} -> {t.out_dtype}  ({where})", f"method: {p.method.name}", "inputs:"]
    for k, inp in enumerate(t.inputs):
        role = " (base)" if k == t.ctx.base else ""
        index = p.models[inp.model].index
        how = index.adaptation(inp.tensor) if isinstance(index, AdaptedIndex) else None
        adapted = f"  <- adapted model: {how}" if how else ""
        lines.append(f"  {k}: {p.models[inp.model].ref} :: {inp.tensor} [{inp.dtype}]{role}{adapted}")
    lines.append("parameters:")
    for key, value in t.ctx.shared.items():
        lines.append(f"  {key} = {_fmt(value)}    from {t.provenance.get(key, '?')}")
    for k, ip in enumerate(t.ctx.input_params):
        for key, value in ip.items():
            lines.append(f"  {key}[{k}] = {_fmt(value)}    from {t.provenance.get(f'{k}.{key}', '?')}")
    return lines


def _fmt(v: object) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _plan_json(p: Plan, budget: int, peak: int, smallest: int, free: int) -> dict[str, object]:
    return {
        "fingerprint": p.fingerprint, "method": p.method.name, "seed": p.seed,
        "models": [{"ref": str(m.ref), "folder": m.folder} for m in p.models],
        "output_bytes": p.total_bytes, "disk_free_bytes": free, "max_memory_bytes": budget,
        "expected_peak_bytes": peak, "smallest_max_memory_bytes": smallest,
        "shards": [{"name": s.name, "size": s.size, "tensors": len(s.tasks)} for s in p.shards],
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.out_dtype, "shard": p.shards[t.shard].name,
                     "offset": t.begin, "inputs": [[str(p.models[i.model].ref), i.tensor] for i in t.inputs],
                     "base": t.ctx.base, "t": t.t, "shared": t.ctx.shared, "per_input": list(t.ctx.input_params),
                     "provenance": t.provenance}
                    for t in p.tasks],
    }


@main.command()
@click.argument("out", type=click.Path(file_okay=False, exists=True))
@click.option("--inputs", "check_inputs", is_flag=True, help="Also check the inputs still hold what the merge read.")
@_verbose
@_guard
def verify(out: str, check_inputs: bool, verbose: int) -> None:
    """Re-hash every tensor and shard of OUT against its streammerge.manifest.json."""
    from .verifier import verify as run_verify

    rep = run_verify(out, check_inputs)
    extra = f", {rep.inputs_checked} input model(s)" if check_inputs else ""
    click.echo(f"ok: {rep.tensors} tensors in {rep.shards} shard(s){extra} match the manifest")


@main.command("hash")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--sha256", is_flag=True, help="Also the sha256 of each shard, as the Hugging Face Hub shows it.")
@click.option("--write", "write_to", is_flag=True,
              help="Write MODEL_DIR/streammerge.manifest.json (so `streammerge verify` can check it later).")
@_verbose
@_guard
def hash_cmd(model_dir: str, sha256: bool, write_to: bool, verbose: int) -> None:
    """Print (or write) a manifest of any safetensors model folder: xxh3-128 per tensor and shard."""
    from .output import MANIFEST
    from .verifier import hash_folder

    text = json.dumps(hash_folder(model_dir, sha256), indent=2, sort_keys=True) + "\n"
    if not write_to:
        click.echo(text, nl=False)
        return
    path = os.path.join(model_dir, MANIFEST)
    if os.path.lexists(path):  # a dangling link too: never written through
        raise OutputError(f"{path} exists; remove it first if you mean to replace it")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the manifest ({e.strerror}); print it instead (without --write) "
                          "or make the folder writable") from None
    click.echo(f"wrote {path}")


@main.command("diff")
@click.argument("a", type=click.Path(file_okay=False, exists=True))
@click.argument("b", type=click.Path(file_okay=False, exists=True))
@click.option("--top", type=int, default=10, show_default=True, help="How many of the most different tensors to list.")
@click.option("--json", "as_json", is_flag=True, help="Print every tensor's figures as JSON.")
@_verbose
@_guard
def diff_cmd(a: str, b: str, top: int, as_json: bool, verbose: int) -> None:
    """Compare two model folders tensor by tensor (a streammerge output with a mergekit one, or two
    recipes): shape, dtype, largest and relative error, cosine, elements beyond one unit in the last
    place, summarised per layer. Exit 0 when they are identical or equal within rounding, 1 otherwise."""
    from .diff import diff_folders

    rep = diff_folders(a, b)
    if as_json:
        click.echo(json.dumps({"verdict": rep.verdict, "only_a": rep.only_a, "only_b": rep.only_b,
                               "tensors": [{**t.__dict__, "layer": t.layer} for t in rep.tensors]}, indent=2))
    else:
        same = sum(t.identical for t in rep.tensors)
        click.echo(f"{len(rep.tensors)} tensors in both ({same} identical), {len(rep.only_a)} only in A, "
                   f"{len(rep.only_b)} only in B: {rep.verdict.upper()}")
        for name in rep.only_a[:top]:
            click.echo(f"  only in A: {name}")
        for name in rep.only_b[:top]:
            click.echo(f"  only in B: {name}")
        for t in rep.tensors:
            if not t.comparable:
                click.echo(f"  shape differs: {t.name} {list(t.shape[0])} vs {list(t.shape[1])}")
        click.echo(f"{'layer':>10}  {'tensors':>7}  {'max rel err':>11}  {'min cosine':>12}  {'beyond 1 ulp':>12}")
        for layer, n, rel, cos, beyond in rep.by_layer():
            click.echo(f"{layer:>10}  {n:7d}  {rel:11.3e}  {cos:12.9f}  {beyond:12d}")
        worst = sorted((t for t in rep.tensors if t.comparable and not t.identical), key=lambda t: -t.rel)[:top]
        if worst:
            click.echo("most different:")
            for t in worst:
                click.echo(f"  {t.name}  [{t.dtype[0]}/{t.dtype[1]}]  rel {t.rel:.3e}  max |a-b| {t.max_abs:.3e}  "
                           f"cosine {t.cosine:.9f}  beyond 1 ulp {t.beyond_ulp}/{t.numel}")
    if rep.verdict == "different":
        sys.exit(1)


@main.command("report")
@click.argument("out", type=click.Path(file_okay=False, exists=True))
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Where the HTML report goes [default: OUT.report.html, beside OUT].")
@_verbose
@_guard
def report_cmd(out: str, html_path: str | None, verbose: int) -> None:
    """What the merge in OUT did, from what the run recorded: a short summary here, and one
    self-contained HTML page (parameter schedules, which model shaped which layers, kept share and
    sign agreement per layer, the largest and most contested tensors). Pipelines: every stage."""
    from .report import load, summary, write_html

    stages = load(out)
    path = html_path or os.path.abspath(out).rstrip("/") + ".report.html"
    write_html(stages, path)
    click.echo(summary(stages))
    click.echo(f"report: {path}")
