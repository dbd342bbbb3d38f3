"""`tub demo mlff`: the shipped xTB-trained model runs 300 K MD on Na2AB and an OCV curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL = Path(__file__).parent / "models" / "demo_nacnh.safetensors"


def run_demo(run) -> dict:
    import torch

    from .battery import sodiation_series
    from .calculator import SpookyNetCalculator
    from .md import run_md
    from .plots import voltage_plot
    from .battery import VoltageStep
    from .structures import add_sodium, janus_graphene, spin_for
    from tubcli.io import write_json

    torch.set_num_threads(1)  # a 33-atom cell: one thread is fastest, and robust on shared CPUs
    host = janus_graphene(3, 1, stacking="gallery", interlayer=9.0)
    atoms = add_sodium(host, 2, "random", seed=run.seed + 1)
    calc = SpookyNetCalculator(str(MODEL), spin=spin_for(atoms), dtype=torch.float32)
    md = run_md(atoms, calc, run.outputs_dir / "trajectory.extxyz", run.outputs_dir / "thermo.csv",
                steps=400, ensemble="nvt-langevin", timestep_fs=0.5, temperature_K=300.0,
                friction_per_fs=0.02, interval=20, seed=run.seed, log=run.log)
    run.log.info("MD: %d steps, mean T %.0f K", md["steps_done"], md["mean_temperature_K"])
    frames = [host] + [add_sodium(host, x, "random", seed=run.seed + 10 * x + v) for x in (1, 2, 3) for v in range(2)]
    for f in frames:
        f.info["groups"] = 1

    def calc_for(a):
        return SpookyNetCalculator(str(MODEL), spin=0 if a is None else spin_for(a), dtype=torch.float32)

    ocv = sodiation_series(frames, calc_for, relax_steps=20, fmax=0.1)
    steps = [VoltageStep(s["x_start"], s["x_end"], s["voltage_V"]) for s in ocv["steps"]]
    voltage_plot(run.outputs_dir / "voltage_profile.png", ocv["x"], ocv["formation_energy_eV"], steps,
                 ocv["capacity_per_x_mAh_g"])
    write_json(run.outputs_dir / "ocv.json", ocv)
    return {"md_steps": md["steps_done"], "md_mean_T_K": round(md["mean_temperature_K"], 1),
            "ocv_average_V": round(ocv["average_voltage_V"], 3) if np.isfinite(ocv["average_voltage_V"]) else None,
            "capacity_mAh_g": round(ocv["capacity_mAh_g"], 1), "model": MODEL.name}
