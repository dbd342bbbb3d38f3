"""Split names of a labels CSV and of ``evaluate --split``: one alias table for train and evaluate.

Cells are matched case-insensitively after stripping; an empty cell means ``train``. Any other
value is an error: a silently unknown split would drop its slides from training and testing."""

from __future__ import annotations

SPLIT_ALIASES = {"train": ("train", "training"),
                 "val": ("val", "valid", "validation"),
                 "test": ("test", "testing", "holdout")}
ACCEPTED = "; ".join(f"{name}: {', '.join(a)}" for name, a in SPLIT_ALIASES.items())
_CANONICAL = {alias: name for name, aliases in SPLIT_ALIASES.items() for alias in aliases}


def split_name(value: str | None) -> str | None:
    """'train', 'val' or 'test' for a known name or alias (empty: 'train'); None if unknown."""
    v = (value or "").strip().lower()
    return _CANONICAL.get(v or "train")


def validation_split(slides: list, fraction: float, task: str, seed: int) -> tuple[list, list]:
    """(train, val): about ``fraction`` of the training slides held out for model selection, made when
    the labels CSV names no val split.

    Patients (a ``case_id``/``patient_id`` column) are never split between the two: their slides go
    together. Classification is stratified: each class gives its share (rounded; at least one patient of
    a class stays in training), so the selection metric sees every class wherever the class allows it.
    Seeded: the same ``--seed`` gives the same split."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cases: dict = {}
    for s in slides:
        cases.setdefault(s.extra.get("case_id") or f"slide:{s.slide_id}", []).append(s)
    strata: dict = {}
    for case, members in cases.items():  # a patient's stratum: the label of its first slide
        strata.setdefault(members[0].label if task == "classification" else None, []).append(case)
    held = set()
    for stratum in strata.values():
        k = min(int(round(len(stratum) * fraction)), len(stratum) - 1)
        held.update(stratum[i] for i in rng.permutation(len(stratum))[:k])
    largest = max(strata.values(), key=len)
    if not held and len(largest) > 1:  # every share rounds to 0: one patient of the largest stratum
        held.add(largest[int(rng.integers(len(largest)))])
    train = [s for case, members in cases.items() if case not in held for s in members]
    val = [s for case, members in cases.items() if case in held for s in members]
    return train, val
