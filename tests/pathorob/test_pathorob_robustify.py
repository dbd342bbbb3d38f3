"""Robustification: ComBat equals neuroCombat, center-mean alignment, persistence, and the effect on
the robustness index and on biological kNN accuracy."""

import numpy as np
import pytest

from tub_pathorob.robustify import CenterMeanAlignment, ComBat, load_robustification
from tub_pathorob.robustness_index import robustness_index
from tub_pathorob.synthetic import synthetic_features
from tubcli.errors import TubError

# neuroCombat 0.2.12 on the same float64 data (X.T, covars DataFrame, batch_col="batch",
# categorical_cols=["cls"] or None); produced by /tmp/rec_combat.py in a venv with neurocombat + pandas.
NEUROCOMBAT = {
    False: {0: [-2.3620356241721012, -1.1695849552848978, 0.5554663075764651, -0.059801445162177336,
                -1.6551859206054695, 1.0063765262008495],
            37: [-1.2994581840364043, 1.9954102409768226, 0.5368182459237814, -2.299443417690539,
                 1.2292139011461987, -1.5984127310410354],
            179: [-0.5564600109950063, 0.12372587300944769, -0.2673505930054431, -0.42183479944238694,
                  -1.3904544940959023, -0.08110708827433133],
            "sum": -214.23696073868433, "sumsq": 2515.548313463028},
    True: {0: [-2.3812106275325737, -1.1798089498123039, 0.5148477568786931, -0.0350903972102693,
               -1.6700863961397145, 1.0312038136609791],
           37: [-1.370668198270109, 1.983857394346677, 0.5664328957552056, -2.288357033850544,
                1.2292019316221292, -1.6153855324829385],
           179: [-0.7562417021901968, 0.3212689214964959, 0.1658694143155781, -0.669283668906927,
                 -1.4724537588181672, -0.03916259352743573],
           "sum": -213.66995073567983, "sumsq": 2489.515682760163},
}


def combat_data():
    return synthetic_features(classes=("a", "b", "c"), centers=("m0", "m1", "m2"), slides_per_cell=2,
                              tiles_per_slide=10, dim=6, center_scale=0.5, seed=11)


@pytest.mark.parametrize("with_class", [False, True])
def test_combat_equals_neurocombat_recorded(with_class):
    X, meta = combat_data()
    cov = {"cls": meta.biological_class} if with_class else None
    Y = ComBat().fit_transform(X, meta.medical_center, cov)
    ref = NEUROCOMBAT[with_class]
    for i in (0, 37, 179):
        assert np.max(np.abs(Y[i] - ref[i])) <= 1e-6
    assert Y.sum() == pytest.approx(ref["sum"], abs=1e-6)
    assert (Y ** 2).sum() == pytest.approx(ref["sumsq"], abs=1e-6)


def test_combat_equals_neurocombat_live():
    pd = pytest.importorskip("pandas")
    nc = pytest.importorskip("neuroCombat")
    X, meta = combat_data()
    covars = pd.DataFrame({"batch": meta.medical_center.astype(str), "cls": meta.biological_class.astype(str)})
    ref = nc.neuroCombat(dat=X.T.copy(), covars=covars, batch_col="batch", categorical_cols=["cls"])["data"].T
    Y = ComBat().fit_transform(X, meta.medical_center, {"cls": meta.biological_class})
    assert np.abs(Y - ref).max() <= 1e-6


def test_combat_removes_center_location_and_scale():
    X, meta = synthetic_features(centers=("a", "b", "c"), slides_per_cell=6, tiles_per_slide=30, bio=0.0,
                                 center=2.0, slide=0.0, center_scale=0.7, seed=3)
    Y = ComBat().fit_transform(X, meta.medical_center)
    means = np.stack([Y[meta.medical_center == c].mean(0) for c in ("a", "b", "c")])
    sds = np.stack([Y[meta.medical_center == c].std(0) for c in ("a", "b", "c")])
    assert np.abs(means - means.mean(0)).max() < 0.1  # before: centers differ by ~2 per dimension
    assert (sds.max(0) / sds.min(0)).max() < 1.2  # before: scales differ by exp(0.7 sd)


def test_center_mean_alignment_is_exact():
    X, meta = synthetic_features(centers=("a", "b"), slides_per_cell=3, tiles_per_slide=20, seed=4)
    Y = CenterMeanAlignment().fit_transform(X, meta.medical_center)
    for c in ("a", "b"):
        assert np.allclose(Y[meta.medical_center == c].mean(0), X.mean(0))
    assert np.allclose(Y.mean(0), X.mean(0))


@pytest.mark.parametrize("cls", [ComBat, CenterMeanAlignment])
def test_save_load_reapply(tmp_path, cls):
    X, meta = synthetic_features(centers=("a", "b", "c"), slides_per_cell=3, tiles_per_slide=20, seed=5)
    model = cls().fit(X, meta.medical_center)
    st, js = model.save(tmp_path / "rob")
    assert st.suffix == ".safetensors" and js.suffix == ".json"
    again = load_robustification(tmp_path / "rob.safetensors")
    new = X[::7] + 0.01
    assert np.array_equal(again.transform(new, meta.medical_center[::7]), model.transform(new, meta.medical_center[::7]))
    with pytest.raises(TubError, match="not seen"):
        again.transform(X[:2], np.array(["zz", "a"]))


def test_robustification_raises_ri_and_keeps_knn_accuracy():
    """Spec §5: confounded data (a = b = 0.5): center-mean restores the b = 0 RI within 0.01; ComBat also
    raises RI; kNN balanced accuracy of the class falls by at most 0.02 (the stated margin)."""
    kw = dict(classes=("t", "n", "s"), centers=("A", "B", "C"), slides_per_cell=6, tiles_per_slide=30, slide=0.3)
    X, meta = synthetic_features(bio=0.5, center=0.5, center_scale=0.3, seed=6, **kw)
    before = robustness_index(X, meta, k=11, auc=False).summary
    after_cb = robustness_index(ComBat().fit_transform(X, meta.medical_center), meta, k=11, auc=False).summary
    after_cm = robustness_index(CenterMeanAlignment().fit_transform(X, meta.medical_center), meta, k=11, auc=False).summary
    assert after_cb["robustness_index"] > before["robustness_index"] + 0.2
    assert after_cm["robustness_index"] > before["robustness_index"] + 0.2
    assert after_cb["balanced_accuracy"] >= before["balanced_accuracy"] - 0.02
    assert after_cm["balanced_accuracy"] >= before["balanced_accuracy"] - 0.02
    X0, _ = synthetic_features(bio=0.5, center=0.5, center_scale=0.0, seed=7, **kw)
    Xb0, _ = synthetic_features(bio=0.5, center=0.0, center_scale=0.0, seed=7, **kw)
    ri_cm = robustness_index(CenterMeanAlignment().fit_transform(X0, meta.medical_center), meta, k=11, auc=False)
    ri_b0 = robustness_index(Xb0, meta, k=11, auc=False)
    assert abs(ri_cm.summary["robustness_index"] - ri_b0.summary["robustness_index"]) < 0.01
