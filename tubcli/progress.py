"""Logging and progress: rich bars on a terminal, plain periodic lines in batch jobs (SLURM logs)."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
LOGGER_NAME = "tub"


def setup_logging(verbosity: int = 0, logfile=None) -> logging.Logger:
    """Configure the ``tub`` logger: stderr (WARNING with -q, INFO, DEBUG with -v; ERROR at -2, the
    other ranks of a torchrun job, whose warnings would repeat rank 0's) and ``tub.log``."""
    log = logging.getLogger(LOGGER_NAME)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    level = logging.ERROR if verbosity < -1 else logging.WARNING if verbosity < 0 else \
        logging.DEBUG if verbosity > 0 else logging.INFO
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(level)
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(stream)
    if logfile is not None:
        fileh = logging.FileHandler(logfile, encoding="utf-8")  # file names in any locale
        fileh.setLevel(logging.DEBUG)
        fileh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fileh)
    return log


def log_file_only(log: logging.Logger, message: str, level: int = logging.ERROR) -> None:
    """A line for ``tub.log`` alone: the terminal gets its own one-line error, the log must not end
    silently (a job killed at walltime would read as one still running)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def use_bars() -> bool:
    """Bars only on an interactive terminal and when not quiet."""
    if os.environ.get("TUB_NO_PROGRESS", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return sys.stderr.isatty() and _stream_level() <= logging.INFO


def _stream_level() -> int:
    for handler in get_logger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            return handler.level
    return logging.INFO


def log_every() -> float:
    """Seconds between progress lines in batch jobs: ``TUB_LOG_EVERY`` (default 30)."""
    value = os.environ.get("TUB_LOG_EVERY", "30")
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        from tubcli.errors import TubError

        raise TubError(f"TUB_LOG_EVERY={value!r} is not a number of seconds > 0; set it like TUB_LOG_EVERY=60 or unset it")
    return seconds


_BAR = None  # the rich Progress that track() is drawing, where steps() adds its line


def track(iterable: Iterable[T], total: int | None = None, desc: str = "", every: float | None = None) -> Iterator[T]:
    """Iterate with progress: a rich bar on a terminal, else a log line every ``every`` seconds."""
    global _BAR
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if use_bars():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        # on stderr, where use_bars() found the terminal: stdout carries only the results
        with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
            outer, _BAR = _BAR, bar
            try:
                task = bar.add_task(desc or "working", total=total)
                for item in iterable:
                    yield item
                    bar.advance(task)
            finally:
                _BAR = outer
        return
    every = log_every() if every is None else every
    log = get_logger()
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every:
            last = now
            log.info("%s %s", desc or "progress", _status(done, total, now - start))


@contextmanager
def steps(total: int, desc: str, every: float | None = None) -> Iterator[Callable[[int], None]]:
    """Progress inside one long item (the steps of an integral, the bags of an occlusion): yields
    ``advance(n)``. On a terminal a second line under the items' bar once the item has run a second;
    in batch logs a line every ``every`` seconds (``TUB_LOG_EVERY``) with the time left, so that an item
    of minutes or hours is not silent. Items shorter than that print nothing."""
    start = last = time.monotonic()
    done = 0
    if _BAR is not None:
        bar, task = _BAR, None

        def advance(n: int = 1) -> None:
            nonlocal done, task
            done += n
            if task is None and time.monotonic() - start >= 1.0:
                task = bar.add_task(f"  {desc}", total=total, completed=done)
            elif task is not None:
                bar.update(task, completed=done)
        try:
            yield advance
        finally:
            if task is not None:
                bar.remove_task(task)
        return
    every = log_every() if every is None else every
    log = get_logger()

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= every and done < total:
            last = now
            log.info("%s %s", desc, _status(done, total, now - start))
    yield advance


def _status(done: int, total: int | None, elapsed: float) -> str:
    """'12/40 (3.1 s each, about 1.5 min left)': the rate as items per second or seconds per item."""
    rate = done / max(elapsed, 1e-9)
    pace = f"{rate:.2f}/s" if rate >= 1 else f"{duration(1 / rate)} each" if done else "starting"
    if not total:
        return f"{done} ({pace})"
    left = f", about {duration((total - done) / rate)} left" if done and done < total else ""
    return f"{done}/{total} ({pace}{left})"


def duration(seconds: float) -> str:
    """A human length of time: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
