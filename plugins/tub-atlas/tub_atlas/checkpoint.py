"""Reading ViT checkpoints, converting them to timm's key layout and inferring their architecture.

Spec §2.1 (key table and inference rules) and §2.6 (DINOv2 conversion), plus RoPE checkpoints in
DINOv3's layout (``storage_tokens``, ``rope_embed.periods``, ``w1/w2/w3`` SwiGLU, masked k bias) and
the register/q-k-norm layout RudolfV-2 is described with. Everything is decided from tensor shapes;
only the head count cannot be for learned-position ViTs (qkv is (3D, D) for any head count), so it
comes from a preset, the ``<stem>.json`` beside the weights (as ``convert`` and ``train`` write it),
``--heads``, or the width table. RoPE checkpoints give
it away: their period buffer has head_dim / 4 entries.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from tubcli.errors import TubError, first_line
from tubcli.io import check_torch_file, torch_load_weights, weights_only_reason

from .presets import HEADS_BY_WIDTH, NORMALISATIONS, Preset
from .vit import NORM_EPS, ViTConfig, VisionTransformer

WRAPPER_PREFIXES = ("module.", "backbone.", "teacher.", "student.", "_orig_mod.", "model.")
NESTED_KEYS = ("teacher", "student", "model", "state_dict", "model_state_dict")
BLOCK_KEYS = {
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "ls1.gamma", "ls2.gamma",
    "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
}
TOP_KEYS = {"cls_token", "reg_token", "pos_embed", "rope_embed.periods", "patch_embed.proj.weight",
            "patch_embed.proj.bias", "norm.weight", "norm.bias"}
DINOV3_NORM_EPS = 1e-5  # DINOv3's LayerNorms (timm's DINOv3 models use the same)
BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
# DINOv2/iBOT training heads (projection MLP + prototypes) of a teacher/student checkpoint: never part of
# the backbone, dropped with an INFO line
SSL_HEAD_PREFIXES = ("dino_head.", "ibot_head.")
# Hugging Face transformers ViT/Dinov2/DINOv3 names (embeddings.*, encoder.layer.N.*): no converter
HF_LAYOUT_RE = re.compile(r"(?:^|\.)(?:embeddings\.(?:cls_token|patch_embeddings|position_embeddings)|"
                          r"encoder\.layer\.\d+\.)")
log = logging.getLogger("tub.atlas")
# How a verb's user sets each encoder setting (embed, explain, inspect). A verb with other options
# passes its own (train's teacher: --teacher-arch, …) so that an error names options it has.
OPTION_NAMES = {"arch": "--arch", "weights": "--weights", "random_init": "--random-init", "heads": "--heads",
                "img_size": "--img-size", "norm": "--norm", "pool": "--pool", "arch_auto": True}


def option_names(options: dict | None = None) -> dict:
    """``OPTION_NAMES`` with a caller's own option names over them."""
    return {**OPTION_NAMES, **(options or {})}


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors`` or ``.pt/.pth/.bin`` (``weights_only``), nested dicts unwrapped."""
    path = Path(path)
    if path.is_dir():
        raise TubError(f"checkpoint {path} is a directory; pass the weights file (.safetensors/.pt) itself")
    if not path.is_file():
        raise TubError(f"checkpoint {path} does not exist; pass the path of a .safetensors/.pt file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            check_torch_file(path)
            obj = torch_load_weights(path)
    except TubError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        if "Weights only load failed" in str(exc):  # a pickled object (torch.save(model)), not tensors
            raise TubError(f"{path} cannot be loaded safely: {weights_only_reason(exc)}; save the weights instead: "
                           "torch.save(model.state_dict(), 'w.pt') or safetensors") from exc
        raise TubError(f"cannot read checkpoint {path}: {first_line(exc)[:200]}") from exc
    # unwrap {"teacher": {...}}, {"model": {...}}, {"state_dict": {...}}
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in NESTED_KEYS if isinstance(obj.get(k), dict)]
        if not nested:
            raise TubError(f"{path} holds no tensors at its top level (keys {sorted(obj)[:8]}); "
                           "pass the weights file itself")
        obj = obj[nested[0]]
    if not isinstance(obj, dict):
        raise TubError(f"{path} is not a state dict; save model.state_dict(), never a pickled model")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    check_finite(tensors, path)
    return tensors


def check_finite(sd: dict[str, torch.Tensor], path) -> None:
    """NaN or inf in any floating-point tensor is a one-line error naming the first (in key order) and how
    many others have them: such weights give NaN embeddings for every tile. DINOv3's ``qkv.bias_mask``
    is left to :func:`convert_rope`, which says what an all-NaN one means."""
    def finite(t: torch.Tensor) -> torch.Tensor:
        if t.dtype.itemsize == 1:  # float8: no isfinite kernel for every format; judged in float16
            t = t.to(torch.float16)
        return torch.isfinite(t)

    bad = [k for k in sorted(sd) if sd[k].is_floating_point() and not k.endswith("bias_mask")
           and not bool(finite(sd[k]).all())]
    if bad:
        t = sd[bad[0]]
        n = int((~finite(t)).sum())
        more = f"; {len(bad) - 1} more tensors too" if len(bad) > 1 else ""
        raise TubError(f"{path}: tensor {bad[0]} holds NaN or inf ({n} of {t.numel()} values){more}; the "
                       "checkpoint is damaged or was saved after training diverged: use another one")


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.``/``backbone.``/``teacher.`` prefixes and flatten ``blocks.{c}.{i}.``."""
    out = {}
    for key, val in sd.items():
        changed = True
        while changed:
            changed = False
            for pre in WRAPPER_PREFIXES:
                if key.startswith(pre):
                    key, changed = key[len(pre):], True
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        if key in out:
            raise TubError(f"key {key!r} occurs twice after removing wrapper prefixes; check the checkpoint")
        out[key] = val
    return out


