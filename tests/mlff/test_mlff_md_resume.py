"""A killed and resumed MD run continues as the uninterrupted run would: the thermostat's random stream,
the NPT barostat's cell momentum and the full-precision positions, momenta and cell are restored from
``trajectory.state.json``; runs without that file still resume (statistically). Tiny model, 8 Na atoms."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write
from tubcli.testing import expect_ok as _ok, invoke


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("mdres")
    tiny_model(d / "tiny")
    a = bulk("Na", "bcc", a=4.23, cubic=True).repeat((2, 2, 1))
    a.rattle(0.05, seed=0)
    write(d / "na.extxyz", a, format="extxyz")
    return d


def _md(d, out, ensemble, steps, *extra):
    constants = {"nvt-bussi": ["--set", "taut=20"], "npt": ["--set", "taut=20", "--set", "taup=100"]}
    return invoke(["mlff", "md", d / "na.extxyz", "--model", d / "tiny.safetensors", "--ensemble", ensemble,
                   "--steps", str(steps), "--interval", "5", "--timestep", "1", "--temp", "300",
                   *constants.get(ensemble, []), "--precision", "fp64", "--seed", "3", "-o", out, *extra])


@pytest.mark.parametrize("ensemble", ["nvt-langevin", "nvt-bussi", "npt"])
def test_resumed_md_is_the_uninterrupted_run(tmp_path, setup, ensemble):
    whole, split = tmp_path / "whole", tmp_path / "split"
    w = _ok(_md(setup, whole, ensemble, 20, "--json"))
    _ok(_md(setup, split, ensemble, 10))  # killed at step 10 (its last frame) ...
    r = _ok(_md(setup, split, ensemble, 20, "--json"))  # ... and resumed
    sw, sr = json.loads(w.stdout), json.loads(r.stdout)
    assert sr["frames"] == sw["frames"] == 5
    assert sr["mean_temperature_K"] == pytest.approx(sw["mean_temperature_K"], abs=1e-9)  # all 5 frames
    fa, fb = (read(out / "outputs" / "trajectory.extxyz", "-1") for out in (whole, split))
    assert fa.info["step"] == fb.info["step"] == 20
    # the trajectories' frames (8 decimals) agree, and so do the full-precision states (bitwise in practice;
    # the bound allows for the pair order of a neighbour list rebuilt at the resume)
    assert np.abs(fa.positions - fb.positions).max() <= 1e-6
    assert np.abs(fa.get_momenta() - fb.get_momenta()).max() <= 1e-6
    assert np.abs(fa.cell.array - fb.cell.array).max() <= 1e-6
    assert "the same continuation up to float rounding" in r.stderr
    sa, sb = (json.loads((out / "outputs" / "trajectory.state.json").read_text()) for out in (whole, split))
    assert sa["step"] == sb["step"] == 20
    for key in ("positions", "momenta", "cell"):
        assert np.abs(np.array(sa[key]) - np.array(sb[key])).max() <= 1e-9, key
    assert sa["rng"] == sb["rng"]
    cons = [[float(row.split(",")[-1]) for row in (out / "outputs" / "thermo.csv").read_text().splitlines()[1:]]
            for out in (whole, split)]
    assert np.allclose(cons[0], cons[1], atol=1e-6, equal_nan=True)  # Bussi's tally continues too
    if ensemble == "npt":
        assert np.abs(np.array(sa["p_eps"]) - np.array(sb["p_eps"])).max() <= 1e-12
        start = read(setup / "na.extxyz").cell.array
        assert np.abs(np.array(sa["cell"]) - start).max() > 1e-6  # the barostat moved the cell


@pytest.mark.parametrize("state_saved", [True, False])
def test_a_run_interrupted_after_frame_0_resumes_without_a_second_frame_0(tmp_path, setup, monkeypatch, state_saved):
    """Ctrl-C before the first --interval left frame 0 alone; the rerun resumed from step 0 and wrote frame 0 and
    its thermo row again, and diffusion refused the trajectory as runs joined together. Killed before frame 0's
    state was saved, the rerun starts afresh (a resume from the 8-decimal frame would not be exact)."""
    import tub_mlff.md as md

    whole, split = tmp_path / "whole", tmp_path / "split"
    _ok(_md(setup, whole, "nvt-langevin", 10))
    save = md._save_state

    def stop_after_frame_0(path, dyn, atoms, step):  # the signal after frame 0 (and its state) was written
        if state_saved or step:
            save(path, dyn, atoms, step)
        if step == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(md, "_save_state", stop_after_frame_0)
        assert _md(setup, split, "nvt-langevin", 10).exit_code == 130
    assert [f.info["step"] for f in read(split / "outputs" / "trajectory.extxyz", ":")] == [0]
    r = _ok(_md(setup, split, "nvt-langevin", 10))
    exact = "resuming from step 0" in r.stderr and "the same continuation up to float rounding" in r.stderr
    assert exact == state_saved
    assert "statistical" not in r.stderr
    fa, fb = (read(out / "outputs" / "trajectory.extxyz", ":") for out in (whole, split))
    assert [f.info["step"] for f in fb] == [f.info["step"] for f in fa] == [0, 5, 10]
    for a, b in zip(fa, fb):
        assert np.abs(a.positions - b.positions).max() <= 1e-6
        assert np.abs(a.get_momenta() - b.get_momenta()).max() <= 1e-6
    ta, tb = ((out / "outputs" / "thermo.csv").read_text().splitlines() for out in (whole, split))
    assert [row.split(",")[0] for row in tb] == [row.split(",")[0] for row in ta] == ["step", "0", "5", "10"]
    assert np.allclose(np.genfromtxt(ta[1:], delimiter=","), np.genfromtxt(tb[1:], delimiter=","), atol=1e-6,
                       equal_nan=True)
    sa, sb = (json.loads((out / "outputs" / "trajectory.state.json").read_text()) for out in (whole, split))
    for key in ("positions", "momenta"):  # a fresh start is the same run bit for bit
        assert np.abs(np.array(sa[key]) - np.array(sb[key])).max() <= (1e-9 if state_saved else 0.0), key


def test_run_without_the_state_file_still_resumes(tmp_path, setup):
    out = tmp_path / "old"
    _ok(_md(setup, out, "nvt-langevin", 10))
    (out / "outputs" / "trajectory.state.json").unlink()  # as runs made before the file existed
    r = _ok(_md(setup, out, "nvt-langevin", 20, "--json"))
    assert json.loads(r.stdout)["resumed_from"] == 10 and "statistical" in r.stderr
    assert [int(f.info["step"]) for f in read(out / "outputs" / "trajectory.extxyz", ":")] == [0, 5, 10, 15, 20]
    assert json.loads((out / "outputs" / "trajectory.state.json").read_text())["step"] == 20


def test_a_resume_in_another_precision_is_refused(tmp_path, setup):
    out = tmp_path / "run"
    _ok(_md(setup, out, "nvt-langevin", 5))
    later = invoke(["mlff", "md", setup / "na.extxyz", "--model", setup / "tiny.safetensors", "--ensemble",
                    "nvt-langevin", "--steps", "10", "--interval", "5", "--timestep", "1", "--temp", "300",
                    "--precision", "fp32", "--seed", "3", "-o", out])
    assert later.exit_code == 2 and "precision=fp64 (now fp32)" in later.stderr
    assert len(read(out / "outputs" / "trajectory.extxyz", index=":")) == 2  # frames 0 and 5, untouched


def test_npt_pressure_compresses_and_the_log_reads_it_back(tmp_path, setup):
    """ASE's barostat takes a stress (−P): +P must shrink the cell, −P swell it, and the logged
    pressure (−tr σ/3 with the kinetic part) must follow (the cell starts at about +1.6 GPa)."""
    import csv

    volumes, pressures = {}, {}
    for p in (-2.0, 0.0, 2.0):
        out = tmp_path / f"p{p}"
        _ok(_md(setup, out, "npt", 60, "--pressure", str(p)))
        rows = list(csv.DictReader(open(out / "outputs" / "thermo.csv")))
        volumes[p] = float(rows[-1]["volume_A3"])
        pressures[p] = np.mean([float(r["pressure_GPa"]) for r in rows[len(rows) // 2:]])
    assert volumes[2.0] < volumes[0.0] < volumes[-2.0]
    assert pressures[2.0] > pressures[0.0] > pressures[-2.0] and abs(pressures[2.0] - 2.0) < 0.3
    wrong = invoke(["mlff", "md", setup / "na.extxyz", "--model", setup / "tiny.safetensors", "--pressure", "1",
                    "--steps", "2", "-o", tmp_path / "nvt"])
    assert wrong.exit_code == 2 and "act on NPT only" in wrong.stderr
    # thermostat/barostat constants of another ensemble were ignored silently (and recorded as if used)
    for ensemble, extra, named in (("nve", ["--set", "friction=0.5", "--set", "taut=5"], "friction, taut"),
                                   ("nvt-langevin", ["--set", "taup=5"], "taup"),
                                   ("nvt-bussi", ["--set", "friction=0.5"], "friction")):
        wrong = invoke(["mlff", "md", setup / "na.extxyz", "--model", setup / "tiny.safetensors", "--ensemble",
                        ensemble, *extra, "--steps", "2", "-o", tmp_path / f"idle_{ensemble}"])
        assert wrong.exit_code == 2 and f"{ensemble} does not use {named} (" in wrong.stderr
        assert not (tmp_path / f"idle_{ensemble}").exists()


def test_frames_carry_energy_and_forces_and_bussi_counts_3n_minus_3(tmp_path, setup):
    from ase import units

    from tub_mlff.md import degrees_of_freedom, make_dynamics

    out = tmp_path / "b"
    _ok(_md(setup, out, "nvt-bussi", 10))
    frames = read(out / "outputs" / "trajectory.extxyz", ":")
    n = len(frames[0])
    for f in frames:  # a frame is usable as ASE/training data without recomputing it
        assert f.get_potential_energy() == pytest.approx(f.info["epot"], abs=1e-6)
        assert f.get_forces().shape == (n, 3)
        assert abs(f.get_momenta().sum(0)).max() < 1e-6  # the centre of mass stays at rest ...
        ekin = f.get_kinetic_energy()  # ... so the temperature counts 3N - 3 degrees of freedom
        assert f.info["temperature"] == pytest.approx(2 * ekin / ((3 * n - 3) * units.kB), rel=1e-6)
    a = frames[0].copy()
    assert degrees_of_freedom(a, "nvt-bussi") == degrees_of_freedom(a, "nve") == 3 * n - 3
    assert degrees_of_freedom(a, "nvt-langevin") == 3 * n
    dyn = make_dynamics(a, "nvt-bussi", 1.0, 300.0, 0.01, 20.0, 0.0, 100.0, 0)
    assert dyn.target_kinetic_energy == pytest.approx(0.5 * 300 * units.kB * (3 * n - 3))


def test_bussi_logs_the_energy_it_conserves_and_older_logs_get_the_column(tmp_path):
    """Under Bussi's thermostat E_pot + E_kin swings with the heat exchanged; less that exchange it is the
    integrator's conserved quantity (Bussi, Donadio & Parrinello 2007, Eq. 12), whose drift shows the time
    step's error as NVE's total energy does. EMT copper, 2 fs."""
    import csv

    from ase.calculators.emt import EMT

    from tub_mlff.md import run_md

    cu = bulk("Cu", cubic=True) * 2
    spread = {}
    for ensemble in ("nvt-bussi", "nve", "nvt-langevin"):
        thermo = tmp_path / f"{ensemble}.csv"
        run_md(cu, EMT(), tmp_path / f"{ensemble}.extxyz", thermo, steps=600, ensemble=ensemble, timestep_fs=2.0,
               temperature_K=300.0, taut_fs=50.0, interval=10)
        rows = list(csv.DictReader(open(thermo)))
        etot, cons = (np.array([float(r[k]) for r in rows]) for k in ("etot_eV", "conserved_eV"))
        spread[ensemble] = (np.ptp(etot), np.ptp(cons) if np.isfinite(cons).all() else None)
    assert spread["nvt-bussi"][0] > 0.3 and spread["nvt-bussi"][1] < 0.01  # eV: the heat bath, not the integrator
    assert spread["nve"][0] == spread["nve"][1] < 0.01
    assert spread["nvt-langevin"][1] is None  # Langevin tracks no exchanged energy: NaN, not a made-up number
    # a run logged before the column: its rows get NaN there, the extension the value
    thermo = tmp_path / "nvt-bussi.csv"
    lines = thermo.read_text().splitlines()
    thermo.write_text("".join(",".join(line.split(",")[:-1]) + "\n" for line in lines))
    run_md(cu, EMT(), tmp_path / "nvt-bussi.extxyz", thermo, steps=620, ensemble="nvt-bussi", timestep_fs=2.0,
           temperature_K=300.0, taut_fs=50.0, interval=10)
    rows = list(csv.DictReader(open(thermo)))
    assert len(rows) == 63 and rows[0]["conserved_eV"] == "nan" and np.isfinite(float(rows[-1]["conserved_eV"]))


def test_npt_refuses_a_slab(tmp_path, setup):
    from tub_mlff.structures import janus_graphene

    slab = janus_graphene(3, 1, stacking="slab")
    assert slab.pbc.all() and slab.info["stacking"] == "slab"
    write(tmp_path / "slab.extxyz", slab, format="extxyz")
    r = invoke(["mlff", "md", tmp_path / "slab.extxyz", "--model", setup / "tiny.safetensors", "--ensemble", "npt",
                "--steps", "2", "-o", tmp_path / "o"])
    assert r.exit_code == 2 and "without a vacuum gap (this one is a slab)" in r.stderr
    # the same slab as ASE writes it, without tub's stacking tag: found by its geometry (it ran, and the cell drifted)
    del slab.info["stacking"]
    write(tmp_path / "plain.extxyz", slab, format="extxyz")
    r = invoke(["mlff", "md", tmp_path / "plain.extxyz", "--model", setup / "tiny.safetensors", "--ensemble", "npt",
                "--steps", "2", "-o", tmp_path / "o2"])
    assert r.exit_code == 2 and "(this one has 13.5 Å of vacuum along c)" in r.stderr, r.stderr
    # NVT runs it, without a pressure averaged over the vacuum
    r = invoke(["mlff", "md", tmp_path / "plain.extxyz", "--model", setup / "tiny.safetensors", "--ensemble", "nve",
                "--steps", "2", "--interval", "1", "-o", tmp_path / "o3"])
    assert r.exit_code == 0 and "13.5 Å of vacuum along c" in r.stderr, r.stderr
    rows = (tmp_path / "o3" / "outputs" / "thermo.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(row.split(",")[7] == "nan" for row in rows)


def test_vacuum_gap_is_the_thickest_atom_free_slab_between_lattice_planes():
    from ase import Atoms

    from tub_mlff.md import vacuum_gap
    from tub_mlff.structures import janus_graphene

    gallery = janus_graphene(3, 1, stacking="gallery")
    assert vacuum_gap(gallery)[0] < 4  # the groups fill the gallery
    # two atoms 2 Å apart along c in a 10 Å cell tilted 30° from the normal: planes 10 cos 30° apart
    c = 10 * np.array([0, np.sin(np.pi / 6), np.cos(np.pi / 6)])
    pair = Atoms("H2", scaled_positions=[[0, 0, 0.1], [0, 0, 0.3]], cell=[[3, 0, 0], [0, 3, 0], c], pbc=True)
    gap, axis = vacuum_gap(pair)
    assert axis == 2 and gap == pytest.approx(0.8 * 10 * np.cos(np.pi / 6))
    pair.pbc = [True, True, False]
    assert vacuum_gap(pair)[1] != 2  # an open axis is no periodic gap


def test_md_frames_are_not_training_labels_and_old_runs_are_not_resumed_across_fixes(tmp_path, setup):
    out = tmp_path / "b"
    _ok(_md(setup, out, "nvt-bussi", 10))
    traj = out / "outputs" / "trajectory.extxyz"
    r = invoke(["mlff", "evaluate", traj, "--model", setup / "tiny.safetensors", "-o", tmp_path / "ev"])
    assert r.exit_code == 2 and "not reference labels" in r.stderr  # the model's own predictions
    relabelled = tmp_path / "relabelled.extxyz"  # by another code (new energies and forces): the mark stays
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = read(traj, ":")
    for a in frames:
        a.calc = SinglePointCalculator(a, energy=1.01 * a.get_potential_energy() - 0.3, forces=1.01 * a.get_forces())
    write(relabelled, frames, format="extxyz")
    assert all(a.info.get("predicted_by") for a in read(relabelled, ":"))
    _ok(invoke(["mlff", "evaluate", relabelled, "--model", setup / "tiny.safetensors", "-o", tmp_path / "ev2"]))
    stored = out / "outputs" / "trajectory.json"
    settings = json.loads(stored.read_text())
    del settings["ndof"]  # as a Bussi run made before the 3N - 3 fix recorded it
    stored.write_text(json.dumps(settings))
    r = _md(setup, out, "nvt-bussi", 20)
    assert r.exit_code == 2 and "degrees of freedom" in r.stderr


def test_md_frames_do_not_inherit_the_start_frames_reference_labels(tmp_path, setup):
    """MD from a labelled frame (active learning): the frames keep the structure's metadata but none of
    its labels, which train would otherwise fit as every frame's (MACE-style REF_* keys included)."""
    a = read(setup / "na.extxyz")
    n = len(a)
    a.info.update({"REF_energy": -1.5, "REF_stress": np.ones(6), "REF_virial": np.ones(9), "config_type": "bulk",
                   "groups": 2, "stacking": "gallery", "dipole": np.zeros(3), "E_dft": -2.0, "U0": -3.0,
                   "temperature_set_K": 900.0})
    a.arrays["REF_forces"] = np.ones((n, 3))
    a.arrays["initial_charges"] = np.zeros(n)
    start = tmp_path / "labelled.extxyz"
    write(start, a, format="extxyz")
    out = tmp_path / "al"
    r = invoke(["mlff", "md", start, "--model", setup / "tiny.safetensors", "--steps", "10", "--interval", "5",
                "--timestep", "1", "-o", out])
    _ok(r)
    frames = read(out / "outputs" / "trajectory.extxyz", ":")
    assert len(frames) == 3
    for f in frames:
        assert not {"REF_energy", "REF_stress", "REF_virial", "dipole", "E_dft", "U0"} & set(f.info)
        assert f.info["temperature_set_K"] == 300.0  # this run's thermostat, not the start frame's
        assert f.info["charge"] == 0  # the state the model ran at
        assert not {"REF_forces", "initial_charges"} & set(f.arrays)
        assert (f.info["groups"], f.info["stacking"], f.info["config_type"]) == (2, "gallery", "bulk")
    r = invoke(["mlff", "train", out / "outputs" / "trajectory.extxyz", "--energy-key", "REF_energy",
                "--forces-key", "REF_forces", "-o", tmp_path / "t"])
    assert r.exit_code == 2 and "not reference labels" in r.stderr


