"""Configs of the tub-pathorob verbs (pydantic; extra keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, get_args

from pydantic import Field, field_validator, model_validator

from tubcli.config import TubConfig, given_fields, split_commas

Dataset = Optional[Literal["camelyon", "tcga", "tolkach_esca"]]
Metric = Literal["ri", "apd", "cs"]


class FeaturesConfig(TubConfig):
    features: Optional[Path] = Field(None, description="features: folder of per-center .npz (official / tub atlas embed), "
                                                        "a .npy/.npz matrix, an atlas folder with embeddings.npy (or "
                                                        "a folder of them), or a folder of per-slide .h5 (features, "
                                                        "coords; patch_id = x_y)")
    metadata: Optional[Path] = Field(None, description="PathoROB metadata CSV (subset, slide_id, patch_id, "
                                                        "biological_class, medical_center; per-slide .h5 features: "
                                                        "patch_id may be omitted, all tiles of each slide)")
    dataset: Dataset = Field(None, description="official dataset whose settings apply: camelyon | tcga | tolkach_esca")
    model_name: str = Field("model", description="model name for the official results layout")
    layout: Literal["flat", "official"] = Field("flat", description="flat files in outputs/, or the official "
                                                                   "results/<metric>/<model>/<dataset>/ tree")
    threads: int = Field(1, ge=0, description="threads for the native libraries (OpenMP/BLAS); 0 = library default")


class RIConfig(FeaturesConfig):
    k: Optional[int] = Field(None, ge=1, description="neighbours k (default per dataset: camelyon 11, tcga 61, "
                                                      "tolkach_esca 46)")
    k_search: bool = Field(False, description="choose k by kNN balanced accuracy over the official grid")
    max_k: Optional[int] = Field(None, ge=1, description="largest k of the k-search grid, inclusive (with --k-search; "
                                                          "default per dataset)")
    paired: Optional[bool] = Field(None, description="evaluate each subset (2x2) separately and pool (default: tcga)")
    max_patches_per_combi: Optional[int] = Field(None, description="keep at most M (>= 1) rows per (subset, "
                                                                    "class-center); omit to keep all rows")
    bootstrap: int = Field(0, ge=0, description="bootstrap resamples for robustness_index-mean/-std/-ci95 "
                                                 "(official 1000)")
    bootstrap_unit: Literal["tile", "slide"] = Field(
        "tile", description="what --bootstrap resamples: tile (query tiles, the reference's protocol) or slide "
                            "(slides with all their tiles: tiles of a slide are correlated, so the tile bootstrap "
                            "understates the uncertainty)")
    auc: bool = Field(True, description="compute confounder_log_reg_AUC (logistic regression, 5 folds)")

    @field_validator("bootstrap")
    @classmethod
    def _resamples(cls, value):
        if value == 1:  # one resample has no spread: its std would read as an exact RI
            raise ValueError("1 resample gives no standard deviation; give 0 (no bootstrap) or at least 2 "
                             "(official 1000)")
        return value

    @field_validator("max_patches_per_combi")
    @classmethod
    def _row_count(cls, value):
        if value is not None and value < 1:  # the reference's -1 means "all rows": here that is the default
            raise ValueError(f"{value} is not a row count; give M >= 1, or omit the option to keep all rows")
        return value

    @model_validator(mode="after")
    def _unit_needs_bootstrap(self):
        if self.bootstrap_unit != "tile" and not self.bootstrap:  # it would be recorded, not used
            raise ValueError(f"--bootstrap-unit {self.bootstrap_unit} needs --bootstrap B (e.g. 1000)")
        return self


class APDConfig(FeaturesConfig):
    iterations: int = Field(20, ge=1, description="data resampling repetitions")
    tolkach_splits: Optional[Path] = Field(None, description="tolkach_splits.json (tolkach_esca only)")


class APDRawConfig(TubConfig):
    raw: list[Path] = Field(default_factory=list, description="{dataset}_raw.json files")
    aggregate: bool = Field(True, description="also write aggregated_summary.json over all given datasets")


class ClusteringConfig(FeaturesConfig):
    K: Optional[int] = Field(None, ge=2, description="fixed number of clusters (default: silhouette over "
                                                      "--min-k..--max-k)")
    min_k: int = Field(2, ge=2, description="smallest K tried")
    max_k: int = Field(30, ge=2, description="largest K tried")
    trials: int = Field(50, ge=1, description="k-means repetitions per experiment")


class EvaluateConfig(RIConfig):
    metrics: list[Metric] = Field(default_factory=lambda: ["ri", "cs"],
                                  description="metrics to compute: ri, apd, cs")
    iterations: int = Field(20, ge=1, description="APD repetitions")
    tolkach_splits: Optional[Path] = Field(None, description="tolkach_splits.json (APD on tolkach_esca)")
    ri_metadata: Optional[Path] = Field(None, description="metadata CSV for the robustness index when it is not "
                                                           "--metadata's (official tolkach_esca: tolkach_esca_reduced)")
    cs_metadata: Optional[Path] = Field(None, description="metadata CSV for the clustering score when it is not "
                                                           "--metadata's (official: camelyon_reduced, tcga_4x4, "
                                                           "tolkach_esca_reduced)")
    K: Optional[int] = Field(None, ge=2, description="clustering: fixed K")
    min_k: int = Field(2, ge=2, description="clustering: smallest K")
    max_k_clusters: int = Field(30, ge=2, description="clustering: largest K")
    trials: int = Field(50, ge=1, description="clustering: k-means repetitions")

    @field_validator("metrics", mode="before")
    @classmethod
    def _split_commas(cls, value):
        """``--metrics ri,cs`` and ``--metrics ri --metrics cs`` (and a YAML list or string) mean the same."""
        out = split_commas(value)
        if not isinstance(out, list):
            return value
        unknown = [m for m in out if m not in get_args(Metric)]
        if unknown or not out:
            what = f"unknown metric {unknown[0]!r}" if unknown else "no metric given"
            raise ValueError(f"{what}; choose from {', '.join(get_args(Metric))}, e.g. --metrics ri,cs")
        return out


class TrainConfig(FeaturesConfig):
    method: Literal["combat", "center-mean"] = Field("combat", description="robustification: combat | center-mean")
    covariates: list[str] = Field(default_factory=list, description="metadata columns kept as ComBat covariates "
                                                                    "(e.g. biological_class; leaks labels)")
    k: int = Field(11, ge=1, description="k for the before/after robustness index on the training data")
    include_ood: bool = Field(False, description="fit on all rows, OOD included (default: ID rows only, as the "
                                                 "protocol keeps OOD centers unseen)")

    @field_validator("covariates", mode="before")
    @classmethod
    def _split_commas(cls, value):
        """``--set covariates=a,b`` as the flag ``--covariates a,b``, a YAML list or repeated flags."""
        return split_commas(value)


class RobustifyConfig(FeaturesConfig):
    model: Optional[Path] = Field(None, description="fitted robustification: the run directory of `tub pathorob "
                                                     "train` or its .safetensors (with the .json beside it)")


class StainConfig(TubConfig):
    tiles: list[Path] = Field(default_factory=list, description="tile images (PNG/JPEG/TIFF/BMP) or folders of them, "
                                                                "read recursively; a folder's tiles go to "
                                                                "outputs/<folder name>/<sub-folders>/")
    method: Literal["macenko", "reinhard"] = Field("macenko", description="macenko | reinhard")
    target: Optional[Path] = Field(None, description="target tile whose stain appearance to match "
                                                     "(Macenko: optional, default reference matrix)")


class ExplainConfig(FeaturesConfig):
    k: Optional[int] = Field(None, ge=1, description="neighbours k (default per dataset)")
    paired: Optional[bool] = Field(None, description="paired 2x2 evaluation (default: tcga)")
    top: int = Field(20, ge=0, description="most confounded slides to list")
    plots: bool = Field(True, description="write PNG plots")
    max_k_curve: int = Field(200, ge=1, description="largest k of the RI(k) curve")


class MakeDataConfig(TubConfig):
    kind: Literal["features", "tiles"] = Field("features", description="features | tiles")
    preset: Optional[Literal["camelyon", "camelyon_reduced", "tcga_4x4", "tolkach_esca", "tolkach_esca_reduced"]] = Field(
        None, description="official dataset shape and names (default: a small custom design)")
    classes: int = Field(2, ge=1, description="biological classes (custom design)")
    centers: int = Field(2, ge=1, description="medical centers (custom design)")
    slides_per_cell: int = Field(5, ge=1, description="slides per class-center cell (custom design; tiles: at most "
                                                       "this many, each of at least two tiles)")
    tiles_per_slide: int = Field(40, ge=1, description="tiles per slide (custom design)")
    dim: int = Field(64, ge=1, description="feature dimension")
    bio: float = Field(0.5, ge=0, description="biological signal a")
    center: float = Field(0.5, ge=0, description="center signal b")
    slide: float = Field(0.3, ge=0, description="slide signal c")
    noise: float = Field(1.0, ge=0, description="noise sigma")
    center_scale: float = Field(0.0, ge=0, description="log-sd of a per-center multiplicative scale")
    paired: bool = Field(False, description="also write a paired (b1-b2-c1-c2 subsets) metadata CSV")
    tile_size: int = Field(64, ge=1, description="tile side in pixels (tiles)")
    tiles_per_cell: int = Field(4, ge=1, description="tiles per class-center cell (tiles)")

    @model_validator(mode="after")
    def _options_apply(self):
        """An option the chosen kind/preset does not read is an error, not silently ignored (a preset fixes
        its own classes and centers). Only values other than the default count, so that a run's saved
        config.yaml, which lists every field, reruns."""
        design = ("classes", "centers", "slides_per_cell", "tiles_per_slide")
        signal = ("dim", "bio", "center", "slide", "noise", "center_scale", "paired")
        unused = {"tiles": ("preset", "tiles_per_slide") + signal,
                  "features": ("tile_size", "tiles_per_cell") + (design if self.preset else ())}[self.kind]
        given = given_fields(self, unused)
        if given:
            preset = self.kind == "features" and self.preset
            raise ValueError(f"make-data {self.kind}{f' --preset {self.preset}' if preset else ''} does not use "
                             f"{', '.join('--' + f.replace('_', '-') for f in given)}; drop it"
                             f"{' (a preset fixes its own design)' if preset else ''}")
        return self
