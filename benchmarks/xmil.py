"""Throughput of tub-xmil's explainers vs the reference xMIL code on the same bag and weights
(spec §6.4): AttnMIL 256-d, D = 1536, N = 5000, explained class 1.

    XMIL_REF=/tmp/ref-xmil-journal python benchmarks/xmil.py [--n 5000] [--json benchmarks/xmil.json]

The reference (github.com/bifold-pathomics/xMIL, branch xmil-journal, checked out outside the
project) needs captum and einops; when it cannot be imported only tub's figures are printed.
Also checks that both give the same scores (max |diff|) on this bag.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch


def timed(fn, prepare=lambda: None):
    """Seconds of one call of ``fn(prepare())``: the argument is made outside the timer."""
    arg = prepare()
    t = time.perf_counter()
    out = fn(arg)
    return time.perf_counter() - t, out


def compare(tub, ref, prepare, rounds):
    """One warm-up call each, then ``rounds`` interleaved rounds in alternating order (a load change hits
    both sides alike): per-side median seconds, per-round ratios ref/tub, and the last outputs."""
    out_tub, out_ref = tub(None), ref(prepare()) if ref else None
    t_tub, t_ref = [], []
    for r in range(rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            if side == 0:
                dt, out_tub = timed(tub)
                t_tub.append(dt)
            elif ref is not None:
                dt, out_ref = timed(ref, prepare)
                t_ref.append(dt)
    ratios = [b / a for a, b in zip(t_tub, t_ref)]
    return statistics.median(t_tub), (statistics.median(t_ref) if t_ref else None), ratios, out_tub, out_ref


def reference_explainer(state_dict):
    ref = os.environ.get("XMIL_REF", "/tmp/ref-xmil-journal")
    stub = os.environ.get("XMIL_MAMBA_STUB", "/tmp/xmil_parity/stub")
    sys.path[:0] = [stub, ref]
    from models.attention_mil import AttentionMILModel, xAttentionMIL  # noqa: E402

    m = AttentionMILModel(1536, head_dim=2, features_dim=256, inner_attention_dim=128, dropout=None)
    m.load_state_dict(state_dict)
    m.eval()
    return xAttentionMIL(m, explained_class=1, lrp_params={"gamma": 0, "eps": 1e-8, "no_bias": True})


def main(argv=None):
    from tub_xmil.attention_mil import AttentionMIL
    from tub_xmil.explain import explain

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--json", default="benchmarks/xmil.json")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per method and side")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    model = AttentionMIL(1536, 2, features_dim=256).eval()
    x = torch.randn(a.n, 1536, generator=torch.Generator().manual_seed(1)) * 0.05 + 0.05
    methods = {"attention": "attention", "lrp": "lrp", "gi": "gi", "ig": "ig", "single": "perturbation_keep"}
    try:
        xref = reference_explainer(model.state_dict())
    except Exception as exc:  # noqa: BLE001
        print(f"reference not importable ({type(exc).__name__}: {exc}); tub only")
        xref = None
    rows = {}
    for ours, theirs in methods.items():
        def ref(batch, theirs=theirs):
            xref.explained_rel = "softmax" if theirs.startswith("perturbation") else "logit"
            return xref.get_heatmap(batch, theirs)[0]

        def batch():  # a fresh bag per call (the reference may change it), made outside the timer
            return {"features": x.clone(), "bag_size": torch.tensor([a.n]), "targets": torch.tensor([1])}

        t_tub, t_ref, ratios, s_tub, s_ref = compare(lambda _, ours=ours: explain(model, x, ours, target=1),
                                                     ref if xref is not None else None, batch, a.rounds)
        row = {"tub_patches_per_s": a.n / t_tub}
        if t_ref is not None:
            row.update({"ref_patches_per_s": a.n / t_ref, "ratio": statistics.median(ratios),
                        "ratio_min_max": [min(ratios), max(ratios)],
                        "max_abs_diff": float(np.abs(np.asarray(s_ref).ravel() - s_tub).max())})
        rows[ours] = row
    with torch.no_grad():
        logit = model(x)[0, 1].item()
        zero = model(torch.zeros_like(x))[0, 1].item()
    lrp_sum = float(explain(model, x, "lrp", target=1).sum())
    ig_sum = float(explain(model, x, "ig", target=1).sum())
    checks = {"lrp_conservation_abs_err": abs(lrp_sum - logit), "ig_sum": ig_sum,
              "ig_output_difference": logit - zero, "ig_completeness_abs_err": abs(ig_sum - (logit - zero))}
    print(f"LRP sum {lrp_sum:.6f} vs logit {logit:.6f}; IG sum {ig_sum:.6f} vs f(x) - f(0) {logit - zero:.6f}")
    print(f"AttnMIL 256-d, D=1536, N={a.n}, torch threads {torch.get_num_threads()}")
    print(f"median of {a.rounds} interleaved rounds after a warm-up; ratio = ref time / tub time per round")
    print(f"{'method':10s} {'tub p/s':>10s} {'ref p/s':>10s} {'ratio':>7s} {'[min-max]':>15s} {'max|diff|':>10s}")
    for m, r in rows.items():
        lo, hi = r.get("ratio_min_max", (float("nan"), float("nan")))
        print(f"{m:10s} {r['tub_patches_per_s']:10.0f} {r.get('ref_patches_per_s', float('nan')):10.0f} "
              f"{r.get('ratio', float('nan')):7.2f} {f'[{lo:.2f}-{hi:.2f}]':>15s} {r.get('max_abs_diff', float('nan')):10.2e}")
    with open(a.json, "w") as f:
        json.dump({"machine": "2-core CPU dev box", "n": a.n, "rounds": a.rounds, "rows": rows, "checks": checks},
                  f, indent=1)
    return rows


if __name__ == "__main__":
    main()
