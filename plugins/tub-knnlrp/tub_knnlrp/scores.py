"""The model outputs that explanations are evaluated against (spec §2.6, 'score').

All scores are *signed for the class being explained* (the predicted class c), so larger means
more evidence for the prediction:

* kNN (soft): p_c − max_{c'≠c} p_{c'} from ``predict_proba``; for a binary model this is
  s·(p₊ − p₋) with s = ±1 the predicted sign;
* SVM (soft): min_{c'≠c} f_{c,c'}(x), the one-vs-one decision values with c on the positive side;
  for a binary model s·f;
* hard (the authors' protocol): +1 while the prediction stays c, −1 once it changes (labels are
  mapped to ±1, so {0, 1} labels do not give a zero curve).

Scores work in model space (after the pipeline's preprocessing), where the flipping baseline
(the training mean) lives.
"""

from __future__ import annotations

import numpy as np

from tub_knnlrp.neuralize import NeuralizedClassifier


class ClassScore:
    """F(Z, c) for rows Z (model space) and the explained class index c per row."""

    def __init__(self, estimator, network: NeuralizedClassifier, kind: str = "soft"):
        if kind not in ("soft", "hard"):
            raise ValueError(f"score must be 'soft' or 'hard', got {kind!r}")
        self.estimator = estimator
        self.network = network
        self.kind = kind
        self._pairs = {}

    def predict_index(self, Z) -> np.ndarray:
        pred = np.asarray(self.estimator.predict(Z))
        return np.searchsorted(self.network.classes_, pred)  # classes_ is sorted (np.unique)

    def _svm_pair(self, c, o):
        if (c, o) not in self._pairs:
            self._pairs[(c, o)] = self.network.network(c, o, with_intercept=False)
        return self._pairs[(c, o)]

    def soft(self, Z, c) -> np.ndarray:
        Z = np.asarray(Z, dtype=np.float64)
        c = np.broadcast_to(np.asarray(c), (len(Z),))
        out = np.empty(len(Z))
        if self.network.kind == "knn":
            P = self.estimator.predict_proba(Z)
            rows = np.arange(len(Z))
            own = P[rows, c]
            P = P.copy()
            P[rows, c] = -np.inf
            return own - P.max(axis=1)
        for cls in np.unique(c):
            rows = np.flatnonzero(c == cls)
            vals = [self._svm_pair(cls, o).decision_function(Z[rows])
                    for o in range(self.network.n_classes) if o != cls]
            out[rows] = np.min(vals, axis=0)
        return out

    def __call__(self, Z, c) -> np.ndarray:
        if self.kind == "soft":
            return self.soft(Z, c)
        return np.where(self.predict_index(Z) == np.asarray(c), 1.0, -1.0)
