"""Configs of the xmil verbs (pydantic; extra keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from tubcli.config import Section, TubConfig, given_fields, split_commas

from tub_xmil.splits import ACCEPTED, parse_fold, split_name

Arch = Literal["attnmil", "transmil", "mambamil", "additivemil"]
Task = Literal["classification", "regression", "survival"]
Method = Literal["lrp", "ig", "single", "attention", "grad2", "gi", "drop", "random", "patch_scores"]


class TilingSection(Section):
    target_mpp: float = Field(0.5, gt=0, description="microns per pixel of the tiles (0.5 = 20x)")
    patch_size: int = Field(256, gt=0, description="tile side in pixels at target_mpp")
    min_tissue: float = Field(0.5, ge=0, le=1, description="minimum tissue fraction of a kept tile")
    min_std: float = Field(8.0, ge=0, description="minimum grey-level std of a kept tile (thumbnail pixels)")


class LRPSection(Section):
    gamma: float = Field(0.0, ge=0, description="gamma rule: W + gamma W+")
    eps: float = Field(1e-8, ge=0, description="epsilon stabiliser")
    no_bias: Optional[bool] = Field(None, description="drop biases in the rules (default: True, TransMIL False)")
    explained_rel: Optional[Literal["logit", "softmax", "contrastive"]] = Field(
        None, description="output relevance for classification (default: logit)")


class ModelSection(Section):
    """Architecture settings (spec §2.1); a setting the chosen arch has no use for is an error
    (``training.model_kwargs``)."""

    arch: Arch = Field("attnmil", description="attnmil | transmil | mambamil | additivemil")
    features_dim: Optional[int] = Field(None, ge=1, description="hidden size: AttnMIL/AdditiveMIL/TransMIL n_feat "
                                                                "(256), MambaMIL d_model (512)")
    num_layers: Optional[int] = Field(None, ge=1, description="AttnMIL/AdditiveMIL encoder layers (1), MambaMIL "
                                                              "layers (1), TransMIL transformer layers (2, at least 2)")
    n_out_layers: int = Field(0, ge=0, description="MLP layers before the head (AttnMIL, AdditiveMIL, TransMIL)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout rate: AttnMIL/AdditiveMIL where dropout_strategy "
                                                        "says, TransMIL after its first layer, MambaMIL after the "
                                                        "projection")
    dropout_strategy: Literal["features", "all", "last"] = Field(
        "features", description="AttnMIL/AdditiveMIL: features (inputs), all (inputs, after the encoder, before "
                                "the head), last (before the head)")
    gated: bool = Field(False, description="gated attention (AttnMIL, AdditiveMIL)")
    attention: Literal["nystrom", "dot_prod"] = Field(
        "nystrom", description="TransMIL attention: Nyström approximation or exact softmax (dot_prod)")


class MakeDataConfig(TubConfig):
    out_dir: Optional[Path] = Field(None, description="folder for slides/, masks/, labels.csv (default: the run's outputs/)", json_schema_extra={"output": True})
    n_slides: int = Field(8, ge=2, description="number of slides (every second one carries the signal)")
    width: int = Field(3072, ge=256, description="level-0 width in px")
    height: int = Field(2048, ge=256, description="level-0 height in px")
    mpp: float = Field(0.5, gt=0, description="microns per pixel written into the slides")
    aperio: bool = Field(False, description="write Aperio .svs files instead of generic tiled TIFF")


class TileConfig(TubConfig):
    slides: list[Path] = Field(default_factory=list, description="slide files or folders")
    mpp: Optional[float] = Field(None, gt=0, description="level-0 µm/px, used instead of the slide's own (for slides "
                                 "that lack it or record it wrong)")
    tiling: TilingSection = TilingSection()


class FeaturesConfig(TubConfig):
    slides: list[Path] = Field(default_factory=list, description="slide files or folders")
    encoder: str = Field("vit-t8-demo", description="patch encoder name from the tub_patch_encoders hook")
    weights: Optional[Path] = Field(None, description="local weights file of the encoder")
    coords_dir: Optional[Path] = Field(None, description="existing patches/*.h5 (tub, CLAM, TRIDENT) to reuse", json_schema_extra={"lookup": True})
    mpp: Optional[float] = Field(None, gt=0, description="level-0 µm/px, used instead of the slide's own (for "
                                 "slides that lack it or record it wrong)")
    batch_size: int = Field(64, ge=1, description="tiles per encoder batch")
    tiling: TilingSection = TilingSection()


class TrainConfig(TubConfig):
    features: Optional[Path] = Field(None, description="folder of bags (.h5/.pt/.npz named by slide_id)")
    labels: Optional[Path] = Field(None, description="CSV: slide_id, label|target|time+event (event 0/1), "
                                   "optional split (train | val | test, aliases as for evaluate --split)")
    task: Task = Field("classification", description="classification | regression | survival")
    model: ModelSection = ModelSection()
    epochs: int = Field(20, ge=1, description="training epochs")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of train slides held out when there is no 'val' "
                                "split (stratified by class; a case_id/patient_id column keeps a patient's slides "
                                "together)")
    fold: Optional[str] = Field(None, description="k/K: hold out fold k (0-based) of a seeded K-fold partition of the "
                                "slides (stratified, patients together) as the test set; one job per fold")
    n_bins: int = Field(4, ge=1, description="survival: number of time bins (training quartiles)")
    class_weight: Literal["none", "balanced"] = Field(
        "none", description="classification: weight each slide's loss by n / (classes x n_class) of the training "
                            "slides (balanced, as scikit-learn's), so a rare class counts as much as a common one")

    @field_validator("fold")
    @classmethod
    def _fold(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        k, n = parse_fold(value)
        return f"{k}/{n}"


class CvSummaryConfig(TubConfig):
    runs: list[Path] = Field(default_factory=list, description="run folders of `train --fold k/K`, one per fold")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of the pooled slides for 95% intervals of "
                                                   "the pooled metrics (0: none)")


class ModelInput(TubConfig):
    model: Optional[Path] = Field(None, description="weights: a run's checkpoints/ folder, model.safetensors, or an xMIL .pt")
    task: Optional[Task] = Field(None, description="the model's task (default: from model.json; another is an error)")
    target: Optional[int] = Field(None, description="explained class index (default: the predicted class)")
    lrp: LRPSection = LRPSection()
    ig_steps: int = Field(50, ge=1, description="IG Gauss-Legendre steps")

    @field_validator("method", mode="before", check_fields=False)
    @classmethod
    def _method(cls, value):
        """--method lrp,ig as well as repeated --method; a method named twice runs once."""
        return split_commas(value)

    @model_validator(mode="after")
    def _settings_of_a_method_not_run(self):
        """lrp.* or ig_steps with no LRP or IG among the methods would be recorded but not used."""
        methods = getattr(self, "method", None) or []
        unused = [f"lrp.{k}" for k in given_fields(self.lrp)] if "lrp" not in methods else []
        unused += given_fields(self, ["ig_steps"]) if "ig" not in methods else []
        if unused:
            needs = sorted({"lrp" if k.startswith("lrp") else "ig" for k in unused})
            raise ValueError(f"{', '.join(unused)} set but method is {','.join(methods)}, which does not use them; "
                             f"add {' and '.join(needs)} to the methods (--method) or drop "
                             f"{'it' if len(unused) == 1 else 'them'}")
        return self


class ExplainConfig(ModelInput):
    bags: list[Path] = Field(default_factory=list, description="bag files or folders")
    method: list[Method] = Field(default_factory=lambda: ["lrp"], description="explanation method(s)")


class EvaluateConfig(ModelInput):
    features: Optional[Path] = Field(None, description="folder of bags")
    labels: Optional[Path] = Field(None, description="labels CSV (as for train)")
    split: Optional[str] = Field("test", description="evaluate only the CSV rows of this split, by default the "
                                 f"test rows; 'all' for every row. Names, any case: {ACCEPTED}")
    target: Optional[int] = Field(None, description="explained class index for every slide (default: each "
                                  "slide's label class)")
    method: list[Method] = Field(default_factory=lambda: ["lrp", "attention", "random"],
                                 description="methods scored by patch flipping")
    strategy: str = Field("1%-of-all", description="flipping blocks: 'P%-of-all' (1%: 101 points, spec §2.5 for "
                                                   "real slides; 10% for a quick look) or 'one-by-one'")
    flipping_ties: Literal["histogram", "rank"] = Field(
        "histogram", description="flipping blocks of tied scores: histogram (spec §2.5: ties share one block) or "
                                 "rank (equal blocks cut from the ranking)")
    score_order: Literal["original", "absolute"] = Field(
        "original", description="rank patches by their signed score or by its magnitude (spec §2.5; random "
                                "order: --method random)")
    flipping: bool = Field(True, description="run the label-free patch-flipping evaluation")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of the slides for 95% intervals of the task "
                                                   "metrics (0: none)")

    @field_validator("split")
    @classmethod
    def _split(cls, v: Optional[str]) -> Optional[str]:
        """The canonical name, so that --split valid finds the rows train reads as validation; 'all' stays
        'all' (a config file in TOML, which has no null, must be able to say it), as null (older runs) does."""
        if v is None or v.strip().lower() == "all":
            return "all"
        name = split_name(v) if v.strip() else None  # an empty cell means train, an empty --split nothing
        if name is None:
            raise ValueError(f"unknown split {v!r}; use 'all' or one of (any case) {ACCEPTED}")
        return name

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        """Checked here so that a typo is a usage error before the model runs."""
        p = v[: -len("%-of-all")] if v.endswith("%-of-all") else ""
        if v != "one-by-one" and not (p.isdigit() and 1 <= int(p) <= 100):
            raise ValueError(f"unknown strategy {v!r}; use 'P%-of-all' with P in 1..100 (e.g. 10%-of-all) "
                             "or 'one-by-one'")
        return v


class HeatmapTiling(TilingSection):
    """Tiling of slides for a heatmap: by default the model's training features' (model.json)."""

    target_mpp: Optional[float] = Field(None, gt=0, description="microns per pixel of the tiles (default: the "
                                        "training features', else 0.5)")
    patch_size: Optional[int] = Field(None, gt=0, description="tile side in pixels at target_mpp (default: the "
                                      "training features', else 256)")
    min_tissue: Optional[float] = Field(None, ge=0, le=1, description="minimum tissue fraction of a kept tile "
                                        "(default: the training features', else 0.5)")
    min_std: Optional[float] = Field(None, ge=0, description="minimum grey-level std of a kept tile (default: the "
                                     "training features', else 8)")


class HeatmapConfig(ModelInput):
    inputs: list[Path] = Field(default_factory=list, description="slides, feature .h5 files, or folders")
    method: list[Method] = Field(default_factory=lambda: ["lrp"], description="explanation method(s); files per method")
    encoder: Optional[str] = Field(None, description="patch encoder (hook) used when starting from slides (default: "
                                   "the training features', else vit-t8-demo)")
    weights: Optional[Path] = Field(None, description="encoder weights file")
    slide_dir: Optional[Path] = Field(None, description="where to find slides for feature-file inputs (thumbnail)", json_schema_extra={"lookup": True})
    coords_dir: Optional[Path] = Field(None, description="patches/*.h5 (tub xmil or atlas tile, CLAM, TRIDENT) whose "
                                       "tiles slide inputs are embedded at: those the model's bags were made from",
                                       json_schema_extra={"lookup": True})
    patch_size_level0: Optional[int] = Field(
        None, gt=0, description="tile side in level-0 px of feature-file inputs (default: from the file's "
        "attributes, else inferred from the coords grid)")
    mpp: Optional[float] = Field(None, gt=0, description="level-0 µm/px, used instead of the slide's own (for "
                                 "slides that lack it or record it wrong)")
    tiling: HeatmapTiling = HeatmapTiling()