def test_a_resume_indexes_the_trajectory_without_parsing_every_frame(tmp_path, monkeypatch):
    """A resume read and parsed the whole trajectory (10^5 frames of 800 atoms: ~37 GB of memory); the
    index keeps offsets and steps only, parses frames on demand and still drops a half-written last frame."""
    import io

    import ase.io

    from tub_mlff.md import SavedFrames, _frame_text

    a = bulk("Na", "bcc", a=4.23, cubic=True).repeat((2, 2, 2))
    a.set_momenta(np.random.default_rng(0).normal(size=(len(a), 3)))
    texts = []
    for step in range(0, 200, 5):
        b = a.copy()
        b.positions += 0.001 * step
        b.info.update({"step": step, "time_fs": step * 0.5})
        texts.append(_frame_text(b))
    path = tmp_path / "t.extxyz"
    whole = "".join(texts)
    path.write_text(whole + texts[-1][: len(texts[-1]) // 2])  # killed while writing one more frame
    calls = []
    real = ase.io.read
    monkeypatch.setattr(ase.io, "read", lambda *x, **k: (calls.append(1), real(*x, **k))[1])
    frames = SavedFrames(path)
    assert len(frames) == 40 and frames.steps == list(range(0, 200, 5)) and frames.ends[-1] == len(whole.encode())
    assert len(calls) == 1  # the last frame only, to check it reads
    for k in (0, 1, -1):
        expected = real(io.StringIO(texts[k]), format="extxyz")
        assert np.array_equal(frames[k].positions, expected.positions)
        assert np.array_equal(frames[k].get_momenta(), expected.get_momenta())
    assert len(calls) <= 4


def test_langevin_friction_is_per_fs():
    from ase import units
    from ase.build import bulk
    from tub_mlff.md import make_dynamics
    a = bulk("Cu", cubic=True)
    dyn = make_dynamics(a, "nvt-langevin", 1.0, 300.0, 0.02, 20.0, 0.0, 100.0, 0)
    assert dyn.fr * units.fs == pytest.approx(0.02)  # ASE friction is per ASE time unit
