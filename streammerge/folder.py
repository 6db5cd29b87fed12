"""The output folder's policy: new, resume, up to date, overwrite, or refuse; and what of it is ours.

Imports output, journal, writer, planner, format, errors (and xxhash). streammerge deletes or
replaces only what it can prove it wrote (output.owned_files); it never writes into an input's
folder; a folder holding anything else is refused with nothing changed. On a resume, tensors an
earlier run journaled are kept only if their bytes still hash as journaled.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable

import xxhash

from .errors import OutputError
from .format import blocks, preader
from .journal import JOURNAL_FILE, PLAN_FILE, WORK_DIR, Journal, RunLock
from .output import (
    FILES_RECORD,
    INDEX,
    MANIFEST,
    finished_output,
    manifest_field,
    output_files,
    owned_files,
    recorded_files,
)
from .planner import Plan
from .units import size_str
from .writer import PARTIAL

WORK_FILES = (PLAN_FILE, JOURNAL_FILE, FILES_RECORD)
_PARTIAL_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors" + re.escape(PARTIAL))


class OutputFolder:
    """OUT as one run of `plan` sees it.

    Example:
        >>> folder = OutputFolder("merged", plan, overwrite=False, restart=False)
        >>> if not folder.up_to_date(notes.append):
        ...     lock = folder.prepare()
    """

    def __init__(self, path: str, plan: Plan, overwrite: bool = False, restart: bool = False,
                 replace_changed: bool = False, copy_tokenizer: bool = True, write_card: bool = True) -> None:
        """Args:
            overwrite: replace a finished output, even an identical one.
            restart: discard an unfinished run instead of resuming it.
            replace_changed: replace a finished output made from another plan (a pipeline's own stages).
        """
        self.path, self.plan = path, plan
        self.overwrite, self.restart, self.replace_changed = overwrite, restart, replace_changed
        self.copy_tokenizer, self.write_card = copy_tokenizer, write_card
        self.ours: set[str] = set()  # files a previous run provably wrote (output.owned_files)

    def up_to_date(self, note: Callable[[str], None]) -> bool:
        """True when OUT already holds this exact merge, intact (`note` says so, or why it is redone).

        Raises:
            OutputError: OUT holds a finished merge of something else, and nothing allows replacing it.
        """
        if not finished_output(self.path):
            return False
        if manifest_field(self.path, "plan_fingerprint") == self.plan.fingerprint and not self.overwrite:
            broken = [s.name for s in self.plan.shards if not _has_size(os.path.join(self.path, s.name), s.size)]
            files = recorded_files(self.path)
            broken += sorted(files - owned_files(self.path)) if files else []
            if not broken:
                note(f"{self.path} already holds this exact merge (plan {self.plan.fingerprint[:12]}); nothing to do "
                     "(`streammerge verify` re-hashes it)")
                return True
            note(f"{self.path} holds this merge, but {broken[0]} is missing or changed since; merging again")
            return False
        if not (self.overwrite or self.replace_changed):
            raise OutputError(f"{self.path} already holds a finished merge ({MANIFEST}) of a different config or "
                              "inputs; pass --overwrite to replace it, or choose another output folder")
        return False

    def prepare(self) -> RunLock:
        """Make OUT ready to write (created, locked, cleared of what an old run of ours left).

        Raises:
            OutputError: OUT is unusable, an input's folder, or holds files streammerge did not write.
        """
        out = self.path
        if os.path.exists(out) and not os.path.isdir(out):
            raise OutputError(f"{out} exists and is not a folder; choose another output path")
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot create the output folder ({e.strerror})") from e
        if not os.access(out, os.W_OK):
            raise OutputError(f"{out} is not writable; choose a folder you can write to")
        self._refuse_input_folder()
        work = os.path.join(out, WORK_DIR)
        finished = finished_output(out)
        if not finished and not os.path.isdir(work) and any(not n.startswith(".") for n in os.listdir(out)):
            raise OutputError(f"{out} is not empty and holds no streammerge run; choose an empty or new folder "
                              "(nothing there was changed)")
        lock = RunLock(out)
        try:
            self.ours = owned_files(out)
            # the shard files a loader looks for first must be ours or absent, even where this
            # layout does not write them: a stray model.safetensors would be loaded instead
            will_write = {MANIFEST, "model.safetensors", INDEX, *(s.name for s in self.plan.shards),
                          *output_files(self.plan, out, self.copy_tokenizer, self.write_card)}
            in_the_way = sorted(n for n in will_write if os.path.lexists(os.path.join(out, n)) and n not in self.ours)
            if in_the_way:
                raise OutputError(f"{out} holds {', '.join(in_the_way[:5])}{' ...' if len(in_the_way) > 5 else ''}, "
                                  "which streammerge did not write (or which changed since it did) and would have "
                                  "to replace; move them away or choose another folder (nothing there was changed)")
            if finished or self.restart:
                _remove_outputs(out, self.ours)
                self.ours = set()
        except BaseException:
            lock.release()
            raise
        return lock

    def check_disk_space(self) -> None:
        """Refuse before any work when the filesystem cannot hold the shards still to write."""
        need = 0
        for shard in self.plan.shards:
            have = 0
            for name in (shard.name + PARTIAL, shard.name):
                path = os.path.join(self.path, name)
                if os.path.exists(path):
                    have = os.stat(path).st_blocks * 512  # allocated, not apparent, size
            need += max(0, shard.size - have)
        free = shutil.disk_usage(self.path).free
        if need > free:
            raise OutputError(f"{self.path}: not enough disk space: the output needs {size_str(need)} more, "
                              f"{size_str(free)} is free; free some space (or choose another folder) and run again")

    def unrename(self, shard_name: str) -> None:
        """A kill during finalisation may have renamed a shard already; it is still ours to finish."""
        final = os.path.join(self.path, shard_name)
        partial = final + PARTIAL
        if shard_name in self.ours and os.path.exists(final) and not os.path.exists(partial):
            os.replace(final, partial)

    def check_kept(self, journal: Journal) -> list[str]:
        """Journaled tensors are trusted only if their bytes in the shard still hash as journaled: the
        rest are forgotten, so they are merged again. Returns their names."""
        damaged = []
        tasks = self.plan.tasks
        for shard in self.plan.shards:
            path = os.path.join(self.path, shard.name + PARTIAL)
            if not os.path.exists(path):
                path = os.path.join(self.path, shard.name)  # renamed by a finalisation that was killed
            kept = [tasks[ti] for ti in shard.tasks if journal.done(tasks[ti].name, tasks[ti].fingerprint)]
            if not kept:
                continue
            try:
                with open(path, "rb") as f:
                    for t in kept:
                        h = xxhash.xxh3_128()
                        for block in blocks(preader(f), t.begin, t.nbytes):
                            h.update(block)
                        if h.hexdigest() != journal.entries[t.name].xxh3_128:
                            damaged.append(t.name)
            except FileNotFoundError:
                damaged += [t.name for t in kept]
        journal.forget(damaged)
        return damaged

    def remove_work(self) -> None:
        """The run is finished: its work folder goes."""
        shutil.rmtree(os.path.join(self.path, WORK_DIR))

    def _refuse_input_folder(self) -> None:
        here = os.path.realpath(self.path)
        for m in self.plan.models:
            if os.path.realpath(m.folder) == here:
                raise OutputError(f"{self.path} is the folder of the input model {m.ref}; streammerge never "
                                  "writes into an input's folder: choose another output folder")


def _has_size(path: str, size: int) -> bool:
    try:
        return os.path.isfile(path) and os.path.getsize(path) == size
    except OSError:
        return False


def _remove_outputs(out: str, ours: set[str]) -> None:
    """Unlink (never truncate) what a previous run provably wrote (`ours`), so mmapped readers keep
    their pages; nothing else in `out` is touched. Keeps the work folder's lock, which the caller holds."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name == WORK_DIR:
            for inner in os.listdir(path):  # only the work folder's own files (the lock stays)
                if inner in WORK_FILES or inner.endswith(".tmp"):
                    os.unlink(os.path.join(path, inner))
        elif name in ours or (_PARTIAL_SHARD.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path)):
            os.unlink(path)  # an unfinished run's shards carry streammerge's own names and suffix
