"""tub-pathorob: the table of contents (imports tubcli only)."""

from tubcli import PluginApp, Verb, hookimpl


_F = {"metadata": "metadata", "dataset": "dataset", "model-name": "model_name", "layout": "layout",
      "threads": "threads"}
_RI = {"k": "k", "k-search": "k_search", "max-k": "max_k", "paired": "paired",
       "max-patches-per-combi": "max_patches_per_combi", "bootstrap": "bootstrap",
       "bootstrap-unit": "bootstrap_unit", "auc": "auc"}

app = PluginApp(
    name="pathorob",
    help="PathoROB robustness of pathology foundation-model features to medical centers (RI, APD, clustering score).",
    verbs=[
        Verb("evaluate", "tub_pathorob.cli:evaluate", config="tub_pathorob.config:EvaluateConfig",
             help="Robustness index, APD and clustering score (--metrics ri,apd,cs) with the reference's result keys.",
             args=["features"], options={**_F, **_RI, "metrics": "metrics", "iterations": "iterations",
                                         "tolkach-splits": "tolkach_splits", "ri-metadata": "ri_metadata",
                                         "cs-metadata": "cs_metadata", "K": "K", "min-k": "min_k",
                                         "max-k-clusters": "max_k_clusters", "trials": "trials"}),
        Verb("ri", "tub_pathorob.cli:ri", config="tub_pathorob.config:RIConfig",
             help="Robustness index (same-slide exclusion, default k per dataset, k search, paired 2x2, bootstrap).",
             args=["features"], options={**_F, **_RI}),
        Verb("apd", "tub_pathorob.cli:apd", config="tub_pathorob.config:APDConfig",
             help="Average performance drop of linear probes under growing class-center correlation.",
             args=["features"], options={**_F, "iterations": "iterations", "tolkach-splits": "tolkach_splits"}),
        Verb("apd-from-raw", "tub_pathorob.cli:apd_from_raw", config="tub_pathorob.config:APDRawConfig",
             help="APD summaries (and the Masson-Loftus aggregate with 95% CI) from {dataset}_raw.json files.",
             args=["raw"], options={"aggregate": "aggregate"}),
        Verb("clustering", "tub_pathorob.cli:clustering", config="tub_pathorob.config:ClusteringConfig",
             help="Clustering score ARI(class) - ARI(center) of k-means over all 2x2 class/center experiments.",
             args=["features"], options={**_F, "K": "K", "min-k": "min_k", "max-k": "max_k", "trials": "trials"}),
        Verb("train", "tub_pathorob.cli:train", config="tub_pathorob.config:TrainConfig",
             help="Fit a robustification (ComBat or center-mean alignment) on features and save it.",
             args=["features"], options={**_F, "method": "method", "covariates": "covariates", "k": "k",
                                         "include-ood": "include_ood"}),
        Verb("robustify", "tub_pathorob.cli:robustify", config="tub_pathorob.config:RobustifyConfig",
             help="Apply a fitted robustification (--model RUN_DIR of train) to features (output in the input layout).",
             args=["features"], options={**_F, "model": "model"}),
        Verb("stainnorm", "tub_pathorob.cli:stainnorm", config="tub_pathorob.config:StainConfig",
             help="Stain-normalise tile images (Macenko, Reinhard) before embedding.",
             args=["tiles"], options={"method": "method", "target": "target"}, batch=True),
        Verb("explain", "tub_pathorob.cli:explain", config="tub_pathorob.config:ExplainConfig",
             help="Where non-robustness comes from: per class/center composition, center pairs, slides, plots.",
             args=["features"], options={**_F, "k": "k", "paired": "paired", "top": "top", "plots": "plots",
                                         "max-k-curve": "max_k_curve"}),
        Verb("make-data", "tub_pathorob.cli:make_data", config="tub_pathorob.config:MakeDataConfig",
             help="Synthetic features (tunable class/center signal, official layout) or synthetic H&E tiles.",
             args=["kind"], options={"preset": "preset", "classes": "classes", "centers": "centers",
                                     "slides-per-cell": "slides_per_cell", "tiles-per-slide": "tiles_per_slide",
                                     "dim": "dim", "bio": "bio", "center": "center", "slide": "slide",
                                     "noise": "noise", "center-scale": "center_scale", "paired": "paired",
                                     "tile-size": "tile_size", "tiles-per-cell": "tiles_per_cell"}),
    ],
    demo="tub_pathorob.demo:run_demo",
    requires={"numpy": "pip install numpy", "sklearn": "pip install scikit-learn", "scipy": "pip install scipy",
              "safetensors": "pip install safetensors", "matplotlib": "pip install matplotlib",
              "PIL": "pip install pillow", "threadpoolctl": "pip install threadpoolctl", "h5py": "pip install h5py"},
    optional={"neuroCombat": "pip install neurocombat pandas  (ComBat parity check)"},
)


@hookimpl
def tub_register(registry):
    registry.add(app)
