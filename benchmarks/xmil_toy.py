"""Planted-signal faithfulness (spec §6.1): PosNeg toy, AttnMIL (32-d, 1 output layer), Adam 1e-3,
15 epochs, 2,000 training bags; 150 test bags, patch dropping at 10%-of-all; AUPRC-2, AUPC, SRG.

    python benchmarks/xmil_toy.py [--bags 2000] [--test 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv=None):
    from sklearn.metrics import roc_auc_score

    from tub_xmil.attention_mil import AttentionMIL
    from tub_xmil.explain import explain
    from tub_xmil.flipping import false_prediction, slide_flipping
    from tub_xmil.metrics import auprc2
    from tub_xmil.toy import evidence, posneg_bags

    ap = argparse.ArgumentParser()
    ap.add_argument("--bags", type=int, default=2000)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="benchmarks/xmil_toy.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    train, ytr, _ = posneg_bags(a.bags, seed=a.seed)
    test, yte, nums = posneg_bags(a.test, seed=a.seed + 1)
    model = AttentionMIL(10, 2, features_dim=32, n_out_layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(a.epochs):
        model.train()
        for i in torch.randperm(len(train)).tolist():
            loss = torch.nn.functional.cross_entropy(model(train[i][None]), torch.tensor([ytr[i]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        p = np.array([torch.softmax(model(b[None]), -1)[0, 1].item() for b in test])
    auc = roc_auc_score(yte, p)
    t_train = time.perf_counter() - t0
    print(f"trained in {t_train:.0f}s, test AUROC {auc:.3f}", flush=True)
    methods = ["ig", "gi", "single", "lrp", "attention", "grad2", "random"]
    rows = {}
    for m in methods:
        ap2, morf, lerf, srg = [], [], [], []
        for i, (x, y) in enumerate(zip(test, yte)):
            s = explain(model, x, m, "classification", int(y), seed=1000 + i)
            v = auprc2(evidence(nums[i], int(y)), s)
            if v is not None:
                ap2.append(v)
            if false_prediction(model, x, "classification", int(y)):
                continue
            r = slide_flipping(model, x, s, "classification", int(y), "10%-of-all", approaches=("drop",))["drop"]
            morf.append(r["aupc_morf"]); lerf.append(r["aupc_lerf"]); srg.append(r["srg"])
        rows[m] = {"auprc2": float(np.mean(ap2)), "aupc_morf": float(np.mean(morf)),
                   "aupc_lerf": float(np.mean(lerf)), "srg": float(np.mean(srg)), "slides": len(srg)}
    ref = {"ig": .694, "gi": .689, "single": .680, "lrp": .441, "attention": .107, "grad2": -.010, "random": .040}
    print(f"PosNeg toy: test AUROC {auc:.3f}; train {t_train:.0f}s; total {time.perf_counter() - t0:.0f}s")
    print(f"{'method':10s} {'AUPRC-2':>8s} {'MoRF':>7s} {'LeRF':>7s} {'SRG':>7s} {'ref SRG':>8s}")
    for m, r in rows.items():
        print(f"{m:10s} {r['auprc2']:8.3f} {r['aupc_morf']:7.3f} {r['aupc_lerf']:7.3f} {r['srg']:7.3f} {ref[m]:8.3f}")
    att = rows["attention"]["srg"]
    checks = {m: bool(rows[m]["srg"] >= 0.35 and rows[m]["srg"] >= 3 * att) for m in ("lrp", "ig", "single")}
    print("targets (SRG >= 0.35 and >= 3x attention):", checks)
    out = {"machine": "2-core CPU dev box", "test_auroc": auc, "methods": rows, "reference_srg": ref,
           "targets_met": checks}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
