"""Benchmark: tub-mlff's SpookyNet calculator vs the reference SpookyNetCalculator.

Same model (the reference parameters.pth, F=64, T=3), same periodic cells (spec §5: AB bilayer
graphene, c = 7.4 A, floor(n^2/4) Na at z = 5.55 A, at least 3 A apart; n = 4, 6, 8 -> 68, 153, 272 atoms), same MD
(Langevin 300 K, 0.5 fs, lr_cutoff = 10 A, float32), in one process. The two codes are timed in
interleaved rounds (``--rounds``, ``--steps`` MD steps each, the order alternating), so a change of
load on a shared machine hits both alike; the ratio is taken per round and reported as the median
with min-max. Prints median ms/step and atom-steps/s for both; writes JSON with every round.

    python benchmarks/mlff.py --reference /tmp/ref-spooky --rounds 5 --steps 10 --out bench_mlff.json

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


def make_md(atoms, calc, warmup: int = 2):
    """A Langevin integrator (300 K, 0.5 fs, seeded) on a copy of ``atoms``, warmed up."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = atoms.copy()
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    atoms.calc = calc
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, fixcm=False,
                   rng=np.random.default_rng(1))
    dyn.run(warmup)
    return dyn


def time_steps(dyn, steps: int) -> float:
    t = time.perf_counter()
    dyn.run(steps)
    return (time.perf_counter() - t) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, default=Path("/tmp/ref-spooky"), help="OUnke/SpookyNet checkout")
    ap.add_argument("--params", type=Path, default=PARAMS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--steps", type=int, default=10, help="MD steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved tub/reference rounds per cell")
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
        row = {"n": n, "atoms": N}
        # spin 0 on both sides: the reference calculator's default (magmom 0), not tub's electron-count parity
        # (check=False: tub refuses a singlet of an odd electron count, which the reference does not check)
        tub_md = make_md(atoms, SpookyNetCalculator(str(args.params), spin=0, dtype=torch.float32, lr_cutoff=10.0,
                                                    check=False))
        ref_md = None
        if ref_cls is not None:
            # same physics check before timing: energies and forces of the two codes on this cell
            a1, a2 = atoms.copy(), atoms.copy()
            a1.calc, a2.calc = SpookyNetCalculator(str(args.params), spin=0, dtype=torch.float64, lr_cutoff=10.0,
                                                   check=False), \
                ref_cls(load_from=str(args.params), dtype=torch.float64, lr_cutoff=10.0, use_gpu=False)
            row["abs_dE_eV_fp64"] = abs(a1.get_potential_energy() - a2.get_potential_energy())
            row["max_dF_eV_A_fp64"] = float(np.abs(a1.get_forces() - a2.get_forces()).max())
            ref_md = make_md(atoms, ref_cls(load_from=str(args.params), dtype=torch.float32, lr_cutoff=10.0,
                                            use_gpu=False))
        # interleaved rounds (the order alternates), so a load change on a shared machine hits
        # both codes alike; the ratio is taken per round and summarised by its median
        tub_t, ref_t = [], []
        for r in range(args.rounds):
            order = [("tub", tub_md), ("ref", ref_md)] if r % 2 == 0 else [("ref", ref_md), ("tub", tub_md)]
            for name, dyn in order:
                if dyn is not None:
                    (tub_t if name == "tub" else ref_t).append(time_steps(dyn, args.steps))
        row["tub_s_per_step_rounds"] = tub_t
        row["tub_s_per_step"] = float(np.median(tub_t))
        if ref_t:
            ratios = np.array(ref_t) / np.array(tub_t)
            row["ref_s_per_step_rounds"] = ref_t
            row["ref_s_per_step"] = float(np.median(ref_t))
            row["speedup_rounds"] = ratios.tolist()
            row["speedup"] = float(np.median(ratios))
            row["speedup_min"], row["speedup_max"] = float(ratios.min()), float(ratios.max())
        rows.append(row)
    print(f"{'atoms':>6} {'tub ms/step':>12} {'tub atom-steps/s':>17} {'ref ms/step':>12} "
          f"{'ref atom-steps/s':>17} {'ratio':>6} {'min-max':>11} {'|dE| fp64':>10} {'max|dF| fp64':>13}")
    for r in rows:
        N = r["atoms"]
        ref_ms = f"{1000 * r['ref_s_per_step']:12.1f}" if "ref_s_per_step" in r else f"{'-':>12}"
        ref_as = f"{N / r['ref_s_per_step']:17.0f}" if "ref_s_per_step" in r else f"{'-':>17}"
        ratio = f"{r['speedup']:6.2f}" if "speedup" in r else f"{'-':>6}"
        span = f"{r['speedup_min']:5.2f}-{r['speedup_max']:<5.2f}" if "speedup" in r else f"{'-':>11}"
        de = f"{r['abs_dE_eV_fp64']:10.1e}" if "abs_dE_eV_fp64" in r else f"{'-':>10}"
        df = f"{r['max_dF_eV_A_fp64']:13.1e}" if "max_dF_eV_A_fp64" in r else f"{'-':>13}"
        print(f"{N:6d} {1000 * r['tub_s_per_step']:12.1f} {N / r['tub_s_per_step']:17.0f} {ref_ms} {ref_as} {ratio} {span} {de} {df}")
    result = {"machine": "2-core CPU dev box (shared)", "threads": args.threads, "steps": args.steps,
              "rounds": args.rounds, "summary": "median of per-round ratios (min-max)",
              "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
