"""Per-slide predictions as CSV: what a ROC curve, a calibration plot or a pooled cross-validation
estimate is made from (the metrics alone cannot be pooled or re-plotted).

Columns: ``slide_id``, ``split``, then by task
- classification: ``label`` and ``predicted`` (class names), ``p_<class>`` per class (softmax);
- regression: ``target``, ``prediction``;
- survival: ``time``, ``event``, ``risk`` (higher: earlier event)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tubcli.errors import TubError


def prediction_fields(task: str, classes: list[str] | None) -> list[str]:
    if task == "classification":
        return ["slide_id", "split", "label", "predicted", *[f"p_{c}" for c in classes]]
    if task == "regression":
        return ["slide_id", "split", "target", "prediction"]
    return ["slide_id", "split", "time", "event", "risk"]


def write_predictions(path: Path, slides, preds: np.ndarray, task: str, classes: list[str] | None,
                      split: str | None = None) -> Path:
    """``preds`` as :func:`tub_xmil.training.predict` gives them, one row per slide; ``split``: the split
    they were predicted as (a cross-validation fold's test slides are 'train' rows of the labels CSV)."""
    from tubcli.io import write_csv

    rows = []
    for s, p in zip(slides, preds):
        row = {"slide_id": s.slide_id, "split": split or s.split}
        if task == "classification":
            row.update(label=classes[int(s.label)], predicted=classes[int(np.argmax(p))],
                       **{f"p_{c}": repr(float(v)) for c, v in zip(classes, p)})
        elif task == "regression":
            row.update(target=repr(float(s.label)), prediction=repr(float(p[0])))
        else:
            row.update(time=repr(float(s.time)), event=int(s.event), risk=repr(float(p[0])))
        rows.append(row)
    fields = prediction_fields(task, classes)
    if any(case_of(s) for s in slides):  # the patients, for intervals that resample them
        fields.append("case_id")
        for row, s in zip(rows, slides):
            row["case_id"] = case_of(s) or ""
    return write_csv(path, rows, fields)


def case_of(slide) -> str | None:
    """The patient/case of a slide (a labels CSV's case_id/patient_id column), or None."""
    return (getattr(slide, "extra", None) or {}).get("case_id") or None


def read_predictions(path: Path, task: str, classes: list[str] | None) -> tuple[list, np.ndarray]:
    """(slides, preds) from a file of :func:`write_predictions`, in the form ``task_metrics`` takes."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in prediction_fields(task, classes) if c not in (reader.fieldnames or [])]
        if missing:
            raise TubError(f"{path}: no column {', '.join(missing)} (a {task} predictions file of tub xmil has "
                           f"{', '.join(prediction_fields(task, classes))})")
        rows = list(reader)
    slides, preds = [], []
    for r in rows:
        case = {"extra": {"case_id": r["case_id"]}} if r.get("case_id") else {}
        try:
            if task == "classification":
                slides.append(SimpleNamespace(slide_id=r["slide_id"], label=float(classes.index(r["label"])), **case))
                preds.append([float(r[f"p_{c}"]) for c in classes])
            elif task == "regression":
                slides.append(SimpleNamespace(slide_id=r["slide_id"], label=float(r["target"]), **case))
                preds.append([float(r["prediction"])])
            else:
                slides.append(SimpleNamespace(slide_id=r["slide_id"], time=float(r["time"]), event=int(r["event"]),
                                              **case))
                preds.append([float(r["risk"])])
        except ValueError as e:
            raise TubError(f"{path}: slide {r.get('slide_id')!r}: {e}; the file is not as tub xmil wrote it") from None
    return slides, np.asarray(preds, float).reshape(len(rows), -1)
