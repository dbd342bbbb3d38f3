"""Thin verb functions: validate, loop, call the science modules, write outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.io import atomic_path, remove_figure, write_json

HEAT_DOWNSAMPLE = 32  # PNG heatmaps at level-0 dimensions // 32 (QuPath overlay size)


def _warn_ignored_compute(cfg, run, device: bool = True, precision: bool = True) -> None:
    """A --device or --precision the verb does not use is said, not only recorded in config.yaml: the
    tile encoder honours both; training runs on --device in fp32; the MIL model otherwise runs on the CPU
    in fp32 (it is small)."""
    from tubcli.device import say_device_unused

    if device:
        say_device_unused(cfg, run)
    if precision and cfg.precision != "fp32":
        run.log.warning("tub xmil %s computes in fp32: --precision %s does not change that", run.verb,
                        cfg.precision)


def make_data(cfg, run) -> dict:
    from tub_xmil.synthetic import make_dataset

    _warn_ignored_compute(cfg, run)

    out = Path(cfg.out_dir) if cfg.out_dir is not None else run.outputs_dir
    if out != run.outputs_dir and out.is_dir() and any(out.iterdir()):
        raise TubError(f"{out} exists and is not empty; choose a new folder (make-data never replaces data)")
    rows = make_dataset(out, cfg.n_slides, cfg.width, cfg.height, cfg.mpp, seed=cfg.seed, aperio=cfg.aperio)
    return {"slides": len(rows), "positive": sum(r["label"] for r in rows), "dir": str(out)}


def tile(cfg, run) -> dict:
    from tub_xmil.pipeline import expand_inputs, tile_one
    from tub_xmil.slides import SLIDE_SUFFIXES

    _warn_ignored_compute(cfg, run)
    slides = expand_inputs(cfg.slides, SLIDE_SUFFIXES)
    for path, out in run.batch(slides, output_for=lambda p: run.outputs_dir / "patches" / f"{Path(p).stem}.h5",
                               check_output=_count_patches):
        with run.item(path):
            tile_one(Path(path), out, run.outputs_dir, cfg.tiling, cfg.mpp)
    return {"patches": _patches_in(run.outputs_dir / "patches")}


def _patches_in(folder: Path) -> int:
    """Tiles over every output of the run directory: a rerun that completes an interrupted run reports the
    run's total, not the part it did itself."""
    from tubcli.runs import unreadable_output

    n = 0
    for path in sorted(q for q in folder.glob("*.h5") if not q.name.startswith(".")):  # not a writer's temporary
        try:
            n += _count_patches(path)
        except Exception as exc:  # damaged after it was written, or another shard's: named, not a traceback
            raise unreadable_output(path, exc) from None
    return n


