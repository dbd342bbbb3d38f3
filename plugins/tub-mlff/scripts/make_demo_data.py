"""Regenerate the xTB data set the shipped demo model was trained on (270 frames).

Na_x AB gallery cells (3x3 graphene, one 4-aminophenyl group, interlayer 9 A, x = 0..3 Na at
random sites, 60 per x) and 2x2x2 bcc Na cells (a = 3.95-4.5 A, 30 frames), each with a random
symmetric strain (+-2 %) and a Gaussian rattle (0.02-0.1 A), labelled with GFN1-xTB (tblite).
Seeds are fixed; run as two shards in parallel and concatenate:

    python make_demo_data.py 0 2 60 out/ & python make_demo_data.py 1 2 60 out/ ; wait
    cat out/xtb_0.extxyz out/xtb_1.extxyz > xtb_train.extxyz
"""

import sys
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.io import write

from tub_mlff.labelling import label_xtb
from tub_mlff.structures import add_sodium, janus_graphene


def strained_cell(host, kind: str, x: int, r: np.random.Generator, bcc_a=(3.95, 4.5), strain=0.02):
    """Na_x at random sites on ``host`` (or a 2x2x2 bcc Na cell), under a random symmetric strain."""
    if kind == "host":
        a = add_sodium(host, x, "random", seed=int(r.integers(1 << 30)))
    else:
        a = bulk("Na", "bcc", a=float(r.uniform(*bcc_a)), cubic=True).repeat((2, 2, 2))
    eps = r.uniform(-strain, strain, (3, 3))
    eps = (eps + eps.T) / 2
    a.set_cell(a.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    a.info["x"], a.info["kind"] = x, kind
    return a


def labelled_frame(host, kind: str, x: int, seed: int):
    """One xTB-labelled frame: Na_x on ``host`` (or bcc Na), random strain (+-2 %) and rattle."""
    r = np.random.default_rng(seed)
    a = strained_cell(host, kind, x, r)
    a.rattle(float(r.uniform(0.02, 0.1)), seed=int(r.integers(1 << 30)))
    return label_xtb(a)


if __name__ == "__main__":
    shard, nshard, per_x = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    outdir = Path(sys.argv[4]) if len(sys.argv) > 4 else Path(".")
    outdir.mkdir(parents=True, exist_ok=True)
    host = janus_graphene(3, 1, stacking="gallery", interlayer=9.0)
    jobs = [("host", x, k) for x in range(4) for k in range(per_x)] + [("bcc", 0, k) for k in range(per_x // 2)]
    out = outdir / f"xtb_{shard}.extxyz"
    for idx, (kind, x, k) in enumerate(jobs):
        if idx % nshard != shard:
            continue
        lab = labelled_frame(host, kind, x, 10_000 + idx)
        write(out, lab, format="extxyz", append=True)
        print(idx, kind, x, lab.info["energy"], flush=True)
