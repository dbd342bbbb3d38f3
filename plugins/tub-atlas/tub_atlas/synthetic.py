"""Small generated data for tests and the demo: preset-shaped random ViTs, fake DINOv2 checkpoints
and labelled synthetic tissue tiles (spec §5). Nothing here pretends to be a pretrained model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from tubcli.errors import TubError

from .presets import PRESETS
from .vit import ViTConfig, VisionTransformer


def preset_config(name: str, depth: int | None = None, **overrides) -> ViTConfig:
    """The ViTConfig of a fully specified preset, optionally shallower (tests use depth 1-2)."""
    p = PRESETS[name]
    if None in (p.patch_size, p.embed_dim, p.num_heads, p.reg_tokens, p.pos_layout, p.mlp, p.mlp_hidden):
        fixed = [n for n, q in PRESETS.items() if None not in (q.patch_size, q.embed_dim, q.num_heads, q.reg_tokens,
                                                               q.pos_layout, q.mlp, q.mlp_hidden)]
        raise TubError(f"preset {name} does not fix its shapes (they come from its checkpoint), so no random model "
                       f"can be made of it; use one of {', '.join(fixed)}")
    cfg = dict(patch_size=p.patch_size, embed_dim=p.embed_dim, depth=depth or p.depth, num_heads=p.num_heads,
               reg_tokens=p.reg_tokens, pos_layout=p.pos_layout, pos_grid=p.img_size // p.patch_size,
               mlp=p.mlp, mlp_hidden=p.mlp_hidden, layer_scale=bool(p.layer_scale), qk_norm=p.qk_norm)
    cfg.update(overrides)
    return ViTConfig(**cfg)


def random_vit(cfg: ViTConfig, seed: int = 0, std: float = 0.02) -> VisionTransformer:
    g = torch.Generator().manual_seed(seed)
    return VisionTransformer(cfg).init_random(std, g).eval()


def to_dinov2(sd: dict[str, torch.Tensor], prefix: str = "teacher.backbone.", chunks: int = 2) -> dict:
    """Rewrite a timm-layout state dict as a DINOv2 checkpoint (inverse of spec §2.6).

    Registers: ``register_tokens``, and the CLS position folded back out (pos_embed gets a CLS row
    equal to a random vector, cls_token reduced by it). SwiGLU ``fc1/fc2`` -> ``w12/w3``. Blocks
    chunked as ``blocks.{c}.{i}`` with global indices, a ``mask_token`` added, keys prefixed.
    """
    sd = {k: v.clone() for k, v in sd.items()}
    D = sd["cls_token"].shape[-1]
    if "reg_token" in sd:
        if sd["pos_embed"].shape[1] != int(math.isqrt(sd["pos_embed"].shape[1])) ** 2:
            raise ValueError("DINOv2 registers need a patches-only position table")
        cls_pos = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(7)) * 0.02
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
    sd["mask_token"] = torch.zeros(1, D)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per = math.ceil(depth / chunks)
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            rest = k.split(".", 2)[2]
            if ".w12." not in rest and sd.get(f"blocks.{i}.mlp.fc1.weight") is not None and \
                    sd[f"blocks.{i}.mlp.fc1.weight"].shape[0] == 2 * sd[f"blocks.{i}.mlp.fc2.weight"].shape[1]:
                rest = rest.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
            k = f"blocks.{i // per}.{i}.{rest}"
        out[prefix + k] = v
    return out


def zero_k_bias(model: VisionTransformer) -> VisionTransformer:
    """Zero the k third of every qkv bias (DINOv3 masks it; timm's Eva has none), in place."""
    with torch.no_grad():
        for blk in model.blocks:
            if blk.attn.qkv.bias is not None:
                D = blk.attn.qkv.bias.shape[0] // 3
                blk.attn.qkv.bias[D:2 * D] = 0
    return model


def to_dinov3(sd: dict[str, torch.Tensor], k_bias_seed: int | None = 3) -> dict:
    """Rewrite a RoPE model's state dict as a DINOv3 checkpoint (inverse of ``convert_rope``).

    ``reg_token`` -> ``storage_tokens``; packed SwiGLU ``fc1`` -> ``w1, w2`` (gate, value) and
    ``fc2`` -> ``w3``; a ``mask_token``; with ``k_bias_seed`` the k third of every qkv bias is
    overwritten by noise and a ``bias_mask`` (1, 0, 1) that cancels it is added, as DINOv3 stores
    its masked k bias. The model must have a zero k bias (``zero_k_bias``) for the outputs to agree.
    """
    out = {}
    g = torch.Generator().manual_seed(k_bias_seed or 0)
    for k, v in sd.items():
        v = v.clone()
        if k == "reg_token":
            k = "storage_tokens"
        m = re.match(r"^(blocks\.\d+\.mlp\.)fc([12])\.(weight|bias)$", k)
        if m and sd[f"{m.group(1)}fc1.weight"].shape[0] == 2 * sd[f"{m.group(1)}fc2.weight"].shape[1]:
            pre, which, kind = m.groups()
            if which == "1":
                gate, value = v.chunk(2, dim=0)
                out[f"{pre}w1.{kind}"], out[f"{pre}w2.{kind}"] = gate, value
            else:
                out[f"{pre}w3.{kind}"] = v
            continue
        if k.endswith("attn.qkv.bias") and k_bias_seed is not None:
            n = v.shape[0] // 3
            if v[n:2 * n].abs().max() > 0:
                raise ValueError("DINOv3 masks the k bias: zero it in the model first")
            v[n:2 * n] = torch.randn(n, generator=g)
            mask = torch.ones_like(v)
            mask[n:2 * n] = 0
            out[k + "_mask"] = mask
        out[k] = v
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


# ---------------------------------------------------------------- synthetic tiles
def _texture(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A class-specific concentration pattern in [0, 1]: stripes / blobs / checker / noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    freq = 3 + rng.uniform(-0.5, 0.5)
    kind = cls % 4
    if kind == 0:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * xx + phase)
    elif kind == 1:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.03)
    elif kind == 2:
        t = ((np.floor(xx * 2 * freq) + np.floor(yy * 2 * freq)) % 2).astype(float)
    else:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + yy) + phase) * np.sin(2 * np.pi * freq * yy)
    return np.clip(t + 0.1 * rng.standard_normal((size, size)), 0, 1)


