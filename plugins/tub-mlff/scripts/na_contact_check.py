"""How often does a model's 300/600 K MD push Na onto the graphene sheet (Na-C < 2.2 A)?

The shortest Na-C distance of Na on graphene is about 2.6 A; GFN1-xTB puts the energy of a
Na-C contact below 2.2 A tens of meV/atom higher. A force field whose training frames never
visited that region may have a spurious well there, and its MD then collapses Na onto the
sheet. This runs make_md_data.py's protocol (same cells, relaxation, Langevin MD, seeds) with
the model alone, no labels, and counts the trajectories with such a contact:

    python na_contact_check.py demo_nacnh.safetensors --first-job 5000 --jobs 36
"""

import argparse
import sys

import numpy as np
from ase.neighborlist import neighbor_list

from make_md_data import CYCLE, start_md

from tub_mlff.structures import janus_graphene


def shortest_na_c(a) -> float:
    s = np.array(a.get_chemical_symbols())
    i, j, d = neighbor_list("ijd", a, 4.0)
    m = (s[i] == "Na") & (s[j] == "C")
    return float(d[m].min()) if m.any() else np.inf


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--first-job", type=int, default=5000)
    p.add_argument("--jobs", type=int, default=36)
    p.add_argument("--steps", type=int, default=420, help="MD steps after the relaxation")
    args = p.parse_args(argv)
    host = janus_graphene(3, 1, stacking="gallery", interlayer=9.0)
    hits = runs = 0
    for job in range(args.first_job, args.first_job + args.jobs):
        kind, x = CYCLE[job % len(CYCLE)]
        if kind != "host" or x == 0:
            continue
        a, dyn, kind, x, temp = start_md(host, job, args.model, False)
        closest = [shortest_na_c(a)]
        dyn.attach(lambda: closest.append(shortest_na_c(a)), interval=10)
        dyn.run(args.steps)
        runs += 1
        hits += min(closest) < 2.2
        print(job, f"x={x} T={temp:.0f} K  shortest Na-C {min(closest):.2f} A", flush=True)
    print(f"{args.model}: {hits} of {runs} Na-containing trajectories reach Na-C < 2.2 A")


if __name__ == "__main__":
    sys.exit(main())
