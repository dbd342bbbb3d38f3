"""MD-sampled GFN1-xTB frames (the data of the demo model v3): thermal configurations, not rattles.

Each *trajectory* job (seed 200_000 + job index) builds a cell as make_demo_data.py does (Na_x AB
gallery cell, 3x3 graphene, one 4-aminophenyl group, interlayer 9 A, x = 0..3 Na at random sites;
or a 2x2x2 bcc Na cell, a = 4.1-4.3 A) with a random symmetric strain (+-1 %), relaxes it with the
``driver`` model (FIRE, fmax 0.1 eV/A, <= 150 steps), then runs Langevin MD with the driver
(0.5 fs, friction 0.02/fs) at 300 K (600 K for every fourth job, for robustness): 100 steps of
equilibration, then one frame every ``every`` steps. Every sampled frame is labelled with GFN1-xTB
(tblite: energy, forces, stress). Frames whose largest xTB force exceeds 20 eV/A (a driver that
went astray) or whose xTB SCF does not converge are dropped and end the trajectory.

The driver is a cheap force field (``--driver``; default the shipped demo model; v3's data was
driven by v2): MD with xTB itself costs ~0.4 s a
step here, so it only labels. This is the usual MD-sampled / active-learning protocol; the frames
follow the driver's 300 K ensemble, which is close to, not equal to, xTB's (``--xtb-driven`` runs
the MD with xTB itself instead, for a small test set from xTB's own ensemble).

``--coverage`` (the data of v11) samples hosts the earlier rounds lacked, one kind per job in turn:
the 3x3 gallery with its interlayer drawn from 8.0-10.5 A (c-axis strains of -11..+17 %, which
``ocv --cell c`` reaches), a 4x4 gallery (one or two groups), a 3x3 monolayer slab (20 A vacuum) and
a 3x3 bilayer with vacuum, x = 0..3 (0..4 on 4x4) Na at random sites; ``--kinds`` picks some of them
(v12: ``--kinds gallery-c``).

Frames are appended one by one with info["traj"] = job index, so the train/valid/test split can be
made by trajectory (split_md_data.py) and a stopped shard resumes (jobs already in the file are
skipped). Run shards in parallel:

    python make_md_data.py 0 2 128 out/ & python make_md_data.py 1 2 128 out/ ; wait
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from ase import units
from ase.io import read, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import FIRE

from make_demo_data import strained_cell  # this folder is on sys.path when run as a script

from tub_mlff.labelling import label_xtb
from tub_mlff.structures import janus_graphene, spin_for
from tubcli.errors import TubError

DEFAULT_DRIVER = Path(__file__).resolve().parents[1] / "tub_mlff" / "models" / "demo_nacnh.safetensors"
CYCLE = [("host", 0), ("host", 1), ("host", 2), ("host", 3)] * 2 + [("bcc", 0)]
COVERAGE = ["gallery-c", "gallery4", "slab", "gallery-c", "bilayer", "gallery4-2g"]


def coverage_host(kind: str, r: np.random.Generator):
    """A host of one of the COVERAGE kinds, its geometry drawn from ``r``; returns (host, max x)."""
    if kind == "gallery-c":
        return janus_graphene(3, 1, stacking="gallery", interlayer=float(r.uniform(8.0, 10.5))), 3
    if kind in ("gallery4", "gallery4-2g"):
        groups = 2 if kind == "gallery4-2g" else 1
        return janus_graphene(4, groups, stacking="gallery", interlayer=float(r.uniform(8.5, 10.0))), 4
    if kind == "slab":
        return janus_graphene(3, 1, stacking="slab", vacuum=20.0), 3
    return janus_graphene(3, 1, stacking="bilayer", interlayer=float(r.uniform(8.5, 10.0)), vacuum=12.0), 3


def build(host, kind: str, x: int, r: np.random.Generator):
    return strained_cell(host, kind, x, r, bcc_a=(4.1, 4.3), strain=0.01)


def driver_calc(a, driver: str, xtb: bool):
    if xtb:
        from tblite.ase import TBLite

        return TBLite(method="GFN1-xTB", multiplicity=spin_for(a) + 1, electronic_temperature=300.0, verbosity=0)
    from tub_mlff.calculator import SpookyNetCalculator

    return SpookyNetCalculator(driver, spin=spin_for(a))


def start_md(host, job: int, driver: str, xtb: bool, coverage: list[str] | None = None):
    """Job ``job``'s cell, relaxed by the driver and thermalised: (atoms, Langevin, kind, x, temp).

    ``coverage``: the COVERAGE kinds to cycle through (None: the 3x3 gallery and bcc Na of CYCLE)."""
    r = np.random.default_rng(200_000 + job)
    if coverage:
        kind = coverage[job % len(coverage)]
        host, x_max = coverage_host(kind, r)
        x = int(r.integers(0, x_max + 1))
        a = strained_cell(host, "host", x, r, strain=0.01)
        a.info["kind"] = kind
    else:
        kind, x = CYCLE[job % len(CYCLE)]
        a = build(host, kind, x, r)
    temp = 600.0 if job % 4 == 3 else 300.0
    a.calc = driver_calc(a, driver, xtb)
    FIRE(a, logfile=None).run(fmax=0.1, steps=30 if xtb else 150)
    MaxwellBoltzmannDistribution(a, temperature_K=temp, rng=r)
    dyn = Langevin(a, 0.5 * units.fs, temperature_K=temp, friction=0.02 / units.fs, rng=r)
    return a, dyn, kind, x, temp


def trajectory(host, job: int, n_frames: int, every: int, driver: str, xtb: bool, coverage: list[str] | None = None):
    """Yield xTB-labelled frames of one driver-MD trajectory."""
    a, dyn, kind, x, temp = start_md(host, job, driver, xtb, coverage)
    dyn.run(100)
    for k in range(n_frames):
        dyn.run(every)
        frame = a.copy()
        frame.info.update(traj=job, frame=k, temp=temp, kind=kind, x=x,
                          driver="GFN1-xTB" if xtb else Path(driver).name)
        try:
            lab = label_xtb(frame)
        except TubError as exc:  # an SCF that does not converge (seen once, a Na3 slab): no label
            print(job, "dropped frame", k, f"({exc}); trajectory ended", flush=True)
            return
        if np.abs(lab.arrays["forces"]).max() > 20.0:
            print(job, "dropped frame", k, "(xTB force > 20 eV/A); trajectory ended", flush=True)
            return
        yield lab


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shard", type=int)
    p.add_argument("nshard", type=int)
    p.add_argument("n_jobs", type=int, help="trajectories in total (over all shards)")
    p.add_argument("outdir", type=Path)
    p.add_argument("--frames", type=int, default=16, help="frames per trajectory")
    p.add_argument("--every", type=int, default=20, help="MD steps between frames")
    p.add_argument("--driver", default=str(DEFAULT_DRIVER), help="model that drives the MD")
    p.add_argument("--xtb-driven", action="store_true", help="run the MD with xTB itself")
    p.add_argument("--first-job", type=int, default=0, help="job index to start at (seed offset)")
    p.add_argument("--coverage", action="store_true", help="the COVERAGE hosts instead of the 3x3 gallery")
    p.add_argument("--kinds", nargs="+", choices=sorted(set(COVERAGE)), default=COVERAGE,
                   help="with --coverage: only these host kinds, one per job in turn")
    args = p.parse_args(argv)
    kinds = args.kinds if args.coverage else None
    args.outdir.mkdir(parents=True, exist_ok=True)
    out = args.outdir / f"{'xtbmd' if args.xtb_driven else 'md'}_{args.shard}.extxyz"
    done = {int(f.info["traj"]) for f in read(out, ":")} if out.exists() and out.stat().st_size else set()
    host = janus_graphene(3, 1, stacking="gallery", interlayer=9.0)
    for job in range(args.first_job, args.first_job + args.n_jobs):
        if job % args.nshard != args.shard or job in done:
            continue
        for lab in trajectory(host, job, args.frames, args.every, args.driver, args.xtb_driven, kinds):
            write(out, lab, format="extxyz", append=True)
            f = np.linalg.norm(lab.arrays["forces"], axis=1)
            print(job, lab.info["frame"], lab.info["kind"], lab.info["x"], lab.info["temp"],
                  "E %.4f  mean|F| %.3f  max|F| %.3f" % (lab.info["energy"], f.mean(), f.max()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
