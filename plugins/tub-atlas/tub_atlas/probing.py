"""The ``evaluate`` protocol: splits, kNN and repeated linear probes on frozen embeddings (spec §2.8)."""

from __future__ import annotations

import numpy as np

from tubcli.errors import TubError
from tubcli.io import remove_figure, write_csv

from .embedding import group_split
from .features import LabelledFeatures
from .probes import (auroc, classification_metrics, knn_predict, linear_probabilities, slide_bootstrap, summarise,
                     train_linear_probe)


def resolve_splits(feats: LabelledFeatures, seed: int) -> list[str]:
    """The input's ``split`` column (checked by ``features.split_column``), else a seeded 70/15/15 group
    split by slide, stratified by class."""
    return list(feats.split) if feats.split is not None else group_split(feats.slide_id, seed, labels=feats.labels)


def sorted_classes(labels) -> list[str]:
    """Sorted class names: numerically when all are integers (1, 2, 10, as scikit-learn orders integer
    labels, so kNN ties go to the same class), else as text. Labels of one number ('1', '01') are ordered
    by their text, not by the set's hash order, which changed class indices and kNN ties between runs."""
    names = set(labels)
    try:
        return sorted(names, key=lambda name: (int(name), name))
    except ValueError:
        return sorted(names)


def run_probes(feats: LabelledFeatures, cfg, run, encoder: dict | None = None, tiling: dict | None = None) -> dict:
    """Both probes on one split; writes ``outputs/predictions.csv`` (every test row), ``outputs/splits.csv``
    (every slide), and the best linear probe with its ROC curves (``outputs/roc.png``) and ``probe.json``
    (classes, dim, ``encoder``: the embed run's encoder settings, and ``tiling``: the whole-slide tiling the
    features record (``features.features_tiling``), for ``explain`` to check)."""
    if any(lab == "" for lab in feats.labels):
        raise TubError("some embeddings have no label; probing needs a label for every row (--labels CSV)")
    classes = sorted_classes(feats.labels)
    if len(classes) < 2:
        raise TubError(f"probing needs at least two classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in feats.labels])
    split = np.array(resolve_splits(feats, run.seed))
    tr, va, te = (split == "train"), (split == "val"), (split == "test")
    if not tr.any() or not te.any():
        raise TubError(f"the split has {tr.sum()} train and {te.sum()} test rows; add slides or a split column")
    if not va.any():
        run.log.warning("no validation rows: early stopping uses the training rows")
        va = tr
    x = feats.x
    support = {part: dict(zip(classes, np.bincount(y[split == part], minlength=len(classes)).tolist()))
               for part in ("train", "val", "test")}
    for part in ("train", "test"):
        missing = [c for c, n in support[part].items() if n == 0]
        if missing:  # balanced accuracy then averages the recall of the other classes only
            run.log.warning("class(es) %s have no %s rows, so the scores say nothing about them; add slides "
                            "of those classes or give a split column", ", ".join(missing), part)
    slides = np.asarray(feats.slide_id, dtype=object)
    _say_slides_shared_by_inputs(feats, run.log)
    out: dict = {"classes": classes, "n_train": int(tr.sum()), "n_val": int((split == "val").sum()),
                 "n_test": int(te.sum()), "dim": int(x.shape[1]), "support": support,
                 **{f"n_{part}_slides": len(set(slides[split == part])) for part in ("train", "val", "test")}}
    write_splits(run, feats.slide_id, split)
    columns: dict[str, list] = {}  # predictions.csv columns of the probes that ran
    test_slides = slides[te]
    if cfg.bootstrap and len(set(test_slides)) >= 2:  # once: both probes resample the same test slides
        from tubcli.stats import say_if_rough

        say_if_rough(run.log, cfg.bootstrap, len(set(test_slides)), "test slides")
    if cfg.method in ("knn", "both"):
        k = min(cfg.k, int(tr.sum()))
        if k < cfg.k:
            run.log.warning("--k %d is more than the %d training rows; kNN uses k = %d", cfg.k, k, k)
        pred, votes = knn_predict(x[tr], y[tr], x[te], len(classes), k, cfg.vote, cfg.temperature,
                                  return_votes=True)
        m = classification_metrics(y[te], pred, len(classes))
        out["knn"] = {"k": k, "k_requested": cfg.k, "vote": cfg.vote, **m}
        if cfg.bootstrap:
            out["knn"]["ci"] = _intervals(lambda rows: {"balanced_accuracy": _bacc(y[te][rows], pred[rows], classes)},
                                          test_slides, cfg, run, "knn")
        columns["knn_pred"] = [classes[i] for i in pred]
        columns.update({f"knn_vote_{c}": votes[:, j] for j, c in enumerate(classes)})
    if cfg.method in ("linear", "both"):
        out["linear"], probe, proba = _linear_runs(x, y, tr, va, te, classes, cfg, run)
        if cfg.bootstrap:
            out["linear"]["ci"] = _intervals(lambda rows: _linear_scores(y[te][rows], proba[rows], classes),
                                             test_slides, cfg, run, "linear (best run)")
        columns["linear_pred"] = [classes[i] for i in proba.argmax(1)]
        from tubcli.plots import roc_plot

        roc_plot(run.outputs_dir / "roc.png", y[te], proba, classes, unit="test rows",
                 title=f"linear probe (best of {cfg.runs} runs on validation)")
        columns.update({f"linear_prob_{c}": proba[:, j] for j, c in enumerate(classes)})
        from tubcli.io import save_safetensors, write_json

        save_safetensors(run.outputs_dir / "probe.safetensors",
                         {"weight": probe.weight.detach().contiguous(), "bias": probe.bias.detach().contiguous()})
        write_json(run.outputs_dir / "probe.json", {"classes": classes, "dim": int(x.shape[1]), "encoder": encoder,
                                                        "tiling": tiling})
        if encoder is None:
            run.log.warning("the features come from no 'tub atlas embed' run folder: probe.json records no encoder, "
                            "so 'explain --target probe' cannot check its --arch/--pool against them")
    else:  # a probe an earlier invocation left here would be taken for this run's (its provenance too)
        for name in ("probe.safetensors", "probe.json"):
            (run.outputs_dir / name).unlink(missing_ok=True)
        remove_figure(run.outputs_dir / "roc.png")
    write_predictions(run, feats, np.flatnonzero(te), split, columns)
    return out


def _say_slides_shared_by_inputs(feats: LabelledFeatures, log) -> None:
    """One slide id in two inputs (two feature folders that both hold 001.h5) is one slide to the split,
    splits.csv and the bootstrap: right for one slide's tiles spread over inputs, wrong for two slides."""
    if not feats.source:
        return
    sources: dict = {}
    for sid, src in zip(feats.slide_id, feats.source):
        sources.setdefault(sid, set()).add(src)
    shared = sorted(s for s, v in sources.items() if len(v) > 1)
    if shared:
        log.warning("%d slide id(s) come from more than one input (e.g. %r from %s) and are treated as one slide "
                    "(split, bootstrap); if they are different slides, give them distinct ids", len(shared),
                    shared[0], ", ".join(sorted(sources[shared[0]])[:2]))


def _bacc(y_true, y_pred, classes) -> float:
    return classification_metrics(y_true, y_pred, len(classes))["balanced_accuracy"]


def _linear_scores(y_true, proba, classes) -> dict:
    return {"balanced_accuracy": _bacc(y_true, proba.argmax(1), classes), "auroc": auroc(y_true, proba, classes)[0]}


def _linear_runs(x, y, tr, va, te, classes, cfg, run):
    """``cfg.runs`` seeded linear probes: their summary (mean, sd, each run, AUROC), and the best-on-
    validation probe with its test-row probabilities (saved, and in predictions.csv)."""
    runs, best = [], None
    for i in range(cfg.runs):
        seed = run.item_seed(f"linear-probe-{i}")
        probe, rec = train_linear_probe(x[tr], y[tr], x[va], y[va], len(classes), seed=seed, lr=cfg.lr,
                                        batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                                        patience=cfg.patience, eval_every=cfg.eval_every)
        proba = linear_probabilities(probe, x[te])
        m = classification_metrics(y[te], proba.argmax(1), len(classes))
        m["auroc"], why = auroc(y[te], proba, classes)
        runs.append({**{k: v for k, v in m.items() if isinstance(v, float)}, **rec, "seed": seed})
        if best is None or rec["best_val_balanced_accuracy"] > best[0]:
            best = (rec["best_val_balanced_accuracy"], i, probe, proba)
        run.log.info("linear probe run %d: test balanced accuracy %.4f", i, m["balanced_accuracy"])
    _, i, probe, proba = best
    out = {**summarise(runs), "runs": runs, "best_run": i}
    if why is not None:  # the same test rows in every run: undefined in all of them
        run.log.warning("linear probe AUROC is undefined (null): %s", why)
        out["auroc_undefined"] = why
    return out, probe, proba


def _intervals(metric_fn, test_slides, cfg, run, what: str) -> dict | None:
    """Slide-level bootstrap 95 % intervals (``--bootstrap N``), seeded from ``--seed``; None (with a
    warning) when the test rows come from a single slide, which gives no spread to resample (whether the
    interval is rough is said once, by the caller)."""
    if len(set(test_slides)) < 2:
        run.log.warning("%s: the test rows come from one slide, so --bootstrap gives no interval (null)", what)
        return None
    return slide_bootstrap(metric_fn, test_slides, cfg.bootstrap, seed=run.item_seed(f"bootstrap-{what}"))


def write_splits(run, slide_ids, split) -> None:
    """``outputs/splits.csv``: each slide once with its split, so a study can report and reuse it. A slide
    whose rows a given split column puts in several splits is listed as e.g. ``train+test`` and warned
    about: its tiles on both sides make the test scores optimistic."""
    parts: dict[str, set] = {}
    for s, p in zip(slide_ids, split):
        parts.setdefault(s, set()).add(p)
    order = {"train": 0, "val": 1, "test": 2}
    mixed = sorted(s for s, ps in parts.items() if len(ps) > 1)
    if mixed:
        run.log.warning("%d slide(s) have rows in more than one split (e.g. %r): the test scores are optimistic; "
                        "split by slide", len(mixed), mixed[0])
    rows = [{"slide_id": s, "split": "+".join(sorted(ps, key=order.get))} for s, ps in sorted(parts.items())]
    write_csv(run.outputs_dir / "splits.csv", rows, ["slide_id", "split"])


def write_predictions(run, feats: LabelledFeatures, test_rows: np.ndarray, split, columns: dict) -> None:
    """``outputs/predictions.csv``: one line per test row (``row`` = its index among all input rows, in
    input order), with each probe's predicted class and per-class kNN vote shares / linear probabilities."""
    n = len(test_rows)
    base = {"row": test_rows.tolist(), "source": [feats.source[i] if feats.source else "" for i in test_rows],
            "slide_id": [feats.slide_id[i] for i in test_rows],
            "patch_id": [feats.patch_id[i] if feats.patch_id else "" for i in test_rows],
            "split": [split[i] for i in test_rows], "label": [feats.labels[i] for i in test_rows]}
    table = {**base, **columns}
    rows = [{k: (_number(v[j])) for k, v in table.items()} for j in range(n)]
    write_csv(run.outputs_dir / "predictions.csv", rows, list(table))


def _number(v):
    return repr(float(v)) if isinstance(v, (float, np.floating)) else v


def teacher_student_knn(teacher, student, student_norm, tiles, sets, cfg, run) -> dict:
    """kNN balanced accuracy of teacher and student embeddings (cls+mean) on labelled tiles (an array or a
    ``tiles.TileStream``, read 64 at a time)."""
    import torch

    from .encoder import Encoder, Transform, uint8_to_float

    rows = [r for ts in sets for r in ts.rows]
    labels = [r["label"] for r in rows]
    classes = sorted_classes(labels)
    y = np.array([classes.index(c) for c in labels])
    split = np.array(group_split([r["slide_id"] for r in rows], run.seed, (0.7, 0.0, 0.3)))
    tr, te = split == "train", split == "test"
    if not tr.any() or not te.any():
        return {}
    t = Transform(img_size=cfg.crop_size)
    s_enc = Encoder(student, Transform(img_size=cfg.crop_size, mean=t.mean, std=t.std), "cls+mean").eval()
    s_enc.transform.normalise = student_norm  # the student's own normalisation
    t_enc = Encoder(teacher.vit, teacher.transform, "cls+mean").eval()
    encoders = {"teacher": t_enc, "student": s_enc}
    xs: dict[str, list] = {name: [] for name in encoders}
    with torch.inference_mode():  # 64 tiles at a time (``tiles`` may read them on demand), both encoders
        for s in range(0, len(tiles), 64):
            x01 = uint8_to_float(tiles[s:s + 64]).to(run.device)
            x01 = torch.nn.functional.interpolate(x01, size=(cfg.crop_size, cfg.crop_size), mode="bilinear",
                                                  antialias=True, align_corners=False)
            for name, enc in encoders.items():
                xs[name].append(enc(x01).float().cpu().numpy())
    feats = {name: np.concatenate(x) for name, x in xs.items()}
    out = {}
    for name, x in feats.items():
        pred = knn_predict(x[tr], y[tr], x[te], len(classes), cfg.probe_k)
        out[f"{name}_knn_balanced_accuracy"] = classification_metrics(y[te], pred, len(classes))["balanced_accuracy"]
    out["knn_gap"] = out["teacher_knn_balanced_accuracy"] - out["student_knn_balanced_accuracy"]
    return out
