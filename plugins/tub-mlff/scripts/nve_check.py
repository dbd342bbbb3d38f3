"""NVE check of a model: Na2AB gallery cell (33 atoms), float64, 300 K Maxwell-Boltzmann start
(seed 0), velocity Verlet at 0.5 fs; prints the total-energy range and linear drift.

    python nve_check.py tub_mlff/models/demo_nacnh.safetensors          # 2000 steps = 1 ps
    python nve_check.py tub_mlff/models/demo_nacnh.safetensors 20000    # 10 ps (spec target 2)
"""

import sys

import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

from tub_mlff.calculator import SpookyNetCalculator
from tub_mlff.structures import add_sodium, janus_graphene, spin_for

a = add_sodium(janus_graphene(3, 1, stacking="gallery", interlayer=9.0), 2, "random", seed=1)
a.calc = SpookyNetCalculator(sys.argv[1], spin=spin_for(a), dtype=torch.float64)
MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(0))
dyn = VelocityVerlet(a, 0.5 * units.fs)
E = []
dyn.attach(lambda: E.append(a.get_total_energy()), interval=1)
dyn.run(int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
E = np.array(E)
t = np.arange(len(E)) * 0.5e-3  # ps
print(len(a), "atoms,", len(E) - 1, "steps; total-energy range %.2f meV, drift %.2f meV/ps"
      % (1000 * (E.max() - E.min()), 1000 * np.polyfit(t, E, 1)[0]))
