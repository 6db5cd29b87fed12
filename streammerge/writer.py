"""Write output shards in place: NAME.partial created with its header and final size, then pwrite.

Imports errors and plan. Never truncates or overwrites an existing file: a shard is
created once, sized by extending it, filled at planned offsets, fsynced, and renamed to its
final name only when every tensor in it is written (truncating a file something has mmapped
silently turns its pages into zeros).
"""

from __future__ import annotations

import errno
import os

from .errors import OutputError
from .planner import Shard

PARTIAL = ".partial"


def disk_error(path: str, e: OSError) -> OutputError:
    """An OutputError for a failed write, saying what to do (disk full is the common case)."""
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full; free some space and run the same command again to resume")
    return OutputError(f"{path}: cannot write ({e.strerror}); check the folder's permissions and space")


class ShardWriter:
    """One output shard being filled. Use as a context manager.

    Example:
        >>> with ShardWriter(out_dir, shard) as w:
        ...     w.write(offset, data)
        ...     w.sync()
    """

    def __init__(self, out_dir: str, shard: Shard) -> None:
        self.shard = shard
        self.path = os.path.join(out_dir, shard.name + PARTIAL)
        self.final_path = os.path.join(out_dir, shard.name)
        self.fd = -1
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never through a link
            size = os.fstat(self.fd).st_size
            if size == 0:
                os.pwrite(self.fd, shard.header, 0)
                _reserve(self.fd, shard.size)
            elif size != shard.size or os.pread(self.fd, len(shard.header), 0) != shard.header:
                self.close()
                raise OutputError(f"{self.path}: an unfinished shard from another plan is in the way; run "
                                  "again with --restart to start this output over")
        except OSError as e:
            self.close()
            raise disk_error(self.path, e) from e

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Write `data` at absolute `offset`."""
        pwrite_all(self.fd, self.path, data, offset)

    def read(self, offset: int, nbytes: int) -> bytes:
        """Bytes already written (to re-hash journaled tensors on resume)."""
        return os.pread(self.fd, nbytes, offset)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise disk_error(self.path, e) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pwrite_all(fd: int, path: str, data: memoryview | bytes, offset: int) -> None:
    """Write all of `data` at absolute `offset` of the open file `path`.

    Raises:
        OutputError: the write failed (disk full, said as such).
    """
    try:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as e:
        raise disk_error(path, e) from e


def _reserve(fd: int, size: int) -> None:
    """Give an empty file its final size, with its blocks allocated where the filesystem can:
    a full disk is then reported when the shard is created, not halfway through the merge."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            os.ftruncate(fd, 0)  # our own empty file: leave it as it was
            raise
        os.ftruncate(fd, size)  # extends; the file was empty


def fsync_dir(path: str) -> None:
    """Make renames and creations in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes) -> None:
    """Write a small file via a temporary sibling and a rename: it appears whole or not at all."""
    tmp = path + ".tmp"
    try:
        if os.path.islink(tmp):
            os.unlink(tmp)  # the link itself, never what it points to
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at `path` itself, not its target
    except OSError as e:
        raise disk_error(path, e) from e
