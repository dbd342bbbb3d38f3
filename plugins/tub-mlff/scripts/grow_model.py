"""Grow a trained tub SpookyNet (more modules and/or features) without changing its predictions.

Uses tub_mlff.growing (Net2Net-style, function-preserving); checks the claim on a periodic
Na2 gallery cell in float64 before writing, then fine-tune with ``tub mlff train --init-from``:

    python grow_model.py demo_nacnh.safetensors deep3 --modules 3        # -> deep3.safetensors/.json
    python grow_model.py demo_nacnh.safetensors wide64 --features 64
"""

import argparse
import sys

import torch

from tub_mlff.calculator import SpookyNetCalculator
from tub_mlff.checkpoints import load_model, read_model_meta, save_model
from tub_mlff.growing import deepen, widen
from tub_mlff.structures import add_sodium, janus_graphene, spin_for


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="trained model (.safetensors)")
    p.add_argument("out", help="output stem (writes OUT.safetensors and OUT.json)")
    p.add_argument("--modules", type=int, help="interaction modules of the grown model")
    p.add_argument("--features", type=int, help="features per atom of the grown model")
    p.add_argument("--seed", type=int, default=1, help="seed of the new weights")
    args = p.parse_args(argv)
    model, _ = load_model(args.model, torch.float64)
    big = model
    if args.modules:
        big = deepen(big, args.modules, args.seed)
    if args.features:
        big = widen(big, args.features, args.seed)
    a = add_sodium(janus_graphene(3, 1, stacking="gallery", interlayer=9.0), 2, "random", seed=1)
    a.rattle(0.05, seed=0)
    pred = []
    for m in (model, big):
        b = a.copy()
        b.calc = SpookyNetCalculator(m, spin=spin_for(a), dtype=torch.float64)
        pred.append((b.get_potential_energy(), b.get_forces()))
    de, df = abs(pred[0][0] - pred[1][0]), abs(pred[0][1] - pred[1][1]).max()
    if de > 1e-8 or df > 1e-8:
        sys.exit(f"grown model differs (|dE| {de:.1e} eV, max |dF| {df:.1e} eV/A); nothing written")
    meta = read_model_meta(args.model)
    extra = {k: v for k, v in meta.items() if k not in ("architecture", "spookynet")}
    extra["grown_from"] = str(args.model)
    save_model(big.float(), args.out, extra=extra)
    c = big.config
    print(f"{args.model}: {model.num_parameters()} -> {big.num_parameters()} parameters (T = {c.num_modules},"
          f" F = {c.num_features}); |dE| {de:.1e} eV, max |dF| {df:.1e} eV/A -> {args.out}.safetensors")


if __name__ == "__main__":
    sys.exit(main())