def synthetic_tiles(n_per_class: int = 16, n_classes: int = 2, n_centers: int = 2, size: int = 64,
                    seed: int = 0, slides_per_cell: int = 4) -> dict:
    """Labelled RGB tiles: Beer-Lambert I = 240·exp(-S_center·c) with class textures (H&E-like).

    Returns uint8 ``tiles`` (N, size, size, 3) and string arrays ``label``, ``center``, ``slide_id``,
    ``patch_id`` (the PathoROB metadata columns).
    """
    rng = np.random.default_rng(seed)
    base = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # H, E optical densities (RGB rows)
    tiles, label, center, slide, patch = [], [], [], [], []
    for c in range(n_centers):
        stain = base * (1 + 0.25 * rng.standard_normal(base.shape))
        for k in range(n_classes):
            for i in range(n_per_class):
                h = _texture(k, size, rng)
                e = _texture(k + 1, size, rng) * 0.6 + 0.2
                od = np.einsum("cs,syx->yxc", np.abs(stain), np.stack([h, e]) * 1.2)
                img = np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)
                tiles.append(img)
                label.append(f"class{k}")
                center.append(f"center{c}")
                s = i % slides_per_cell
                slide.append(f"c{c}-k{k}-s{s}")
                patch.append(f"p{i:04d}")
    return {"tiles": np.stack(tiles), "label": np.array(label), "center": np.array(center),
            "slide_id": np.array(slide), "patch_id": np.array(patch)}


def write_tile_folder(root: Path, data: dict, image_folder: bool = True, fmt: str = "png") -> list[Path]:
    """Write tiles as PNG/JPEG: ImageFolder ``root/<label>/<slide>_<patch>.png`` or flat."""
    from PIL import Image

    root = Path(root)
    paths = []
    for img, lab, sl, pa in zip(data["tiles"], data["label"], data["slide_id"], data["patch_id"]):
        folder = root / lab if image_folder else root
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"{sl}_{pa}.{fmt}"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def write_pathorob_layout(root: Path, data: dict) -> Path:
    """Images ``root/images/{slide_id}/{patch_id}.png`` + PathoROB metadata CSV; returns the CSV."""
    import csv

    from PIL import Image

    root = Path(root)
    img_root = root / "images"
    rows = []
    for img, lab, cen, sl, pa in zip(data["tiles"], data["label"], data["center"], data["slide_id"],
                                      data["patch_id"]):
        (img_root / sl).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(img_root / sl / f"{pa}.png")
        rows.append({"subset": "ID", "slide_id": sl, "patch_id": pa, "biological_class": lab,
                     "medical_center": cen})
    csv_path = root / "metadata.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return csv_path


def patch_insert_task(n: int, size: int = 32, patch_size: int = 8, seed: int = 0) -> dict:
    """A majority task whose evidence patches are known (for explanation faithfulness tests).

    Each tile is a synthetic H&E background (``synthetic_tiles``) with whole patches replaced by
    one of two textures of the same colours and mean: a fine checker (evidence for class 1) or the
    same checker at twice the scale (evidence for class 0). A tile holds 1–4 of each, never equally
    many; label 1 iff fine patches are the majority. A class-agnostic map (attention rollout) can
    point at both kinds; a faithful explanation of the class-1 logit ranks the fine ones first.
    ``mask`` (n, g, g) marks the fine patches. Returns uint8 ``tiles`` (n, size, size, 3), int
    ``label`` (n,) and bool ``mask``.
    """
    rng = np.random.default_rng(seed)
    g, P = size // patch_size, patch_size
    back = synthetic_tiles(n_per_class=(n + 1) // 2, n_classes=2, n_centers=1, size=size, seed=seed)["tiles"]
    yy, xx = np.mgrid[0:P, 0:P]
    fine = ((yy // 2 + xx // 2) % 2).astype(float)
    coarse = ((yy // 4 + xx // 4) % 2).astype(float)
    dark, light = np.array([90.0, 40.0, 120.0]), np.array([230.0, 170.0, 220.0])
    tiles, labels, masks = [], [], []
    order = rng.permutation(len(back))[:n]
    for i, j in enumerate(order):
        img = back[j].astype(float).copy()
        label = i % 2
        while True:
            n_f, n_c = (int(v) for v in rng.integers(1, 5, 2))
            if n_f != n_c and (n_f > n_c) == bool(label) and n_f + n_c <= g * g:
                break
        cells = rng.permutation(g * g)
        mask = np.zeros((g, g), bool)
        for c, is_fine in zip(cells[:n_f + n_c], [True] * n_f + [False] * n_c):
            r, q = divmod(int(c), g)
            tex = (fine if is_fine else coarse)[..., None]
            noise = 8 * rng.standard_normal((P, P, 3))
            img[r * P:(r + 1) * P, q * P:(q + 1) * P] = dark * tex + light * (1 - tex) + noise
            mask[r, q] = is_fine
        tiles.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(label)
        masks.append(mask)
    return {"tiles": np.stack(tiles), "label": np.array(labels), "mask": np.stack(masks)}
