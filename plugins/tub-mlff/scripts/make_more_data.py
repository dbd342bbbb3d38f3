"""More xTB frames from the same distribution as make_demo_data.py, with new seeds.

Same cells, strain (+-2 %) and rattle (0.02-0.1 A) as make_demo_data.py, but job seeds start at
100_000 so no frame repeats the demo set; the job list cycles x = 0, 1, 2, 3 Na (host) and bcc Na
in the ratio 2:2:2:2:1 for ``n_jobs`` jobs. Frames are appended one by one, so a shard can be
stopped at any time and its file is still usable. Run shards in parallel:

    python make_more_data.py 0 2 2000 out/ & python make_more_data.py 1 2 2000 out/ ; wait
"""

import sys
from pathlib import Path

from ase.io import write
from make_demo_data import labelled_frame  # this folder is on sys.path when run as a script

from tub_mlff.structures import janus_graphene

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
    lab = labelled_frame(host, kind, x, 100_000 + idx)
    write(out, lab, format="extxyz", append=True)
    print(idx, kind, x, lab.info["energy"], flush=True)
