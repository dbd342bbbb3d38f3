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
