"""Tissue segmentation: tub (numpy/scipy) against a CLAM-style OpenCV pipeline on the same thumbnail.

Both run in one process, interleaved, on a generated 2048 x 1536 thumbnail (tissue pieces with holes,
debris, pen strokes); reports seconds per thumbnail, the tub/OpenCV speed ratio (median of per-round
ratios, min-max) and the IoU of the two masks. OpenCV is not a tub dependency; run this where it is:

    python -m venv --system-site-packages /tmp/cv2env && /tmp/cv2env/bin/pip install opencv-python-headless
    OMP_NUM_THREADS=1 /tmp/cv2env/bin/python benchmarks/atlas_tissue.py --rounds 5 --json out.json

The OpenCV side is written here from CLAM's documented steps (HSV, medianBlur, Otsu, closing,
RETR_CCOMP contours, a_t / a_h filters, filled polygons); no CLAM code. Odd closing sizes are used by
default because OpenCV shifts the mask by one pixel with even ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def scene(h=1536, w=2048, seed=0):
    rng = np.random.default_rng(seed)
    img = (238 + rng.integers(0, 8, (h, w, 3))).astype(np.int32)
    yy, xx = np.mgrid[:h, :w]
    tissue = np.zeros((h, w), bool)
    for cy, cx, ry, rx in ((400, 500, 300, 380), (1100, 700, 250, 300), (700, 1500, 420, 330)):
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        tissue &= ~(((yy - cy) / (ry / 4)) ** 2 + ((xx - cx) / (rx / 5)) ** 2 <= 1)  # a lumen
    for _ in range(40):  # debris
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
        tissue[y:y + 5, x:x + 5] = True
    n = int(tissue.sum())
    img[tissue] = np.clip(np.array([200, 90, 160]) + rng.integers(-30, 31, (n, 3)), 0, 255)
    img[1400:1420, 200:1800] = (40, 160, 90)   # green pen on glass
    img[300:900, 1300:1312] = (40, 60, 190)    # blue pen over tissue
    return img.astype(np.uint8)


def opencv_clam_style(cv2, img, mpp, a_t, a_h, max_holes=8, median=7, close=5):
    s = cv2.medianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1], median)
    _, fg = cv2.threshold(s, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    contours, hier = cv2.findContours(fg, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(fg.shape, np.uint8)
    if hier is None:
        return out > 0
    hier, px = hier[0], mpp ** 2
    for i in np.flatnonzero(hier[:, 3] == -1):
        holes = list(np.flatnonzero(hier[:, 3] == i))
        if (cv2.contourArea(contours[i]) - sum(cv2.contourArea(contours[j]) for j in holes)) * px < a_t:
            continue
        cv2.drawContours(out, contours, int(i), 1, thickness=-1)
        big = sorted([j for j in holes if cv2.contourArea(contours[j]) * px > a_h],
                     key=lambda j: -cv2.contourArea(contours[j]))[:max_holes]
        for j in big:
            cv2.drawContours(out, contours, int(j), 0, thickness=-1)
    return out > 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mpp", type=float, default=4.0, help="µm per thumbnail pixel")
    ap.add_argument("--close", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        import cv2
    except ImportError:
        raise SystemExit("OpenCV is not importable here; see this file's docstring for the separate venv")
    cv2.setNumThreads(1)
    from tub_atlas.tissue import TissueParams, mask_outlines, segment_tissue

    img = scene()
    params = TissueParams(close=args.close, min_area=20_000.0, min_hole_area=40_000.0)
    tub_s, cv_s, out_s, ratios = [], [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ours = segment_tissue(img, args.mpp, params)
        t1 = time.perf_counter()
        mask_outlines(ours.mask, ours.labels)
        t2 = time.perf_counter()
        ref = opencv_clam_style(cv2, img, args.mpp, params.min_area, params.min_hole_area, close=args.close)
        t3 = time.perf_counter()
        tub_s.append(t1 - t0)
        out_s.append(t2 - t1)
        cv_s.append(t3 - t2)
        ratios.append((t3 - t2) / (t1 - t0))
    iou = float((ours.mask & ref).sum() / max((ours.mask | ref).sum(), 1))
    res = {"thumbnail": list(img.shape[:2]), "rounds": args.rounds, "tub_s": statistics.median(tub_s),
           "tub_outlines_s": statistics.median(out_s), "opencv_s": statistics.median(cv_s),
           "speed_ratio_tub_over_opencv": statistics.median(ratios), "ratio_min": min(ratios),
           "ratio_max": max(ratios), "iou": iou, "components_tub": len(ours.component_areas),
           "opencv": cv2.__version__}
    print(f"{'':22s}{'s/thumbnail':>12s}")
    print(f"{'tub (scipy)':22s}{res['tub_s']:12.3f}")
    print(f"{'tub outlines':22s}{res['tub_outlines_s']:12.3f}")
    print(f"{'OpenCV CLAM-style':22s}{res['opencv_s']:12.3f}")
    print(f"speed tub/OpenCV = {res['speed_ratio_tub_over_opencv']:.3f} [{min(ratios):.3f}-{max(ratios):.3f}], "
          f"IoU {iou:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
