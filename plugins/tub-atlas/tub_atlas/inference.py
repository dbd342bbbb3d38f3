"""The inference forward pass: spec §2.2 with the same formulas, faster kernels and fewer memory passes.

On CPU, when no gradient is recorded (``torch.no_grad`` / ``inference_mode``), no autocast is active
and neither explanation switch is on, ``VisionTransformer.forward_features`` runs the blocks through
:func:`forward_tokens`. The formulas are those of ``Block.forward`` (and of timm's
``VisionTransformer``); what changes is which kernels run and where the numbers live:

* **GEMM backend** (``model.gemm``). ``auto`` (default) sends the four block GEMMs on CPU in fp32/bf16
  through oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` uses for CPU
  linears) instead of aten's BLAS call (MKL in the PyTorch wheels), with the erf-GELU fused into the
  fc1 GEMM. On the project's AMD EPYC dev box one core ran a 2120 x 4096 x 1536 fp32 GEMM at
  117 GFLOP/s through MKL and 247 GFLOP/s through oneDNN (MKL's kernel choice on non-Intel CPUs is
  the likely cause). Both are fp32 GEMMs with different summation orders: against an fp64 forward,
  oneDNN's outputs were off by 4-7e-6 and MKL's by 3-5e-6 (UNI2-h / H-optimus-0 depth 2, ViT-S/8 depth
  12), and tub vs timm differ by <= 8.3e-6 (bar 1e-5). ``aten`` keeps the reference kernels.
* Every large activation the aten path produces (LayerNorm output, fused qkv, MLP hidden, projection
  output, the residual stream) is written with an ``out=`` kernel into a :class:`Workspace` buffer that
  is reused by every block and every later call with the same batch shape. On CPU a fresh 40 MB tensor
  costs more in page faults than the erf-GELU computed on it (measured: GELU 18 ms into a new tensor,
  5 ms into an existing one, for the 6344 x 1536 hidden of ViT-S/8 at batch 8, one thread).
* The residual update x <- x + gamma * (a W^T + b) multiplies and adds in place instead of
  allocating two new tensors; GELU / SiLU run in place; the SwiGLU product is written into the gate
  half of the fc1 output, which fc2 reads as a strided matrix.
* Positions are added to the patch embedding directly into the token buffer (no ``cat``).

With ``gemm="aten"`` every kernel and every rounding step is the reference one, so the outputs are
bit-identical to ``Block.forward`` (and to timm's ViT on the same machine); ``tests/atlas`` checks
``torch.equal`` for that and a tolerance for oneDNN.

:func:`cls_token_only` is the exact shortcut for ``cls`` pooling: the last block's output is only
needed at the CLS position, so its attention takes one query row (keys and values still from all
tokens) and its MLP runs on one token per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Workspace:
    """Activation buffers by role, reused while the batch shape, dtype and device stay the same.

    Buffers are created outside inference mode so that later ``no_grad`` calls may write to them.
    They are never returned to the caller: the final LayerNorm writes a fresh tensor. One forward
    at a time per model (not re-entrant across threads).
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        t = self.buffers.get(role)
        if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
            self.buffers.pop(role, None)
            with torch.inference_mode(False):
                t = torch.empty(shape, dtype=like.dtype, device=like.device)
            self.buffers[role] = t
        return t

    def clear(self) -> None:
        self.buffers.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


def usable(model, x: torch.Tensor) -> bool:
    """The inference path applies: CPU, no autograd graph, no autocast, no explanation switches.

    CPU only: what it saves (page faults of fresh tensors, MKL vs oneDNN) is CPU-specific, the CUDA
    caching allocator already reuses memory, and no GPU was available to test it on.
    """
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and not model.keep_attention
            and not model.lrp and not torch.is_autocast_enabled(x.device.type))


def _layer_norm_into(ws: Workspace, x2: torch.Tensor, norm) -> torch.Tensor:
    n = x2.shape[0]
    out = ws.get("ln", tuple(x2.shape), x2)
    stats = ws.get("ln_mean", (n, 1), x2), ws.get("ln_rstd", (n, 1), x2)
    torch.ops.aten.native_layer_norm.out(x2, list(norm.normalized_shape), norm.weight, norm.bias, norm.eps,
                                         out0=out, out1=stats[0], out2=stats[1])
    return out


