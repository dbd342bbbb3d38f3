"""tub-atlas ViT against timm's VisionTransformer on the same weights and tiles, in one process.

For each configuration: random weights (N(0, 0.02), LayerScale non-trivial) are built by tub and
loaded into timm with ``load_state_dict(strict=True)``; both run on the same batch under
``inference_mode``, one warm-up, then ``--rounds`` interleaved rounds (every model once per round,
order alternating). Printed per config: median tiles/s of each, the **median of the per-round
tub/timm ratios with its min and max**, and max |Δ| of the outputs; all of it goes to ``--json``.

Modes (``--modes``): ``tokens`` = ``forward_features`` on both sides (same work); ``cls`` = the
CLS embedding as users get it (tub ``forward_cls``, whose last block runs at the CLS position only,
vs timm ``model(x)`` with ``global_pool="token"``). ``--reference`` adds tub's reference blocks
(``fast_inference=False``) and the inference path with aten GEMMs (``--gemm aten``: bit-identical to
the reference) to the rounds; ``--gemm`` picks tub's inference GEMMs (default auto = oneDNN on CPU). ``--precision-sweep`` times tub in fp32, bf16 autocast
and bf16 weights instead (relative error against fp32 included).

Without timm (the project environment has none: it needs torchvision) only tub is timed. The
comparison runs in a separate venv:

    python -m venv /tmp/timmenv
    /tmp/timmenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors numpy pydantic pluggy typer rich pyyaml
    PYTHONPATH=.:plugins/tub-atlas /tmp/timmenv/bin/python benchmarks/atlas.py --threads 1 --json out.json

    python benchmarks/atlas.py [--configs vit-s8-reg8,uni2-h:2] [--batch-size 8] [--threads 1]
        [--rounds 7] [--modes tokens,cls] [--reference] [--precision fp32|bf16|bf16-weights|fp16]
        [--precision-sweep] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from tub_atlas.benchmark import PRECISIONS, time_models, time_precisions


def _fmt_ratio(r: dict, key: str) -> str:
    return f"{r[key]:.3f} [{r[key + '_min']:.3f}-{r[key + '_max']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="vit-s8-reg8,uni2-h:2,virchow2:2,h-optimus-0:2",
                    help="comma-separated preset[:depth]")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=7)
    ap.add_argument("--modes", default="tokens", help="tokens, cls or tokens,cls")
    ap.add_argument("--reference", action="store_true",
                    help="also time tub's reference blocks and its inference path with aten GEMMs")
    ap.add_argument("--gemm", default="auto", choices=["auto", "onednn", "aten"], help="tub's inference GEMMs")
    ap.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    ap.add_argument("--precision-sweep", action="store_true", help="tub only: fp32 vs bf16 autocast vs bf16 weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-timm", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": args.threads, "device": args.device, "precision": args.precision,
           "load_average_start": os.getloadavg()}
    try:
        import timm

        env["timm"] = timm.__version__
    except Exception:  # noqa: BLE001
        env["timm"] = None
    rows = []
    for spec in args.configs.split(","):
        name, _, depth = spec.partition(":")
        depth = int(depth) if depth else None
        if args.precision_sweep:
            r = time_precisions(name, depth=depth, batch_size=args.batch_size, img_size=args.img_size,
                                threads=args.threads, repeats=args.rounds, device=args.device)
            print(f"{name:<14} depth {r['depth']:>2}: " + ", ".join(
                f"{p} {r[p + '_tiles_per_s']:.3f} tiles/s (x{r[p + '_speedup']:.2f}, rel err {r[p + '_rel_error']:.1e})"
                for p in ("fp32", "bf16", "bf16-weights")), flush=True)
        else:
            r = time_models(name, depth=depth, batch_size=args.batch_size, img_size=args.img_size,
                            threads=args.threads, repeats=args.rounds, compare_timm=not args.no_timm,
                            device=args.device, precision=args.precision, modes=tuple(args.modes.split(",")),
                            reference=args.reference, gemm=args.gemm)
            line = f"{name:<14} depth {r['depth']:>2} [{r['gemm_used']}]"
            for mode, pre in (("tokens", ""), ("cls", "cls_")):
                if f"{pre}tub_tiles_per_s" not in r:
                    continue
                line += f" | {mode}: tub {r[pre + 'tub_tiles_per_s']:.3f}"
                if f"{pre}timm_tiles_per_s" in r:
                    diff = r["max_abs_diff" if not pre else "cls_max_abs_diff"]
                    line += (f" timm {r[pre + 'timm_tiles_per_s']:.3f} tiles/s, tub/timm "
                             f"{_fmt_ratio(r, pre + 'ratio_tub_over_timm')} max|d| {diff:.1e}")
            if "tub_ref_tiles_per_s" in r:
                line += (f" | reference blocks {r['tub_ref_tiles_per_s']:.3f}, tub/ref "
                         f"{_fmt_ratio(r, 'ratio_tub_over_reference')}; aten GEMMs {r['tub_aten_tiles_per_s']:.3f}, "
                         f"aten/ref {_fmt_ratio(r, 'ratio_tub_aten_over_reference')}")
            print(line, flush=True)
        rows.append(r)
    env["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
