"""Train/valid/test files from make_md_data.py shards, split by *trajectory* (info["traj"]).

Frames of one MD trajectory are correlated (10 fs apart), so a frame-wise split would put near
duplicates of training frames into the test set. Here whole trajectories go to one split: a seeded
permutation of the trajectory ids (seed 2) gives 10 % test, 5 % valid, the rest train. Frames are
copied as text, so labels are written back unchanged:

    python split_md_data.py out/md_0.extxyz out/md_1.extxyz split/
"""

import re
import sys
from pathlib import Path

import numpy as np

from split_demo_data import frames  # the same partial-frame-safe extxyz splitter


def traj_id(frame: str) -> int:
    return int(re.search(r"\btraj=(\d+)", frame.splitlines()[1]).group(1))


if __name__ == "__main__":
    allf = [f for p in sys.argv[1:-1] for f in frames(p)]
    outdir = Path(sys.argv[-1])
    outdir.mkdir(parents=True, exist_ok=True)
    ids = sorted({traj_id(f) for f in allf})
    perm = np.random.default_rng(2).permutation(len(ids))
    nte, nva = int(round(0.10 * len(ids))), int(round(0.05 * len(ids)))
    which = {}
    for rank, k in enumerate(perm):
        which[ids[k]] = "test" if rank < nte else "valid" if rank < nte + nva else "train"
    for name in ("train", "valid", "test"):
        sel = [f for f in allf if which[traj_id(f)] == name]
        (outdir / f"{name}.extxyz").write_text("".join(sel))
        print(name, len(sel), "frames from", sum(v == name for v in which.values()), "trajectories")
