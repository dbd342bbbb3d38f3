"""An encoder = preprocessing + ViT + pooling, built from a preset and/or a local checkpoint.

Preprocessing (spec §2.4): RGB in [0, 1] -> resize (shorter side to ``img_size``) -> optional
centre crop -> normalise with the model's mean/std. Pooling (spec §2.5) on final-normed tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tubcli.device import as_torch_dtype
from tubcli.errors import TubError

from .checkpoint import check_heads_option, model_json_for, option_names, read_checkpoint
from .presets import NORMALISATIONS, Preset, get_preset
from .vit import ViTConfig, VisionTransformer, pool_tokens, pooled_dim

log = logging.getLogger("tub.atlas")


@dataclass
class Transform:
    """Tile preprocessing of one model: size, interpolation, crop, mean/std."""

    img_size: int = 224
    interpolation: str = "bilinear"  # bilinear | bicubic (both antialiased)
    crop: bool = False
    mean: tuple = NORMALISATIONS["imagenet"][0]
    std: tuple = NORMALISATIONS["imagenet"][1]

    def resized_size(self, H: int, W: int) -> tuple[int, int]:
        """(H, W) after scaling the shorter side to ``img_size``."""
        s = self.img_size
        if min(H, W) == s:
            return H, W
        scale = s / min(H, W)
        return (s, round(W * scale)) if H <= W else (round(H * scale), s)

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        """(H, W) of an H x W tile after :meth:`resize`, i.e. what the ViT sees."""
        return (self.img_size, self.img_size) if self.crop else self.resized_size(H, W)

    def seen_box(self, H: int, W: int) -> tuple[float, float, float, float]:
        """(top, left, height, width) in tile pixels of the part of an H x W tile the ViT sees: the
        whole tile, or the centre crop of the resized tile mapped back (where a map belongs)."""
        h, w = self.resized_size(H, W)
        if not self.crop or (h, w) == (self.img_size, self.img_size):
            return 0.0, 0.0, float(H), float(W)
        s = self.img_size
        return (h - s) // 2 * H / h, (w - s) // 2 * W / w, s * H / h, s * W / w

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> shorter side ``img_size`` (+ centre crop when ``crop``)."""
        H, W = x.shape[-2:]
        s = self.img_size
        size = self.resized_size(H, W)
        if size != (H, W):
            x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True,
                              align_corners=False).clamp_(0, 1)
        if self.crop and x.shape[-2:] != (s, s):
            H, W = x.shape[-2:]
            top, left = (H - s) // 2, (W - s) // 2
            x = x[..., top:top + s, left:left + s]
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.resize(x))

    def to_dict(self) -> dict:
        return {"img_size": self.img_size, "interpolation": self.interpolation, "crop": self.crop,
                "mean": list(self.mean), "std": list(self.std)}


def uint8_to_float(tiles, device=None) -> torch.Tensor:
    """(B, H, W, 3) uint8 array -> (B, 3, H, W) float32 in [0, 1] on ``device``: the uint8 tiles are moved
    (a quarter of float32's bytes) and converted there, exactly as on the CPU."""
    array = np.array(tiles)  # a copy: PIL arrays are read-only
    if array.ndim != 4 or array.shape[-1] != 3:
        raise TubError(f"tiles must be (N, H, W, 3) RGB, got shape {tuple(array.shape)}")
    if array.dtype.kind in "ui" and array.size and (array.min() < 0 or array.max() > 255):
        raise TubError(f"integer tiles must lie in 0..255, these ({array.dtype}) span {array.min()}..{array.max()}; "
                       "convert 16-bit tiles to uint8 (divide by 257)")
    t = torch.from_numpy(array).to(device).permute(0, 3, 1, 2).float()
    return t / 255.0 if array.dtype.kind in "ui" else check_unit_range(t)


