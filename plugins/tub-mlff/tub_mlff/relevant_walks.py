"""GNN-LRP for SpookyNet: 1-, 2- and 3-body relevances of the learned energy from relevant walks.

T. Schnake et al., *Higher-order explanations of graph neural networks via relevant walks*,
IEEE TPAMI 44, 7581 (2022); n-body relevances of ML potentials as in Esders et al.,
arXiv:2410.13833, and Bonneau et al., Nat. Commun. 16, 9898 (2025) (tub spec mlff.md, explain 3).

Relevance flows backwards through the node features of the network part of the energy,
E_nn = sum_i e_i. Every nonlinear factor is frozen at its forward value (LRP-0 with conservative
rules, as Ali et al., ICML 2022, do for transformers): the activation's gate sigma(h)/h (swish:
alpha*sigmoid(beta*h); shifted softplus: its ratio, alpha/2 at h = 0), the
attention weights A_ij, and one factor of each p/d product, each product giving half its
relevance to either factor. The explained network is then linear in the embeddings x0 and in its
biases, so Euler's theorem makes the decomposition exact:

    E_nn = sum_i x0_i . g_i  +  sum_b b . dE_nn/db  +  sum_i E_ref(Z_i)

(walk relevance + what the network's biases absorb + the per-element reference energies).

A walk (i_0, ..., i_T) runs through one atom per module boundary (T modules; the state of atom i
is its features x_i and its running energy readout f_i). Restricting the backward pass to the atoms
of a set A at every boundary gives S(A), the summed relevance of all walks inside A, in one pass.
The n-body relevances are the walks whose visited atoms are exactly that set (inclusion-exclusion):

    R_i = S(i),  R_ij = S(ij) - S(i) - S(j),  R_ijk = S(ijk) - S(ij) - S(ik) - S(jk) + S(i) + S(j) + S(k).

ZBL, Coulomb and D4 are explicit pair terms outside the network; `tub mlff explain` reports them
per atom. One structure at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch

from .layers import Swish


@dataclass
class WalkRelevance:
    """n-body relevances (eV) of one structure's network energy E_nn."""

    one_body: np.ndarray                      # [N] R_i
    two_body: np.ndarray                      # [N, N] symmetric R_ij, zero diagonal
    triples: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))  # [M, 3]
    three_body: np.ndarray = field(default_factory=lambda: np.zeros(0))                     # [M]
    walks_total: float = 0.0                  # S(all atoms): relevance of every walk
    bias: float = 0.0                         # relevance absorbed by the network's biases
    reference: float = 0.0                    # sum of the per-element reference energies
    e_nn: float = 0.0                         # the network energy explained (= the three above)

    @property
    def higher_order(self) -> float:
        """Walk relevance not in the listed 1-, 2- and 3-body terms (4-body walks, unlisted triples)."""
        return self.walks_total - self.one_body.sum() - np.triu(self.two_body, 1).sum() - self.three_body.sum()


# -- the network with frozen gates ------------------------------------------------------------
def _gated(act, h):
    """sigma(h) as h times its frozen gate sigma(h)/h (both activations are 0 at 0 with slope alpha/2)."""
    if isinstance(act, Swish):
        gate = act.alpha * torch.sigmoid(act.beta * h)
    else:
        small = h.abs() < 1e-6
        gate = torch.where(small, act.alpha / 2, act(h) / torch.where(small, torch.ones_like(h), h))
    return h * gate.detach()


def _stack(stack, h):
    for b in stack.blocks:
        h = h + b.lin2(_gated(b.act2, b.lin1(_gated(b.act1, h))))
    return h


def _mlp(mlp, h):
    return mlp.lin(_gated(mlp.act, _stack(mlp.stack, h)))


def _product(a, b):
    """a*b with half of the relevance to each factor."""
    return 0.5 * (a * b.detach() + a.detach() * b)


