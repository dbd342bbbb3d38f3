"""bcc Na frames over the lattice scan of `tub mlff ocv` and a little beyond (a = 3.95-4.7 A; the MD
rounds sampled only 4.1-4.3 A, so the model's Na reference at the scan edge, 4.5 A, was an
extrapolation): 2x2x2 cubic cells, random symmetric strain (+-1 %), Gaussian rattle 0.005-0.05 A
(every fourth frame unrattled), GFN1-xTB labels (tblite). Seeded; the v10 data:

    python make_bcc_data.py 900000 160 bcc_train.extxyz
    python make_bcc_data.py 910000 32 bcc_valid.extxyz
    python make_bcc_data.py 920000 32 bcc_test.extxyz
"""

import sys

import numpy as np
from ase.build import bulk
from ase.io import write

from tub_mlff.labelling import label_xtb

seed0, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for k in range(n):
    r = np.random.default_rng(seed0 + k)
    a = bulk("Na", "bcc", a=float(r.uniform(3.95, 4.7)), cubic=True).repeat((2, 2, 2))
    eps = r.uniform(-0.01, 0.01, (3, 3))
    a.set_cell(a.cell.array @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
    if k % 4:
        a.rattle(float(r.uniform(0.005, 0.05)), seed=int(r.integers(1 << 30)))
    a.info["x"], a.info["kind"] = 0, "bcc"
    write(out, label_xtb(a), format="extxyz", append=True)
