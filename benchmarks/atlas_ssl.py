"""DINOv2 self-supervision (``tub atlas train --objective dinov2``): loss curve, probe accuracy against
random init and the distillation objective on one synthetic task, and seconds per step of a ViT-S/8.

    OMP_NUM_THREADS=1 python benchmarks/atlas_ssl.py --json out.json [--seeds 3] [--steps 150] [--ablations]
        [--skip-timing] [--skip-probe]

Probe task: ``synthetic_tiles(32, 4 classes, 4 stain centres, 64 px, seed 3)``, kNN (k 20, cosine,
uniform vote) on cls+mean embeddings at 32 px, split 70/30 grouped by slide. All models share one tiny
ViT shape (P 4, D 64, depth 2, 4 heads, 1 register). SSL: batch 32, 2 global crops of 32 px, 4 local
crops of 16 px, base_lr 0.02, K 256 prototypes (head 128 → 32); the rest DINOv2 defaults. Distillation:
the same student shape distilled (spec §2.10 loss) from a random-init ``vit-t8-demo`` teacher (depth 2,
64 px input), the only teacher available offline, for the same number of steps and batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tubcli.runs import Run
from tub_atlas.config import DINOv2Section, TrainConfig
from tub_atlas.dinov2_ssl import train_ssl
from tub_atlas.distill import train_student
from tub_atlas.embedding import group_split
from tub_atlas.encoder import Encoder, Transform, uint8_to_float
from tub_atlas.probes import classification_metrics, knn_predict
from tub_atlas.synthetic import preset_config, random_vit, synthetic_tiles
from tub_atlas.vit import VisionTransformer, ViTConfig

TINY = ViTConfig(patch_size=4, embed_dim=64, depth=2, num_heads=4, reg_tokens=1, pos_grid=8, mlp="gelu",
                 mlp_hidden=128)


def student_start(seed: int):
    """A student from scratch as `tub atlas train` starts it (the training initialisation: LayerScale 1e-5, zero
    biases, truncated N(0, 0.02)); the random-init baseline is that same network untrained."""
    return VisionTransformer(TINY).init_for_training(torch.Generator().manual_seed(seed))


def _run(root, name, seed):
    return Run("atlas", "train", TrainConfig(device="cpu", seed=seed), out=Path(root) / name)


def knn_bacc(vit, tiles, y, tr, te, size=32):
    enc = Encoder(vit.eval(), Transform(img_size=size), "cls+mean")
    with torch.inference_mode():
        x = enc(uint8_to_float(tiles)).numpy()
    return classification_metrics(y[te], knn_predict(x[tr], y[tr], x[te], 4, k=20), 4)["balanced_accuracy"]


def probe_comparison(seeds: int, steps: int, root: str) -> dict:
    data = synthetic_tiles(32, 4, 4, 64, seed=3)
    y = np.array([int(s[-1]) for s in data["label"]])
    split = np.array(group_split(list(data["slide_id"]), 0, (0.7, 0.0, 0.3)))
    tr, te = split == "train", split == "test"
    hp = DINOv2Section(local_crops=4, local_crop_size=16, n_prototypes=256, head_hidden_dim=128,
                       head_bottleneck_dim=32, ibot_prototypes=256, base_lr=0.02).model_dump()
    rows, curves = [], []
    for seed in range(seeds):
        row = {"seed": seed, "random_init": knn_bacc(student_start(seed), data["tiles"], y, tr, te)}
        t0 = time.perf_counter()
        res = train_ssl(student_start(seed), Transform(img_size=32).normalise, data["tiles"],
                        _run(root, f"ssl{seed}", seed), hp, steps=steps, batch_size=32, global_size=32, local_size=16,
                        clip=3.0, checkpoint_every=10**6, log_every=10**6)
        row["ssl_seconds"] = time.perf_counter() - t0
        row["ssl_student"] = knn_bacc(res["student"].backbone, data["tiles"], y, tr, te)
        row["ssl_ema_teacher"] = knn_bacc(res["teacher"].backbone, data["tiles"], y, tr, te)
        curves.append(res["history"])
        row["ssl_loss_first"], row["ssl_loss_last"] = res["loss_first"], res["loss_last"]
        row["ssl_parts_last"] = res["parts"][-1]
        teacher = Encoder(random_vit(preset_config("vit-t8-demo", depth=2), seed=100 + seed), Transform(img_size=64),
                          "cls+mean")
        row["distil_teacher"] = knn_bacc(teacher.vit, data["tiles"], y, tr, te, size=64)
        student = student_start(seed)
        dres = train_student(teacher, student, Transform(img_size=32).normalise, data["tiles"],
                             _run(root, f"distil{seed}", seed), steps=steps, batch_size=32, crop_size=32,
                             crop_scale_min=0.4, lr=5e-4 * 8, weight_decay=0.05, warmup=0.05, clip=3.0,
                             lambda_cls=1.0, lambda_patch=1.0, checkpoint_every=10**6, log_every=10**6)
        row["distil_student"] = knn_bacc(student, data["tiles"], y, tr, te)
        row["distil_loss_first"], row["distil_loss_last"] = dres["loss_first"], dres["loss_last"]
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "ssl_parts_last"}), flush=True)
        rows.append(row)
    keys = ("random_init", "ssl_student", "ssl_ema_teacher", "distil_student", "distil_teacher")
    summary = {k: {"mean": float(np.mean([r[k] for r in rows])), "min": float(min(r[k] for r in rows)),
                   "max": float(max(r[k] for r in rows))} for k in keys}
    curve = np.mean(np.array(curves), axis=0)
    return {"rows": rows, "summary": summary,
            "loss_curve_mean": {int(i): float(curve[i]) for i in list(range(0, steps, max(1, steps // 10))) + [steps - 1]}}


ABLATIONS = {"no_ibot": {"ibot_weight": 0.0}, "no_koleo": {"koleo_weight": 0.0}, "koleo_only": {"dino_weight": 0.0,
             "ibot_weight": 0.0}, "classic_centering": {"centering": "centering"}}


def ablation(seeds: int, steps: int, root: str) -> dict:
    """The SSL student's kNN accuracy with one loss term removed (same task, seeds and budget)."""
    data = synthetic_tiles(32, 4, 4, 64, seed=3)
    y = np.array([int(s[-1]) for s in data["label"]])
    split = np.array(group_split(list(data["slide_id"]), 0, (0.7, 0.0, 0.3)))
    tr, te = split == "train", split == "test"
    out = {}
    for name, change in ABLATIONS.items():
        hp = DINOv2Section(**{**dict(local_crops=4, local_crop_size=16, n_prototypes=256, head_hidden_dim=128,
                                     head_bottleneck_dim=32, ibot_prototypes=256, base_lr=0.02), **change}).model_dump()
        accs = []
        for seed in range(seeds):
            res = train_ssl(student_start(seed), Transform(img_size=32).normalise, data["tiles"],
                            _run(root, f"abl-{name}{seed}", seed), hp, steps=steps, batch_size=32, global_size=32,
                            local_size=16, clip=3.0, checkpoint_every=10**6, log_every=10**6)
            accs.append(knn_bacc(res["student"].backbone, data["tiles"], y, tr, te))
        out[name] = {"per_seed": accs, "mean": float(np.mean(accs))}
        print(f"ablation {name}: {[round(a, 3) for a in accs]} mean {np.mean(accs):.3f}", flush=True)
    return out


