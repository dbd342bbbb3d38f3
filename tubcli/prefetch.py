"""Reading ahead: the next batch of tiles is read and decoded in one background thread while the current
one is embedded, so a GPU does not wait on a single-threaded slide reader (OpenSlide and PNG decoding
release the GIL). One thread, not a pool: the reader keeps the order and its memory stays ``depth``
batches."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

K = TypeVar("K")
T = TypeVar("T")


def read_ahead(read: Callable[[K], T], keys: Iterable[K], depth: int = 2) -> Iterator[tuple[K, T]]:
    """``(key, read(key))`` for each key in order, with up to ``depth`` reads running ahead of the consumer.
    A read's exception is raised where its result would have been yielded; when the consumer stops early
    (an error while computing), the reads not yet started are dropped and the thread is joined."""
    keys = iter(keys)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tub-read-ahead") as pool:
        pending: deque = deque()
        try:
            for key in keys:
                pending.append((key, pool.submit(read, key)))
                if len(pending) > depth:
                    key0, future = pending.popleft()
                    yield key0, future.result()
            while pending:
                key0, future = pending.popleft()
                yield key0, future.result()
        finally:
            for _, future in pending:
                future.cancel()
