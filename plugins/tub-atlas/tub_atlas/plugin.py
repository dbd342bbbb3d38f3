"""tub-atlas: the verbs and where they live (imports tubcli only)."""

from __future__ import annotations

from tubcli import PluginApp, Verb, hookimpl
from tubcli.hookspecs import EncoderSpec

ENC = {"arch": "encoder.arch", "weights": "encoder.weights", "pool": "encoder.pool", "heads": "encoder.heads",
       "norm": "encoder.norm", "img-size": "encoder.img_size", "random-init": "encoder.random_init",
       "gemm": "encoder.gemm"}
SLIDE = {f"slide-{k.replace('_', '-')}": f"slide_{k}" for k in (
    "tile_size", "mpp", "mag", "level", "base_mpp", "tissue_min", "overlap", "threshold", "median", "close", "min_area",
    "min_hole_area", "max_holes", "pen", "thumb_size")}

app = PluginApp(
    name="atlas",
    help="Offline, timm-free pathology ViT encoders (Atlas 2, UNI2-h, Virchow2, H-optimus, RudolfV-2): "
         "inspect, convert, embed, probe, explain, distil.",
    verbs=[
        Verb("inspect", "tub_atlas.cli:inspect", config="tub_atlas.config:InspectConfig",
             help="Infer a checkpoint's ViT architecture from its tensor shapes.", args=["weights"],
             options={"from": "source", "heads": "heads"}),
        Verb("convert", "tub_atlas.cli:convert", config="tub_atlas.config:ConvertConfig",
             help="Convert DINOv2, DINOv3 (RoPE) and wrapped checkpoints to timm layout (.safetensors + model.json); "
                  "an existing OUTPUT is replaced only with --overwrite.",
             args=["weights", "output"], overwrite=True,
             options={"from": "source", "heads": "heads", "preset": "preset", "norm": "norm", "pool": "pool"}),
        Verb("embed", "tub_atlas.cli:embed", config="tub_atlas.config:EmbedConfig",
             help="Embed tile folders, ImageFolder trees, NPZ/HDF5 tile arrays, whole slides (npy/pathorob/h5/eva).",
             args=["inputs"], batch=True,
             options={**ENC, "format": "format", "metadata": "metadata", "image-root": "image_root",
                      "batch-size": "batch_size", "slide-pool": "slide_pool", "slide-qc": "slide_qc",
                      "slide-coords": "slide_coords", **SLIDE}),
        Verb("tile", "tub_atlas.cli:tile", config="tub_atlas.config:TileConfig",
             help="Segment tissue and write tile coordinates of whole slides (CLAM/TRIDENT h5, QC PNG, GeoJSON).",
             args=["inputs"], batch=True, options=SLIDE),
        Verb("evaluate", "tub_atlas.cli:evaluate", config="tub_atlas.config:EvaluateConfig",
             help="Linear and kNN probes on frozen embeddings (balanced accuracy, repeated runs).",
             args=["features"],
             options={"metadata": "metadata", "labels": "labels", "method": "method", "k": "k", "vote": "vote",
                      "runs": "runs", "max-steps": "max_steps", "patience": "patience", "bootstrap": "bootstrap"}),
        Verb("explain", "tub_atlas.cli:explain", config="tub_atlas.config:ExplainConfig",
             help="Heatmaps of tiles or whole slides: attention rollout, conservative LRP or AttnLRP (dim, "
                  "probe class, similarity); PNG overlays.",
             args=["inputs"], batch=True,
             options={**ENC, "method": "method", "target": "target", "index": "index", "probe": "probe",
                      "reference": "reference", "head-fusion": "head_fusion", "max-tiles": "max_tiles",
                      "slide-coords": "slide_coords", **SLIDE}),
        Verb("train", "tub_atlas.cli:train", config="tub_atlas.config:TrainConfig",
             help="Distil a small student ViT from a frozen teacher, or pre-train it DINOv2-style "
                  "(--objective dinov2), on unlabelled tiles.", args=["tiles"],
             training=True, resume_may_change=("steps", "checkpoint_every", "log_every"),
             options={"objective": "objective", "local-crops": "dinov2.local_crops",
                      "local-crop-size": "dinov2.local_crop_size", "centering": "dinov2.centering",
                      "teacher-arch": "teacher.arch", "teacher-weights": "teacher.weights",
                      "teacher-random-init": "teacher.random_init", "student-arch": "student.arch",
                      "student-weights": "student.weights", "student-depth": "student.depth",
                      "steps": "steps", "batch-size": "batch_size", "crop-size": "crop_size", "lr": "lr"}),
        Verb("bench", "tub_atlas.cli:bench", config="tub_atlas.config:BenchConfig",
             help="Tiles/s of tub's ViT (and timm's on the same weights with --compare-timm).",
             options={"arch": "arch", "depth": "depth", "batch-size": "batch_size", "threads": "threads",
                      "repeats": "repeats", "img-size": "img_size", "compare-timm": "compare_timm",
                      "modes": "modes", "reference": "reference", "gemm": "gemm"}),
        Verb("make-data", "tub_atlas.cli:make_data", config="tub_atlas.config:MakeDataConfig",
             help="Synthetic labelled tiles (folder, NPZ, PathoROB layout) and random-weight test checkpoints.",
             args=["out"],
             options={"n-per-class": "n_per_class", "n-classes": "n_classes", "n-centers": "n_centers",
                      "size": "size", "checkpoint": "checkpoint", "depth": "depth"}),
    ],
    demo="tub_atlas.demo:run_demo",
    requires={"torch": "pip install torch==2.13.0 (CPU build; on a GPU the build for your CUDA)", "safetensors": "pip install safetensors", "h5py": "pip install h5py",
              "PIL": "pip install pillow", "matplotlib": "pip install matplotlib",
              "sklearn": "pip install scikit-learn"},
    optional={"timm": "a separate venv only (it brings torchvision and its own torch): README, Parity procedure",
              "openslide": "pip install 'tub-atlas[slides]'  (whole-slide images)"},
)

