"""Error types of streammerge, each with its exit code; imports nothing of the package.

Every message says what failed, where (config path, file, tensor, byte range) and what
to do. The CLI prints the message and exits with the class's code; it never shows a
traceback unless asked (-v).
"""

from __future__ import annotations


class StreamMergeError(Exception):
    """Base class: a problem the user can act on. Exit code 1."""

    exit_code = 1


class OptionError(StreamMergeError, ValueError):
    """An option's value is not usable (a size that is not one, a negative budget). Exit code 2,
    as the command line's usage errors."""

    exit_code = 2


class ConfigError(StreamMergeError):
    """The YAML config is wrong; `problems` lists every finding, each with its path."""

    exit_code = 3

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''} found"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


class InputError(StreamMergeError):
    """An input model is missing, unreadable or malformed (names the file)."""

    exit_code = 4


class PlanError(StreamMergeError):
    """Config and inputs do not fit together (shapes, layers, missing tensors, budget)."""

    exit_code = 5

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = "\n".join(
                [f"{len(self.problems)} problems found while planning the merge"]
                + [f"  - {p}" for p in self.problems]
            )
        super().__init__(msg)


class OutputError(StreamMergeError):
    """The output folder cannot be used as asked (exists, unwritable, disk full)."""

    exit_code = 6


class IntegrityError(StreamMergeError):
    """Bytes on disk do not match the manifest or journal."""

    exit_code = 7


class ClusterError(StreamMergeError):
    """A Ray cluster cannot run the merge: Ray missing, no connection, a worker or node lost."""

    exit_code = 8