GEMM_BACKENDS = ("auto", "onednn", "aten")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_bf16() -> bool:
    """Whether this CPU has oneDNN's bf16 GEMM kernels (AVX-512 with avx512_bf16 or AMX, or an ARM with bf16);
    without them creating the bf16 primitive fails (an AVX2-only AMD EPYC)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_onednn(gemm: str, x: torch.Tensor) -> bool:
    """Whether the block GEMMs go through oneDNN (CPU, fp32/bf16) rather than aten's BLAS (MKL).

    ``auto`` picks oneDNN where it applies; ``onednn`` insists (error where it cannot run);
    ``aten`` keeps the BLAS kernels of the reference path (bit-identical outputs).
    """
    if gemm not in GEMM_BACKENDS:
        raise ValueError(f"gemm must be one of {GEMM_BACKENDS}, got {gemm!r}")
    if gemm == "aten":
        return False
    ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and onednn_available()
    if ok and x.dtype == torch.bfloat16 and not onednn_bf16():
        if gemm == "onednn":  # its bf16 kernels need AVX-512 (avx512_bf16, AMX) or an ARM with bf16
            raise ValueError(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no oneDNN bf16 kernels; use "
                             "--gemm aten (or auto) for bf16, or fp32")
        return False
    if gemm == "onednn" and not ok:
        raise ValueError(f"the oneDNN GEMM needs a CPU tensor in fp32/bf16 and a torch built with oneDNN "
                         f"(got {x.dtype} on {x.device.type}); use --gemm aten or auto")
    return ok


def _linear_into(ws: Workspace, role: str, h: torch.Tensor, lin, onednn: bool, act: str = "none") -> torch.Tensor:
    """h W^T + b (then GELU when ``act == "gelu"``, fused into the oneDNN GEMM)."""
    if onednn:
        if act == "gelu":  # erf GELU epilogue ("none" = no tanh approximation)
            return torch.ops.mkldnn._linear_pointwise(h, lin.weight, lin.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(h, lin.weight, lin.bias, "none", [], "")
    out = _linear_aten(ws, role, h, lin)
    if act == "gelu":
        torch.ops.aten.gelu_(out)  # exact erf GELU, in place
    return out


def _linear_aten(ws: Workspace, role: str, h: torch.Tensor, lin) -> torch.Tensor:
    out = ws.get(role, (h.shape[0], lin.out_features), h)
    if lin.bias is None:
        return torch.mm(h, lin.weight.t(), out=out)
    return torch.addmm(lin.bias, h, lin.weight.t(), out=out)


def _residual_(ws: Workspace, x2: torch.Tensor, inp: torch.Tensor, lin, ls, onednn: bool) -> None:
    """x2 <- x2 + gamma * lin(inp), in place (gamma = 1 without LayerScale).

    Multiply, then add (not one fused ``addcmul_``, whose FMA rounds once instead of twice), so the
    result is bit-identical to the reference ``x + ls(proj(a))``.
    """
    y = _linear_into(ws, "res", inp, lin, onednn)
    if hasattr(ls, "gamma"):
        y.mul_(ls.gamma)
    x2.add_(y)


def _patch_tokens_into(model, x: torch.Tensor, tokens: torch.Tensor) -> None:
    """Patch embedding + positions written into the token buffer (spec §2.2 steps 1-2).

    The conv is the reference one; its output is added to the positions straight into
    ``tokens[:, 1 + R:]`` instead of through a ``cat``.
    """
    from .vit import resample_pos_embed

    cfg = model.cfg
    P = cfg.patch_size
    grid = (x.shape[-2] // P, x.shape[-1] // P)
    n_pre = model.num_prefix_tokens
    t = model.patch_embed(x)  # (B, N, D) view of the conv output
    if cfg.pos_layout in ("patches", "rope"):  # prefix tokens without positions
        tokens[:, :1] = model.cls_token
        if model.reg_token is not None:
            tokens[:, 1:n_pre] = model.reg_token
        if model.pos_embed is None:  # RoPE: positions act inside the attention
            tokens[:, n_pre:] = t
        else:
            torch.add(t, resample_pos_embed(model.pos_embed, grid, 0), out=tokens[:, n_pre:])
    else:
        pos = resample_pos_embed(model.pos_embed, grid, n_pre)
        tokens[:, :1] = model.cls_token + pos[:, :1]  # broadcast over the batch
        if model.reg_token is not None:
            tokens[:, 1:n_pre] = model.reg_token + pos[:, 1:n_pre]
        torch.add(t, pos[:, n_pre:], out=tokens[:, n_pre:])


def _block_(blk, x2: torch.Tensor, B: int, T: int, ws: Workspace, onednn: bool, rope=None,
            n_prefix: int = 0) -> None:
    """One block, in place on the (B*T, D) residual stream: same formulas as ``Block.forward``."""
    attn, mlp = blk.attn, blk.mlp
    D = x2.shape[1]
    h = _layer_norm_into(ws, x2, blk.norm1)
    qkv = _linear_into(ws, "qkv", h, attn.qkv, onednn)
    q, k, v = qkv.view(B, T, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.position_qk(q, k, rope, n_prefix)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * T, D)
    _residual_(ws, x2, a, attn.proj, blk.ls1, onednn)
    h = _layer_norm_into(ws, x2, blk.norm2)
    if mlp.swiglu:
        u = _linear_into(ws, "fc1", h, mlp.fc1, onednn)
        g, val = u.chunk(2, dim=-1)  # gate first; g is a strided view of the fc1 output
        F.silu(g, inplace=True)
        u = g.mul_(val)
    else:
        u = _linear_into(ws, "fc1", h, mlp.fc1, onednn, act="gelu")
    _residual_(ws, x2, u, mlp.fc2, blk.ls2, onednn)


def forward_tokens(model, x: torch.Tensor, blocks=None) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, D) residual stream after ``blocks`` (default all), not yet normed.

    The returned tensor is a workspace buffer: callers copy or norm it before the next call.
    """
    ws = model.workspace
    B, _, H, W = x.shape
    P = model.cfg.patch_size
    T = model.num_prefix_tokens + (H // P) * (W // P)
    tokens = ws.get("x", (B, T, model.cfg.embed_dim), x)
    _patch_tokens_into(model, x, tokens)
    x2 = tokens.view(B * T, -1)
    onednn = use_onednn(model.gemm, x)
    rope = model.rope((H // P, W // P), x)
    for blk in (model.blocks if blocks is None else blocks):
        _block_(blk, x2, B, T, ws, onednn, rope, model.num_prefix_tokens)
    return tokens


def onednn_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(h, weight, bias, "none", [], "")


def cls_token_only(blk, x: torch.Tensor, linear=F.linear, rope=None, n_prefix: int = 0) -> torch.Tensor:
    """The last block evaluated at the CLS position only: (B, T, D) -> (B, 1, D), exact.

    Attention: one query (CLS) against keys/values of all T tokens; projection, LayerScale and MLP on
    one token. Differentiable with the default ``linear`` (plain ops), so it serves gradient-based
    callers as well; the inference path passes :func:`onednn_linear` for the key/value GEMM.
    """
    from .vit import layer_norm

    B, T, D = x.shape
    attn = blk.attn
    h = layer_norm(blk.norm1, x, False)
    W, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], W[:D], None if b is None else b[:D])
    kv = linear(h.reshape(B * T, D), W[D:], None if b is None else b[D:])  # the one full-width GEMM left
    q = q.view(B, 1, attn.heads, attn.head_dim).transpose(1, 2)
    k, v = kv.view(B, T, 2, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.position_qk(q, k, rope, n_prefix, cls_query=True)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
    c = x[:, :1] + blk.ls1(attn.proj(a))
    return c + blk.ls2(blk.mlp(layer_norm(blk.norm2, c, False)))
