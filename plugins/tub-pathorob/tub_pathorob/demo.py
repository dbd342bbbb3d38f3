"""``tub demo pathorob``: synthetic confounded features -> RI, explain, ComBat, RI again (< 1 min)."""

from __future__ import annotations


def run_demo(run) -> dict:
    from .cli import cpu_notice
    from .threads import limit_threads

    cpu_notice(run.cfg, run)
    with limit_threads(1):
        return _demo(run)


def _demo(run) -> dict:
    from .breakdown import breakdown
    from .clustering_score import clustering_score
    from .features import write_official
    from .plots import composition_bars, projection
    from .robustify import CenterMeanAlignment, ComBat
    from .robustness_index import robustness_index
    from .synthetic import synthetic_features

    X, meta = synthetic_features(classes=("tumor", "normal", "stroma"), centers=("RUMC", "UMCU", "CWZ"),
                                 slides_per_cell=6, tiles_per_slide=40, dim=64, bio=0.5, center=0.5, slide=0.3,
                                 center_scale=0.3, seed=run.seed)
    write_official(run.outputs_dir / "features", X, meta)
    meta.write_csv(run.outputs_dir / "metadata.csv")
    run.log.info("demo: %d tiles, 3 classes x 3 centers", len(X))
    before = robustness_index(X, meta, k=11, auc=True)
    bd = breakdown(before, 11)
    composition_bars(bd, run.outputs_dir / "composition.png")
    projection(X, meta.biological_class, meta.medical_center, run.outputs_dir / "projection.png")
    cs = clustering_score(X, meta, K=3, trials=3).summary
    combat = ComBat().fit(X, meta.medical_center)
    combat.save(run.outputs_dir / "combat")
    after = robustness_index(combat.transform(X, meta.medical_center), meta, k=11, auc=True)
    cm = robustness_index(CenterMeanAlignment().fit_transform(X, meta.medical_center), meta, k=11, auc=False)
    worst = bd["center_pairs"][0]
    return {
        "tiles": int(len(X)),
        "RI before": round(before.summary["robustness_index"], 4),
        "RI after ComBat": round(after.summary["robustness_index"], 4),
        "RI after center-mean": round(cm.summary["robustness_index"], 4),
        "kNN bal. acc. before": round(before.summary["balanced_accuracy"], 4),
        "kNN bal. acc. after ComBat": round(after.summary["balanced_accuracy"], 4),
        "center AUC before": round(before.summary["confounder_log_reg_AUC"], 4),
        "center AUC after ComBat": round(after.summary["confounder_log_reg_AUC"], 4),
        "clustering score (K=3)": round(cs["clustering_score_mean"], 4),
        "most confounded pair": f"{worst['center_a']}/{worst['center_b']}",
    }
