"""Parity with the authors' code (florianbley/lrp-for-distance-classifiers), spec §6.5.

The reference has no licence, so it is never vendored: check it out outside the project and point
KNNLRP_REFERENCE at it, e.g.

    git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/ref-knnlrp
    KNNLRP_REFERENCE=/tmp/ref-knnlrp pytest tests/knnlrp/test_knnlrp_parity.py

Recorded run (commit b34cc1d, breast_cancer standard split, 2-core CPU; `python benchmarks/knnlrp_parity.py`):
max |R_tub − R_ref| / max |R_ref| ≤ 5.1e-15 over kNN (k = 5) and SVC (C = 1, γ ∈ {0.003, 0.03, 0.3})
for the GI, midpoint and hybrid rules; max |g_tub − g_ref| ≤ 5.7e-14.
"""

import importlib
import os
import sys

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from tub_knnlrp.explanation import explain

REF = os.environ.get("KNNLRP_REFERENCE")


@pytest.fixture(scope="module")
def reference():
    if not REF or not os.path.isfile(os.path.join(REF, "neuralised_knn.py")):
        pytest.skip("set KNNLRP_REFERENCE to a checkout of florianbley/lrp-for-distance-classifiers")
    sys.path.insert(0, REF)
    try:
        yield importlib.import_module("neuralised_svm"), importlib.import_module("neuralised_knn")
    finally:
        sys.path.remove(REF)


RULES = [("GI", "gi", 0.0), ("midpoint", "midpoint", 1.0), ("hybrid", "hybrid", 0.8)]


@pytest.mark.parametrize("ref_rule, rule, eta", RULES)
def test_knn_parity(reference, cancer, ref_rule, rule, eta):
    _, ref_knn = reference
    Xtr, Xte, ytr, _ = cancer
    knn = KNeighborsClassifier(5).fit(Xtr, ytr)
    ref = ref_knn.NeuralisedKNN(knn)
    R_ref = ref.explain(Xte, rule=ref_rule, eta=eta)
    e = explain(knn, Xte, rule=rule, eta=eta)
    assert np.abs(e.values - R_ref).max() / np.abs(R_ref).max() <= 1e-10
    np.testing.assert_allclose(e.output, ref.forward(Xte), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.003, 0.03, 0.3])
@pytest.mark.parametrize("ref_rule, rule, eta", RULES)
def test_svm_parity(reference, cancer, gamma, ref_rule, rule, eta):
    ref_svm, _ = reference
    Xtr, Xte, ytr, _ = cancer
    svc = SVC(C=1.0, gamma=gamma).fit(Xtr, ytr)
    ref = ref_svm.NeuralisedSVM(svc)
    R_ref = ref.explain(Xte, rule=ref_rule, eta=eta, with_intercept=True)
    e = explain(svc, Xte, rule=rule, eta=eta)
    assert np.abs(e.values - R_ref).max() / np.abs(R_ref).max() <= 1e-10
    np.testing.assert_allclose(e.output, ref.forward(Xte, with_intercept=True), rtol=1e-10, atol=1e-10)
    assert ref_svm.compute_heuristic_eta_svm(gamma) == pytest.approx(
        __import__("tub_knnlrp.rules", fromlist=["eta_svm"]).eta_svm(gamma))
