"""Synthetic PathoROB feature sets with tunable biological and center signal (spec §5).

x = a·u_class + b·v_center + c·w_slide + σ·ε with u, v, w, ε ~ N(0, I_D) drawn from one seed;
optionally each center multiplies its rows by its own scale (a batch effect ComBat should remove).
Presets reproduce the shape and names of the official metadata files so the same data drive
tub and the reference scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from .metadata import Metadata


@dataclass(frozen=True)
class Design:
    classes: tuple[str, ...]
    centers: tuple[str, ...]
    slides_per_cell: int
    tiles_per_slide: int
    ood_centers: tuple[str, ...] = ()
    ood_slides_per_cell: int = 0
    slide_prefix: str = ""
    reduced: bool = False  # subset = "<class>-<center>" as in the *_reduced files


PRESETS: dict[str, Design] = {
    "camelyon": Design(("normal", "tumor"), ("RUMC", "UMCU"), 17, 300, ("CWZ", "RST", "LPON"), 1),
    "camelyon_reduced": Design(("normal", "tumor"), ("RUMC", "UMCU"), 10, 100, reduced=True),
    "tcga_4x4": Design(
        ("Breast_invasive_carcinoma", "Colon_adenocarcinoma", "Lung_adenocarcinoma", "Lung_squamous_cell_carcinoma"),
        ("Asterand", "Christiana Healthcare", "Roswell Park", "University of Pittsburgh"), 12, 30,
        ("Cureline", "Greater Poland Cancer Center", "International Genomics Consortium", "Johns Hopkins"), 5,
        slide_prefix="TCGA"),
    "tolkach_esca": Design(
        ("TUMOR", "MUSC_PROP", "SH_OES", "SH_MAG", "REGR_TU", "ADVENT"), ("VALSET2_WNS", "VALSET4_CHA_FULL"), 9, 100,
        ("VALSET1_UKK", "VALSET3_TCGA"), 4),
    "tolkach_esca_reduced": Design(
        ("TUMOR", "MUSC_PROP", "SH_OES", "SH_MAG", "REGR_TU", "ADVENT"),
        ("VALSET1_UKK", "VALSET2_WNS", "VALSET4_CHA_FULL"), 5, 100, reduced=True),
}


def _slide_id(design: Design, center_index: int, slide_number: int) -> str:
    if design.slide_prefix == "TCGA":  # case id = slide_id[:12]
        return f"TCGA-{center_index:02d}-{slide_number:04d}-01Z-00-DX1"
    return f"s{center_index:02d}-{slide_number:05d}"


def synthetic_features(
    classes=("c0", "c1"),
    centers=("m0", "m1"),
    slides_per_cell: int = 5,
    tiles_per_slide: int = 40,
    dim: int = 64,
    bio: float = 0.5,
    center: float = 0.5,
    slide: float = 0.3,
    noise: float = 1.0,
    center_scale: float = 0.0,
    seed: int = 0,
    design: Design | None = None,
    dtype=np.float64,
) -> tuple[np.ndarray, Metadata]:
    """Features and metadata (rows ordered center, class, slide, tile; ID rows then OOD rows)."""
    if design is None:
        design = Design(tuple(classes), tuple(centers), slides_per_cell, tiles_per_slide)
    rng = np.random.default_rng(seed)
    all_centers = list(design.centers) + list(design.ood_centers)
    u = rng.standard_normal((len(design.classes), dim))
    v = rng.standard_normal((len(all_centers), dim))
    scale = np.exp(center_scale * rng.standard_normal(len(all_centers)))
    rows, cols = [], {k: [] for k in ("subset", "slide_id", "patch_id", "biological_class", "medical_center")}
    slide_no = 0
    for ci, c in enumerate(all_centers):
        ood = ci >= len(design.centers)
        n_slides = design.ood_slides_per_cell if ood else design.slides_per_cell
        for bi, b in enumerate(design.classes):
            for _ in range(n_slides):
                sid = _slide_id(design, ci, slide_no)
                slide_no += 1
                w = rng.standard_normal(dim)
                eps = rng.standard_normal((design.tiles_per_slide, dim))
                x = bio * u[bi] + center * v[ci] + slide * w + noise * eps
                rows.append(x * scale[ci])
                n = design.tiles_per_slide
                cols["subset"] += ["OOD" if ood else (f"{b}-{c}" if design.reduced else "ID")] * n
                cols["slide_id"] += [sid] * n
                cols["patch_id"] += [f"{t * 224}_{ci * 7}" for t in range(n)]
                cols["biological_class"] += [b] * n
                cols["medical_center"] += [c] * n
    X = np.concatenate(rows).astype(dtype)
    return X, Metadata.from_columns("<synthetic>", **cols)


def paired_subsets(meta: Metadata) -> tuple[Metadata, np.ndarray]:
    """A ``tcga_2x2``-style paired metadata from a full grid: one subset ``b1-b2-c1-c2`` per pair of
    classes × pair of centers with all four cells present (classes/centers in first-appearance order).

    Returns the paired metadata and, for each of its rows, the row index in ``meta`` (features follow it).
    A tile occurs in several subsets, as in the official file.
    """
    keep = meta.subset != "OOD"
    idx_all = np.flatnonzero(keep)
    bio, cen = meta.biological_class[keep], meta.medical_center[keep]
    classes, centers = list(dict.fromkeys(bio)), list(dict.fromkeys(cen))
    take, names = [], []
    for (b1, b2) in combinations(classes, 2):
        for (c1, c2) in combinations(centers, 2):
            sel = np.flatnonzero(np.isin(bio, [b1, b2]) & np.isin(cen, [c1, c2]))
            cells = {(b, c) for b, c in zip(bio[sel], cen[sel])}
            if len(cells) < 4:
                continue
            take.append(idx_all[sel])
            names += [f"{b1}-{b2}-{c1}-{c2}"] * len(sel)
    index = np.concatenate(take)
    paired = meta.take(index)
    paired.columns["subset"] = np.array(names, dtype=object)
    return paired, index


def features_for_metadata(meta: Metadata, dim: int = 64, bio: float = 0.5, center: float = 0.5, slide: float = 0.3,
                          noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """Synthetic features for an existing metadata table (e.g. an official CSV): the same model
    x = a·u_class + b·v_center + c·w_slide + σ·ε, with the factors drawn per distinct name."""
    rng = np.random.default_rng(seed)

    def factors(values):
        names, inv = np.unique(values.astype(str), return_inverse=True)
        return rng.standard_normal((len(names), dim))[inv]

    return (bio * factors(meta.biological_class) + center * factors(meta.medical_center)
            + slide * factors(meta.slide_id) + noise * rng.standard_normal((len(meta), dim)))
