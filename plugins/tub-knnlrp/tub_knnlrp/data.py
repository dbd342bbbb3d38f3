"""Tabular data: CSV/Parquet/NPZ files with a label column, and scikit-learn's bundled sets.

Tables keep their feature names. NPZ files hold ``X`` (n, d) and optionally ``y`` (n,) and
``feature_names`` (d,), read with ``allow_pickle=False``. Nothing here downloads anything.

Missing values are errors, never data: in a feature column an empty cell or one of
:data:`MISSING_FEATURE` (NA, NaN, null, ...) asks for imputation; in the label column an empty
cell or NaN asks to drop or fill the row (other strings, "NA" included, are class names there).
Column names must be unique. Text (non-numeric) feature columns are errors too, unless the caller
reads them for a model whose pipeline encodes them (``text_ok``: kept raw in ``Table.text``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.io import load_numpy


MISSING_LABEL = ("", "nan")
MISSING_FEATURE = MISSING_LABEL + ("na", "n/a", "#n/a", "null", "none")


@dataclass
class Table:
    X: np.ndarray
    y: np.ndarray | None
    feature_names: list[str]
    target: str | None = None
    text: dict = field(default_factory=dict)  # name -> raw values of a text column (NaN in X), with text_ok


def read_table(path, target: str | None = None, require_target: bool = False, text_ok: bool = False) -> Table:
    """Read features (and the label column ``target``, if present) from CSV, Parquet or NPZ.

    With ``require_target`` the labels must be present and complete; otherwise the label column is
    only dropped from the features, and ``y`` is None when it is absent or has missing labels.
    ``text_ok`` keeps text feature columns (raw, in ``Table.text``) instead of refusing them.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise TubError(f"data file {path} {what}; pass a CSV, Parquet or NPZ file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, target, require_target)
    if suffix in (".csv", ".tsv", ".txt", ".parquet", ".pq"):
        return _read_frame(path, suffix, target, require_target, text_ok)
    raise TubError(f"{path.name}: unknown data format {suffix!r}; use .csv, .parquet or .npz")


def _read_frame(path, suffix, target, require_target, text_ok=False):
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas ships with the [shap] extra and most installs
        pd = None
    if suffix in (".parquet", ".pq"):
        if pd is None:
            raise TubError("reading Parquet needs pandas and pyarrow: pip install pandas pyarrow")
        try:
            frame = pd.read_parquet(path)
        except ImportError:
            raise TubError(f"reading {path.name} needs a Parquet engine: pip install pyarrow") from None
        except Exception as exc:
            raise TubError(f"cannot read {path.name} as Parquet: {str(exc).splitlines()[0]}") from None
        header = [str(c) for c in frame.columns]
        # pandas' missing values (NaN, None, NA) all become None
        columns = {h: frame[c].astype(object).where(frame[c].notna(), None).to_numpy()
                   for h, c in zip(header, frame.columns)}
    else:
        import csv

        sep = "\t" if suffix == ".tsv" else ","
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:  # an Excel byte-order mark
                rows = list(csv.reader(fh, delimiter=sep))
        except UnicodeDecodeError:
            raise TubError(f"{path.name} is not a text CSV file; pass a CSV, Parquet or NPZ file") from None
        rows = [r for r in rows if r]
        if len(rows) < 2:
            raise TubError(f"{path.name} has no data rows; it needs a header line and at least one row")
        header = [h.strip() for h in rows[0]]
        other = next((d for d in (";", "\t", "|") if d != sep and len(header) == 1 and d in header[0]), None)
        if other is not None:  # one column whose name holds another delimiter: European Excel, TSV as .csv
            raise TubError(f"{path.name} is not {'tab' if sep == chr(9) else 'comma'}-separated (its header "
                           f"{rows[0][0][:40]!r} is split by {other!r}); save it with commas (.csv) or tabs (.tsv), "
                           "or as Parquet")
        if _looks_like_data(header):  # a file without a header line would silently lose its first row
            raise TubError(f"{path.name}: the first line holds numbers ({', '.join(header[:3])} ...), not column "
                           "names; add a header line with the feature names (and the label column's)")
        if any(len(r) != len(header) for r in rows[1:]):
            bad = next(i for i, r in enumerate(rows[1:], start=2) if len(r) != len(header))
            raise TubError(f"{path.name} line {bad} has a different number of fields than the header")
        cols = list(zip(*rows[1:]))
        columns = {h: np.array([v.strip() for v in c]) for h, c in zip(header, cols)}
    return _split_columns(path, header, columns, target, require_target, text_ok)


def _looks_like_data(header: list[str]) -> bool:
    """Most fields numbers and one at least not an integer: no one names columns 6.3, -0.5, 1e-3 (a data
    row may end in its text label: 6.3,2.9,setosa); integer names such as pixel indices 0, 1, 2 stay allowed."""
    def number(v):
        try:
            float(v)
            return True
        except ValueError:
            return False

    numbers = [h for h in header if number(h)]
    return 2 * len(numbers) > len(header) and any(not h.lstrip("+-").isdigit() for h in numbers)


def _check_unique(path, names) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise TubError(f"{path.name} has two columns named {name!r}; rename or drop one")
        seen.add(name)


def _missing(values, tokens) -> np.ndarray:
    """Mask of missing entries: None, float NaN, or a string in ``tokens`` (case-insensitive)."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind not in "OU":
        return np.zeros(len(values), dtype=bool)

    def missing(v):
        if isinstance(v, str):
            return v.strip().lower() in tokens
        return v is None or (isinstance(v, float) and v != v)

    return np.fromiter((missing(v) for v in values.tolist()), dtype=bool, count=len(values))


def _split_columns(path, header, columns, target, require_target, text_ok=False):
    _check_unique(path, header)
    if "" in header or "Unnamed: 0" in header:  # pandas' df.to_csv() writes its row index this way
        k = header.index("") if "" in header else header.index("Unnamed: 0")
        raise TubError(f"{path.name}: column {k + 1} has no name (a row index, as pandas' to_csv writes it?); "
                       "it would count as a feature: write the file with index=False or name the column")
    if target is not None and target not in columns:
        if require_target:
            raise TubError(f"{path.name} has no column {target!r}; its columns are {', '.join(header[:8])}"
                           + (" ..." if len(header) > 8 else "") + "; choose one with --target")
        target = None
    names = [h for h in header if h != target]
    if not names:
        raise TubError(f"{path.name} has no feature columns besides the target")
    X = np.empty((len(columns[names[0]]), len(names)))
    text = {}
    for i, name in enumerate(names):
        values = np.asarray(columns[name], dtype=object)
        values[_missing(values, MISSING_FEATURE)] = np.nan  # reported as missing below, not as non-numeric
        try:
            X[:, i] = values.astype(np.float64)
        except (ValueError, TypeError):
            if not text_ok:
                raise TubError(not_numeric(path, name)) from None
            text[name], X[:, i] = values, np.nan
    numeric = np.array([n not in text for n in names])
    if not np.isfinite(X[:, numeric]).all():
        r, c = np.argwhere(~np.isfinite(X[:, numeric]))[0]
        c = np.flatnonzero(numeric)[c]
        what = "missing" if np.isnan(X[r, c]) else "infinite"
        raise TubError(f"{path.name}: {what} value in column {names[c]!r} (row {r + 1}); impute it or drop the row")
    y = _labels(path, columns[target], target, require_target) if target is not None else None
    return Table(X, y, names, target, text)


def not_numeric(path, name: str) -> str:
    return f"{Path(path).name}: column {name!r} is not numeric; encode it or drop it"


def _labels(path, raw, column: str, required: bool) -> np.ndarray | None:
    """Integer labels when every value is an integer, otherwise strings.

    A missing label is an error when the labels are ``required``; otherwise there are no labels (None).
    """
    raw = np.asarray(raw)
    missing = np.flatnonzero(_missing(raw, MISSING_LABEL))
    if len(missing):
        if not required:
            return None
        raise TubError(f"{path.name}: missing label in column {column!r} (row {missing[0] + 1}); drop or fill it")
    try:
        f = raw.astype(np.float64)
        if np.all(f == np.round(f)):
            return f.astype(np.int64)
    except (ValueError, TypeError):
        pass
    return raw.astype(str)


def _read_npz(path, target, require_target):
    def array(z, name):
        try:
            return z[name]
        except ValueError as exc:
            if "allow_pickle" not in str(exc):
                raise
            raise TubError(f"{path.name}: array {name!r} holds Python objects (dtype object, as pandas' "
                           "to_numpy() gives for text), which tub does not unpickle (that could run code); save it "
                           "with .astype(str) for labels and names, or as numbers") from None

    try:
        with load_numpy(path) as z:
            files = set(z.files)
            if "X" not in files:
                raise TubError(f"{path.name} has no array 'X'; save features as X (and labels as y)")
            X = np.asarray(array(z, "X"), dtype=np.float64)
            key = target if target in files else ("y" if "y" in files else None)
            y = _labels(path, array(z, key), key, require_target) if key is not None else None
            names = [str(n) for n in array(z, "feature_names")] if "feature_names" in files else None
    except TubError:
        raise
    except Exception as exc:
        raise TubError(f"cannot read {path.name} as NPZ: {str(exc).splitlines()[0]}") from None
    if X.ndim != 2:
        raise TubError(f"{path.name}: X must be 2-D (rows, features), got shape {X.shape}")
    if require_target and y is None:
        raise TubError(f"{path.name} has no labels; store them as 'y' (or name the array with --target)")
    if y is not None and len(y) != len(X):
        raise TubError(f"{path.name}: X has {len(X)} rows but the labels {len(y)}")
    if not np.isfinite(X).all():
        raise TubError(f"{path.name}: X contains NaN or infinite values; impute them")
    names = names or [f"x{i}" for i in range(X.shape[1])]
    if len(names) != X.shape[1]:
        raise TubError(f"{path.name}: {len(names)} feature names for {X.shape[1]} columns")
    _check_unique(path, names)
    return Table(X, y, names, "y" if y is not None else None)


def write_table_csv(path, X, feature_names, y=None, target="target") -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(feature_names) + ([target] if y is not None else []))
        for i, row in enumerate(X):
            w.writerow([repr(float(v)) for v in row] + ([y[i]] if y is not None else []))


# ---------------------------------------------------------------- bundled data (spec §5)

BUNDLED = {
    "breast_cancer": "load_breast_cancer, binary (569 × 30)",
    "digits49": "load_digits, 4 vs 9 (positive = 9; 8×8 pixels)",
    "wine01": "load_wine, class 0 vs 1 (13 features)",
    "iris_binary": "load_iris, versicolor vs virginica (4 features)",
    "iris": "load_iris, 3 classes",
    "wine": "load_wine, 3 classes",
    "digits": "load_digits, 10 classes",
}


def bundled(name: str) -> Table:
    """One of scikit-learn's bundled data sets (no download), as in spec §5."""
    from sklearn import datasets

    if name not in BUNDLED:
        raise TubError(f"unknown data set {name!r}; choose one of {', '.join(BUNDLED)}")
    if name == "breast_cancer":
        b = datasets.load_breast_cancer()
        return Table(b.data, b.target, [str(f) for f in b.feature_names], "target")
    if name in ("digits49", "digits"):
        b = datasets.load_digits()
        X, y = b.data, b.target
        if name == "digits49":
            keep = np.isin(y, [4, 9])
            X, y = X[keep], y[keep]
        return Table(X.astype(np.float64), y, [f"pixel_{r}_{c}" for r in range(8) for c in range(8)], "target")
    if name in ("wine01", "wine"):
        b = datasets.load_wine()
        X, y = b.data, b.target
        if name == "wine01":
            keep = y < 2
            X, y = X[keep], y[keep]
        return Table(X, y, [str(f) for f in b.feature_names], "target")
    b = datasets.load_iris()
    X, y = b.data, b.target
    if name == "iris_binary":
        keep = y > 0
        X, y = X[keep], y[keep]
    return Table(X, y, [str(f) for f in b.feature_names], "target")


def standard_split(X, y, seed: int = 0, test_size: float = 0.3):
    """train_test_split(test_size=0.3, random_state=seed, stratify=y) and a StandardScaler on train.

    Returns (X_train, X_test, y_train, y_test) standardised with the training statistics.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    sc = StandardScaler().fit(Xtr)
    return sc.transform(Xtr), sc.transform(Xte), ytr, yte
