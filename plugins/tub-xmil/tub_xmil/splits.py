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


def parse_fold(value: str) -> tuple[int, int]:
    """``k/K`` -> (k, K): fold k (0-based) of K >= 2, as ``--shard i/n`` is written."""
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise ValueError(f"--fold {value!r} is not k/K (e.g. 0/5: the first of five folds)") from None
    if n < 2 or not 0 <= k < n:
        raise ValueError(f"--fold {value!r}: K must be >= 2 and k one of 0..K-1")
    return k, n


def cross_validation_fold(slides: list, fold: int, folds: int, task: str, seed: int) -> tuple[list, list]:
    """(rest, held_out): fold ``fold`` of a seeded K-fold partition of the slides, held out as the test set
    (CLAM's k-fold protocol, one fold per job). Patients (``case_id``/``patient_id``) stay in one fold;
    classification is stratified: each class's patients are dealt round-robin over the folds in a seeded
    order, continuing across classes, so fold sizes differ by at most one patient per class. The same
    slides and seed give the same partition in every fold's job."""
    import numpy as np

    from tubcli.errors import TubError

    rng = np.random.default_rng(seed)
    cases: dict = {}
    for s in slides:
        cases.setdefault(s.extra.get("case_id") or f"slide:{s.slide_id}", []).append(s)
    if len(cases) < folds:
        raise TubError(f"--fold {fold}/{folds}: {len(cases)} patients/slides cannot fill {folds} folds; use fewer folds")
    strata: dict = {}
    for case, members in cases.items():  # a patient's stratum: the label of its first slide
        strata.setdefault(members[0].label if task == "classification" else None, []).append(case)
    fold_of, dealt = {}, 0
    for key in sorted(strata, key=str):
        for i in rng.permutation(len(strata[key])):
            fold_of[strata[key][i]] = dealt % folds
            dealt += 1
    rest = [s for case, members in cases.items() if fold_of[case] != fold for s in members]
    held = [s for case, members in cases.items() if fold_of[case] == fold for s in members]
    return rest, held

