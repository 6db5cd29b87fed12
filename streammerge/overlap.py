"""Reading ahead and writing behind: the two helper threads that overlap a run's I/O with compute.

Imports nothing of the package (torch only). `RingArena` hands out the blocks' memory from one
buffer, reused for every block of the run: fresh large allocations would come from the kernel
each time (glibc maps anything over 32 MiB), and touching their new pages costs more than
reading the inputs. `ReadAhead` loads a known sequence of blocks in order on a
thread, never holding more than a byte capacity (the current block counts until the consumer
is done with it); `WriteBehind` runs submitted calls in submission order on one thread, never
more than a byte capacity behind. Both keep the order of their work, so what they produce
does not depend on timing; both can run inline instead (no thread), which is what
`--no-overlap` does. An exception on a helper thread is raised to the caller at its next
call, and the helper does nothing more.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

S = TypeVar("S")
T = TypeVar("T")
# How often a waiting helper or caller looks again at a stop or an error no one signalled (a
# thread that died); the normal hand-offs (room freed, work queued, close) notify at once.
POLL_S = 0.05


def _one_thread() -> None:
    """A helper thread's own torch ops run on one thread: the caller's kernels keep the cores
    (torch's thread count is per thread under OpenMP)."""
    torch.set_num_threads(1)


def pinned_buffer(nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
    """`nbytes` bytes of page-locked host memory, and what unpins them (call it once the GPU no longer
    copies from them; the memory then stays valid, pageable, until its last view is dropped). The
    pages torch.empty gives, registered with CUDA (cudaHostRegister): exactly `nbytes`. torch's
    pin_memory=True goes through its caching host allocator, which rounds every allocation up to a
    power of two before cudaHostAlloc pins all of it (an arena of 300 MiB pins 512 MiB). (On the lent
    H200 machine every GPU run of TIES, DELLA and DARE-TIES peaked at 1,044-1,131 MiB of RSS at a
    1 GiB budget, every CPU run under it.) Where registering fails or torch does not see the pages
    as pinned, torch's rounded allocation, as before."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    try:
        rt = torch.cuda.cudart()
        ptr = buf.data_ptr()
        if int(rt.cudaHostRegister(ptr, nbytes, 0)) == 0:
            unpin = _Unpin(rt, ptr, buf)
            if buf.is_pinned():
                return buf, unpin
            unpin()
    except Exception:  # noqa: BLE001  (an old torch or driver: pin as torch does)
        pass
    return _torch_pinned(nbytes), lambda: None


class _Unpin:
    """Unregisters a buffer registered with CUDA, once: when called, or when dropped uncalled. It
    holds the buffer until then, so its pages are never freed while registered."""

    def __init__(self, rt: object, ptr: int, buf: torch.Tensor) -> None:
        self._rt, self._ptr = rt, ptr
        self._buf: torch.Tensor | None = buf

    def __call__(self) -> None:
        if self._buf is not None:
            try:
                self._rt.cudaHostUnregister(self._ptr)  # type: ignore[attr-defined]
            finally:
                self._buf = None

    def __del__(self) -> None:
        try:
            self()
        except Exception:  # noqa: BLE001  (a process ending: the driver lets go of it anyway)
            pass


def _torch_pinned(nbytes: int) -> torch.Tensor:
    """torch's own pinned allocation (rounded up to a power of two)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class ArenaClosed(Exception):
    """The arena was closed while a block waited for room."""


class RingArena:
    """Blocks carved in order from one buffer of `capacity` bytes and given back in the same
    order (oldest first), as a read-ahead consumes them; `take` waits while there is no room.

    Example:
        >>> arena = RingArena(1 << 30)
        >>> x = arena.take(3 * 4 * 1024, torch.float32, (3, 1024))
        >>> arena.give_back()  # the oldest block
    """

    ALIGN = 64
    # Each block's room is rounded up to ALIGN bytes; the buffer has room for that rounding of this
    # many blocks beyond the capacity asked (the read-ahead's two, a GPU's staging): a block of
    # exactly the capacity asked, not a multiple of 64 bytes, was refused as larger than the arena,
    # a traceback (a pipeline stage of 262,144-column inputs at a tight budget).
    ROUNDED_BLOCKS = 4

    def __init__(self, capacity: int, pin: bool = False) -> None:
        self.capacity = -(-capacity // self.ALIGN) * self.ALIGN + self.ROUNDED_BLOCKS * self.ALIGN
        self.pin = pin
        self._buf: torch.Tensor | None = None  # made on first use: untouched pages cost nothing
        self._unpin: Callable[[], None] = lambda: None  # a pinned buffer's unregistering
        self._live: collections.deque[tuple[int, int]] = collections.deque()  # (start, end), oldest first
        self._head = 0
        self._cv = threading.Condition()
        self._closed = False

    def take(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of `shape` in the arena (nbytes its size)."""
        size = -(-max(1, nbytes) // self.ALIGN) * self.ALIGN
        if size > self.capacity:
            raise ValueError(f"internal error: a block of {nbytes} bytes exceeds the arena's {self.capacity}")
        with self._cv:
            while (start := self._place(size)) is None:
                if self._closed:
                    raise ArenaClosed
                self._cv.wait(POLL_S)
            if self._buf is None:
                if self.pin:  # exactly the capacity: torch's pin_memory=True would pin up to twice it
                    self._buf, self._unpin = pinned_buffer(self.capacity)
                else:
                    self._buf = torch.empty(self.capacity, dtype=torch.uint8)
            self._live.append((start, start + size))
            self._head = start + size
            buf = self._buf
        return buf[start:start + nbytes].view(dtype).view(shape)

    def _place(self, size: int) -> int | None:
        """Where a block of `size` fits now, or None."""
        if not self._live:
            return 0
        tail = self._live[0][0]  # the oldest block's start
        if self._head > tail:  # live blocks lie in [tail, head): room after them, or from 0 to tail
            if self._head + size <= self.capacity:
                return self._head
            return 0 if size <= tail else None
        return self._head if self._head + size <= tail else None  # wrapped: room in [head, tail)

    def give_back(self) -> None:
        """The oldest block is free again."""
        with self._cv:
            self._live.popleft()
            self._cv.notify_all()

    def close(self) -> None:
        """Waiting takes fail (ArenaClosed); the buffer is released once its blocks are dropped (a
        pinned one once unpin() has also been called)."""
        with self._cv:
            self._closed = True
            self._buf = None
            self._cv.notify_all()

    def unpin(self) -> None:
        """A pinned buffer's pages pageable again, once no thread copies from them to the GPU (the
        reading threads joined: reader.upload waits for each of its copies); idempotent."""
        self._unpin()


class ByteGate:
    """A counting gate over bytes: `acquire` waits until the bytes fit (one item always fits)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._cv = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        """Take n bytes; False if `stop` was set while waiting."""
        with self._cv:
            while self.used and self.used + n > self.capacity:
                if stop.is_set():
                    return False
                self._cv.wait(POLL_S)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()

    def wake(self) -> None:
        """Waiting acquires look at their `stop` now, not at their next poll."""
        with self._cv:
            self._cv.notify_all()


class ReadAhead(Generic[S, T]):
    """Runs `load(spec)` for each of `specs` in order, ahead of the consumer, within `capacity` bytes.

    The consumer calls `take()` for the next (spec, block) and `done(spec)` when it no longer
    holds the block; until then the block's `cost(spec)` bytes count against the capacity.

    Example:
        >>> ahead = ReadAhead(specs, load, cost, capacity=1 << 30, threaded=True)
        >>> spec, block = ahead.take(); ...; ahead.done(spec)
        >>> ahead.close()
    """

    def __init__(self, specs: Sequence[S], load: Callable[[S], T], cost: Callable[[S], int], capacity: int,
                 threaded: bool) -> None:
        self._specs, self._load, self._cost = specs, load, cost
        self._next = 0  # the next spec to take (inline mode)
        self._gate = ByteGate(capacity)
        self._stop = threading.Event()
        self._ready: queue.Queue[tuple[S, T] | BaseException] = queue.Queue()  # a load, or its error
        self._thread: threading.Thread | None = None
        if threaded and specs:
            self._thread = threading.Thread(target=self._run, name="streammerge-read", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        _one_thread()
        for spec in self._specs:
            if not self._gate.acquire(self._cost(spec), self._stop):
                return
            if self._stop.is_set():
                return
            try:
                self._ready.put((spec, self._load(spec)))
            except BaseException as e:  # handed to the consumer, raised there
                self._ready.put(e)
                return

    def take(self) -> tuple[S, T]:
        """The next spec and what `load` gave for it."""
        if self._thread is None:
            spec = self._specs[self._next]
            self._next += 1
            return spec, self._load(spec)
        while True:
            try:
                item = self._ready.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._ready.empty():
                    raise RuntimeError("internal error: the read-ahead thread ended early") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def done(self, spec: S) -> None:
        """The consumer no longer holds `spec`'s block."""
        if self._thread is not None:
            self._gate.release(self._cost(spec))

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (before the files it reads are closed).

        The thread stops at its next gate wait or block; a block waiting for arena room is
        ended by closing the arena first."""
        self._stop.set()
        self._gate.wake()
        if self._thread is not None:
            self._thread.join()


class WriteBehind:
    """Runs submitted calls in order on one thread, at most `capacity` bytes behind the caller.

    Example:
        >>> behind = WriteBehind(capacity=8 << 20, threaded=True)
        >>> behind.submit(lambda: f.write(data), len(data))
        >>> behind.drain()  # every call ran; raises the first error
        >>> behind.close()
    """

    def __init__(self, capacity: int, threaded: bool) -> None:
        self._gate = ByteGate(capacity)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._pending: collections.deque[tuple[Callable[[], None], int]] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="streammerge-write", daemon=True)
            self._thread.start()

    def submit(self, fn: Callable[[], None], nbytes: int = 0) -> None:
        """Run `fn` after everything submitted before it; `nbytes` is what it holds until then."""
        self._raise()
        if self._thread is None:
            try:
                fn()
            except BaseException as e:
                self._error = e
                raise
            return
        if not self._gate.acquire(nbytes, self._stop):
            self._raise()
        with self._cv:
            self._pending.append((fn, nbytes))
            self._cv.notify_all()

    def drain(self) -> None:
        """Wait until every submitted call ran; raises the first error of any."""
        if self._thread is not None:
            with self._cv:
                while (self._pending or self._busy) and self._error is None:
                    self._cv.wait(POLL_S)
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:  # stays set: the thread has stopped, nothing more runs
            self._stop.set()
            raise self._error

    def _run(self) -> None:
        _one_thread()
        while True:
            with self._cv:
                while not self._pending and not self._stop.is_set():
                    self._cv.wait(POLL_S)
                if self._stop.is_set():
                    return
                fn, nbytes = self._pending.popleft()
                self._busy = True
            try:
                fn()
            except BaseException as e:  # raised to the submitter at its next call
                with self._cv:
                    self._error = e
                    self._busy = False
                    self._cv.notify_all()
                self._gate.release(nbytes)
                self._stop.set()
                return
            self._gate.release(nbytes)
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def close(self) -> None:
        """Stop (calls not yet started are dropped) and wait for the thread, woken at once (it
        waited out its POLL_S before: 4% of a 1.2 s linear merge's time)."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._gate.wake()
        if self._thread is not None:
            self._thread.join()