def is_dinov2(sd: dict[str, torch.Tensor]) -> bool:
    return "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd)


def convert_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 layout -> timm layout (spec §2.6); exact, no numerical change except the CLS fold.

    With registers, DINOv2 adds positions to [CLS, patches] before inserting registers, so
    cls_token + pos_embed[:, 0] and a patches-only table reproduce it exactly.
    """
    sd = dict(sd)
    sd.pop("mask_token", None)
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        pos = sd["pos_embed"]
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:].contiguous()
    out = {}
    for key, val in sd.items():
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = val
    return out


def is_rope(sd: dict[str, torch.Tensor]) -> bool:
    """No learned position table but a RoPE period buffer (DINOv3, RudolfV-2)."""
    return "pos_embed" not in sd and any(k.endswith("periods") for k in sd)


def detect_layout(sd: dict[str, torch.Tensor], source: str = "auto") -> str:
    """timm | dinov2 | dinov3 (RoPE layouts) of a wrapper-stripped state dict."""
    if source != "auto":
        return source
    if is_rope(sd):
        return "dinov3"
    return "dinov2" if is_dinov2(sd) else "timm"


def native_norm_eps(sd: dict[str, torch.Tensor]) -> float | None:
    """The LayerNorm eps a layout implies where shapes cannot tell: DINOv3 (``storage_tokens``) 1e-5."""
    return DINOV3_NORM_EPS if "storage_tokens" in strip_wrappers(sd) else None


def convert_rope(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv3-style RoPE layout -> tub's (timm names + ``rope_embed.periods`` + q/k norms); exact.

    ``storage_tokens``/``register_tokens`` -> ``reg_token``; the period buffer (one, or one per
    block if all equal) -> ``rope_embed.periods``; a ``qkv.bias_mask`` (DINOv3's masked k bias)
    multiplied into the bias; SwiGLU ``w1, w2, w3`` (silu(w1 x) * w2 x) and ``w12, w3`` -> packed
    gate-first ``fc1, fc2``; the pretraining-only ``mask_token`` and ``local_cls_norm`` dropped.
    """
    sd = dict(sd)
    for k in ("mask_token", "local_cls_norm.weight", "local_cls_norm.bias"):
        sd.pop(k, None)
    for name in ("storage_tokens", "register_tokens"):
        if name in sd:
            sd["reg_token"] = sd.pop(name)
    periods = {k: sd.pop(k) for k in [k for k in sd if k.endswith("periods")]}
    first = next(iter(periods.values()))
    if first.ndim != 1 or any(v.shape != first.shape or not torch.equal(v, first) for v in periods.values()):
        raise TubError(f"RoPE period buffers {sorted(periods)} differ or are not 1-D; cannot convert")
    sd["rope_embed.periods"] = first.float()
    out = {}
    for key, val in sd.items():
        if key.endswith("attn.qkv.bias_mask"):
            continue
        if key.endswith("attn.qkv.bias") and key + "_mask" in sd:
            mask = sd[key + "_mask"]
            if torch.isnan(mask).any():
                raise TubError(f"{key}_mask is uninitialised (NaN); the checkpoint was saved before training")
            val = val * mask.to(val.dtype)
        m = re.match(r"^(blocks\.\d+\.mlp\.)w([123])\.(weight|bias)$", key)
        if m:
            pre, which, kind = m.groups()
            if which == "1":
                if f"{pre}w2.{kind}" not in sd:
                    raise TubError(f"{key} has no {pre}w2.{kind} beside it; a SwiGLU needs w1, w2 and w3")
                out[f"{pre}fc1.{kind}"] = torch.cat([val, sd[f"{pre}w2.{kind}"]], dim=0)
            elif which == "3":
                out[f"{pre}fc2.{kind}"] = val
            continue
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = val
    return out


