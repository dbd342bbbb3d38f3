"""Entry point for the torchrun test: ``tub`` with tub_mlff.training.fit wrapped so that every rank
dumps its final weights to $MLFF_DDP_WEIGHTS/rank<RANK>.pt (the plugin itself writes on rank 0 only)."""

import os
import sys

import torch

torch.set_num_threads(1)

import tub_mlff.training as training
from tubcli.cli import main

_fit = training.fit


def fit_and_dump(model, *args, **kwargs):
    res = _fit(model, *args, **kwargs)
    state = {"trained": {k: v.detach().clone() for k, v in model.state_dict().items()},
             "final": {k: v.detach().clone() for k, v in res["model"].state_dict().items()},
             "epochs": res["epochs"], "best_val_loss": res["best_val_loss"]}
    torch.save(state, os.path.join(os.environ["MLFF_DDP_WEIGHTS"], f"rank{os.environ.get('RANK', '0')}.pt"))
    return res


training.fit = fit_and_dump
main(sys.argv[1:])
