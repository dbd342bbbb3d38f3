"""AttnLRP against CP-LRP, attention rollout and random orders: patch-flipping faithfulness and cost.

Faithfulness (``tub_atlas.faithfulness.patch_flipping_experiment``): a small ViT (P 8, D 64, 4 heads,
2 registers, 32-px tiles) trained from random weights on ``synthetic.patch_insert_task`` (label = the
fine-checker patches outnumber the coarse ones), the class-1 logit of held-out positive tiles explained
by each method, patches set to the mean colour in the map's order (MoRF); AUPC over the fraction
removed (lower = more faithful) and the share of the top-k patches that are fine-checker patches.

Random-weight ViTs (no ground truth; depth 4, SwiGLU, weights N(0, std²)): ABPC = AUPC(LeRF) − AUPC(MoRF)
of one random embedding dimension per synthetic H&E tile, divided by the spread of a random flipping
curve (higher = more faithful). Larger std makes the attention sharper and the softmax path matter.

Cost: seconds per tile of ``lrp(rule=cp)`` and ``lrp(rule=attn)`` on the same random ``vit-t8-demo``
(64-px tiles, fp32), interleaved in one process; ratio = median of per-round ratios (min-max).

    OMP_NUM_THREADS=1 python benchmarks/atlas_attnlrp.py --seeds 0 1 2 --json attnlrp.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def faithfulness(seeds, depth, n_eval, steps):
    from tub_atlas.faithfulness import patch_flipping_experiment

    runs = [patch_flipping_experiment(n_train=256, n_eval=n_eval, steps=steps, seed=s, depth=depth) for s in seeds]
    methods = list(runs[0]["methods"])
    table = {}
    for m in methods:
        per_seed = [r["methods"][m]["morf"] for r in runs]
        table[m] = {"morf_aupc": float(np.mean(per_seed)), "morf_aupc_per_seed": per_seed,
                    "abpc": float(np.mean([r["methods"][m]["abpc"] for r in runs])),
                    "topk_hit": float(np.mean([r["methods"][m]["topk_hit"] for r in runs]))}
    return {"seeds": list(seeds), "depth": depth, "steps": steps,
            "test_acc": [r["test_acc"] for r in runs], "n_eval": [r["n_eval"] for r in runs],
            "rank_corr_cp_attn": float(np.mean([r["rank_corr_cp_attn"] for r in runs])),
            "conservation_max_rel_error": max(r["conservation_max_rel_error"] for r in runs), "methods": table}


def random_models(seeds, stds, n_tiles, depth):
    from tub_atlas.faithfulness import random_model_flipping

    out = []
    for std in stds:
        runs = [random_model_flipping(n_tiles=n_tiles, std=std, depth=depth, seed=s) for s in seeds]
        out.append({"std": std, "depth": depth, "n_tiles": n_tiles, "seeds": list(seeds),
                    "rank_corr_cp_attn": float(np.mean([r["rank_corr_cp_attn"] for r in runs])),
                    "conservation_max_rel_error": max(r["conservation_max_rel_error"] for r in runs),
                    "abpc": {m: float(np.mean([r["methods"][m]["abpc"] for r in runs])) for m in runs[0]["methods"]},
                    "abpc_per_seed": {m: [r["methods"][m]["abpc"] for r in runs] for m in runs[0]["methods"]},
                    "attn_beats_cp_tiles": float(np.mean([a > c for r in runs for a, c in zip(
                        r["methods"]["attnlrp"]["abpc_per_tile"], r["methods"]["lrp"]["abpc_per_tile"])]))})
    return out


def cost(rounds):
    from tub_atlas.encoder import Encoder, Transform
    from tub_atlas.lrp import lrp, make_target
    from tub_atlas.synthetic import preset_config, random_vit

    cfg = preset_config("vit-t8-demo")
    enc = Encoder(random_vit(cfg), Transform(img_size=64), "cls+mean")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = make_target("dim", 0)
    times = {"cp": [], "attn": []}
    for rule in times:  # warm-up
        lrp(enc, x, t, rule=rule)
    for _ in range(rounds):
        for rule in times:
            t0 = time.perf_counter()
            lrp(enc, x, t, rule=rule)
            times[rule].append(time.perf_counter() - t0)
    ratios = [a / c for a, c in zip(times["attn"], times["cp"])]
    return {"model": "vit-t8-demo (depth %d, 64 px)" % cfg.depth,
            "s_per_tile": {k: statistics.median(v) for k, v in times.items()},
            "attn_over_cp": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stds", type=float, nargs="+", default=[0.02, 0.1, 0.3], help="random-model weight std")
    ap.add_argument("--random-tiles", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"machine": "2-core CPU dev box", "faithfulness": faithfulness(args.seeds, args.depth, args.n_eval,
                                                                          args.steps),
           "random_models": random_models(args.seeds, args.stds, args.random_tiles, 4),
           "cost": cost(args.rounds)}
    f = res["faithfulness"]
    print(f"trained ViT, majority task: {len(f['seeds'])} seeds, depth {f['depth']}, test acc {f['test_acc']}, "
          f"tiles {f['n_eval']}, conservation max rel err {f['conservation_max_rel_error']:.1e}, "
          f"Spearman(CP, Attn) {f['rank_corr_cp_attn']:.3f}")
    print(f"{'method':10s} {'MoRF AUPC (lower better)':>25s} {'per seed':>24s} {'ABPC':>8s} {'top-k hit':>10s}")
    for m, v in f["methods"].items():
        seeds = " ".join(f"{a:.3f}" for a in v["morf_aupc_per_seed"])
        print(f"{m:10s} {v['morf_aupc']:25.3f} {seeds:>24s} {v['abpc']:8.3f} {v['topk_hit']:10.3f}")
    print("random-weight ViTs (depth 4, SwiGLU), one random embedding dimension per tile, normalised ABPC "
          "(higher better):")
    for r in res["random_models"]:
        row = "  ".join(f"{m} {v:.3f}" for m, v in r["abpc"].items())
        print(f"  std {r['std']}: {row}  | AttnLRP > CP-LRP on {100 * r['attn_beats_cp_tiles']:.0f} % of tiles, "
              f"Spearman(CP, Attn) {r['rank_corr_cp_attn']:.3f}, cons. err {r['conservation_max_rel_error']:.1e}")
    c = res["cost"]
    print(f"cost on {c['model']}: cp {c['s_per_tile']['cp']:.4f} s/tile, attn {c['s_per_tile']['attn']:.4f} "
          f"s/tile, attn/cp {c['attn_over_cp']['median']:.2f} "
          f"(min {c['attn_over_cp']['min']:.2f}, max {c['attn_over_cp']['max']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
