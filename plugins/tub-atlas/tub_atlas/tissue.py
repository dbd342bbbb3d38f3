"""Tissue segmentation of a low-resolution slide image, as CLAM / TRIDENT users expect it.

The steps follow CLAM's ``WholeSlideImage.segmentTissue`` (Lu et al., *Data-efficient and weakly
supervised computational pathology on whole-slide images*, Nat. Biomed. Eng. 2021) and TRIDENT's area
filters, reimplemented with numpy/scipy.ndimage (no OpenCV):

1. **Saturation.** HSV saturation S = (max − min) / max of RGB, 0..255 (tissue is coloured, glass and
   background are grey/white), median-blurred with a ``median``-pixel window (CLAM's ``mthresh``).
2. **Threshold.** S > Otsu's threshold (floored at ``min_saturation`` so that a blank slide does not
   split its noise into "tissue"), or S > a fixed ``threshold`` (CLAM's ``sthresh``).
3. **Pen marks** (optional, ``pen``): ink pixels found by the colour rules in :data:`PEN_RULES`, grown
   by ``pen_dilate`` pixels to catch the stroke's anti-aliased rim, are removed from the foreground.
4. **Closing** with a ``close`` × ``close`` square (CLAM's ``close``) on the image extended by
   background (OpenCV, which CLAM uses, shifts the mask by one pixel for even sizes; this does not).
5. **Components** (8-connected). A component whose area is below ``min_area`` µm² is debris and is
   dropped (CLAM's ``a_t``; here in µm² so the rule does not depend on the level or scanner).
6. **Holes** (4-connected background enclosed by a component) are filled, except real holes — lumina,
   tears, vessels — with area ≥ ``min_hole_area`` µm² (CLAM's ``a_h``); at most ``max_holes`` of the
   largest per component stay holes (CLAM's ``max_n_holes``), smaller ones become tissue.
7. Pen pixels are removed once more, so ink is never tissue even where a filled hole covered it.

Areas are pixel counts × (µm per mask pixel)²; outlines (:func:`mask_outlines`) trace the pixel edges
of the final mask exactly, so the polygon areas equal the pixel areas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PEN_COLOURS = ("blue", "green", "black", "red")

#: Colour rules for ink, on HSV with hue H in degrees and S, V in 0..1 (documented heuristics, not a
#: trained detector). H&E is pink (eosin, H ≈ 300–350°) and purple (haematoxylin, H ≈ 250–290°);
#: nothing in it is green or cyan, and haematoxylin is never as blue as ballpoint or marker ink.
PEN_RULES = {
    # green / cyan markers: a hue H&E never has
    "green": "75 <= H <= 190 and S >= 0.20 and V >= 0.15",
    # blue ink: blue hue, saturated, and far more blue than red (haematoxylin has R close to B)
    "blue": "190 < H <= 250 and S >= 0.40 and B - R >= 80",
    # black / dark ink: nearly no light in any channel (dense nuclei stay above V 0.25)
    "black": "V < 0.25",
    # red ink: pure saturated red. Also catches dense red blood cells (haemorrhage); opt in knowingly
    "red": "(H <= 15 or H >= 345) and S >= 0.60 and V >= 0.35 and G <= 90 and B <= 110",
}


@dataclass
class TissueParams:
    """Segmentation settings (CLAM's names in brackets)."""

    threshold: int | None = None   # fixed saturation threshold 0..255 [sthresh]; None = Otsu [use_otsu]
    min_saturation: int = 15       # floor of the Otsu threshold (blank slides stay blank)
    median: int = 7                # median-blur window in mask pixels [mthresh]
    close: int = 4                 # closing square in mask pixels [close]; 0 = none
    min_area: float = 4_000.0      # µm²: smaller tissue components are debris [a_t]
    min_hole_area: float = 10_000.0  # µm²: smaller holes are filled [a_h]
    max_holes: int = 8             # largest holes kept per component [max_n_holes]
    pen: tuple[str, ...] = ()      # ink colours to exclude, from PEN_COLOURS
    pen_dilate: int = 2            # grow the ink mask by this many mask pixels

    def check(self) -> None:
        """Raise ValueError with one line for settings that cannot work."""
        if self.threshold is not None and not 0 <= self.threshold <= 255:
            raise ValueError(f"saturation threshold {self.threshold} is outside 0..255")
        if self.min_area < 0 or self.min_hole_area < 0:
            raise ValueError(f"areas must be >= 0 µm² (got min area {self.min_area}, "
                             f"min hole area {self.min_hole_area})")
        if self.median < 1 or self.median % 2 == 0:
            raise ValueError(f"median window {self.median} must be an odd number >= 1")
        if self.close < 0 or self.max_holes < 0 or self.pen_dilate < 0:
            raise ValueError("closing size, max holes and pen dilation must be >= 0")
        bad = [p for p in self.pen if p not in PEN_COLOURS]
        if bad:
            raise ValueError(f"unknown pen colour(s) {', '.join(bad)}; choose from {', '.join(PEN_COLOURS)}")


@dataclass
class Tissue:
    """Result of :func:`segment_tissue` on one low-resolution image."""

    mask: np.ndarray               # (h, w) bool final tissue
    pen: np.ndarray                # (h, w) bool ink (after dilation), excluded from ``mask``
    holes: np.ndarray              # (h, w) bool kept holes (inside tissue, not tissue)
    labels: np.ndarray             # (h, w) int32 component id (1..n) of ``mask`` pixels, 0 elsewhere
    mpp: float | None              # µm per mask pixel (None: unknown, areas in pixels)
    threshold: float               # saturation threshold used
    dropped: int = 0               # components removed as debris (< min_area)
    filled_holes: int = 0          # holes filled (small, or beyond max_holes)
    component_areas: list = field(default_factory=list)  # µm² (or px) per component, by id

    @property
    def area(self) -> float:
        """Tissue area in µm² (pixels when the resolution is unknown)."""
        return float(self.mask.sum()) * (self.mpp ** 2 if self.mpp else 1.0)

    def summary(self) -> dict:
        unit = "um2" if self.mpp else "px"
        return {f"tissue_area_{unit}": round(self.area, 1), "tissue_components": len(self.component_areas),
                f"component_areas_{unit}": [round(a, 1) for a in self.component_areas],
                "holes_kept": int(_count(self.holes)), "holes_filled": self.filled_holes,
                "debris_dropped": self.dropped, "pen_pixels": int(self.pen.sum()),
                "saturation_threshold": self.threshold, "mask_mpp": self.mpp, "mask_shape": list(self.mask.shape)}


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold (Otsu 1979) of uint8 values: maximises the between-class variance; values
    above it are the upper class."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    mu_t = mu[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H in degrees 0..360, S in 0..1, V in 0..1) of an (h, w, 3) uint8 image (the usual hexcone)."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(d > 0, h * 60.0, 0.0)
    s = np.where(mx > 0, d / np.maximum(mx, 1e-6), 0.0)
    return h, s, mx


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..255 of an (H, W, 3) uint8 image."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # channel-wise max/min: 10x faster than over axis -1
    mx = np.maximum(np.maximum(r, g), b).astype(np.float32)
    mn = np.minimum(np.minimum(r, g), b).astype(np.float32)
    s = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return np.round(s * 255).astype(np.uint8)


def _sort_planes(planes: list) -> list:
    """Sort equal-shaped arrays elementwise (odd-even transposition network: min/max of neighbours)."""
    for r in range(len(planes)):
        for i in range(r % 2, len(planes) - 1, 2):
            a, b = planes[i], planes[i + 1]
            planes[i], planes[i + 1] = np.minimum(a, b), np.maximum(a, b)
    return planes


def median_filter(image: np.ndarray, size: int, strip: int = 64) -> np.ndarray:
    """Median over ``size`` x ``size`` windows (odd size, edges repeated: scipy's ``mode="nearest"``), by
    separable sorting networks (Adams 2021, "Fast median filters using separable sorting networks"): the
    window's columns are sorted, then each rank's row; in that doubly sorted matrix an entry (i, j) has at
    least (i+1)(j+1) entries below it and (k-i)(k-j) above, which leaves few candidates for the median, and
    a selection by min/max passes finds it. Run in strips of ``strip`` rows, which stay in the CPU cache.
    Equal to ``scipy.ndimage.median_filter`` and 7-10x faster on a 2048-px thumbnail (its rank filter
    sorts every window)."""
    r = size // 2
    H, W = image.shape
    padded = np.pad(image, r, mode="edge")
    out = np.empty_like(image)
    for y in range(0, H, strip):
        h = min(strip, H - y)
        out[y:y + h] = _median_rows(padded[y:y + h + 2 * r], size, h, W)
    return out


def _median_rows(padded: np.ndarray, k: int, H: int, W: int) -> np.ndarray:
    """The medians of the H x W windows of an (H + k - 1) x (W + k - 1) block (see :func:`median_filter`)."""
    columns = _sort_planes([padded[i:i + H] for i in range(k)])
    m = (k * k + 1) // 2  # the median's rank, 1-based
    cand = [(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= m and (k - i) * (k - j) <= m]
    below = sum(1 for i in range(k) for j in range(k) if (k - i) * (k - j) > m)  # certainly below the median
    c = []
    for i in sorted({i for i, _ in cand}):
        rows = _sort_planes([columns[i][:, j:j + W] for j in range(k)])
        c += [rows[j] for ii, j in cand if ii == i]
    kth, lo, hi = m - 1 - below, 0, len(c)  # c[lo:hi] holds the kth smallest; below lo smaller, above hi larger
    while hi - lo > 1:
        if kth - lo <= hi - 1 - kth:  # a pass that moves the window's minimum to lo
            for i in range(hi - 1, lo, -1):
                c[i - 1], c[i] = np.minimum(c[i - 1], c[i]), np.maximum(c[i - 1], c[i])
            if lo == kth:
                break
            lo += 1
        else:  # ... or its maximum to hi - 1
            for i in range(lo, hi - 1):
                c[i], c[i + 1] = np.minimum(c[i], c[i + 1]), np.maximum(c[i], c[i + 1])
            if hi - 1 == kth:
                break
            hi -= 1
    return c[kth]


def tissue_mask(rgb: np.ndarray, min_saturation: int = 15) -> np.ndarray:
    """The threshold step alone: saturation above its Otsu threshold (and above ``min_saturation``)."""
    s = saturation(rgb)
    return s > max(otsu_threshold(s), min_saturation)


def pen_mask(rgb: np.ndarray, colours) -> np.ndarray:
    """Pixels matching the ink rules of :data:`PEN_RULES` for ``colours``."""
    out = np.zeros(rgb.shape[:2], bool)
    if not colours:
        return out
    H, S, V = hsv(rgb)
    R, G, B = (rgb[..., i].astype(np.int32) for i in range(3))
    for c in colours:
        if c == "green":
            out |= (H >= 75) & (H <= 190) & (S >= 0.20) & (V >= 0.15)
        elif c == "blue":
            out |= (H > 190) & (H <= 250) & (S >= 0.40) & (B - R >= 80)
        elif c == "black":
            out |= V < 0.25
        elif c == "red":
            out |= ((H <= 15) | (H >= 345)) & (S >= 0.60) & (V >= 0.35) & (G <= 90) & (B <= 110)
        else:
            raise ValueError(f"unknown pen colour {c!r}")
    return out


EIGHT = np.ones((3, 3), bool)
FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def _count(mask: np.ndarray, structure=FOUR) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask, structure=structure)[1]) if mask.any() else 0


