"""A timm-compatible Vision Transformer written from scratch (no timm, no torchvision).

The parameter names follow timm's ``VisionTransformer`` key layout (spec §2.1) so that the
pathology foundation models in that layout (UNI2-h, Virchow2, H-optimus-0/1, converted DINOv2
checkpoints) load with ``load_state_dict(strict=True)``. The forward pass is spec §2.2:
Dosovitskiy et al., *An Image is Worth 16x16 Words*, ICLR 2021 (arXiv 2010.11929), with register
tokens (Darcet et al., arXiv 2309.16588), LayerScale (Touvron et al., CaiT, arXiv 2103.17239) and
packed SwiGLU MLPs (Shazeer, arXiv 2002.05202) as used by DINOv2-derived pathology models.
``pos_layout="rope"`` replaces the learned position table by DINOv3's 2-D rotary embedding
(Siméoni et al., arXiv 2508.10104; Su et al., RoFormer, arXiv 2104.09864) applied to queries and
keys of the patch tokens, optionally after a per-head LayerNorm of q and k (``qk_norm``; Dehghani
et al., ViT-22B, arXiv 2302.05442): the layout of DINOv3 and (assumed) RudolfV-2.

Two switches serve the explanation methods and are off by default:

* ``keep_attention``: blocks compute attention explicitly and keep the softmax probabilities
  (attention rollout needs them; the default path uses fused ``scaled_dot_product_attention``).
* ``lrp``: conservative-LRP forward rules (Ali et al., ICML 2022, arXiv 2202.07304): attention
  probabilities detached, LayerNorm's 1/σ detached, element-wise activations by the identity rule
  and the SwiGLU product by the uniform rule (spec §2.9). The forward value is unchanged; only the
  gradient graph becomes a linear map so that input x gradient conserves the output.
  ``lrp = "attn"`` selects AttnLRP instead (Achtibat et al., ICML 2024, arXiv 2402.05602): the same
  LayerNorm, activation and SwiGLU rules, but relevance flows *through* the attention: the softmax
  rule (Prop. 3.1) and the uniform ε-rule for the q·kᵀ and attention·value matmuls (Prop. 3.3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .inference import Workspace, cls_token_only, forward_tokens, onednn_linear, usable, use_onednn

NORM_EPS = 1e-6


@dataclass
class ViTConfig:
    """Architecture of a timm-layout ViT; every field can be inferred from shapes except heads."""

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    reg_tokens: int = 0
    pos_layout: str = "patches"  # "patches" (timm no_embed_class) | "prefix" (CLS+regs+patches) | "rope"
    pos_grid: int = 14  # stored positional grid side g (g*g patch positions); rope: native grid
    mlp: str = "gelu"  # "gelu" | "swiglu" (packed: fc1 -> 2*hidden, gate first)
    mlp_hidden: int = 1536  # width after the activation (fc2 input)
    layer_scale: bool = True
    qkv_bias: bool = True
    qk_norm: bool = False  # per-head LayerNorm of q and k before attention (and before RoPE)
    rope_base: float = 100.0  # rope only: periods base**(2j/(head_dim/2)) of a new model (DINOv3)
    norm_eps: float = NORM_EPS
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. source), not architecture

    def __post_init__(self):
        if self.pos_layout not in ("patches", "prefix", "rope"):
            raise ValueError(f"pos_layout must be 'patches', 'prefix' or 'rope', got {self.pos_layout!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_layout == "rope" and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {self.embed_dim // self.num_heads}")

    @property
    def img_size(self) -> int:
        return self.pos_grid * self.patch_size

    @property
    def fc1_out(self) -> int:
        return 2 * self.mlp_hidden if self.mlp == "swiglu" else self.mlp_hidden

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ViT config keys {unknown}")
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count from the config alone (no allocation), used to check presets."""
        D, L = self.embed_dim, self.depth
        P, h1, h2 = self.patch_size, self.fc1_out, self.mlp_hidden
        n_pos = self.n_positions
        per_block = (
            4 * D  # norm1, norm2
            + (4 * D // self.num_heads if self.qk_norm else 0)
            + 3 * D * D + (3 * D if self.qkv_bias else 0)
            + D * D + D
            + (2 * D if self.layer_scale else 0)
            + h1 * D + h1 + D * h2 + D
        )
        return D * 3 * P * P + D + D + self.reg_tokens * D + n_pos * D + L * per_block + 2 * D

    @property
    def n_positions(self) -> int:
        """Rows of the learned position table (none for RoPE)."""
        if self.pos_layout == "rope":
            return 0
        return self.pos_grid**2 + (0 if self.pos_layout == "patches" else 1 + self.reg_tokens)


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
    """Resample the patch part of a (1, L, D) table to ``grid`` (spec §2.2 step 2).

    Bicubic with antialias in at least float32, prefix rows unchanged: the same operation as timm's
    ``resample_abs_pos_embed`` so that ``dynamic_img_size`` outputs agree.
    """
    n_patch = pos.shape[1] - n_prefix
    g = int(round(math.sqrt(n_patch)))
    if (g, g) == tuple(grid):
        return pos
    prefix, patch = pos[:, :n_prefix], pos[:, n_prefix:]
    dtype = patch.dtype
    work = patch.float() if dtype in (torch.float16, torch.bfloat16) else patch
    work = work.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    work = F.interpolate(work, size=tuple(grid), mode="bicubic", antialias=True)
    work = work.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(dtype)
    return torch.cat([prefix, work], dim=1) if n_prefix else work


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = P, flattened row-major to (B, N, D)."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RopeEmbedding(nn.Module):
    """DINOv3's 2-D rotary position embedding (Siméoni et al. 2025, ``RopePositionEmbedding``).

    Patch (i, j) of an H x W grid sits at y = 2 (i + ½)/H − 1, x = 2 (j + ½)/W − 1 (both in
    [−1, 1], so any input size keeps the range). With ``periods`` p_0..p_{d/4−1}
    (p_m = base^{2m/(d/2)}, stored in checkpoints as ``rope_embed.periods``) the angles are
    θ = 2π [y/p, x/p] (d/2 values, rows first), tiled twice to the head width d; a vector is rotated
    as v cos θ + rotate_half(v) sin θ, pairing dimension m with m + d/2 (Su et al., RoFormer).
    Rotations preserve norms, and q·k of two rotated vectors depends on their positions only
    through the difference of their coordinates.
    """

    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        m = torch.arange(head_dim // 4, dtype=torch.float32)
        self.register_buffer("periods", base ** (2 * m / (head_dim // 2)))
        self._cache: tuple | None = None

    def _apply(self, fn, recurse=True):
        """``.half()``/``.to(bf16)`` leave the periods in fp32 (angles up to 2π·d/4 need the bits)."""
        periods = self.periods
        super()._apply(fn, recurse)
        if self.periods.dtype in (torch.float16, torch.bfloat16):
            self.periods = periods.to(self.periods.device)
        return self

    def forward(self, grid: tuple[int, int], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each (H*W, head_dim), for row-major patch tokens."""
        key = (tuple(grid), dtype, torch.device(device), self.periods.data_ptr(), self.periods._version)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        H, W = grid
        # constants, made outside inference mode so that a later autograd pass may reuse them
        with torch.inference_mode(False), torch.no_grad():
            work = torch.promote_types(dtype, torch.float32)  # fp32 as DINOv3; fp64 models in fp64
            periods = self.periods.to(device=device, dtype=work)
            ys = 2 * (torch.arange(H, device=device, dtype=work) + 0.5) / H - 1
            xs = 2 * (torch.arange(W, device=device, dtype=work) + 0.5) / W - 1
            coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(H * W, 2)
            angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1).tile(2)
            out = (angles.sin().to(dtype), angles.cos().to(dtype))
        self._cache = (key, out)
        return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, n_prefix: int) -> torch.Tensor:
    """Rotate the patch tokens of (B, heads, T, d) q or k; CLS and registers stay unrotated."""
    if rope is None:
        return x
    sin, cos = rope
    patches = x[:, :, n_prefix:]
    return torch.cat([x[:, :, :n_prefix], patches * cos + rotate_half(patches) * sin], dim=2)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor, lrp: bool) -> torch.Tensor:
    """LayerNorm; under LRP the 1/σ factor is detached (centring kept), Ali et al. 2022 §4."""
    if not lrp:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    centred = x - x.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
    return centred * inv_std.detach() * norm.weight + norm.bias


def identity_rule(act, u: torch.Tensor, slope0: float = 0.5) -> torch.Tensor:
    """act(u) -> u * (act(u)/u).detach(): same value, linear gradient graph (spec §2.9 iii).

    ``slope0`` is act'(0), used where |u| < 1e-12 (0.5 for both GELU and SiLU).
    """
    out = act(u)
    small = u.abs() < 1e-12
    safe_u = torch.where(small, torch.ones_like(u), u)
    ratio = torch.where(small, torch.full_like(u, slope0), out / safe_u)
    return u * ratio.detach()


def uniform_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b whose gradient realises AttnLRP's rule for a bilinear matmul (Achtibat et al. 2024,
    Prop. 3.3: ε-rule over the sum, then the uniform rule, Eq. 7, half to each factor).

    Value a @ b; as Gradient × Input, R_a = a ⊙ ((R/2O) bᵀ) and R_b = b ⊙ (aᵀ (R/2O)) for O = a @ b:
    the graph is linear in (a, b) jointly, so nothing leaks.
    """
    return 0.5 * (a @ b.detach() + a.detach() @ b)


def softmax_rule(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax with AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1; Taylor expansion at x
    with bias, Eqs. 4-5): R_in = x ⊙ (R_out − s · Σ R_out).

    In Gradient × Input form this *is* the ordinary softmax gradient: with R_out = s ⊙ g,
    x ⊙ Jᵀg = x ⊙ s ⊙ (g − Σ s g) = x ⊙ (R_out − s Σ R_out). The rule is not conservative: the
    Taylor bias β = s − J x = s ⊙ (1 − x + Σ s x) absorbs the rest. So that its share can be
    counted, β is added as a zero-valued leaf (β − β.detach()); its gradient is ∂f/∂s, and
    β · ∂f/∂s is the relevance the softmax absorbs. Returns (probabilities, β leaf or None).
    """
    s = torch.softmax(logits, dim=-1)
    if not torch.is_grad_enabled():
        return s, None
    with torch.no_grad():
        beta = s * (1 - logits + (s * logits).sum(-1, keepdim=True))
    beta.requires_grad_(True)
    return s + (beta - beta.detach()), beta


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, qk_norm: bool = False, eps: float = NORM_EPS):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.proj = nn.Linear(dim, dim)
        self.softmax_bias: torch.Tensor | None = None  # AttnLRP: the softmax rule's Taylor bias leaf

    def position_qk(self, q: torch.Tensor, k: torch.Tensor, rope=None, n_prefix: int = 0, lrp: bool | str = False,
                    cls_query: bool = False):
        """q/k LayerNorm (if any), then RoPE on the patch tokens (if any); identity for timm ViTs.

        ``cls_query``: q holds the CLS row only (prefix tokens are never rotated). The rotation is
        a fixed linear map, so every LRP rule passes through it unchanged.
        """
        if self.q_norm is not None:
            q, k = layer_norm(self.q_norm, q, bool(lrp)), layer_norm(self.k_norm, k, bool(lrp))
        return (q if cls_query else apply_rope(q, rope, n_prefix)), apply_rope(k, rope, n_prefix)

    def forward(self, x: torch.Tensor, keep_attention: bool = False, lrp: bool | str = False, rope=None,
                n_prefix: int = 0):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.position_qk(q, k, rope, n_prefix, lrp)
        probs = None
        self.softmax_bias = None
        if lrp == "attn":  # AttnLRP: softmax rule + uniform matmuls (Achtibat et al. 2024, Props. 3.1, 3.3)
            probs, self.softmax_bias = softmax_rule(uniform_matmul(q * self.scale, k.transpose(-2, -1)))
            a = uniform_matmul(probs, v)
        elif keep_attention or lrp:
            probs = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
            a = (probs.detach() if lrp else probs) @ v  # CP-LRP: attention is a constant (AH rule)
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(B, T, D)
        return self.proj(a), probs


class Mlp(nn.Module):
    """fc1 -> act -> fc2; SwiGLU-packed when ``swiglu`` (fc1 gives [gate, value], gate first)."""

    def __init__(self, dim: int, hidden: int, swiglu: bool):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, lrp: bool = False) -> torch.Tensor:
        u = self.fc1(x)
        if self.swiglu:
            g, v = u.chunk(2, dim=-1)
            if lrp:  # uniform rule for the product, identity rule for silu (spec §2.9 iv)
                sg = identity_rule(F.silu, g)
                u = 0.5 * (sg * v.detach() + sg.detach() * v)
            else:
                u = F.silu(g) * v
        else:
            u = identity_rule(F.gelu, u) if lrp else F.gelu(u)
        return self.fc2(u)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps)
        self.ls1 = LayerScale(D) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mlp = Mlp(D, cfg.mlp_hidden, cfg.mlp == "swiglu")
        self.ls2 = LayerScale(D) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, keep_attention: bool = False, lrp: bool = False, rope=None,
                n_prefix: int = 0):
        a, probs = self.attn(layer_norm(self.norm1, x, lrp), keep_attention, lrp, rope, n_prefix)
        x = x + self.ls1(a)
        x = x + self.ls2(self.mlp(layer_norm(self.norm2, x, lrp), lrp))
        return x, probs


class VisionTransformer(nn.Module):
    """timm-layout ViT: ``forward_features`` returns the final-normed tokens [CLS, regs, patches]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        rope = cfg.pos_layout == "rope"
        self.pos_embed = None if rope else nn.Parameter(torch.zeros(1, cfg.n_positions, D))
        self.rope_embed = RopeEmbedding(D // cfg.num_heads, cfg.rope_base) if rope else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.keep_attention = False  # switched on by attention rollout
        self.lrp: bool | str = False  # True/"cp": conservative LRP; "attn": AttnLRP (lrp.lrp_rules)
        self.attentions: list[torch.Tensor] = []
        self.fast_inference = True  # use inference.forward_tokens when no gradient is recorded
        self.gemm = "auto"  # inference GEMMs: auto | onednn | aten (see inference.use_onednn)
        self.workspace = Workspace()  # activation buffers of the inference path (not parameters)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.reg_tokens

    def init_random(self, std: float = 0.02, generator: torch.Generator | None = None) -> "VisionTransformer":
        """N(0, std) for every tensor (LayerScale and biases non-trivial), LayerNorm weights 1 + N(0, std).

        Used for tests, demos and students trained from scratch; never mistaken for pretrained weights.
        """
        with torch.no_grad():
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p)
                if ("norm" in name and name.endswith("weight")):
                    p.copy_(1.0 + std * noise)
                elif name.endswith("gamma"):
                    p.copy_(0.1 + std * noise)
                else:
                    p.copy_(std * noise)
        return self

    def init_for_training(self, generator: torch.Generator | None = None) -> "VisionTransformer":
        """The start of a student trained from scratch, as DINOv2 and timm train ViTs: truncated N(0, 0.02)
        (at ±2σ) for weights and positions, zero biases, LayerNorm (1, 0), LayerScale 1e-5 (DINOv2's
        ``layerscale``: each block starts near the identity), CLS, register and mask tokens N(0, 1e-6).
        (:meth:`init_random` is the test initialisation: every tensor non-trivial.)"""
        with torch.no_grad():
            for name, p in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf == "gamma":
                    p.fill_(1e-5)
                elif "norm" in name:
                    p.fill_(1.0 if leaf == "weight" else 0.0)
                elif leaf == "bias":
                    p.zero_()
                elif "token" in name:
                    p.copy_(1e-6 * torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p))
                else:
                    w = torch.empty(p.shape, dtype=torch.float32)
                    nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04, generator=generator)
                    p.copy_(w.to(p))
        return self

    def rope(self, grid: tuple[int, int], like: torch.Tensor):
        """(sin, cos) tables of the patch grid, or None without RoPE."""
        return None if self.rope_embed is None else self.rope_embed(grid, like.dtype, like.device)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B = x.shape[0]
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if self.pos_embed is None:  # RoPE: positions enter in every attention instead
            return torch.cat(prefix + [x], dim=1)
        n_prefix = 0 if self.cfg.pos_layout == "patches" else self.num_prefix_tokens
        pos = resample_pos_embed(self.pos_embed, grid, n_prefix)
        if self.cfg.pos_layout == "patches":
            return torch.cat(prefix + [x + pos], dim=1)
        return torch.cat(prefix + [x], dim=1) + pos

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) input, got {tuple(x.shape)}")
        P = self.cfg.patch_size
        H, W = x.shape[-2:]
        if H % P or W % P:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {P}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + R + N, D) final-normed tokens (spec §2.2)."""
        self._check_input(x)
        P = self.cfg.patch_size
        H, W = x.shape[-2:]
        if self.fast_inference and usable(self, x):
            return layer_norm(self.norm, forward_tokens(self, x), False)
        x = self._pos_embed(self.patch_embed(x), (H // P, W // P))
        rope = self.rope((H // P, W // P), x)
        keep = self.keep_attention
        self.attentions = []
        for blk in self.blocks:
            x, probs = blk(x, keep, self.lrp, rope, self.num_prefix_tokens)
            if keep:
                self.attentions.append(probs)
        return layer_norm(self.norm, x, self.lrp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) final-normed CLS token = ``forward_features(x)[:, 0]``, cheaper.

        The last block runs at the CLS position only (``inference.cls_token_only``): the result is
        the same; the work saved is most of one block.
        """
        self._check_input(x)
        if self.keep_attention or self.lrp:
            return self.forward_features(x)[:, 0]
        linear = F.linear
        P = self.cfg.patch_size
        grid = (x.shape[-2] // P, x.shape[-1] // P)
        rope = self.rope(grid, x)
        if self.fast_inference and usable(self, x):
            tokens = forward_tokens(self, x, self.blocks[:-1])
            if use_onednn(self.gemm, x):
                linear = onednn_linear
        else:
            tokens = self._pos_embed(self.patch_embed(x), grid)
            for blk in self.blocks[:-1]:
                tokens = blk(tokens, rope=rope, n_prefix=self.num_prefix_tokens)[0]
        last = cls_token_only(self.blocks[-1], tokens, linear, rope, self.num_prefix_tokens)
        return layer_norm(self.norm, last, False)[:, 0]

    def release_workspace(self) -> None:
        """Free the inference path's activation buffers (they are kept between calls)."""
        self.workspace.clear()


def pool_tokens(tokens: torch.Tensor, n_prefix: int, pool: str) -> torch.Tensor:
    """Pool final-normed tokens (spec §2.5); registers and CLS never enter the patch mean."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, n_prefix:].mean(1)
    if pool in ("cls+mean", "clsmean"):
        return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)
    if pool == "tokens":
        return tokens[:, n_prefix:]
    raise ValueError(f"unknown pooling {pool!r}; use cls, mean, cls+mean or tokens")


def pooled_dim(embed_dim: int, pool: str) -> int:
    return 2 * embed_dim if pool in ("cls+mean", "clsmean") else embed_dim
