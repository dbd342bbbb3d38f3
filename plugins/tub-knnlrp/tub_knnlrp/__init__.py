"""tub-knnlrp: explain scikit-learn kNN and RBF-SVM classifiers by LRP through their hidden network.

Heavy imports happen lazily: ``from tub_knnlrp import explain`` loads numpy/scikit-learn on first use
(the implementation lives in :mod:`tub_knnlrp.explanation`; no submodule shares a name with the API).
"""

__version__ = "0.2.0"

__all__ = ["explain", "NeuralizedExplainer", "Explanation", "load_model", "UnsupportedModelError",
           "MixingTransformWarning", "__version__"]


def __getattr__(name):
    if name in ("explain", "NeuralizedExplainer", "Explanation"):
        import importlib

        return getattr(importlib.import_module("tub_knnlrp.explanation"), name)
    if name == "load_model":  # a model `tub knnlrp train` stored (run directory or model.json), without pickle
        from tub_knnlrp.models import load_model

        return load_model
    if name in ("UnsupportedModelError", "MixingTransformWarning"):  # to catch / filter them
        import importlib

        return getattr(importlib.import_module("tub_knnlrp.neuralize"), name)
    raise AttributeError(f"module 'tub_knnlrp' has no attribute {name!r}")


def __dir__():  # help(), dir() and tab completion show the lazy names too
    return sorted({*globals(), *__all__})
