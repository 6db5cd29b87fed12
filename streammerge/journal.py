"""The run journal in OUT/.streammerge/: the plan's fingerprint, and one line per finished tensor.

Imports errors and writer. Protocol (DESIGN.md): tensor bytes written → data synced →
journal line appended and synced. So every journaled tensor is on disk; anything not
journaled is redone. A torn last line (a kill mid-append) is ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import OutputError
from .writer import disk_error, write_file_atomic

WORK_DIR = ".streammerge"
PLAN_FILE = "plan.json"
JOURNAL_FILE = "journal.jsonl"


@dataclass(frozen=True)
class Entry:
    """One finished tensor."""

    name: str
    fingerprint: str
    shard: str
    offset: int
    nbytes: int
    xxh3_128: str


class Journal:
    """Open (or start) the journal of output folder `out_dir` for a plan."""

    def __init__(self, out_dir: str, plan_fingerprint: str, plan_summary: dict[str, object]) -> None:
        self.dir = os.path.join(out_dir, WORK_DIR)
        self.entries: dict[str, Entry] = {}
        plan_path = os.path.join(self.dir, PLAN_FILE)
        try:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.exists(plan_path):
                with open(plan_path) as f:
                    old = json.load(f)
                if old.get("fingerprint") != plan_fingerprint:
                    raise OutputError(f"{out_dir} holds an unfinished merge of a different plan; run again with "
                                      "--restart to discard it, or choose another output folder")
                self._read()
            else:
                body = {"fingerprint": plan_fingerprint, **plan_summary}
                write_file_atomic(plan_path, json.dumps(body, indent=2, sort_keys=True).encode())
            self.fd = os.open(os.path.join(self.dir, JOURNAL_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise disk_error(self.dir, e) from e
        except ValueError as e:
            raise OutputError(f"{plan_path}: unreadable ({e}); run again with --restart") from e

    def _read(self) -> None:
        path = os.path.join(self.dir, JOURNAL_FILE)
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn by a kill mid-append: that tensor is redone
                try:
                    e = Entry(**json.loads(line))
                except (ValueError, TypeError):
                    break
                self.entries[e.name] = e

    def done(self, name: str, fingerprint: str) -> Entry | None:
        """The journal entry of tensor `name` if finished under the same task fingerprint."""
        e = self.entries.get(name)
        return e if e is not None and e.fingerprint == fingerprint else None

    def append(self, entry: Entry) -> None:
        """Record a finished tensor (its bytes must already be synced)."""
        line = json.dumps(entry.__dict__, sort_keys=True).encode() + b"\n"
        try:
            os.write(self.fd, line)
            os.fsync(self.fd)
        except OSError as e:
            raise disk_error(os.path.join(self.dir, JOURNAL_FILE), e) from e
        self.entries[entry.name] = entry

    def close(self) -> None:
        os.close(self.fd)
