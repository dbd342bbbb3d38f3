"""K-fold cross-validation as one result: the run folders of ``train --fold k/K`` (one job per fold) read
back, checked to be folds of one partition, and summarised two ways.

- mean ± sd over the folds of each test metric (the convention of CLAM and most MIL papers: the spread
  says how much the estimate moves with the split);
- pooled out-of-fold metrics: every slide predicted once, by the model that did not see it, scored
  together (one AUROC over the cohort; Hastie, Tibshirani & Friedman, ESL §7.10), with percentile-bootstrap
  intervals over the slides. Pooling mixes K models whose scores need not share a scale, so the two can
  differ; both are reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.errors import TubError


def _read_fold(run_dir: Path) -> dict:
    """What one fold's run folder holds, or a one-line error saying why it is not a finished fold run."""
    import yaml

    from tubcli.io import read_json
    from tubcli.runs import DONE

    config = run_dir / "config.yaml"
    if not run_dir.is_dir() or not config.is_file():
        raise TubError(f"{run_dir} is not a run folder of `tub xmil train --fold k/K` (no config.yaml)")
    cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    if not cfg.get("fold"):
        raise TubError(f"{run_dir}: a run without --fold; give the run folders of `tub xmil train --fold k/K`")
    if not (run_dir / DONE).is_file():
        raise TubError(f"{run_dir}: fold {cfg['fold']} has not finished (no {DONE}); wait for its job or rerun it")
    preds = run_dir / "outputs" / "test_predictions.csv"
    if not preds.is_file():
        raise TubError(f"{run_dir}: no outputs/test_predictions.csv (a run of an earlier tub-xmil); train that "
                       "fold again with this version")
    meta = read_json(run_dir / "checkpoints" / "model.json")
    k, n = (int(v) for v in str(cfg["fold"]).split("/"))
    return {"dir": run_dir, "fold": k, "folds": n, "seed": cfg.get("seed"), "task": meta.get("task", cfg.get("task")),
            "classes": meta.get("classes"), "predictions": preds, "fold_labels": run_dir / "outputs" / "fold_labels.csv"}


def _slides_of(fold_labels: Path) -> tuple[set[str], set[str]]:
    """(all slide ids, the held-out ones) of a fold's ``fold_labels.csv``."""
    import csv

    with open(fold_labels, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {r["slide_id"] for r in rows}, {r["slide_id"] for r in rows if r["split"] == "test"}


def read_folds(run_dirs: list[Path], log) -> list[dict]:
    """The folds, sorted by k; an error when they cannot be folds of one partition (other K, seed, task,
    classes or slides; a fold given twice; overlapping test sets), a warning when some are missing."""
    folds = sorted((_read_fold(Path(d)) for d in run_dirs), key=lambda f: f["fold"])
    first = folds[0]
    for before, f in zip(folds, folds[1:]):
        for key, what in (("folds", "K"), ("seed", "--seed"), ("task", "task"), ("classes", "classes")):
            if f[key] != first[key]:
                raise TubError(f"{f['dir']} has {what} {f[key]}, {first['dir']} has {first[key]}: not folds of one "
                               "cross-validation; give the runs of one partition")
        if f["fold"] == before["fold"]:
            raise TubError(f"fold {f['fold']}/{f['folds']} is given twice ({before['dir']} and {f['dir']}); give "
                           "each fold's run once")
    all_ids, held = None, set()
    for f in folds:
        ids, test = _slides_of(f["fold_labels"])
        if all_ids is not None and ids != all_ids:
            raise TubError(f"{f['dir']} was trained on other slides than {first['dir']} ({len(ids ^ all_ids)} differ): "
                           "the folds come from different labels files")
        if held & test:
            raise TubError(f"{f['dir']}: its test slides overlap another fold's (e.g. {sorted(held & test)[0]}): "
                           "not folds of one partition")
        all_ids, held = ids, held | test
    missing = sorted(set(range(first["folds"])) - {f["fold"] for f in folds})
    if missing:
        log.warning("folds %s of %d are missing: the summary covers %d of %d folds (%d of %d slides)",
                    ", ".join(map(str, missing)), first["folds"], len(folds), first["folds"], len(held), len(all_ids))
    return folds


def summarize(folds: list[dict], bootstrap: int, seed: int, log) -> tuple[dict, list[dict], list, np.ndarray]:
    """(metrics, one row per fold, pooled slides, pooled predictions) of :func:`read_folds`'s folds."""
    from tub_xmil.predictions import read_predictions
    from tub_xmil.training import bootstrap_slides, task_metrics

    task, classes = folds[0]["task"], folds[0]["classes"]
    rows, pooled, preds = [], [], []
    for f in folds:
        slides, p = read_predictions(f["predictions"], task, classes)
        for s in slides:
            s.fold = f["fold"]
        rows.append({"fold": f"{f['fold']}/{f['folds']}", "run": str(f["dir"]), "test_slides": len(slides),
                     **task_metrics(slides, p, task)})
        pooled += slides
        preds.append(p)
    preds = np.concatenate(preds)
    names = [k for k in rows[0] if k not in ("fold", "run", "test_slides")]
    out = {"task": task, "folds": len(folds), "of_folds": folds[0]["folds"], "slides": len(pooled)}
    for name in names:
        v = np.array([r[name] for r in rows], float)
        ok = v[np.isfinite(v)]
        if len(ok) < len(v):
            log.warning("%s is undefined on %d fold(s) (e.g. a test fold of one class): mean and sd over the other %d",
                        name, len(v) - len(ok), len(ok))
        out[f"mean_{name}"] = float(ok.mean()) if len(ok) else float("nan")
        out[f"sd_{name}"] = float(ok.std(ddof=1)) if len(ok) > 1 else float("nan")
    out.update({f"pooled_{k}": v for k, v in task_metrics(pooled, preds, task).items()})
    if bootstrap and len(pooled) > 1:
        from tubcli.stats import say_if_rough

        ci = bootstrap_slides(pooled, preds, task, bootstrap, seed)
        say_if_rough(log, bootstrap, ci["units"], unit=f"{ci['unit']}s")
        out["pooled_ci"] = ci
    return out, rows, pooled, preds


def per_fold_median_split(pooled: list, preds: np.ndarray) -> np.ndarray:
    """High risk (bool per pooled slide): above the median risk of its own fold's model, as survival-MIL
    papers stratify cross-validated cohorts; the risks of K models share no scale, so one pooled median
    would split by model as much as by patient."""
    from tub_xmil.metrics import median_split

    fold_of = np.array([s.fold for s in pooled])
    high = np.zeros(len(pooled), bool)
    for k in np.unique(fold_of):
        high[fold_of == k] = median_split(preds[fold_of == k, 0])
    return high


def out_of_fold_rows(folds: list[dict]) -> list[dict]:
    """Every fold's prediction rows as written, each with the fold it was held out in."""
    import csv

    rows = []
    for f in folds:
        with open(f["predictions"], newline="", encoding="utf-8") as fh:
            rows += [{"fold": f"{f['fold']}/{f['folds']}", **r} for r in csv.DictReader(fh)]
    return rows
