"""The package-level API the README advertises: ``from tub_knnlrp import explain, NeuralizedExplainer``.

The functions are loaded lazily (``plugin.py`` must not import numpy), so the names have to resolve
to the *functions* both in a fresh interpreter and after the implementation module was imported
(a submodule called ``explain`` used to shadow the function, and the lazy loader recursed forever).
"""

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import tub_knnlrp
import tubcli


def test_package_level_explain_in_a_fresh_interpreter():
    env = dict(os.environ)
    paths = [str(Path(tub_knnlrp.__file__).parents[1]), str(Path(tubcli.__file__).parents[1])]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    code = (
        "import sys, inspect\n"
        "from tub_knnlrp import explain, NeuralizedExplainer, Explanation\n"
        "assert inspect.isfunction(explain), type(explain)\n"
        "assert inspect.isclass(NeuralizedExplainer) and inspect.isclass(Explanation)\n"
        "assert 'numpy' in sys.modules  # loaded on first use\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_package_level_explain_after_the_implementation_was_imported():
    from sklearn.datasets import make_classification
    from sklearn.neighbors import KNeighborsClassifier

    importlib.import_module("tub_knnlrp.explanation")  # the implementation module, imported first
    from tub_knnlrp import Explanation, NeuralizedExplainer, explain

    assert inspect.isfunction(explain)
    X, y = make_classification(60, 5, random_state=0)
    e = explain(KNeighborsClassifier(5).fit(X, y), X[:7], rule="midpoint")
    assert isinstance(e, Explanation) and e.values.shape == (7, 5)
    np.testing.assert_allclose(e.values.sum(axis=1), e.output, rtol=1e-12, atol=1e-12)
    assert isinstance(NeuralizedExplainer(), NeuralizedExplainer)
