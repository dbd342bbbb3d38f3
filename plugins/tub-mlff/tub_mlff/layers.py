"""Building blocks of SpookyNet: Swish / shifted softplus, residual blocks, residual MLPs, smooth cutoffs.

Unke et al., *SpookyNet*, Nat. Commun. 12, 7273 (2021), Methods ("Activation function",
"Residual blocks"); tub spec §2.1 and §2.3.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def softplus_inverse(x: float) -> float:
    """Inverse of softplus, for parameters stored as softplus(raw)."""
    return float(x + math.log(-math.expm1(-x)))


def single_thread_blas():
    """Context manager limiting numpy's BLAS/LAPACK to one thread.

    Small factorisations (64x64 QR, 3x3 solves) gain nothing from threads, and on a shared,
    oversubscribed CPU OpenBLAS's spinning threads make them ~100x slower.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


@torch.no_grad()
def orthogonal_(weight: torch.Tensor) -> torch.Tensor:
    """Orthogonal initialisation (Saxe et al. 2014) like ``nn.init.orthogonal_``.

    The Gaussian comes from torch's RNG (so ``torch.manual_seed`` fixes it); the QR runs in numpy,
    which is much faster than torch's on small CPU matrices.
    """
    import numpy as np

    rows, cols = weight.shape[0], weight.numel() // weight.shape[0]
    flat = torch.randn(rows, cols, dtype=torch.float64).numpy()
    if rows < cols:
        flat = flat.T
    with single_thread_blas():
        q, r = np.linalg.qr(flat)
    q = q * np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    weight.copy_(torch.from_numpy(np.ascontiguousarray(q)).view_as(weight))
    return weight


