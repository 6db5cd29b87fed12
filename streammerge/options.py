"""How a merge runs: one options object, shared by the command line and the Python API.

Imports units and errors. Every `streammerge run` option has a field here, and `plan` reads the
fields that change a plan (shard size, seed, device, vocabulary truncation). Sizes may be
given as the command line takes them (`"512MiB"`, `"5B"`) or as ints; `resolved()` turns them
into bytes once, naming the option that is wrong.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import OptionError
from .units import parse_size

DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's default `5B`, counted in bytes
DEFAULT_SEED = 0
RAY_WRITE = ("auto", "workers", "driver")
MAX_THREADS = 1024  # -j above this is a typo, not a machine (each thread holds its own sub-chunks)


@dataclass(frozen=True)
class RunOptions:
    """What `streammerge run` and `streammerge.merge()` take besides the config and OUT.

    Example:
        >>> RunOptions(max_memory="2GiB", device="cpu", overwrite=True).resolved().max_memory
        2147483648
    """

    max_memory: int | str | None = None  # the whole process's budget; None: half the available RAM
    out_shard_size: int | str = DEFAULT_SHARD_BYTES  # largest output shard; 0 or less: one shard
    seed: int = DEFAULT_SEED  # the DARE keep-masks' seed
    device: str = "cpu"  # cpu, cuda, cuda:N, auto
    max_gpu_memory: int | str | None = None  # GPU bytes blocks may use; None: 80% of what is free
    overwrite: bool = False  # replace a finished output in OUT
    restart: bool = False  # discard an unfinished run in OUT instead of resuming it
    overlap: bool | None = None  # helper threads read ahead and write behind; None: executor.default_overlap
    truncate_vocab: bool = False  # --unsafe-truncate-embeddings
    copy_tokenizer: bool = True
    write_card: bool = True  # README.md and mergekit_config.yml
    intermediate_dir: str | None = None  # pipelines: where earlier stages go (default OUT.stages/)
    num_threads: int | None = None  # kernels' CPU threads, 1..MAX_THREADS; None or 0: executor.compute_threads
    chunk_bytes: int | None = None  # fix the chunk buffers' size instead (tests and benchmarks)
    ray: str | None = None  # run the tasks on Ray: "local" (start one here), "auto", "ray://host:port", ...
    workers: int | None = None  # Ray: tasks running at once; None: as many as the cluster's resources allow
    ray_cpus: float = 1.0  # Ray: CPUs each task asks for (its kernels' threads)
    ray_gpus: float | None = None  # Ray: GPUs each task asks for; None: 1 with a CUDA device, else 0
    ray_write: str = "auto"  # Ray: who writes rows: "workers" (OUT shared), "driver", "auto" (probe)

    def resolved(self) -> RunOptions:
        """These options with sizes in bytes.

        Raises:
            OptionError: a size that is not one, naming its option.
        """
        try:
            return self._resolved()
        except ValueError as e:
            raise OptionError(str(e)) from None

    def _resolved(self) -> RunOptions:
        if self.ray_write not in RAY_WRITE:
            raise ValueError(f"ray_write {self.ray_write!r}: use one of {', '.join(RAY_WRITE)}")
        if self.num_threads is not None and not 0 <= self.num_threads <= MAX_THREADS:
            raise ValueError(f"num_threads {self.num_threads}: give 1 to {MAX_THREADS} threads (0 or none: every "
                             "core this process may use)")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers {self.workers}: give at least 1")
        if self.ray_cpus <= 0 or (self.ray_gpus is not None and self.ray_gpus < 0):
            raise ValueError("ray_cpus must be above 0 and ray_gpus at least 0")
        mem = self.max_memory
        gpu = self.max_gpu_memory
        return dataclasses.replace(
            self,
            max_memory=None if mem is None else parse_size(mem, "max_memory", positive=True),
            out_shard_size=parse_size(self.out_shard_size, "out_shard_size"),
            max_gpu_memory=None if gpu is None else parse_size(gpu, "max_gpu_memory", positive=True))

    @property
    def memory_bytes(self) -> int | None:
        assert self.max_memory is None or isinstance(self.max_memory, int), "resolve the options first"
        return self.max_memory

    @property
    def shard_bytes(self) -> int:
        assert isinstance(self.out_shard_size, int), "resolve the options first"
        return self.out_shard_size

    @property
    def gpu_bytes(self) -> int | None:
        assert self.max_gpu_memory is None or isinstance(self.max_gpu_memory, int), "resolve the options first"
        return self.max_gpu_memory
