"""Verb functions of tub-pathorob: thin glue between configs, the metric modules and result files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tubcli.config import given_fields
from tubcli.errors import TubError
from tubcli.io import write_json

from .config import (APDConfig, APDRawConfig, ClusteringConfig, EvaluateConfig, ExplainConfig, MakeDataConfig,
                     RIConfig, RobustifyConfig, StainConfig, TrainConfig)


def _given_paths(cfg) -> list[Path]:
    """Every path the user gave in the config: inputs that a verb must never write to (a fitted model
    given as its run directory excepted: a later run may live inside it, as the core allows)."""
    from tubcli.runs import is_run_directory

    out = []
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        paths = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, Path)]
        out += [v for v in paths if not (name == "model" and v.is_dir() and is_run_directory(v))]
    return out


def _refuse_overwrite(cfg, written, inputs=()) -> None:
    """One-line error if a path this verb writes is, lies inside, or holds a path the user gave (or one of
    ``inputs``, e.g. the metadata found beside the features)."""
    given = {p.resolve(): p for p in _given_paths(cfg) + [Path(i) for i in inputs]}
    holders = {parent: p for r, p in given.items() for parent in r.parents}
    for w in written:
        wr = Path(w).resolve()
        hit = given.get(wr) or holders.get(wr) or next((given[q] for q in wr.parents if q in given), None)
        if hit is not None:
            raise TubError(f"the output {w} would overwrite or go inside the input {hit}; "
                           "pass a run directory (-o) apart from the inputs")


def _config_files(run_dir: Path) -> list[Path]:
    return [run_dir / "config.yaml", *sorted(run_dir.glob("config.*.yaml"))]


def _product_files(run, products: tuple[str, ...]) -> list[Path]:
    """Files under ``outputs/`` matching one of ``products`` (paths relative to outputs/, ``*`` within one
    folder level); hidden files and folders are left out."""
    import fnmatch

    patterns = [pat.split("/") for pat in products]
    if not run.outputs_dir.is_dir():
        return []
    return [q for q in sorted(run.outputs_dir.rglob("*"))
            if q.is_file() and not any(p.startswith(".") for p in q.relative_to(run.outputs_dir).parts)
            and any(len(pat) == len(q.relative_to(run.outputs_dir).parts)
                    and all(map(fnmatch.fnmatchcase, q.relative_to(run.outputs_dir).parts, pat)) for pat in patterns)]


def _clear_products(cfg, run, products: tuple[str, ...], inputs=()) -> None:
    """Remove an earlier run's outputs of this verb (files matching ``products``) before a rerun writes its
    own, so that no stale file (e.g. a center the new data lacks) is left beside them; never an input."""
    files = _product_files(run, products)
    _refuse_overwrite(cfg, files, inputs)
    for f in files:
        f.unlink()


def _refuse_foreign_run(cfg, run, verb: str, marker: set[str], products: tuple[str, ...],
                        other_products: tuple[str, ...] = (), other_what: str = "") -> None:
    """One-line error if ``-o`` is another verb's run directory, so that its records (config.yaml,
    metrics.json) and outputs are never replaced or mixed with this verb's: one of its config files
    (config.yaml, or an archived config.N.yaml) holds settings this verb does not have or lacks the
    ``marker`` settings, or ``outputs/`` holds a file that matches none of the ``products`` patterns
    (paths relative to outputs/, ``*`` within one folder level) that this verb writes; one matching
    ``other_products`` (this verb's outputs in another mode) is named as ``other_what``."""
    import fnmatch

    import yaml

    fields = set(type(cfg).model_fields)
    for f in _config_files(run.dir):
        if not f.is_file():
            continue
        try:
            data = yaml.safe_load(f.read_text())
        except (yaml.YAMLError, ValueError):
            data = None
        if not isinstance(data, dict):
            raise TubError(f"-o {run.dir}: {f.name} is not a readable run config; pass a new -o for "
                           f"`tub pathorob {verb}`")
        keys = set(data)
        if keys - fields or marker - keys:
            what = (f"has the setting {min(keys - fields)!r}, unknown to {verb}" if keys - fields
                    else f"lacks {verb}'s setting {min(marker - keys)!r}")
            raise TubError(f"-o {run.dir} is another verb's run directory (its config {what}); pass a new -o "
                           f"for `tub pathorob {verb}`")
    if not run.outputs_dir.is_dir():
        return
    patterns = [pat.split("/") for pat in products]
    for q in sorted(run.outputs_dir.rglob("*")):
        parts = q.relative_to(run.outputs_dir).parts
        if q.is_dir() or any(part.startswith(".") for part in parts):
            continue  # folders, and unfinished .tmp-* writes of an interrupted run
        if not any(len(pat) == len(parts) and all(map(fnmatch.fnmatchcase, parts, pat)) for pat in patterns):
            other = any(len(pat) == len(parts) and all(map(fnmatch.fnmatchcase, parts, pat))
                        for pat in (o.split("/") for o in other_products))
            why = other_what if other else "another run's data"
            raise TubError(f"-o {run.dir} already holds outputs/{'/'.join(parts)}, which `tub pathorob {verb}` "
                           f"does not write here ({why}); pass a new -o")


def _inputs(cfg):
    from .features import read_inputs

    if cfg.features is None:
        raise TubError("no features given; pass FEATURES (a folder of per-center .npz, a .npy/.npz, an atlas "
                       "folder or a folder of per-slide .h5 features)")
    return read_inputs(cfg.features, cfg.metadata)


def _warn_unofficial_file(run, meta, metric: str, dataset: str | None) -> None:
    from .metadata import official_file_mismatch

    why = official_file_mismatch(meta, metric, dataset)
    if why:
        run.log.warning("%s%s", why, " (evaluate: give it with --ri-metadata/--cs-metadata)" if run.verb == "evaluate"
                        else "")


def _dataset_key(cfg) -> str:
    return cfg.dataset or "custom"


def _ri(cfg, run, X, meta, root: Path | None = None):
    from .results import RI_FILES, metric_dir, write_ri
    from .robustness_index import robustness_index

    k_param = -1 if cfg.k_search else (cfg.k or 0)
    max_patches = -1 if cfg.max_patches_per_combi is None else cfg.max_patches_per_combi  # the reference's "all"
    folder = metric_dir(root or run.outputs_dir, "robustness_index", cfg.layout, cfg.model_name, _dataset_key(cfg),
                        f"{max_patches}_{k_param}")
    _refuse_overwrite(cfg, [folder / name for name in RI_FILES])
    _warn_unofficial_file(run, meta, "ri", cfg.dataset)
    run.log.info("robustness index on %d rows (dataset %s)", len(meta), _dataset_key(cfg))
    if not cfg.bootstrap:
        _say_fixed_seeds(cfg, run, " (the row shuffle, the clustering trials); only --bootstrap draws from it")
    res = robustness_index(X, meta, k=cfg.k, k_search=cfg.k_search, dataset=cfg.dataset, paired=cfg.paired,
                           max_patches_per_combi=cfg.max_patches_per_combi, bootstrap=cfg.bootstrap, seed=run.seed,
                           auc=cfg.auc, max_k=cfg.max_k, bootstrap_unit=cfg.bootstrap_unit)
    if cfg.bootstrap:
        from tubcli.stats import say_if_rough

        say_if_rough(run.log, cfg.bootstrap, res.bootstrap_units, f"{cfg.bootstrap_unit}s")
        if cfg.bootstrap_unit == "tile":
            run.log.info("--bootstrap resamples query tiles (the reference's protocol); tiles of one slide are "
                         "correlated, so its interval understates the uncertainty: --bootstrap-unit slide "
                         "resamples whole slides")
    if not np.isfinite(res.summary["robustness_index"]):  # SO / (SO + OS) = 0 / 0, reported as NaN like the reference
        run.log.warning("the robustness index is undefined at k=%d: no neighbour differs from its query in exactly one "
                        "of class and center (SO + OS = 0), so the features separate classes and centers alike; "
                        "bio_vs_confounding and the k-NN accuracy still describe them", res.summary["k_opt"])
    write_ri(folder, res)
    _study_table(cfg, run, "robustness_index", root)
    return res


def _study_table(cfg, run, metric: str, root: Path | None = None) -> None:
    """With ``--layout official``: rebuild ``outputs/study_<metric>.csv`` (one row per model, dataset and
    setting) from every model's summary on disk, so that models written into one study one after another
    are all listed (metrics.json holds the last run's only)."""
    from .results import write_study_table

    if cfg.layout != "official":
        return
    table, n = write_study_table(root or run.outputs_dir, metric)
    if table is not None:
        run.log.info("study table %s: %d row(s) (model, dataset, setting)", table, n)


def _with_model(cfg, out: dict) -> dict:
    """The verb's result (metrics.json, stdout): with ``--layout official`` it names the model it is for."""
    return {**out, "model_name": cfg.model_name} if cfg.layout == "official" else out


def _ri_impl(cfg: RIConfig, run) -> dict:
    X, meta = _inputs(cfg)
    return _with_model(cfg, _ri(cfg, run, X, meta).summary)


def _tolkach_splits(cfg) -> dict | None:
    import json

    if cfg.tolkach_splits is None:
        return None
    if not Path(cfg.tolkach_splits).is_file():
        raise TubError(f"tolkach splits file not found: {cfg.tolkach_splits}")
    return json.loads(Path(cfg.tolkach_splits).read_text())


def _apd(cfg, run, X, meta, splits: dict | None = None, root: Path | None = None) -> dict:
    from .apd import apd_accuracies, dataset_summary
    from .results import metric_dir

    if cfg.dataset is None:
        raise TubError("APD follows a dataset's split protocol; pass --dataset camelyon|tcga|tolkach_esca")
    splits = splits if splits is not None else _tolkach_splits(cfg)
    folder = metric_dir(root or run.outputs_dir, "apd", cfg.layout, cfg.model_name, None)
    raw_file, summary_file = folder / f"{cfg.dataset}_raw.json", folder / f"{cfg.dataset}_summary.json"
    _refuse_overwrite(cfg, [raw_file, summary_file])
    raw = apd_accuracies(X, meta, cfg.dataset, cfg.iterations, splits, progress=run.progress)
    summary = dataset_summary(raw)
    write_json(raw_file, raw)
    write_json(summary_file, summary)
    _study_table(cfg, run, "apd", root)
    return summary


def _say_fixed_seeds(cfg, run, which: str = "") -> None:
    """The metrics follow the protocol's own seeds: a --seed given is recorded in config.yaml, not used."""
    if "seed" in given_fields(cfg, ["seed"]):
        run.log.warning("--seed %d changes nothing here: the protocol fixes its own seeds%s", cfg.seed, which)


def _apd_impl(cfg: APDConfig, run) -> dict:
    _say_fixed_seeds(cfg, run)
    X, meta = _inputs(cfg)
    s = _apd(cfg, run, X, meta)
    return _with_model(cfg, {"apd_id": s["apd_id"], "apd_ood": s["apd_ood"]})


def apd_from_raw(cfg: APDRawConfig, run) -> dict:
    from .apd import aggregate, dataset_summary, read_raw

    if not cfg.raw:
        raise TubError("no raw files given; pass one or more {dataset}_raw.json")
    raws, sources = {}, {}
    for p in cfg.raw:
        if not Path(p).is_file():
            raise TubError(f"raw APD file not found: {p}")
        name, raw = read_raw(p)
        if name in raws:
            raise TubError(f"{sources[name]} and {p} are both dataset {name!r}; their summaries would collide — "
                           "give one raw file per dataset")
        raws[name], sources[name] = raw, p
    written = [run.outputs_dir / f"{name}_summary.json" for name in raws]
    _refuse_overwrite(cfg, written + [run.outputs_dir / "aggregated_summary.json"])
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


def _cs(cfg, run, X, meta, K, min_k, max_k, trials, root: Path | None = None) -> dict:
    from .clustering_score import clustering_score
    from .results import CS_FILES, metric_dir, write_cs

    folder = metric_dir(root or run.outputs_dir, "clustering_score", cfg.layout, cfg.model_name, _dataset_key(cfg))
    _refuse_overwrite(cfg, [folder / name for name in CS_FILES])
    _warn_unofficial_file(run, meta, "cs", cfg.dataset)
    res = clustering_score(X, meta, K=K, min_k=min_k, max_k=max_k, trials=trials, progress=run.progress,
                           max_k_flag="--max-k-clusters" if run.verb == "evaluate" else "--max-k")
    if res.skipped:  # the score's mean covers the others only (num_combinations still counts all, as the reference)
        run.log.warning("clustering score: %d of %d class/center experiments have an empty cell and are left out of "
                        "the mean: %s", len(res.skipped), res.summary["num_combinations"], ", ".join(res.skipped))
    write_cs(folder, res)
    _study_table(cfg, run, "clustering_score", root)
    return res.summary


def _clustering_impl(cfg: ClusteringConfig, run) -> dict:
    _say_fixed_seeds(cfg, run)
    X, meta = _inputs(cfg)
    return _with_model(cfg, _cs(cfg, run, X, meta, cfg.K, cfg.min_k, cfg.max_k, cfg.trials))


def _rows_of(features, metadata: Path | None, X, meta):
    """The features of a metric's own metadata file (the official layout keys them by slide and patch),
    or ``X, meta`` when it has none."""
    if metadata is None:
        return X, meta
    from .features import read_inputs

    return read_inputs(features, metadata)


# evaluate's options that only one metric reads
METRIC_OPTIONS = {
    "ri": {"ri_metadata": "--ri-metadata", "k": "--k", "k_search": "--k-search", "max_k": "--max-k",
           "paired": "--paired", "max_patches_per_combi": "--max-patches-per-combi", "bootstrap": "--bootstrap",
           "bootstrap_unit": "--bootstrap-unit", "auc": "--no-auc"},
    "apd": {"iterations": "--iterations", "tolkach_splits": "--tolkach-splits"},
    "cs": {"cs_metadata": "--cs-metadata", "K": "--K", "min_k": "--min-k", "max_k_clusters": "--max-k-clusters",
           "trials": "--trials"},
}


def _evaluate_impl(cfg: EvaluateConfig, run) -> dict:
    """All selected metrics; the same files as the single-metric verbs, one combined results.json."""
    if "apd" in cfg.metrics and cfg.dataset is None:
        raise TubError("APD follows a dataset's split protocol; pass --dataset camelyon|tcga|tolkach_esca")
    if "apd" in cfg.metrics and cfg.dataset == "tolkach_esca" and cfg.tolkach_splits is None:
        raise TubError("tolkach_esca APD needs the case-split file; pass --tolkach-splits tolkach_splits.json")
    for metric, flags in METRIC_OPTIONS.items():  # a metric's settings without the metric would be recorded, not used
        idle = given_fields(cfg, list(flags)) if metric not in cfg.metrics else []
        if idle:
            hint = " (the clustering's largest K is --max-k-clusters)" if "max_k" in idle and "cs" in cfg.metrics else ""
            raise TubError(f"{', '.join(flags[f] for f in idle)} {'is' if len(idle) == 1 else 'are'} for --metrics "
                           f"{metric}, which is not among {','.join(cfg.metrics)}{hint}; drop "
                           f"{'it' if len(idle) == 1 else 'them'} or add the metric")
    _refuse_overwrite(cfg, [run.outputs_dir / "results.json"])
    X, meta = _inputs(cfg)
    own = {m: _rows_of(cfg.features, getattr(cfg, f"{m}_metadata"), X, meta) for m in ("ri", "cs")
           if m in cfg.metrics}  # each metric's own metadata file (spec §2.1), read before any output
    splits = _tolkach_splits(cfg) if "apd" in cfg.metrics else None
    if "cs" in cfg.metrics:  # its input checks too: no RI files left behind by a clustering score that cannot run
        from .clustering_score import clustering_score

        clustering_score(*own["cs"], K=cfg.K, min_k=cfg.min_k, max_k=cfg.max_k_clusters, trials=cfg.trials,
                         check_only=True, max_k_flag="--max-k-clusters")
    if "apd" in cfg.metrics:  # its protocol checks first: no half-written results when APD cannot run
        from .apd import apd_inputs

        apd_inputs(meta, cfg.dataset, splits)
    out = {}

    def root(metric: str) -> Path | None:  # flat layout: one folder per metric (RI and CS both write results_summary.json)
        return None if cfg.layout == "official" else run.outputs_dir / metric

    if "ri" in cfg.metrics:
        out["robustness_index"] = _ri(cfg, run, *own["ri"], root("robustness_index")).summary
    if "apd" in cfg.metrics:
        out["apd"] = _apd(cfg, run, X, meta, splits, root("apd"))
        out["apd"] = {k: out["apd"][k] for k in ("apd_id", "apd_ood")}
    if "cs" in cfg.metrics:
        out["clustering_score"] = _cs(cfg, run, *own["cs"], cfg.K, cfg.min_k, cfg.max_k_clusters, cfg.trials,
                                      root("clustering_score"))
    out = _with_model(cfg, out)
    write_json(run.outputs_dir / "results.json", out)
    return out


def _robustness_pair(X, Y, meta, k):
    from .robustness_index import robustness_index

    before = robustness_index(X, meta, k=k, auc=False)
    after = robustness_index(Y, meta, k=k, auc=False, warn=False)  # the same rows: their warnings are said once
    return before.summary, after.summary


CONFOUNDING_V = 0.3  # Cramér's V of the center x class table above which train warns


def cramers_v(centers, classes) -> tuple[float, int]:
    """Cramér's V = sqrt(chi2 / (n (min(r, c) - 1))) of the center x class contingency table (tile counts,
    Pearson chi-square without continuity correction), and n. 0: the same class proportions at every center;
    1: each class at one center only. An effect size, unlike a chi-square p-value, which with thousands of tiles
    flags negligible imbalances."""
    _, ci = np.unique(np.asarray(centers).astype(str), return_inverse=True)
    _, bi = np.unique(np.asarray(classes).astype(str), return_inverse=True)
    table = np.zeros((ci.max() + 1, bi.max() + 1))
    np.add.at(table, (ci.ravel(), bi.ravel()), 1)
    n = table.sum()
    if min(table.shape) < 2:
        return 0.0, int(n)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    chi2 = float(((table - expected) ** 2 / expected).sum())
    return float(np.sqrt(chi2 / (n * (min(table.shape) - 1)))), int(n)


def _warn_confounded(cfg, run, meta) -> None:
    """A WARNING when classes and centers of the fit rows are strongly associated: removing each center's
    location (and scale) then removes class signal along with it, while the in-sample RI still rises."""
    v, n = cramers_v(meta.medical_center, meta.biological_class)
    if v <= CONFOUNDING_V:
        return
    if "biological_class" in cfg.covariates:
        hint = "--covariates biological_class keeps the class effect in the ComBat fit (it uses the labels)"
    elif cfg.method == "combat":
        hint = ("to keep it, fit ComBat with --covariates biological_class (it uses the labels), or fit on a "
                "subset of slides with balanced classes per center")
    else:
        hint = ("center-mean takes no covariates: use --method combat --covariates biological_class (it uses "
                "the labels), or fit on a subset of slides with balanced classes per center")
    run.log.warning("the fit rows are confounded: class proportions differ strongly between centers (Cramér's V "
                    "of the center x class table = %.3f over %d tiles, > %.1f), so %s removes biology along with "
                    "the center and the RI gain it reports can come from erased class signal; %s",
                    v, n, CONFOUNDING_V, cfg.method, hint)


def _train_impl(cfg: TrainConfig, run) -> dict:
    """Fit a robustification on the features and save it (safetensors + JSON) for later use."""
    from .robustify import METHODS

    X, meta = _inputs(cfg)
    ID = np.ones(len(meta), bool) if cfg.include_ood else meta.subset != "OOD"
    Xf, mf = X[ID], meta.where(ID)
    for c in cfg.covariates:
        if c not in mf.columns:
            raise TubError(f"covariate column {c!r} is not in the metadata (columns: {', '.join(mf.columns)})")
    if cfg.method == "center-mean" and cfg.covariates:
        raise TubError("center-mean alignment takes no covariates; drop --covariates or use --method combat")
    _warn_confounded(cfg, run, mf)
    model = METHODS[cfg.method]()
    stem = run.checkpoints_dir / "robustification"
    _refuse_overwrite(cfg, [stem.with_suffix(".safetensors"), stem.with_suffix(".json")])
    covs = {c: mf[c] for c in cfg.covariates} or None
    Y = model.fit_transform(Xf, mf.medical_center, covs)
    model.ood_centers_ = sorted({str(c) for c in meta.medical_center[~ID]} - set(model.centers_))
    before, after = _robustness_pair(Xf, Y, mf, cfg.k)  # before saving: a failing report leaves no model behind
    st, js = model.save(stem)
    out = {"method": cfg.method, "centers": len(model.centers_), "rows": int(len(Xf)), "saved": str(st),
           "robustness_index_before": before["robustness_index"], "robustness_index_after": after["robustness_index"],
           "knn_balanced_accuracy_before": before["balanced_accuracy"],
           "knn_balanced_accuracy_after": after["balanced_accuracy"], "k": cfg.k,
           "before_after": "in-sample on the fit rows (unpaired), not the protocol RI"}
    run.log.info("robustness_index_before/after are in-sample, on the %d rows the robustification was fitted on "
                 "(k=%d, unpaired), not the protocol RI: for that, fit on some slides, `tub pathorob robustify` "
                 "held-out slides' features with --model %s and run `tub pathorob ri` on its output",
                 len(Xf), cfg.k, run.dir)
    if model.ood_centers_:
        out["ood_centers_excluded"] = model.ood_centers_
    return out


def _robustify_impl(cfg: RobustifyConfig, run) -> dict:
    """Apply a fitted robustification; writes the features in the layout they came in."""
    from .features import like_paths, write_like
    from .robustify import ComBat, load_robustification

    if cfg.model is None:
        raise TubError("no fitted robustification; pass --model RUN_DIR or its robustification.safetensors "
                       "(from `tub pathorob train`)")
    model = load_robustification(cfg.model)
    X, meta = _inputs(cfg)
    dst = run.outputs_dir / "features"
    layout, written = like_paths(cfg.features, dst)
    _refuse_overwrite(cfg, written, inputs=[meta.source])
    products = {"official": ("features/*.npz",), "atlas": ("features/embeddings.npy", "features/manifest.csv"),
                "plain": ("features/features.npy", "features/metadata.csv")}
    mine = products["plain"] if layout not in products else products[layout]
    others = tuple(p for v in products.values() for p in v if p not in mine)
    _refuse_foreign_run(cfg, run, "robustify", {"features", "model"}, mine, others,
                        "robustify's output for features in another layout")
    covs = None
    if isinstance(model, ComBat) and model.covariate_levels_:
        missing = [c for c in model.covariate_levels_ if c not in meta.columns]
        if missing:
            raise TubError(f"the robustification needs covariate column {missing[0]!r} in the metadata")
        covs = {c: meta[c] for c in model.covariate_levels_}
        # ComBat adds each row's covariate effect back: on held-out tiles that reads their labels
        run.log.warning("ComBat applies covariate(s) %s from %s to every row: on evaluation tiles this uses the "
                        "labels being evaluated (an upper bound, as in PathoROB); fit without --covariates for a "
                        "robustification that needs no labels", ", ".join(model.covariate_levels_), meta.source)
    Y = model.transform(X, meta.medical_center, covs)
    Y = Y.astype(X.dtype) if X.dtype in (np.float16, np.float32) else Y  # the input's layout (float16 stayed 4x)
    _clear_products(cfg, run, mine, inputs=[meta.source])
    out = write_like(cfg.features, dst, Y, meta)
    return {"method": model.method, "rows": int(len(Y)), "output": str(out),
            "mean_abs_change": float(np.abs(Y - X).mean())}


STAIN_MANIFEST = "stainnorm_manifest.jsonl"


def _folder_tiles(folder: Path) -> list[Path]:
    """Tile images anywhere below ``folder`` (flat folders and ImageFolder trees ``class/**/x.png``, as
    ``tub atlas embed`` reads them); hidden files and folders (e.g. unfinished ``.tmp-*`` writes) are left out."""
    from tubcli.images import image_files

    return image_files(folder)


def _tile_outputs(tiles: list[Path], root: Path) -> dict[str, Path]:
    """``{tile file: output PNG}``. A folder's tiles go to ``root/<folder name>/`` with their sub-folders
    (``tiles/class0/x.png`` -> ``root/tiles/class0/x.png``), a tile given as a file to ``root/``; the output
    keeps a ``.png`` name (any case: ``X.PNG``) and appends ``.png`` to other extensions (``x.jpg.png``).
    Two different tiles with one output name are an error, found before any work."""
    by_output: dict[Path, Path] = {}
    for p in map(Path, tiles):
        if p.is_dir():
            folder = root / p.resolve().name
            files = [(f, folder / f.relative_to(p).parent) for f in _folder_tiles(p)]
        elif p.is_file():
            files = [(p, root)]
        else:
            raise TubError(f"tile not found: {p}")
        for f, folder in files:
            out = folder / (f.name if f.suffix.lower() == ".png" else f.name + ".png")
            other = by_output.setdefault(out, f)
            if other.resolve() != f.resolve():
                raise TubError(f"tiles {other} and {f} would both be written to {out.relative_to(root)}; "
                               "rename one or normalise them in separate runs")
    return {str(f): out for out, f in by_output.items()}


def _tile_record(tile: str, out: Path, root: Path, method: str, target: str) -> dict:
    """What an output tile is made from: its input (absolute path, size, mtime), the method and the target hash."""
    st = Path(tile).stat()
    return {"output": out.relative_to(root).as_posix(), "input": str(Path(tile).resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "method": method, "target": target}


def _read_manifest(path: Path) -> dict[str, dict]:
    """The last record of each output in a stainnorm manifest (JSON lines); unreadable lines are ignored."""
    import json

    records = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
            records[rec["output"]] = rec
        except (ValueError, TypeError, KeyError):
            continue
    return records


def _refuse_foreign_tiles(run, outputs: dict[str, Path], method: str, target: str) -> None:
    """One-line error if an existing output of this run's shard was made from another tile, a changed tile,
    another method or another target (per the manifest), so that it is not skipped as done."""
    from tubcli.runs import shard_items

    records = _read_manifest(run.outputs_dir / STAIN_MANIFEST)
    for item in shard_items(outputs, *run.shard):
        out = outputs[item]
        if not out.exists():
            continue
        want = _tile_record(item, out, run.outputs_dir, method, target)
        rec = records.get(want["output"])
        if rec == want:
            continue
        name = f"outputs/{want['output']}"
        why = ("has no record of the tile it was made from" if rec is None
               else f"was made from {rec.get('input')}, not {want['input']}" if rec.get("input") != want["input"]
               else f"was made from an earlier version of {item}" if (rec.get("size"), rec.get("mtime_ns"))
               != (want["size"], want["mtime_ns"]) else "was made with another method or --target image")
        raise TubError(f"-o {run.dir}: {name} {why}; delete that file or pass --overwrite to remake it, or use a new -o")


def _append_records(path: Path, records: list[dict]) -> None:
    """Append manifest records under the manifest's lock (shards share it)."""
    import json

    from tubcli.runs import ItemLock

    with ItemLock(path).waiting(), open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _compact_manifest(path: Path) -> None:
    """Keep one record per output that exists (the last), under the manifest's lock."""
    import json

    from tubcli.io import write_text
    from tubcli.runs import ItemLock

    if not path.is_file():
        return
    with ItemLock(path).waiting():
        recs = [r for r in _read_manifest(path).values() if (path.parent / r["output"]).is_file()]
        write_text(path, "".join(json.dumps(r) + "\n" for r in recs))


def stainnorm(cfg: StainConfig, run) -> dict:
    """Stain-normalise tile images (Macenko or Reinhard) into outputs/, one PNG per tile (see _tile_outputs).
    ``outputs/stainnorm_manifest.jsonl`` records what each output was made from; an existing output is
    skipped only if its record matches this run's tile and target, otherwise the run is refused."""
    import hashlib

    from PIL import Image

    from tubcli.images import read_rgb, say_rotated
    from tubcli.io import atomic_path

    from .stain import NORMALIZERS

    outputs = _tile_outputs(cfg.tiles, run.outputs_dir)
    if not outputs:
        raise TubError("no tile images found (PNG/JPEG/TIFF/BMP files, or folders searched recursively); "
                       "check the paths")
    manifest = run.outputs_dir / STAIN_MANIFEST
    _refuse_overwrite(cfg, [*outputs.values(), manifest])
    norm = NORMALIZERS[cfg.method]()
    target = "default"
    if cfg.target is not None:
        if not Path(cfg.target).is_file():
            raise TubError(f"target tile not found: {cfg.target}")
        target = "sha256:" + hashlib.sha256(Path(cfg.target).read_bytes()).hexdigest()
    elif cfg.method == "reinhard":
        raise TubError("Reinhard normalisation needs --target IMG")
    if not run.overwrite:
        _refuse_foreign_tiles(run, outputs, cfg.method, target)
    if cfg.target is not None:
        try:
            norm.fit(read_rgb(cfg.target))
        except TubError as exc:
            raise TubError(f"--target {cfg.target}: {exc}") from None
    done, rotated = 0, []
    for item, out in run.batch(outputs, output_for=outputs.get):
        with run.item(item):
            record = _tile_record(item, out, run.outputs_dir, cfg.method, target)
            img = norm.transform(read_rgb(Path(item), rotated if not rotated else None))
            with atomic_path(out) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
                _append_records(manifest, [record])  # before the tile is in place: a kill between leaves no tile
                # without its record (which every rerun would refuse), only a record without a tile (redone)
            done += 1
    say_rotated(rotated, run.log)  # the normalised PNGs keep the stored orientation, without the tag
    _compact_manifest(manifest)
    return {"method": cfg.method, "tiles": len(outputs), "written": done}


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
    names = ("breakdown.json", "slides.csv", "robustness_curves.json", "composition.png", "ri_curve.png",
             "center_pairs.png", "projection.png")
    f = {name.split(".")[0]: run.outputs_dir / name for name in names}
    _refuse_overwrite(cfg, f.values())
    res = robustness_index(X, meta, k=k, dataset=cfg.dataset, paired=cfg.paired, auc=False,
                           min_neighbours=cfg.max_k_curve)
    bd = breakdown(res, k, cfg.top)
    write_json(f["breakdown"], {kk: v for kk, v in bd.items() if kk != "all_slides"})
    write_text(f["slides"], _csv([(s["slide_id"], s["medical_center"], s["biological_class"], s["OS_share"],
                                   s["neighbours"]) for s in bd["all_slides"]],
                                 ["slide_id", "medical_center", "biological_class", "OS_share", "neighbours"]))
    write_json(f["robustness_curves"], {kk: np.asarray(v).tolist() for kk, v in res.curves.items()})
    if cfg.plots:
        composition_bars(bd, f["composition"])
        ri_curve(res.curves, k, f["ri_curve"], cfg.max_k_curve, k_name="k" if cfg.k else "k_opt")
        pair_heatmap(bd, f["center_pairs"])
        ID = meta.subset != "OOD"
        projection(X[ID], meta.biological_class[ID], meta.medical_center[ID], f["projection"], seed=run.seed)
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
    kinds = {"tiles": ("tiles/*.png", "tiles.csv", "stain_matrices.json"),
             "features": ("features/*.npz", "features.npy", "metadata.csv", "metadata_paired.csv")}
    products = kinds[cfg.kind]
    _refuse_foreign_run(cfg, run, "make-data", {"kind"}, products,
                        tuple(p for k, v in kinds.items() if k != cfg.kind for p in v),
                        f"make-data's output of another kind than {cfg.kind}")
    if cfg.kind == "tiles":
        _clear_products(cfg, run, products)
        return _make_tiles(cfg, run)
    from .features import write_official, write_plain
    from .synthetic import PRESETS, paired_subsets, synthetic_features

    if cfg.preset:
        X, meta = synthetic_features(design=PRESETS[cfg.preset], dim=cfg.dim, bio=cfg.bio, center=cfg.center,
                                     slide=cfg.slide, noise=cfg.noise, center_scale=cfg.center_scale, seed=run.seed)
    else:
        X, meta = synthetic_features(tuple(f"class{i}" for i in range(cfg.classes)),
                                     tuple(f"center{i}" for i in range(cfg.centers)), cfg.slides_per_cell,
                                     cfg.tiles_per_slide, cfg.dim, cfg.bio, cfg.center, cfg.slide, cfg.noise,
                                     cfg.center_scale, run.seed)
    out = run.outputs_dir
    _clear_products(cfg, run, products)
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


def tile_slides(tiles_per_cell: int, slides_per_cell: int) -> list[int]:
    """Slide number of each tile of a class-center cell: contiguous blocks, at most ``slides_per_cell``
    slides and at least two tiles per slide (one slide for a single tile), so that RI's same-slide exclusion
    has slides to exclude."""
    n = max(1, min(slides_per_cell, tiles_per_cell // 2))
    return [t * n // tiles_per_cell for t in range(tiles_per_cell)]


def _make_tiles(cfg: MakeDataConfig, run) -> dict:
    """Synthetic H&E tiles and ``tiles.csv`` in the PathoROB metadata format (subset, slide_id, patch_id,
    biological_class, medical_center, plus path), so that ``tub atlas embed --format pathorob --metadata``
    reads them as they are; slides are nested in the center x class cells."""
    from PIL import Image

    from tubcli.io import atomic_path
    from tubcli.io import write_text

    from .metadata import COLUMNS
    from .stain import HE_REF, synthetic_tile
    from .results import _csv

    rng = np.random.default_rng(run.seed)
    slides = tile_slides(cfg.tiles_per_cell, cfg.slides_per_cell)
    rows, mats = [], {}
    for ci in range(cfg.centers):
        S = np.clip(HE_REF + 0.12 * rng.standard_normal(HE_REF.shape), 0.05, None)
        S /= np.linalg.norm(S, axis=0)
        mats[f"center{ci}"] = S.tolist()
        for bi in range(cfg.classes):
            for t in range(cfg.tiles_per_cell):
                img = synthetic_tile(S, cfg.tile_size, seed=int(rng.integers(1 << 31)), cls=bi)
                slide, patch = f"center{ci}_class{bi}_s{slides[t]}", f"{t:03d}"
                name = f"{slide}_{patch}.png"
                with atomic_path(run.outputs_dir / "tiles" / name) as tmp:
                    Image.fromarray(img).save(tmp, format="PNG")
                rows.append(("ID", slide, patch, f"class{bi}", f"center{ci}", f"tiles/{name}"))
    write_text(run.outputs_dir / "tiles.csv", _csv(rows, [*COLUMNS, "path"]))
    write_json(run.outputs_dir / "stain_matrices.json", mats)
    return {"tiles": len(rows), "slides": cfg.centers * cfg.classes * (slides[-1] + 1),
            "folder": str(run.outputs_dir / "tiles"), "metadata": str(run.outputs_dir / "tiles.csv")}


def cpu_notice(cfg, run) -> None:
    """--device/--precision are recorded in config.yaml, so say that they are not used."""
    device, precision = getattr(cfg, "device", "auto"), getattr(cfg, "precision", "fp32")
    if device not in ("auto", "cpu") or precision != "fp32":
        run.log.warning("tub-pathorob computes with numpy/scikit-learn on the CPU: "
                        "--device %s --precision %s do not change that", device, precision)


def _threaded(impl):
    def verb(cfg, run):
        from .threads import limit_threads

        cpu_notice(cfg, run)
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
