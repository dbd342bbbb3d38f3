"""Prediction on labelled graphs and the error metrics users of MACE/NequIP report."""

from __future__ import annotations

import numpy as np
import torch
from ase.data import chemical_symbols

from .data import collate
from .properties import compute


def predict(models, graphs, dtype=torch.float32, device="cpu", batch_size: int = 16) -> dict:
    """Committee-mean energies [M], forces (list of [N,3]), stresses and energy spread."""
    energies, forces, stresses = [], [], []
    for model in models:
        model.to(device=device, dtype=dtype).eval()
        e_m, f_m, s_m = [], [], []
        for k in range(0, len(graphs), batch_size):
            chunk = graphs[k:k + batch_size]
            b = collate(chunk, dtype, device)
            out = compute(model, b, forces=True, stress="cell" in b)
            e_m.append(out["energy"].detach().cpu().double().numpy())
            f = out["forces"].detach().cpu().double().numpy()
            sizes = np.cumsum([0] + [len(g.Z) for g in chunk])
            f_m += [f[a:z] for a, z in zip(sizes[:-1], sizes[1:])]
            if "stress" in out:
                s_m.append(out["stress"].detach().cpu().double().numpy())
        energies.append(np.concatenate(e_m))
        forces.append(f_m)
        stresses.append(np.concatenate(s_m) if s_m else None)
    e = np.stack(energies)
    res = {"energy": e.mean(0), "energy_std": e.std(0),
           "forces": [np.mean([fm[k] for fm in forces], axis=0) for k in range(len(graphs))]}
    if all(s is not None for s in stresses):
        res["stress"] = np.mean(stresses, axis=0)
    return res


def error_metrics(graphs, preds) -> dict:
    """Energy MAE/RMSE per atom (meV/atom), force MAE/RMSE (meV/A), also per element, stress MAE (meV/A^3)."""
    n = np.array([len(g.Z) for g in graphs], dtype=float)
    de = (preds["energy"] - np.array([g.energy for g in graphs])) / n
    out = {"frames": len(graphs),
           "energy_mae_meV_atom": float(1000 * np.abs(de).mean()),
           "energy_rmse_meV_atom": float(1000 * np.sqrt((de ** 2).mean()))}
    if all(g.forces is not None for g in graphs):
        df = np.concatenate([p - g.forces for p, g in zip(preds["forces"], graphs)])
        out["forces_mae_meV_A"] = float(1000 * np.abs(df).mean())
        out["forces_rmse_meV_A"] = float(1000 * np.sqrt((df ** 2).mean()))
        # per element, as NequIP reports it: where the force error sits (e.g. stiff C-C bonds vs Na)
        z = np.concatenate([g.Z for g in graphs])
        out["forces_mae_meV_A_by_element"] = {chemical_symbols[int(e)]: float(1000 * np.abs(df[z == e]).mean())
                                              for e in np.unique(z)}
    if "stress" in preds and all(g.stress is not None for g in graphs):
        ds = preds["stress"] - np.stack([g.stress for g in graphs])
        out["stress_mae_meV_A3"] = float(1000 * np.abs(ds).mean())
    return out