class Swish(nn.Module):
    """sigma(x) = alpha * x * sigmoid(beta * x), alpha and beta learnable per feature."""

    def __init__(self, num_features: int, alpha: float = 1.0, beta: float = 1.702) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((num_features,), float(alpha)))
        self.beta = nn.Parameter(torch.full((num_features,), float(beta)))

    @staticmethod
    def function(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return alpha * x * torch.sigmoid(beta * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, self.alpha, self.beta)


class ShiftedSoftplus(nn.Module):
    """sigma(x) = alpha (softplus(beta x) - ln 2) / beta (alpha x / 2 where beta = 0), alpha and
    beta learnable per feature (the reference's 'ssp' activation, initialised alpha = beta = 1)."""

    def __init__(self, num_features: int, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((num_features,), float(alpha)))
        self.beta = nn.Parameter(torch.full((num_features,), float(beta)))

    @staticmethod
    def function(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        nonzero = beta != 0
        beta_safe = torch.where(nonzero, beta, torch.ones_like(beta))  # no 0/0 in the unused branch
        return alpha * torch.where(nonzero, (F.softplus(beta_safe * x) - math.log(2.0)) / beta_safe, 0.5 * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, self.alpha, self.beta)


ACTIVATIONS = {"swish": Swish, "ssp": ShiftedSoftplus}


def make_activation(name: str, num_features: int) -> nn.Module:
    try:
        return ACTIVATIONS[name](num_features)
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {name!r}") from None


class ResidualBlock(nn.Module):
    """Pre-activation residual block x + W2 s2(W1 s1(x)); W1 orthogonal, W2 and biases zero."""

    def __init__(self, num_features: int, bias: bool = True, activation: str = "swish") -> None:
        super().__init__()
        self.act1 = make_activation(activation, num_features)
        self.lin1 = nn.Linear(num_features, num_features, bias=bias)
        self.act2 = make_activation(activation, num_features)
        self.lin2 = nn.Linear(num_features, num_features, bias=bias)
        orthogonal_(self.lin1.weight)
        nn.init.zeros_(self.lin2.weight)
        if bias:
            nn.init.zeros_(self.lin1.bias)
            nn.init.zeros_(self.lin2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin2(self.act2(self.lin1(self.act1(x))))


class ResidualStack(nn.Module):
    """R_n: n residual blocks applied in sequence."""

    def __init__(self, num_features: int, num_blocks: int = 1, bias: bool = True, activation: str = "swish") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(num_features, bias, activation) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResidualMLP(nn.Module):
    """ResMLP(x) = W sigma(R_n(x)) + b, with no outer skip connection.

    ``zero=True`` starts W at zero (the module then initially outputs only its bias).
    """

    def __init__(self, num_features: int, num_blocks: int = 1, bias: bool = True,
                 zero: bool = False, activation: str = "swish") -> None:
        super().__init__()
        self.stack = ResidualStack(num_features, num_blocks, bias, activation)
        self.act = make_activation(activation, num_features)
        self.lin = nn.Linear(num_features, num_features, bias=bias)
        if zero:
            nn.init.zeros_(self.lin.weight)
        else:
            orthogonal_(self.lin.weight)
        if bias:
            nn.init.zeros_(self.lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.act(self.stack(x)))


def parallel_residual_mlps(mlps, x: torch.Tensor) -> list[torch.Tensor]:
    """[mlp(x) for mlp in mlps], as one batched computation when they share a structure.

    Several ResMLPs read the same features in every SpookyNet module (the s/p/d/x branches of
    the local interaction and q/k/v of the attention). Stacking their weights runs each layer
    as one batched matmul instead of one small matmul per MLP: the same arithmetic with a
    fraction of the operator calls (which dominate on small systems). Falls back to calling
    them one by one for other shapes (more residual blocks, no bias).
    """
    if len(mlps) < 2 or any(len(m.stack.blocks) != 1 or m.lin.bias is None
                            or m.stack.blocks[0].lin1.bias is None for m in mlps):
        return [m(x) for m in mlps]
    blocks = [m.stack.blocks[0] for m in mlps]
    if len({type(a) for m in mlps for a in (m.act, m.stack.blocks[0].act1, m.stack.blocks[0].act2)}) != 1:
        return [m(x) for m in mlps]

    def activation(h, acts):
        alpha = torch.stack([a.alpha for a in acts]).unsqueeze(1)
        beta = torch.stack([a.beta for a in acts]).unsqueeze(1)
        return type(acts[0]).function(h, alpha, beta)

    def linear(h, lins):
        weight = torch.stack([lin.weight for lin in lins]).transpose(1, 2)
        bias = torch.stack([lin.bias for lin in lins]).unsqueeze(1)
        return torch.baddbmm(bias, h, weight)

    X = x.unsqueeze(0).expand(len(mlps), -1, -1)
    h = linear(activation(X, [b.act1 for b in blocks]), [b.lin1 for b in blocks])
    h = X + linear(activation(h, [b.act2 for b in blocks]), [b.lin2 for b in blocks])
    out = linear(activation(h, [m.act for m in mlps]), [m.lin for m in mlps])
    return list(out.unbind(0))


def cutoff_function(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """f_c(r) = exp(-r^2 / ((rc - r)(rc + r))) for r < rc, else 0 (C-infinity smooth).

    The masked branch is fed a safe argument so that autograd never sees 0/0.
    """
    inside = r < cutoff
    r_safe = torch.where(inside, r, torch.zeros_like(r))
    return torch.where(inside, torch.exp(-(r_safe ** 2) / ((cutoff - r_safe) * (cutoff + r_safe))),
                       torch.zeros_like(r))


def switch_function(r: torch.Tensor, cuton: float, cutoff: float) -> torch.Tensor:
    """Smooth step from 1 (r <= cuton) to 0 (r >= cutoff): f_m / (f_p + f_m), f(x) = exp(-1/x)."""
    x = (r - cuton) / (cutoff - cuton)
    ones = torch.ones_like(x)
    zeros = torch.zeros_like(x)

    def component(t: torch.Tensor) -> torch.Tensor:
        t_safe = torch.where(t <= 0, ones, t)
        return torch.where(t <= 0, zeros, torch.exp(-ones / t_safe))

    fp = component(x)
    fm = component(1 - x)
    return torch.where(x <= 0, ones, torch.where(x >= 1, zeros, fm / (fp + fm)))


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum rows of ``values`` into ``size`` bins given by ``index``."""
    out = values.new_zeros((size,) + tuple(values.shape[1:]))
    return out.index_add_(0, index, values)


def softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x)
