"""What a run reports as it goes: the interface the command line's bar and lines implement.

Imports nothing of the package. The executor says what lies ahead (`start`); the runner's
blocks report input bytes as they are taken (`read`, block by block, so progress moves inside
a large tensor); the committer reports output bytes written and, at each group commit, the
tensors journaled: the count a resume keeps. Calls may come from the main thread and the
write-behind thread; implementations lock what they share.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Totals:
    """The work of one run (one pipeline stage), and what an earlier run already did."""

    tensors: int
    output_bytes: int
    read_bytes: int  # input bytes this run reads (every pass's reads), what the disk delivers
    done_tensors: int  # kept from an earlier, interrupted run
    done_bytes: int  # their output bytes
    budget: int  # --max-memory, the whole process's


class Progress:
    """Reports nothing; the CLI draws a bar or prints lines."""

    def note(self, msg: str) -> None:
        """A one-off message (resuming, up to date)."""

    def stage(self, index: int, count: int, name: str) -> None:
        """Pipeline stage `index` (from 1) of `count` starts."""

    def start(self, totals: Totals) -> None:
        """The work ahead."""

    def tensor(self, name: str) -> None:
        """Tensor `name` is being merged."""

    def read(self, nbytes: int) -> None:
        """A block of `nbytes` input bytes was read and is being computed on."""

    def written(self, nbytes: int) -> None:
        """`nbytes` output bytes were written (not yet committed)."""

    def committed(self, tensors: int, nbytes: int) -> None:
        """`tensors` more tensors (`nbytes` output bytes) are journaled: a resume keeps them."""

    def close(self) -> None:
        """The run (the stage) is over."""