def _local(loc, x, layout):
    n, nf = x.shape
    k = layout.kmax

    def message(y, lin):
        return ((layout.rbf @ lin.weight.T) * y.index_select(0, layout.j)).view(n, k, nf)

    s = _mlp(loc.mlp_x, x) + message(_mlp(loc.mlp_s, x), loc.filter_s).sum(1)
    p = torch.bmm(layout.ang_p, message(_mlp(loc.mlp_p, x), loc.filter_p))
    d = torch.bmm(layout.ang_d, message(_mlp(loc.mlp_d, x), loc.filter_d))
    pa, pb = torch.split(loc.proj_p(p), nf, dim=-1)
    da, db = torch.split(loc.proj_d(d), nf, dim=-1)
    return _mlp(loc.mlp_out, s + _product(pa, pb).sum(-2) + _product(da, db).sum(-2))


def _nonlocal(nl, x, batch_seg):
    with torch.no_grad():  # the attention weights are frozen: relevance flows through the values only
        q = nl._phi(nl.mlp_q(x), True, batch_seg, 1)
        k = nl._phi(nl.mlp_k(x), False, batch_seg, 1)
        a = q @ k.T
        a = a / (a.sum(-1, keepdim=True) + 1e-8)
    return a @ _mlp(nl.mlp_v, x)


def _module(mod, state, layout, batch_seg):
    nf = state.shape[1] // 2
    x, f = state[:, :nf], state[:, nf:]
    x = _stack(mod.pre, x)
    x = _stack(mod.post, x + _local(mod.local, x, layout) + _nonlocal(mod.nonlocal_, x, batch_seg))
    return torch.cat([x, f + _mlp(mod.out, x)], dim=1)


def _capture_inputs(model, batch) -> tuple:
    """Run the model once; return x0, the pair layout, batch_seg and E_nn as the model computes them."""
    seen = {}

    def hook(_mod, args):
        seen["args"] = args

    handle = model.interactions[0].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            props = model.atomic_properties(batch["Z"], batch["Q"], batch["S"], batch["R"], batch["idx_i"],
                                            batch["idx_j"], batch.get("cell"), batch.get("cell_offsets"), None, 1,
                                            lr_pairs=batch.get("lr_pairs"))
    finally:
        handle.remove()
    x0, layout, batch_seg, _ = seen["args"]
    return x0, layout, batch_seg, float(props["e_nn"].double().sum())


# -- relevance of walks inside atom sets --------------------------------------------------------
class WalkExplainer:
    """Masked LRP passes through one structure's frozen-gate network (see the module docstring)."""

    def __init__(self, model, batch) -> None:
        if model.training:
            raise ValueError("put the model in eval mode before explaining it")
        x0, layout, batch_seg, self.e_nn = _capture_inputs(model, batch)
        self.layout, self.batch_seg = layout, batch_seg
        nf = x0.shape[1]
        self.n = x0.shape[0]
        self.states = [torch.cat([x0, torch.zeros_like(x0)], dim=1).detach().requires_grad_(True)]
        self.outputs = []
        self.biases = [[p for name, p in mod.named_parameters() if name.endswith("bias")]
                       for mod in model.interactions]
        frozen = [p for ps in self.biases for p in ps if not p.requires_grad]
        for p in frozen:  # a calculator freezes its weights; the bias relevance needs their gradients
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                for mod in model.interactions:
                    out = _module(mod, self.states[-1], layout, batch_seg)
                    self.outputs.append(out)
                    self.states.append(out.detach().requires_grad_(True))
            readout = model.readout.weight[0].detach()
            self.g_last = torch.cat([torch.zeros(nf, dtype=x0.dtype, device=x0.device), readout])
            self.bias = self._bias_relevance()
        finally:
            for p in frozen:
                p.requires_grad_(False)
        self.reference = float(model.element_bias[batch["Z"], 0].detach().double().sum())

    def _bias_relevance(self) -> float:
        """sum_b b . dE_nn/db over every bias of the interaction modules."""
        total = 0.0
        grad = self.g_last.expand(self.n, -1)
        for t in reversed(range(len(self.outputs))):
            biases = self.biases[t]
            grads = torch.autograd.grad(self.outputs[t], [self.states[t]] + biases, grad, retain_graph=True,
                                        allow_unused=True)
            total += sum(float((b.detach() * g).double().sum()) for b, g in zip(biases, grads[1:]) if g is not None)
            grad = grads[0]
        return total

    def set_relevance(self, masks: torch.Tensor) -> np.ndarray:
        """S(A) for a batch of atom sets given as boolean masks [B, N]."""
        m = masks.to(self.states[0].dtype).unsqueeze(-1)
        grad = m * self.g_last
        for t in reversed(range(len(self.outputs))):
            (grad,) = torch.autograd.grad(self.outputs[t], self.states[t], grad, retain_graph=True,
                                          is_grads_batched=True)
            grad = m * grad
        return (grad * self.states[0].detach()).sum((1, 2)).double().cpu().numpy()

    def sets(self, index_sets: list[tuple[int, ...]], batch_size: int = 64) -> np.ndarray:
        """S(A) for each tuple of atom indices."""
        out = np.empty(len(index_sets))
        device = self.states[0].device
        for start in range(0, len(index_sets), batch_size):
            chunk = index_sets[start:start + batch_size]
            masks = torch.zeros(len(chunk), self.n, dtype=torch.bool, device=device)
            for r, idx in enumerate(chunk):
                masks[r, list(idx)] = True
            out[start:start + len(chunk)] = self.set_relevance(masks)
        return out


