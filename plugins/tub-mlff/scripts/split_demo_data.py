"""Train/valid/test files for the demo model (v2) from the demo set and the extra frames.

The 270 demo frames keep the shipped v1 model's split (tub's split_indices, seed 0, 80/10/10), so
their 27 test frames stay unseen by every model trained from them; the extra frames are split
85/5/10 by seed 1. Frames are copied as text, so labels are written back unchanged:

    python split_demo_data.py xtb_train.extxyz more_0.extxyz more_1.extxyz out/
"""

import sys
from pathlib import Path

import numpy as np

from tub_mlff.data import split_indices


def frames(path):
    lines = Path(path).read_text().splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        blk = lines[i:i + n + 2]
        if len(blk) == n + 2:  # a shard stopped mid-write leaves a partial last frame
            out.append("".join(blk))
        i += n + 2
    return out


def main():
    old = frames(sys.argv[1])
    new = [f for p in sys.argv[2:-1] for f in frames(p)]
    outdir = Path(sys.argv[-1])
    outdir.mkdir(parents=True, exist_ok=True)
    tr, va, te = split_indices(len(old), 0.1, 0.1, 0)
    perm = np.random.default_rng(1).permutation(len(new))
    nte, nva = int(round(0.1 * len(new))), int(round(0.05 * len(new)))
    parts = {"train": ([old[i] for i in tr], [new[i] for i in perm[nte + nva:]]),
             "valid": ([old[i] for i in va], [new[i] for i in perm[nte:nte + nva]]),
             "test_old": ([old[i] for i in te], []),
             "test_new": ([], [new[i] for i in perm[:nte]])}
    for name, (a, b) in parts.items():
        (outdir / f"{name}.extxyz").write_text("".join(a + b))
        print(name, len(a), len(b))


if __name__ == "__main__":
    main()