def _count_patches(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return len(f["coords"])


def features(cfg, run) -> dict:
    from tub_xmil.features import get_encoder
    from tubcli.config import given_fields
    from tub_xmil.pipeline import expand_inputs, features_one
    from tub_xmil.slides import SLIDE_SUFFIXES

    if cfg.coords_dir is not None:  # the patches files fix the tiles: these settings would be recorded, not used
        given = given_fields(cfg.tiling)
        if given:
            raise TubError(f"tiling.{', tiling.'.join(given)} do not apply with --coords-dir (the tiles are those "
                           "of its patches files); drop them, or drop --coords-dir to tile anew")
    slides = expand_inputs(cfg.slides, SLIDE_SUFFIXES)
    spec, module = get_encoder(cfg.encoder, cfg.weights, run.device, run.dtype)
    run.log.info("encoder %s (%d-d, %d px tiles)%s", spec.name, spec.dim, spec.tile_size,
                 "" if cfg.weights else " -- no weights given: " + (spec.description or "preset defaults"))
    if cfg.coords_dir is None and spec.tile_size != cfg.tiling.patch_size:  # what the encoder sees (in each .h5 too)
        t = cfg.tiling
        run.log.info("the %d px tiles at %g µm/px are resized to the encoder's %d px: it sees %.3g µm/px",
                     t.patch_size, t.target_mpp, spec.tile_size, t.target_mpp * t.patch_size / spec.tile_size)
    digest = run.refuse_replaced_file("--weights", cfg.weights) if cfg.weights is not None else None
    for path, out in run.batch(slides, output_for=lambda p: run.outputs_dir / "features" / f"{Path(p).stem}.h5",
                               check_output=_count_patches):
        with run.item(path):
            features_one(Path(path), out, cfg, spec, module, run.device, run.dtype, weights_sha256=digest)
    return {"patches": _patches_in(run.outputs_dir / "features"), "encoder": spec.name, "dim": spec.dim}


def _training_figure(run, meta):
    """outputs/training.png: the training loss and the selection set's metrics per epoch, the kept epoch
    marked, so over- and under-fitting show at a glance."""
    from tubcli.plots import metric_rows, training_curves

    rows = metric_rows(run.dir / "metrics.jsonl", "epoch")
    scores = [k for k in (rows[-1] if rows else {}) if k not in ("epoch", "train_loss")]
    return training_curves(run.outputs_dir / "training.png", rows, "epoch", [["train_loss"], scores],
                           best=meta["best_epoch"], title=f"{meta['task']}: weights kept from the best epoch by "
                           f"{meta['selected_by'].replace('_', ' ')} on the {meta['selected_on'].split(' ')[0]} slides")


def train(cfg, run) -> dict:
    from tub_xmil.dataset import load_slides
    from tub_xmil.training import predict, task_metrics, train_model

    _warn_ignored_compute(cfg, run, device=False)
    if cfg.class_weight != "none" and cfg.task != "classification":
        raise TubError(f"--class-weight weighs classes; a {cfg.task} task has none: drop it")
    slides, classes = load_slides(cfg.features, cfg.labels, cfg.task)
    train_s, val_s, test_s = ([s for s in slides if s.split == name] for name in ("train", "val", "test"))
    if not train_s:
        raise TubError(f"{cfg.labels}: no rows with split 'train' (or an empty split cell, or no split column)")
    if cfg.fold is not None:
        if val_s or test_s:  # the folds make the test split; a fixed one beside them would leak or vanish
            raise TubError(f"--fold {cfg.fold} holds out a fold of the slides as the test set, but {cfg.labels} "
                           "names val/test rows; drop its split column (or --fold)")
        from tub_xmil.splits import cross_validation_fold, parse_fold

        train_s, test_s = cross_validation_fold(train_s, *parse_fold(cfg.fold), cfg.task, run.seed)
    if not val_s and cfg.val_fraction > 0:
        from tub_xmil.splits import validation_split

        train_s, val_s = validation_split(train_s, cfg.val_fraction, cfg.task, run.seed)
    if cfg.fold is not None:
        _write_fold_labels(cfg.labels, cfg.task, run.outputs_dir / "fold_labels.csv", train_s, val_s, test_s)
    if cfg.task == "classification":
        _check_trained_classes(cfg.labels, classes, train_s, val_s, test_s)
    model, meta = train_model(cfg, run, train_s, val_s, classes)
    from tub_xmil.bags import features_provenance

    provenance, mixed = features_provenance([s.path for s in train_s + val_s])  # each bag's attributes read once
    if provenance:
        meta["features"] = provenance
    for key, values in mixed.items():
        run.log.warning("the training bags differ in %s (%s): the model learns from features made differently; "
                        "make them alike (model.json records no %s)", key, ", ".join(map(str, values)), key)
    run.save_weights({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, meta)
    out = {"train_slides": len(train_s), "val_slides": len(val_s), "test_slides": len(test_s),
           "best_epoch": meta["best_epoch"], "selected_on": meta["selected_on"], "selected_by": meta["selected_by"]}
    if run.is_main and _training_figure(run, meta):
        out["training_curves"] = str(run.outputs_dir / "training.png")
    if test_s:
        from tub_xmil.predictions import write_predictions

        _warn_undefined(run, test_s, cfg.task, "test")
        preds = predict(model, test_s, cfg.task)
        out.update({f"test_{k}": v for k, v in task_metrics(test_s, preds, cfg.task).items()})
        out["test_predictions"] = str(write_predictions(run.outputs_dir / "test_predictions.csv", test_s, preds,
                                                        cfg.task, classes if cfg.task == "classification" else None,
                                                        split="test"))
    out["weights"] = str(run.checkpoints_dir / "model.safetensors")
    if cfg.fold is not None:
        out["fold"] = cfg.fold
        out["fold_labels"] = str(run.outputs_dir / "fold_labels.csv")
    return out


def cv_summary(cfg, run) -> dict:
    from tub_xmil.cross_validation import out_of_fold_rows, per_fold_median_split, read_folds, summarize
    from tub_xmil.predictions import prediction_fields
    from tubcli.io import write_csv

    if not cfg.runs:
        raise TubError("give the run folders of `tub xmil train --fold k/K`, e.g. runs/cv/fold*")
    folds = read_folds(cfg.runs, run.log)
    out, rows, pooled, preds = summarize(folds, cfg.bootstrap, run.seed, run.log)
    for name in ("roc.png", "km_risk_groups.png"):  # an earlier summary's figures (another task) are not this one's
        remove_figure(run.outputs_dir / name)
    if out["task"] == "classification":
        from tubcli.plots import roc_plot

        roc_plot(run.outputs_dir / "roc.png", [s.label for s in pooled], preds, folds[0]["classes"],
                 folds=[s.fold for s in pooled], title=f"{len(folds)} of {folds[0]['folds']} folds, out-of-fold")
    if out["task"] == "survival":
        groups = _risk_groups(run, [s.time for s in pooled], [s.event for s in pooled],
                              per_fold_median_split(pooled, preds), out["pooled_c_index"], note=" of each fold")
        out.update({f"pooled_{k}": v for k, v in groups.items()})
    undefined = lambda v: isinstance(v, float) and not np.isfinite(v)  # noqa: E731 - an empty cell, as JSON's null
    write_csv(run.outputs_dir / "folds.csv", [{k: "" if undefined(v) else v for k, v in r.items()} for r in rows],
              list(rows[0]))
    oof = out_of_fold_rows(folds)
    patients = ["case_id"] if any("case_id" in r for r in oof) else []  # as the folds' files carry them
    write_csv(run.outputs_dir / "oof_predictions.csv", oof,
              ["fold", *prediction_fields(out["task"], folds[0]["classes"]), *patients])
    return out


def _risk_groups(run, times, events, high, c_index: float, note: str = "") -> dict:
    """Log-rank test of the high- vs low-risk slides (``high``: bool per slide) and their Kaplan-Meier curves
    in ``outputs/km_risk_groups.png``."""
    from tub_xmil.metrics import risk_groups
    from tub_xmil.plots import risk_group_plot

    groups = risk_groups(times, events, high)
    risk_group_plot(run.outputs_dir / "km_risk_groups.png", times, events, high, groups, c_index, note)
    if not np.isfinite(groups["logrank_p"]):
        run.log.warning("no log-rank test of the risk groups: a group is empty or no slide has an event")
    return groups


def _write_fold_labels(labels: Path, task: str, out: Path, train_s, val_s, test_s) -> None:
    """The labels CSV with this fold's split column (``evaluate --labels`` it: ``--split test`` is the held-out
    fold), so the partition is on record and every fold can be evaluated again."""
    from tub_xmil.dataset import read_labels
    from tubcli.io import write_csv

    split = {s.slide_id: name for name, group in (("train", train_s), ("val", val_s), ("test", test_s)) for s in group}
    rows = [r for _, r in read_labels(labels, task)]  # column names as training read them (Slide_ID -> slide_id)
    fields = [c for c in rows[0] if c not in ("split", None)] + ["split"]  # None: cells beyond the header
    write_csv(out, [{**{k: v for k, v in r.items() if k in fields}, "split": split[r["slide_id"]]} for r in rows],
              fields)


def _warn_undefined(run, slides, task: str, which: str) -> None:
    """A metric that cannot be computed is reported as null; the log says why."""
    from tub_xmil.training import slides_undefined_reason

    why = slides_undefined_reason(slides, task)
    if why is not None:
        run.log.warning("on the %s slides %s (reported as null)", which, why)


def _check_trained_classes(labels, classes, train_s, val_s, test_s) -> None:
    """Every class must have training slides. A label found only in val/test would become an output
    the model never learns (its slides always wrong, and a test set of one class has no AUROC);
    a pathologist would rather hear that the split is wrong than read such metrics."""
    seen = {int(s.label) for s in train_s}
    for c, name in enumerate(classes):
        if c not in seen:
            held = [(split, s.slide_id) for split, group in (("val", val_s), ("test", test_s))
                    for s in group if int(s.label) == c]
            where = sorted({split for split, _ in held})
            ids = [sid for _, sid in held]
            raise TubError(f"{labels}: label {name!r} has no training slide (only {'/'.join(where)}: "
                           f"{', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}); move some of its slides "
                           "to the train split or drop them")


def _classes(meta: dict) -> list[str]:
    """Class names in output order; a reference checkpoint (no names stored) has its output indices."""
    return meta.get("classes") or [str(i) for i in range(meta["kwargs"]["head_dim"])]


def _task(cfg, meta: dict) -> str:
    """The model's task: from model.json (another --task is an error), else --task. A reference
    checkpoint stores none; its head size alone cannot tell regression from classification, and one
    logit read as a 1-class classifier would give probability 1.0 for every slide."""
    head_dim = meta["kwargs"]["head_dim"]
    if "task" in meta:
        if cfg.task is not None and cfg.task != meta["task"]:  # the output would be read as another task's numbers
            raise TubError(f"--task {cfg.task} does not match the model, which was trained for {meta['task']}; "
                           "drop --task (it defaults to the model's task)")
        return meta["task"]
    if cfg.task is None:
        if head_dim == 1:
            raise TubError(f"{cfg.model}: a checkpoint without model.json and with one output; pass --task "
                           "regression or --task survival (a 1-class classifier explains nothing)")
        return "classification"  # several outputs and no task stored: xMIL's classifiers
    if cfg.task == "regression" and head_dim != 1:
        raise TubError(f"--task regression needs a model with one output; this one has {head_dim}")
    if cfg.task == "classification" and head_dim < 2:
        raise TubError("--task classification needs a model with at least 2 outputs; this one has 1 "
                       "(pass --task regression or --task survival)")
    return cfg.task


def _refuse_replaced_model(cfg, run) -> None:
    """Outputs a rerun skips must come from this model: one retrained into its run folder has the same path."""
    from tub_xmil.checkpoint import model_file

    run.refuse_replaced_file("--model", model_file(cfg.model))


def _load(cfg, log=None):
    """(model, meta, task) with every model-dependent option checked before any slide is read; ``log``
    (explain, heatmap) warns when --target cannot change any of the maps asked for."""
    from tub_xmil.checkpoint import load_model

    if cfg.model is None:
        raise TubError("no model given; pass --model RUN/checkpoints (or an xMIL best_model.pt)")
    model, meta = load_model(cfg.model)
    task = _task(cfg, meta)
    if "patch_scores" in cfg.method:  # before any output: the method exists only for additive models
        if not hasattr(model, "patch_logits"):
            raise TubError(f"--method patch_scores needs an AdditiveMIL model (train with --arch additivemil); "
                           f"this one is {meta.get('arch', getattr(model, 'kind', '?'))}")
        if task == "survival":
            raise TubError("--method patch_scores adds up to logits, not to the survival risk; use lrp or ig")
    if cfg.target is not None:
        if task != "classification":
            raise TubError(f"--target picks a class to explain; a {task} model has none, drop --target")
        classes = _classes(meta)
        if not 0 <= cfg.target < len(classes):
            raise TubError(f"--target {cfg.target} is not a class of this model; use an index 0..{len(classes) - 1} "
                           f"(classes {', '.join(classes)})")
        from tub_xmil.explain import CLASS_AGNOSTIC

        if log is not None and set(cfg.method) <= CLASS_AGNOSTIC:
            log.warning("--method %s gives the same map for every class: --target %d only picks the prediction "
                        "reported beside it", ",".join(cfg.method), cfg.target)
    return model, meta, task


def _with_lrp_settings(out: dict, model, cfg, task: str) -> dict:
    """``out`` plus ``lrp_settings``: the LRP settings used (defaults resolved), when LRP is among the methods."""
    if "lrp" in cfg.method:
        from tub_xmil.pipeline import lrp_settings

        out["lrp_settings"] = lrp_settings(model, cfg.lrp, task)
    return out


def explain(cfg, run) -> dict:
    from tub_xmil.bags import BAG_SUFFIXES, read_bag
    from tub_xmil.explain import explain as explain_scores
    from tub_xmil.pipeline import choose_target, expand_inputs, explain_bag, lrp_params_for
    from tub_xmil.tasks import prediction_score
    from tubcli.io import to_json

    _warn_ignored_compute(cfg, run)
    model, meta, task = _load(cfg, run.log)
    _refuse_replaced_model(cfg, run)
    rel = cfg.lrp.explained_rel if task == "classification" else None  # as explain_bag passes it
    bags = expand_inputs(cfg.bags, BAG_SUFFIXES)
    for path, out in run.batch(bags, output_for=lambda p: run.outputs_dir / f"{Path(p).stem}.json"):
        with run.item(path):
            x, coords, attrs = read_bag(path)
            if x.shape[1] != meta["kwargs"]["input_dim"]:
                raise TubError(f"{Path(path).name}: features are {x.shape[1]}-d, the model expects "
                               f"{meta['kwargs']['input_dim']}-d")
            _warn_other_bags(Path(path).name, attrs, meta.get("features", {}), run.log)
            target = choose_target(model, x, task, cfg.target)
            import torch
            with torch.no_grad():
                pred = float(prediction_score(model(x[None]), task, target)[0])
            rec = {"slide_id": Path(path).stem, "task": task, "target": target, "prediction": pred,
                   "n_patches": int(len(x))}
            for m in cfg.method:
                seed = run.item_seed(Path(path).stem)
                if m == "lrp":
                    # the relevance budget of the same pass: what was put on the explained output (logit, softmax
                    # or contrastive), what TransMIL leaves on its CLS token (spec §2.3), and the remainder that
                    # biases, ε and the LayerNorm rule absorbed (0 for AttnMIL without biases)
                    sc, det = explain_scores(model, x, m, task, target, lrp=lrp_params_for(model, cfg.lrp),
                                             ig_steps=cfg.ig_steps, seed=seed, explained_rel=rel,
                                             return_details=True)
                    total = float(det["output_relevance"].sum())
                    cls = det.get("cls_relevance")
                    rec["lrp_output_relevance"] = total
                    if cls is not None:
                        rec["lrp_cls_relevance"] = cls
                    rec["lrp_remainder"] = total - float(np.sum(sc)) - (cls or 0.0)
                else:
                    sc = explain_bag(model, x, m, task, target, cfg, seed=seed)
                rec[f"patch_scores_{m}"] = sc.tolist()
            if coords is not None:
                rec["coords"] = coords.tolist()  # level-0 top-left corners, of tiles this wide at this mpp:
                rec.update({k: attrs[k] for k in ("patch_size_level0", "mpp", "target_mpp") if k in attrs})
            with atomic_path(out) as tmp:
                tmp.write_text(to_json(rec))  # strict JSON: a NaN score would be null, never bare NaN
    # outputs/explanations.csv over every slide this run directory holds (not the test split of `train`'s
    # outputs/test_predictions.csv): the explained class by index and by name, and the model's output for it
    import csv

    from tubcli.runs import ItemLock

    table = run.outputs_dir / "explanations.csv"
    classes = _classes(meta) if task == "classification" else None
    with ItemLock(table).waiting():  # shards ending together: the last gathers all
        recs = [json.loads(p.read_text()) for p in sorted(run.outputs_dir.glob("*.json"))]
        with atomic_path(table) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                cols = [f"patch_scores_{m}" for m in cfg.method]
                w.writerow(["slide_id", "task", "target", "target_class", "prediction", "n_patches", *cols])
                for r in recs:
                    name = classes[r["target"]] if classes and isinstance(r["target"], int) else ""
                    w.writerow([r["slide_id"], r["task"], r["target"], name, r["prediction"], r["n_patches"],
                                *[json.dumps(r.get(c)) for c in cols]])
    return _with_lrp_settings({"methods": list(cfg.method)}, model, cfg, task)


def evaluate(cfg, run) -> dict:
    from tub_xmil.dataset import load_slides
    from tub_xmil.flipping import false_prediction, slide_flipping, tied_blocks
    from tub_xmil.pipeline import explain_bag
    from tub_xmil.training import predict, task_metrics

    _warn_ignored_compute(cfg, run)
    model, meta, task = _load(cfg)
    classes = _classes(meta) if task == "classification" else None
    # every bag is checked here (also against the model's input dimension) before any output; the
    # slides are lazy: each bag is read again when it is predicted / flipped, one at a time
    split = None if cfg.split == "all" else cfg.split
    slides, _ = load_slides(cfg.features, cfg.labels, task, split=split, classes=classes,
                            input_dim=meta["kwargs"].get("input_dim"))
    if trained := meta.get("features", {}):  # bags made otherwise than the training bags are said, as in explain
        from tub_xmil.bags import h5_attributes

        for s in slides:
            if s.path is not None and s.path.suffix.lower() == ".h5":
                _warn_other_bags(s.path.name, h5_attributes(s.path), trained, run.log)
    preds = predict(model, slides, task)
    from tub_xmil.predictions import write_predictions

    write_predictions(run.outputs_dir / "predictions.csv", slides, preds, task, classes)
    _warn_undefined(run, slides, task, "evaluated")
    out = {"slides": len(slides), **task_metrics(slides, preds, task)}
    for name in ("roc.png", "km_risk_groups.png"):  # an earlier evaluation's figures (another task) are not this one's
        remove_figure(run.outputs_dir / name)
    if task == "survival":
        from tub_xmil.metrics import median_split

        out.update(_risk_groups(run, [s.time for s in slides], [s.event for s in slides], median_split(preds[:, 0]),
                                out["c_index"]))
    if cfg.bootstrap and len(slides) > 1:  # how far the slides' (patients') sample leaves the metrics uncertain
        from tubcli.stats import say_if_rough

        from tub_xmil.training import bootstrap_slides

        out["ci"] = bootstrap_slides(slides, preds, task, cfg.bootstrap, run.seed)
        say_if_rough(run.log, cfg.bootstrap, out["ci"]["units"], unit=f"{out['ci']['unit']}s")
    if task == "classification":
        from tubcli.plots import roc_plot

        ci = out.get("ci", {}).get("auroc")
        title = f"{cfg.split} slides" + (f", AUROC 95% CI {ci[0]:.3f}–{ci[1]:.3f} ({out['ci']['unit']} "
                                                  f"bootstrap)" if ci else "")
        roc_plot(run.outputs_dir / "roc.png", [s.label for s in slides], preds, classes, title=title)
    remove_figure(run.outputs_dir / "flipping.png")  # an earlier evaluation's, not this one's
    if not cfg.flipping:
        (run.outputs_dir / "flipping.json").unlink(missing_ok=True)
        return out
    per_slide, merged = [], {}
    for s in run.progress(slides, total=len(slides), desc="patch flipping"):
        # classification explains --target when given, else the slide's label class (spec §2.2)
        target = (int(s.label) if cfg.target is None else cfg.target) if task == "classification" else 0
        x = s.features  # read once per slide, used by every method
        if false_prediction(model, x, task, target):
            per_slide.append({"slide_id": s.slide_id, "target": target, "false_pred": True})
        else:
            rec = {"slide_id": s.slide_id, "target": target, "false_pred": False}
            for m in cfg.method:
                scores = explain_bag(model, x, m, task, target, cfg, seed=run.item_seed(s.slide_id))
                if cfg.score_order == "absolute":  # ranks and blocks by magnitude (spec §2.5)
                    scores = np.abs(scores)
                res = slide_flipping(model, x, scores, task, target, cfg.strategy, ties=cfg.flipping_ties)
                rec[m] = {a: {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
                          if isinstance(r, dict) else r for a, r in res.items()}
                if cfg.flipping_ties == "histogram" and tied_blocks(scores, cfg.strategy):
                    rec[m]["tied_blocks"] = True
                    merged.setdefault(m, []).append(s.slide_id)
            per_slide.append(rec)
        del x  # before the next slide's bag is read
    for m, ids in merged.items():  # the curve skips the steps inside a merged block: a tied map scores too low
        run.log.warning("%s: tied scores merged flipping blocks on %d slide(s) (e.g. %s; spec §2.5's histogram rule), "
                        "so its curves skip steps and its SRG understates it; --set flipping_ties=rank cuts equal "
                        "blocks from the ranking", m, len(ids), ids[0])
    kept = [r for r in per_slide if not r["false_pred"]]
    if per_slide and not kept:
        run.log.warning("every slide (%d) was excluded as a false prediction (p(target) <= 0.5, spec §2.5): no "
                        "faithfulness metrics; check --target, or evaluate slides the model gets right", len(per_slide))
    _with_lrp_settings(out, model, cfg, task)
    out["score_order"], out["flipping_ties"] = cfg.score_order, cfg.flipping_ties
    out["flipping_slides"] = len(kept)
    out["excluded_false_pred"] = len(per_slide) - len(kept)
    for m in cfg.method:
        if kept:
            for a in ("drop", "add"):
                for k in ("aupc_morf", "aupc_lerf", "srg"):
                    out[f"{m}.{a}.{k}"] = float(np.mean([r[m][a][k] for r in kept]))
            out[f"{m}.symmetric_gain"] = float(np.mean([r[m]["symmetric_gain"] for r in kept]))
    write_json(run.outputs_dir / "flipping.json", per_slide)
    if kept:
        from tub_xmil.plots import flipping_plot

        out["flipping_figure"] = str(flipping_plot(run.outputs_dir / "flipping.png", kept, list(cfg.method), task,
                                                   cfg.strategy))
    return out


def _warn_other_bags(name: str, attrs: dict, trained: dict, log) -> None:
    """A bag made at another resolution, tile size or by another encoder than the model's training bags (model.json)
    gives it inputs it never saw: explained all the same, but said (as for slides, :func:`_slide_settings`)."""
    mpp, trained_mpp = attrs.get("target_mpp"), trained.get("target_mpp")
    if mpp is not None and trained_mpp is not None and abs(float(mpp) - float(trained_mpp)) > 1e-6 * float(trained_mpp):
        log.warning("%s: its tiles are at %g µm/px, the model was trained on bags at %g µm/px", name, float(mpp),
                    float(trained_mpp))
    encoder, trained_encoder = attrs.get("encoder"), trained.get("encoder")
    if encoder is not None and trained_encoder is not None and encoder != trained_encoder:
        log.warning("%s: embedded by %s, the model was trained on bags embedded by %s", name, encoder, trained_encoder)
    size, trained_size = attrs.get("patch_size"), trained.get("patch_size")
    if size is not None and trained_size is not None and int(size) != int(trained_size):
        log.warning("%s: its tiles are %d px, the model was trained on bags of %d px tiles (each instance is another "
                    "field of view)", name, int(size), int(trained_size))
    precision, trained_precision = attrs.get("precision"), trained.get("precision")
    if precision is not None and trained_precision is not None and precision != trained_precision:
        log.warning("%s: embedded in %s, the model was trained on bags embedded in %s", name, precision,
                    trained_precision)


SLIDE_DEFAULTS = {"encoder": "vit-t8-demo", "target_mpp": 0.5, "patch_size": 256, "min_tissue": 0.5, "min_std": 8.0}
SLIDE_FLAGS = {"encoder": "--encoder", "target_mpp": "--target-mpp", "patch_size": "--patch-size",
               "min_tissue": "tiling.min_tissue", "min_std": "tiling.min_std"}


def _slide_settings(cfg, trained: dict, log):
    """``cfg`` with the encoder and tiling for slides filled in: given, else those of the features
    the model was trained on (model.json), else the defaults; a given value that differs from the
    training features' is warned about (the model never saw such features or bags)."""
    given = {"encoder": cfg.encoder, **{k: getattr(cfg.tiling, k) for k in SLIDE_DEFAULTS if k != "encoder"}}
    if cfg.coords_dir is not None:  # the patches files fix the tiles
        tiling = [SLIDE_FLAGS[k] for k, v in given.items() if k != "encoder" and v is not None]
        if tiling:
            raise TubError(f"{', '.join(tiling)} do not apply with --coords-dir (the tiles are those of its patches "
                           "files); drop them, or drop --coords-dir to tile anew")
        given = {"encoder": cfg.encoder}
    elif "target_mpp" in trained and "min_tissue" not in trained:
        log.warning("the model's bags were tiled by another tool (they record no xmil tissue filter); xmil's own "
                    "detector may keep other tiles than the model saw: pass --coords-dir with their patches files "
                    "(e.g. the tub atlas tile outputs), or heatmap the feature files")
    if trained.get("precision") not in (None, cfg.precision):
        log.warning("the model was trained on features embedded in %s; this run embeds the slides in %s (set "
                    "--precision %s to match)", trained["precision"], cfg.precision, trained["precision"])
    used, source = {}, {}
    for key, value in given.items():
        if value is not None:
            used[key], source[key] = value, "given"
            if key in trained and trained[key] != value:
                log.warning("the model was trained on features with %s %s; %s %s gives it other inputs",
                            key, trained[key], SLIDE_FLAGS[key], value)
        elif key in trained:
            used[key], source[key] = trained[key], "model.json (training features)"
        elif key == "encoder":  # a default (random-weight) encoder would give the model features it never saw
            raise TubError("the model's training features record no encoder (e.g. embedded by another tool); give "
                           "--encoder (and --weights) as they were made, or heatmap their feature files instead")
        else:
            used[key], source[key] = SLIDE_DEFAULTS[key], "default"
    if source["encoder"] != "given":
        from tubcli.plugins import patch_encoders

        if used["encoder"] not in patch_encoders():
            raise TubError(f"the model's training features were embedded by {used['encoder']}, which no patch encoder "
                           "offers (another pooling, normalisation or tile size than a preset's); heatmap their "
                           "feature files: tub xmil heatmap FEATURES/*.h5 --slide-dir SLIDES")
    if cfg.coords_dir is not None:
        used["coords_dir"], source["tiles"] = str(cfg.coords_dir), "--coords-dir"
        return cfg.model_copy(update={"encoder": str(used["encoder"])}), {**used, "source": source}
    tiling = cfg.tiling.model_copy(update={"target_mpp": float(used["target_mpp"]), "patch_size": int(used["patch_size"]),
                                           "min_tissue": float(used["min_tissue"]), "min_std": float(used["min_std"])})
    cfg = cfg.model_copy(update={"encoder": str(used["encoder"]), "tiling": tiling})
    return cfg, {**used, "source": source}


def heatmap(cfg, run) -> dict:
    import torch
    from PIL import Image

    from tub_xmil.bags import read_bag
    from tub_xmil.explain import SIGNED
    from tub_xmil.heatmap import write_heatmap
    from tub_xmil.pipeline import (check_coords_fit, choose_target, explain_bag, expand_inputs, slide_coords,
                                   thumbnail_for)
    from tub_xmil.slides import SLIDE_SUFFIXES, open_slide, slide_bounds
    from tub_xmil.tiling import tile_size_level0_source
    from tubcli.io import to_json

    model, meta, task = _load(cfg, run.log)
    if cfg.slide_dir is not None and not Path(cfg.slide_dir).is_dir():
        raise TubError(f"--slide-dir {cfg.slide_dir} is not a folder; give the folder that holds the slides")
    bag_suffixes = {".h5", ".pt", ".npz"}
    inputs = expand_inputs(cfg.inputs, SLIDE_SUFFIXES | bag_suffixes)
    needs_encoder = any(Path(p).suffix.lower() not in bag_suffixes for p in inputs)
    if not needs_encoder:  # feature files only: no tile encoder to move or cast
        _warn_ignored_compute(cfg, run)
        if cfg.coords_dir is not None:
            raise TubError("--coords-dir gives the tiles of slide inputs; feature files hold their own coords: drop it")
    spec = module = None
    tiling_used = None
    if needs_encoder:
        cfg, tiling_used = _slide_settings(cfg, meta.get("features", {}), run.log)
        from tub_xmil.features import embed_tiles, get_encoder
        spec, module = get_encoder(cfg.encoder, cfg.weights, run.device, run.dtype)
        if spec.dim != meta["kwargs"]["input_dim"]:
            raise TubError(f"encoder {spec.name} gives {spec.dim}-d features but the model expects "
                           f"{meta['kwargs']['input_dim']}-d; use the encoder the model was trained on")
        if cfg.weights is not None:
            digest = run.refuse_replaced_file("--weights", cfg.weights)
            trained = meta.get("features", {}).get("encoder_weights_sha256")
            if trained and trained != digest:
                run.log.warning("--weights %s are not the weights the model's training bags were embedded with "
                                "(sha256 %s…, model.json): the model gets features it never saw", cfg.weights,
                                trained[:12])
    _refuse_replaced_model(cfg, run)

    def pending(p):
        """The first method overlay of this input still missing (the item is done when none is), else the last."""
        outs = [run.outputs_dir / f"{Path(p).stem}_{m}.png" for m in cfg.method]
        return next((o for o in outs if not o.exists()), outs[-1])

    # one lock per slide, whatever method it is at: locked by its first missing overlay, a slide was drawn by
    # two jobs at once when one had finished a method
    for path, out in run.batch(inputs, output_for=pending,
                               lock_for=lambda p: run.outputs_dir / f"{Path(p).stem}.heatmaps"):
        with run.item(path):
            path = Path(path)
            # only the methods whose overlay is missing (all of them with --overwrite)
            todo = [m for m in cfg.method
                    if run.overwrite or not (run.outputs_dir / f"{path.stem}_{m}.png").exists()]
            slide = None
            if path.suffix.lower() in bag_suffixes:
                x, coords, attrs = read_bag(path)
                if coords is None:
                    raise TubError(f"{path.name}: no coords for the features (no 'coords' dataset or xMIL "
                                   "patches/<slide>/metadata/df.csv); cannot place the heatmap")
                size0, size_source = tile_size_level0_source(attrs, coords, cfg.patch_size_level0, name=path.name,
                                                             log=run.log)
                _warn_other_bags(path.name, attrs, meta.get("features", {}), run.log)
                found = _slide_named(Path(cfg.slide_dir), path.stem) if cfg.slide_dir else None
                if cfg.slide_dir and found is None:
                    background = f"black: no {path.stem}.<slide suffix> in {cfg.slide_dir}"
                    run.log.warning("%s: no slide %s.* in %s; the heatmap is drawn on a black canvas",
                                    path.name, path.stem, cfg.slide_dir)
                else:
                    background = str(found) if found else "black: no --slide-dir given"
                slide = open_slide(found) if found else None
                if slide is not None:
                    try:
                        check_coords_fit(coords, attrs, slide.dimensions, path.name, found.name)
                    except TubError:
                        slide.close()
                        raise
            else:
                background = str(path)
                slide, coords, size0, _ = slide_coords(path, cfg, cfg.coords_dir)
                size_source = "tiled from the slide (--target-mpp, --patch-size)" if cfg.coords_dir is None \
                    else "patches file in --coords-dir"
                if cfg.patch_size_level0 is not None and cfg.patch_size_level0 != size0:
                    run.log.warning("%s: --patch-size-level0 is for feature files; this slide is tiled at "
                                    "%d px (level 0) from --target-mpp/--patch-size", path.name, size0)
                x = torch.from_numpy(embed_tiles(slide, coords, size0, spec, module, 64, run.device, run.dtype))
            try:
                if x.shape[1] != meta["kwargs"]["input_dim"]:
                    raise TubError(f"{path.name}: features are {x.shape[1]}-d, the model expects "
                                   f"{meta['kwargs']['input_dim']}-d")
                target = choose_target(model, x, task, cfg.target)
                scores = {m: explain_bag(model, x, m, task, target, cfg, seed=run.item_seed(path.stem))
                          for m in todo}
                if slide is not None:
                    W, H = slide.dimensions
                    thumb, _ = thumbnail_for(slide)
                    origin = slide_bounds(slide)
                else:
                    origin = (int(attrs.get("bounds_x", 0) or 0), int(attrs.get("bounds_y", 0) or 0))
                    W = int(attrs.get("level0_width") or (coords[:, 0].max() + size0))
                    H = int(attrs.get("level0_height") or (coords[:, 1].max() + size0))
                    thumb = np.zeros((max(1, H // HEAT_DOWNSAMPLE), max(1, W // HEAT_DOWNSAMPLE), 3), np.uint8)
            finally:
                if slide is not None:
                    slide.close()
            size = (max(1, W // HEAT_DOWNSAMPLE), max(1, H // HEAT_DOWNSAMPLE))
            thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.BILINEAR))
            for m, sc in scores.items():
                with atomic_path(run.outputs_dir / f"{path.stem}_{m}_scores.json") as tmp:
                    tmp.write_text(to_json({"slide_id": path.stem, "method": m, "target": target,
                                            "scores": sc.tolist(), "coords": coords.tolist(),
                                            "patch_size_level0": size0, "patch_size_level0_source": size_source,
                                            "background": background}))
                write_heatmap(run.outputs_dir, path.stem, thumb, coords, sc, size0, HEAT_DOWNSAMPLE, SIGNED[m], m,
                              size_source, origin)
    out = _with_lrp_settings({"methods": list(cfg.method)}, model, cfg, task)
    if tiling_used:  # how slides were tiled and embedded, and where each setting came from
        out["slides"] = tiling_used
    return out


def _slide_named(folder: Path, stem: str) -> Path | None:
    """The slide ``<stem>.<slide suffix>`` in ``folder``, the suffix in lower or upper case (``S1.SVS``)."""
    from tub_xmil.slides import SLIDE_SUFFIXES

    cand = [folder / f"{stem}{s}" for s in sorted(SLIDE_SUFFIXES)] + [folder / f"{stem}{s.upper()}"
                                                                       for s in sorted(SLIDE_SUFFIXES)]
    return next((c for c in cand if c.is_file()), None)
