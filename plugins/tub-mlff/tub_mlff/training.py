"""Training SpookyNet on energies, forces and stress (the reference ships no training code).

Loss (per batch): w_E MSE(E/N) + w_F MSE(F) + w_S MSE(sigma) [+ w_q MSE(q_i) + w_mu MSE(mu)], with
forces from autograd (create_graph=True so the force error trains the weights). AdamW,
ReduceLROnPlateau, an exponential moving average (EMA) of the weights used for validation and the
saved model, early stopping on the validation loss, and a checkpoint every epoch so a killed run
resumes.

Under torchrun the loop is data-parallel through the core: the model is wrapped by ``run.ddp``
(gradients averaged over ranks), each epoch's shuffled training frames are split over ranks by
``run.sampler`` (a DistributedSampler, padded so every rank takes the same number of steps), and
the validation sums are all-reduced so every rank sees the same loss and takes the same
early-stopping and learning-rate decisions. Only rank 0 writes (the core's Run does that).
Per-element energy offsets are fitted by least squares first and put into the element bias,
so the network learns only the interaction energy (as MACE's E0s).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from tubcli.device import denormals_flushed
from tubcli.runs import require_finite_loss

from .data import Graph, collate, dependent_element_counts, element_energies
from .properties import compute


@dataclass
class TrainSettings:
    epochs: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 0.0
    charges_weight: float = 0.0  # atomic charges against reference charges (e)
    dipole_weight: float = 0.0  # dipole sum_i q_i r_i against the reference (e A), as the SpookyNet paper trains
    ema_decay: float = 0.99
    patience: int = 30
    lr_schedule: str = "plateau"  # "plateau": halve on a stalled validation loss; "cosine": to min_lr at `epochs`
    lr_patience: int = 10
    lr_factor: float = 0.5
    max_minutes: float | None = None
    fit_element_energies: bool = True
    fine_tune: bool = False  # the model came from --init-from: its element bias is corrected, not replaced
    keep: str = "best"  # "best": EMA weights at the lowest validation loss; "last": final EMA weights
    isolated: list | None = None  # one-atom Graphs with the E0 energies (--e0s): the bias fits them, not least squares
    loss: str = "mse"  # "mse", or "huber": quadratic below huber_delta, linear above (MACE's choice)
    huber_delta: float = 0.01  # eV/atom, eV/A, eV/A^3


class EMA:
    """Exponential moving average of the trainable parameters, with the warm-up of torch_ema's
    ``use_num_updates`` (as MACE trains): update n uses decay min(d, (1 + n) / (10 + n)), so the
    average follows the weights while they move most. With a fixed d = 0.99, a run of 100 steps would
    keep 0.99**100 = 37 % of the random initial weights in the model it saves."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0  # a resumed training sets the count its checkpoint recorded
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        m = copy.deepcopy(model)
        m.load_state_dict(self.shadow)
        return m


