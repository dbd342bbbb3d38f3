"""tub-xmil: the verbs and where they live."""

from tubcli import PluginApp, Verb, hookimpl


MODEL = {"model": "model", "task": "task", "target": "target"}

app = PluginApp(
    name="xmil",
    help="Whole-slide MIL (AttnMIL, TransMIL, MambaMIL, AdditiveMIL) with xMIL-LRP and other heatmaps: tile, embed, "
         "train, explain, evaluate (patch flipping), heatmap PNG + QuPath GeoJSON.",
    verbs=[
        Verb("make-data", "tub_xmil.cli:make_data", config="tub_xmil.config:MakeDataConfig",
             help="Write small synthetic pyramidal slides with a planted signal.",
             options={"out-dir": "out_dir", "n-slides": "n_slides", "aperio": "aperio"}),
        Verb("tile", "tub_xmil.cli:tile", config="tub_xmil.config:TileConfig",
             help="Tissue detection (Otsu on median-blurred HSV saturation, closed) and a patch grid at a target mpp.",
             args=["slides"], options={"mpp": "mpp", "target-mpp": "tiling.target_mpp",
                                       "patch-size": "tiling.patch_size"}, batch=True),
        Verb("features", "tub_xmil.cli:features", config="tub_xmil.config:FeaturesConfig",
             help="Embed tiles with a patch encoder offered by a plugin (tub_patch_encoders).",
             args=["slides"], options={"encoder": "encoder", "weights": "weights", "coords-dir": "coords_dir",
                                       "mpp": "mpp", "target-mpp": "tiling.target_mpp",
                                       "patch-size": "tiling.patch_size"}, batch=True),
        Verb("train", "tub_xmil.cli:train", config="tub_xmil.config:TrainConfig",
             help="Train AttnMIL/TransMIL/MambaMIL/AdditiveMIL for classification, regression or survival.",
             options={"features": "features", "labels": "labels", "task": "task", "arch": "model.arch",
                      "epochs": "epochs", "class-weight": "class_weight", "fold": "fold"}, training=True,
             resume_may_change=("epochs",)),
        Verb("cv-summary", "tub_xmil.cli:cv_summary", config="tub_xmil.config:CvSummaryConfig",
             help="The folds of train --fold k/K as one result: mean ± sd over folds and pooled out-of-fold metrics.",
             args=["runs"], options={"bootstrap": "bootstrap"}),
        Verb("explain", "tub_xmil.cli:explain", config="tub_xmil.config:ExplainConfig",
             help="Per-patch scores: lrp, ig, single, attention, grad2, gi, drop, random, patch_scores.",
             args=["bags"], options={**MODEL, "method": "method"}, batch=True),
        Verb("evaluate", "tub_xmil.cli:evaluate", config="tub_xmil.config:EvaluateConfig",
             help="Task metrics and label-free patch flipping (AUPC, SRG, random baseline).",
             options={**MODEL, "features": "features", "labels": "labels", "split": "split",
                      "method": "method", "strategy": "strategy", "score-order": "score_order",
                      "bootstrap": "bootstrap"}),
        Verb("heatmap", "tub_xmil.cli:heatmap", config="tub_xmil.config:HeatmapConfig",
             help="Slides or feature files -> explanation -> PNG overlay and QuPath GeoJSON.",
             args=["inputs"], options={**MODEL, "method": "method", "encoder": "encoder", "weights": "weights",
                                       "slide-dir": "slide_dir", "coords-dir": "coords_dir", "mpp": "mpp",
                                       "target-mpp": "tiling.target_mpp",
                                       "patch-size": "tiling.patch_size",
                                       "patch-size-level0": "patch_size_level0"}, batch=True,
             item_fields=("method",)),  # one set of files per method
    ],
    demo="tub_xmil.demo:run_demo",
    requires={"torch": "pip install torch==2.13.0 (CPU build; on a GPU the build for your CUDA)",
              "openslide": "pip install openslide-python openslide-bin", "h5py": "pip install h5py",
              "tifffile": "pip install tifffile", "sklearn": "pip install scikit-learn"},
    optional={"tub_atlas": "pip install 'tub-xmil[encoders]'  (patch encoders for features, slide heatmaps, demo)",
              "captum": "pip install captum  (only for the parity checks against the reference)"},
)


@hookimpl
def tub_register(registry):
    registry.add(app)
