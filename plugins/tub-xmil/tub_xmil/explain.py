"""Per-patch explanation scores for MIL models (spec §2.2; Hense et al. NeurIPS 2024, §3-4;
Jamshidi Idaji et al. 2026, §2).

Every method returns one score per patch, s_i = sum_f R_if where the method is feature-wise.
The explained output is the class logit (classification), output 0 (regression) or the risk
(survival); perturbation methods use the class probability, the raw output or the risk.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tubcli.progress import duration, steps

from tub_xmil.lrp import DEFAULT_OUTPUT_RELEVANCE, LRPParams, lrp_chain, output_relevance
from tub_xmil.tasks import explained_output, prediction_score

METHODS = ("lrp", "ig", "single", "attention", "grad2", "gi", "drop", "random", "patch_scores")
SIGNED = {"lrp": True, "ig": True, "single": True, "drop": True, "gi": True,
          "attention": False, "grad2": False, "random": True, "patch_scores": True}
CLASS_AGNOSTIC = {"attention", "random"}  # their scores do not depend on the explained class
ALIASES = {"perturbation_keep": "single", "perturbation_drop": "drop", "keep": "single",
           "attention_rollout": "attention", "rollout": "attention"}


def _bag(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 3 else x[None]


def _checked_bag(model, x) -> torch.Tensor:
    """One bag (N, D) as float32 on the model's device, or a ValueError saying what is wrong with it (a
    batch would be explained for its first bag only, a NaN patch makes every score NaN)."""
    x = torch.as_tensor(x)
    if x.dim() == 3 and len(x) == 1:
        x = x[0]
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"a bag is (patches, dim) features; got shape {tuple(x.shape)} (explain one bag at a time)")
    dim = getattr(model, "input_dim", None)
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"features are {x.shape[1]}-d, the model expects {dim}-d")
    if not torch.isfinite(x).all():
        raise ValueError("the bag holds NaN or infinite features; re-extract them")
    param = next(model.parameters(), None)
    return x.to(dtype=torch.float32, device=param.device if param is not None else None)


def attention_scores(model, x) -> np.ndarray:
    """Softmax attention a_i (AttnMIL, MambaMIL) or attention rollout (TransMIL)."""
    with torch.no_grad():
        if hasattr(model, "attention_rollout"):
            return model.attention_rollout(_bag(x))[0].cpu().numpy()
        return model.attention_weights(_bag(x))[0].cpu().numpy()


def _input_gradient(model, x, task, target):
    x = _bag(x).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = explained_output(model(x), task, target)
        (g,) = torch.autograd.grad(y.sum(), x)
    return x.detach(), g


def gradient_x_input(model, x, task="classification", target=0) -> np.ndarray:
    """GI: s_i = sum_f x_if dy/dx_if."""
    x, g = _input_gradient(model, x, task, target)
    return (x * g).sum(-1)[0].cpu().numpy()


def squared_gradient(model, x, task="classification", target=0) -> np.ndarray:
    """Grad^2: s_i = sum_f (dy/dx_if)^2 (Simonyan et al. 2014 saliency)."""
    _, g = _input_gradient(model, x, task, target)
    return (g ** 2).sum(-1)[0].cpu().numpy()


def gauss_legendre(n_steps: int):
    """Nodes in [0, 1] and weights of the Gauss-Legendre rule (captum's default IG rule)."""
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    return 0.5 * (1 + nodes), 0.5 * weights


def integrated_gradients(model, x, task="classification", target=0, n_steps: int = 50,
                         max_elements: int = 2 ** 26, return_features: bool = False):
    """IG (Sundararajan et al. 2017, Eq. 1) from the zero baseline with a Gauss-Legendre rule:
    R_if = x_if * sum_k w_k dy/dx_if(alpha_k x). Interpolated bags run in batches of steps."""
    x = _bag(x).detach()
    alphas, weights = gauss_legendre(n_steps)
    if hasattr(model, "forward_from_first") and not model.training:
        return _ig_linear_first(model, x, task, target, alphas, weights, max_elements, return_features)
    per_step = x.numel()
    chunk = max(1, min(n_steps, max_elements // max(per_step, 1)))
    # a model's activations can outgrow the interpolated inputs many times (TransMIL's attention: ~6 GB
    # for 50 steps of a 1000-patch bag): at most as many steps per forward as drop-one runs bags of that
    # size within its activation budget, and as the budget holds of what autograd keeps per bag
    # (TransMIL's Nystrom iterations keep a fixed ~50 MB a bag, whatever its size)
    chunk = min(chunk, drop_bags_per_forward(model, x.shape[1] + 1, x.shape[-1], x.element_size()),
                max(1, DROP_BUDGET_BYTES // max(saved_bytes_per_bag(model, x[0], task, target), 1)))
    total = torch.zeros_like(x[0])
    with torch.enable_grad(), steps(n_steps, f"integrated gradients, {n_steps} steps of {x.shape[1]} patches") \
            as advance:
        for s in range(0, n_steps, chunk):
            a = torch.tensor(alphas[s:s + chunk], dtype=x.dtype, device=x.device)
            w = torch.tensor(weights[s:s + chunk], dtype=x.dtype, device=x.device)
            xs = (a[:, None, None] * x[0][None]).requires_grad_(True)
            y = explained_output(model(xs), task, target)
            (g,) = torch.autograd.grad(y.sum(), xs)
            total += (w[:, None, None] * g).sum(0)
            advance(len(a))
    rel = total * x[0]
    return rel.cpu().numpy() if return_features else rel.sum(-1).cpu().numpy()


def _ig_linear_first(model, x, task, target, alphas, weights, max_elements, return_features):
    """IG through a first Linear layer: W(alpha x) + b = alpha (W x) + b, so the path integral of
    dy/dx equals W^T (sum_k w_k dy/dz(alpha_k)); the D-dimensional input is touched twice instead
    of 2 n_steps times. Exact up to float rounding."""
    lin = model.first_linear
    W = lin.weight
    h0 = x[0] @ W.t()  # (N, F)
    b = lin.bias if lin.bias is not None else torch.zeros(W.shape[0], dtype=x.dtype, device=x.device)
    chunk = max(1, min(len(alphas), max_elements // max(h0.numel(), 1)))
    acc = torch.zeros_like(h0)
    with torch.enable_grad():
        for s in range(0, len(alphas), chunk):
            a = torch.tensor(alphas[s:s + chunk], dtype=x.dtype, device=x.device)
            w = torch.tensor(weights[s:s + chunk], dtype=x.dtype, device=x.device)
            z = (a[:, None, None] * h0.detach()[None] + b.detach()).requires_grad_(True)
            y = explained_output(model.forward_from_first(z), task, target)
            (g,) = torch.autograd.grad(y.sum(), z)
            acc += (w[:, None, None] * g).sum(0)
    rel = (acc @ W.detach()) * x[0]
    return rel.cpu().numpy() if return_features else rel.sum(-1).cpu().numpy()


def keep_one_scores(model, x, task="classification", target=0, batch: int = 512) -> np.ndarray:
    """Single: s_i = f({x_i}), each patch alone as a bag of one; the N bags run batched."""
    x = _bag(x)[0]
    with torch.no_grad():
        if hasattr(model, "keep_one_logits"):
            logits = model.keep_one_logits(x)
        else:
            logits = torch.cat([model(x[s:s + batch, None]) for s in range(0, len(x), batch)])
        return prediction_score(logits, task, target).cpu().numpy()


# Drop-one on a model without a closed form runs N forwards of bags of N-1 patches, stacked
# several bags per forward. The number of bags per forward comes from a memory budget: the peak
# activation memory of one bag was measured at ~6-9 (MambaMIL) and ~9-13 (TransMIL) times
# tokens x widest layer x bytes (widest layer: the largest output dimension among the weights, e.g.
# TransMIL's qkv 3 x n_feat, Mamba's in_proj 4 x features_dim), 500-2000 patches, fp32, CPU.
DROP_BUDGET_BYTES = 512 * 2 ** 20
DROP_ACTIVATION_FACTOR = 14
DROP_MAX_BAGS = 64  # the former fixed batch: small bags keep the old batching
DROP_WARN_SECONDS = 600  # drop-one predicted to run longer than this (from its first forward) is warned about


def _widest_layer(model, d: int) -> int:
    """The largest per-token width in the model: the input or any weight's output dimension."""
    return max([d] + [p.shape[0] for p in model.parameters() if p.dim() >= 2])


def drop_bags_per_forward(model, n: int, d: int, itemsize: int = 4, budget: int | None = None) -> int:
    """Bags of n-1 patches per forward so that one forward's activations stay within ``budget``
    bytes (default :data:`DROP_BUDGET_BYTES`); at least 1, at most :data:`DROP_MAX_BAGS`."""
    budget = DROP_BUDGET_BYTES if budget is None else budget
    dtypes = [p.dtype.itemsize for p in model.parameters()] or [4]
    per_bag = max(n - 1, 1) * _widest_layer(model, d) * max(itemsize, *dtypes) * DROP_ACTIVATION_FACTOR
    return int(max(1, min(DROP_MAX_BAGS, n, budget // per_bag)))


def saved_bytes_per_bag(model, x, task="classification", target=0, probe: int = 256) -> int:
    """Bytes autograd keeps for the backward of one bag of ``x``'s size (parameters excluded): measured
    on the bag itself up to ``probe`` patches, beyond that extrapolated linearly from bags of
    ``probe``/2 and ``probe`` patches (every architecture here is linear in N past a fixed part)."""
    n = len(x)
    if n > probe:
        small, large = (saved_bytes_per_bag(model, x[:m], task, target, probe) for m in (probe // 2, probe))
        return int(large + (large - small) * (n - probe) / (probe - probe // 2))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        xs = x[None].detach().clone().requires_grad_(True)
        explained_output(model(xs), task, target).sum()
    return sum(kept.values())


def _warn_if_long(n: int, predicted: float) -> None:
    if predicted > DROP_WARN_SECONDS:
        logging.getLogger("tub").warning(
            "drop-one on %d patches will take about %s (%d forward passes of %d patches: time grows as N^2); "
            "lrp or ig explain a bag in about one backward pass", n, duration(predicted), n, n - 1)


def drop_one_scores(model, x, task="classification", target=0, batch: int | None = None,
                    budget: int | None = None) -> np.ndarray:
    """Occlusion: s_i = f(X) - f(X without x_i).

    Models with ``drop_one_logits`` (AttnMIL, AdditiveMIL) compute the N bags' logits themselves;
    any other model runs the N bags of N-1 patches, ``batch`` bags per forward (default: from the
    memory budget ``budget`` bytes, :func:`drop_bags_per_forward`). Batching changes the scores
    only by float rounding.

    A bag of one patch leaves the empty bag, which no model can run (NaN softmax in AttnMIL, a crash
    in TransMIL's padding and Mamba's conv); spec §2.5 scores the empty bag as f(all-zero features,
    original N), so s_0 = f(X) - f(zeros(1, D)), for every architecture."""
    x = _bag(x)[0]
    n = len(x)
    with torch.no_grad():
        full = prediction_score(model(x[None]), task, target)
        if n == 1:
            logits = model(torch.zeros_like(x)[None])
        elif hasattr(model, "drop_one_logits"):
            logits = model.drop_one_logits(x)
        else:
            if batch is None:
                batch = drop_bags_per_forward(model, n, x.shape[-1], x.element_size(), budget)
            cols = torch.arange(max(n - 1, 0), device=x.device)
            parts = []
            start = time.monotonic()
            with steps(n, f"drop-one, {n} bags of {n - 1} patches") as advance:
                for s in range(0, n, batch):
                    rows = torch.arange(s, min(n, s + batch), device=x.device)
                    parts.append(model(x[cols[None] + (cols[None] >= rows[:, None])]))  # bag i: x without x_i
                    advance(len(rows))
                    if s == 0 and len(rows) < n:
                        _warn_if_long(n, (time.monotonic() - start) * n / len(rows))
            logits = torch.cat(parts)
        return (full - prediction_score(logits, task, target)).cpu().numpy()


def lrp_scores(model, x, task="classification", target=0, params: LRPParams | None = None,
               explained_rel: str | None = None, return_details: bool = False):
    """xMIL-LRP (AH rule for attention, LN rule, gamma/eps rules; Mamba rules) via :mod:`tub_xmil.lrp`."""
    params = params or LRPParams()
    mode = explained_rel or DEFAULT_OUTPUT_RELEVANCE[task]
    tgt = target if task == "classification" else 0
    blocks = model.lrp_blocks(params)
    R, rels, out = lrp_chain(blocks, _bag(x), lambda z: output_relevance(z, mode, tgt), params.eps)
    scores = R.sum(-1)[0].cpu().numpy()
    if return_details:
        det = {"relevance": rels, "explained_output": out, "output_relevance": rels["out"]}
        if "translayer-0" in rels:  # TransMIL: relevance left on the learned CLS token (not an input)
            det["cls_relevance"] = float(rels["translayer-0"][:, 0].sum())
        return scores, det
    return scores


def additive_patch_scores(model, x, task="classification", target=0) -> np.ndarray:
    """AdditiveMIL's own explanation: s_i = c_i[y], the patch's term in the bag logit (they sum to it)."""
    if not hasattr(model, "patch_logits"):
        raise ValueError("patch_scores are the terms of an additive model; train one with --arch additivemil "
                         "or pick another method")
    if task == "survival":
        raise ValueError("patch_scores add up to logits, not to the survival risk; use lrp or ig for survival")
    with torch.no_grad():
        c = model.patch_logits(_bag(x))[0]
    return c[:, target if task == "classification" else 0].cpu().numpy()


def random_scores(x, seed: int = 0) -> np.ndarray:
    """Rand: N(0, 1) per patch from a seeded generator."""
    n = _bag(x).shape[1]
    return np.random.default_rng(seed).standard_normal(n)


def explain(model, x, method: str, task: str = "classification", target: int | None = None,
            lrp: LRPParams | None = None, ig_steps: int = 50, seed: int = 0,
            explained_rel: str | None = None, return_details: bool = False):
    """Dispatch one explanation method on one bag ``x`` (N, D) (a tensor or array); the model is put in
    eval mode and left as found. As ``tub xmil explain``: ``target`` None explains the predicted class,
    and ``lrp`` None takes the spec's defaults for the architecture (TransMIL keeps its biases, §3).

    ``return_details`` (method lrp only) returns (scores, details) as :func:`lrp_scores` does, so
    that a caller needing the CLS/output relevance does not run LRP a second time."""
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)}")
    if return_details and method != "lrp":
        raise ValueError("return_details is available for method lrp only")
    x = _checked_bag(model, x)
    was_training = model.training
    model.eval()
    if task == "classification":
        n_classes = getattr(model, "head_dim", None)
        if target is None:
            with torch.no_grad():
                target = int(model(x[None]).argmax(-1)[0])
        elif n_classes is not None and not 0 <= int(target) < n_classes:
            raise ValueError(f"target {target} is not a class of this model; use an index 0..{n_classes - 1}")
    else:
        target = 0
    if lrp is None:
        lrp = LRPParams(no_bias=getattr(model, "kind", "") != "transmil")
    try:
        if method == "lrp":
            return lrp_scores(model, x, task, target, lrp, explained_rel=explained_rel,
                              return_details=return_details)
        if method == "ig":
            return integrated_gradients(model, x, task, target, ig_steps)
        if method == "gi":
            return gradient_x_input(model, x, task, target)
        if method == "grad2":
            return squared_gradient(model, x, task, target)
        if method == "single":
            return keep_one_scores(model, x, task, target)
        if method == "drop":
            return drop_one_scores(model, x, task, target)
        if method == "attention":
            return attention_scores(model, x)
        if method == "patch_scores":
            return additive_patch_scores(model, x, task, target)
        return random_scores(x, seed)
    finally:
        model.train(was_training)
