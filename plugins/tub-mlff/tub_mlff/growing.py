"""Grow a trained SpookyNet (more modules, wider features) without changing what it predicts.

Fine-tuning a grown model starts from the trained one's energies and forces, with more capacity;
this is how the demo model gains capacity when more data arrives (models/README.md) instead of
retraining from scratch. Function-preserving growth follows Net2Net (Chen, Goodfellow & Shlens,
ICLR 2016): new units may read anything, but nothing that already existed reads a new unit
until training moves those weights off zero.

- :func:`deepen`: new modules (Eq. 12) whose output ResMLP ends in a zero layer, so their
  contribution y_t to the energy features f = sum_t y_t starts at zero.
- :func:`widen`: F -> F' features. Every old unit keeps its weights; its weights from new units
  are zero. Two places mix channels by something other than a weight matrix and are rescaled:
  the electronic embedding's softplus(q.k / sqrt(F)) (Eq. 5; old key rows times sqrt(F'/F)) and
  the FAVOR+ attention (Eq. 11), whose feature map scales X by d^-1/4 and |X|^2 by d^-1/2 (old
  query/key output rows times (F'/F)^1/4; its random features keep their number and get new
  rows for the new channels). New element-embedding columns are random, so the new channels
  carry signal and receive gradients from the start.
"""

from __future__ import annotations

import torch

from .spookynet import SpookyNet, SpookyNetConfig


def _grown(model: SpookyNet, seed: int, **changes) -> SpookyNet:
    d = model.config.to_dict()
    d.update(changes)
    return SpookyNet(SpookyNetConfig.from_dict(d), seed=seed).to(model.dtype)


def _finish(model: SpookyNet, grown: SpookyNet, state: dict) -> SpookyNet:
    """The grown network (built and filled on the CPU) on the device of ``model``."""
    grown.load_state_dict(state)
    if model.d4 is not None and model.d4.has_tables:
        grown.d4.load_tables(model.d4.tables())
    return grown.to(next(model.parameters()).device).eval()


def deepen(model: SpookyNet, modules: int, seed: int = 1) -> SpookyNet:
    """``model`` with ``modules`` interaction modules; the new ones start with zero output."""
    T = model.config.num_modules
    if modules < T:
        raise ValueError(f"the model already has {T} modules; give at least {T}")
    deep = _grown(model, seed, num_modules=modules)
    state = deep.state_dict()
    state.update({k: v.clone() for k, v in model.state_dict().items()})
    for t in range(T, modules):
        state[f"interactions.{t}.out.lin.weight"].zero_()
        state[f"interactions.{t}.out.lin.bias"].zero_()
    return _finish(model, deep, state)


def _old_index(n_old: int, n_new: int, F: int, Fn: int) -> torch.Tensor:
    """Positions of old units along a grown axis: F-sized axes keep their prefix; 2F-sized ones
    (the [P_a; P_b] projections of Eq. 10) are two halves that move apart."""
    if (n_old, n_new) == (F, Fn):
        return torch.arange(F)
    if (n_old, n_new) == (2 * F, 2 * Fn):
        return torch.cat([torch.arange(F), Fn + torch.arange(F)])
    raise ValueError(f"cannot widen an axis of {n_old} to {n_new} (features {F} -> {Fn})")


def widen(model: SpookyNet, features: int, seed: int = 1) -> SpookyNet:
    """``model`` with ``features`` features per atom, predicting exactly what ``model`` does."""
    F = model.config.num_features
    if features < F:
        raise ValueError(f"the model already has {F} features; give at least {F}")
    m = model.config.num_random_features or F
    wide = _grown(model, seed, num_features=features, num_random_features=m)
    old, state = {k: v.cpu() for k, v in model.state_dict().items()}, wide.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for k, v in old.items():
        w = state[k]
        if w.shape == v.shape:
            state[k] = v.clone()
            continue
        idx = [_old_index(a, b, F, features) if a != b else torch.arange(a) for a, b in zip(v.shape, w.shape)]
        w = w.clone()
        w[torch.meshgrid(*idx, indexing="ij")] = v
        if k.endswith(".weight") and w.dim() == 2 and v.shape[1] != w.shape[1]:
            # a linear layer whose inputs grew: old output units must not read the new inputs
            new_in = torch.ones(w.shape[1], dtype=torch.bool)
            new_in[idx[1]] = False
            w[idx[0].unsqueeze(1), new_in.nonzero().T] = 0.0
        if k == "nuclear.element":
            new = torch.ones(features, dtype=torch.bool)
            new[:F] = False
            std = float(v.std()) or 1.0
            w[:, new] = std * torch.randn(w.shape[0], int(new.sum()), generator=gen, dtype=w.dtype)
        state[k] = w
    for name in ("charge_embedding", "spin_embedding"):
        key = state[f"{name}.key.weight"]
        key[F:] = 0.0  # new key units would add to q.k ...
        key[:F] *= (features / F) ** 0.5  # ... whose 1/sqrt(F) normalisation changed
    scale = (features / F) ** 0.25
    for t in range(model.config.num_modules):
        for qk in ("mlp_q", "mlp_k"):
            for part in ("weight", "bias"):
                p = state.get(f"interactions.{t}.nonlocal_.{qk}.lin.{part}")
                if p is not None:
                    p[F:] = 0.0
                    p[:F] *= scale
    return _finish(model, wide, state)