# Encoders other plugins can use by name (tub-xmil). Kept in step with presets.py by a test.
ENCODERS = {
    "uni2-h": (1536, 0.5, "UNI2-h ViT-g/14-reg8, CLS (weights: CC-BY-NC-ND-4.0, user-supplied)"),
    "virchow2": (2560, 0.5, "Virchow2 ViT-H/14-reg4, CLS+mean (weights: CC-BY-NC-ND-4.0, user-supplied)"),
    "h-optimus-0": (1536, 0.5, "H-optimus-0 ViT-g/14-reg4, CLS (weights: Apache-2.0, user-supplied)"),
    "h-optimus-1": (1536, 0.5, "H-optimus-1 ViT-g/14-reg4, CLS (weights user-supplied)"),
    "rudolfv-2": (3072, 0.5, "RudolfV-2 ViT-g/8-reg8, 2-D RoPE, CLS+mean (gated weights, user-supplied; "
                              "RoPE layout assumed DINOv3's)"),
    "rudolfv-2-b": (1536, 0.5, "RudolfV-2-B ViT-B/8-reg8, CLS+mean (as RudolfV-2)"),
    "rudolfv-2-s": (768, 0.5, "RudolfV-2-S ViT-S/8-reg8, CLS+mean (as RudolfV-2)"),
    "vit-s8-reg8": (768, 0.5, "ViT-S/8-reg8 student, CLS+mean (e.g. from 'tub atlas train')"),
    "vit-t8-demo": (384, 0.5, "tiny ViT/8 for demos/tests; RANDOM weights when no weights path is given"),
    "atlas": (None, 0.5, "any tub atlas checkpoint (tub atlas train, convert, Atlas 2): shapes, normalisation, "
                         "pooling and tile size from the model.json beside the weights"),
}
FROM_WEIGHTS = "atlas"  # the entry whose settings come with its weights, as `tub atlas embed --weights W` reads them
TILE_SIZE = {"vit-t8-demo": 64, FROM_WEIGHTS: None}  # None: from the weights' model.json


def loader_name(name: str) -> str:
    """The function in ``tub_atlas.encoders`` that loads encoder ``name``; that module defines one for
    every entry of ``ENCODERS`` from this same table, so an advertised encoder is always loadable."""
    return f"load_{name.replace('-', '_')}"


@hookimpl
def tub_register(registry):
    registry.add(app)


@hookimpl
def tub_patch_encoders():
    return {
        name: EncoderSpec(name=name, loader=f"tub_atlas.encoders:{loader_name(name)}", dim=dim,
                          tile_size=TILE_SIZE.get(name, 224), mpp=mpp, description=desc)
        for name, (dim, mpp, desc) in ENCODERS.items()
    }
