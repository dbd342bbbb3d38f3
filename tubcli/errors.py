"""One error type for everything a user can fix (DESIGN §7)."""

from __future__ import annotations

import contextlib


class TubError(Exception):
    """A one-line message that says what was wrong and what to do.

    ``exit_code`` is 2 for bad usage or input (the default) and 1 for a run that failed.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit or preemption): unwinds like Ctrl-C, so item locks are
    released and temporary outputs removed, and a requeued job finds nothing held."""


_SIGTERM_RECEIVED = False


def on_sigterm(signum=None, frame=None):
    """The SIGTERM handler: raise :class:`Terminated`. Raised while a C extension runs (h5py, ``torch.save``),
    it reaches Python as that extension's SystemError or RuntimeError; :func:`terminating` still tells."""
    global _SIGTERM_RECEIVED
    _SIGTERM_RECEIVED = True
    raise Terminated()


def terminating(reset: bool = False) -> bool:
    """Whether SIGTERM arrived (since the last ``reset``)."""
    global _SIGTERM_RECEIVED
    received = _SIGTERM_RECEIVED
    if reset:
        _SIGTERM_RECEIVED = False
    return received


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGTERM and SIGINT back for the block (steps that must happen together, such as a trajectory
    frame and the state that resumes after it); they arrive as soon as it ends. Outside the main thread,
    where signals cannot be masked, the block runs as is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class ItemFailures(TubError):
    """Raised at the end of a batch verb when some items failed; the others were processed."""

    def __init__(self, failed: int, total: int, path, metrics: dict | None = None):
        super().__init__(f"{failed} of {total} items failed; see {path}", exit_code=1)
        self.failed = failed
        self.total = total
        self.metrics = metrics or {}  # the results of the items that did not fail (printed, then this error)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def one_line(exc: BaseException) -> str:
    """Render any exception as a single line (pydantic errors included)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if not isinstance(exc, TubError) else first