def refuse_hf_layout(sd: dict[str, torch.Tensor]) -> None:
    """Hugging Face ``transformers`` key names (``embeddings.patch_embeddings``, ``encoder.layer.N``) are a
    one-line error: tub reads timm, DINOv2 and DINOv3 layouts and has no converter for this one."""
    hf = sorted(k for k in sd if HF_LAYOUT_RE.search(k))
    if hf:
        raise TubError(f"checkpoint is in the Hugging Face transformers layout ({', '.join(hf[:2])}, …), which tub "
                       "does not read and has no converter for (neither embed nor convert): save the backbone in "
                       "timm's layout (timm's ViT/DINOv2 models) or the original DINOv2/DINOv3 layout")


def drop_ssl_heads(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DINOv2 training checkpoint's ``dino_head.*``/``ibot_head.*`` removed, with an INFO line."""
    heads = sorted(k for k in sd if k.startswith(SSL_HEAD_PREFIXES))
    if not heads:
        return sd
    kinds = sorted({k.split(".", 1)[0] for k in heads})
    log.info("dropped the DINOv2 self-supervision heads (%s: %d tensors); they are not part of the backbone",
             ", ".join(f"{k}.*" for k in kinds), len(heads))
    return {k: v for k, v in sd.items() if not k.startswith(SSL_HEAD_PREFIXES)}


def to_timm_layout(sd: dict[str, torch.Tensor], source: str = "auto") -> dict[str, torch.Tensor]:
    """Wrapper prefixes stripped, DINOv2 or DINOv3/RoPE converted (``source`` auto|dinov2|dinov3|timm),
    head and DINOv2 training heads (``dino_head.*``, ``ibot_head.*``, logged) dropped; a Hugging Face
    transformers layout is an error."""
    sd = strip_wrappers(sd)
    refuse_hf_layout(sd)
    sd = drop_ssl_heads(sd)
    layout = detect_layout(sd, source)
    if layout == "dinov3":
        if not is_rope(sd):
            raise TubError("not a RoPE checkpoint (it has pos_embed or no RoPE period buffer); use --from auto")
        sd = convert_rope(sd)
    elif layout == "dinov2":
        if "cls_token" in sd and "pos_embed" not in sd:
            raise TubError("checkpoint has neither a position table (pos_embed) nor a RoPE period buffer "
                           "(*.periods), so its position encoding is computed in code tub cannot read; add the "
                           "RoPE periods as 'rope_embed.periods' (head_dim/4 values) or convert it with its own code")
        if "pos_embed" not in sd or "cls_token" not in sd:
            raise TubError("DINOv2 checkpoint lacks cls_token/pos_embed; is this a DINOv2 ViT?")
        sd = convert_dinov2(sd)
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def _square(n: int) -> int | None:
    r = int(round(math.sqrt(n)))
    return r if r * r == n else None


def infer_config(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                 norm_eps: float | None = None, options: dict | None = None,
                 converting: bool = False) -> ViTConfig:
    """Architecture from shapes (spec §2.1 inference rules); unknown keys and bad shapes are errors
    (naming the caller's ``options``, see ``OPTION_NAMES``; ``converting``: called by ``convert``, whose
    errors must not send the user to ``convert``)."""
    heads_opt = option_names(options)["heads"]

    def known(key: str) -> bool:
        m = BLOCK_RE.match(key)
        return key in TOP_KEYS or (m is not None and m.group(2) in BLOCK_KEYS)

    unknown = sorted(k for k in sd if not known(k))
    if unknown:
        shown = ", ".join(unknown[:12]) + (f" … (+{len(unknown) - 12})" if len(unknown) > 12 else "")
        fix = "tub atlas convert cannot map them either (it reads timm, DINOv2 and DINOv3 layouts): remove " \
            "them from the state dict if they are not part of the backbone" if converting else \
            "convert it (tub atlas convert --from dinov2|dinov3) or remove them"
        raise TubError(f"checkpoint has keys the timm ViT layout does not know: {shown}; {fix}")
    rope = "pos_embed" not in sd and "rope_embed.periods" in sd
    for req in ("cls_token", "patch_embed.proj.weight", "norm.weight") + (() if rope else ("pos_embed",)):
        if req not in sd:
            raise TubError(f"checkpoint lacks {req!r}; is this a ViT in timm, DINOv2 or DINOv3 layout?")
    D = sd["cls_token"].shape[-1]
    pe = sd["patch_embed.proj.weight"]
    if pe.ndim != 4 or pe.shape[0] != D or pe.shape[1] != 3 or pe.shape[2] != pe.shape[3]:
        raise TubError(f"patch_embed.proj.weight has shape {tuple(pe.shape)}, expected ({D}, 3, P, P)")
    P = pe.shape[-1]
    R = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    rope_base = 100.0
    if rope:
        periods = sd["rope_embed.periods"]
        head_dim = 4 * periods.shape[0]
        if periods.ndim != 1 or D % head_dim:
            raise TubError(f"rope_embed.periods has shape {tuple(periods.shape)}: width {D} is not a multiple "
                           f"of the head width 4 x {periods.shape[0]}")
        if num_heads is not None and num_heads != D // head_dim:
            raise TubError(f"{num_heads} heads contradict the RoPE periods (head width {head_dim}, "
                           f"{D // head_dim} heads)")
        num_heads = D // head_dim
        if periods.shape[0] > 1:  # p_m = base^(4m/d): the base of a fresh model of this config
            rope_base = float(f"{float(periods[1]) ** (head_dim / 4):.6g}")  # fp32 periods: 6 digits
        layout, g = "rope", max(1, 224 // P)  # native grid: no table to read it from; 224 px
    else:
        L = sd["pos_embed"].shape[1]
        if sd["pos_embed"].shape[-1] != D:
            raise TubError(f"pos_embed width {sd['pos_embed'].shape[-1]} differs from cls_token width {D}")
        if _square(L):
            layout, g = "patches", _square(L)
        elif L > 1 + R and _square(L - 1 - R):
            layout, g = "prefix", _square(L - 1 - R)
        else:
            raise TubError(f"pos_embed has {L} positions: neither a square patch grid nor 1 + {R} + square")
    idx = sorted({int(BLOCK_RE.match(k).group(1)) for k in sd if k.startswith("blocks.")})
    if not idx:
        raise TubError("checkpoint has no transformer blocks (blocks.N.*)")
    depth = idx[-1] + 1
    if idx != list(range(depth)):
        missing = sorted(set(range(depth)) - set(idx))
        raise TubError(f"blocks {missing} are missing (found up to blocks.{depth - 1}); truncated checkpoint?")
    b0 = {k[len("blocks.0."):] for k in sd if k.startswith("blocks.0.")}
    h1 = sd["blocks.0.mlp.fc1.weight"].shape[0] if "mlp.fc1.weight" in b0 else None
    h2 = sd["blocks.0.mlp.fc2.weight"].shape[1] if "mlp.fc2.weight" in b0 else None
    if h1 is None or h2 is None:
        raise TubError("blocks.0 lacks mlp.fc1/fc2 weights")
    if h1 == 2 * h2:
        mlp = "swiglu"
    elif h1 == h2:
        mlp = "gelu"
    else:
        raise TubError(f"MLP widths fc1 {h1} / fc2 {h2} are neither equal (GELU) nor 2:1 (packed SwiGLU)")
    if num_heads is None:
        num_heads = HEADS_BY_WIDTH.get(D)
        if num_heads is None:
            raise TubError(f"cannot infer the head count for width {D}; give {heads_opt} or a model.json")
    if num_heads < 1 or D % num_heads:
        raise TubError(f"{num_heads} attention heads (from {heads_opt}, model.json or the preset) do not divide "
                       f"the width {D}; give {heads_opt} with a divisor of {D}")
    cfg = ViTConfig(patch_size=P, embed_dim=D, depth=depth, num_heads=num_heads, reg_tokens=R,
                    pos_layout=layout, pos_grid=g, mlp=mlp, mlp_hidden=h2,
                    layer_scale="ls1.gamma" in b0, qkv_bias="attn.qkv.bias" in b0,
                    qk_norm="attn.q_norm.weight" in b0, rope_base=rope_base,
                    norm_eps=norm_eps if norm_eps is not None else NORM_EPS)
    check_shapes(sd, cfg)
    return cfg


def expected_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape a model of ``cfg`` has (timm layout)."""
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(sd: dict[str, torch.Tensor], cfg: ViTConfig) -> None:
    exp = expected_shapes(cfg)
    missing = sorted(set(exp) - set(sd))
    extra = sorted(set(sd) - set(exp))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:8])}" + (" …" if len(missing) > 8 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:8])}" + (" …" if len(extra) > 8 else ""))
        raise TubError(f"checkpoint keys are inconsistent across blocks: {'; '.join(parts)}")
    bad = [f"{k} {tuple(sd[k].shape)} (expected {exp[k]})" for k in exp if tuple(sd[k].shape) != exp[k]]
    if bad:
        raise TubError(f"inconsistent tensor shapes: {'; '.join(bad[:4])}" + (" …" if len(bad) > 4 else ""))


def apply_preset(cfg: ViTConfig, preset: Preset, options: dict | None = None) -> ViTConfig:
    """Check inferred shapes against a preset; take the head count from it.

    Width, patch, registers, layout and MLP must match; a different depth is only logged (shallow
    copies of a preset are what tests and quick experiments use).
    """
    if preset.depth is not None and cfg.depth != preset.depth:
        log.warning("checkpoint has %d blocks, preset %s has %d; using %d", cfg.depth, preset.name, preset.depth,
                    cfg.depth)
    checks = {"patch_size": preset.patch_size, "embed_dim": preset.embed_dim,
              "reg_tokens": preset.reg_tokens, "pos_layout": preset.pos_layout, "mlp": preset.mlp,
              "mlp_hidden": preset.mlp_hidden, "layer_scale": preset.layer_scale,
              "qk_norm": preset.qk_norm if preset.pos_layout == "rope" else None}
    diffs = [f"{k} {getattr(cfg, k)} (preset {v})" for k, v in checks.items()
             if v is not None and getattr(cfg, k) != v]
    if diffs:
        opt = option_names(options)
        fix = f"{opt['arch']} auto or the right preset" if opt["arch_auto"] else f"the right {opt['arch']}"
        raise TubError(f"checkpoint does not match preset {preset.name}: {', '.join(diffs)}; use {fix}")
    if preset.num_heads is not None:
        cfg.num_heads = preset.num_heads
    return cfg


def check_heads_option(heads: int | None, preset: Preset | None, options: dict | None = None) -> None:
    """A head count given by the user (``--heads``) that contradicts the preset's is a usage error naming
    both: the preset's count would otherwise be used silently."""
    if heads is not None and preset is not None and preset.num_heads is not None and heads != preset.num_heads:
        opt = option_names(options)
        raise TubError(f"{opt['heads']} {heads} contradicts preset {preset.name}, which has {preset.num_heads} heads; "
                       f"drop {opt['heads']} or choose another {opt['arch']}")


def model_json_for(weights: Path) -> Path | None:
    """``<stem>.json`` next to the weights (what ``convert`` and ``train`` write), if present. A generic
    ``model.json`` beside weights of another name is not read: a folder may hold several models."""
    cand = Path(weights).with_suffix(".json")
    return cand if cand.is_file() else None


def read_model_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TubError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or "vit" not in meta:
        raise TubError(f"{path} is not a tub-atlas model.json (no 'vit' section)")
    return meta


def model_json(cfg: ViTConfig, norm: str | None = None, pool: str = "cls", img_size: int | None = None,
               preset: str | None = None, source: str = "") -> dict:
    """The JSON written next to converted or trained weights (spec §2.6 step 4)."""
    mean, std = NORMALISATIONS[norm] if norm else (None, None)
    return {
        "format": "tub-atlas/vit-timm-layout/1",
        "preset": preset,
        "vit": cfg.to_dict(),
        "norm": norm, "mean": mean, "std": std,
        "img_size": img_size or cfg.img_size,
        "pool": pool,
        "params": cfg.num_params(),
        "source": source,
    }


def describe(cfg: ViTConfig) -> dict:
    """What ``inspect`` reports."""
    return {
        "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim, "depth": cfg.depth,
        "num_heads": cfg.num_heads, "head_dim": cfg.embed_dim // cfg.num_heads,
        "reg_tokens": cfg.reg_tokens, "pos_layout": cfg.pos_layout,
        "pos_grid": f"{cfg.pos_grid}x{cfg.pos_grid}", "native_img_size": cfg.img_size,
        "mlp": cfg.mlp, "fc1_out": cfg.fc1_out, "mlp_hidden": cfg.mlp_hidden,
        "layer_scale": cfg.layer_scale, "qkv_bias": cfg.qkv_bias, "qk_norm": cfg.qk_norm,
        "norm_eps": cfg.norm_eps, "params": cfg.num_params(),
    }


def stored_settings(path: Path, raw: dict, num_heads: int | None = None) -> tuple[int | None, float, dict]:
    """(heads, LayerNorm eps, model.json or {}) for a checkpoint: ``num_heads`` if given, else the
    model.json beside it; its eps, else the one the checkpoint's native format implies."""
    meta, eps = {}, native_norm_eps(raw)
    mj = model_json_for(Path(path))
    if mj is not None:
        meta = read_model_json(mj)
        if num_heads is None:
            num_heads = meta["vit"].get("num_heads")
        eps = meta["vit"].get("norm_eps", eps)
    return num_heads, eps, meta


def read_checkpoint(path: str | Path, source: str = "auto", num_heads: int | None = None,
                    preset: Preset | None = None,
                    options: dict | None = None) -> tuple[ViTConfig, dict[str, torch.Tensor], dict]:
    """Load, convert to timm layout and infer; returns (config, state dict, model.json or {}). Errors
    name the caller's ``options`` (see ``OPTION_NAMES``)."""
    path = Path(path)
    check_heads_option(num_heads, preset, options)
    raw = load_tensors(path)
    sd = to_timm_layout(raw, source)
    num_heads, eps, meta = stored_settings(path, raw, num_heads)
    if num_heads is None and preset is not None:
        num_heads = preset.num_heads
    cfg = infer_config(sd, num_heads, eps, options)
    if preset is not None:
        cfg = apply_preset(cfg, preset, options)
    return cfg, sd, meta


def build_model(cfg: ViTConfig, sd: dict[str, torch.Tensor] | None = None) -> VisionTransformer:
    model = VisionTransformer(cfg)
    if sd is not None:
        check_shapes(sd, cfg)
        model.load_state_dict(sd, strict=True)
    return model.eval()


def save_weights(path: Path, sd: dict[str, torch.Tensor], meta: dict) -> None:
    """safetensors + ``model.json`` beside it, both written atomically."""
    from safetensors.torch import save_file

    from tubcli.io import atomic_path, write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # one metadata key: safetensors writes several in a random order, and identical runs should
        # give identical files (model.json beside it says what made them)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                  metadata={"config": json.dumps(meta["vit"], sort_keys=True)})
    write_json(path.with_suffix(".json"), meta)
