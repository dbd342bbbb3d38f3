"""`tub demo mlff`: the shipped xTB-trained model runs 300 K MD on Na2AB and an OCV curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL = Path(__file__).parent / "models" / "demo_nacnh.safetensors"


def run_demo(run) -> dict:
    import torch
    from ase.io import read

    from .battery import sodiation_series
    from .calculator import SpookyNetCalculator
    from .md import run_md
    from .plots import voltage_plot
    from .structures import add_sodium, janus_graphene, spin_for
    from tubcli.io import write_json

    torch.set_num_threads(1)  # a 33-atom cell: one thread is fastest, and robust on shared CPUs
    if run.cfg.precision not in ("fp32", "fp64"):  # `tub demo` takes the shared precision setting
        run.log.warning("the mlff demo computes in fp32, not %s (forces need fp32 or fp64)", run.cfg.precision)
    dtype = torch.float64 if run.cfg.precision == "fp64" else torch.float32
    host = janus_graphene(3, 1, stacking="gallery", interlayer=9.0)
    atoms = add_sodium(host, 2, "random", seed=run.seed + 1)
    calc = SpookyNetCalculator(str(MODEL), spin=spin_for(atoms), dtype=dtype, device=run.device)
    md = run_md(atoms, calc, run.outputs_dir / "trajectory.extxyz", run.outputs_dir / "thermo.csv",
                steps=400, ensemble="nvt-langevin", timestep_fs=0.5, temperature_K=300.0,
                friction_per_fs=0.02, interval=20, seed=run.seed, log=run.log)
    run.log.info("MD: %d steps, mean T %.0f K (second half %.0f K)", md["steps_done"], md["mean_temperature_K"],
                 md["mean_temperature_second_half_K"])
    na_pairs = _sodium_pair_relevance(calc, read(run.outputs_dir / "trajectory.extxyz", -1))
    run.log.info("GNN-LRP 2-body relevance of Na with its partners (last MD frame): %s",
                 ", ".join(f"{k} {v:+.3f} eV" for k, v in na_pairs.items()))
    frames = [host] + [add_sodium(host, x, "random", seed=run.seed + 10 * x + v) for x in (1, 2, 3) for v in range(2)]
    for f in frames:
        f.info["groups"] = 1

    def calc_for(a):
        return SpookyNetCalculator(str(MODEL), spin=0 if a is None else spin_for(a), dtype=dtype,
                                   device=run.device)

    ocv, _ = sodiation_series(frames, calc_for, relax_steps=20, fmax=0.1)
    voltage_plot(run.outputs_dir / "voltage_profile.png", ocv["x"], ocv["formation_energy_eV"], ocv["steps"],
                 ocv["capacity_per_x_mAh_g"], capacity_mAh_g=ocv["capacity_mAh_g"])
    write_json(run.outputs_dir / "ocv.json", ocv)
    return {"md_steps": md["steps_done"], "md_mean_T_second_half_K": round(md["mean_temperature_second_half_K"], 1),
            "ocv_average_V": round(ocv["average_voltage_V"], 3) if np.isfinite(ocv["average_voltage_V"]) else None,
            "capacity_mAh_g": round(ocv["capacity_mAh_g"], 1), "mu_na_lattice_A": round(ocv["mu_na_lattice_A"], 2),
            "na_pair_relevance_eV": na_pairs, "model": MODEL.name}


def _sodium_pair_relevance(calc, atoms) -> dict:
    """Summed 2-body relevance (relevant_walks) of the Na atoms with each element."""
    from .relevant_walks import walk_relevances

    res = walk_relevances(calc.models[0], calc.batch_for(atoms), order=2)
    sym = np.array(atoms.get_chemical_symbols())
    na = sym == "Na"
    return {f"Na-{el}": round(float(res.two_body[np.ix_(na, sym == el)].sum() / (2 if el == "Na" else 1)), 4)
            for el in sorted(set(sym))}
