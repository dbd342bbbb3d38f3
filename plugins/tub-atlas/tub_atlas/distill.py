"""Feature distillation of a small student ViT from a frozen teacher encoder (spec §2.10).

The route by which small siblings (RudolfV-2-S, Atlas 2-S) are made; the exact recipe of those
models is not published, these are the project's defaults. One augmented view per tile is fed to
both networks (each with its own normalisation). With trainable projections W_c, W_p: D_s -> D_t,

    L = λ_cls·(1 − cos(W_c s_cls, t_cls)) + λ_patch·mean_p(1 − cos(W_p s̃_p, t_p)),

where s̃ is the student patch grid resized (bilinear, antialiased) to the teacher grid.
AdamW (lr 5e-4·batch/256, weight decay 0.05 on weight matrices only: not on biases, norms, LayerScale,
tokens or position embeddings, as DeiT and DINOv2 do), 5 % linear warm-up then cosine to 1e-6, gradient
clipping 3.0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tubcli.runs import require_finite_loss

from .encoder import Encoder
from .tiles import take_tiles
from .vit import VisionTransformer


# ------------------------------------------------------------------ augmentation
def random_resized_crop(img: torch.Tensor, size: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): a random area fraction in ``scale`` and aspect in ``ratio``."""
    _, H, W = img.shape
    area = H * W
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(*scale, generator=generator))
        log_r = torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
        ar = math.exp(float(log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
            break
    else:
        h, w, top, left = H, W, 0, 0
    crop = img[:, top:top + h, left:left + w].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def augment(tiles: list[np.ndarray], size: int, generator: torch.Generator, scale=(0.4, 1.0),
            jitter: float = 0.1) -> torch.Tensor:
    """Random resized crop, h/v flips, 90° rotations, mild brightness/contrast/saturation jitter."""
    out = []
    for t in tiles:
        x = torch.as_tensor(t).permute(2, 0, 1).float() / 255.0
        x = random_resized_crop(x, size, scale, generator=generator)
        r = torch.rand(6, generator=generator)
        if r[0] < 0.5:
            x = x.flip(-1)
        if r[1] < 0.5:
            x = x.flip(-2)
        x = torch.rot90(x, int(r[2] * 4) % 4, dims=(-2, -1))
        b, c, s = (1 + jitter * (2 * r[3:6] - 1)).tolist()
        x = x * b
        mean = x.mean()
        x = (x - mean) * c + mean
        grey = x.mean(0, keepdim=True)
        x = (x - grey) * s + grey
        out.append(x.clamp(0, 1))
    return torch.stack(out)


# ------------------------------------------------------------------ model + loss
class Distiller(nn.Module):
    """Student ViT + projections W_c, W_p (Linear D_s -> D_t); the teacher stays outside, frozen."""

    def __init__(self, student: VisionTransformer, teacher_dim: int):
        super().__init__()
        self.student = student
        D = student.cfg.embed_dim
        self.proj_cls = nn.Linear(D, teacher_dim)
        self.proj_patch = nn.Linear(D, teacher_dim)

    def forward(self, xs: torch.Tensor, t_tokens: torch.Tensor, t_prefix: int, t_grid: tuple[int, int],
                lambda_cls: float = 1.0, lambda_patch: float = 1.0) -> tuple[torch.Tensor, dict]:
        s = self.student.forward_features(xs)
        P = self.student.cfg.patch_size
        gs = (xs.shape[-2] // P, xs.shape[-1] // P)
        s_cls = s[:, 0]
        s_patch = s[:, self.student.num_prefix_tokens:]
        B, N, D = s_patch.shape
        grid = s_patch.transpose(1, 2).reshape(B, D, *gs)
        if gs != tuple(t_grid):
            grid = F.interpolate(grid, size=t_grid, mode="bilinear", antialias=True, align_corners=False)
        s_patch = grid.flatten(2).transpose(1, 2)
        t_cls, t_patch = t_tokens[:, 0], t_tokens[:, t_prefix:]
        l_cls = (1 - F.cosine_similarity(self.proj_cls(s_cls), t_cls, dim=-1)).mean()
        l_patch = (1 - F.cosine_similarity(self.proj_patch(s_patch), t_patch, dim=-1)).mean()
        loss = lambda_cls * l_cls + lambda_patch * l_patch
        return loss, {"loss_cls": float(l_cls.detach()), "loss_patch": float(l_patch.detach())}


def lr_at(step: int, total: int, base_lr: float, warmup_frac: float = 0.05, min_lr: float = 1e-6) -> float:
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay to ``min_lr``."""
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return base_lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def teacher_tokens(teacher: Encoder, x01: torch.Tensor) -> torch.Tensor:
    return teacher.tokens(x01).float()


# ------------------------------------------------------------------ training loop
def decay_groups(net: torch.nn.Module, weight_decay: float, everything: bool = False) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices, none on biases, norms, LayerScale, tokens and
    position embeddings (decaying a norm's gain or a bias towards 0 only hurts; DeiT, DINOv2). ``everything``:
    one group decaying all, as runs before this rule did (a resumed one keeps its optimizer's layout)."""
    if everything:
        return [{"params": [p for p in net.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, plain = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or name.endswith(("cls_token", "reg_token", "pos_embed", "mask_token"))
            (plain if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def train_student(teacher: Encoder, student: VisionTransformer, student_norm, tiles, run, *,
                  steps: int, batch_size: int, crop_size: int, crop_scale_min: float, lr: float,
                  weight_decay: float, warmup: float, clip: float, lambda_cls: float, lambda_patch: float,
                  checkpoint_every: int, log_every: int) -> dict:
    """Distil ``student`` from the frozen ``teacher`` on uint8 ``tiles`` (an (n, H, W, 3) array, or a
    ``tiles.TileStream`` that reads each step's sampled tiles only); resumes from ``run``.

    Returns the loss history summary. ``student_norm`` is the student's own normalisation.
    """
    device = run.device
    teacher.eval().requires_grad_(False).to(device)
    distiller = Distiller(student, teacher.vit.cfg.embed_dim).to(device)
    t_cfg = teacher.vit.cfg
    base_lr = lr * batch_size * run.world_size / 256
    state = run.load_checkpoint()
    old_run = state is not None and len(state.get("optimizer", {}).get("param_groups", [])) == 1
    opt = torch.optim.AdamW(decay_groups(distiller, weight_decay, everything=old_run), lr=base_lr)
    start, history = 0, []
    if state is not None:
        if "distiller" not in state:
            from tubcli.errors import TubError

            raise TubError(f"the checkpoint to resume is a --objective {state.get('objective', '?')} run, not "
                           "distillation; resume it with its own objective")
        distiller.load_state_dict(state["distiller"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), list(state["history"])
        if start >= steps:
            run.log.info("checkpoint is already at step %d of %d", start, steps)
    model = run.ddp(distiller)
    n = len(tiles)
    for step in range(start, steps):
        # per-step generator from (seed, step, rank): a resumed run draws the same batches
        g = torch.Generator().manual_seed(run.item_seed(f"step{step}-rank{run.rank}"))
        idx = torch.randint(0, n, (batch_size,), generator=g).numpy()
        x01 = augment(take_tiles(tiles, idx), crop_size, g, scale=(crop_scale_min, 1.0)).to(device)
        t_tokens = teacher_tokens(teacher, x01)
        t_grid = tuple(s // t_cfg.patch_size for s in teacher.transform.resize(x01[:1]).shape[-2:])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, base_lr, warmup)
        distiller.train()
        loss, parts = model(student_norm(x01), t_tokens, teacher.vit.num_prefix_tokens, t_grid,
                            lambda_cls, lambda_patch)
        require_finite_loss(loss, step + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(distiller.parameters(), clip)
        opt.step()
        history.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step == steps - 1:
            run.log_metrics({"step": step + 1, "loss": history[-1], **parts, "lr": opt.param_groups[0]["lr"],
                             "grad_norm": float(gnorm)})
        if (step + 1) % checkpoint_every == 0 or step == steps - 1:
            run.save_checkpoint({"distiller": distiller.state_dict(), "optimizer": opt.state_dict(),
                                 "step": step + 1, "history": history})
    distiller.eval()
    k = max(1, min(10, len(history) // 10))
    first, last = float(np.mean(history[:k])), float(np.mean(history[-k:]))
    return {"steps": len(history), "loss_first": first, "loss_last": last,
            "loss_reduction": (first - last) / first if first else 0.0, "distiller": distiller}
