"""Throughput of tub's ViT, and of timm's on the same weights when timm is importable (spec §6.2).

Both models run in one process on the same tiles, interleaved (tub, timm, timm, tub, …) after a
warm-up, under ``inference_mode``; the median tiles/s of each is reported with the ratio.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .synthetic import preset_config, random_vit


def timm_twin(cfg):
    """A timm VisionTransformer with the same architecture as a tub ViTConfig (None without timm)."""
    try:
        from timm.layers import SwiGLUPacked
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except Exception:  # noqa: BLE001 - timm absent or its torchvision import failed
        return None
    kw = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
              num_heads=cfg.num_heads, reg_tokens=cfg.reg_tokens, no_embed_class=cfg.pos_layout == "patches",
              init_values=1e-5 if cfg.layer_scale else None, qkv_bias=cfg.qkv_bias, num_classes=0,
              dynamic_img_size=True)
    if cfg.mlp == "swiglu":
        kw.update(mlp_ratio=cfg.fc1_out / cfg.embed_dim, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    else:
        kw.update(mlp_ratio=cfg.mlp_hidden / cfg.embed_dim)
    return TimmViT(**kw)


def time_models(arch: str = "vit-s8-reg8", depth: int | None = None, batch_size: int = 8, img_size: int = 224,
                threads: int | None = None, repeats: int = 5, compare_timm: bool = True, device="cpu",
                precision: str = "fp32", log=None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    cfg = preset_config(arch, depth=depth)
    ours = random_vit(cfg, seed=0).to(device)
    models = {"tub": ours}
    if compare_timm:
        theirs = timm_twin(cfg)
        if theirs is None:
            if log:
                log.warning("timm is not importable here; timing tub only")
        else:
            theirs.load_state_dict(ours.state_dict(), strict=True)
            models["timm"] = theirs.eval().to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def once(model):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), ctx():
            y = model.forward_features(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, y

    outs = {name: once(m)[1] for name, m in models.items()}  # warm-up
    times = {name: [] for name in models}
    names = list(models)
    for i in range(repeats):  # interleaved, alternating order so neither model always runs first
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(once(models[name])[0])
    res = {"arch": arch, "depth": cfg.depth, "batch_size": batch_size, "img_size": img_size,
           "threads": torch.get_num_threads(), "device": str(device), "precision": precision,
           "repeats": repeats}
    for name, ts in times.items():
        res[f"{name}_tiles_per_s"] = batch_size / statistics.median(ts)
    if "timm" in models:
        res["ratio_tub_over_timm"] = res["tub_tiles_per_s"] / res["timm_tiles_per_s"]
        res["max_abs_diff"] = float((outs["tub"].float() - outs["timm"].float()).abs().max())
    return res
