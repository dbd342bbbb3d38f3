"""More xTB frames from the same distribution as make_demo_data.py, with new seeds.

Same cells, strain (+-2 %) and rattle (0.02-0.1 A) as make_demo_data.py, but job seeds start at
100_000 so no frame repeats the demo set; the job list cycles x = 0, 1, 2, 3 Na (host) and bcc Na
in the ratio 2:2:2:2:1 for ``n_jobs`` jobs. Frames are appended one by one, so a shard can be
stopped at any time and its file is still usable. Run shards in parallel:

    python make_more_data.py 0 2 2000 out/ & python make_more_data.py 1 2 2000 out/ ; wait
"""

import sys
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.io import write

from tub_mlff.labelling import label_xtb
from tub_mlff.structures import add_sodium, janus_graphene

shard, nshard, n_jobs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
outdir = Path(sys.argv[4]) if len(sys.argv) > 4 else Path(".")
outdir.mkdir(parents=True, exist_ok=True)
host = janus_graphene(3, 1, stacking="gallery", interlayer=9.0)
cycle = [("host", 0), ("host", 1), ("host", 2), ("host", 3)] * 2 + [("bcc", 0)]
out = outdir / f"more_{shard}.extxyz"
for idx in range(n_jobs):
    if idx % nshard != shard:
        continue
    kind, x = cycle[idx % len(cycle)]
    r = np.random.default_rng(100_000 + idx)
    if kind == "host":
        a = add_sodium(host, x, "random", seed=int(r.integers(1 << 30)))
    else:
        a = bulk("Na", "bcc", a=float(r.uniform(3.95, 4.5)), cubic=True).repeat((2, 2, 2))
    eps = r.uniform(-0.02, 0.02, (3, 3))
    eps = (eps + eps.T) / 2
    a.set_cell(a.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    a.rattle(float(r.uniform(0.02, 0.1)), seed=int(r.integers(1 << 30)))
    a.info["x"] = x
    a.info["kind"] = kind
    lab = label_xtb(a)
    write(out, lab, format="extxyz", append=True)
    print(idx, kind, x, lab.info["energy"], flush=True)