def check_unit_range(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if its values lie in [0, 1] (1e-3 of rounding allowed), else a one-line TubError: float
    tiles in 0..255 were divided by 255 only when their maximum exceeded 1 (a guess per batch), and as a
    tensor not at all, giving wrong embeddings without a word."""
    if x.numel() == 0:
        return x
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (-1e-3 <= lo and hi <= 1 + 1e-3):  # also NaN
        raise TubError(f"float tiles must lie in [0, 1], these span {lo:g}..{hi:g}; pass uint8 tiles (0..255) "
                       "or divide by 255")
    return x


class Encoder(nn.Module):
    """Maps RGB tiles in [0, 1] (B, 3, H, W) to pooled embeddings (B, dim); normalisation inside."""

    def __init__(self, vit: VisionTransformer, transform: Transform, pool: str):
        super().__init__()
        self.vit = vit
        self.transform = transform
        self.pool = pool
        self.dim = pooled_dim(vit.cfg.embed_dim, pool)
        self.tile_size = transform.img_size  # the side tiles are resized to (tub_patch_encoders' tile_size)

    def check_tile_size(self, H: int, W: int, src) -> None:
        """An H x W tile that this model's preprocessing cannot turn into whole patches is a one-line
        error naming ``src`` (otherwise the ViT would fail on the resized size, without the file)."""
        h, w = self.transform.output_size(H, W)
        P = self.vit.cfg.patch_size
        if h % P or w % P:
            raise TubError(f"{src}: {W}x{H} px tiles become {w}x{h} px after resizing to the model's "
                           f"{self.transform.img_size} px (shorter side), not whole {P}-px patches; "
                           "crop the tiles square")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> the ViT's input. Resize (antialiased) and normalisation run in float32 (float64
        for a float64 model); only the normalised tensor is cast to the weights' dtype, so bf16/fp16 weights
        see no pixels quantised before resizing (and interpolate's antialias has no bf16 CPU kernel)."""
        param = next(self.vit.parameters())
        if isinstance(x, np.ndarray) or x.dtype == torch.uint8:  # tiles as read, (B, H, W, 3): a notebook's form
            x = uint8_to_float(np.asarray(x.cpu() if torch.is_tensor(x) else x), param.device)  # range checked there
        else:
            check_unit_range(x)
        if x.ndim != 4 or x.shape[1] != 3:
            raise TubError(f"tiles must be (B, 3, H, W) RGB in [0, 1] or (B, H, W, 3) uint8, got shape "
                           f"{tuple(x.shape)} ({x.dtype})")
        work = torch.float64 if param.dtype == torch.float64 else torch.float32
        return self.transform(x.to(work)).to(param.dtype)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":  # only the CLS token is needed: the last block runs on it alone
            return self.vit.forward_cls(self.preprocess(x))
        return pool_tokens(self.tokens(x), self.vit.num_prefix_tokens, self.pool)


def transform_for(preset: Preset | None, meta: dict, cfg: ViTConfig, norm: str | None = None,
                  img_size: int | None = None, options: dict | None = None) -> Transform:
    mean, std = None, None
    if norm:
        mean, std = NORMALISATIONS[norm]
    elif meta.get("mean"):
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
    elif preset is not None:
        mean, std = preset.mean_std
    else:
        mean, std = NORMALISATIONS["imagenet"]
        log.warning("no preset or model.json gives the normalisation; using ImageNet mean/std")
    if img_size is not None and (img_size < 1 or img_size % cfg.patch_size):
        raise TubError(f"{option_names(options)['img_size']} {img_size} is not a positive multiple of the patch "
                       f"size {cfg.patch_size}; use e.g. {max(1, round(img_size / cfg.patch_size)) * cfg.patch_size}")
    size = img_size or meta.get("img_size") or (preset.img_size if preset else None) or cfg.img_size
    return Transform(img_size=size, interpolation=preset.interpolation if preset else "bilinear",
                     crop=preset.crop if preset else False, mean=tuple(mean), std=tuple(std))


def _norm_name(mean, std) -> str:
    for name, (m, s) in NORMALISATIONS.items():
        if tuple(m) == tuple(mean) and tuple(s) == tuple(std):
            return name
    return f"mean {tuple(mean)} std {tuple(std)}"


def say_stored_settings(path: Path, meta: dict, preset: Preset | None, cfg: ViTConfig, transform: Transform,
                        pool: str, given: dict, options: dict | None = None) -> list[str]:
    """What the ``<stem>.json`` beside the weights set (heads, norm, img size, pool: a DEBUG line, in tub.log
    and with -v; embed/explain record the file in encoder.json), and one WARNING naming each setting where it
    differs from an explicitly chosen preset's (the file's is used, except the head count: a preset fixes
    the architecture). ``given``: the user's own heads/norm/img_size/pool (None if not given), which the
    file did not set. Returns the DEBUG line's list (what the file set)."""
    opt = option_names(options)
    vit = meta.get("vit") or {}
    used = []
    if given["heads"] is None and vit.get("num_heads") == cfg.num_heads:
        used.append(f"heads {cfg.num_heads}")
    if given["norm"] is None and meta.get("mean"):
        used.append(f"norm {_norm_name(transform.mean, transform.std)}")
    if given["img_size"] is None and meta.get("img_size"):
        used.append(f"img size {transform.img_size}")
    if given["pool"] is None and meta.get("pool"):
        used.append(f"pool {pool}")
    if used:  # DEBUG, not INFO: the file is the one written with these weights, and a verb that then stops
        # on a usage error must print one line (its encoder.json names the file)
        log.debug("settings from %s: %s", path, ", ".join(used))
    if preset is None:
        return used
    differ = []
    if given["heads"] is None and vit.get("num_heads") not in (None, preset.num_heads) and preset.num_heads is not None:
        differ.append(f"heads {vit['num_heads']} (preset {preset.num_heads}; the preset's are used)")
    if given["norm"] is None and meta.get("mean") and (tuple(transform.mean), tuple(transform.std)) != \
            tuple(tuple(v) for v in preset.mean_std):
        differ.append(f"norm {_norm_name(transform.mean, transform.std)} (preset {preset.norm})")
    if given["img_size"] is None and meta.get("img_size") and transform.img_size != preset.img_size:
        differ.append(f"img size {transform.img_size} (preset {preset.img_size})")
    if given["pool"] is None and meta.get("pool") and pool != preset.pool:
        differ.append(f"pool {pool} (preset {preset.pool})")
    if differ:
        log.warning("%s beside the weights differs from preset %s: %s; its settings are used (give %s, %s or %s "
                    "to choose)", path, preset.name, ", ".join(differ), opt["norm"], opt["img_size"], opt["pool"])
    return used


def load_encoder(arch: str = "auto", weights: str | Path | None = None, pool: str | None = None,
                 heads: int | None = None, norm: str | None = None, img_size: int | None = None,
                 random_init: bool = False, seed: int = 0, device="cpu", dtype=None,
                 options: dict | None = None) -> tuple[Encoder, dict]:
    """Build an encoder; returns it (eval mode) and a description for ``config.yaml``.

    ``weights=None`` is only allowed with ``random_init=True`` and a preset that fixes all shapes
    (tests and demos): the result is a randomly initialised network and is reported as such. Errors
    name the caller's ``options`` (``checkpoint.OPTION_NAMES``: train's teacher has --teacher-weights …).
    """
    from .synthetic import preset_config, random_vit

    dtype = as_torch_dtype(dtype)  # the CLI's spellings ("bf16") and torch's names ("bfloat16") too
    opt = option_names(options)

    preset = None if arch in (None, "auto") else get_preset(arch)
    check_heads_option(heads, preset, options)  # also for random weights, whose heads are the preset's
    meta: dict = {}
    if weights is not None:
        cfg, sd, meta = read_checkpoint(weights, num_heads=heads, preset=preset, options=options)
        if preset is None and meta.get("preset"):
            from .presets import PRESETS

            preset = PRESETS.get(meta["preset"])
        vit = VisionTransformer(cfg)
        vit.load_state_dict(sd, strict=True)
        origin = str(weights)
    elif random_init:
        if preset is None:
            raise TubError(f"random initialisation needs a preset ({opt['arch']}), e.g. vit-t8-demo")
        try:
            cfg = preset_config(preset.name)
        except ValueError as exc:
            raise TubError(f"{exc}; give {opt['weights']}") from None
        vit = random_vit(cfg, seed=seed)
        origin = f"RANDOM INIT (seed {seed}) - not a pretrained model"
        log.warning("preset %s with random weights: embeddings are not meaningful features", preset.name)
    else:
        raise TubError(f"no weights given; pass {opt['weights']} FILE (tub never downloads weights), "
                       f"or {opt['random_init']} for a randomly initialised test model")
    if preset is not None and not preset.verified:
        log.warning("preset %s is unverified against published weights: %s", preset.name, preset.description)
    given = {"heads": heads, "norm": norm, "img_size": img_size, "pool": pool}
    pool = pool or meta.get("pool") or (preset.pool if preset else "cls")
    transform = transform_for(preset, meta, cfg, norm, img_size, options)
    settings = None
    if meta:
        mj = model_json_for(Path(weights))
        explicit = preset if arch not in (None, "auto") else None  # not one named by the file itself
        settings = {"file": str(mj),
                    "set": say_stored_settings(mj, meta, explicit, cfg, transform, pool, given, options)}
    enc = Encoder(vit, transform, pool).eval()
    enc.to(device=device, dtype=dtype) if dtype is not None else enc.to(device)
    info = {"arch": preset.name if preset else "auto", "weights": origin, "pool": pool, "dim": enc.dim,
            "vit": cfg.to_dict(), "transform": transform.to_dict(), "random_init": weights is None}
    if settings is not None:  # the <stem>.json beside the weights and what it set
        info["settings_file"] = settings
    return enc, info
