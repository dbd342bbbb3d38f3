"""DINOv2-style self-supervised pre-training of a ViT on unlabelled tiles (spec §2.10, stretch).

Written from the papers; hyper-parameter defaults (``config.DINOv2Section``) from the DINOv2 paper and
its public default config (``ssl_default_config.yaml``), each with its source:

* DINO (Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, arXiv 2104.14294):
  student f_s and teacher f_t share an architecture; the teacher is an exponential moving average of
  the student, θ_t ← m θ_t + (1 − m) θ_s (§3.1), m following a cosine schedule 0.992 → 1.
  Multi-crop: 2 global and N local crops; the loss is the cross-entropy −Σ P_t log P_s between the
  teacher's output on one global crop and the student's on every *other* crop (Eq. 3), with
  P_s = softmax(g_s / τ_s), τ_s = 0.1, and the teacher sharpened (τ_t warmed 0.04 → 0.07) and centred.
* Head: 3-layer MLP (GELU) to a bottleneck, L2 normalisation, then a weight-normalised linear layer
  without bias onto K prototypes (DINO §3.1 / App.); that last layer's learning rate is 0 for the
  first epoch (DINO App. "freeze the last layer"): the first 1 % of the steps, as DINOv2's 1 of 100 epochs.
* iBOT (Zhou et al., arXiv 2111.07832, §3.2, L_MIM): masked image modelling with an online tokenizer; the
  student sees block-masked global crops (masked patch embeddings replaced by a learned mask token),
  the teacher the unmasked crops, and the cross-entropy runs over the masked patches only.
* Sinkhorn–Knopp centring (SwAV, Caron et al., arXiv 2006.09882, §3.1 / Alg. 1; adopted by DINOv2
  §4): Q = exp(S/τ_t), alternately normalised so that every prototype gets total mass 1/K and every
  sample 1/B, three iterations, then scaled so that each sample's assignment sums to 1. Classic DINO
  centring (subtract an EMA of the batch mean, momentum 0.9) is the option ``centering="centering"``.
* KoLeo (Sablayrolles et al., arXiv 1806.03198, §3, Kozachenko–Leonenko entropy estimator; DINOv2 §4):
  L_koleo = −(1/n) Σ_i log(d_{n,i}), d_{n,i} = min_{j≠i} ‖x_i − x_j‖ on L2-normalised student CLS
  features, computed within each global crop of the batch (never across two views of one image).
* DINOv2 (Oquab et al., arXiv 2304.07193, §4): the sum of the above, AdamW with cosine lr (linear
  warm-up) and cosine weight decay 0.04 → 0.4, layer-wise lr decay, patch-embedding lr × 0.2,
  gradient clipping 3.0, stochastic depth.

The student backbone is tub's ``vit.VisionTransformer``; the mask token lives beside it (it is not part
of the timm key layout), so the trained backbone is saved and loaded like any other checkpoint.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tubcli.runs import require_finite_loss

from .tiles import take_tiles
from .vit import VisionTransformer


# ------------------------------------------------------------------ schedules (DINOv2 train.py semantics)
def cosine(step: int, total: int, start: float, end: float) -> float:
    """``end + ½(start − end)(1 + cos(π t/T))``: ``start`` at step 0, ``end`` at step ``total``."""
    t = min(max(step, 0), total) / max(1, total)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, peak: float, end: float, warmup: int, start: float = 0.0) -> float:
    """Linear ``start`` → ``peak`` over ``warmup`` steps, then cosine ``peak`` → ``end``."""
    if step < warmup:
        return start + (peak - start) * step / max(1, warmup)
    return cosine(step - warmup, total - warmup, peak, end)


def teacher_temperature(step: int, warmup: int, start: float = 0.04, end: float = 0.07) -> float:
    """DINO §3.1: linear warm-up of τ_t from ``start`` to ``end`` over ``warmup`` steps, then constant."""
    if step >= warmup:
        return end
    return start + (end - start) * step / max(1, warmup)


# ------------------------------------------------------------------ centring
def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) when running distributed; identity otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float, n_iterations: int = 3,
                   n_samples: int | None = None) -> torch.Tensor:
    """Teacher assignments (B, K) by Sinkhorn–Knopp (SwAV Alg. 1, 3 iterations as in DINOv2).

    Q = exp(scores/τ)ᵀ (K × B) is scaled to total mass 1, then alternately rows (prototypes) to 1/K
    each and columns (samples) to 1/B each; finally × B so that every sample's row of the result sums
    to 1. Under DDP the sums are all-reduced and B is the global sample count (``n_samples``).
    The exponent is shifted by its global maximum first (exact: the first normalisation divides it out).
    """
    s = (scores if scores.dtype == torch.float64 else scores.float()) / temperature  # at least fp32
    top = s.max().reshape(1) if s.numel() else torch.full((1,), -math.inf, dtype=s.dtype, device=s.device)
    Q = torch.exp(s - _all_reduce(top, "max")).t()
    K = Q.shape[0]
    B = float(n_samples if n_samples is not None else
              _all_reduce(torch.tensor(float(Q.shape[1]), device=s.device)).item())
    Q /= _all_reduce(Q.sum().reshape(1)).squeeze()
    for _ in range(n_iterations):
        Q /= _all_reduce(Q.sum(dim=1, keepdim=True))
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


class Centering(nn.Module):
    """DINO centring (Caron et al. 2021, Eq. 4): c ← λc + (1 − λ)·mean_batch g_t, λ = 0.9;
    teacher probabilities softmax((g_t − c)/τ_t). The update uses the current batch after use."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def probabilities(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return F.softmax((logits.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        total = _all_reduce(logits.float().sum(0, keepdim=True))
        n = float(_all_reduce(torch.tensor(float(len(logits)), device=logits.device)))
        if n > 0:
            self.center.mul_(self.momentum).add_(total / n, alpha=1 - self.momentum)


