"""Thread limits for the native libraries (OpenMP in scikit-learn's kNN/k-means, BLAS in the probes).

On a shared or small machine the libraries' default of one spinning thread per core can be many times
slower than one thread (k-means on 1,000 rows: 40 s vs 0.3 s on a loaded 2-core box), while results do not
depend on the thread count. Verbs therefore default to ``--threads 1``; ``--threads 0`` keeps the
libraries' defaults.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def limit_threads(n: int | None):
    if not n or n < 1:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n)):
        yield