def _penalty(err: torch.Tensor, s: TrainSettings, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of err**2 ("mse"), or of 2*Huber(err; delta) ("huber"), so both equal err**2 for small errors;
    ``weight`` (broadcast to ``err``: the frames' config weights) multiplies each term, as in MACE.

    Huber (Huber 1964) grows only linearly past delta, so the fit chases the mean absolute error
    instead of the few largest errors; MACE trains its foundation models with it (Batatia et al.
    2023). The factor 2 keeps the weights of an MSE run meaningful when switching.
    """
    if s.loss == "mse":
        terms = err ** 2
    elif s.loss == "huber":
        terms = 2 * torch.nn.functional.huber_loss(err, torch.zeros_like(err), delta=s.huber_delta, reduction="none")
    else:
        raise ValueError(f"unknown loss {s.loss!r}: use mse or huber")
    return (terms if weight is None else terms * weight).mean()


def batch_loss(model, batch: dict, s: TrainSettings, create_graph: bool = True) -> tuple[torch.Tensor, dict]:
    want_stress = s.stress_weight > 0 and "stress" in batch
    out = compute(model, batch, forces="forces" in batch, stress=want_stress, create_graph=create_graph)
    n = batch["n_atoms"]
    de = (out["energy"] - batch["energy"]) / n
    loss = s.energy_weight * _penalty(de, s, batch.get("weight_energy"))
    parts = {"e_mae_atom": de.abs().mean().item()}
    if "forces" in batch:
        df = out["forces"] - batch["forces"]
        loss = loss + s.forces_weight * _penalty(df, s, batch.get("weight_forces"))
        parts["f_mae"] = df.abs().mean().item()
    if want_stress:  # only the frames with stress labels (stress_index: some of them)
        pred = out["stress"] if "stress_index" not in batch else out["stress"][batch["stress_index"]]
        ds = pred - batch["stress"]
        loss = loss + s.stress_weight * _penalty(ds, s, batch.get("weight_stress"))
        parts["s_mae"] = ds.abs().mean().item()
    if s.charges_weight > 0 and "charges" in batch:
        dq = out["charges"] - batch["charges"]
        loss = loss + s.charges_weight * _penalty(dq, s)
        parts["q_mae"] = dq.abs().mean().item()
    if s.dipole_weight > 0 and "dipole" in batch:
        dmu = out["dipole"] - batch["dipole"]  # sum_i q_i r_i: trains the charges
        loss = loss + s.dipole_weight * _penalty(dmu, s)
        parts["mu_mae"] = dmu.abs().mean().item()
    return loss, parts


def _batches(graphs: list[Graph], size: int, rng: np.random.Generator | None, order=None):
    if order is None:
        order = rng.permutation(len(graphs)) if rng is not None else np.arange(len(graphs))
    for k in range(0, len(order), size):
        yield [graphs[i] for i in order[k:k + size]]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(values: list[float]) -> list[float]:
    """Sum ``values`` over ranks (float64, so every rank gets the same numbers); a no-op alone."""
    if not _distributed():
        return values
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def evaluate_loss(model, graphs: list[Graph], s: TrainSettings, dtype, device) -> dict:
    """Mean loss and MAEs over ``graphs`` (forces still from autograd, no graph kept).

    Distributed: each rank evaluates every world_size-th frame and the sums are all-reduced, so
    all ranks return the same figures (and agree on early stopping)."""
    model.eval()
    if _distributed():
        import torch.distributed as dist

        graphs = graphs[dist.get_rank()::dist.get_world_size()]
    tot, n, e_abs, f_abs, f_cnt = 0.0, 0, 0.0, 0.0, 0
    for chunk in _batches(graphs, max(s.batch_size, 16), None):
        batch = collate(chunk, dtype, device)
        loss, parts = batch_loss(model, batch, s, create_graph=False)  # one forward pass: the MAEs come with it
        tot += loss.item() * len(chunk)
        n += len(chunk)
        e_abs += parts["e_mae_atom"] * len(chunk)
        if "forces" in batch:
            f_abs += parts["f_mae"] * batch["forces"].numel()
            f_cnt += batch["forces"].numel()
    tot, n, e_abs, f_abs, f_cnt = _all_reduce_sum([tot, n, e_abs, f_abs, f_cnt])
    return {"loss": tot / max(n, 1), "energy_mae_per_atom": e_abs / max(n, 1),
            "forces_mae": f_abs / f_cnt if f_cnt else None}  # None: frames without forces (energies only)


def init_element_bias(model, graphs: list[Graph], dtype=torch.float32, device="cpu", keep: bool = False,
                      isolated: list[Graph] | None = None) -> None:
    """Fit per-element energies to what the initial model misses (labels minus its prediction,
    which includes the physical terms) and store them in the element bias.

    ``isolated`` (one-atom graphs with the E0s, MACE's ``--E0s``): each element's bias is set so that the
    initial model gives its isolated atom exactly that energy, instead of the least-squares fit.

    A new model (``keep=False``) starts from a zero bias. A model being fine-tuned (``keep=True``,
    ``--init-from``) keeps its bias and gets the least-norm correction, as MACE re-estimates E0s for
    new data: new compositions or a shifted reference are fixed before the first step, while element
    ratios the data cannot separate keep the initial model's split.
    """
    was_training = model.training
    model.eval()
    fitted = isolated or graphs  # a one-atom graph's residual is its element's bias, exactly
    with torch.no_grad():
        if not keep:
            model.element_bias[:, 0] = 0.0
        predicted = []
        for chunk in _batches(fitted, 32, None):
            b = collate(chunk, dtype, device)
            predicted.append(model(b["Z"], b["Q"], b["S"], b["R"], b["idx_i"], b["idx_j"], b.get("cell"),
                                   b.get("cell_offsets"), b["batch_seg"], b["num_batch"])["energy"].cpu().numpy())
    predicted = np.concatenate(predicted)
    residual = [Graph(g.Z, g.R, g.cell, g.idx_i, g.idx_j, g.offsets, g.Q, g.S, energy=g.energy - p, weights=g.weights)
                for g, p in zip(fitted, predicted)]
    e0 = element_energies(residual, model.config.zmax)  # one-atom graphs: the residuals themselves
    with torch.no_grad():
        model.element_bias[:, 0] += torch.as_tensor(e0, dtype=model.element_bias.dtype, device=model.element_bias.device)
    model.train(was_training)


def fit(model, train: list[Graph], valid: list[Graph], s: TrainSettings, run, dtype=torch.float32,
        device="cpu", seed: int = 0, state: dict | None = None, member: int = 0, on_epoch=None,
        record: dict | None = None) -> dict:
    """Train ``model`` in place; returns the EMA model's validation metrics and the best EMA state.

    ``state`` is a checkpoint dict from an earlier, interrupted call (resume). ``run`` provides
    save_checkpoint/log_metrics/log; ``on_epoch(epoch, metrics)`` is an optional hook. ``record``
    (strings and numbers, e.g. the training files' fingerprints) goes into every checkpoint, so that
    a resume can check it.
    """
    model.to(device=device, dtype=dtype)
    if state is None and member == 0:  # once per run, not per committee member
        dependent = dependent_element_counts(train)
        if dependent:
            run.log.warning("the element counts (%s) are linearly dependent over the training frames, so their "
                            "per-element energies are not identifiable and the model's energy can be off by eV on "
                            "other stoichiometries; add frames of other compositions", dependent)
    if state is None and s.fit_element_energies:
        init_element_bias(model, train, dtype, device, keep=s.fine_tune, isolated=s.isolated)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, amsgrad=True,
                            foreach=True)  # one multi-tensor update, not ~400 small ones: ~13% of a CPU step
    if s.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(s.epochs, 1), eta_min=s.min_lr)
    elif s.lr_schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=s.lr_factor, patience=s.lr_patience,
                                                           min_lr=s.min_lr)
    else:
        raise ValueError(f"unknown lr_schedule {s.lr_schedule!r}: use plateau or cosine")
    # torchrun: DDP wrapper (averages gradients) and a per-rank shard of the frames; both are
    # no-ops in a single process, where the numpy shuffle below is used. Wrapped before the EMA copies the
    # weights: DDP gives every rank rank 0's, so the ranks' EMAs start equal (on CUDA the per-rank element
    # bias fit differs in rounding, as scatter's atomics sum in any order)
    net = run.ddp(model) if getattr(run, "world_size", 1) > 1 else model
    sampler = run.sampler(train, shuffle=True) if getattr(run, "world_size", 1) > 1 else None
    ema = EMA(model, s.ema_decay)
    start, best, bad, best_state, best_epoch = 0, math.inf, 0, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if s.lr_schedule == "cosine" and sched.T_max != max(s.epochs, 1):  # resumed to extend (or cut) the run
            sched.T_max, e = max(s.epochs, 1), sched.last_epoch  # anneal to min_lr at the new end, from the
            for group, base in zip(opt.param_groups, sched.base_lrs):  # new curve's value at this epoch
                group["lr"] = s.min_lr + (base - s.min_lr) * (1 + math.cos(math.pi * e / sched.T_max)) / 2
        ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        ema.updates = int(state.get("ema_updates", 10**9))  # a checkpoint from before the warm-up: past it
        start, best, bad = int(state["epoch"]) + 1, float(state["best_val"]), int(state["bad_epochs"])
        best_state = state.get("best_ema")
        best_epoch = state.get("best_epoch")  # None in a checkpoint from before it was recorded
    rng = np.random.default_rng(seed + 7919 * member)
    for _ in range(start):  # replay the shuffles so a resumed run sees the same batches
        rng.permutation(len(train))
    t0 = time.time()
    metrics = {}
    for epoch in range(start, s.epochs):
        model.train()
        net.train()
        train_loss, seen = 0.0, 0
        if sampler is not None:
            sampler.set_epoch(epoch + 7919 * member)
            order = list(sampler)
        else:
            order = None
        for chunk in _batches(train, s.batch_size, rng, order):
            batch = collate(chunk, dtype, device)
            opt.zero_grad(set_to_none=True)
            with denormals_flushed():  # the parameter gradients too (compute() flushes the forward pass)
                loss, _ = batch_loss(net, batch, s)
                require_finite_loss(loss, f"{epoch + 1} (epoch)")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                ema.update(model)
            train_loss += loss.item() * len(chunk)
            seen += len(chunk)
        train_loss, seen = _all_reduce_sum([train_loss, seen])
        train_loss = train_loss * len(train) / max(seen, 1)  # per-frame mean, scaled as before
        if model.d4 is not None and model.d4.has_tables:
            model.d4.compute_refc6()  # s_q may have changed
        ema_model = ema.copy_to(model)
        val = evaluate_loss(ema_model, valid, s, dtype, device) if valid else {"loss": train_loss / len(train)}
        if s.lr_schedule == "plateau":
            sched.step(val["loss"])
        else:
            sched.step()
        improved = val["loss"] < best - 1e-12
        if improved:
            best, bad, best_epoch = val["loss"], 0, epoch
            best_state = {k: v.detach().clone() for k, v in ema.shadow.items()}
        else:
            bad += 1
        metrics = {"member": member, "epoch": epoch, "train_loss": train_loss / len(train),
                   "val_loss": val["loss"], "val_energy_mae_per_atom": val.get("energy_mae_per_atom"),
                   "val_forces_mae": val.get("forces_mae"), "lr": opt.param_groups[0]["lr"]}
        run.log_metrics(metrics)
        run.log.info("member %d epoch %d train %.4g val %.4g E-MAE %.2f meV/atom F-MAE %.1f meV/A",
                     member, epoch, metrics["train_loss"], val["loss"],
                     1000 * (val.get("energy_mae_per_atom") or float("nan")),
                     1000 * (val.get("forces_mae") or float("nan")))
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "ema": ema.shadow, "ema_updates": ema.updates, "epoch": epoch, "best_val": best, "bad_epochs": bad,
                "member": member, "best_ema": best_state, "best_epoch": best_epoch, "epochs": s.epochs,
                **(record or {})}
        run.save_checkpoint(ckpt, best=improved)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if bad >= s.patience:
            run.log.info("early stopping at epoch %d", epoch)
            break
        over = s.max_minutes is not None and (time.time() - t0) / 60 > s.max_minutes
        if s.max_minutes is not None and _all_reduce_sum([float(over)])[0] > 0:  # any rank over: all stop
            run.log.info("time limit reached at epoch %d", epoch)
            break
    final = copy.deepcopy(model)
    final.load_state_dict(best_state if (s.keep == "best" and best_state is not None) else ema.shadow)
    final.eval()
    kept = best_epoch if (s.keep == "best" and best_state is not None) else metrics.get("epoch", start - 1)
    return {"model": final, "best_val_loss": best, "epochs": metrics.get("epoch", start) + 1, "kept_epoch": kept}
