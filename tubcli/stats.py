"""Statistics every plugin reports the same way."""

from __future__ import annotations

import numpy as np


def bootstrap_intervals(metric_fn, n: int, resamples: int, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of every metric ``metric_fn(indices)`` returns, over ``resamples``
    draws of n units (slides, patients) with replacement (Efron & Tibshirani 1993, ch. 13): {name: [low, high]}, plus
    ``resamples_used`` per metric (draws where it is undefined, e.g. one class for AUROC, are left out;
    a metric defined in fewer than half of them gets no interval)."""
    rng = np.random.default_rng(seed)
    draws: dict = {}
    for _ in range(resamples):
        for name, value in metric_fn(rng.integers(0, n, n)).items():
            draws.setdefault(name, []).append(value)
    out, used = {}, {}
    for name, values in draws.items():
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        used[name] = int(len(v))
        if len(v) >= resamples / 2:
            lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
            out[name] = [float(lo), float(hi)]
        else:
            out[name] = None
    return {"level": level, "resamples": resamples, **out, "resamples_used": used}


def say_if_rough(log, resamples: int, units: int, unit: str = "slides", usual: int = 1000) -> None:
    """Say when a bootstrap interval is rough rather than print it as 95% limits: percentiles of a few
    hundred draws move from seed to seed, and draws of fewer than ten units repeat the same few (two
    slides give three distinct samples), so the interval understates the uncertainty."""
    if resamples < usual // 5:
        log.warning("--bootstrap %d: the 95%% interval of so few resamples is rough; %d or more is usual",
                    resamples, usual)
    if units < 10:
        log.warning("the 95%% bootstrap interval resamples only %d %s: it understates the uncertainty; "
                    "report it with the sample size, or evaluate more %s", units, unit, unit)