# ------------------------------------------------------------------ losses
def cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per row −Σ_k P_t,k log softmax(g_s/τ_s)_k (DINO Eq. 2's H(P_t, P_s))."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)


def dino_loss(student_global: list[torch.Tensor], student_local: list[torch.Tensor],
              teacher_global: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """DINO Eq. 3 over crops: teacher global crop v vs every student crop v' ≠ v (global crop i only
    against the *other* global crop; every local crop against both), batch mean per pair, averaged
    over the 2 + 2·N pairs (DINOv2's normalisation)."""
    terms = []
    for i, s in enumerate(student_global):
        for j, t in enumerate(teacher_global):
            if i != j:
                terms.append(cross_entropy(t, s, student_temp).mean())
    for s in student_local:
        for t in teacher_global:
            terms.append(cross_entropy(t, s, student_temp).mean())
    return torch.stack(terms).mean()


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """iBOT's L_MIM (§3.2) on masked patches only. ``student_logits``/``teacher_probs``: (M, K) for the M masked
    patches in row-major order of ``masks`` (B, N). Per image the mean over its masked patches, then
    the mean over all B images (images without masked patches contribute 0), as DINOv2."""
    ce = cross_entropy(teacher_probs, student_logits, student_temp)
    per_image = masks.sum(-1).clamp(min=1).float()
    weight = (1.0 / per_image).unsqueeze(-1).expand_as(masks)[masks]
    return (ce * weight).sum() / masks.shape[0]


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko–Leonenko regulariser (Sablayrolles et al. 2019, §3): −mean_i log(min_{j≠i}‖x̂_i − x̂_j‖ + ε)
    on L2-normalised rows x̂. Minimising it spreads the features uniformly over the sphere. Zero for
    fewer than two rows: a lone row has no neighbour (DINOv2's formula would return the constant −log 2ε)."""
    if x.shape[0] < 2:
        return torch.zeros((), device=x.device)
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    dots = x @ x.t()
    dots.fill_diagonal_(-2.0)  # never one's own neighbour
    nn_index = dots.argmax(dim=1)
    dist = (x - x[nn_index] + eps).norm(dim=-1)  # as torch.nn.PairwiseDistance(eps) in DINOv2
    return -torch.log(dist + eps).mean()


# ------------------------------------------------------------------ heads
class WeightNormLinear(nn.Module):
    """Linear layer without bias, W = g ⊙ V/‖V‖ per output row (Salimans & Kingma 2016); g starts at 1."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, w)


class DINOHead(nn.Module):
    """MLP (``nlayers`` Linear, GELU between) → bottleneck → L2 normalise → weight-normed prototypes."""

    def __init__(self, in_dim: int, n_prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.mlp = nn.Sequential(*layers[:-1])
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))


# ------------------------------------------------------------------ backbone forward with masks + stochastic depth
def drop_path(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample with probability p."""
    if p <= 0:
        return x
    keep = (torch.rand(x.shape[0], 1, 1, generator=generator) >= p).to(x)
    return x * keep.to(x.device) / (1 - p)


def backbone_tokens(vit: VisionTransformer, x: torch.Tensor, masks: torch.Tensor | None = None,
                    mask_token: torch.Tensor | None = None, drop: float = 0.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Final-normed tokens [CLS, registers, patches] as ``vit.forward_features`` (spec §2.2), with the
    patch embeddings at ``masks`` (B, N) replaced by ``mask_token`` before the positions are added
    (iBOT §3.2) and stochastic depth on each residual branch while training."""
    P = vit.cfg.patch_size
    t = vit.patch_embed(x)
    if masks is not None:
        t = torch.where(masks.unsqueeze(-1), mask_token.to(t.dtype).view(1, 1, -1), t)
    grid = (x.shape[-2] // P, x.shape[-1] // P)
    t = vit._pos_embed(t, grid)
    rope = vit.rope(grid, t)  # RoPE backbones: positions enter every attention
    for blk in vit.blocks:
        n1 = blk.norm1
        a, _ = blk.attn(F.layer_norm(t, n1.normalized_shape, n1.weight, n1.bias, n1.eps), rope=rope,
                        n_prefix=vit.num_prefix_tokens)
        t = t + drop_path(blk.ls1(a), drop, generator)
        n2 = blk.norm2
        t = t + drop_path(blk.ls2(blk.mlp(F.layer_norm(t, n2.normalized_shape, n2.weight, n2.bias, n2.eps))),
                          drop, generator)
    n = vit.norm
    return F.layer_norm(t, n.normalized_shape, n.weight, n.bias, n.eps)


class SSLNetwork(nn.Module):
    """Backbone + DINO head (+ separate iBOT head) + mask token: the student (trained) or the teacher (EMA)."""

    def __init__(self, backbone: VisionTransformer, n_prototypes: int, hidden_dim: int, bottleneck_dim: int,
                 nlayers: int, separate_ibot_head: bool, ibot_prototypes: int | None = None):
        super().__init__()
        D = backbone.cfg.embed_dim
        self.backbone = backbone
        self.dino_head = DINOHead(D, n_prototypes, hidden_dim, bottleneck_dim, nlayers)
        self.ibot_head = (DINOHead(D, ibot_prototypes or n_prototypes, hidden_dim, bottleneck_dim, nlayers)
                          if separate_ibot_head else None)
        self.mask_token = nn.Parameter(torch.zeros(D))

    @property
    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def forward(self, global_x: torch.Tensor, local_x: torch.Tensor | None, masks: torch.Tensor | None,
                drop: float = 0.0, generator: torch.Generator | None = None) -> dict:
        """Global crops (2B, 3, H, W) with iBOT masks (2B, N) and local crops (n·B, 3, h, w).

        Returns head logits of the global and local CLS tokens, of the masked global patches
        (row-major order of ``masks``), and the global backbone CLS features (for KoLeo).
        """
        vit = self.backbone
        g = backbone_tokens(vit, global_x, masks, self.mask_token, drop, generator)
        g_cls = g[:, 0]
        out = {"global_cls_features": g_cls}
        patches = g[:, vit.num_prefix_tokens:]
        if masks is not None:  # (M, K), M ≥ 0: every rank runs the same collectives under DDP
            out["masked_patch_logits"] = self.patch_head(patches[masks])
        n_g = len(g_cls)
        if local_x is not None and len(local_x):
            loc = backbone_tokens(vit, local_x, None, None, drop, generator)[:, 0]
            both = self.dino_head(torch.cat([g_cls, loc]))
            out["global_cls_logits"], out["local_cls_logits"] = both[:n_g], both[n_g:]
        else:
            out["global_cls_logits"] = self.dino_head(g_cls)
            out["local_cls_logits"] = g_cls[:0]
        # 0 that touches every parameter: DDP then finds each one in the graph even when a step has
        # no masked patch (mask token, iBOT head unused)
        out["zero"] = sum(p.view(-1)[0] for p in self.parameters()) * 0
        return out

    @torch.no_grad()
    def teacher_outputs(self, global_x: torch.Tensor, masks: torch.Tensor | None) -> dict:
        """Teacher: unmasked global crops; CLS logits and the logits of the patches the student had masked."""
        g = backbone_tokens(self.backbone, global_x)
        out = {"global_cls_logits": self.dino_head(g[:, 0]), "global_cls_features": g[:, 0]}
        if masks is not None:
            out["masked_patch_logits"] = self.patch_head(g[:, self.backbone.num_prefix_tokens:][masks])
        return out


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m θ_t + (1 − m) θ_s for every parameter (DINO §3.1)."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


# ------------------------------------------------------------------ iBOT masking
def block_mask(grid: tuple[int, int], n_mask: int, rng: np.random.Generator, min_patches: int = 4,
               max_patches: int | None = None, min_aspect: float = 0.3) -> np.ndarray:
    """Boolean (h, w) mask with exactly ``n_mask`` patches: BEiT-style blocks (Bao et al. 2021, Alg. 1;
    random area in [min_patches, remaining], log-uniform aspect in [0.3, 1/0.3]) until no block fits,
    then random single patches for the remainder (so the requested ratio is met exactly)."""
    h, w = grid
    mask = np.zeros((h, w), bool)
    max_patches = max_patches if max_patches is not None else n_mask
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < n_mask:
        budget = min(n_mask - count, max_patches)
        added = 0
        if budget >= min_patches:
            for _ in range(10):
                area = rng.uniform(min_patches, budget)
                ar = math.exp(rng.uniform(*log_ar))
                bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
                if 0 < bh < h and 0 < bw < w:
                    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                    new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                    if 0 < new <= budget:
                        mask[top:top + bh, left:left + bw] = True
                        added = new
                        break
        if added == 0:
            break
        count += added
    if count < n_mask:
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, n_mask - count, replace=False)] = True
    return mask


def batch_masks(n_images: int, grid: tuple[int, int], rng: np.random.Generator, probability: float = 0.5,
                ratio: tuple[float, float] = (0.1, 0.5), mode: str = "block") -> torch.Tensor:
    """(n_images, h·w) iBOT masks as DINOv2's collate: ⌊probability·n⌋ images are masked, their
    ratios spread over ``ratio`` (image i uniform in the i-th of n equal bins), the rest unmasked;
    order shuffled. ``mode`` block (BEiT blocks, max ½ of the grid per block) or random patches."""
    N = grid[0] * grid[1]
    n_masked = int(n_images * probability)
    edges = np.linspace(ratio[0], ratio[1], n_masked + 1)
    out = []
    for i in range(n_images):
        k = int(N * rng.uniform(edges[i], edges[i + 1])) if i < n_masked else 0
        if mode == "block":
            m = block_mask(grid, k, rng, max_patches=int(0.5 * N)).ravel()
        else:
            m = np.zeros(N, bool)
            m[rng.choice(N, k, replace=False)] = True
        out.append(m)
    order = rng.permutation(n_images)
    return torch.from_numpy(np.stack(out)[order])


# ------------------------------------------------------------------ multi-crop augmentation (torch only)
def _crop_box(H: int, W: int, scale: tuple[float, float], g: torch.Generator, ratio=(3 / 4, 4 / 3)):
    for _ in range(10):
        area = H * W * float(torch.empty(1).uniform_(*scale, generator=g))
        ar = math.exp(float(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)))
        w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < w <= W and 0 < h <= H:
            return int(torch.randint(0, H - h + 1, (1,), generator=g)), int(torch.randint(0, W - w + 1, (1,), generator=g)), h, w
    return 0, 0, H, W


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] → HSV with H in [0, 1)."""
    r, g, b = x
    maxc, _ = x.max(0)
    minc, _ = x.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``: channel n ∈ {5, 3, 1} is v − v·s·clip(min(k, 4 − k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x
    out = []
    for n in (5, 3, 1):
        k = (n + 6 * h) % 6
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out)


def colour_jitter(x: torch.Tensor, g: torch.Generator, brightness: float, contrast: float, saturation: float,
                  hue: float) -> torch.Tensor:
    """Brightness, contrast, saturation factors uniform in [1 − a, 1 + a], hue shift uniform in [−hue, hue]
    (as torchvision's ColorJitter, fixed order), all clamped to [0, 1]."""
    f = 1 + (2 * torch.rand(3, generator=g) - 1) * torch.tensor([brightness, contrast, saturation])
    x = (x * f[0]).clamp(0, 1)
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])
    x = ((x - grey.mean()) * f[1] + grey.mean()).clamp(0, 1)
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    x = ((x - grey) * f[2] + grey).clamp(0, 1)
    if hue > 0:
        hsv = rgb_to_hsv(x)
        shift = float((2 * torch.rand(1, generator=g) - 1) * hue)
        hsv = torch.stack([(hsv[0] + shift) % 1.0, hsv[1], hsv[2]])
        x = hsv_to_rgb(hsv).clamp(0, 1)
    return x


def gaussian_blur(x: torch.Tensor, sigma: float, kernel: int = 9) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding) of a (3, H, W) image."""
    r = kernel // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t**2 / (2 * sigma**2))
    k = k / k.sum()
    y = F.pad(x.unsqueeze(0), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return y[0]


def augment_view(img: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator, aug: dict,
                 blur_p: float, solarize_p: float) -> torch.Tensor:
    """One DINOv2 view of a (3, H, W) tile in [0, 1]: random resized crop (bicubic, antialiased), flips
    (h, and for pathology v and 90° rotations), colour jitter with p 0.8, greyscale p 0.2, Gaussian
    blur (σ ∈ [0.1, 2]) with ``blur_p``, solarisation (threshold 0.5) with ``solarize_p``."""
    _, H, W = img.shape
    top, left, h, w = _crop_box(H, W, scale, g)
    x = F.interpolate(img[None, :, top:top + h, left:left + w], size=(size, size), mode="bicubic",
                      antialias=True, align_corners=False)[0].clamp(0, 1)
    r = torch.rand(8, generator=g)
    if r[0] < 0.5:
        x = x.flip(-1)
    if aug["rotate"]:
        if r[1] < 0.5:
            x = x.flip(-2)
        x = torch.rot90(x, int(r[2] * 4) % 4, dims=(-2, -1))
    if r[3] < aug["jitter_p"]:
        x = colour_jitter(x, g, aug["brightness"], aug["contrast"], aug["saturation"], aug["hue"])
    if r[4] < aug["grey_p"]:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, -1, -1).clone()
    if r[5] < blur_p:
        sigma = 0.1 + 1.9 * float(r[6])
        x = gaussian_blur(x, sigma)
    if r[7] < solarize_p:
        x = torch.where(x >= 0.5, 1 - x, x)
    return x


def multi_crop(tiles: list[np.ndarray], g: torch.Generator, global_size: int, local_size: int, n_local: int,
               global_scale: tuple[float, float], local_scale: tuple[float, float], aug: dict):
    """DINOv2's DataAugmentationDINO: global crop 1 blurred always, global crop 2 with p 0.1 and
    solarised with p 0.2, locals blurred with p 0.5. Returns (2B, 3, S, S) ordered [crop 1 of all
    tiles, crop 2 of all tiles] and (n_local·B, 3, s, s) ordered by local-crop index."""
    g1, g2, loc = [], [], [[] for _ in range(n_local)]
    for t in tiles:
        img = torch.as_tensor(t).permute(2, 0, 1).float() / 255.0
        g1.append(augment_view(img, global_size, global_scale, g, aug, 1.0, 0.0))
        g2.append(augment_view(img, global_size, global_scale, g, aug, 0.1, 0.2))
        for j in range(n_local):
            loc[j].append(augment_view(img, local_size, local_scale, g, aug, 0.5, 0.0))
    glob = torch.stack(g1 + g2)
    local = torch.stack([v for crops in loc for v in crops]) if n_local else None
    return glob, local


# ------------------------------------------------------------------ optimiser parameter groups
def param_groups(net: SSLNetwork, layer_decay: float, patch_embed_mult: float) -> list[dict]:
    """AdamW groups with lr multipliers and weight-decay switches (DINOv2 §4 / param_groups):
    layer id 0 for patch embedding, tokens and positions, i + 1 for block i, depth + 1 for the final
    norm and heads; lr × decay^(depth + 1 − id), × ``patch_embed_mult`` for the patch embedding; no
    weight decay on biases, norms and LayerScale; the prototype layer flagged."""
    depth = net.backbone.cfg.depth
    groups = []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            sub = name[len("backbone."):]
            if sub.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed")):
                layer = 0
            elif sub.startswith("blocks."):
                layer = int(sub.split(".")[1]) + 1
            else:
                layer = depth + 1
        elif name == "mask_token":
            layer = 0
        else:
            layer = depth + 1
        mult = layer_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            mult *= patch_embed_mult
        no_wd = name.endswith("bias") or "norm" in name or "gamma" in name  # as DINOv2's param groups
        groups.append({"params": [p], "name": name, "lr_mult": mult, "wd_mult": 0.0 if no_wd else 1.0,
                       "last_layer": ".last_layer." in name})
    return groups


# ------------------------------------------------------------------ one step
def ssl_losses(student_out: dict, teacher_out: dict, masks: torch.Tensor, n_images: int, n_local: int,
               teacher_temp: float, hp: dict, centres: nn.ModuleDict | None) -> tuple[torch.Tensor, dict]:
    """Total loss = w_dino·DINO + w_koleo·Σ_crops KoLeo + w_ibot·iBOT (DINOv2 §4) and its parts."""
    B = n_images
    t_cls = teacher_out["global_cls_logits"]
    has_masked = "masked_patch_logits" in teacher_out
    if hp["centering"] == "sinkhorn_knopp":
        t_probs = sinkhorn_knopp(t_cls, teacher_temp)
        t_patch = (sinkhorn_knopp(teacher_out["masked_patch_logits"], teacher_temp,
                                  n_samples=int(_all_reduce(masks.sum().float()).item()))
                   if has_masked else None)
    else:
        t_probs = centres["cls"].probabilities(t_cls, teacher_temp)
        t_patch = centres["patch"].probabilities(teacher_out["masked_patch_logits"], teacher_temp) if has_masked else None
        centres["cls"].update(t_cls)
        if has_masked:
            centres["patch"].update(teacher_out["masked_patch_logits"])
    tau_s = hp["student_temp"]
    s_g = student_out["global_cls_logits"]
    s_l = student_out["local_cls_logits"]
    l_dino = dino_loss(list(s_g.split(B)), list(s_l.split(B)) if n_local else [], list(t_probs.split(B)), tau_s)
    feats = student_out["global_cls_features"]
    l_koleo = sum(koleo(f) for f in feats.split(B))
    if has_masked:
        l_ibot = ibot_loss(student_out["masked_patch_logits"], t_patch, masks, tau_s)
    else:
        l_ibot = torch.zeros((), device=s_g.device)
    total = hp["dino_weight"] * l_dino + hp["koleo_weight"] * l_koleo + hp["ibot_weight"] * l_ibot
    total = total + student_out["zero"]
    with torch.no_grad():
        ent = -(t_probs * t_probs.clamp_min(1e-30).log()).sum(-1).mean()
        marg = t_probs.mean(0)
        marg_ent = -(marg * marg.clamp_min(1e-30).log()).sum()
    parts = {"loss_dino": float(l_dino.detach()), "loss_koleo": float(l_koleo.detach()),
             "loss_ibot": float(l_ibot.detach()), "teacher_entropy": float(ent),
             "teacher_marginal_entropy": float(marg_ent)}
    return total, parts


# ------------------------------------------------------------------ training loop
def build_networks(backbone: VisionTransformer, hp: dict, seed: int) -> tuple[SSLNetwork, SSLNetwork]:
    """Student (heads initialised from ``seed``) and its teacher, an exact copy with no gradients."""
    torch.manual_seed(seed)
    backbone.fast_inference = False
    student = SSLNetwork(backbone, hp["n_prototypes"], hp["head_hidden_dim"], hp["head_bottleneck_dim"],
                         hp["head_layers"], hp["separate_ibot_head"], hp["ibot_prototypes"])
    teacher = copy.deepcopy(student).requires_grad_(False)
    return student, teacher


def train_ssl(backbone: VisionTransformer, normalise, tiles, run, hp: dict, *, steps: int,
              batch_size: int, global_size: int, local_size: int, clip: float, checkpoint_every: int,
              log_every: int) -> dict:
    """DINOv2 pre-training of ``backbone`` (modified in place = the student) on uint8 ``tiles`` (an
    (n, H, W, 3) array, or a ``tiles.TileStream`` that reads each step's sampled tiles only).

    ``hp``: the ``DINOv2Section`` fields. Resumes from ``run``'s checkpoint; every random draw of a
    step comes from a generator seeded by (seed, step, rank), so a resumed run repeats the same steps.
    Returns the loss summary plus ``student`` and ``teacher`` (SSLNetwork) for saving.
    """
    device = run.device
    if batch_size < 2 and hp["koleo_weight"] > 0:
        run.log.warning("KoLeo is skipped: it needs a nearest neighbour within each process's batch of global "
                        "crops, and --batch-size is 1 (use at least 2 to regularise with it)")
    student, teacher = build_networks(backbone, hp, run.seed)
    student.to(device)
    teacher.to(device).eval()
    k_patch = hp["ibot_prototypes"] if hp["separate_ibot_head"] else hp["n_prototypes"]
    centres = nn.ModuleDict({"cls": Centering(hp["n_prototypes"], hp["center_momentum"]),
                             "patch": Centering(k_patch, hp["center_momentum"])}).to(device)
    world = run.world_size
    peak_lr = hp["base_lr"] * math.sqrt(batch_size * world / 1024)  # DINOv2 scaling rule sqrt_wrt_1024
    groups = param_groups(student, hp["layer_decay"], hp["patch_embed_lr_mult"])
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999))
    n = len(tiles)
    warm_lr = int(round(hp["warmup"] * steps))
    warm_tt = int(round(hp["teacher_temp_warmup"] * steps))
    # a fraction of the run, as the warm-ups: one pass over the tiles froze it for all of a run shorter than that
    freeze = int(round(hp["freeze_last_layer"] * steps))
    aug = {k: hp[k] for k in ("brightness", "contrast", "saturation", "hue", "jitter_p", "grey_p", "rotate")}
    start, history = 0, []
    state = run.load_checkpoint()
    if state is not None:
        if state.get("objective") != "dinov2":
            from tubcli.errors import TubError

            raise TubError("the checkpoint to resume is not a --objective dinov2 run; resume it with its own objective")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        centres.load_state_dict(state["centres"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), list(state["history"])
    model = run.ddp(student)
    parts_hist: list[dict] = []
    grid = (global_size // backbone.cfg.patch_size,) * 2
    for step in range(start, steps):
        g = torch.Generator().manual_seed(run.item_seed(f"ssl-step{step}-rank{run.rank}"))
        rng = np.random.default_rng(run.item_seed(f"ssl-mask{step}-rank{run.rank}"))
        idx = torch.randint(0, n, (batch_size,), generator=g).numpy()
        glob, local = multi_crop(take_tiles(tiles, idx), g, global_size, local_size, hp["local_crops"],
                                 tuple(hp["global_scale"]), tuple(hp["local_scale"]), aug)
        glob = normalise(glob).to(device)
        local = normalise(local).to(device) if local is not None else None
        masks = batch_masks(2 * batch_size, grid, rng, hp["mask_probability"], tuple(hp["mask_ratio"]),
                            hp["mask_mode"]).to(device) if hp["ibot_weight"] > 0 else None
        lr = warmup_cosine(step, steps, peak_lr, hp["min_lr"], warm_lr)
        wd = cosine(step, steps, hp["weight_decay"], hp["weight_decay_end"])
        tt = teacher_temperature(step, warm_tt, hp["warmup_teacher_temp"], hp["teacher_temp"])
        momentum = cosine(step, steps, hp["momentum"], 1.0)
        for grp in opt.param_groups:
            grp["lr"] = (0.0 if grp["last_layer"] and step < freeze else lr) * grp["lr_mult"]
            grp["weight_decay"] = wd * grp["wd_mult"]
        student.train()
        t_out = teacher.teacher_outputs(glob, masks)
        s_out = model(glob, local, masks, hp["drop_path"], g)
        loss, parts = ssl_losses(s_out, t_out, masks, batch_size, hp["local_crops"], tt, hp, centres)
        require_finite_loss(loss, step + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = 0.0
        for part in (student.backbone, student.dino_head, student.ibot_head):
            if part is not None:
                gnorm = max(gnorm, float(torch.nn.utils.clip_grad_norm_(part.parameters(), clip)))
        opt.step()
        ema_update(teacher, student, momentum)
        history.append(float(loss.detach()))
        parts_hist.append(parts)
        if (step + 1) % log_every == 0 or step == steps - 1:
            run.log_metrics({"step": step + 1, "loss": history[-1], **parts, "lr": lr, "weight_decay": wd,
                             "teacher_temp": tt, "momentum": momentum, "grad_norm": gnorm})
        if (step + 1) % checkpoint_every == 0 or step == steps - 1:
            run.save_checkpoint({"objective": "dinov2", "student": student.state_dict(),
                                 "teacher": teacher.state_dict(), "centres": centres.state_dict(),
                                 "optimizer": opt.state_dict(), "step": step + 1, "history": history})
    student.eval()
    k = max(1, min(10, len(history) // 10))
    first, last = (float(np.mean(history[:k])), float(np.mean(history[-k:]))) if history else (0.0, 0.0)
    out = {"steps": len(history), "loss_first": first, "loss_last": last,
           "loss_reduction": (first - last) / first if first else 0.0, "student": student, "teacher": teacher,
           "history": history, "parts": parts_hist}
    if parts_hist:
        out["teacher_entropy_last"] = parts_hist[-1]["teacher_entropy"]
        out["teacher_marginal_entropy_last"] = parts_hist[-1]["teacher_marginal_entropy"]
    return out
