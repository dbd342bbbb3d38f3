"""Parity of tub's scipy tissue segmentation with OpenCV, the library CLAM and TRIDENT segment with.

OpenCV is not a dependency; this file skips without it. To run it (what the README figures come from):

    python -m venv --system-site-packages /tmp/cv2env && /tmp/cv2env/bin/pip install opencv-python-headless
    OMP_NUM_THREADS=1 /tmp/cv2env/bin/python -m pytest tests/atlas/test_atlas_tissue_cv2.py -q -p no:cacheprovider

The OpenCV side below is a CLAM-style pipeline written for this test from CLAM's documented steps
(HSV → medianBlur → Otsu → closing → RETR_CCOMP contours → area filters → filled polygons); no CLAM code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from tub_atlas.tissue import (TissueParams, close_mask, mask_outlines, otsu_threshold, saturation,  # noqa: E402
                              segment_tissue)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _scene():
    return _load(Path(__file__).with_name("test_atlas_tissue.py"), "atlas_tissue_scene").draw_scene()


def _clam_style_cv2(img, mpp, a_t, a_h, close):
    """The CLAM-style OpenCV pipeline of benchmarks/atlas_tissue.py (one copy for both)."""
    bench = _load(Path(__file__).parents[2] / "benchmarks" / "atlas_tissue.py", "atlas_tissue_bench")
    return bench.opencv_clam_style(cv2, img, mpp, a_t, a_h, close=close)


def test_saturation_median_otsu_and_closing_match_opencv():
    img, _ = _scene()
    s = saturation(img)
    s_cv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]
    assert np.abs(s.astype(int) - s_cv).max() <= 1
    from scipy import ndimage

    for k in (3, 7, 11):
        assert np.array_equal(ndimage.median_filter(s, size=k, mode="nearest"), cv2.medianBlur(s, k))
    rng = np.random.default_rng(0)
    for vals in (s, rng.integers(0, 256, (64, 64)).astype(np.uint8),
                 np.concatenate([rng.normal(60, 10, 500), rng.normal(180, 20, 300)]).clip(0, 255).astype(np.uint8)):
        t_cv, _ = cv2.threshold(vals.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert otsu_threshold(vals) == t_cv
    m = rng.random((80, 90)) < 0.3
    m[:10], m[-10:], m[:, :10], m[:, -10:] = False, False, False, False  # OpenCV's border fills edge strips
    for k in (3, 5):  # odd squares: same anchor in both libraries
        closed_cv = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((k, k), np.uint8)) > 0
        assert np.array_equal(close_mask(m, k), closed_cv)


def test_opencv_even_closing_shifts_the_mask_and_tub_does_not():
    """Closing a rectangle must give the rectangle back. OpenCV's even-sized square (CLAM's default
    close = 4) moves it one pixel down and right, because dilation and erosion use the same anchor;
    tub's closing is symmetric, so with even sizes the two differ by that shift."""
    m = np.zeros((20, 20), bool)
    m[6:11, 7:12] = True
    for k in (2, 4, 6):
        assert np.array_equal(close_mask(m, k), m)
        cv = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((k, k), np.uint8)) > 0
        assert np.array_equal(cv, np.roll(m, (1, 1), axis=(0, 1)))


@pytest.mark.parametrize("close", [3, 5])
def test_segmentation_matches_a_clam_style_opencv_pipeline(close):
    img, parts = _scene()
    ours = segment_tissue(img, 2.0, TissueParams(min_area=1000.0, min_hole_area=2000.0, close=close))
    ref = _clam_style_cv2(img, 2.0, a_t=1000.0, a_h=2000.0, close=close)
    inter, union = (ours.mask & ref).sum(), (ours.mask | ref).sum()
    assert inter / union > 0.99, inter / union
    # the same components, and the same holes kept
    n_cv = cv2.connectedComponents(ours.mask.astype(np.uint8), connectivity=8)[0] - 1
    assert n_cv == len(ours.component_areas) == cv2.connectedComponents(ref.astype(np.uint8), connectivity=8)[0] - 1
    assert not ref[65, 70] and ref[98, 123] and not ref[parts["speck"]].any()


def test_outline_areas_match_opencv_contours():
    img, _ = _scene()
    t = segment_tissue(img, 2.0, TissueParams(min_area=1000.0, min_hole_area=2000.0, pen=("green", "blue", "black")))
    polys = mask_outlines(t.mask, t.labels)
    contours, hier = cv2.findContours(t.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    outer = np.flatnonzero(hier[0][:, 3] == -1)
    assert len(outer) == len(polys)
    assert sorted(len(p["holes"]) for p in polys) == sorted(int((hier[0][:, 3] == i).sum()) for i in outer)
    # OpenCV's contours run through boundary pixel centres, ours along pixel edges: the pixel-edge area
    # equals the pixel count exactly, OpenCV's is smaller by about half the perimeter
    for p in polys:
        assert p["area"] == (t.labels == p["id"]).sum()