def committee_mean(parts: list[WalkRelevance]) -> WalkRelevance:
    """The members' mean relevances: LRP is linear in the explained output, so the mean of the
    members' walks explains the committee's mean network energy with the same exact bookkeeping."""
    if len(parts) == 1:
        return parts[0]
    mean = lambda name: np.mean([getattr(p, name) for p in parts], axis=0)  # noqa: E731
    return WalkRelevance(one_body=mean("one_body"), two_body=mean("two_body"), triples=parts[0].triples,
                         three_body=mean("three_body"),
                         walks_total=float(mean("walks_total")), bias=float(mean("bias")),
                         reference=float(mean("reference")), e_nn=float(mean("e_nn")))


def nearby_triples(distances: np.ndarray, radius: float) -> list[tuple[int, int, int]]:
    """Triples i < j < k whose three distances are all below ``radius``."""
    close = distances < radius
    n = len(distances)
    out = []
    for i in range(n):
        nb = [j for j in range(i + 1, n) if close[i, j]]
        out += [(i, j, k) for j, k in combinations(nb, 2) if close[j, k]]
    return out


def walk_relevances(model, batch, distances: np.ndarray | None = None, order: int = 2,
                    radius: float = 3.0) -> WalkRelevance:
    """1- and 2-body relevances of every atom and pair; with ``order=3`` also the 3-body relevance of
    every triple whose pairwise ``distances`` (minimum image, [N, N]) are all below ``radius``."""
    if order not in (1, 2, 3):
        raise ValueError(f"walk order must be 1, 2 or 3, got {order}")
    ex = WalkExplainer(model, batch)
    n = ex.n
    singles = ex.sets([(i,) for i in range(n)])
    pairs = np.zeros((n, n))
    if order >= 2 and n > 1:
        idx = list(combinations(range(n), 2))
        s = ex.sets(idx)
        for (i, j), v in zip(idx, s):
            pairs[i, j] = pairs[j, i] = v - singles[i] - singles[j]
    res = WalkRelevance(one_body=singles, two_body=pairs, e_nn=ex.e_nn, bias=ex.bias, reference=ex.reference,
                        walks_total=float(ex.sets([tuple(range(n))])[0]))
    if order == 3:
        if distances is None:
            raise ValueError("3-body relevances need the interatomic distances")
        triples = nearby_triples(distances, radius)
        if triples:
            s = ex.sets(triples)
            res.triples = np.asarray(triples, dtype=np.int64)
            res.three_body = np.array([v - pairs[i, j] - pairs[i, k] - pairs[j, k] - singles[i] - singles[j]
                                       - singles[k] for (i, j, k), v in zip(triples, s)])
    return res
