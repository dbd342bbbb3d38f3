"""Configs of the knnlrp verbs (pydantic; unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from tubcli.config import Section, TubConfig, split_commas


class ExplainSection(Section):
    rule: Literal["gi", "midpoint", "hybrid"] = Field("hybrid", description="LRP rule: gi, midpoint or hybrid")
    eta: Optional[float] = Field(None, ge=0, le=1, description="hybrid mixing η [default: 0.8 kNN, γ heuristic SVM]")
    kappa: Optional[int] = Field(None, ge=0, description="kNN rank half-window κ [default: (k-1)/2]")
    beta: Optional[float] = Field(None, gt=0, description="SVM pooling stiffness β [default: γ]")
    multiclass: Literal["min", "softmin"] = Field("min", description="multiclass: hard min or soft-min over competitors")
    beta_mc: float = Field(1.0, gt=0, description="stiffness of the multiclass soft-min")


class TrainConfig(TubConfig):
    data: Optional[Path] = Field(None, description="training table: CSV, Parquet or NPZ with a label column")
    target: str = Field("target", description="name of the label column")
    kind: Literal["knn", "svm"] = Field("knn", description="knn or svm (RBF kernel)")
    scaler: Literal["standard", "minmax", "robust", "none"] = Field("standard", description="per-feature scaler")
    k: Optional[int] = Field(None, ge=1, description="kNN neighbours (odd) [default: 5-fold grid search 3..27]")
    gamma: Optional[float] = Field(None, gt=0, description="SVM RBF gamma [default: grid search 1e-2..100]")
    C: Optional[float] = Field(None, gt=0, description="SVM C [default: grid search 1e-4..1e4]")
    folds: int = Field(5, ge=2, description="cross-validation folds of the grid search")


class ExplainConfig(TubConfig):
    data: Optional[Path] = Field(None, description="rows to explain: CSV, Parquet or NPZ (a label column is ignored)")
    model: Optional[Path] = Field(None, description="run directory or model.json of `tub knnlrp train`")
    target: str = Field("target", description="label column to drop from the data if present")
    explain: ExplainSection = ExplainSection()
    heatmaps: Optional[bool] = Field(None, description="draw image heatmaps [default: when the features are square pixel grids]")
    max_heatmaps: int = Field(16, ge=0, description="rows drawn in heatmaps.png")
    train_data: Optional[Path] = Field(None, description="the rows a model of your own (--allow-pickle) was fitted on, "
                                       "with the label column: sets the SVM's default η")
    allow_pickle: bool = Field(False, description="allow a .joblib/.pkl model (executes code from the file)",
                               json_schema_extra={"flag_only": True})


class EvaluateConfig(TubConfig):
    data: Optional[Path] = Field(None, description="test rows: CSV, Parquet or NPZ")
    model: Optional[Path] = Field(None, description="run directory or model.json of `tub knnlrp train`")
    target: str = Field("target", description="label column to drop from the data if present")
    explain: ExplainSection = ExplainSection()
    rows: int = Field(100, ge=1, description="evaluate the first N rows")
    replacement: Literal["mean", "kde", "both"] = Field("mean", description="flipped features: training mean, KDE in-painting, or both")
    score: Literal["soft", "hard"] = Field("soft", description="soft score (probability or decision margin) or hard ±1")
    methods: Optional[list[str]] = Field(None, description="methods to compare, e.g. lrp,occlusion "
                                                             "[default: all available]")

    @field_validator("methods", mode="before")
    @classmethod
    def _split_commas(cls, value):  # --methods lrp,occlusion as well as repeated --methods
        return split_commas(value)
    kde_samples: int = Field(50, ge=1, description="conditional samples per flip for KDE in-painting")
    shap_samples: int = Field(500, ge=10, description="KernelSHAP samples per row")
    train_data: Optional[Path] = Field(None, description="the rows a model of your own (--allow-pickle) was fitted on, "
                                       "with the label column: sets the SVM's default η; an SVC needs it (a kNN keeps its own)")
    allow_pickle: bool = Field(False, description="allow a .joblib/.pkl model (executes code from the file)",
                               json_schema_extra={"flag_only": True})


class CheckConfig(TubConfig):
    data: Optional[Path] = Field(None, description="rows to check: CSV, Parquet or NPZ")
    model: Optional[Path] = Field(None, description="run directory or model.json of `tub knnlrp train`")
    target: str = Field("target", description="label column to drop from the data if present")
    kappa: Optional[int] = Field(None, ge=0, description="kNN κ to report besides κ = 0")
    allow_pickle: bool = Field(False, description="allow a .joblib/.pkl model (executes code from the file)",
                               json_schema_extra={"flag_only": True})


class MakeDataConfig(TubConfig):
    name: str = Field("breast_cancer", description="breast_cancer, digits49, wine01, iris_binary, iris, wine or digits")
    test_size: float = Field(0.3, gt=0, lt=1, description="test fraction of the stratified split")
