"""Configs of the atlas verbs (pydantic; imports no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from tubcli.config import Section, TubConfig

Pool = Literal["cls", "mean", "cls+mean"]
Norm = Literal["imagenet", "h-optimus", "rudolfv-2"]


class EncoderSection(Section):
    arch: str = Field("auto", description="preset name (uni2-h, virchow2, h-optimus-0, vit-s8-reg8, …) or auto")
    weights: Path | None = Field(None, description="local weights (.safetensors/.pt); never downloaded")
    heads: int | None = Field(None, description="attention heads for weights whose preset does not fix them "
                                                     "(overrides <weights>.json; contradicting the preset is an error)")
    pool: Pool | None = Field(None, description="cls | mean | cls+mean (registers excluded) [preset default]")
    norm: Norm | None = Field(None, description="normalisation constants [<weights>.json, else preset default]")
    img_size: int | None = Field(None, description="input side after resizing [preset default]")
    random_init: bool = Field(False, description="random weights for tests/demos when no --weights (NOT a pretrained model)")
    gemm: Literal["auto", "onednn", "aten"] = Field(
        "auto", description="inference GEMMs: auto (oneDNN for CPU fp32 inference), onednn, aten (bit-identical to timm)")


class InspectConfig(TubConfig):
    weights: Path | None = Field(None, description="checkpoint to inspect")
    source: Literal["auto", "dinov2", "dinov3", "timm"] = Field("auto", description="key layout of the checkpoint")
    heads: int | None = Field(None, description="attention heads (cannot be inferred from shapes)")


class ConvertConfig(TubConfig):
    weights: Path | None = Field(None, description="input checkpoint (DINOv2, DINOv3/RoPE, wrapped or timm layout)")
    output: Path | None = Field(None, description="output .safetensors (model.json is written beside it)", json_schema_extra={"output": True})
    source: Literal["auto", "dinov2", "dinov3", "timm"] = Field("auto", description="key layout of the input")
    heads: int | None = Field(None, description="attention heads (cannot be inferred from shapes)")
    preset: str | None = Field(None, description="preset whose shapes, normalisation and pooling to record")
    norm: Norm | None = Field(None, description="normalisation constants to record in model.json")
    pool: Pool | None = Field(None, description="default pooling to record in model.json")


PenColour = Literal["blue", "green", "black", "red"]


class SlideTiling(TubConfig):
    """Whole-slide tiling shared by ``embed`` and ``tile`` (slides.py, tissue.py)."""

    slide_tile_size: int = Field(224, ge=8, description="whole slides: tile side in pixels (after resizing)")
    slide_mpp: float | None = Field(None, gt=0, description="whole slides: tile resolution in µm/px (e.g. 0.5)")
    slide_mag: float | None = Field(None, gt=0, description="whole slides: target magnification (TRIDENT's --mag, "
                                                            "e.g. 20), instead of --slide-mpp")
    slide_level: int = Field(0, ge=0, description="whole slides without --slide-mpp/--slide-mag: pyramid level")
    slide_base_mpp: float | None = Field(None, gt=0, description="level-0 µm/px for slides that do not record it "
                                         "(or record it wrong); used for every slide, with a warning where it "
                                         "differs from a recorded one by > 5%")
    slide_tissue_min: float = Field(0.25, ge=0, le=1, description="whole slides: min tissue fraction per tile")
    slide_overlap: float = Field(0, ge=0, description="tile overlap: pixels at the tile resolution, or a fraction "
                                                        "of the tile if < 1")
    slide_threshold: int | None = Field(None, ge=0, le=255,
                                        description="saturation threshold 0..255 (CLAM sthresh); default Otsu")
    slide_median: int = Field(7, ge=1, description="median blur of the saturation, mask pixels (odd) (CLAM mthresh)")
    slide_close: int = Field(4, ge=0, description="morphological closing, mask pixels (CLAM close)")
    slide_min_area: float = Field(4000.0, ge=0, description="µm²: smaller tissue pieces are debris (CLAM a_t)")
    slide_min_hole_area: float = Field(10000.0, ge=0, description="µm²: smaller holes are filled (CLAM a_h)")
    slide_max_holes: int = Field(8, ge=0, description="largest holes kept per tissue piece (CLAM max_n_holes)")
    slide_pen: list[PenColour] = Field(default_factory=list,
                                       description="exclude pen ink of these colours (blue, green, black, red)")
    slide_thumb_size: int = Field(2048, ge=64, description="long side of the segmentation thumbnail, pixels")

    def slide_options(self) -> dict:
        """Keyword arguments of ``slides.read_slide``."""
        from .tissue import TissueParams

        return {"tile_px": self.slide_tile_size, "mpp": self.slide_mpp, "mag": self.slide_mag, "level": self.slide_level,
                "tissue_min": self.slide_tissue_min, "overlap": self.slide_overlap, "base_mpp": self.slide_base_mpp,
                "thumb_max": self.slide_thumb_size,
                "tissue": TissueParams(threshold=self.slide_threshold, median=self.slide_median,
                                       close=self.slide_close, min_area=self.slide_min_area,
                                       min_hole_area=self.slide_min_hole_area, max_holes=self.slide_max_holes,
                                       pen=tuple(self.slide_pen))}


class EmbedConfig(SlideTiling):
    inputs: list[Path] = Field(default_factory=list,
                               description="tile folders, ImageFolder trees, .npz/.h5 tile arrays (uint8, uint16 "
                                           "or float RGB in [0, 1]), whole slides")
    encoder: EncoderSection = EncoderSection()
    format: Literal["npy", "pathorob", "h5", "eva"] = Field("npy", description="output layout (spec §2.7)")
    metadata: Path | None = Field(None, description="PathoROB metadata CSV (format pathorob: tiles per medical_center)")
    image_root: Path | None = Field(None, description="image root for --metadata [default: the CSV's folder]", json_schema_extra={"lookup": True})
    batch_size: int = Field(32, ge=1, description="tiles per forward pass")
    slide_pool: Literal["mean", "max"] = Field("mean", description="slide embedding from its tiles")
    slide_qc: bool = Field(True, description="whole slides: write qc/<slide>.png (tissue + tiles) and contours")
    slide_coords: Path | None = Field(None, description="whole slides: patch .h5 file(s) to tile at instead of "
                                                        "segmenting ('tub atlas tile' run, TRIDENT or CLAM)")


class TileConfig(SlideTiling):
    inputs: list[Path] = Field(default_factory=list, description="whole slides (.svs, .ndpi, .mrxs, pyramidal .tif, …)")


class EvaluateConfig(TubConfig):
    RESULT_FIELDS: ClassVar[frozenset] = frozenset({"batch_size"})  # the probe's, not a forward pass's

    features: list[Path] = Field(default_factory=list, description="embed outputs (an embed run directory, npy/eva folders, h5 files, "
                                                                  "pathorob folder, .npz)")
    metadata: Path | None = Field(None, description="PathoROB metadata CSV for pathorob feature folders (and npy folders)")
    labels: Path | None = Field(None, description="CSV slide_id[,patch_id],label[,split]: labels (and splits) for any "
                                                  "input, matched by slide_id (and patch_id)")
    bootstrap: int = Field(0, ge=0, description="slide-level bootstrap resamples for 95% intervals of the test "
                                                "scores (0: none)")
    method: Literal["linear", "knn", "both"] = Field("both", description="probe kind")
    k: int = Field(20, ge=1, description="kNN neighbours")
    vote: Literal["uniform", "weighted"] = Field("uniform", description="kNN vote (weighted: exp(s/T))")
    temperature: float = Field(0.07, gt=0, description="kNN weighted-vote temperature")
    runs: int = Field(5, ge=1, description="linear-probe repeats (seeds derived from --seed)")
    lr: float = Field(3e-4, gt=0, description="linear-probe AdamW learning rate")
    batch_size: int = Field(256, ge=1, description="linear-probe batch size")
    max_steps: int = Field(12_500, ge=1, description="linear-probe step limit")
    patience: int = Field(1_250, ge=1, description="early-stopping patience in steps")
    eval_every: int = Field(50, ge=1, description="validation interval in steps")


class ExplainConfig(SlideTiling):
    inputs: list[Path] = Field(default_factory=list, description="tiles to explain (folders, images, .npz/.h5 "
                                                                 "tile arrays, whole slides)")
    encoder: EncoderSection = EncoderSection()
    method: Literal["rollout", "lrp", "attnlrp"] = Field(
        "lrp", description="attention rollout, conservative LRP (CP-LRP) or AttnLRP (relevance through the softmax)")
    target: Literal["dim", "probe", "similarity"] = Field("dim", description="what the map explains (LRP)")
    index: int = Field(0, ge=0, description="embedding dimension or probe class index")
    probe: Path | None = Field(None, description="probe.safetensors from 'tub atlas evaluate' (target probe)")
    reference: Path | None = Field(None, description="reference tile image (target similarity)")
    head_fusion: Literal["mean", "max", "min"] = Field("mean", description="rollout head fusion")
    max_tiles: int = Field(64, ge=1, description="explain at most this many tiles per input")
    alpha: float = Field(0.5, ge=0, le=1, description="overlay opacity")
    slide_coords: Path | None = Field(None, description="whole slides: patch .h5 file(s) to tile at instead of "
                                                        "segmenting ('tub atlas tile' run, TRIDENT or CLAM)")


class TeacherSection(EncoderSection):
    random_init: bool = Field(False, description="random teacher weights for tests/demos when no --teacher-weights "
                                                 "(NOT a pretrained model)")


class StudentSection(Section):
    arch: str = Field("vit-s8-reg8", description="student preset")
    weights: Path | None = Field(None, description="initial student weights [default: from scratch]")
    depth: int | None = Field(None, ge=1, description="override the preset depth")


class DINOv2Section(Section):
    """``--objective dinov2`` (ssl.py). Defaults: DINOv2 (Oquab et al., arXiv 2304.07193) and its public
    ``dinov2/configs/ssl_default_config.yaml`` ("cfg" below); epochs of that config are turned into
    fractions of ``steps`` (its 100 epochs: 10 warm-up, 30 teacher-temperature warm-up)."""

    local_crops: int = Field(8, ge=0, description="local crops per tile (cfg crops.local_crops_number 8)")
    local_crop_size: int = Field(96, ge=8, description="local crop side (cfg 96; 98 for patch 14)")
    global_scale: tuple[float, float] = Field((0.32, 1.0), description="global crop area range (cfg 0.32-1.0)")
    local_scale: tuple[float, float] = Field((0.05, 0.32), description="local crop area range (cfg 0.05-0.32)")
    rotate: bool = Field(True, description="vertical flips and 90° rotations (pathology; not in cfg)")
    brightness: float = Field(0.4, ge=0, description="colour jitter (cfg ColorJitter 0.4, 0.4, 0.2, 0.1)")
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    jitter_p: float = Field(0.8, ge=0, le=1, description="probability of colour jitter (cfg 0.8)")
    grey_p: float = Field(0.2, ge=0, le=1, description="probability of greyscale (cfg 0.2)")
    n_prototypes: int = Field(65536, ge=2, description="DINO head prototypes K (cfg dino.head_n_prototypes)")
    head_hidden_dim: int = Field(2048, ge=1, description="head MLP width (cfg 2048)")
    head_bottleneck_dim: int = Field(256, ge=1, description="head bottleneck (cfg 256)")
    head_layers: int = Field(3, ge=2, description="head MLP layers (cfg 3)")
    separate_ibot_head: bool = Field(False, description="own iBOT head (cfg default false; ViT-L/g configs true)")
    ibot_prototypes: int = Field(65536, ge=2, description="iBOT head prototypes when separate (cfg 65536)")
    dino_weight: float = Field(1.0, ge=0, description="DINO loss weight (cfg 1.0)")
    ibot_weight: float = Field(1.0, ge=0, description="iBOT loss weight (cfg 1.0); 0 switches masking off")
    koleo_weight: float = Field(0.1, ge=0, description="KoLeo weight (cfg dino.koleo_loss_weight 0.1)")
    mask_probability: float = Field(0.5, ge=0, le=1, description="share of global crops masked (cfg 0.5)")
    mask_ratio: tuple[float, float] = Field((0.1, 0.5), description="masked patch ratio range (cfg 0.1-0.5)")
    mask_mode: Literal["block", "random"] = Field("block", description="BEiT block masking (cfg) or random")
    centering: Literal["sinkhorn_knopp", "centering"] = Field(
        "sinkhorn_knopp", description="teacher centring: sinkhorn_knopp, 3 iterations (paper §4; the DINOv2 ViT-L/g "
                                      "configs), or centering, DINO's EMA centre (the DINOv2 base config's choice)")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA of the classic centre (DINO 0.9)")
    student_temp: float = Field(0.1, gt=0, description="τ_s (cfg 0.1)")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="τ_t at the start (cfg 0.04)")
    teacher_temp: float = Field(0.07, gt=0, description="τ_t after warm-up (cfg 0.07)")
    teacher_temp_warmup: float = Field(0.3, ge=0, le=1, description="τ_t warm-up fraction (cfg 30 of 100 epochs)")
    momentum: float = Field(0.992, gt=0, le=1, description="EMA momentum at step 0, cosine to 1 (cfg 0.992)")
    base_lr: float = Field(0.004, gt=0, description="lr for batch 1024, scaled by sqrt(batch/1024) (cfg)")
    min_lr: float = Field(1e-6, ge=0, description="final lr (cfg 1e-6)")
    warmup: float = Field(0.1, ge=0, lt=1, description="lr warm-up fraction (cfg 10 of 100 epochs)")
    weight_decay: float = Field(0.04, ge=0, description="weight decay at the start (cfg 0.04)")
    weight_decay_end: float = Field(0.4, ge=0, description="weight decay at the end, cosine (cfg 0.4)")
    layer_decay: float = Field(0.9, gt=0, le=1, description="layer-wise lr decay (cfg 0.9; ViT-g 1.0)")
    patch_embed_lr_mult: float = Field(0.2, gt=0, description="patch-embedding lr factor (cfg 0.2)")
    freeze_last_layer: float = Field(0.01, ge=0, lt=1, description="prototype layer lr 0 for this fraction of the "
                                                                  "steps (cfg 1 of 100 epochs)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth (DINO ViT-S 0.1; cfg ViT-L 0.3)")


class TrainConfig(TubConfig):
    tiles: list[Path] = Field(default_factory=list, description="unlabelled tiles (folders, .npz/.h5)")
    objective: Literal["distill", "dinov2"] = Field(
        "distill", description="distill from a frozen teacher, or DINOv2 self-supervision (EMA teacher)")
    dinov2: DINOv2Section = DINOv2Section()
    teacher: TeacherSection = TeacherSection()
    student: StudentSection = StudentSection()
    crop_size: int = Field(224, ge=8, description="random-resized-crop side fed to both networks "
                                                  "(dinov2: global crop side, cfg 224)")
    crop_scale_min: float = Field(0.4, gt=0, le=1, description="smallest crop area fraction")
    steps: int = Field(1000, ge=1, description="optimisation steps")
    batch_size: int = Field(64, ge=1, description="tiles per step (per process)")
    lr: float = Field(5e-4, gt=0, description="base learning rate (scaled by batch/256)")
    weight_decay: float = Field(0.05, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="warm-up fraction of the steps")
    clip: float = Field(3.0, gt=0, description="gradient-norm clip (both objectives; DINOv2 cfg 3.0)")
    lambda_cls: float = Field(1.0, ge=0)
    lambda_patch: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    log_every: int = Field(10, ge=1)
    probe_k: int = Field(20, ge=1, description="kNN k of the final teacher-vs-student probe (labelled tiles)")


class BenchConfig(TubConfig):
    # bench also times reduced-precision *weights* (benchmark.PRECISIONS), beyond the shared autocast dtypes
    precision: Literal["fp32", "fp64", "bf16", "fp16", "bf16-weights", "fp16-weights"] = Field(
        "fp32", description="bf16/fp16: autocast over fp32 weights; bf16-weights/fp16-weights: weights and "
                            "input cast to that dtype; fp64: both cast")
    arch: str = Field("vit-s8-reg8", description="preset to time (random weights)")
    depth: int | None = Field(None, ge=1, description="override the preset depth")
    batch_size: int = Field(8, ge=1, description="tiles per forward pass")
    img_size: int = Field(224, ge=8, description="tile side in pixels")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    repeats: int = Field(5, ge=1, description="timed rounds (medians reported)")
    compare_timm: bool = Field(False, description="also time timm on the same weights (needs timm)")
    modes: str = Field("tokens", description="tokens (forward_features), cls (CLS embedding) or tokens,cls")
    gemm: Literal["auto", "onednn", "aten"] = Field("auto", description="tub's inference GEMMs")
    reference: bool = Field(False, description="also time tub's reference blocks (no inference path)")


class MakeDataConfig(TubConfig):
    out: Path | None = Field(None, description="folder to create (must not exist or be empty)",
                             json_schema_extra={"output": True})
    n_per_class: int = Field(32, ge=1, description="tiles per class and centre")
    n_classes: int = Field(2, ge=2, description="tissue classes (the labels)")
    n_centers: int = Field(2, ge=1, description="medical centres (stain styles, the confounder)")
    size: int = Field(64, ge=8, description="tile side in pixels")
    checkpoint: str | None = Field(None, description="also write a random-weight checkpoint of this preset")
    depth: int | None = Field(None, ge=1, description="depth of that checkpoint")
