"""Re-create tests/xmil/xmil_reference_figures.json by running the reference xMIL explainers.

Needs a checkout of github.com/bifold-pathomics/xMIL, branch ``xmil-journal`` (CC BY-NC-ND: keep it
outside the project), and an environment with CPU torch, captum, einops, pandas, scikit-learn, tqdm
and tub-xmil (e.g. a venv made with --system-site-packages)::

    XMIL_REF=/tmp/ref-xmil-journal /tmp/xmilref-venv/bin/python benchmarks/xmil_parity_reference.py

``mamba_ssm`` (CUDA only) is replaced by a step-by-step PyTorch recurrence written to a temporary
folder. AttnMIL uses the MIT CAMELYON16 checkpoint; TransMIL, MambaMIL and the survival/regression
heads use weights made by tub's constructors under fixed seeds, so the test can regenerate them.
Takes ~10 min on 2 CPU cores (the reference's Mamba runs the scan step by step).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT.parent / "shared/reference/xmil/camelyon_attnmil_best_model.pt"
OUT = Path(os.environ.get("XMIL_FIGURES_OUT", ROOT / "tests/xmil/xmil_reference_figures.json"))

STUB = '''
import torch
import torch.nn.functional as F
def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    x = A.new_zeros((u.shape[0], u.shape[1], A.shape[1]))
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(u.shape[2]):
        x = dA[:, :, i] * x + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[..., None]
    return out if z is None else out * F.silu(z)
'''


def main():
    from tub_xmil.checkpoint import build_model

    tmp = Path(tempfile.mkdtemp(prefix="xmil-ref-"))
    (tmp / "mamba_ssm" / "ops").mkdir(parents=True)
    (tmp / "mamba_ssm" / "__init__.py").write_text("")
    (tmp / "mamba_ssm" / "ops" / "__init__.py").write_text("")
    (tmp / "mamba_ssm" / "ops" / "selective_scan_interface.py").write_text(STUB)
    sys.path[:0] = [str(tmp), os.environ.get("XMIL_REF", "/tmp/ref-xmil-journal")]
    from models.attention_mil import AttentionMILModel, xAttentionMIL
    from models.mamba_mil import MambaMILModel, xMambaMIL
    from models.transmil import TransMIL, xTransMIL
    from numpy._core.multiarray import scalar

    def seeded(seed, arch, head, **kw):
        torch.manual_seed(seed)
        return build_model(arch, 768, head, **kw).state_dict()

    bag = torch.randn(200, 768, generator=torch.Generator().manual_seed(1234)) * 0.05 + 0.05
    out = {"bag_sum": float(bag.double().sum())}
    methods = ["attention", "lrp", "gi", "grad2", "ig", "perturbation_keep", "perturbation_drop"]

    def run(name, xm, batch, meths=methods, rel=None):
        for m in meths:
            xm.explained_rel = rel or ("softmax" if m.startswith("perturbation") else "logit")
            if rel == "raw" and not m.startswith("perturbation"):
                xm.explained_rel = "logit"
            b = dict(batch, features=batch["features"].detach().clone())  # a fresh leaf per method
            s, _ = xm.get_heatmap(b, m)
            out[f"{name}/{m}"] = np.asarray(s, dtype=np.float64).ravel().tolist()

    one = {"bag_size": torch.tensor([200]), "targets": torch.tensor([1])}
    with torch.serialization.safe_globals([(scalar, "numpy.core.multiarray.scalar"), np.dtype,
                                           type(np.dtype("f8"))]):
        ck = torch.load(CKPT, weights_only=True, map_location="cpu")
    m = AttentionMILModel(768, head_dim=2, features_dim=256, inner_attention_dim=128, dropout=None)
    m.load_state_dict({k.replace("classifier.", "linear_head."): v for k, v in ck["model_state_dict"].items()})
    m.eval()
    with torch.no_grad():
        out["attnmil/logits"] = m(bag, torch.tensor([200])).ravel().tolist()
    run("attnmil", xAttentionMIL(m, explained_class=1, lrp_params={"gamma": 0, "eps": 1e-8, "no_bias": True}),
        {"features": bag, **one})
    t = TransMIL(768, 256, 2, "cpu")
    t.load_state_dict(seeded(0, "transmil", 2, n_feat=256))
    t.eval()
    with torch.no_grad():
        out["transmil/logits"] = t(bag[None]).ravel().tolist()
    run("transmil", xTransMIL(t, explained_class=1, lrp_params={"gamma": 0, "eps": 1e-8, "no_bias": False}),
        {"features": bag[None], **one})
    mm = MambaMILModel(768, 2, "cpu", features_dim=128)
    mm.load_state_dict(seeded(0, "mambamil", 2, features_dim=128))
    mm.eval()
    with torch.no_grad():
        out["mamba/logits"] = mm(bag[None]).ravel().tolist()
    run("mamba", xMambaMIL(mm, explained_class=1, lrp_params={"gamma": 0, "eps": 1e-8, "no_bias": False}),
        {"features": bag[None], **one})
    ms = AttentionMILModel(768, head_dim=4, is_survival=True)
    ms.load_state_dict(seeded(1, "attnmil", 4))
    ms.eval()
    run("attnmil_surv", xAttentionMIL(ms, head_type="survival", explained_rel="survival",
                                      lrp_params={"gamma": 0, "eps": 1e-8, "no_bias": True}),
        {"features": bag, **one}, ["lrp", "gi", "ig"], rel="survival")
    mr = AttentionMILModel(768, head_dim=1)
    mr.load_state_dict(seeded(2, "attnmil", 1))
    mr.eval()
    run("attnmil_reg", xAttentionMIL(mr, head_type="regression", lrp_params={"gamma": 0, "eps": 1e-8, "no_bias": True}),
        {"features": bag, **one}, ["lrp", "gi", "ig", "perturbation_keep"], rel="raw")

    figs = {"_command": "XMIL_REF=<xMIL xmil-journal checkout> python benchmarks/xmil_parity_reference.py "
                        "(reference run with torch 2.13 CPU, captum 0.9.0)"}
    for k, v in out.items():
        if k == "bag_sum" or k.endswith("/logits"):
            figs[k] = v
            continue
        v = np.array(v)
        figs[k] = {"values": [float(f"{x:.9g}") for x in v[:12]], "sum": float(f"{v.sum():.9g}"),
                   "argmax": int(v.argmax()), "argmin": int(v.argmin())}
    OUT.write_text(json.dumps(figs, indent=0))
    print(f"wrote {OUT} ({len(figs)} entries)")


if __name__ == "__main__":
    main()
