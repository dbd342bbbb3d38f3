"""Task heads: classification, regression, discrete-time survival (spec §2.1 Heads).

Survival (Zadeh & Schmid 2021; MCAT, Chen et al. ICCV 2021): hazards h = sigma(z), survival
S_k = prod_{t<=k} (1 - h_t), risk = -sum_k S_k; loss
L = -c log S_y - (1 - c)(log S_{y-1} + log h_y), S_0 = 1, h and S clamped at 1e-7.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("classification", "regression", "survival")


def survival_risk(logits: torch.Tensor) -> torch.Tensor:
    return -torch.cumprod(1 - torch.sigmoid(logits), dim=1).sum(1)


def explained_output(logits: torch.Tensor, task: str, target: int = 0) -> torch.Tensor:
    """The scalar a gradient method explains: the class logit, output 0, or the risk."""
    if task == "classification":
        return logits[:, target]
    if task == "regression":
        return logits[:, 0]
    return survival_risk(logits)


def prediction_score(logits: torch.Tensor, task: str, target: int = 0) -> torch.Tensor:
    """f for perturbations and patch flipping: class probability, raw output, or risk."""
    if task == "classification":
        return torch.softmax(logits, dim=-1)[:, target]
    if task == "regression":
        return logits[:, 0]
    return survival_risk(logits)


def survival_loss(logits: torch.Tensor, bins: torch.Tensor, censored: torch.Tensor) -> torch.Tensor:
    """Batch-mean discrete-time NLL; ``bins`` in 0..K-1, ``censored`` 1 for alive at last follow-up."""
    h = torch.sigmoid(logits).clamp(min=1e-7)
    S = torch.cumprod(1 - torch.sigmoid(logits), dim=1)
    S_pad = torch.cat([torch.ones_like(S[:, :1]), S], dim=1).clamp(min=1e-7)  # S_0 = 1
    y = bins.long()[:, None]
    c = censored.float()
    s_y = torch.gather(S_pad, 1, y + 1)[:, 0]
    s_prev = torch.gather(S_pad, 1, y)[:, 0]
    h_y = torch.gather(h, 1, y)[:, 0]
    return (-c * torch.log(s_y) - (1 - c) * (torch.log(s_prev) + torch.log(h_y))).mean()


def task_loss(logits, target, task: str, censored=None):
    if task == "classification":
        return F.cross_entropy(logits, target.long())
    if task == "regression":
        return F.mse_loss(logits[:, 0], target.float())
    return survival_loss(logits, target, censored)


def survival_bin_edges(times: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Quartile edges of the training times (pandas ``qcut``), outer edges widened to 0 and inf."""
    t = np.asarray(times, float)
    edges = np.quantile(t, np.linspace(0, 1, n_bins + 1))
    edges[0], edges[-1] = 0.0, np.inf
    return edges


def survival_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time (pandas ``cut`` with right-closed intervals)."""
    idx = np.searchsorted(edges, np.asarray(times, float), side="left") - 1
    return np.clip(idx, 0, len(edges) - 2)
