"""Faithfulness of explanation maps by patch flipping (Samek et al., *Evaluating the Visualization
of What a Deep Neural Network Has Learned*, IEEE TNNLS 2017, arXiv 1509.06321).

Patches are removed (set to a fill colour) in the order a map ranks them, most relevant first
(MoRF), and the explained output is recorded after each step. A faithful map makes the output
fall fast: a small area under the perturbation curve (AUPC, trapezoid over the fraction of patches
removed, 0..1). Removing the least relevant first (LeRF) should change it little; the area between
the two curves, ABPC = AUPC(LeRF) − AUPC(MoRF) (Schulz et al., ICLR 2020, arXiv 2001.00396), needs
no reference level. ``patch_flipping_experiment`` compares CP-LRP, AttnLRP, attention rollout and
random orders on a synthetic task whose evidence patches are known (``synthetic.patch_insert_task``);
``random_model_flipping`` on untrained ViTs without ground truth.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def morf_order(heat: torch.Tensor) -> torch.Tensor:
    """Patch indices (row-major on the grid), most relevant first."""
    return torch.argsort(heat.flatten().double(), descending=True, stable=True)


@torch.no_grad()
def deletion_curve(score, x01: torch.Tensor, order: torch.Tensor, patch_size: int, fill: torch.Tensor) -> np.ndarray:
    """Scores of the tile with 0, 1, …, N patches flipped in ``order``: (N + 1,).

    ``score`` maps (B, 3, H, W) tiles in [0, 1] to (B,); ``fill`` is an RGB colour (3,).
    """
    P = patch_size
    gw = x01.shape[-1] // P
    steps = [x01[0].clone()]
    cur = x01[0].clone()
    for idx in order.tolist():
        r, c = divmod(idx, gw)
        cur[:, r * P:(r + 1) * P, c * P:(c + 1) * P] = fill.view(3, 1, 1).to(cur)
        steps.append(cur.clone())
    return score(torch.stack(steps)).double().cpu().numpy()


def aupc(curve: np.ndarray) -> float:
    """Area under the perturbation curve over the fraction of patches removed (trapezoid on [0, 1])."""
    frac = np.linspace(0.0, 1.0, len(curve))
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(frac)) / 2)


def train_patch_classifier(data: dict, cfg, steps: int = 300, batch: int = 32, lr: float = 1e-3, seed: int = 0):
    """A small ViT + linear head trained end to end on ``data`` (tiles, label) from random weights.

    Returns (Encoder with CLS pooling, head nn.Linear, final training accuracy). Training makes the
    attention carry the decision (the CLS token must gather the inserted texture), which a
    random-weight encoder would not.
    """
    from .encoder import Encoder, Transform, uint8_to_float
    from .synthetic import random_vit

    torch.manual_seed(seed)
    enc = Encoder(random_vit(cfg, seed=seed), Transform(img_size=cfg.img_size), "cls")
    head = torch.nn.Linear(enc.dim, int(data["label"].max()) + 1)
    x = uint8_to_float(torch.as_tensor(data["tiles"]))
    y = torch.as_tensor(data["label"]).long()
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    enc.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(head(enc(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        acc = float((head(enc(x)).argmax(1) == y).float().mean())
    return enc, head, acc


METHODS = ("lrp", "attnlrp", "rollout", "random")


def flip_tile(enc, score, target, x01: torch.Tensor, fill: torch.Tensor, generator: torch.Generator,
              n_random: int = 4, methods=METHODS) -> dict:
    """Per method: MoRF and LeRF AUPC of one tile, ABPC = AUPC(LeRF) − AUPC(MoRF) (higher = more
    faithful; Samek et al. 2017 compare MoRF curves, the LeRF side removes the offset), the MoRF
    orders, and the worst conservation error of the LRP maps."""
    from .explaining import patch_relevance

    P = enc.vit.cfg.patch_size
    n = (x01.shape[-2] // P) * (x01.shape[-1] // P)
    out, worst = {}, 0.0
    for m in methods:
        if m == "random":
            orders = [torch.randperm(n, generator=generator) for _ in range(n_random)]
        else:
            heat, _, err = patch_relevance(enc, x01, m, target)
            worst = max(worst, err or 0.0)
            orders = [morf_order(heat)]
        morf = [aupc(deletion_curve(score, x01, o, P, fill)) for o in orders]
        lerf = [aupc(deletion_curve(score, x01, o.flip(0), P, fill)) for o in orders]
        out[m] = {"morf": float(np.mean(morf)), "lerf": float(np.mean(lerf)),
                  "abpc": float(np.mean(lerf) - np.mean(morf)), "orders": orders}
    return out, worst


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (torch.argsort(torch.argsort(t.flatten())).double() for t in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _summary(res: dict) -> dict:
    return {m: {k: float(np.mean(v)) for k, v in r.items()} | {"abpc_per_tile": r["abpc"]} for m, r in res.items()}


def patch_flipping_experiment(n_train: int = 256, n_eval: int = 24, steps: int = 300, seed: int = 0,
                              depth: int = 3, n_random: int = 4) -> dict:
    """Train on ``synthetic.patch_insert_task``, explain the class-1 logit of held-out positive
    tiles, and flip patches by each method's order (fill: the training set's mean colour).

    Per method: mean MoRF AUPC (lower = more faithful), LeRF AUPC, ABPC (higher = more faithful)
    and ``topk_hit`` = share of the top-k patches (k = number of fine-checker patches, the class-1
    evidence) that are fine-checker patches.
    """
    from .encoder import uint8_to_float
    from .lrp import make_target
    from .synthetic import patch_insert_task
    from .vit import ViTConfig

    cfg = ViTConfig(patch_size=8, embed_dim=64, depth=depth, num_heads=4, reg_tokens=2, pos_layout="patches",
                    pos_grid=4, mlp="gelu", mlp_hidden=128)
    train = patch_insert_task(n_train, size=cfg.img_size, patch_size=8, seed=seed)
    test = patch_insert_task(4 * n_eval, size=cfg.img_size, patch_size=8, seed=seed + 1000)
    enc, head, train_acc = train_patch_classifier(train, cfg, steps=steps, seed=seed)
    x_test = uint8_to_float(torch.as_tensor(test["tiles"]))
    with torch.no_grad():
        logits = head(enc(x_test))
    test_acc = float((logits.argmax(1) == torch.as_tensor(test["label"])).float().mean())
    target = make_target("probe", 1, probe=(head.weight.detach(), head.bias.detach()))

    def score(tiles):
        with torch.no_grad():
            return head(enc(tiles))[:, 1]

    fill = torch.as_tensor(train["tiles"].reshape(-1, 3).mean(0) / 255.0, dtype=torch.float32)
    pos = [i for i in np.flatnonzero(test["label"] == 1) if logits[i].argmax() == 1][:n_eval]
    res = {m: {"morf": [], "lerf": [], "abpc": [], "topk_hit": []} for m in METHODS}
    worst, rho = 0.0, []
    g = torch.Generator().manual_seed(seed)
    for i in pos:
        x01 = x_test[i:i + 1]
        mask = torch.as_tensor(test["mask"][i]).flatten()
        k = int(mask.sum())
        tile, err = flip_tile(enc, score, target, x01, fill, g, n_random)
        worst = max(worst, err)
        for m, r in tile.items():
            for key in ("morf", "lerf", "abpc"):
                res[m][key].append(r[key])
            res[m]["topk_hit"].append(float(np.mean([mask[o[:k]].float().mean() for o in r["orders"]])))
        rho.append(_spearman(*(torch.argsort(tile[m]["orders"][0]) for m in ("lrp", "attnlrp"))))
    return {"config": cfg.to_dict(), "train_acc": train_acc, "test_acc": test_acc, "n_eval": len(pos),
            "conservation_max_rel_error": worst, "rank_corr_cp_attn": float(np.mean(rho)),
            "methods": _summary(res)}


def random_model_flipping(n_tiles: int = 16, std: float = 0.1, depth: int = 4, seed: int = 0,
                          n_random: int = 4) -> dict:
    """Patch flipping on random-weight ViTs (no training, no ground truth): explain one random
    embedding dimension (``cls+mean`` pooling) of synthetic H&E tiles. ABPC per tile is divided by
    the standard deviation of the output along a random flipping curve, so tiles weigh equally.
    With larger ``std`` the attention of the untrained ViT is sharper and the softmax path matters.
    """
    from .encoder import Encoder, Transform, uint8_to_float
    from .lrp import make_target
    from .synthetic import random_vit, synthetic_tiles
    from .vit import ViTConfig

    cfg = ViTConfig(patch_size=8, embed_dim=64, depth=depth, num_heads=4, reg_tokens=2, pos_layout="patches",
                    pos_grid=4, mlp="swiglu", mlp_hidden=96)
    enc = Encoder(random_vit(cfg, seed=seed, std=std), Transform(img_size=32), "cls+mean")
    data = synthetic_tiles(n_per_class=(n_tiles + 3) // 4, n_classes=4, n_centers=1, size=32, seed=seed)
    x = uint8_to_float(torch.as_tensor(data["tiles"][:n_tiles]))
    fill = x.mean((0, 2, 3))
    g = torch.Generator().manual_seed(seed)
    res = {m: {"abpc": []} for m in METHODS}
    worst, rho = 0.0, []
    for i in range(len(x)):
        index = int(torch.randint(0, enc.dim, (1,), generator=g))
        target = make_target("dim", index)

        def score(tiles, index=index):
            with torch.no_grad():
                return enc(tiles)[:, index]

        tile, err = flip_tile(enc, score, target, x[i:i + 1], fill, g, n_random)
        worst = max(worst, err)
        spread = float(deletion_curve(score, x[i:i + 1], tile["random"]["orders"][0], 8, fill).std())
        for m, r in tile.items():
            res[m]["abpc"].append(r["abpc"] / max(spread, 1e-12))
        rho.append(_spearman(*(torch.argsort(tile[m]["orders"][0]) for m in ("lrp", "attnlrp"))))
    return {"std": std, "depth": depth, "n_tiles": len(x), "conservation_max_rel_error": worst,
            "rank_corr_cp_attn": float(np.mean(rho)), "methods": _summary(res)}
