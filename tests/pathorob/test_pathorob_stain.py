"""Stain normalisation: Macenko recovers the stain matrix of a Beer–Lambert tile; Macenko and Reinhard
match torchstain's numpy normalisers on the same uint8 tiles."""

import numpy as np
import pytest

from tub_pathorob.stain import HE_REF, Macenko, Reinhard, synthetic_tile

S1 = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
S2 = np.array([[0.5, 0.3], [0.8, 0.75], [0.3, 0.6]])
S1, S2 = S1 / np.linalg.norm(S1, axis=0), S2 / np.linalg.norm(S2, axis=0)

# torchstain 1.4.1 numpy normalisers on the same tiles (target = tile(S1, 48, seed 1), image = tile(S2, 48,
# seed 2, class 1)); produced by /tmp/rec_stain.py: (sum, sum of squares, pixel [5, 7], pixel [40, 31]).
TORCHSTAIN = {
    "macenko": (993199, 158323019, [138, 103, 183], [129, 58, 170]),
    "reinhard": (1034946, 171139686, [153, 99, 206], [151, 63, 160]),
    "macenko_default": (796363, 102636919, [110, 77, 123], [108, 59, 100]),
}


def tiles():
    return synthetic_tile(S1, 48, seed=1), synthetic_tile(S2, 48, seed=2, cls=1)


def test_macenko_recovers_stain_vectors():
    tile = synthetic_tile(S2, 96, seed=3)
    he, conc, _ = Macenko().stains(tile)
    assert np.abs(he - S2).max() < 0.02
    assert np.all(conc[:, :100].mean(1) > 0)


@pytest.mark.parametrize("name", list(TORCHSTAIN))
def test_matches_torchstain_recorded(name):
    tgt, img = tiles()
    if name == "macenko":
        out = Macenko().fit(tgt).transform(img)
    elif name == "reinhard":
        out = Reinhard().fit(tgt).transform(img)
    else:
        out = Macenko().transform(img)
    s, s2, p1, p2 = TORCHSTAIN[name]
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert abs(int(out.astype(np.int64).sum()) - s) <= 0.001 * out.size
    assert np.abs(out[5, 7].astype(int) - p1).max() <= 1 and np.abs(out[40, 31].astype(int) - p2).max() <= 1


def test_matches_torchstain_live():
    mac = pytest.importorskip("torchstain.numpy.normalizers.macenko")
    tgt, img = tiles()
    ref = mac.NumpyMacenkoNormalizer()
    ref.fit(tgt)
    a = ref.normalize(img, stains=False)[0].astype(int)
    b = Macenko().fit(tgt).transform(img).astype(int)
    assert (np.abs(a - b) <= 1).mean() >= 0.999


def test_normalisation_moves_towards_target_stain():
    tgt, img = tiles()
    out = Macenko().fit(tgt).transform(img)
    he_out, _, _ = Macenko().stains(out)
    he_tgt, _, _ = Macenko().stains(tgt)
    he_img, _, _ = Macenko().stains(img)
    assert np.abs(he_out - he_tgt).max() < np.abs(he_img - he_tgt).max() / 3
    assert np.allclose(Macenko().stain_matrix_, HE_REF)


def test_tiles_and_targets_without_stain_colour_are_refused_not_coloured_in():
    """A greyscale tile came out of Macenko pink, and out of Reinhard with 23-38 grey levels of random colour
    (its a*/b* rounding noise scaled up); a blank or grey Reinhard target turned every tile into one colour."""
    from tubcli.errors import TubError

    he = synthetic_tile(HE_REF, seed=0)
    grey = np.repeat(he.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    with pytest.raises(TubError, match="tile is greyscale"):
        Macenko().transform(grey)
    with pytest.raises(TubError, match="the Macenko target is greyscale .no stain colour to separate.; choose a stained"):
        Macenko().fit(grey)
    noisy = np.clip(grey + np.random.default_rng(0).normal(0, 3, grey.shape), 0, 255).astype(np.uint8)
    for tile in (grey, noisy):  # a few grey levels of per-channel noise are no stain colour either
        with pytest.raises(TubError, match="tile is greyscale"):
            Reinhard().fit(he).transform(tile)
        with pytest.raises(TubError, match="tile is greyscale"):
            Macenko().transform(tile)
    for target, what in ((np.full((32, 32, 3), 254, np.uint8), "no tissue"), (grey, "no colour")):
        with pytest.raises(TubError, match=f"the Reinhard target has {what}"):
            Reinhard().fit(target)
    assert Macenko().transform(he).shape == he.shape and Reinhard().fit(he).transform(he).shape == he.shape
