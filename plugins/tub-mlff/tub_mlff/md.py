"""Molecular dynamics with a SpookyNet calculator: NVT (Langevin, Bussi), NVE, NPT.

Integrators are ASE's: Langevin (BBK), Bussi stochastic velocity rescaling (Bussi, Donadio,
Parrinello, JCP 126, 014101 (2007)), velocity Verlet, and Langevin-BAOAB with a Langevin
barostat for NPT (needs the model's stress). Every ``interval`` steps one extxyz frame (positions,
momenta, energies, step in info) is appended and flushed, and one line goes to the thermo log;
a killed run resumes from the last complete frame. Committees log their energy spread and the
largest per-atom force disagreement as an uncertainty signal.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from tubcli.errors import TubError

ENSEMBLES = ("nvt-langevin", "nvt-bussi", "nve", "npt")
THERMO_HEADER = "step,time_fs,epot_eV,ekin_eV,etot_eV,temperature_K,volume_A3,pressure_GPa,energy_std_eV,max_force_disagreement_eVA\n"


def read_complete_frames(path: Path):
    """Frames of an extxyz trajectory, dropping a truncated last frame (killed writer)."""
    from ase.io import read

    text = path.read_text()
    frames = []
    lines = text.splitlines(keepends=True)
    k = 0
    good_end = 0
    while k < len(lines):
        try:
            n = int(lines[k].strip())
        except ValueError:
            break
        if k + 2 + n > len(lines):
            break
        block = "".join(lines[k:k + 2 + n])
        try:
            frames.append(read(io.StringIO(block), format="extxyz"))
        except Exception:  # noqa: BLE001 - an incomplete frame ends the usable part
            break
        k += 2 + n
        good_end = sum(len(x) for x in lines[:k])
    return frames, good_end, len(text)


def _append_frame(path: Path, atoms) -> None:
    from ase.io import write

    buf = io.StringIO()
    write(buf, atoms, format="extxyz")
    with open(path, "a") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def make_dynamics(atoms, ensemble: str, timestep_fs: float, temperature_K: float, friction_per_fs: float,
                  taut_fs: float, pressure_GPa: float, taup_fs: float, seed: int):
    from ase import units

    rng = np.random.default_rng(seed)
    dt = timestep_fs * units.fs
    if ensemble == "nvt-langevin":
        from ase.md.langevin import Langevin

        return Langevin(atoms, dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs, fixcm=False,
                        rng=rng)
    if ensemble == "nvt-bussi":
        from ase.md.bussi import Bussi

        return Bussi(atoms, dt, temperature_K=temperature_K, taut=taut_fs * units.fs, rng=rng)
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, dt)
    if ensemble == "npt":
        from ase.md.langevinbaoab import LangevinBAOAB

        if not atoms.pbc.all():
            raise TubError("NPT needs a cell periodic in all three directions; use nvt-* for slabs")
        return LangevinBAOAB(atoms, dt, temperature_K=temperature_K, externalstress=pressure_GPa * units.GPa,
                             T_tau=taut_fs * units.fs, P_tau=taup_fs * units.fs, rng=rng)
    raise TubError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")


def run_md(atoms, calc, traj: Path, thermo: Path, steps: int, ensemble: str = "nvt-langevin",
           timestep_fs: float = 0.5, temperature_K: float = 300.0, friction_per_fs: float = 0.01,
           taut_fs: float = 100.0, pressure_GPa: float = 0.0, taup_fs: float = 1000.0,
           interval: int = 10, seed: int = 0, log=None, progress=None) -> dict:
    """Run (or resume) MD up to ``steps`` total steps; returns a summary dict."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    traj, thermo = Path(traj), Path(thermo)
    start = 0
    if traj.exists() and traj.stat().st_size > 0:
        frames, good_end, size = read_complete_frames(traj)
        if not frames:
            raise TubError(f"{traj} exists but holds no complete frame; remove it or choose another --out")
        if good_end < size:  # cut a half-written last frame left by a killed run
            with open(traj, "r+") as fh:
                fh.truncate(good_end)
        last = frames[-1]
        start = int(last.info.get("step", 0))
        atoms = atoms.copy()
        atoms.positions = last.positions
        atoms.cell = last.cell
        atoms.set_momenta(last.get_momenta())
        if log:
            log.info("resuming from step %d (%s)", start, traj)
        if thermo.exists():  # drop thermo lines beyond the last saved frame
            kept = [ln for ln in thermo.read_text().splitlines(keepends=True)
                    if ln.startswith("step") or int(ln.split(",")[0]) <= start]
            thermo.write_text("".join(kept))
    else:
        atoms = atoms.copy()
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
        Stationary(atoms)
        thermo.write_text(THERMO_HEADER)
    atoms.calc = calc
    if start >= steps:
        return {"steps_done": start, "resumed_from": start, "frames": _count(traj)}
    dyn = make_dynamics(atoms, ensemble, timestep_fs, temperature_K, friction_per_fs, taut_fs,
                        pressure_GPa, taup_fs, seed + start)
    temps, epots, stds = [], [], []
    periodic3 = bool(atoms.pbc.all())

    def record(step: int) -> None:
        epot = atoms.get_potential_energy()
        ekin = atoms.get_kinetic_energy()
        T = atoms.get_temperature()
        vol = atoms.get_volume() if periodic3 else float("nan")
        press = float("nan")
        if periodic3:
            s = atoms.get_stress(include_ideal_gas=True)
            press = -float(np.mean(s[:3])) / units.GPa
        std = calc.results.get("energy_std", float("nan"))
        dis = calc.results.get("force_disagreement")
        dmax = float(np.max(dis)) if dis is not None else float("nan")
        frame = atoms.copy()
        frame.calc = None
        frame.info.update({"step": step, "time_fs": step * timestep_fs, "epot": epot, "temperature": T})
        frame.set_momenta(atoms.get_momenta())
        _append_frame(traj, frame)
        with open(thermo, "a") as fh:
            fh.write(f"{step},{step * timestep_fs:.3f},{epot:.8f},{ekin:.8f},{epot + ekin:.8f},{T:.3f},"
                     f"{vol:.4f},{press:.6f},{std:.6g},{dmax:.6g}\n")
        temps.append(T)
        epots.append(epot)
        stds.append(std)

    if start == 0:
        record(0)
    done = start
    while done < steps:
        n = min(interval, steps - done)
        dyn.run(n)
        done += n
        if done % interval == 0 or done == steps:
            record(done)
        if progress is not None:
            progress(done, steps)
    return {"steps_done": done, "resumed_from": start, "frames": _count(traj),
            "mean_temperature_K": float(np.mean(temps)) if temps else float("nan"),
            "final_epot_eV": float(epots[-1]) if epots else float("nan"),
            "max_energy_std_eV": float(np.nanmax(stds)) if stds and np.isfinite(stds).any() else None}


def _count(traj: Path) -> int:
    frames, _, _ = read_complete_frames(traj)
    return len(frames)
