"""`streammerge ARGS` as a real child process that starts in milliseconds, for the tests that
kill and resume merges by the dozen.

Each child is its own OS process (its own pid, threads, files and locks; a SIGKILL ends it
mid-write as it would end `python -m streammerge`), forked from a server process that
imported streammerge, and with it torch, once per test process (multiprocessing's
forkserver). Starting `python -m streammerge` costs 2.5-4 s of CPU, mostly importing torch;
the kill-and-resume tests start ~100 of them. The server itself runs nothing, so no thread
or torch state is copied into a child. The runs whose memory is under test (test_memory's,
inside a cgroup cap) and test_rough_edges's still start `python -m streammerge` itself.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["streammerge.cli", "streammerge.api"])  # api: torch (cli loads it lazily)


@dataclass(frozen=True)
class Finished:
    """What subprocess.run(..., capture_output=True, text=True) would have returned."""

    args: list[str]
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str


def streammerge(*args: str, env: dict[str, str] | None = None, cwd: str | None = None,
                timeout: float = 300) -> Finished:
    """Run `streammerge ARGS` in a child process with `env` (default: this process's) in `cwd`
    (default: the current directory); its exit status and output as subprocess.run gives them."""
    with tempfile.TemporaryDirectory(prefix="sm-launch-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        status = os.path.join(tmp, "status")
        child = _CONTEXT.Process(target=_main, args=(list(args), dict(os.environ if env is None else env),
                                                     cwd or os.getcwd(), out, err, status))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise TimeoutError(f"streammerge {' '.join(args)} ran past {timeout} s")
        code = child.exitcode
        if code == _LOST:  # the forkserver lost the child's status (see _LOST): the child's own word
            code = _said_status(status)
        with open(out, encoding="utf-8", errors="replace") as f, open(err, encoding="utf-8", errors="replace") as g:
            return Finished(list(args), code, f.read(), g.read())


# multiprocessing's forkserver passes each child's wait status to the parent through a pipe; when
# that pipe ends without it, Process.exitcode reads 255 (popen_forkserver.poll: "perhaps the
# forkserver process itself got killed"). CI saw it once (a child SIGKILLed at a crash point while
# another child started) among thousands of launches. A child that reaches its end writes its
# status to a file first, so 255 can be told apart: the status written, or none because the child
# never reached its end, i.e. a signal ended it, and SIGKILL is the only one these tests send.
_LOST = 255


def _said_status(path: str) -> int:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read())
    except FileNotFoundError:
        return -signal.SIGKILL


def _main(args: list[str], env: dict[str, str], cwd: str, out: str, err: str, status: str) -> None:
    """The child: stdout and stderr to files, the caller's environment and directory, then the
    command line as `python -m streammerge` runs it (an uncaught exception prints its traceback
    and exits 1, as the interpreter would)."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = ["streammerge", *args]
    from streammerge.cli import main

    code = 0
    try:
        main(args=args, prog_name="streammerge")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open(status, "w", encoding="ascii") as f:
        f.write(str(code))
    os._exit(code)
