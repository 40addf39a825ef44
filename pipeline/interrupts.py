"""Stopping a process cleanly: SIGTERM (kill, docker stop, scancel, `dvc queue kill`) and Ctrl-C
become exceptions raised where the process is, so a stage unwinds as usual (its MLflow run ends
KILLED, its workspace lock is released, its last resume checkpoint stays), except inside a
`shielded()` block: a store write cut in half leaves its sqlite transaction open, so the clean-up's
own writes then wait on "database is locked" for minutes. There the signal waits for the block to end."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt."""


_depth = 0
_pending: list[BaseException] = []  # the signal that arrived inside a shielded block
_received: list[int] = []  # every signal handled, in order


def _handle(signum, frame):
    _received.append(signum)
    if signum == signal.SIGTERM:
        signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short (kill -9 still does)
    exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if _depth and not (_pending and signum == signal.SIGINT):  # a second Ctrl-C does not wait
        if not _pending:
            _pending.append(exc)
        return
    _pending.clear()
    raise exc


def install() -> None:
    """Handle SIGTERM and SIGINT as above (the CLI's entry point calls this). A signal the process
    was started ignoring (SIGINT of a background job of a non-interactive shell) stays ignored."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _handle)


def installed() -> bool:
    """Whether every KeyboardInterrupt a signal could raise here is counted by `received`: SIGINT is
    handled by `install`'s handler, or ignored (a background job of a non-interactive shell, where no
    Ctrl-C arrives at all). Python's own SIGINT handler counts nothing."""
    return signal.getsignal(signal.SIGINT) in (_handle, signal.SIG_IGN)


def received() -> int:
    """How many signals `install`'s handler has handled so far (a KeyboardInterrupt raised while this did
    not change is no Ctrl-C, but code that raised it)."""
    return len(_received)


def terminated() -> bool:
    """Whether this process got SIGTERM."""
    return signal.SIGTERM in _received


@contextmanager
def shielded():
    """Run the block whole: a signal that arrives inside it is raised when it ends (the outermost
    block), also when the block ends with an error (the signal wins: the process is being stopped)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            raise _pending.pop()
