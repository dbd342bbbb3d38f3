"""Benchmark: tub-mlff's SpookyNet calculator vs the reference SpookyNetCalculator.

Same model (the reference parameters.pth, F=64, T=3), same periodic cells (spec §5: AB bilayer
graphene, c = 7.4 A, floor(n^2/4) Na at z = 5.55 A, at least 3 A apart; n = 4, 6, 8 -> 68, 153, 272 atoms), same MD
(Langevin 300 K, 0.5 fs, lr_cutoff = 10 A, float32), run back to back in one process.
Prints ms/step and atom-steps/s for both and their ratio; writes JSON.

    python benchmarks/mlff.py --reference /tmp/ref-spooky --steps 20 --out bench_mlff.json

The reference checkout (OUnke/SpookyNet) is only imported from the given path; it is never
vendored. Without it only tub's figures are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

PARAMS = Path(__file__).resolve().parents[1].parent / "shared/reference/spookynet/parameters.pth"


def cell(n: int, seed: int = 0):
    from ase import Atoms
    from ase.build import graphene

    a = graphene(size=(n, n, 1), vacuum=None)
    a.cell[2, 2] = 7.4
    b = a.copy()
    b.positions += [1.23, 0.71, 3.7]
    a += b
    rng = np.random.default_rng(seed)
    k = n * n // 4
    na = []
    while len(na) < k:  # seeded random xy, redrawn when closer than 3 A to another Na (minimum image)
        p = np.r_[rng.uniform(0, 1, 2), 0.0] @ a.cell.array
        p[2] = 5.55
        trial = Atoms(f"Na{len(na) + 1}", positions=na + [p], cell=a.cell, pbc=True)
        if len(na) == 0 or trial.get_distances(len(na), range(len(na)), mic=True).min() > 3.0:
            na.append(p)
    a += Atoms(f"Na{k}", positions=na)
    a.pbc = True
    a.wrap()
    return a


def time_md(atoms, calc, steps: int, warmup: int = 2) -> float:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = atoms.copy()
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    atoms.calc = calc
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, fixcm=False,
                   rng=np.random.default_rng(1))
    dyn.run(warmup)
    t = time.perf_counter()
    dyn.run(steps)
    return (time.perf_counter() - t) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=Path("/tmp/ref-spooky"), help="OUnke/SpookyNet checkout")
    ap.add_argument("--params", type=Path, default=PARAMS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench_mlff.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    from tub_mlff.calculator import SpookyNetCalculator

    ref_cls = None
    if (args.reference / "spookynet").exists():
        sys.path.insert(0, str(args.reference))
        from spookynet import SpookyNetCalculator as ref_cls  # noqa: N813
    rows = []
    for n in args.sizes:
        atoms = cell(n)
        N = len(atoms)
        tub = SpookyNetCalculator(str(args.params), dtype=torch.float32, lr_cutoff=10.0)
        # same physics check before timing: energies of the two calculators on this cell
        row = {"n": n, "atoms": N}
        row["tub_s_per_step"] = time_md(atoms, tub, args.steps)
        if ref_cls is not None:
            ref = ref_cls(load_from=str(args.params), dtype=torch.float32, lr_cutoff=10.0, use_gpu=False)
            a1, a2 = atoms.copy(), atoms.copy()
            a1.calc, a2.calc = SpookyNetCalculator(str(args.params), dtype=torch.float64, lr_cutoff=10.0), \
                ref_cls(load_from=str(args.params), dtype=torch.float64, lr_cutoff=10.0, use_gpu=False)
            row["abs_dE_eV_fp64"] = abs(a1.get_potential_energy() - a2.get_potential_energy())
            row["max_dF_eV_A_fp64"] = float(np.abs(a1.get_forces() - a2.get_forces()).max())
            row["ref_s_per_step"] = time_md(atoms, ref, args.steps)
            row["speedup"] = row["ref_s_per_step"] / row["tub_s_per_step"]
        rows.append(row)
    print(f"{'atoms':>6} {'tub ms/step':>12} {'tub atom-steps/s':>17} {'ref ms/step':>12} "
          f"{'ref atom-steps/s':>17} {'ratio':>6} {'|dE| fp64':>10} {'max|dF| fp64':>13}")
    for r in rows:
        N = r["atoms"]
        ref_ms = f"{1000 * r['ref_s_per_step']:12.1f}" if "ref_s_per_step" in r else f"{'-':>12}"
        ref_as = f"{N / r['ref_s_per_step']:17.0f}" if "ref_s_per_step" in r else f"{'-':>17}"
        ratio = f"{r['speedup']:6.2f}" if "speedup" in r else f"{'-':>6}"
        de = f"{r['abs_dE_eV_fp64']:10.1e}" if "abs_dE_eV_fp64" in r else f"{'-':>10}"
        df = f"{r['max_dF_eV_A_fp64']:13.1e}" if "max_dF_eV_A_fp64" in r else f"{'-':>13}"
        print(f"{N:6d} {1000 * r['tub_s_per_step']:12.1f} {N / r['tub_s_per_step']:17.0f} {ref_ms} {ref_as} {ratio} {de} {df}")
    result = {"machine": "2-core CPU dev box (shared)", "threads": args.threads, "steps": args.steps,
              "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
