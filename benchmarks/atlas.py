"""tub-atlas ViT against timm's VisionTransformer on the same weights and tiles, in one process.

For each configuration: random weights (N(0, 0.02), LayerScale non-trivial) are built by tub and
loaded into timm with ``load_state_dict(strict=True)``; both run ``forward_features`` on the same
batch under ``inference_mode``, one warm-up, then ``--repeats`` interleaved repeats (tub, timm,
timm, tub, ...: alternating order); the median tiles/s of each, the ratio and max |Δ| of the
outputs are printed and written as JSON. Without timm (the project environment has none: it
needs torchvision) only tub is timed. The comparison was run in a separate venv:

    python -m venv /tmp/timmenv
    /tmp/timmenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors numpy pydantic pluggy typer rich pyyaml
    PYTHONPATH=.:plugins/tub-atlas /tmp/timmenv/bin/python benchmarks/atlas.py --threads 2 --json out.json

    python benchmarks/atlas.py [--configs vit-s8-reg8,uni2-h:2] [--batch-size 8] [--threads 2]
                               [--repeats 7] [--precision fp32|bf16|fp16] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from tub_atlas.benchmark import time_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="vit-s8-reg8,uni2-h:2,virchow2:2,h-optimus-0:2",
                    help="comma-separated preset[:depth]")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-timm", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for spec in args.configs.split(","):
        name, _, depth = spec.partition(":")
        rows.append(time_models(name, depth=int(depth) if depth else None, batch_size=args.batch_size,
                                img_size=args.img_size, threads=args.threads, repeats=args.repeats,
                                compare_timm=not args.no_timm, device=args.device, precision=args.precision))
    have_timm = "timm_tiles_per_s" in rows[0]
    head = f"{'config':<16} {'depth':>5} {'tub tiles/s':>12}"
    if have_timm:
        head += f" {'timm tiles/s':>13} {'tub/timm':>9} {'max|Δ|':>10}"
    print(head)
    for r in rows:
        line = f"{r['arch']:<16} {r['depth']:>5} {r['tub_tiles_per_s']:>12.3f}"
        if have_timm:
            line += f" {r['timm_tiles_per_s']:>13.3f} {r['ratio_tub_over_timm']:>9.3f} {r['max_abs_diff']:>10.2e}"
        print(line)
    if not have_timm:
        print("(timm not importable here: tub only; see the docstring for the comparison venv)")
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": args.threads, "device": args.device, "precision": args.precision}
    try:
        import timm

        env["timm"] = timm.__version__
    except Exception:  # noqa: BLE001
        env["timm"] = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
