"""Training MIL models: one bag per step, Adam, best-on-validation weights, resumable checkpoints."""

from __future__ import annotations

import numpy as np
import torch

from tubcli.errors import TubError
from tubcli.runs import require_finite_loss

from tub_xmil.checkpoint import build_model
from tub_xmil.metrics import classification_metrics, concordance_index, regression_metrics, undefined_reason
from tub_xmil.tasks import survival_bin_edges, survival_bins, survival_risk, task_loss


# the model settings each architecture reads (spec §2.1); the others would be recorded, not used
ARCH_SETTINGS = {"attnmil": {"features_dim", "num_layers", "n_out_layers", "dropout", "dropout_strategy", "gated"},
                 "transmil": {"features_dim", "num_layers", "n_out_layers", "dropout", "attention"},
                 "mambamil": {"features_dim", "num_layers", "dropout"}}
ARCH_SETTINGS["additivemil"] = ARCH_SETTINGS["attnmil"]


def model_kwargs(arch: str, m) -> dict:
    """Constructor arguments of ``arch`` from the model section; a setting it does not read is an error."""
    from tubcli.config import given_fields

    idle = given_fields(m, sorted(set(type(m).model_fields) - ARCH_SETTINGS[arch] - {"arch"}))
    if idle:
        raise TubError(f"model.{', model.'.join(idle)} do not apply to {arch} (it reads model."
                       f"{', model.'.join(sorted(ARCH_SETTINGS[arch]))}); drop them or choose another --arch")
    if arch == "transmil":
        layers = 2 if m.num_layers is None else m.num_layers
        if layers < 2:  # a config.yaml written before 2026-11-28 holds num_layers: 1, then unused by TransMIL
            raise TubError(f"TransMIL needs model.num_layers >= 2 (TransLayer, PPEG, TransLayer), got {layers}; a "
                           "config.yaml of an earlier tub recorded 1 unused: drop it (2 layers) or set 2 or more")
        n_feat = m.features_dim or 256
        if n_feat % 8:
            raise TubError(f"TransMIL splits model.features_dim into 8 heads: {n_feat} is not a multiple of 8")
        return {"n_feat": n_feat, "n_layers": layers, "n_out_layers": m.n_out_layers, "dropout_feat": m.dropout,
                "attention": m.attention}
    if arch == "mambamil":
        return {"features_dim": m.features_dim or 512, "num_layers": m.num_layers or 1, "dropout": m.dropout}
    return {"features_dim": m.features_dim or 256, "num_layers": m.num_layers or 1, "n_out_layers": m.n_out_layers,
            "dropout": m.dropout, "dropout_strategy": m.dropout_strategy, "gated": m.gated}


def predict(model, slides, task: str) -> np.ndarray:
    """Per slide: class probabilities, the regression output, or the risk. Lazy slides are read one at a
    time (each bag is dropped before the next is read)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in slides:
            z = model(s.features[None].to(device))
            if task == "classification":
                z = torch.softmax(z, -1)[0]
            elif task == "regression":
                z = z[0, :1]
            else:
                z = survival_risk(z)
            out.append(z.cpu().numpy())
    return np.stack(out)


def task_metrics(slides, preds, task: str) -> dict:
    if task == "classification":
        return classification_metrics([s.label for s in slides], preds)
    if task == "regression":
        return regression_metrics([s.label for s in slides], preds[:, 0])
    return {"c_index": concordance_index([s.time for s in slides], [s.event for s in slides], preds[:, 0])}


def bootstrap_slides(slides, preds, task: str, resamples: int, seed: int) -> dict:
    """Percentile intervals of the task metrics resampling patients with all their slides where the slides
    name them (case_id), else slides: a patient's slides are not independent, and resampling them one by
    one gives intervals too narrow."""
    from tubcli.stats import bootstrap_intervals

    from tub_xmil.predictions import case_of

    units: dict[str, list[int]] = {}
    for i, s in enumerate(slides):
        units.setdefault(case_of(s) or f"slide:{s.slide_id}", []).append(i)
    members = list(units.values())

    def metrics(idx):
        rows = [i for u in idx for i in members[u]]
        return task_metrics([slides[i] for i in rows], preds[rows], task)

    ci = bootstrap_intervals(metrics, len(members), resamples, seed=seed)
    return {**ci, "unit": "patient" if len(members) < len(slides) else "slide", "units": len(members)}


def slides_undefined_reason(slides, task: str) -> str | None:
    """Why the task's headline metric cannot be computed on these slides (see metrics.undefined_reason)."""
    if task == "survival":
        return undefined_reason(task, times=[s.time for s in slides], events=[s.event for s in slides])
    return undefined_reason(task, labels=[s.label for s in slides])