def step_timing(batch: int, steps: int, root: str) -> dict:
    """Seconds per DINOv2 step of ``vit-s8-reg8`` (P 8, D 384, depth 12, 8 registers), 1 thread, default
    head (65,536 prototypes, 2048 → 256) and crops (2 × 224 px, 8 × 96 px), after one warm-up step."""
    torch.set_num_threads(1)
    cfg = preset_config("vit-s8-reg8", depth=12)
    tiles = synthetic_tiles(4, 2, 1, 224, seed=0)["tiles"]
    hp = DINOv2Section().model_dump()
    times = []
    run = _run(root, "timing", 0)

    class Clock:  # time each step through the log hook
        last = None

    def log_metrics(row, _orig=run.log_metrics):
        now = time.perf_counter()
        if Clock.last is not None:
            times.append(now - Clock.last)
        Clock.last = now

    run.log_metrics = log_metrics
    train_ssl(random_vit(cfg, seed=0), Transform(img_size=224).normalise, tiles, run, hp, steps=steps + 1,
              batch_size=batch, global_size=224, local_size=96, clip=3.0, checkpoint_every=10**6, log_every=1)
    return {"arch": "vit-s8-reg8", "params": cfg.num_params(), "batch": batch, "threads": 1,
            "seconds_per_step": times, "median_seconds_per_step": float(np.median(times)),
            "seconds_per_image": float(np.median(times)) / batch}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--timing-batch", type=int, default=2)
    ap.add_argument("--timing-steps", type=int, default=3)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--ablations", action="store_true", help="also the SSL student with one loss term removed")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {"machine": "2-core CPU dev box (shared)", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root:
        if not a.skip_probe:
            out["probe"] = probe_comparison(a.seeds, a.steps, root)
            print("\n| model | kNN balanced accuracy mean [min–max] |\n|---|---|")
            for k, v in out["probe"]["summary"].items():
                print(f"| {k} | {v['mean']:.3f} [{v['min']:.3f}–{v['max']:.3f}] |")
            print("loss curve (mean over seeds):", {k: round(v, 3) for k, v in out["probe"]["loss_curve_mean"].items()})
        if a.ablations:
            out["ablations"] = ablation(a.seeds, a.steps, root)
        if not a.skip_timing:
            out["timing"] = step_timing(a.timing_batch, a.timing_steps, root)
            t = out["timing"]
            print(f"\nvit-s8-reg8 DINOv2 step, batch {t['batch']}, 1 thread: {t['median_seconds_per_step']:.2f} s "
                  f"(steps {[round(x, 2) for x in t['seconds_per_step']]})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
