"""The run journal in OUT/.streammerge/: a lock, the plan, and one line per finished tensor.

Imports errors and writer. Protocol (DESIGN.md): tensor bytes written → data synced →
journal line appended and synced. So every journaled tensor is on disk; anything not
journaled is redone. A torn last line (a kill mid-append) is ignored. The lock is an
flock, which the kernel releases when its holder dies: a killed run leaves no live lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
from dataclasses import asdict, dataclass, field

from .errors import OutputError
from .writer import disk_error, write_file_atomic

WORK_DIR = ".streammerge"
PLAN_FILE = "plan.json"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "lock"


@dataclass(frozen=True)
class Entry:
    """One finished tensor, and the content hashes of the input tensors it read."""

    name: str
    fingerprint: str
    shard: str
    offset: int
    nbytes: int
    xxh3_128: str
    inputs: dict[str, str] = field(default_factory=dict)  # "model-index/tensor" -> xxh3-128 of its bytes
    stats: dict[str, object] | None = None  # what the merge did to it (stats.TensorStats.record), for the report


class RunLock:
    """An exclusive lock on an output folder's work directory, held for the whole run."""

    def __init__(self, out_dir: str) -> None:
        self.dir = os.path.join(out_dir, WORK_DIR)
        path = os.path.join(self.dir, LOCK_FILE)
        if os.path.islink(self.dir):
            raise OutputError(f"{self.dir} is a link; streammerge keeps its work folder inside the output folder "
                              "and never follows one out of it: remove the link (nothing was changed)")
        try:
            os.makedirs(self.dir, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise disk_error(path, e) from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise OutputError(f"{out_dir}: another streammerge run (pid {holder}) is writing this folder; wait for "
                              "it to finish or stop it, then run again") from e
        os.ftruncate(self.fd, 0)  # the lock file is ours alone now
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


class Journal:
    """The journal of output folder `out_dir` for a plan; reopens a compatible earlier run.

    An earlier run is compatible when its layout fingerprint (shard names and header bytes)
    equals this plan's: then each journaled tensor whose task fingerprint is unchanged is
    kept, and the rest are redone. Otherwise OutputError, unless `restart`.
    """

    def __init__(self, out_dir: str, fingerprint: str, layout: str, summary: dict[str, object]) -> None:
        self.dir = os.path.join(out_dir, WORK_DIR)
        self.entries: dict[str, Entry] = {}
        self.resumed = False
        plan_path = os.path.join(self.dir, PLAN_FILE)
        try:
            old = _read_json(plan_path)
            if old is not None:
                if old.get("layout") != layout:
                    raise OutputError(f"{out_dir} holds an unfinished merge whose output layout differs from this "
                                      "config's (other tensors, shapes, dtypes or shards); run again with --restart to "
                                      "discard it, or choose another output folder")
                self._read()
                self.resumed = True
            if old is None or old.get("fingerprint") != fingerprint:
                body = {"fingerprint": fingerprint, "layout": layout, **summary}
                write_file_atomic(plan_path, json.dumps(body, indent=2, sort_keys=True).encode())
            self.fd = os.open(os.path.join(self.dir, JOURNAL_FILE),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise disk_error(self.dir, e) from e

    def _read(self) -> None:
        """Every valid line; a damaged line is skipped (its tensor is redone), and a torn tail (a kill
        mid-append) is cut off before anything is appended, so no later line is glued to it."""
        path = os.path.join(self.dir, JOURNAL_FILE)
        if os.path.islink(path):
            raise OutputError(f"{path} is a link, not a journal streammerge wrote; remove it (nothing was changed)")
        if not os.path.exists(path):
            return
        end = 0  # just past the last complete line
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                end += len(line)
                try:
                    e = Entry(**json.loads(line))
                    if not isinstance(e.name, str) or not isinstance(e.xxh3_128, str):
                        raise TypeError("not an entry")
                except (ValueError, TypeError):
                    continue
                self.entries[e.name] = e
        if os.path.getsize(path) > end:
            os.truncate(path, end)

    def forget(self, names: list[str]) -> None:
        """Drop entries whose bytes turned out not to be what they record: those tensors are redone."""
        for name in names:
            self.entries.pop(name, None)

    def done(self, name: str, fingerprint: str) -> Entry | None:
        """The journal entry of tensor `name` if finished under the same task fingerprint."""
        e = self.entries.get(name)
        return e if e is not None and e.fingerprint == fingerprint else None

    def append(self, *entries: Entry) -> None:
        """Record finished tensors (their bytes must already be synced), with one fsync."""
        data = b"".join(json.dumps(asdict(e), sort_keys=True).encode() + b"\n" for e in entries)
        try:
            crash_point("journal-append")
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            raise disk_error(os.path.join(self.dir, JOURNAL_FILE), e) from e
        for entry in entries:
            self.entries[entry.name] = entry
        crash_point("journal-synced")

    def close(self) -> None:
        os.close(self.fd)


def _read_json(path: str) -> dict[str, object] | None:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else {}
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # unreadable: treated as a different layout


# --- fault injection, for the kill tests ------------------------------------------------
# STREAMMERGE_CRASH_AT=N makes the process SIGKILL itself at the N-th crash point it
# reaches; STREAMMERGE_CRASH_TRACE=FILE appends each point's name to FILE. Unset (always, in
# normal use) a crash point costs one dictionary lookup.
_crash = {"count": 0}


def crash_point(name: str) -> None:
    """A named place where the kill tests may kill this process for real."""
    at = os.environ.get("STREAMMERGE_CRASH_AT")
    trace = os.environ.get("STREAMMERGE_CRASH_TRACE")
    if at is None and trace is None:
        return
    _crash["count"] += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_crash['count']} {name}\n")
    if at is not None and _crash["count"] == int(at):
        once = os.environ.get("STREAMMERGE_CRASH_ONCE")  # a file: only the process that creates it dies
        if once is not None:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
