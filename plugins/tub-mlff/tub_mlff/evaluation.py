"""Prediction on labelled graphs and the error metrics users of MACE/NequIP report."""

from __future__ import annotations

import numpy as np
import torch
from ase.data import chemical_symbols

from .data import collate, stress_frames
from .properties import compute


TERMS = {"network": "e_nn", "zbl": "e_zbl", "coulomb": "e_coulomb", "d4": "e_d4"}


def predict(models, graphs, dtype=torch.float32, device="cpu", batch_size: int = 16) -> dict:
    """Committee means: energies [M], forces and charges (lists of [N,3], [N]), dipoles [M,3],
    stresses [M,3,3] (NaN for frames without a cell; absent when none has one), the energy terms of
    the decomposition [M] each, and the energy spread."""
    energies, forces, stresses, charges, dipoles, terms = [], [], [], [], [], []
    for model in models:
        model.to(device=device, dtype=dtype).eval()
        e_m, f_m, s_m, q_m, mu_m, t_m = [], [], [], [], [], {k: [] for k in TERMS}
        for k in range(0, len(graphs), batch_size):
            chunk = graphs[k:k + batch_size]
            b = collate(chunk, dtype, device)
            out = compute(model, b, forces=True, stress="cell" in b)
            arr = lambda key: out[key].detach().cpu().double().numpy()  # noqa: E731
            e_m.append(arr("energy"))
            sizes = np.cumsum([0] + [len(g.Z) for g in chunk])
            f, q = arr("forces"), arr("charges")
            f_m += [f[a:z] for a, z in zip(sizes[:-1], sizes[1:])]
            q_m += [q[a:z] for a, z in zip(sizes[:-1], sizes[1:])]
            mu_m.append(arr("dipole"))
            for name, key in TERMS.items():
                t_m[name].append(np.add.reduceat(arr(key), sizes[:-1]))
            s_m.append(arr("stress") if "stress" in out else np.full((len(chunk), 3, 3), np.nan))
        energies.append(np.concatenate(e_m))
        forces.append(f_m)
        charges.append(q_m)
        dipoles.append(np.concatenate(mu_m))
        terms.append({name: np.concatenate(v) for name, v in t_m.items()})
        stresses.append(np.concatenate(s_m))
    e = np.stack(energies)
    per_frame = lambda lists: [np.mean([m[k] for m in lists], axis=0) for k in range(len(graphs))]  # noqa: E731
    res = {"energy": e.mean(0), "energy_std": e.std(0), "forces": per_frame(forces), "charges": per_frame(charges),
           "dipole": np.mean(dipoles, axis=0), "terms": {n: np.mean([t[n] for t in terms], axis=0) for n in TERMS}}
    stress = np.mean(stresses, axis=0)
    if np.isfinite(stress).any():
        res["stress"] = stress
    return res


def select(preds: dict, idx: list[int]) -> dict:
    """The predictions of frames ``idx`` (a :func:`predict` result restricted to them)."""
    out = {}
    for key, value in preds.items():
        if isinstance(value, dict):
            out[key] = {name: np.asarray(v)[idx] for name, v in value.items()}
        elif isinstance(value, list):
            out[key] = [value[i] for i in idx]
        else:
            out[key] = np.asarray(value)[idx]
    return out


def metrics_by_config_type(graphs, preds, config_types: list) -> dict:
    """:func:`error_metrics` of each ``config_type`` (MACE's test tables), when the frames have several."""
    groups: dict[str, list[int]] = {}
    for k, ct in enumerate(config_types):
        groups.setdefault(str(ct) if ct is not None else "(none)", []).append(k)
    if len(groups) < 2:
        return {}
    out = {}
    for name, idx in sorted(groups.items()):
        m = error_metrics([graphs[k] for k in idx], select(preds, idx))
        out[name] = {k: v for k, v in m.items() if k != "energy_terms_meV_atom"}
    return out


def error_metrics(graphs, preds) -> dict:
    """Energy MAE/RMSE per atom (meV/atom), force MAE/RMSE (meV/A), also per element, stress MAE/RMSE (meV/A^3,
    over the periodic frames with stress labels; ``stress_frames`` says how many),
    atomic-charge MAE/RMSE (e) and dipole MAE (e A) where the frames carry them, and the mean energy
    terms per atom (meV/atom: network, ZBL, Coulomb, D4)."""
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
    stressed = stress_frames(graphs)
    if "stress" in preds and stressed:
        ds = preds["stress"][stressed] - np.stack([graphs[k].stress for k in stressed])
        out["stress_mae_meV_A3"] = float(1000 * np.abs(ds).mean())
        out["stress_rmse_meV_A3"] = float(1000 * np.sqrt((ds ** 2).mean()))
        out["stress_frames"] = len(stressed)
    if all(g.charges is not None for g in graphs):
        dq = np.concatenate([p - g.charges for p, g in zip(preds["charges"], graphs)])
        out["charges_mae_e"] = float(np.abs(dq).mean())
        out["charges_rmse_e"] = float(np.sqrt((dq ** 2).mean()))
    if all(g.dipole is not None for g in graphs):
        out["dipole_mae_eA"] = float(np.abs(preds["dipole"] - np.stack([g.dipole for g in graphs])).mean())
    out["energy_terms_meV_atom"] = {name: float(1000 * np.mean(v / n)) for name, v in preds["terms"].items()}
    return out
