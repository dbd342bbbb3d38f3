"""PosNeg planted-signal toy (spec §2.6; Hense et al. NeurIPS 2024 §5.1).

10 "numbers"; a bag keeps each number with p = 1/2 (non-empty subset) and draws 30 instances from
the subset with replacement; features N(0, noise^2) + one-hot(number). Label 1 iff
count{4, 6, 8} > count{5, 7, 9}. Evidence for class 1: +1 on {4, 6, 8}, -1 on {5, 7, 9} (class 0:
the opposite signs)."""

from __future__ import annotations

import numpy as np
import torch

POS, NEG = (4, 6, 8), (5, 7, 9)


def posneg_bags(n_bags: int, n_instances: int = 30, noise: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    bags, labels, numbers = [], [], []
    for _ in range(n_bags):
        keep = np.zeros(10, bool)
        while not keep.any():
            keep = rng.random(10) < 0.5
        nums = rng.choice(np.flatnonzero(keep), size=n_instances, replace=True)
        x = rng.normal(0, noise, (n_instances, 10)) + np.eye(10)[nums]
        y = int(np.isin(nums, POS).sum() > np.isin(nums, NEG).sum())
        bags.append(torch.tensor(x, dtype=torch.float32))
        labels.append(y)
        numbers.append(nums)
    return bags, np.array(labels), numbers


def evidence(nums: np.ndarray, cls: int) -> np.ndarray:
    e = np.isin(nums, POS).astype(float) - np.isin(nums, NEG).astype(float)
    return e if cls == 1 else -e
