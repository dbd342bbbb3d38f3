"""read_ahead: the reads of a batch loop moved to one background thread, in order, errors where they belong."""

import threading
import time

import pytest

from tubcli.prefetch import read_ahead


def test_reads_come_back_in_order_and_run_ahead_of_the_consumer():
    started = []

    def read(k):
        started.append(k)
        return k * k

    got = []
    for k, v in read_ahead(read, range(6), depth=2):
        time.sleep(0.01)  # the consumer computes: the reader gets ahead meanwhile
        got.append((k, v, len(started)))
    assert [(k, v) for k, v, _ in got] == [(k, k * k) for k in range(6)]
    assert got[0][2] == 3  # when the first batch is computed, the next two are already read (or being read)


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
