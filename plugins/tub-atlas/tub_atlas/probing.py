"""The ``evaluate`` protocol: splits, kNN and repeated linear probes on frozen embeddings (spec §2.8)."""

from __future__ import annotations

import numpy as np

from tubcli.errors import TubError

from .embedding import group_split
from .features import LabelledFeatures
from .probes import classification_metrics, knn_predict, predict_linear, summarise, train_linear_probe


def resolve_splits(feats: LabelledFeatures, seed: int) -> list[str]:
    """The input's ``split`` column (checked by ``features.split_column``), else a seeded 70/15/15 group
    split by slide, stratified by class."""
    return list(feats.split) if feats.split is not None else group_split(feats.slide_id, seed, labels=feats.labels)


def sorted_classes(labels) -> list[str]:
    """Sorted class names: numerically when all are integers (1, 2, 10, as scikit-learn orders integer
    labels, so kNN ties go to the same class), else as text."""
    names = set(labels)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def run_probes(feats: LabelledFeatures, cfg, run) -> dict:
    if any(lab == "" for lab in feats.labels):
        raise TubError("some embeddings have no label; probing needs a label for every row")
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
    out: dict = {"classes": classes, "n_train": int(tr.sum()), "n_val": int((split == "val").sum()),
                 "n_test": int(te.sum()), "dim": int(x.shape[1]), "support": support}
    if cfg.method in ("knn", "both"):
        k = min(cfg.k, int(tr.sum()))
        if k < cfg.k:
            run.log.warning("--k %d is more than the %d training rows; kNN uses k = %d", cfg.k, k, k)
        pred = knn_predict(x[tr], y[tr], x[te], len(classes), k, cfg.vote, cfg.temperature)
        m = classification_metrics(y[te], pred, len(classes))
        out["knn"] = {"k": k, "k_requested": cfg.k, "vote": cfg.vote, **m}
    if cfg.method in ("linear", "both"):
        runs, best = [], None
        for i in range(cfg.runs):
            seed = run.item_seed(f"linear-probe-{i}")
            probe, rec = train_linear_probe(x[tr], y[tr], x[va], y[va], len(classes), seed=seed, lr=cfg.lr,
                                            batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                                            patience=cfg.patience, eval_every=cfg.eval_every)
            m = classification_metrics(y[te], predict_linear(probe, x[te]), len(classes))
            runs.append({**{k: v for k, v in m.items() if isinstance(v, float)}, **rec, "seed": seed})
            if best is None or rec["best_val_balanced_accuracy"] > best[0]:
                best = (rec["best_val_balanced_accuracy"], probe)
            run.log.info("linear probe run %d: test balanced accuracy %.4f", i, m["balanced_accuracy"])
        out["linear"] = {**summarise(runs), "runs": runs}
        from tubcli.io import save_safetensors, write_json

        probe = best[1]
        save_safetensors(run.outputs_dir / "probe.safetensors",
                         {"weight": probe.weight.detach().contiguous(), "bias": probe.bias.detach().contiguous()})
        write_json(run.outputs_dir / "probe.json", {"classes": classes, "dim": int(x.shape[1])})
    return out


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
