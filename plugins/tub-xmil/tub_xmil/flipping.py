"""Label-free heatmap evaluation by patch flipping (spec §2.5; Hense et al. NeurIPS 2024 §4.2,
after Samek et al. 2017 and Blücher et al. 2024).

Patches are ranked by score (MoRF: descending, LeRF: ascending) and removed ("drop", the bag
shrinks) or added ("add", starting from the all-zero bag of full size) block by block. Block sizes
are the ``np.histogram`` counts of the scores over bins [min, pct(P), pct(2P), ..., pct(100)] (from
ascending bins whatever the order). AUPC = mean(curve); SRG = mean(LeRF - MoRF).

Tied scores (a sparse LRP map's exact zeros, binary or quantised scores) fall into one histogram bin: one
block then takes them all, and a perfect explanation of five decisive patches among 95 tied ones scores
SRG 0 at 10%-of-all. ``ties="rank"`` (not the spec's rule; opt-in) cuts blocks of equal size from the
ranking instead; :func:`tied_blocks` tells when the spec's rule merged blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from tubcli.progress import steps

from tub_xmil.tasks import prediction_score


def block_sizes(scores: np.ndarray, strategy: str = "1%-of-all", ties: str = "histogram") -> np.ndarray:
    """Patches per flipping block: the spec's histogram counts, or (``ties="rank"``) equal shares of the ranking."""
    if strategy == "one-by-one":
        return np.ones(len(scores), int)
    if not strategy.endswith("%-of-all"):
        raise ValueError(f"unknown flipping strategy {strategy!r}; use 'P%-of-all' or 'one-by-one'")
    p = int(strategy[: strategy.index("%")])
    perc = np.arange(p, 101, p)
    if perc[-1] != 100:
        perc = np.append(perc, 100)
    if ties == "rank":
        return np.diff(np.round(np.append(0, perc) / 100 * len(scores)).astype(int))
    if ties != "histogram":
        raise ValueError(f"unknown tie handling {ties!r}; use 'histogram' or 'rank'")
    bins = np.append(scores.min(), np.percentile(scores, perc))
    counts, _ = np.histogram(scores, bins=bins)
    return counts


def tied_blocks(scores: np.ndarray, strategy: str) -> bool:
    """Whether ties made the spec's histogram rule merge blocks: one block holds more than twice the patches of
    an equal share (then the flipping curve skips the steps inside it)."""
    if strategy == "one-by-one":
        return False
    sizes = block_sizes(np.asarray(scores, float), strategy)
    return bool(sizes.max() > 2 * max(1, int(np.ceil(len(scores) * int(strategy[: strategy.index("%")]) / 100))))


def flip_curve(model, x: torch.Tensor, scores: np.ndarray, task: str = "classification", target: int = 0,
               order: str = "descending", approach: str = "drop", strategy: str = "1%-of-all",
               batch: int = 16, ties: str = "histogram") -> np.ndarray:
    """f along the flipping sequence (first point: full bag for drop, zero bag for add)."""
    x = x if x.dim() == 2 else x[0]
    n = len(x)
    scores = np.asarray(scores, float)[-n:]
    ranked = np.argsort(scores, kind="quicksort")
    if order == "descending":
        ranked = ranked[::-1]
    elif order != "ascending":
        raise ValueError(f"unknown order {order!r}")
    if approach not in ("drop", "add"):
        raise ValueError(f"unknown approach {approach!r}")

    def f(bags):
        with torch.no_grad():
            return prediction_score(model(bags), task, target).cpu().numpy()

    f_full = float(f(x[None])[0])
    f_zero = float(f(torch.zeros_like(x)[None])[0])
    curve = [f_full if approach == "drop" else f_zero]
    consumed = np.cumsum(block_sizes(scores, strategy, ties)).tolist()
    # the bag after each block; an empty block (1%-of-all on a bag of < 100 patches) repeats the bag before
    # it, so each distinct bag is scored once
    subsets = {k: np.sort(ranked[k:] if approach == "drop" else ranked[:k]) for k in dict.fromkeys(consumed)}
    values = {k: f_zero if len(keep) == 0 else f_full for k, keep in subsets.items() if len(keep) in (0, n)}
    by_len: dict[int, list[int]] = {}  # the others, batched by bag size
    for k, keep in subsets.items():
        if k not in values:
            by_len.setdefault(len(keep), []).append(k)
    todo = sum(len(ks) for ks in by_len.values())
    with steps(todo, f"patch flipping ({approach}, {'MoRF' if order == 'descending' else 'LeRF'}), {todo} bags "
                     f"of up to {n} patches") as advance:
        for ks in by_len.values():
            for s in range(0, len(ks), batch):
                chunk = ks[s:s + batch]
                bags = torch.stack([x[torch.as_tensor(subsets[k])] for k in chunk])
                for k, v in zip(chunk, f(bags)):
                    values[k] = float(v)
                advance(len(chunk))
    return np.asarray(curve + [values[k] for k in consumed], float)


def slide_flipping(model, x, scores, task="classification", target=0, strategy="1%-of-all",
                   approaches=("drop", "add"), ties: str = "histogram") -> dict:
    """MoRF and LeRF curves for drop (and add); AUPC, SRG and the symmetric gain for one slide."""
    res = {}
    for appr in approaches:
        morf = flip_curve(model, x, scores, task, target, "descending", appr, strategy, ties=ties)
        lerf = flip_curve(model, x, scores, task, target, "ascending", appr, strategy, ties=ties)
        res[appr] = {"morf": morf, "lerf": lerf, "aupc_morf": float(morf.mean()),
                     "aupc_lerf": float(lerf.mean()), "srg": float(np.mean(lerf - morf))}
    if "drop" in res and "add" in res:
        # Blücher et al. symmetric gain: adding the most relevant first vs dropping it first
        res["symmetric_gain"] = float(res["add"]["morf"].mean() - res["drop"]["morf"].mean())
    return res


def false_prediction(model, x, task: str, target: int) -> bool:
    """Classification slides with p(target) <= 0.5 are excluded from the averages."""
    if task != "classification":
        return False
    with torch.no_grad():
        return float(prediction_score(model(x if x.dim() == 3 else x[None]), task, target)[0]) <= 0.5
