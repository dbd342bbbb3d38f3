"""Verb functions of tub-pathorob: thin glue between configs, the metric modules and result files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.io import write_json

from .config import (APDConfig, APDRawConfig, ClusteringConfig, EvaluateConfig, ExplainConfig, MakeDataConfig,
                     RIConfig, RobustifyConfig, StainConfig, TrainConfig)


def _inputs(cfg):
    from .features import load_features
    from .metadata import read_metadata

    if cfg.features is None:
        raise TubError("no features given; pass FEATURES (a folder of per-center .npz, a .npy/.npz, or an atlas folder)")
    meta = read_metadata(cfg.metadata) if cfg.metadata is not None else None
    return load_features(cfg.features, meta)


def _dataset_key(cfg) -> str:
    return cfg.dataset or "custom"


def _ri(cfg, run, X, meta):
    from .results import metric_dir, write_ri
    from .robustness_index import robustness_index

    run.log.info("robustness index on %d rows (dataset %s)", len(meta), _dataset_key(cfg))
    res = robustness_index(X, meta, k=cfg.k, k_search=cfg.k_search, dataset=cfg.dataset, paired=cfg.paired,
                           max_patches_per_combi=cfg.max_patches_per_combi, bootstrap=cfg.bootstrap, seed=run.seed,
                           auc=cfg.auc, max_k=cfg.max_k)
    k_param = -1 if cfg.k_search else (cfg.k or 0)
    folder = metric_dir(run.outputs_dir, "robustness_index", cfg.layout, cfg.model_name, _dataset_key(cfg),
                        f"{cfg.max_patches_per_combi}_{k_param}")
    write_ri(folder, res, k_param, cfg.max_patches_per_combi)
    return res


def _ri_impl(cfg: RIConfig, run) -> dict:
    X, meta = _inputs(cfg)
    return _ri(cfg, run, X, meta).summary


def _apd(cfg, run, X, meta) -> dict:
    import json

    from .apd import apd_accuracies, dataset_summary
    from .results import metric_dir

    if cfg.dataset is None:
        raise TubError("APD follows a dataset's split protocol; pass --dataset camelyon|tcga|tolkach_esca")
    splits = None
    if cfg.tolkach_splits is not None:
        if not Path(cfg.tolkach_splits).is_file():
            raise TubError(f"tolkach splits file not found: {cfg.tolkach_splits}")
        splits = json.loads(Path(cfg.tolkach_splits).read_text())
    raw = apd_accuracies(X, meta, cfg.dataset, cfg.iterations, splits, progress=run.progress)
    summary = dataset_summary(raw)
    folder = metric_dir(run.outputs_dir, "apd", cfg.layout, cfg.model_name, None)
    write_json(folder / f"{cfg.dataset}_raw.json", raw)
    write_json(folder / f"{cfg.dataset}_summary.json", summary)
    return summary


def _apd_impl(cfg: APDConfig, run) -> dict:
    X, meta = _inputs(cfg)
    if cfg.iterations < 1:
        raise TubError("--iterations must be at least 1")
    s = _apd(cfg, run, X, meta)
    return {"apd_id": s["apd_id"], "apd_ood": s["apd_ood"]}


def apd_from_raw(cfg: APDRawConfig, run) -> dict:
    from .apd import aggregate, dataset_summary, read_raw

    if not cfg.raw:
        raise TubError("no raw files given; pass one or more {dataset}_raw.json")
    raws = {}
    for p in cfg.raw:
        if not Path(p).is_file():
            raise TubError(f"raw APD file not found: {p}")
        name, raw = read_raw(p)
        raws[name] = raw
    out = {}
    for name, raw in raws.items():
        s = dataset_summary(raw)
        write_json(run.outputs_dir / f"{name}_summary.json", s)
        out[name] = {"apd_id": s["apd_id"], "apd_ood": s["apd_ood"]}
    if cfg.aggregate and len(raws) > 1:
        agg = aggregate(raws)
        write_json(run.outputs_dir / "aggregated_summary.json", agg)
        out["aggregated"] = {k: v for k, v in agg.items() if k != "aggregation_datasets"}
    return out


def _cs(cfg, run, X, meta, K, min_k, max_k, trials) -> dict:
    from .clustering_score import clustering_score
    from .results import metric_dir, write_cs

    res = clustering_score(X, meta, K=K, min_k=min_k, max_k=max_k, trials=trials, progress=run.progress)
    write_cs(metric_dir(run.outputs_dir, "clustering_score", cfg.layout, cfg.model_name, _dataset_key(cfg)), res)
    return res.summary


def _clustering_impl(cfg: ClusteringConfig, run) -> dict:
    X, meta = _inputs(cfg)
    return _cs(cfg, run, X, meta, cfg.K, cfg.min_k, cfg.max_k, cfg.trials)


def _evaluate_impl(cfg: EvaluateConfig, run) -> dict:
    """All selected metrics; the same files as the single-metric verbs, one combined results.json."""
    if "apd" in cfg.metrics and cfg.dataset is None:
        raise TubError("APD follows a dataset's split protocol; pass --dataset camelyon|tcga|tolkach_esca")
    if "apd" in cfg.metrics and cfg.dataset == "tolkach_esca" and cfg.tolkach_splits is None:
        raise TubError("tolkach_esca APD needs the case-split file; pass --tolkach-splits tolkach_splits.json")
    X, meta = _inputs(cfg)
    out = {}
    if "ri" in cfg.metrics:
        out["robustness_index"] = _ri(cfg, run, X, meta).summary
    if "apd" in cfg.metrics:
        out["apd"] = _apd(cfg, run, X, meta)
        out["apd"] = {k: out["apd"][k] for k in ("apd_id", "apd_ood")}
    if "cs" in cfg.metrics:
        out["clustering_score"] = _cs(cfg, run, X, meta, cfg.K, cfg.min_k, cfg.max_k_clusters, cfg.trials)
    write_json(run.outputs_dir / "results.json", out)
    return out


def _robustness_pair(X, Y, meta, k):
    from .robustness_index import robustness_index

    before = robustness_index(X, meta, k=k, auc=False)
    after = robustness_index(Y, meta, k=k, auc=False)
    return before.summary, after.summary


def _train_impl(cfg: TrainConfig, run) -> dict:
    """Fit a robustification on the features and save it (safetensors + JSON) for later use."""
    from .robustify import METHODS

    X, meta = _inputs(cfg)
    ID = meta.subset != "OOD"
    Xf, mf = X[ID], meta.where(ID)
    for c in cfg.covariates:
        if c not in mf.columns:
            raise TubError(f"covariate column {c!r} is not in the metadata (columns: {', '.join(mf.columns)})")
    if cfg.method == "center-mean" and cfg.covariates:
        raise TubError("center-mean alignment takes no covariates; drop --covariates or use --method combat")
    model = METHODS[cfg.method]()
    covs = {c: mf[c] for c in cfg.covariates} or None
    Y = model.fit_transform(Xf, mf.medical_center, covs)
    st, js = model.save(run.checkpoints_dir / "robustification")
    before, after = _robustness_pair(Xf, Y, mf, cfg.k)
    out = {"method": cfg.method, "centers": len(model.centers_), "rows": int(len(Xf)), "saved": str(st),
           "robustness_index_before": before["robustness_index"], "robustness_index_after": after["robustness_index"],
           "knn_balanced_accuracy_before": before["balanced_accuracy"],
           "knn_balanced_accuracy_after": after["balanced_accuracy"], "k": cfg.k}
    return out


def _robustify_impl(cfg: RobustifyConfig, run) -> dict:
    """Apply a fitted robustification; writes the features in the layout they came in."""
    from .features import write_like
    from .robustify import ComBat, load_robustification

    if cfg.model is None:
        raise TubError("no fitted robustification; pass --model PATH.safetensors (from `tub pathorob train`)")
    model = load_robustification(cfg.model)
    X, meta = _inputs(cfg)
    covs = None
    if isinstance(model, ComBat) and model.covariate_levels_:
        missing = [c for c in model.covariate_levels_ if c not in meta.columns]
        if missing:
            raise TubError(f"the robustification needs covariate column {missing[0]!r} in the metadata")
        covs = {c: meta[c] for c in model.covariate_levels_}
    Y = model.transform(X, meta.medical_center, covs)
    Y = Y.astype(X.dtype) if X.dtype == np.float32 else Y
    dst = write_like(cfg.features, run.outputs_dir / "features", Y, meta)
    return {"method": model.method, "rows": int(len(Y)), "output": str(dst),
            "mean_abs_change": float(np.abs(Y - X).mean())}


def stainnorm(cfg: StainConfig, run) -> dict:
    """Stain-normalise tile images (Macenko or Reinhard) into outputs/, one file per tile."""
    from PIL import Image

    from tubcli.io import atomic_path

    from .stain import NORMALIZERS

    exts = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
    files = []
    for p in cfg.tiles:
        p = Path(p)
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in exts)
        elif p.is_file():
            files.append(p)
        else:
            raise TubError(f"tile not found: {p}")
    if not files:
        raise TubError("no tile images given (PNG/JPEG/TIFF files or folders of them)")
    norm = NORMALIZERS[cfg.method]()
    if cfg.target is not None:
        if not Path(cfg.target).is_file():
            raise TubError(f"target tile not found: {cfg.target}")
        norm.fit(_read_rgb(cfg.target))
    elif cfg.method == "reinhard":
        raise TubError("Reinhard normalisation needs --target IMG")
    done = 0
    for item, out in run.batch([str(f) for f in files], output_for=lambda p: run.outputs_dir / (Path(p).stem + ".png")):
        with run.item(item):
            img = norm.transform(_read_rgb(Path(item)))
            with atomic_path(out) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
            done += 1
    return {"method": cfg.method, "tiles": len(files), "written": done}


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise TubError(f"{path}: not a readable image ({str(e).splitlines()[0]})") from None


def _explain_impl(cfg: ExplainConfig, run) -> dict:
    """Per-class/center neighbour composition, confounded center pairs and slides, RI(k), plots."""
    from .breakdown import breakdown
    from .plots import composition_bars, pair_heatmap, projection, ri_curve
    from .results import _csv
    from .robustness_index import DEFAULT_K, robustness_index
    from tubcli.io import write_text

    X, meta = _inputs(cfg)
    k = cfg.k or DEFAULT_K.get(cfg.dataset or "", None)
    if k is None:
        raise TubError("no default k for a custom dataset; pass --k N")
    res = robustness_index(X, meta, k=k, dataset=cfg.dataset, paired=cfg.paired, auc=False,
                           min_neighbours=cfg.max_k_curve)
    bd = breakdown(res, k, cfg.top)
    out = run.outputs_dir
    write_json(out / "breakdown.json", {kk: v for kk, v in bd.items() if kk != "all_slides"})
    write_text(out / "slides.csv", _csv([(s["slide_id"], s["medical_center"], s["biological_class"], s["OS_share"],
                                          s["neighbours"]) for s in bd["all_slides"]],
                                        ["slide_id", "medical_center", "biological_class", "OS_share", "neighbours"]))
    write_json(out / "robustness_curves.json", {kk: np.asarray(v).tolist() for kk, v in res.curves.items()})
    if cfg.plots:
        composition_bars(bd, out / "composition.png")
        ri_curve(res.curves, k, out / "ri_curve.png", cfg.max_k_curve)
        pair_heatmap(bd, out / "center_pairs.png")
        ID = meta.subset != "OOD"
        projection(X[ID], meta.biological_class[ID], meta.medical_center[ID], out / "projection.png", seed=run.seed)
    worst = bd["center_pairs"][0] if bd["center_pairs"] else None
    summary = {"k": k, "robustness_index": res.summary["robustness_index"],
               "ri_per_class": {c: v["robustness_index"] for c, v in bd["per_class"].items()},
               "ri_per_center": {c: v["robustness_index"] for c, v in bd["per_center"].items()}}
    if worst:
        summary["most_confounded_pair"] = f"{worst['center_a']} / {worst['center_b']} (RI {worst['robustness_index']:.3f})"
    if bd["most_confounded_slides"]:
        s = bd["most_confounded_slides"][0]
        summary["most_confounded_slide"] = f"{s['slide_id']} (OS share {s['OS_share']:.3f})"
    return summary


def make_data(cfg: MakeDataConfig, run) -> dict:
    """Synthetic feature sets (official layout + plain .npy + metadata CSV) or synthetic H&E tiles."""
    if cfg.kind == "tiles":
        return _make_tiles(cfg, run)
    from .features import write_official, write_plain
    from .synthetic import PRESETS, paired_subsets, synthetic_features

    if cfg.preset:
        X, meta = synthetic_features(design=PRESETS[cfg.preset], dim=cfg.dim, bio=cfg.bio, center=cfg.center,
                                     slide=cfg.slide, noise=cfg.noise, center_scale=cfg.center_scale, seed=run.seed)
    else:
        if cfg.classes < 1 or cfg.centers < 1 or cfg.slides_per_cell < 1 or cfg.tiles_per_slide < 1:
            raise TubError("classes, centers, slides-per-cell and tiles-per-slide must be >= 1")
        X, meta = synthetic_features(tuple(f"class{i}" for i in range(cfg.classes)),
                                     tuple(f"center{i}" for i in range(cfg.centers)), cfg.slides_per_cell,
                                     cfg.tiles_per_slide, cfg.dim, cfg.bio, cfg.center, cfg.slide, cfg.noise,
                                     cfg.center_scale, run.seed)
    out = run.outputs_dir
    write_official(out / "features", X, meta)
    write_plain(out / "features.npy", X)
    meta.write_csv(out / "metadata.csv")
    res = {"rows": int(len(X)), "dim": int(X.shape[1]), "classes": len(set(meta.biological_class)),
           "centers": len(set(meta.medical_center)), "features": str(out / "features"),
           "metadata": str(out / "metadata.csv")}
    if cfg.paired:
        paired, _ = paired_subsets(meta)
        paired.write_csv(out / "metadata_paired.csv")
        res["paired_metadata"] = str(out / "metadata_paired.csv")
        res["paired_subsets"] = len(set(paired.subset))
    return res


def _make_tiles(cfg: MakeDataConfig, run) -> dict:
    from PIL import Image

    from tubcli.io import atomic_path
    from tubcli.io import write_text

    from .stain import HE_REF, synthetic_tile
    from .results import _csv

    rng = np.random.default_rng(run.seed)
    rows, mats = [], {}
    for ci in range(cfg.centers):
        S = np.clip(HE_REF + 0.12 * rng.standard_normal(HE_REF.shape), 0.05, None)
        S /= np.linalg.norm(S, axis=0)
        mats[f"center{ci}"] = S.tolist()
        for bi in range(cfg.classes):
            for t in range(cfg.tiles_per_cell):
                img = synthetic_tile(S, cfg.tile_size, seed=int(rng.integers(1 << 31)), cls=bi)
                name = f"center{ci}_class{bi}_{t:03d}.png"
                with atomic_path(run.outputs_dir / "tiles" / name) as tmp:
                    Image.fromarray(img).save(tmp, format="PNG")
                rows.append((f"tiles/{name}", f"center{ci}", f"class{bi}"))
    write_text(run.outputs_dir / "tiles.csv", _csv(rows, ["path", "medical_center", "biological_class"]))
    write_json(run.outputs_dir / "stain_matrices.json", mats)
    return {"tiles": len(rows), "folder": str(run.outputs_dir / "tiles")}


def _threaded(impl):
    def verb(cfg, run):
        from .threads import limit_threads

        with limit_threads(cfg.threads):
            return impl(cfg, run)

    verb.__doc__ = impl.__doc__
    return verb


ri = _threaded(_ri_impl)
apd = _threaded(_apd_impl)
clustering = _threaded(_clustering_impl)
evaluate = _threaded(_evaluate_impl)
train = _threaded(_train_impl)
robustify = _threaded(_robustify_impl)
explain = _threaded(_explain_impl)
