"""Stain normalisation of H&E tiles before embedding (spec §2.5).

* **Macenko** et al., *A method for normalizing histology slides for quantitative analysis*, ISBI 2009:
  optical density OD = −ln((I+1)/I₀); the two stain vectors span the plane of the two leading
  eigenvectors of the OD covariance and sit at the robust extremes (α, 100−α percentiles) of the
  angle in that plane; concentrations by least squares are rescaled to reference maxima and the
  image is re-synthesised with the reference stain matrix (Beer–Lambert).
* **Reinhard** et al., *Color transfer between images*, IEEE CG&A 21(5), 2001: match the per-channel
  mean and standard deviation in CIE L*a*b* to a target.

Defaults (I₀ = 240, β = 0.15, α = 1, reference H&E matrix and maxima) are the common ones used by
``torchstain``/``HEnorm_python`` so results are comparable.
"""

from __future__ import annotations

import numpy as np

from tubcli.errors import TubError

HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAX_C_REF = np.array([1.9705, 1.0308])

# sRGB (D65) -> XYZ, and the D65 white point
_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423],
                     [0.212671, 0.715160, 0.072169],
                     [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def _check_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise TubError(f"expected an RGB tile of shape (H, W, 3), got {img.shape}")
    return img


def optical_density(img: np.ndarray, io: float = 240.0) -> np.ndarray:
    """OD = −ln((I + 1)/I₀) per pixel, shape (P, 3)."""
    return -np.log((img.reshape(-1, 3).astype(np.float64) + 1.0) / io)


GREY_CHROMA = 3.0  # mean L*a*b* chroma below which a tile has no stain colour (H&E tiles: 15-40)


def colourless(img: np.ndarray) -> bool:
    """A greyscale tile, also with a few grey levels of per-channel noise: the mean chroma sqrt(a*² + b*²) of
    its tissue (L* < 85) is below GREY_CHROMA. Normalising it would invent colour (Macenko: pink or blue;
    Reinhard: its noise scaled up to the target's colour spread)."""
    lab = rgb_to_lab(_check_rgb(img).astype(np.float32) / 255)
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    tissue = lab[..., 0] < 85  # not the white background, which has no colour in any tile
    return float((chroma[tissue] if tissue.sum() >= 10 else chroma).mean()) < GREY_CHROMA


class Macenko:
    """Macenko H&E normalisation; ``fit(target)`` sets the reference stain matrix and maxima."""

    def __init__(self, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15):
        self.io, self.alpha, self.beta = io, alpha, beta
        self.stain_matrix_ = HE_REF.copy()
        self.max_concentrations_ = MAX_C_REF.copy()

    def stains(self, img: np.ndarray, what: str = "tile") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stain matrix 3×2 with H first, concentrations 2×P, 99th-percentile maxima); ``what`` names the
        image in errors (a tile is skipped, a target replaced)."""
        od = optical_density(_check_rgb(img), self.io)
        tissue = od[~np.any(od < self.beta, axis=1)]
        advice = "skip it" if what == "tile" else "choose a stained tile"
        if len(tissue) < 10:
            raise TubError(f"{what} has almost no stained tissue (OD >= beta on fewer than 10 pixels); {advice}")
        if colourless(img):  # no two stains to separate: the vectors found would be noise, the output made up
            raise TubError(f"{what} is greyscale (no stain colour to separate); {advice}")
        _, vecs = np.linalg.eigh(np.cov(tissue.T))
        plane = vecs[:, 1:3]  # eigenvectors of the two largest eigenvalues
        proj = tissue @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, self.alpha), np.percentile(phi, 100 - self.alpha)
        v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
        v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
        he = np.stack([v_lo, v_hi], 1) if v_lo[0] > v_hi[0] else np.stack([v_hi, v_lo], 1)  # haematoxylin first
        conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
        max_c = np.array([np.percentile(conc[0], 99), np.percentile(conc[1], 99)])
        return he, conc, max_c

    def fit(self, target: np.ndarray) -> "Macenko":
        he, _, max_c = self.stains(target, what="the Macenko target")
        self.stain_matrix_, self.max_concentrations_ = he, max_c
        return self

    def transform(self, img: np.ndarray) -> np.ndarray:
        img = _check_rgb(img)
        h, w, _ = img.shape
        _, conc, max_c = self.stains(img)
        conc = conc / (max_c / self.max_concentrations_)[:, None]
        out = self.io * np.exp(-self.stain_matrix_ @ conc)
        out[out > 255] = 255
        return out.T.reshape(h, w, 3).astype(np.uint8)


def rgb_to_lab(rgb01: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> CIE L*a*b* (float32, as the common numpy implementations)."""
    arr = np.asarray(rgb01, dtype=np.float32).copy()
    m = arr > 0.04045
    arr[m] = np.power((arr[m] + 0.055) / 1.055, 2.4)
    arr[~m] /= 12.92
    xyz = (arr @ _RGB2XYZ.T.astype(np.float32)) / _WHITE.astype(np.float32)
    m = xyz > 0.008856
    xyz[m] = np.cbrt(xyz[m])
    xyz[~m] = 7.787 * xyz[~m] + 16.0 / 116.0
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return np.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], -1).astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* -> sRGB in [0, 1] (clipped)."""
    lab = np.asarray(lab)
    y = (lab[..., 0] + 16.0) / 116.0
    x = lab[..., 1] / 500.0 + y
    z = y - lab[..., 2] / 200.0
    xyz = np.stack([x, y, z], -1)
    m = xyz > 0.2068966
    xyz[m] = xyz[m] ** 3
    xyz[~m] = (xyz[~m] - 16.0 / 116.0) / 7.787
    xyz = xyz * _WHITE.astype(xyz.dtype)
    rgb = xyz @ np.linalg.inv(_RGB2XYZ).T
    m = rgb > 0.0031308
    rgb[m] = 1.055 * np.power(rgb[m], 1 / 2.4) - 0.055
    rgb[~m] *= 12.92
    return np.clip(rgb, 0, 1)


class Reinhard:
    """Reinhard colour transfer in L*a*b*: match channel means and standard deviations."""

    FLAT = 0.5  # L*a*b* units: a channel spread below this is no tissue (lightness) or no colour (a*, b*)

    def fit(self, target: np.ndarray) -> "Reinhard":
        lab = rgb_to_lab(_check_rgb(target).astype(np.float32) / 255)
        self.means_ = np.array([lab[..., i].mean() for i in range(3)])
        self.stds_ = np.array([lab[..., i].std() for i in range(3)])
        flat, grey = self.stds_[0] < self.FLAT, colourless(target)
        if flat or grey:  # every tile would come out one colour, or grey
            raise TubError(f"the Reinhard target has {'no tissue' if flat else 'no colour'} (L*a*b* spreads "
                           f"{', '.join(f'{v:.2g}' for v in self.stds_)}); choose a stained tile")
        return self

    def transform(self, img: np.ndarray) -> np.ndarray:
        if not hasattr(self, "means_"):
            raise TubError("Reinhard normalisation needs a target; pass --target IMG")
        if colourless(img):
            raise TubError("tile is greyscale (no stain colour); Reinhard normalisation would colour in its noise")
        lab = rgb_to_lab(_check_rgb(img).astype(np.float32) / 255)
        out = np.empty_like(lab)
        for i in range(3):
            ch = lab[..., i]
            mu, sd = ch.mean(), ch.std()
            if sd < 1e-3:  # constant but for rounding (a grey tile's a*, b*): scaling it up would invent colour
                raise TubError("tile has a constant colour channel (a blank or greyscale tile); Reinhard "
                               "normalisation is undefined for it")
            out[..., i] = (ch - mu) / sd * self.stds_[i] + self.means_[i]
        return (lab_to_rgb(out) * 255).astype(np.uint8)


NORMALIZERS = {"macenko": Macenko, "reinhard": Reinhard}


def synthetic_tile(stain_matrix: np.ndarray, size: int = 64, seed: int = 0, cls: int = 0, io: float = 240.0) -> np.ndarray:
    """Beer–Lambert tile I = I₀·exp(−S·c(x, y)) with smooth class-specific H/E concentration textures."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = 3 + 2 * cls
    h = 0.6 + 0.5 * np.sin(2 * np.pi * freq * xx + rng.uniform(0, 6)) * np.cos(2 * np.pi * freq * yy)
    e = 0.5 + 0.4 * np.cos(2 * np.pi * (freq - 1) * (xx + yy) + rng.uniform(0, 6))
    h = np.clip(h + 0.15 * rng.standard_normal(h.shape), 0, None)
    e = np.clip(e + 0.15 * rng.standard_normal(e.shape), 0, None)
    conc = np.stack([h.ravel(), e.ravel()])
    img = io * np.exp(-stain_matrix @ conc)
    return np.clip(img.T.reshape(size, size, 3), 0, 255).astype(np.uint8)
