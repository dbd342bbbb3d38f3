"""tub-knnlrp: the verbs and where they live (imports tubcli only)."""

from tubcli import PluginApp, Verb, hookimpl

_EXPLAIN_OPTIONS = {
    "model": "model",
    "target": "target",
    "rule": "explain.rule",
    "eta": "explain.eta",
    "kappa": "explain.kappa",
    "beta": "explain.beta",
    "multiclass": "explain.multiclass",
    "beta-mc": "explain.beta_mc",
    "allow-pickle": "allow_pickle",
    "train-data": "train_data",
}

app = PluginApp(
    name="knnlrp",
    help="Explain scikit-learn kNN and RBF-SVM classifiers by LRP through their hidden neural network.",
    verbs=[
        Verb("train", "tub_knnlrp.cli:train", config="tub_knnlrp.config:TrainConfig",
             help="Fit a kNN or RBF-SVM (5-fold grid search) on CSV/Parquet/NPZ data; store it without pickle.",
             args=["data"],
             options={"target": "target", "model": "kind", "scaler": "scaler", "k": "k", "gamma": "gamma", "C": "C"}),
        Verb("explain", "tub_knnlrp.cli:explain", config="tub_knnlrp.config:ExplainConfig",
             help="Relevance of every input feature (relevances.csv/.npz; heatmaps for pixel data).",
             args=["data"], options={**_EXPLAIN_OPTIONS, "heatmaps": "heatmaps"}),
        Verb("evaluate", "tub_knnlrp.cli:evaluate", config="tub_knnlrp.config:EvaluateConfig",
             help="Feature flipping (mean or KDE in-painting) and AUPC against the baselines, plus the fidelity report.",
             args=["data"],
             options={**_EXPLAIN_OPTIONS, "rows": "rows", "replacement": "replacement", "score": "score",
                      "methods": "methods"}),
        Verb("check", "tub_knnlrp.cli:check", config="tub_knnlrp.config:CheckConfig",
             help="Sign agreement with the model and conservation / SVM-identity residuals.",
             args=["data"], options={"model": "model", "target": "target", "kappa": "kappa",
                                     "allow-pickle": "allow_pickle"}),
        Verb("make-data", "tub_knnlrp.cli:make_data", config="tub_knnlrp.config:MakeDataConfig",
             help="Write one of scikit-learn's bundled data sets as train.csv/test.csv (standard split).",
             args=["name"]),
    ],
    demo="tub_knnlrp.demo:run_demo",
    requires={"sklearn": "pip install scikit-learn", "scipy": "pip install scipy"},
    optional={"shap": "pip install shap  (KernelSHAP baseline, to_shap())",
              "matplotlib": "pip install matplotlib  (heatmaps, flipping plots)"},
)


@hookimpl
def tub_register(registry):
    registry.add(app)
