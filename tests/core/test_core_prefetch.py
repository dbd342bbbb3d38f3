"""read_ahead: the reads of a batch loop moved to one background thread, in order, errors where they belong."""

import threading
import time

import pytest

from tubcli.prefetch import read_ahead


def test_reads_come_back_in_order_and_run_ahead_of_the_consumer():
    done = {k: threading.Event() for k in range(6)}
    started = []

    def read(k):
        started.append(k)
        done[k].set()
        return k * k

    got = []
    for k, v in read_ahead(read, range(6), depth=2):
        if k == 0:  # while the first batch is computed, the next two are read; the third waits its turn
            assert done[1].wait(10) and done[2].wait(10)
            assert 3 not in started
        got.append((k, v))
    assert got == [(k, k * k) for k in range(6)]


def test_a_read_error_is_raised_at_its_item_after_the_earlier_ones():
    def read(k):
        if k == 2:
            raise ValueError("tile 2 unreadable")
        return k

    got = []
    with pytest.raises(ValueError, match="tile 2 unreadable"):
        for k, v in read_ahead(read, range(5)):
            got.append(v)
    assert got == [0, 1]


def test_a_consumer_that_stops_leaves_no_reads_behind():
    reads = []

    def read(k):
        reads.append(k)
        time.sleep(0.02)
        return k

    gen = read_ahead(read, range(100), depth=2)
    next(gen)
    gen.close()  # e.g. an encoder error in the loop body
    done = len(reads)
    time.sleep(0.1)
    assert len(reads) == done <= 4 and not any(t.name.startswith("tub-read-ahead") for t in threading.enumerate())
