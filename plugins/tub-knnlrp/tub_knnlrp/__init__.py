"""tub-knnlrp: explain scikit-learn kNN and RBF-SVM classifiers by LRP through their hidden network.

Heavy imports happen lazily: ``from tub_knnlrp import explain`` loads numpy/scikit-learn on first use.
"""

__version__ = "0.1.0"

__all__ = ["explain", "NeuralizedExplainer", "Explanation", "__version__"]


def __getattr__(name):
    if name in ("explain", "NeuralizedExplainer", "Explanation"):
        from tub_knnlrp import explain as _explain_module

        return getattr(_explain_module, name)
    raise AttributeError(name)
