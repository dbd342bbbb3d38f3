"""Molecular dynamics with a SpookyNet calculator: NVT (Langevin, Bussi), NVE, NPT.

Integrators are ASE's: Langevin (BBK), Bussi stochastic velocity rescaling (Bussi, Donadio,
Parrinello, JCP 126, 014101 (2007)), velocity Verlet, and Langevin-BAOAB with a Langevin
barostat for NPT (needs the model's stress). At every multiple of ``interval`` steps (and at the
last step) one line goes to the thermo log and then one extxyz frame (positions, momenta,
energies, step and the run's name ``traj`` in info) is appended, each flushed to disk; a killed
run resumes from the last complete frame, and an extended run keeps its frames on the ``interval`` grid. The settings that
define the trajectory (integrator, time step, interval, temperature, ..., model) are kept in
``<trajectory>.json``; a resume must use the same settings and structure. With every frame the
integrator's full state goes to ``<trajectory>.state.json`` (written atomically): positions, momenta
and cell in full precision, the thermostat's random-number state and, for NPT, the barostat's cell
momentum and the forces it integrates with; a resume restores it, so that a killed and resumed run
continues as the uninterrupted one would (to rounding; runs without the file continue statistically
from the last frame). Every step is checked:
non-finite energies, forces or positions, or a runaway temperature, stop the run before a bad
frame is written. Committees log their energy spread and the largest per-atom force disagreement
as an uncertainty signal.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from tubcli.errors import TubError, signals_deferred
from tubcli.io import read_json, to_json, write_json, write_text

ENSEMBLES = ("nvt-langevin", "nvt-bussi", "nve", "npt")
THERMO_HEADER = ("step,time_fs,epot_eV,ekin_eV,etot_eV,temperature_K,volume_A3,pressure_GPa,energy_std_eV,"
                 "max_force_disagreement_eVA,conserved_eV\n")


class SavedFrames:
    """The complete frames of an extxyz trajectory, indexed without being held in memory.

    A resume needs only the first frames (structure and settings), the last one (where to go on), each
    frame's step and byte offsets; a long run's file (10^5 frames of 800 atoms: 12 GB) would not fit in
    memory parsed. One pass over the lines records where each frame starts and ends and its ``step``;
    ``frames[k]`` parses frame k from the file on demand. A truncated last frame (killed writer) is
    dropped: fewer lines than its atom count, no final newline, or a frame ASE cannot read.
    """

    def __init__(self, path: Path):
        from itertools import islice

        from ase.io.extxyz import key_val_str_to_dict

        self.path, self.starts, self.ends, self.steps = Path(path), [], [], []
        self._parsed: dict[int, object] = {}
        pos = 0
        with open(self.path, "rb") as fh:
            while head := fh.readline():
                try:
                    n = int(head.strip())
                except ValueError:
                    break
                comment = fh.readline()
                size, lines, last = len(head) + len(comment), 0, comment
                for last in islice(fh, n):
                    size, lines = size + len(last), lines + 1
                if lines < n or not last.endswith(b"\n"):
                    break  # the writer was killed inside this frame
                try:
                    step = int(key_val_str_to_dict(comment.decode()).get("step", 0))
                except (ValueError, TypeError, UnicodeDecodeError):
                    break
                self.starts.append(pos)
                pos += size
                self.ends.append(pos)
                self.steps.append(step)
        while self.starts:  # damage the line count cannot see ends the usable part
            try:
                self[-1]
                break
            except Exception:  # noqa: BLE001
                for a in (self.starts, self.ends, self.steps):
                    a.pop()
                self._parsed.clear()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, k: int):
        from ase.io import read

        k = range(len(self))[k]
        if k not in self._parsed:
            with open(self.path, "rb") as fh:
                fh.seek(self.starts[k])
                text = fh.read(self.ends[k] - self.starts[k]).decode()
            self._parsed[k] = read(io.StringIO(text), format="extxyz")
        return self._parsed[k]


def _append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _frame_text(atoms) -> str:
    from ase.io import write

    buf = io.StringIO()
    write(buf, atoms, format="extxyz")
    return buf.getvalue()


def degrees_of_freedom(atoms, ensemble: str) -> int:
    """Degrees of freedom that carry kinetic energy: ASE's count (3N less constrained ones), less 3
    where the centre of mass stays at rest (Bussi and NVE start from zero total momentum and
    conserve it, unless constraints such as FixAtoms take momentum out), not where Langevin noise
    moves it."""
    at_rest = ensemble in ("nvt-bussi", "nve") and not atoms.constraints and len(atoms) > 1
    return max(atoms.get_number_of_degrees_of_freedom() - (3 if at_rest else 0), 1)


VACUUM_GAP_A = 6.0  # an atom-free slab this thick across a periodic cell is vacuum (gallery cells: ~3 Å)


def vacuum_gap(atoms) -> tuple[float, int]:
    """The thickest atom-free slab across the cell (Å, measured between lattice planes) and its cell axis
    (0, 1, 2 for a, b, c); (0.0, -1) without a periodic axis. A slab stored as periodic in 3-D (as ASE
    builds them) has one: its stress is no pressure and its cell has no restoring force along it."""
    best, axis = 0.0, -1
    if len(atoms) == 0:
        return best, axis
    reciprocal = atoms.cell.reciprocal()
    fractions = atoms.get_scaled_positions(wrap=True)
    for i in np.flatnonzero(atoms.pbc):
        s = np.sort(fractions[:, i])
        gap = float(np.diff(np.r_[s, s[0] + 1.0]).max() / np.linalg.norm(reciprocal[i]))
        if gap > best:
            best, axis = gap, int(i)
    return best, axis


def make_dynamics(atoms, ensemble: str, timestep_fs: float, temperature_K: float, friction_per_fs: float,
                  taut_fs: float, pressure_GPa: float, taup_fs: float, seed: int, hydrostatic: bool = False):
    """The ASE integrator of ``ensemble``. NPT is ASE's Langevin BAOAB barostat (every cell component
    moves; ``hydrostatic`` keeps the cell's shape), driven at the external stress −P (ASE's stress
    sign: positive = tensile), so a positive pressure compresses."""
    from ase import units

    rng = np.random.default_rng(seed)
    dt = timestep_fs * units.fs
    if ensemble == "nvt-langevin":
        from ase.md.langevin import Langevin

        return Langevin(atoms, dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs, fixcm=False,
                        rng=rng)
    if ensemble == "nvt-bussi":
        from ase.md.bussi import Bussi

        if temperature_K <= 0 or atoms.get_kinetic_energy() <= 0:
            raise TubError("nvt-bussi rescales the velocities to the target temperature and needs --temp above 0; "
                           "use nvt-langevin (or nve) for a run at 0 K")
        dyn = Bussi(atoms, dt, temperature_K=temperature_K, taut=taut_fs * units.fs, rng=rng)
        # the centre-of-mass momentum starts at zero and Bussi's rescaling keeps it there: 3N - 3
        # degrees of freedom carry the kinetic energy (ASE counts 3N, which runs 3/(3N-3) too hot)
        dyn.ndof = degrees_of_freedom(atoms, ensemble)
        dyn.target_kinetic_energy = 0.5 * dyn.temp * dyn.ndof
        return dyn
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, dt)
    if ensemble == "npt":
        from ase.md.langevinbaoab import LangevinBAOAB

        gap, axis = vacuum_gap(atoms)
        if not atoms.pbc.all():
            what = f"is not periodic along {', '.join('abc'[i] for i in np.flatnonzero(~atoms.pbc))}"
        elif atoms.info.get("stacking") in ("slab", "bilayer"):
            what = f"is a {atoms.info['stacking']}"
        elif gap > VACUUM_GAP_A:
            what = f"has {gap:.1f} Å of vacuum along {'abc'[axis]}"
        else:
            what = None
        if what is not None:  # vacuum: no restoring stress, the barostat would collapse or inflate it
            raise TubError(f"NPT needs a cell periodic in all three directions without a vacuum gap (this one "
                           f"{what}); use nvt-* for slabs and bilayers")
        import warnings

        with warnings.catch_warnings():  # ASE's note that it sets the barostat mass from P_tau (in its units)
            warnings.filterwarnings("ignore", message="Using heuristic P_mass", category=UserWarning)
            return LangevinBAOAB(atoms, dt, temperature_K=temperature_K, externalstress=-pressure_GPa * units.GPa,
                                 hydrostatic=hydrostatic, T_tau=taut_fs * units.fs, P_tau=taup_fs * units.fs, rng=rng)
    raise TubError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")


def settings_path(traj: Path) -> Path:
    """Where the settings that define a trajectory are kept: ``trajectory.extxyz`` -> ``trajectory.json``."""
    return Path(traj).with_suffix(".json")


def state_path(traj: Path) -> Path:
    """The integrator state at the last saved frame: ``trajectory.extxyz`` -> ``trajectory.state.json``."""
    return Path(traj).with_suffix(".state.json")


# integrator attributes beyond the atoms and the random stream: LangevinBAOAB's barostat momentum p_eps
# and the accelerations/cell force it carries from one step to the next; Bussi's energy tally
_DYN_STATE = ("p_eps", "accel", "force_eps", "transferred_energy")


def _save_state(path: Path, dyn, atoms, step: int) -> None:
    """The state that makes a resume an exact continuation (JSON floats round-trip exactly)."""
    state = {"format": 1, "step": step, "positions": atoms.get_positions(), "momenta": atoms.get_momenta(),
             "cell": np.asarray(atoms.cell)}
    rng = getattr(dyn, "rng", None)
    if isinstance(rng, np.random.Generator):
        state["rng"] = rng.bit_generator.state
    for name in _DYN_STATE:
        if hasattr(dyn, name):
            state[name] = getattr(dyn, name)
    write_text(path, to_json(state) + "\n")  # temp file + os.replace: never half written


def _load_state(path: Path, step: int, frame) -> tuple[dict | None, str]:
    """The saved state if it belongs to ``frame`` (the last one, at ``step``), else (None, why not)."""
    if not path.exists():
        return None, f"no {path.name} (a run made before it was written)"
    try:
        state = json.loads(path.read_text())
        n = len(frame)
        pos, mom = (np.array(state[k], dtype=float) for k in ("positions", "momenta"))
        cell = np.array(state["cell"], dtype=float)
        saved_step = int(state["step"])
    except (ValueError, KeyError, TypeError):
        return None, f"{path.name} is unreadable"
    if saved_step != step:
        return None, f"{path.name} is of step {saved_step}, not of the last frame's step {step}"
    if pos.shape != (n, 3) or mom.shape != (n, 3) or cell.shape != (3, 3) or not (
            np.allclose(pos, frame.positions, atol=1e-5) and np.allclose(cell, frame.cell.array, atol=1e-5)):
        return None, f"{path.name} does not match the last frame"
    state.update(positions=pos, momenta=mom, cell=cell)
    return state, ""


def _restore_dynamics(dyn, state: dict) -> None:
    if "rng" in state and isinstance(getattr(dyn, "rng", None), np.random.Generator):
        dyn.rng.bit_generator.state = state["rng"]
    for name in _DYN_STATE:
        if name in state and hasattr(dyn, name):
            value = state[name]
            setattr(dyn, name, np.array(value, dtype=float) if isinstance(value, list) else float(value))


def _check_resume(frames, atoms, settings: dict, traj: Path) -> None:
    """TubError unless ``atoms`` and ``settings`` are those the trajectory was made with."""
    first, last = frames[0], frames[-1]
    diffs = []
    if len(first) != len(atoms):
        diffs.append(f"{len(first)} atoms (the input has {len(atoms)})")
    elif (first.numbers != atoms.numbers).any():
        same = sorted(first.numbers) == sorted(atoms.numbers)
        diffs.append("the same atoms in another order" if same else
                     f"{first.get_chemical_formula()} (the input is {atoms.get_chemical_formula()})")
    if (first.pbc != atoms.pbc).any():
        diffs.append(f"pbc={first.pbc.tolist()} (the input has {atoms.pbc.tolist()})")
    elif not np.allclose(first.cell.array, atoms.cell.array, atol=1e-4):
        diffs.append("another cell")
    stored_path = settings_path(traj)
    if stored_path.exists():
        stored = read_json(stored_path)
        now = json.loads(json.dumps(settings))
        if "npt_cell" in now and "npt_cell" not in stored and now.get("pressure_GPa"):
            diffs.append("the barostat's pressure sign (this run was made before the NPT pressure fix, with the "
                         "opposite pressure)")
        if now.get("ensemble") == "nvt-bussi" and "ndof" not in stored:
            diffs.append("Bussi's degrees of freedom (this run was made before the 3N - 3 fix and ran "
                         f"{3 * len(atoms)}/{now['ndof']} too hot)")
        for key in now:
            if key in stored and stored[key] != now[key] and key != "model":
                if key == "model_sha256":
                    diffs.append(f"model {stored.get('model')} (now {now.get('model')})")
                else:
                    diffs.append(f"{key}={stored[key]} (now {now[key]})")
    elif len(frames) > 1:  # an older run without the settings file: check what the frames tell
        step = int(frames[1].info.get("step", 0))
        dt = float(frames[1].info.get("time_fs", 0.0)) / max(step, 1)
        if not np.isclose(dt, settings["timestep_fs"], rtol=1e-6):
            diffs.append(f"timestep_fs={dt:g} (now {settings['timestep_fs']:g})")
        if step != settings["interval"] and len(frames) > 2:
            diffs.append(f"interval={step} (now {settings['interval']})")
    if diffs:
        raise TubError(f"the trajectory {traj} was made with {'; '.join(diffs)}; "
                       "use a new -o or the same structure and settings")
    if not (np.isfinite(last.positions).all() and np.isfinite(last.get_momenta()).all()):
        raise TubError(f"the last frame of {traj} is not finite (the run became unstable); "
                       "start again in a new -o with a smaller --timestep")


def trajectory_id(atoms, settings: dict) -> str:
    """The name of one MD run, written into every frame as info["traj"]: the key `train` splits by, so that
    the correlated frames of one run, once labelled, land together in train, valid or test. A digest of the
    starting structure and the settings (seed and model digest included, model paths not): another run gets
    another name, and a resume or a rerun of the same run the same one."""
    import hashlib

    h = hashlib.sha256()
    for a in (atoms.numbers.astype(np.int64), np.round(atoms.positions, 6) + 0.0,
              np.round(np.asarray(atoms.cell), 6) + 0.0, np.asarray(atoms.pbc, dtype=np.int8)):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(to_json({k: settings[k] for k in sorted(settings) if k != "model"}).encode())
    return f"md-{h.hexdigest()[:16]}"


def _thermo_rows(thermo: Path, steps: set[int]) -> list[str]:
    """The header and the complete thermo lines of the given steps (a killed writer leaves a partial line)."""
    rows, seen = [THERMO_HEADER], set()
    text = thermo.read_text() if thermo.exists() else ""
    for line in text.splitlines(keepends=True):
        fields = line.split(",")
        if line.endswith("\n") and len(fields) == THERMO_HEADER.count(","):  # a run logged before conserved_eV
            line, fields = line[:-1] + ",nan\n", fields + ["nan"]
        if not line.endswith("\n") or len(fields) != THERMO_HEADER.count(",") + 1 or not fields[0].isdigit():
            continue
        step = int(fields[0])
        if step in steps and step not in seen:
            rows.append(line)
            seen.add(step)
    return rows


def _thermo_summary(thermo: Path) -> dict:
    """Mean temperature (all rows, and the second half: past the equilibration of a run that started
    elsewhere), last potential energy and largest committee energy spread of the whole run,
    from its thermo log: a resumed or rerun run reports all of its frames, not only this call's."""
    import csv

    with open(thermo, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("temperature_K")]
    temps = [float(r["temperature_K"]) for r in rows]
    stds = np.array([float(r.get("energy_std_eV") or "nan") for r in rows])
    later = temps[len(temps) // 2:]  # equilibrated, for a run that starts away from its temperature
    return {"mean_temperature_K": float(np.mean(temps)) if temps else float("nan"),
            "mean_temperature_second_half_K": float(np.mean(later)) if later else float("nan"),
            "final_epot_eV": float(rows[-1]["epot_eV"]) if rows else float("nan"),
            "max_energy_std_eV": float(np.nanmax(stds)) if np.isfinite(stds).any() else None}


# what an MD frame keeps of its start structure: the structure, the metadata of `tub mlff build` (ocv's
# --md-average reads it), charge, spin and config_type. Nothing else: any other key may be a label of the
# start frame (REF_energy, E_dft, U0, virials, …), which train would otherwise fit as every frame's
KEPT_INFO = ("anchors", "groups", "stacking", "n", "sheets", "block", "na_sites", "x", "na_count", "charge",
             "spin", "config_type")
STRUCTURE_ARRAYS = ("numbers", "positions", "momenta", "masses", "tags")


def without_labels(atoms):
    """A copy of ``atoms`` for an MD frame: its structure and the metadata of :data:`KEPT_INFO`; every
    other info key and per-atom array of the start frame (its labels, whatever their names) is left out."""
    frame = atoms.copy()
    frame.calc = None
    for name in [n for n in frame.arrays if n not in STRUCTURE_ARRAYS]:
        del frame.arrays[name]
    frame.info = {k: v for k, v in frame.info.items() if k in KEPT_INFO}
    return frame


def run_md(atoms, calc, traj: Path, thermo: Path, steps: int, ensemble: str = "nvt-langevin",
           timestep_fs: float = 0.5, temperature_K: float = 300.0, friction_per_fs: float = 0.01,
           taut_fs: float = 100.0, pressure_GPa: float = 0.0, taup_fs: float = 1000.0,
           interval: int = 10, seed: int = 0, log=None, progress=None, settings: dict | None = None,
           npt_cell: str = "full") -> dict:
    """Run (or resume) MD up to ``steps`` total steps; returns a summary dict.

    ``settings`` (e.g. the model files and their digests, charge, spin) are stored with the
    integrator settings in ``settings_path(traj)``; resuming with other values is an error.
    """
    from ase import units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md import velocitydistribution

    if steps < 1 or interval < 1 or timestep_fs <= 0:
        raise ValueError("steps and interval must be at least 1 and timestep_fs positive")
    traj, thermo = Path(traj), Path(thermo)
    settings = {"ensemble": ensemble, "timestep_fs": timestep_fs, "interval": interval,
                "temperature_K": temperature_K, "friction_per_fs": friction_per_fs, "taut_fs": taut_fs,
                "pressure_GPa": pressure_GPa, "taup_fs": taup_fs, "seed": seed, **(settings or {})}
    if ensemble == "npt":  # (runs before this setting drove the barostat at the opposite pressure)
        settings["npt_cell"] = npt_cell
    settings["ndof"] = degrees_of_freedom(atoms, ensemble)  # (Bussi and the logged T counted 3N before)
    frames: SavedFrames | list = []
    if traj.exists() and traj.stat().st_size > 0:
        frames = SavedFrames(traj)
        if not frames:
            raise TubError(f"{traj} exists but holds no complete frame; remove it or choose another --out")
        _check_resume(frames, atoms, {k: v for k, v in settings.items() if k != "seed"}, traj)
    # a resumed run keeps its frames' name (runs made before frames carried one get it from here on)
    traj_id = str(frames[0].info["traj"]) if frames and "traj" in frames[0].info else trajectory_id(atoms, settings)
    atoms = atoms.copy()
    start = frames.steps[-1] if frames else 0
    saved, why = None, ""
    if frames:
        last = frames[-1]
        saved, why = _load_state(state_path(traj), start, last)
        if start == 0 and not saved:  # frame 0 alone, killed before its state was saved: a fresh start is exact
            frames = []
    if frames:
        atoms.cell = saved["cell"] if saved else last.cell
        atoms.positions = saved["positions"] if saved else last.positions
        atoms.set_momenta(saved["momenta"] if saved else last.get_momenta())
    else:
        rng = np.random.default_rng(seed)
        if hasattr(velocitydistribution, "thermalize_momenta"):  # ASE >= 3.29 (the same draws)
            velocitydistribution.thermalize_momenta(atoms, temperature_K, rng=rng)
        else:
            velocitydistribution.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
        velocitydistribution.Stationary(atoms)
    atoms.calc = calc
    if start >= steps:
        if log:
            log.info("%s already reached step %d; give a larger --steps to extend it", traj, start)
        return {"steps_done": start, "resumed_from": start, "frames": len(frames), **_thermo_summary(thermo)}
    dyn = make_dynamics(atoms, ensemble, timestep_fs, temperature_K, friction_per_fs, taut_fs,
                        pressure_GPa, taup_fs, seed + start,
                        hydrostatic=npt_cell == "iso")  # checks the ensemble before anything is written
    if saved:
        _restore_dynamics(dyn, saved)
    gap, axis = vacuum_gap(atoms)
    periodic3 = bool(atoms.pbc.all()) and gap <= VACUUM_GAP_A  # else no pressure: the volume is partly vacuum
    if atoms.pbc.all() and not periodic3 and log and not frames:
        log.warning("the cell has %.1f Å of vacuum along %s: thermo.csv's pressure_GPa and volume_A3 are left "
                    "empty (NaN), as for a slab (a pressure averaged over vacuum describes nothing)", gap, "abc"[axis])
    ndof = degrees_of_freedom(atoms, ensemble)

    def thermo_line(step: int) -> tuple[str, float, float, float]:
        epot = atoms.get_potential_energy()
        ekin = atoms.get_kinetic_energy()
        T = 2.0 * ekin / (ndof * units.kB)
        vol = atoms.get_volume() if periodic3 else float("nan")
        press = float("nan")
        if periodic3:
            s = atoms.get_stress(include_ideal_gas=True)
            press = -float(np.mean(s[:3])) / units.GPa
        std = calc.results.get("energy_std", float("nan"))
        dis = calc.results.get("force_disagreement")
        dmax = float(np.max(dis)) if dis is not None else float("nan")
        # what the integrator conserves: the total energy (NVE), less the energy Bussi's thermostat added
        # (Bussi 2007, Eq. 12's effective energy); Langevin and the NPT barostat track none
        conserved = {"nve": epot + ekin, "nvt-bussi": epot + ekin - getattr(dyn, "transferred_energy", np.nan)
                     }.get(ensemble, float("nan"))
        line = (f"{step},{step * timestep_fs:.3f},{epot:.8f},{ekin:.8f},{epot + ekin:.8f},{T:.3f},"
                f"{vol:.4f},{press:.6f},{std:.6g},{dmax:.6g},{conserved:.8f}\n")
        return line, epot, T, std

    if frames:
        kept = len(frames)
        if start % interval:  # an off-grid final frame: continue from it, but keep the saved frames on the grid
            kept -= 1
            if log:
                log.info("extending: the final frame at step %d is replaced by the frames on the %d-step grid",
                         start, interval)
        with open(traj, "r+") as fh:  # cut a half-written frame (killed run) and an off-grid final frame
            fh.truncate(frames.ends[kept - 1] if kept else 0)
        kept_steps = set(frames.steps[:kept])
        rows = _thermo_rows(thermo, kept_steps)
        line = thermo_line(start)[0]  # also leaves the calculator's results as record() left them (stress too)
        if kept == len(frames) and start not in {int(r.split(",")[0]) for r in rows[1:]}:
            rows.append(line)  # killed between frame and row (runs that wrote the frame first)
        write_text(thermo, "".join(rows))
        if not settings_path(traj).exists():
            write_json(settings_path(traj), settings)
        if log and saved:
            log.info("resuming from step %d (%s) with the saved integrator state: the same continuation up to float "
                     "rounding (the neighbour list is rebuilt)", start, traj)
        elif log:
            lost = {"nve": " (NVE: close to, not exactly, the uninterrupted run)",
                    "npt": ", a new random stream and the barostat's cell momentum at 0"}.get(ensemble, ", a new random stream")
            log.info("resuming from step %d (%s) without the integrator state (%s): from the last frame's "
                     "8-decimal positions and momenta%s; the continuation is statistical, not the run an "
                     "uninterrupted one would have made", start, traj, why, lost)
    else:
        kept = 0
        traj.unlink(missing_ok=True)  # an empty file, or a frame 0 without its state: written again
        write_json(settings_path(traj), settings)
        write_text(thermo, THERMO_HEADER)
    written = 0  # frames this call writes

    def record(step: int) -> None:
        line, epot, T, _ = thermo_line(step)
        frame = without_labels(atoms)
        for key in ("charge", "spin"):  # the state the model ran at, for labelling the frame later
            if getattr(calc, key, None) is not None:
                frame.info[key] = getattr(calc, key)
        frame.info.update({"step": step, "time_fs": step * timestep_fs, "epot": epot, "temperature": T,
                           "traj": traj_id,  # train's split keeps this run's frames in one share
                           "predicted_by": "tub mlff md"})  # train/evaluate refuse them as labels
        if ensemble != "nve":  # the thermostat's temperature (ocv --md-average averages runs at one)
            frame.info["temperature_set_K"] = float(temperature_K)
        frame.set_momenta(atoms.get_momenta())
        # energy, forces (and stress) with the frame, as ASE readers expect them
        res = calc.results
        frame.calc = SinglePointCalculator(frame, energy=epot, forces=res["forces"],
                                           **({"stress": res["stress"]} if "stress" in res else {}))
        if res.get("force_disagreement") is not None:  # committee: per-atom spread, for picking frames to label
            frame.arrays["force_disagreement"] = np.asarray(res["force_disagreement"], dtype=float)
            frame.info["energy_std"] = float(res.get("energy_std", float("nan")))
        text = _frame_text(frame)
        with signals_deferred():  # SIGTERM waits for all three: a resume after it is always exact
            _append(thermo, line)  # the row first: a kill -9 between the two leaves a row without a frame,
            _append(traj, text)  # dropped on resume
            _save_state(state_path(traj), dyn, atoms, step)  # after the frame: a kill -9 between leaves a stale
            # state, and the resume is statistical (it says so)
        nonlocal written
        written += 1

    hot = max(10.0 * temperature_K, 10_000.0)  # K; far beyond any thermostat's fluctuation
    volume0 = atoms.get_volume() if ensemble == "npt" else None

    def guard() -> None:  # after every step: a blown-up run stops before it writes a bad frame
        step = start + dyn.nsteps
        e, f = calc.results.get("energy"), calc.results.get("forces")
        finite = (np.isfinite(atoms.positions).all() and e is not None and np.isfinite(e)
                  and f is not None and np.isfinite(f).all())
        T = 2.0 * atoms.get_kinetic_energy() / (ndof * units.kB) if finite else float("nan")
        grown = atoms.get_volume() / volume0 if volume0 and finite else 1.0
        if not finite or T > hot or not 0.25 < grown < 4.0:
            what = ("non-finite energy, forces or positions" if not finite else f"temperature {T:.3g} K" if T > hot
                    else f"the cell volume changed {grown:.3g}-fold")
            raise TubError(f"MD became unstable at step {step} ({what}); lower --timestep (now {timestep_fs:g} fs) "
                           "and start again in a new -o", exit_code=1)

    dyn.attach(guard, interval=1)
    if not kept:  # a fresh run (a resume from step 0 kept frame 0: no second one)
        record(0)
    done = start
    while done < steps:
        n = min(interval - done % interval, steps - done)  # to the next grid point (or the end)
        dyn.run(n)
        done += n
        record(done)
        if progress is not None:
            progress(done, steps)
    return {"steps_done": done, "resumed_from": start, "frames": kept + written, **_thermo_summary(thermo)}
