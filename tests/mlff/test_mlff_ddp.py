"""Data-parallel training under torchrun (two gloo ranks on CPU): both ranks end with the same
weights, they stop at the same epoch, and only rank 0 writes (one run directory, one metrics line
per epoch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import write

WORKER = Path(__file__).with_name("mlff_ddp_worker.py")


def _tiny_data(path: Path, frames: int = 12) -> None:
    """Rattled CH4 / NH3 molecules labelled with ASE's EMT (a cheap stand-in for xTB)."""
    rng = np.random.default_rng(0)
    ch4 = Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                  [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    nh3 = Atoms("NH3", positions=[[0, 0, 0.1], [0.94, 0, -0.25], [-0.47, 0.81, -0.25], [-0.47, -0.81, -0.25]])
    out = []
    for k in range(frames):
        a = (ch4 if k % 2 == 0 else nh3).copy()
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = None
        a.info["energy"], a.arrays["forces"] = e, f
        out.append(a)
    write(path, out, format="extxyz")


def test_torchrun_two_ranks_train_identically_and_write_once(tmp_path):
    data = tmp_path / "tiny.extxyz"
    _tiny_data(data)
    weights = tmp_path / "weights"
    weights.mkdir()
    env = {**os.environ, "MLFF_DDP_WEIGHTS": str(weights), "OMP_NUM_THREADS": "1", "TUB_NO_PROGRESS": "1",
           "TUB_RUNS_DIR": str(tmp_path / "runs")}
    epochs = 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "mlff", "train", str(data), "--epochs", str(epochs), "--batch-size", "2", "--device", "cpu",
           "--set", "model.num_features=8", "--set", "model.num_modules=1",
           "--set", "model.num_basis_functions=4", "--set", "model.electrostatics=false",
           "--set", "valid_fraction=0.25", "--set", "test_fraction=0.0", "--set", "patience=1",
           "--lr", "0.2", "--set", "ema_decay=0"]  # a large step: the validation loss rises at epoch 1
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(weights / "rank0.pt", weights_only=True)
    r1 = torch.load(weights / "rank1.pt", weights_only=True)
    # the validation loss is all-reduced, so early stopping (patience 1) happens at the same epoch on
    # both ranks (a disagreement would hang the run until the timeout)
    ran = r0["epochs"]
    assert 1 <= ran < epochs and r1["epochs"] == ran and r0["best_val_loss"] == r1["best_val_loss"]
    for which in ("trained", "final"):
        assert r0[which].keys() == r1[which].keys()
        for k in r0[which]:
            assert torch.equal(r0[which][k], r1[which][k]), (which, k)
    runs = list((tmp_path / "runs" / "mlff" / "train").iterdir())
    assert len(runs) == 1  # both ranks agreed on one directory
    run = runs[0]
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == list(range(ran))  # rank 0 only: one line per epoch
    assert (run / "DONE").exists() and (run / "checkpoints" / "model.safetensors").exists()
    meta = json.loads((run / "checkpoints" / "model.json").read_text())
    assert '"world_size": 2' in json.dumps(meta)
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for k, v in saved["model"].items():
        assert torch.equal(v, r0["trained"][k]), k
