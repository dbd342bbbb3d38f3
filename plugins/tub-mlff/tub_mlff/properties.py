"""Derivative properties from autograd: forces, stress, Hessian, dipole.

Forces F = -dE/dR. Stress (tub's addition; the reference has none): apply a symmetric strain
eps to both the positions and the cell, R -> R (1 + eps), and take sigma = (1/V) dE/d eps at
eps = 0 (ASE's sign convention: positive = tensile); structures without a cell (the molecules of
a mixed batch) get NaN. The pair list is held fixed, which is exact because every term goes
smoothly to zero at its cutoff.
"""

from __future__ import annotations

import torch

from tubcli.device import denormals_flushed

from .layers import scatter_sum


def compute(model, batch: dict, forces: bool = True, stress: bool = False, create_graph: bool = False,
            hessian: bool = False) -> dict:
    """Run ``model`` on a batch dict (Z, Q, S, R, idx_i, idx_j, [cell, cell_offsets], batch_seg,
    num_batch) and add ``forces`` [N,3], ``stress`` [B,3,3] (eV/A^3), ``dipole`` [B,3],
    ``hessian`` [3N,3N] (single structure) as asked."""
    R = batch["R"]
    need_grad = forces or stress or hessian
    if need_grad and not R.requires_grad:
        R = R.detach().requires_grad_(True)
    strain = None
    cell = batch.get("cell")
    nb = batch.get("num_batch", 1)
    if stress:
        if cell is None:
            raise ValueError("stress needs a periodic cell")
        strain = torch.zeros(nb, 3, 3, dtype=R.dtype, device=R.device, requires_grad=True)
    with torch.enable_grad(), denormals_flushed():  # subnormal filter products cost 10x on a CPU
        out = model(batch["Z"], batch["Q"], batch["S"], R, batch["idx_i"], batch["idx_j"],
                    cell, batch.get("cell_offsets"), batch.get("batch_seg"), nb,
                    strain=(strain + strain.transpose(1, 2)) / 2 if strain is not None else None,
                    lr_pairs=batch.get("lr_pairs"))
        energy = out["energy"]
        inputs = [R] + ([strain] if stress else [])
        if need_grad:
            if energy.requires_grad:
                grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph or hessian,
                                            allow_unused=True)
            else:  # frozen weights and no pair depends on R (e.g. one isolated atom): zero forces
                grads = (None,) * len(inputs)
            if forces or hessian:
                g = grads[0] if grads[0] is not None else torch.zeros_like(R)
                out["forces"] = -g
            if stress:  # NaN for the molecules of a mixed batch (zero cell, see data.collate)
                vol = torch.abs(torch.linalg.det(cell)).view(-1, 1, 1)
                gs = grads[1] if grads[1] is not None else torch.zeros_like(strain)
                cells = vol > 0
                out["stress"] = torch.where(cells, gs / torch.where(cells, vol, torch.ones_like(vol)),
                                            torch.full_like(gs, float("nan")))
            if hessian:
                gflat = (-out["forces"]).reshape(-1)
                rows = []
                for k in range(gflat.shape[0]):
                    if not gflat.requires_grad:  # forces independent of R: zero Hessian
                        rows.append(torch.zeros_like(R).reshape(-1))
                        continue
                    (h,) = torch.autograd.grad(gflat[k], R, retain_graph=True, allow_unused=True)
                    rows.append(torch.zeros_like(R).reshape(-1) if h is None else h.reshape(-1))
                out["hessian"] = torch.stack(rows)
    out["dipole"] = scatter_sum(out["charges"].unsqueeze(-1) * R.detach(), out["batch_seg"], out["num_batch"])
    return out
