"""Throughput of tub's ViT, and of timm's on the same weights when timm is importable (spec §6.2).

All models run in one process on the same batch, **interleaved in rounds**: each round times every
model once (the order alternates between rounds so that none always runs first after a pause),
and the tub/timm ratio is taken per round. A shared machine slows whole rounds, not one model, so
the median of the per-round ratios (reported with its min and max) is far steadier than a ratio of
separately taken medians. Everything runs under ``inference_mode`` after one warm-up call.

Modes:

* ``tokens``: ``forward_features`` on both sides (all tokens, the same work; spec §6.2).
* ``cls``: the pooled CLS embedding as a user gets it: tub ``forward_cls`` (last block at the CLS
  position only, see ``inference.cls_token_only``) against timm ``model(x)`` with ``global_pool=
  "token"`` (full last block, then ``x[:, 0]``).

``reference=True`` also times tub's reference blocks (``fast_inference=False``) and the inference
path with aten's GEMMs (``gemm="aten"``, bit-identical to the reference) to show what each part of
``inference.py`` gains on the same machine in the same rounds.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from tubcli.errors import TubError

from .inference import use_onednn
from .synthetic import preset_config, random_vit, zero_k_bias

MODES = ("tokens", "cls")
# name -> (dtype, weights cast to it); without the cast the dtype is an autocast (weights stay fp32)
PRECISIONS = {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
              "bf16-weights": (torch.bfloat16, True), "fp16-weights": (torch.float16, True),
              "fp64": (torch.float64, True)}


def timm_twin(cfg):
    """A timm model with the same architecture as a tub ViTConfig (None without timm): its
    VisionTransformer, or for RoPE configs its ``Eva`` DINOv3 port (k bias fixed at zero there)."""
    try:
        from timm.layers import SwiGLUPacked
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except Exception:  # noqa: BLE001 - timm absent or its torchvision import failed
        return None
    if cfg.pos_layout == "rope":
        from functools import partial

        import inspect

        import timm
        from timm.layers import LayerNorm
        from timm.models.eva import Eva

        extra = {}
        if cfg.qk_norm:  # Eva takes qk_norm only from timm 1.0.30 on (its attention had it before)
            if "qk_norm" not in inspect.signature(Eva.__init__).parameters:
                raise RuntimeError(f"timm {timm.__version__}'s Eva has no qk_norm argument; comparing a q/k-norm "
                                   "RoPE ViT (RudolfV-2) needs timm>=1.0.30")
            extra["qk_norm"] = True
        return Eva(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                   num_heads=cfg.num_heads, num_reg_tokens=cfg.reg_tokens, qkv_bias=cfg.qkv_bias,
                   swiglu_mlp=cfg.mlp == "swiglu", mlp_ratio=cfg.mlp_hidden / cfg.embed_dim,
                   init_values=1e-5 if cfg.layer_scale else None, norm_layer=partial(LayerNorm, eps=cfg.norm_eps),
                   rope_type="dinov3", rope_temperature=cfg.rope_base, rope_rotate_half=True,
                   use_rot_pos_emb=True, use_abs_pos_emb=False, use_fc_norm=False, num_classes=0,
                   global_pool="token", dynamic_img_size=True, **extra)
    kw = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
              num_heads=cfg.num_heads, reg_tokens=cfg.reg_tokens, no_embed_class=cfg.pos_layout == "patches",
              init_values=1e-5 if cfg.layer_scale else None, qkv_bias=cfg.qkv_bias, num_classes=0,
              global_pool="token", dynamic_img_size=True)
    if cfg.mlp == "swiglu":
        kw.update(mlp_ratio=cfg.fc1_out / cfg.embed_dim, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    else:
        kw.update(mlp_ratio=cfg.mlp_hidden / cfg.embed_dim)
    return TimmViT(**kw)


def timm_state_dict(cfg, sd: dict) -> dict:
    """tub weights in the twin's names: identical for timm ViTs; for Eva ``gamma_1/2``, ``q_bias``/``v_bias``
    (the k bias must be zero: Eva fixes it) and no stored periods (Eva computes the same ones)."""
    if cfg.pos_layout != "rope":
        return sd
    out = {}
    for k, v in sd.items():
        if k == "rope_embed.periods":
            continue
        if k.endswith("attn.qkv.bias"):
            q, kb, vb = v.chunk(3)
            if kb.abs().max() > 0:
                raise ValueError("timm's Eva has no k bias; zero it before loading")
            out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, vb
            continue
        out[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the device timed, not the current one (cuda:1)


def _rounds(calls: dict, rounds: int, device) -> tuple[dict, dict]:
    """Warm up each call once, then ``rounds`` interleaved rounds; returns (outputs, seconds per call)."""
    outs, times = {}, {name: [] for name in calls}
    with torch.inference_mode():
        for name, fn in calls.items():
            outs[name] = fn()
        names = list(calls)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                _sync(device)
                t0 = time.perf_counter()
                fn = calls[name]
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return outs, times


def _ratio_stats(prefix: str, num: list, den: list) -> dict:
    """Per-round ratios den/num of times = tiles/s ratio of the ``num`` model over the ``den`` model."""
    ratios = [d / n for n, d in zip(num, den)]
    return {f"{prefix}": statistics.median(ratios), f"{prefix}_min": min(ratios), f"{prefix}_max": max(ratios)}


def time_models(arch: str = "vit-s8-reg8", depth: int | None = None, batch_size: int = 8, img_size: int = 224,
                threads: int | None = None, repeats: int = 5, compare_timm: bool = True, device="cpu",
                precision: str = "fp32", modes: tuple = ("tokens",), reference: bool = False, gemm: str = "auto",
                log=None) -> dict:
    """Tiles/s of tub (and timm, tub's reference blocks) on one preset; ``repeats`` = rounds."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    cfg = preset_config(arch, depth=depth)
    ours = random_vit(cfg, seed=0)
    ours.gemm = gemm
    if cfg.pos_layout == "rope":  # the twin (timm's Eva) fixes the k bias at zero
        zero_k_bias(ours)
    theirs = None
    if compare_timm:
        theirs = timm_twin(cfg)
        if theirs is None:
            if log:
                log.warning("timm is not importable here; timing tub only")
        else:
            theirs.load_state_dict(timm_state_dict(cfg, ours.state_dict()), strict=True)
            theirs = theirs.eval().to(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    dtype, cast_weights = PRECISIONS[precision]
    ours = ours.to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    if cast_weights:
        ours, x = ours.to(dtype), x.to(dtype)
        theirs = theirs.to(dtype) if theirs is not None else None
    autocast = bool(dtype) and not cast_weights
    if autocast and gemm == "onednn":  # inference.usable(): the oneDNN path is off under autocast
        from .inference import onednn_bf16

        raise TubError(f"--gemm onednn does not run under autocast (--precision {precision}); use --gemm auto or aten"
                       + (", or --precision bf16-weights (weights cast to bf16, run by oneDNN)" if onednn_bf16() else ""))
    try:
        onednn = use_onednn(gemm, x) and not autocast
    except ValueError as exc:  # --gemm onednn where oneDNN cannot run (fp16, fp64, not a CPU)
        raise TubError(str(exc)) from None
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if autocast else contextlib.nullcontext

    def call(fn):
        def run():
            with ctx():
                return fn(x)
        return run

    calls = {}
    if "tokens" in modes:
        calls["tub"] = call(ours.forward_features)
        if theirs is not None:
            calls["timm"] = call(theirs.forward_features)
        if reference:
            def ref(x_):
                ours.fast_inference = False
                try:
                    return ours.forward_features(x_)
                finally:
                    ours.fast_inference = True
            calls["tub_ref"] = call(ref)

            def aten(x_):
                ours.gemm = "aten"
                try:
                    return ours.forward_features(x_)
                finally:
                    ours.gemm = gemm
            calls["tub_aten"] = call(aten)
    if "cls" in modes:
        calls["cls_tub"] = call(ours.forward_cls)
        if theirs is not None:
            calls["cls_timm"] = call(theirs)
    outs, times = _rounds(calls, repeats, device)
    res = {"arch": arch, "depth": cfg.depth, "batch_size": batch_size, "img_size": img_size,
           "threads": torch.get_num_threads(), "device": str(device), "precision": precision,
           "rounds": repeats, "gemm": gemm,
           "gemm_used": "onednn" if onednn else "aten"}
    for name, ts in times.items():
        res[f"{name}_tiles_per_s"] = batch_size / statistics.median(ts)
    if "timm" in times:
        res.update(_ratio_stats("ratio_tub_over_timm", times["tub"], times["timm"]))
        res["max_abs_diff"] = float((outs["tub"].float() - outs["timm"].float()).abs().max())
    if "tub_ref" in times:
        res.update(_ratio_stats("ratio_tub_over_reference", times["tub"], times["tub_ref"]))
        res["max_abs_diff_reference"] = float((outs["tub"].float() - outs["tub_ref"].float()).abs().max())
        res.update(_ratio_stats("ratio_tub_aten_over_reference", times["tub_aten"], times["tub_ref"]))
        res["max_abs_diff_aten_reference"] = float((outs["tub_aten"].float() - outs["tub_ref"].float()).abs().max())
    if "cls_timm" in times:
        res.update(_ratio_stats("cls_ratio_tub_over_timm", times["cls_tub"], times["cls_timm"]))
        res["cls_max_abs_diff"] = float((outs["cls_tub"].float() - outs["cls_timm"].float()).abs().max())
    return res


def time_precisions(arch: str = "vit-s8-reg8", depth: int | None = None, batch_size: int = 8,
                    img_size: int = 224, threads: int | None = None, repeats: int = 3, device="cpu",
                    precisions=("fp32", "bf16", "bf16-weights")) -> dict:
    """tub at several precisions on the same weights and batch, interleaved in rounds: tiles/s and the
    relative L2 error of the tokens against fp32 (reduced precision is checked, not assumed)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    base = random_vit(preset_config(arch, depth=depth), seed=0).to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    calls = {}
    for p in precisions:
        dtype, cast_weights = PRECISIONS[p]
        if cast_weights:
            m = random_vit(base.cfg, seed=0).to(device=device, dtype=dtype)
            calls[p] = (lambda m=m, xx=x.to(dtype): m.forward_features(xx))
        elif dtype is not None:
            def run(dtype=dtype):
                with torch.autocast(device.type, dtype=dtype):
                    return base.forward_features(x)
            calls[p] = run
        else:
            calls[p] = (lambda: base.forward_features(x))
    outs, times = _rounds(calls, repeats, device)
    ref = outs[precisions[0]].float()
    res = {"arch": arch, "depth": base.cfg.depth, "batch_size": batch_size, "img_size": img_size,
           "threads": torch.get_num_threads(), "device": str(device), "rounds": repeats, "baseline": precisions[0]}
    for p in precisions:
        res[f"{p}_tiles_per_s"] = batch_size / statistics.median(times[p])
        res[f"{p}_rel_error"] = float((outs[p].float() - ref).norm() / ref.norm())
        res[f"{p}_speedup"] = statistics.median(b / a for a, b in zip(times[p], times[precisions[0]]))
    return res