def close_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Morphological closing with a size × size square on the image extended by background, so a shape
    closed is never shifted (OpenCV's even-sized kernels shift it by one pixel) and the border neither
    erodes tissue nor fills the strip between tissue and the image edge."""
    from scipy import ndimage

    if size <= 1 or not mask.any():
        return mask
    row, col = np.ones((1, size), bool), np.ones((size, 1), bool)  # the square, separated: 5x faster, equal
    padded = np.pad(mask, size)
    dilated = ndimage.binary_dilation(ndimage.binary_dilation(padded, row), col)
    closed = ndimage.binary_erosion(ndimage.binary_erosion(dilated, row), col)
    return closed[size:-size, size:-size]


def segment_tissue(rgb: np.ndarray, mpp: float | None, params: TissueParams | None = None) -> Tissue:
    """Tissue mask of an (h, w, 3) uint8 low-resolution image whose pixels are ``mpp`` µm wide."""
    from scipy import ndimage

    p = params or TissueParams()
    p.check()
    if mpp is None and (p.min_area > 0 or p.min_hole_area > 0):
        raise ValueError("the slide's resolution is unknown, so areas in µm² cannot be applied")
    px_area = (mpp ** 2) if mpp else 1.0

    s = saturation(rgb)
    if p.median > 1:
        s = median_filter(s, p.median)
    thr = float(p.threshold) if p.threshold is not None else max(otsu_threshold(s), float(p.min_saturation))
    fg = s > thr
    pen = pen_mask(rgb, p.pen)
    if p.pen_dilate and pen.any():
        pen = ndimage.binary_dilation(pen, EIGHT, iterations=p.pen_dilate)
    fg &= ~pen
    fg = close_mask(fg, p.close) & ~pen

    # components (8-connected, as OpenCV contours); debris below min_area is dropped
    lab, n = ndimage.label(fg, structure=EIGHT)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:] * px_area
    keep = np.flatnonzero(sizes >= p.min_area) + 1
    kept = np.isin(lab, keep)
    dropped = int(n - len(keep))

    # holes: 4-connected background not reachable from the border, assigned to the enclosing component
    filled = ndimage.binary_fill_holes(kept, structure=FOUR)
    hole_px = filled & ~kept
    hlab, nh = ndimage.label(hole_px, structure=FOUR)
    keep_hole = np.zeros(nh + 1, bool)
    if nh:
        outer, _ = ndimage.label(filled, structure=EIGHT)
        hsize = np.bincount(hlab.ravel(), minlength=nh + 1) * px_area
        idx = np.arange(1, nh + 1)
        # the outermost component that encloses each hole (any of its pixels will do: all have the same one)
        parent = np.zeros(nh + 1, outer.dtype)
        parent[hlab[hole_px]] = outer[hole_px]
        parent = parent[1:]
        for comp in np.unique(parent):
            mine = idx[(parent == comp) & (hsize[idx] >= p.min_hole_area)]
            mine = mine[np.argsort(-hsize[mine], kind="stable")][:p.max_holes]
            keep_hole[mine] = True
    holes = keep_hole[hlab] & hole_px
    mask = filled & ~holes & ~pen
    filled_holes = int(nh - keep_hole.sum())

    final_lab, nf = ndimage.label(mask, structure=EIGHT)
    areas = (np.bincount(final_lab.ravel(), minlength=nf + 1)[1:] * px_area).tolist()
    return Tissue(mask=mask, pen=pen, holes=holes, labels=final_lab.astype(np.int32), mpp=mpp, threshold=thr,
                  dropped=dropped, filled_holes=filled_holes, component_areas=[float(a) for a in areas])


# ------------------------------------------------------------------ outlines
def mask_outlines(mask: np.ndarray, labels: np.ndarray | None = None) -> list[dict]:
    """Exact outlines of a boolean mask along pixel edges, one polygon per 8-connected component.

    Returns ``[{"id": k, "exterior": [(x, y), …], "holes": [[(x, y), …], …]}]`` in pixel-corner
    coordinates (x right, y down; pixel (r, c) spans [c, c+1] × [r, r+1]); rings are closed (first point
    repeated). Exteriors have positive shoelace area in these coordinates, holes negative, so the area of
    a polygon (exterior − holes) equals its pixel count. Edges keep foreground on their right; at a
    vertex where two pixels touch only diagonally the trace turns left, joining them as 8-connectivity
    does.
    """
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if labels is None:
        labels = ndimage.label(m, structure=EIGHT)[0]
    pad = np.pad(m, 1)
    core = pad[1:-1, 1:-1]
    rr, cc = [], []
    starts, dirs = [], []
    # (neighbour offset, start corner offset, direction) for top, right, bottom, left edges
    for (dr, dc), (sx, sy), (dx, dy) in (((-1, 0), (0, 0), (1, 0)), ((0, 1), (1, 0), (0, 1)),
                                         ((1, 0), (1, 1), (-1, 0)), ((0, -1), (0, 1), (0, -1))):
        nb = pad[1 + dr:pad.shape[0] - 1 + dr, 1 + dc:pad.shape[1] - 1 + dc]
        r, c = np.nonzero(core & ~nb)
        rr.append(r)
        cc.append(c)
        starts.append(np.stack([c + sx, r + sy], 1))
        dirs.append(np.tile([dx, dy], (len(r), 1)))
    rr, cc = np.concatenate(rr), np.concatenate(cc)
    start = np.concatenate(starts).astype(np.int64)
    d = np.concatenate(dirs).astype(np.int64)
    n = len(start)
    if n == 0:
        return []
    width = int(start[:, 0].max()) + 2
    key = start[:, 1] * width + start[:, 0]
    order = np.argsort(key, kind="stable")
    sk = key[order]
    end = start + d
    ekey = end[:, 1] * width + end[:, 0]
    lo = np.searchsorted(sk, ekey, "left")
    hi = np.searchsorted(sk, ekey, "right")
    nxt = order[np.minimum(lo, n - 1)].copy()
    for i in np.flatnonzero(hi - lo == 2):  # saddle vertex: take the left turn (dy, -dx)
        a, b = order[lo[i]], order[lo[i] + 1]
        left = (d[i, 1], -d[i, 0])
        nxt[i] = a if (d[a, 0], d[a, 1]) == left else b
    seen = np.zeros(n, bool)
    polys: dict[int, dict] = {}
    for e0 in range(n):
        if seen[e0]:
            continue
        ring, e = [], e0
        while not seen[e]:
            seen[e] = True
            ring.append(e)
            e = nxt[e]
        pts = start[ring]
        # keep only corners (direction changes)
        dd = d[ring]
        turn = np.any(dd != np.roll(dd, 1, axis=0), axis=1)
        pts = pts[turn]
        x, y = pts[:, 0].astype(np.float64), pts[:, 1].astype(np.float64)
        area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
        comp = int(labels[rr[e0], cc[e0]])
        coords = [(int(a), int(b)) for a, b in pts] + [(int(pts[0, 0]), int(pts[0, 1]))]
        poly = polys.setdefault(comp, {"id": comp, "exterior": None, "holes": [], "area": 0.0})
        if area > 0:
            poly["exterior"] = coords
        else:
            poly["holes"].append(coords)
        poly["area"] += area
    return [polys[k] for k in sorted(polys)]


def ring_area(ring) -> float:
    """Signed shoelace area of a closed ring [(x, y), …] (positive for exteriors here)."""
    a = np.asarray(ring, np.float64)
    x, y = a[:-1, 0], a[:-1, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def outlines_geojson(polys: list[dict], scale: tuple[float, float], props: dict | None = None) -> dict:
    """GeoJSON FeatureCollection of outlines scaled to level-0 pixels (``scale`` = level-0 px per mask
    px in x, y), one Polygon feature per tissue component, with its area."""
    sx, sy = scale
    feats = []
    for p in polys:
        if p["exterior"] is None:
            continue
        rings = [p["exterior"], *p["holes"]]
        coords = [[[round(x * sx, 2), round(y * sy, 2)] for x, y in ring] for ring in rings]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords},
                      "properties": {"objectType": "annotation", "classification": {"name": "Tissue"},  # QuPath
                                     "tissue_id": p["id"], "holes": len(p["holes"]), **(props or {}),
                                     "area_level0_px2": round(p["area"] * sx * sy, 1),
                                     # QuPath lists these in its measurement table
                                     "measurements": {"area_level0_px2": round(p["area"] * sx * sy, 1)}}})
    return {"type": "FeatureCollection", "features": feats}
