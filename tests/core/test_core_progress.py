"""Progress: bars on the terminal's stderr, never on stdout (which carries the results); plain lines in batch logs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tubcli.errors import TubError
from tubcli.progress import log_every

BAR = ("import time; from tubcli.progress import setup_logging, steps, track; setup_logging()\n"
       "for _ in track(range(2), desc='tiles'):\n"
       "    with steps(25, 'inner steps') as advance:\n"
       "        for _ in range(25): time.sleep(0.06); advance(1)\n"
       "print('{\"result\": 1}')")


def test_bars_are_drawn_on_the_terminal_stderr_and_stdout_keeps_only_the_results():
    """The items' bar, and under it the steps of a long item, go to the terminal's stderr."""
    master, slave = os.openpty()  # stderr is a terminal, stdout a pipe (`tub ... --json > out.json`)
    env = {k: v for k, v in os.environ.items() if k != "TUB_NO_PROGRESS"}
    proc = subprocess.run([sys.executable, "-c", BAR], stdout=subprocess.PIPE, stderr=slave, env=env, timeout=60)
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal is closed and drained
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    assert proc.returncode == 0
    assert proc.stdout == b'{"result": 1}\n'
    assert b"tiles" in terminal and b"inner steps" in terminal


@pytest.mark.parametrize("value", ["30s", "0", "-5", "nan"])
def test_a_bad_log_interval_is_a_one_line_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("TUB_LOG_EVERY", value)
    with pytest.raises(TubError, match="TUB_LOG_EVERY"):
        log_every()
    monkeypatch.setenv("TUB_LOG_EVERY", "2.5")
    assert log_every() == 2.5


def test_each_test_starts_with_a_propagating_tub_logger(monkeypatch, caplog):
    """A CLI run stops the "tub" logger propagating; the autouse isolation resets it, else caplog sees
    its records only when no CLI test ran before (CI's order failed where the local one passed)."""
    from tubcli.progress import get_logger, setup_logging
    from tubcli.testing import isolate_environment

    setup_logging()
    assert not get_logger().propagate
    isolate_environment(monkeypatch)
    with caplog.at_level("WARNING", logger="tub"):
        get_logger().warning("seen by caplog")
    assert "seen by caplog" in caplog.text and not get_logger().handlers