def selection_rule(slides, task: str) -> tuple[str, str | None]:
    """The metric the best epoch is chosen by, and why the headline one cannot be (or None).

    AUROC / R² / C-index; where it is undefined (one class, a constant target, no comparable pair) the last
    epoch."""
    why = slides_undefined_reason(slides, task)
    if why is None:
        return {"classification": "auroc", "regression": "r2", "survival": "c_index"}[task], None
    return "last epoch", why


def selection_score(metrics: dict, key: str) -> float:
    v = metrics.get(key, float("nan"))  # "last epoch": every epoch scores the same, ties go to the later one
    return 0.0 if key == "last epoch" else (-np.inf if v is None or np.isnan(v) else float(v))


def class_weights(slides, n_classes: int) -> list[float]:
    """w_c = n / (C n_c) over the training slides (scikit-learn's "balanced"; a class without training
    slides gets 0): with them, each class adds the same total to an epoch's loss."""
    counts = np.bincount([int(s.label) for s in slides], minlength=n_classes)
    return [len(slides) / (n_classes * c) if c else 0.0 for c in counts]


def train_model(cfg, run, train, val, classes) -> tuple[torch.nn.Module, dict]:
    task = cfg.task
    input_dim = int(train[0].shape[1])  # a lazy slide knows its shape without reading the bag
    edges = None
    if task == "survival":
        edges = survival_bin_edges([s.time for s in train], cfg.n_bins)
        for s in train + val:
            s.label = float(survival_bins([s.time], edges)[0])
    head_dim = len(classes) if task == "classification" else (1 if task == "regression" else cfg.n_bins)
    kwargs = model_kwargs(cfg.model.arch, cfg.model)
    model = build_model(cfg.model.arch, input_dim, head_dim, **kwargs).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = run.load_checkpoint()
    start, best, best_state, best_epoch = 0, -np.inf, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best = int(state["epoch"]) + 1, float(state["best"])
        best_epoch = int(state["best_epoch"]) if "best_epoch" in state else None
        best_state = {k[5:]: v for k, v in state.items() if k.startswith("best.")} or None
        run.log.info("resumed at epoch %d", start)
    weights = class_weights(train, head_dim) if cfg.class_weight == "balanced" else None
    ddp = run.ddp(model)
    eval_set = val or train
    selection_set = "validation" if val else "training (no validation slides)"
    rule, why = selection_rule(eval_set, task)
    if why is not None:  # the best epoch would otherwise be chosen by another rule without a word
        run.log.warning("on the %s slides %s; the best epoch is chosen by %s instead -- give a validation "
                        "split that holds both outcomes", selection_set.split(" ")[0], why, rule.replace("_", " "))
    for epoch in range(start, cfg.epochs):
        # randomness drawn from (seed, epoch), as tub-atlas does per step: a resumed run repeats the
        # uninterrupted one exactly. The shuffle is the same on every rank (ranks take slices of it);
        # dropout draws differ per rank.
        torch.manual_seed(run.item_seed(f"epoch{epoch}-rank{run.rank}"))
        gen = torch.Generator().manual_seed(run.item_seed(f"epoch{epoch}"))
        order = torch.randperm(len(train), generator=gen).tolist()
        model.train()
        if run.world_size > 1:  # equal step counts on every rank (DDP all-reduces each step): pad by wrapping
            per_rank = -(-len(order) // run.world_size)
            order = (order * run.world_size)[: per_rank * run.world_size][run.rank::run.world_size]
        losses = []
        for i in order:
            s = train[i]
            x = s.features[None].to(run.device)  # a lazy slide reads its bag from disk here
            y = torch.tensor([s.label], device=run.device)
            c = torch.tensor([1 - s.event], device=run.device)
            loss = task_loss(ddp(x), y, task, c)
            if weights is not None:
                loss = loss * weights[int(s.label)]
            require_finite_loss(loss, f"{epoch + 1} (epoch)")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            del x, loss  # before the next bag is read: about one bag in memory at a time
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        m = task_metrics(eval_set, predict(model, eval_set, task), task)
        row.update({f"{'val' if val else 'train'}_{k}": v for k, v in m.items()})
        score = selection_score(m, rule)
        if score >= best or best_state is None:  # ties: the later (further trained) epoch
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        run.log_metrics(row)
        ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best": best,
              "best_epoch": best_epoch}
        ck.update({f"best.{k}": v for k, v in best_state.items()})
        run.save_checkpoint(ck)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    meta = {"arch": cfg.model.arch, "task": task,
            "kwargs": {"input_dim": input_dim, "head_dim": head_dim, **kwargs},
            "classes": [str(c) for c in classes], "bin_edges": None if edges is None else
            [float(e) if np.isfinite(e) else "inf" for e in edges],
            # the saved weights are the best epoch's (AUROC, R² or C-index; ties: the later epoch) on
            # the validation slides, or on the training slides when there are none
            "best_epoch": best_epoch, "selected_on": selection_set, "selected_by": rule}
    return model, meta
