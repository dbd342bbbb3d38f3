"""End-to-end CLI tests of every mlff verb on tiny data, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ase.build import bulk
from ase.io import read, write
from tubcli.testing import check_plugin, invoke
from tubcli.testing import expect_ok as _ok, expect_one_line_error as _err

from tub_mlff.calculator import SpookyNetCalculator
from tub_mlff.checkpoints import save_model
from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
from tub_mlff.structures import add_sodium, janus_graphene, spin_for


def test_conformance():
    check_plugin("mlff")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlff")


@pytest.fixture(scope="module")
def teacher(workdir):
    """A random small SpookyNet that labels the tiny training set (stands in for xTB here)."""
    torch.manual_seed(0)
    m = SpookyNet(SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=1,
                                  use_electrostatics=False, use_d4_dispersion=False), seed=0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(m.eval(), workdir / "teacher", extra={"elements": [1, 6, 7, 11]})
    return workdir / "teacher.safetensors"


@pytest.fixture(scope="module")
def built(workdir):
    out = workdir / "build"
    _ok(invoke(["mlff", "build", "--n", "3", "--groups", "0", "--x", "0", "--x", "1", "--x", "2",
                "--variants", "2", "--rattle", "0.03", "--sites", "top", "-o", out]))
    return out / "outputs" / "structures.extxyz"


@pytest.fixture(scope="module")
def labelled(workdir, built, teacher):
    frames = read(built, ":")
    calc = SpookyNetCalculator(str(teacher), dtype=torch.float64)
    out = []
    for a in frames:
        a = a.copy()
        calc.spin = float(spin_for(a))
        a.calc = calc
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
        a.calc = None
        a.info["energy"], a.arrays["forces"], a.info["stress"] = e, f, s
        out.append(a)
    moved = [a.copy() for a in out]  # translated copies: new frames (train keeps repeats out of its
    for a in moved:                  # valid/test shares), the same labels (a rigid shift in a periodic cell)
        a.positions += [0.37, 0.21, 0.0]
    path = workdir / "labelled.extxyz"
    write(path, out + moved, format="extxyz")
    return path


def test_build_makes_structures(built):
    frames = read(built, ":")
    assert len(frames) == 6  # with --rattle every x gets its variants, x=0 too
    assert [int((f.numbers == 11).sum()) for f in frames] == [0, 0, 1, 1, 2, 2]
    assert all(f.pbc.all() for f in frames)


def test_janus_host_has_aminophenyl_on_one_face():
    host = janus_graphene(4, 2, stacking="slab")
    assert host.get_chemical_formula() == "C44H12N2"
    z_sheet = np.median(host.positions[:32, 2])
    assert (host.positions[32:, 2] > z_sheet + 1.0).all()  # every group atom above the sheet
    loaded = add_sodium(host, 3, "ring", seed=0)
    assert (loaded.numbers == 11).sum() == 3


def test_build_bilayer_is_two_ab_stacked_janus_sheets_with_vacuum(workdir):
    """`--stacking bilayer`: two sheets --interlayer apart in Bernal registry, the groups of both on
    their upper faces, gallery Na between the sheets, vacuum outside; x counts Na per group of the cell."""
    out = workdir / "bilayer"
    _ok(invoke(["mlff", "build", "--n", "3", "--groups", "1", "--stacking", "bilayer", "--x", "0", "--x", "2",
                "--sites", "gallery", "-o", out]))
    _ok(invoke(["mlff", "build", "--n", "3", "--groups", "1", "--stacking", "bilayer", "--x", "0,2",  # a,b too
                "--sites", "gallery", "-o", workdir / "bilayer_commas"]))
    assert (workdir / "bilayer_commas/outputs/structures.extxyz").read_text() == \
        (out / "outputs/structures.extxyz").read_text()
    host, loaded = read(out / "outputs" / "structures.extxyz", ":")
    assert host.get_chemical_formula() == "C48H12N2" and host.info["groups"] == 2
    lower, upper = host.positions[:18], host.positions[31:49]  # the sheet carbons of each block
    assert np.ptp(lower[:, 2]) < 0.31 and np.ptp(upper[:, 2]) < 0.31  # flat sheets (one puckered anchor)
    assert np.median(upper[:, 2]) - np.median(lower[:, 2]) == pytest.approx(9.5)
    # AB: half of the upper carbons sit over lower carbons, half over hexagon centres
    from ase.geometry import find_mic

    over = 0
    for p in upper:
        v, dist = find_mic(lower - p, host.cell, [True, True, False])
        over += np.min(np.linalg.norm(v[:, :2], axis=1)) < 0.1
    assert over == 9
    assert host.cell.lengths()[2] == pytest.approx(9.5 + 20.0)
    na = loaded.positions[loaded.numbers == 11]
    assert ((na[:, 2] > np.median(lower[:, 2])) & (na[:, 2] < np.median(upper[:, 2]))).all()
    assert loaded.info["x"] == 1.0  # 2 Na / 2 groups


@pytest.fixture(scope="module")
def trained(workdir, labelled):
    out = workdir / "train"
    r = _ok(invoke(["mlff", "train", labelled, "-o", out, "--epochs", "2", "--batch-size", "4",
                    "--set", "model.num_features=8", "--set", "model.num_modules=1",
                    "--set", "model.num_basis_functions=4", "--set", "model.electrostatics=false",
                    "--set", "valid_fraction=0.2", "--set", "test_fraction=0.2", "--json"]))
    return out, json.loads(r.stdout)


def test_train_writes_model_and_metrics(trained):
    out, metrics = trained
    assert (out / "checkpoints" / "model.safetensors").exists()
    assert (out / "checkpoints" / "last.pt").exists()
    assert metrics["test"]["forces_mae_meV_A"] > 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_train_resumes_from_checkpoint(trained, labelled):
    out, _ = trained
    _ok(invoke(["mlff", "train", labelled, "-o", out, "--resume", "auto", "--epochs", "3", "--batch-size", "4",
                "--set", "model.num_features=8", "--set", "model.num_modules=1",
                "--set", "model.num_basis_functions=4", "--set", "model.electrostatics=false",
                "--set", "valid_fraction=0.2", "--set", "test_fraction=0.2"]))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # only the missing epoch ran
    # the kept (best) epoch survives the resume: the first with the lowest validation loss, marked in training.png
    losses = [r["val_loss"] for r in rows]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["best_epoch"] == losses.index(min(losses))
    assert (out / "outputs" / "training.png").is_file()


def test_a_train_run_directory_is_a_calculator_model_and_zero_loss_weights_are_refused(trained, labelled, workdir):
    from tub_mlff.calculator import SpookyNetCalculator

    out, _ = trained
    frame = read(labelled)
    a, b = frame.copy(), frame.copy()
    a.calc = SpookyNetCalculator(str(out))  # as `--model RUN_DIR` on the command line
    b.calc = SpookyNetCalculator(str(out / "checkpoints" / "model.safetensors"))
    assert a.get_potential_energy() == b.get_potential_energy()
    r = invoke(["mlff", "train", labelled, "--set", "energy_weight=0", "--set", "forces_weight=0",
                "-o", workdir / "zero"])
    assert r.exit_code == 2 and "every loss weight is 0" in r.stderr


def test_train_cosine_schedule_anneals_to_min_lr(workdir, labelled):
    out = workdir / "cosine"
    _ok(invoke(["mlff", "train", labelled, "-o", out, "--epochs", "3", "--batch-size", "8", "--lr", "1e-3",
                "--set", "lr_schedule=cosine", "--set", "min_lr=1e-5",
                "--set", "model.num_features=8", "--set", "model.num_modules=1",
                "--set", "model.num_basis_functions=4", "--set", "model.electrostatics=false"]))
    lrs = [json.loads(ln)["lr"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # lr logged after epoch e's step: min + (max - min)(1 + cos(pi (e+1)/T))/2, T = 3
    want = [1e-5 + (1e-3 - 1e-5) * (1 + np.cos(np.pi * (e + 1) / 3)) / 2 for e in range(3)]
    assert np.allclose(lrs, want, rtol=1e-9) and abs(lrs[-1] - 1e-5) < 1e-12


def test_huber_penalty_is_quadratic_then_linear():
    from tub_mlff.training import TrainSettings, _penalty

    err = torch.tensor([0.001, -0.005, 0.2, -1.0], dtype=torch.float64)
    s = TrainSettings(loss="huber", huber_delta=0.01)
    a = err.abs()
    want = torch.where(a < 0.01, a ** 2, 2 * 0.01 * a - 0.01 ** 2).mean()
    assert torch.allclose(_penalty(err, s), want, rtol=1e-12)
    assert torch.allclose(_penalty(err, TrainSettings(loss="mse")), (err ** 2).mean(), rtol=1e-12)


def test_train_huber_loss_is_wired_through_the_config(workdir, labelled):
    small = ["--set", "model.num_features=8", "--set", "model.num_modules=1", "--set", "model.num_basis_functions=4",
             "--set", "model.electrostatics=false", "--epochs", "1", "--batch-size", "8", "--seed", "3"]

    def first_loss(name, *extra):
        _ok(invoke(["mlff", "train", labelled, "-o", workdir / name, *small, *extra]))
        return json.loads((workdir / name / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]

    mse = first_loss("l_mse")
    # a delta far above every error makes 2*Huber = err**2: the same run as MSE
    assert first_loss("l_huge", "--set", "loss=huber", "--set", "huber_delta=1e6") == pytest.approx(mse, rel=1e-9)
    assert first_loss("l_hub", "--set", "loss=huber", "--set", "huber_delta=0.01") < 0.5 * mse


def test_train_ensemble_and_evaluate_committee(workdir, labelled, trained):
    out = workdir / "ens"
    _ok(invoke(["mlff", "train", labelled, "-o", out, "--epochs", "1", "--ensemble", "2", "--batch-size", "8",
                "--set", "model.num_features=8", "--set", "model.num_modules=1",
                "--set", "model.num_basis_functions=4", "--set", "model.electrostatics=false"]))
    models = [out / "checkpoints" / f"model_{k}.safetensors" for k in range(2)]
    assert all(m.exists() for m in models) and (out / "outputs" / "training.png").is_file()
    # each member's kept epoch is in its model.json: a resumed committee marks the finished members' too
    assert [json.loads(m.with_suffix(".json").read_text())["kept_epoch"] for m in models] == [0, 0]
    r = _ok(invoke(["mlff", "evaluate", labelled, "--model", models[0], "--model", models[1],
                    "-o", workdir / "eval", "--json"]))
    m = json.loads(r.stdout)
    assert m["forces_mae_meV_A"] > 0 and m["energy_rmse_meV_atom"] >= m["energy_mae_meV_atom"]
    # the per-element force MAEs, weighted by atom counts, add up to the overall one
    symbols = np.concatenate([a.get_chemical_symbols() for a in read(labelled, ":")])
    by = m["forces_mae_meV_A_by_element"]
    assert set(by) == set(symbols) and len(by) > 1
    assert sum(by[e] * (symbols == e).sum() for e in by) / len(symbols) == pytest.approx(m["forces_mae_meV_A"])
    assert (workdir / "eval" / "outputs" / "parity_forces.png").exists()
    # a committee of members that learned for different times (one epoch leaves forces mostly ZBL)
    longer = trained[0] / "checkpoints" / "model.safetensors"
    r = _ok(invoke(["mlff", "explain", labelled, "--model", models[0], "--model", longer, "--set", "attention=false",
                    "-o", workdir / "ens_expl", "--json"]))
    worst = json.loads(r.stdout)["most_uncertain_atom"]
    frames = read(workdir / "ens_expl" / "outputs" / "explained.extxyz", ":")
    dis = frames[worst["structure"]].arrays["mlff_force_disagreement"]
    assert worst["force_disagreement_eV_A"] == pytest.approx(dis.max(), abs=1e-7) and dis.max() > 0
    assert max(a.arrays["mlff_force_disagreement"].max() for a in frames) == pytest.approx(dis.max(), abs=1e-7)
    # the decomposition is the committee's mean: it sums to the energy md and evaluate use
    from tub_mlff.calculator import SpookyNetCalculator

    calc = SpookyNetCalculator([str(models[0]), str(longer)], check=False)
    for a in frames:
        b = a.copy()
        b.calc = calc
        assert a.info["mlff_energy"] == pytest.approx(b.get_potential_energy(), abs=1e-3)
        assert a.arrays["mlff_atomic_energy"].sum() == pytest.approx(a.info["mlff_energy"], abs=1e-3)


def test_md_runs_and_resumes_after_kill(workdir, built, trained):
    model = trained[0] / "checkpoints" / "model.safetensors"
    out = workdir / "md"
    r = _ok(invoke(["mlff", "md", built, "--model", model, "--steps", "20", "--interval", "5",
                    "--temp", "300", "-o", out, "--json"]))
    assert json.loads(r.stdout)["frames"] == 5
    traj = out / "outputs" / "trajectory.extxyz"
    with open(traj, "a") as fh:  # a killed writer leaves half a frame behind
        fh.write("37\nLattice=\"1 0 0 0 1 0 0 0 1\" Properties=species:S:1:pos:R:3\nC 0.0 0.0\n")
    r = _ok(invoke(["mlff", "md", built, "--model", model, "--steps", "30", "--interval", "5",
                    "--temp", "300", "-o", out, "--json"]))
    res = json.loads(r.stdout)
    assert res["resumed_from"] == 20 and res["steps_done"] == 30 and res["frames"] == 7
    steps = [f.info["step"] for f in read(traj, ":")]
    assert steps == [0, 5, 10, 15, 20, 25, 30]
    thermo = (out / "outputs" / "thermo.csv").read_text().splitlines()
    assert [int(ln.split(",")[0]) for ln in thermo[1:]] == steps


def _md(structure, model, out, *args):
    return invoke(["mlff", "md", structure, "--model", model, "-o", out, "-q", *args])


def _saved_steps(out) -> tuple[list[int], list[int]]:
    """Steps of the trajectory's frames and of the thermo rows (every row must parse)."""
    frames = [int(f.info["step"]) for f in read(out / "outputs" / "trajectory.extxyz", ":")]
    rows = np.loadtxt(out / "outputs" / "thermo.csv", delimiter=",", skiprows=1, ndmin=2)
    return frames, rows[:, 0].astype(int).tolist()


def test_md_resume_needs_the_same_structure_and_settings(workdir, built, trained):
    model = trained[0] / "checkpoints" / "model.safetensors"
    out = workdir / "md_same"
    _ok(_md(built, model, out, "--steps", "4", "--interval", "2"))
    traj = out / "outputs" / "trajectory.extxyz"
    before = traj.read_bytes()
    atoms = read(built, "-1")
    write(workdir / "reordered.extxyz", atoms[::-1], format="extxyz")
    write(workdir / "fewer.extxyz", atoms[:-2], format="extxyz")  # two fewer: the recorded spin stays possible
    assert "another order" in _err(_md(workdir / "reordered.extxyz", model, out, "--steps", "8", "--interval", "2"))
    assert "atoms" in _err(_md(workdir / "fewer.extxyz", model, out, "--steps", "8", "--interval", "2"))
    assert "timestep_fs" in _err(_md(built, model, out, "--steps", "8", "--interval", "2", "--timestep", "1"))
    # a finished run rerun with other physics is an error, not a silent no-op
    assert "temperature_K" in _err(_md(built, model, out, "--steps", "4", "--interval", "2", "--temp", "900"))
    assert traj.read_bytes() == before


def test_md_extension_keeps_frames_on_the_interval_grid(workdir, built, trained):
    model = trained[0] / "checkpoints" / "model.safetensors"
    out = workdir / "md_grid"
    _ok(_md(built, model, out, "--steps", "5", "--interval", "2"))
    assert _saved_steps(out) == ([0, 2, 4, 5], [0, 2, 4, 5])
    _ok(_md(built, model, out, "--steps", "9", "--interval", "2"))
    assert _saved_steps(out) == ([0, 2, 4, 6, 8, 9], [0, 2, 4, 6, 8, 9])
    r = _ok(invoke(["mlff", "diffusion", out / "outputs" / "trajectory.extxyz", "--blocks", "1", "--element", "C",
                    "--set", "drift=none", "-o", workdir / "md_grid_diff", "--json"]))
    assert json.loads(r.stdout)["runs"][0]["frames"] == 5  # the grid; the off-grid final frame is left out


def test_md_resume_repairs_the_thermo_log_after_a_kill(workdir, built, trained):
    model = trained[0] / "checkpoints" / "model.safetensors"
    out = workdir / "md_thermo"
    _ok(_md(built, model, out, "--steps", "4", "--interval", "2"))
    thermo = out / "outputs" / "thermo.csv"
    lines = thermo.read_text().splitlines(keepends=True)
    # killed after frame 4 but before its row (as runs that wrote the frame first could be), then a
    # half-written row: the resume writes row 4 again and drops the fragment
    thermo.write_text("".join(lines[:-1]) + "6,3.000,-12.3")
    _ok(_md(built, model, out, "--steps", "6", "--interval", "2"))
    assert _saved_steps(out) == ([0, 2, 4, 6], [0, 2, 4, 6])
    row4 = thermo.read_text().splitlines()[3].split(",")
    assert float(row4[2]) == pytest.approx(float(lines[-1].split(",")[2]), abs=1e-3)  # the same epot


def test_md_stops_before_an_unstable_frame(workdir, built, trained):
    model = trained[0] / "checkpoints" / "model.safetensors"
    out = workdir / "md_blowup"
    r = _md(built, model, out, "--steps", "150", "--interval", "2", "--timestep", "8", "--temp", "3000")
    assert r.exit_code == 1 and "unstable at step" in r.stderr and "Traceback" not in r.stderr
    frames = read(out / "outputs" / "trajectory.extxyz", ":")
    assert all(np.isfinite(f.positions).all() and f.info["temperature"] < 30000 for f in frames)
    steps, rows = _saved_steps(out)
    assert steps == rows
    bad = frames[-1].copy()  # a NaN frame, as runs before this check could leave: no resume from it
    bad.positions[0] = np.nan
    bad.info["step"], bad.info["time_fs"] = steps[-1] + 2, (steps[-1] + 2) * 8.0
    write(out / "outputs" / "trajectory.extxyz", bad, format="extxyz", append=True)
    assert "not finite" in _err(_md(built, model, out, "--steps", "150", "--interval", "2", "--timestep", "8",
                                    "--temp", "3000"))


def test_md_on_a_sheet_without_c_vector(workdir, trained):
    from ase.build import graphene

    model = trained[0] / "checkpoints" / "model.safetensors"
    sheet = graphene(size=(3, 3, 1), vacuum=None)  # pbc (T, T, F), c = 0: open along z
    sheet.rattle(0.02, seed=0)
    write(workdir / "sheet.extxyz", sheet, format="extxyz")
    _ok(_md(workdir / "sheet.extxyz", model, workdir / "md_sheet", "--steps", "2", "--interval", "1"))
    out = workdir / "md_sheet_npt"
    assert "NPT needs" in _err(_md(workdir / "sheet.extxyz", model, out, "--steps", "2", "--ensemble", "npt"))
    assert not (out / "outputs" / "thermo.csv").exists()


def test_nve_conserves_energy(built, trained):
    from tub_mlff.md import run_md

    model = trained[0] / "checkpoints" / "model.safetensors"
    atoms = read(built, "-1")
    calc = SpookyNetCalculator(str(model), dtype=torch.float64, spin=spin_for(atoms))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run_md(atoms, calc, Path(d) / "t.extxyz", Path(d) / "th.csv", steps=60, ensemble="nve",
               timestep_fs=0.25, temperature_K=300, interval=10)
        rows = [ln.split(",") for ln in (Path(d) / "th.csv").read_text().splitlines()[1:]]
    etot = np.array([float(r[4]) for r in rows])
    ekin = np.array([float(r[3]) for r in rows])
    assert np.ptp(etot) < 0.05 * max(np.ptp(ekin), 1e-3)


def test_diffusion_and_explain_and_ocv(workdir, built, trained, monkeypatch):
    model = trained[0] / "checkpoints" / "model.safetensors"
    traj = workdir / "md" / "outputs" / "trajectory.extxyz"
    if not traj.exists():
        pytest.skip("md test did not run")
    r = _ok(invoke(["mlff", "diffusion", traj, "--blocks", "1", "-o", workdir / "diff", "--json"]))
    assert "D_cm2_s" in json.loads(r.stdout)["runs"][0]
    r = _ok(invoke(["mlff", "diffusion", traj, "--blocks", "1", "--equilibration", "0.005", "-o", workdir / "diff2",
                    "--json"]))
    kept = [a for a in read(traj, ":") if a.info["time_fs"] >= 5.0]
    run = json.loads(r.stdout)["runs"][0]
    assert run["frames"] == len(kept) == 5
    assert run["temperature_K"] == pytest.approx(np.mean([a.info["temperature"] for a in kept]))
    assert "equilibration" in _err(invoke(["mlff", "diffusion", traj, "--equilibration", "0.011",
                                          "-o", workdir / "diff3"]))
    r = _ok(invoke(["mlff", "explain", built, "--model", model, "-o", workdir / "expl", "--json"]))
    ex = read(workdir / "expl" / "outputs" / "explained.extxyz", ":")
    for a in ex:  # the per-atom terms add up to the energy
        assert abs(a.arrays["mlff_atomic_energy"].sum() - a.info["mlff_energy"]) < 1e-3
    assert (workdir / "expl" / "outputs" / "attention_0000.npz").exists()
    r = _ok(invoke(["mlff", "ocv", "--model", model, "--structures", built, "--relax-steps", "0",
                    "-o", workdir / "ocv", "--json"]))
    res = json.loads(r.stdout)
    assert res["hull_points"] >= 2 and res["cell_relaxation"] == "fixed"  # single points keep the cells
    assert res["max_volume_change"] is None  # a fixed cell's volume is not a measured change (was 0)
    assert "info['temperature']" in _err(invoke(["mlff", "ocv", "--model", model, "--structures", built,
                                                 "--md-average", "-o", workdir / "ocv_md"]))  # not MD frames
    assert "--relax-steps" in _err(invoke(["mlff", "ocv", "--model", model, "--structures", built, "--md-average",
                                         "--relax-steps", "5", "-o", workdir / "ocv_md2"]))
    assert (workdir / "ocv" / "outputs" / "voltage_profile.png").exists()
    relaxed = read(workdir / "ocv" / "outputs" / "relaxed.extxyz", ":")
    assert {spin_for(a) for a in relaxed} == {0, 1}  # both parities share one calculator, which changes its spin
    for a in relaxed:  # each written energy is the frame's own, with its own spin
        b = a.copy()
        b.calc = SpookyNetCalculator(str(model), spin=spin_for(b))
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-5)  # wrong spin: 2e-4
    import tub_mlff.plots

    drawn = {}
    real_plot = tub_mlff.plots.voltage_plot
    monkeypatch.setattr(tub_mlff.plots, "voltage_plot", lambda *a, **k: drawn.update(k) or real_plot(*a, **k))
    r = _ok(invoke(["mlff", "ocv", "--model", model, "--structures", built, "--relax-steps", "3", "--cell", "c",
                    "--mu-na-lattice", "4.23", "-o", workdir / "ocv_c", "--json"]))
    res = json.loads(r.stdout)
    # the figure carries what the run warned: unconverged relaxations, a capacity the sampled x limit
    assert f"{res['relaxations_unconverged']} of {len(read(built, ':'))} relaxations did not converge" in \
        " ".join(drawn["caveats"])
    assert drawn["capacity_is_lower_bound"] == res["capacity_limited_by_sampled_x"]
    assert res["cell_relaxation"] == "c" and res["mu_na_lattice_A"] == 4.23
    assert res["max_spacing_change"] != 0.0 and res["max_volume_change"] == pytest.approx(res["max_spacing_change"])
    assert res["relaxations_unconverged"] > 0 and "did not reach fmax" in r.stderr  # 3 steps: flagged, not hidden
    relaxed = read(workdir / "ocv_c" / "outputs" / "relaxed.extxyz", ":")
    report = json.loads((workdir / "ocv_c" / "outputs" / "ocv.json").read_text())
    assert len(relaxed) == len(read(built, ":")) == len(report["relaxation"])
    lowest = {}  # per Na count the lowest-energy relaxed cell, whose volume ocv reports against the host's
    for a in relaxed:
        n = a.info["n_na"]
        if n not in lowest or a.get_potential_energy() < lowest[n].get_potential_energy():
            lowest[n] = a
    for n, a in lowest.items():
        assert a.get_volume() / lowest[0].get_volume() - 1 == pytest.approx(report["volume_change"][str(n)], abs=1e-9)


def test_diffusion_removes_the_framework_drift(workdir):
    """A host that drifts rigidly and 40 Na walkers riding on it: the CLI removes the host's mean
    displacement (default), recovers D of the walk, and equals the library call to 1e-12."""
    from ase import Atoms
    from tub_mlff.diffusion import diffusion_coefficient

    rng = np.random.default_rng(0)
    T, D, dt = 400, 0.02, 10.0  # frames, A^2/fs, fs
    drift = np.arange(T)[:, None] * np.array([0.05, -0.03, 0.0]) * dt
    host = np.tile(rng.uniform(0, 20, (10, 3)), (T, 1, 1)) + drift[:, None]
    na = np.cumsum(rng.normal(0, np.sqrt(2 * D * dt), (T, 40, 3)), 0) + drift[:, None] + 10
    path = workdir / "walk.extxyz"
    frames = []
    for t in range(T):
        a = Atoms("C10Na40", positions=np.vstack([host[t], na[t]]), cell=[200, 200, 200], pbc=True)
        a.info.update(time_fs=t * dt, temperature=300.0)
        frames.append(a)
    write(path, frames, format="extxyz")
    r = _ok(invoke(["mlff", "diffusion", path, "--axes", "xy", "--blocks", "4", "-o", workdir / "dwalk", "--json"]))
    got = json.loads(r.stdout)["runs"][0]["D_cm2_s"]
    pos = np.concatenate([host, na], axis=1)
    ref = diffusion_coefficient(pos, dt, atoms=np.arange(10, 50), axes="xy", blocks=4, drift_atoms=np.arange(10))
    assert got == pytest.approx(ref.D_cm2_s, rel=1e-12)
    assert got == pytest.approx(D * 0.1, rel=0.15)  # A^2/fs -> cm^2/s
    r = _ok(invoke(["mlff", "diffusion", path, "--axes", "xy", "--blocks", "4", "--set", "drift=none",
                    "-o", workdir / "dwalk2", "--json"]))
    assert json.loads(r.stdout)["runs"][0]["D_cm2_s"] > 3 * got  # the host's drift swamps the walk


def test_ocv_reference_hull_is_xtb_on_the_same_structures(workdir, built, trained):
    pytest.importorskip("tblite")
    from tub_mlff.battery import bcc_sodium_chemical_potential, max_voltage_difference, voltage_profile
    from tub_mlff.labelling import label_xtb, xtb_calculator

    model = trained[0] / "checkpoints" / "model.safetensors"
    r = _ok(invoke(["mlff", "ocv", "--model", model, "--structures", built, "--relax-steps", "0",
                    "--reference", "xtb", "-o", workdir / "ocv_xtb", "--json"]))
    summary = json.loads(r.stdout)
    ref = json.loads((workdir / "ocv_xtb" / "outputs" / "ocv.json").read_text())["reference"]
    frames = read(built, ":")
    lowest = {}
    for a in frames:  # independent xTB single points of the very same (unrelaxed) structures
        c, e = int((a.numbers == 11).sum()), label_xtb(a).info["energy"]
        lowest[c] = min(lowest.get(c, np.inf), e)
    bcc = bulk("Na", "bcc", a=4.2, cubic=True).repeat(2)
    mu, _ = bcc_sodium_chemical_potential(xtb_calculator(bcc))
    expected = [lowest[c] - lowest[0] - c * mu for c in sorted(lowest)]
    np.testing.assert_allclose(ref["formation_energy_eV"], expected, atol=1e-6)
    assert abs(ref["mu_na_eV"] - mu) < 1e-9
    assert summary["max_voltage_difference_V"] == pytest.approx(ref["max_voltage_difference_V"])
    assert summary["max_voltage_difference_V"] >= 0
    # with xTB's mu_Na on both sides: recompute the model's hull from its own formation energies
    model_report = json.loads((workdir / "ocv_xtb" / "outputs" / "ocv.json").read_text())
    d_mu = model_report["mu_na_eV"] - ref["mu_na_eV"]
    assert ref["mu_na_difference_eV"] == pytest.approx(d_mu)
    x = np.array(model_report["x"])
    shifted = [{"x_start": st.x_start, "x_end": st.x_end, "voltage_V": st.voltage}
               for st in voltage_profile(x, np.array(model_report["formation_energy_eV"]) + x * d_mu)]
    assert ref["max_voltage_difference_same_mu_V"] == pytest.approx(max_voltage_difference(shifted, ref["steps"]))
    assert summary["max_voltage_difference_same_mu_V"] == pytest.approx(ref["max_voltage_difference_same_mu_V"])


def test_label_with_xtb(workdir):
    pytest.importorskip("tblite")
    from ase import Atoms

    path = workdir / "mol.extxyz"
    write(path, [Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                         [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])], format="extxyz")
    out = workdir / "label"
    r = _ok(invoke(["mlff", "label", path, "-o", out, "--json"]))
    a = read(out / "labelled.extxyz")
    forces = a.get_forces()  # ASE's extxyz reader hands labels back through a calculator
    assert a.info["label_method"] == "GFN1-xTB" and forces.shape == (5, 3)
    assert a.info["label_settings"] == "tblite accuracy=1 electronic_temperature=300K max_iterations=250"
    assert np.abs(forces.sum(0)).max() < 1e-6  # no net force on a free molecule
    assert a.get_potential_energy() < 0
    r = _ok(invoke(["mlff", "label", path, "-o", out, "--json"]))  # skip-existing on rerun
    assert json.loads(r.stdout)["labelled_now"] == 0
    assert "Gamma point only" not in r.stderr  # a molecule: no k-point warning
    moved = read(path)
    moved.positions[1] += 0.05
    write(path, moved, format="extxyz")  # the input replaced under the same name: not skipped as done
    r = invoke(["mlff", "label", path, "-o", out])
    assert r.exit_code == 2 and "the input changed under the same name" in r.stderr
    r = _ok(invoke(["mlff", "label", path, "-o", out, "--overwrite", "--json"]))
    assert json.loads(r.stdout)["labelled_now"] == 1
    assert np.allclose(read(out / "labelled.extxyz").positions, moved.positions)
    [item] = (out / "outputs").glob("*.extxyz")  # damaged after it was written: named, not an ASE traceback
    item.write_text(item.read_text()[:200])
    r = invoke(["mlff", "label", path, "-o", out])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{item} exists but cannot be read" in r.stderr and "delete it to make it again" in r.stderr
    # a shard's merge is labelled.partial.extxyz until every item is done
    two = workdir / "two.extxyz"
    write(two, [moved, moved.copy()], format="extxyz")
    r = _ok(invoke(["mlff", "label", two, "-o", workdir / "sh", "--shard", "0/2"]))
    assert (workdir / "sh" / "labelled.partial.extxyz").exists() and not (workdir / "sh" / "labelled.extxyz").exists()
    assert "1 of 2 items are not labelled yet" in r.stderr
    _ok(invoke(["mlff", "label", two, "-o", workdir / "sh", "--shard", "1/2"]))
    assert len(read(workdir / "sh" / "labelled.extxyz", ":")) == 2
    assert not (workdir / "sh" / "labelled.partial.extxyz").exists()
    # the input shrinks to one frame: the merge is of this run's structures, not of every file in outputs/
    write(two, [moved], format="extxyz")
    r = _ok(invoke(["mlff", "label", two, "-o", workdir / "sh", "--json"]))
    assert json.loads(r.stdout)["labelled_total"] == 1 and len(read(workdir / "sh" / "labelled.extxyz", ":")) == 1
    assert "1 labelled file(s)" in r.stderr and "are not of this run's structures" in r.stderr
    # the input grows (active learning) and one shard ends: the earlier, smaller labelled.extxyz goes
    third = moved.copy()
    third.positions[2] += 0.05
    write(two, [moved, moved.copy(), third], format="extxyz")
    r = _ok(invoke(["mlff", "label", two, "-o", workdir / "sh", "--shard", "1/2"]))
    assert not (workdir / "sh" / "labelled.extxyz").exists() and "removed labelled.extxyz of an earlier run" in r.stderr
    assert len(read(workdir / "sh" / "labelled.partial.extxyz", ":")) == 2


def test_label_warns_that_small_periodic_cells_are_gamma_only(workdir):
    pytest.importorskip("tblite")
    from ase.build import bulk

    path = workdir / "na_bcc.extxyz"
    write(path, bulk("Na", "bcc", a=4.23, cubic=True).repeat(2), format="extxyz")  # 8.5 A edges
    r = _ok(invoke(["mlff", "label", path, "-o", workdir / "label_bcc", "--json"]))
    assert "Gamma point only" in r.stderr and "8.5 A" in r.stderr


def test_bad_structures_get_one_line_errors(workdir, trained):
    from ase import Atoms

    model = trained[0] / "checkpoints" / "model.safetensors"
    overlap = workdir / "overlap.extxyz"
    write(overlap, Atoms("CH", positions=[[0, 0, 0], [0.1, 0, 0]]), format="extxyz")
    assert "overlap" in _err(invoke(["mlff", "md", overlap, "--model", model, "--steps", "2", "-o", workdir / "e1"]))
    alien = workdir / "alien.extxyz"
    write(alien, Atoms("CO", positions=[[0, 0, 0], [1.2, 0, 0]]), format="extxyz")
    assert "not trained on" in _err(invoke(["mlff", "md", alien, "--model", model, "--steps", "2", "-o", workdir / "e2"]))
    nocell = workdir / "nocell.extxyz"
    a = Atoms("CH", positions=[[0, 0, 0], [1.1, 0, 0]], pbc=True)
    write(nocell, a, format="extxyz")
    assert "no cell" in _err(invoke(["mlff", "md", nocell, "--model", model, "--steps", "2", "-o", workdir / "e3"]))
    assert "not found" in _err(invoke(["mlff", "train", workdir / "missing.extxyz", "-o", workdir / "e4"]))
    cell = workdir / "cell.extxyz"
    write(cell, Atoms("CH", positions=[[0, 0, 0], [1.1, 0, 0]], cell=[6, 6, 6], pbc=True), format="extxyz")
    assert "no electrostatics" in _err(invoke(["mlff", "md", cell, "--model", model, "--steps", "2",
                                               "--set", "ewald_kmax=4", "-o", workdir / "e5"]))


def test_sodium_site_classes():
    from tub_mlff.explain import classify_sodium_sites

    host = janus_graphene(4, 1, stacking="slab")
    ring = add_sodium(host, 1, "ring", seed=0)
    amine = add_sodium(host, 1, "amine", seed=0)
    below = add_sodium(host, 1, "bottom", seed=0)
    assert list(classify_sodium_sites(ring).values()) == ["ring"]
    assert list(classify_sodium_sites(amine).values()) == ["amine"]
    assert list(classify_sodium_sites(below).values()) == ["graphene"]


def test_shipped_demo_model_loads_and_predicts():
    from tub_mlff.checkpoints import read_model_meta
    from tub_mlff.cli import DEMO_MODEL

    meta = read_model_meta(DEMO_MODEL)
    assert meta["elements"] == [1, 6, 7, 11]
    atoms = add_sodium(janus_graphene(3, 1, stacking="gallery", interlayer=9.0), 2, "random", seed=1)
    atoms.calc = SpookyNetCalculator(str(DEMO_MODEL), spin=spin_for(atoms))
    e = atoms.get_potential_energy()
    assert np.isfinite(e) and -1700 < e < -1500  # GFN1-xTB scale of this cell (about -1573 eV)
    assert np.abs(atoms.get_forces().sum(0)).max() < 1e-3  # no net force in a periodic cell


def test_demo_computes_on_the_devices_it_is_given(tmp_path, monkeypatch):
    """`tub demo --device cuda:1` must put the demo's calculators there (they were always on the CPU)."""
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    import tub_mlff.calculator
    from tub_mlff.demo import run_demo

    class Asked(Exception):
        pass

    def spy(*args, device="cpu", **kwargs):
        raise Asked(device)

    monkeypatch.setattr(tub_mlff.calculator, "SpookyNetCalculator", spy)
    run = Run("mlff", "demo", TubConfig(device="cpu"), out=tmp_path / "demo")
    with pytest.raises(Asked) as asked:
        run_demo(run)
    assert asked.value.args[0] is run.device


@pytest.mark.slow
def test_demo_runs(tmp_path):
    r = _ok(invoke(["demo", "mlff"], env={"TUB_RUNS_DIR": str(tmp_path)}))
    assert "mlff" in r.stdout


def test_md_warns_when_the_structure_lies_outside_the_models_training_compositions(tmp_path):
    """The demo model learned from C24H6N hosts (+ Na) and bcc Na only: a 4x4 sheet (C38H6N) has an
    energy its data do not determine (measured ~1 eV/atom off), a 3x3 bilayer (2 x C24H6N) does not."""
    four = add_sodium(janus_graphene(4, 1, stacking="gallery", interlayer=9.0), 1, "random", seed=1)
    two = janus_graphene(3, 1, stacking="bilayer", interlayer=9.0)
    for name, atoms, warned in (("four", four, True), ("bilayer", two, False)):
        write(tmp_path / f"{name}.extxyz", atoms)
        r = _ok(invoke(["mlff", "md", tmp_path / f"{name}.extxyz", "--steps", "1", "-o", tmp_path / name]))
        assert ("no combination of the model's training compositions" in r.stderr) is warned, name


def test_build_orients_several_groups_on_a_sheet_so_that_none_clash(workdir):
    """Random ring orientations of two or more groups on one sheet once put H atoms 0.575 A apart (n 4, groups 2,
    seed 8); they are drawn again until every group clears the others and its own periodic images."""
    from tub_mlff.structures import MIN_GROUP_GAP, janus_graphene

    for n, groups in ((4, 2), (3, 2), (4, 4)):
        for seed in range(8):
            a = janus_graphene(n, groups, "slab", seed=seed)
            sheet = 2 * n * n
            heavy = a.get_all_distances(mic=True)[sheet:, sheet:]  # group atoms against group atoms
            same = np.arange(len(a) - sheet) // 13
            apart = heavy[same[:, None] != same[None, :]]
            assert apart.min() >= MIN_GROUP_GAP, (n, groups, seed)
    out = workdir / "groups2"
    _ok(invoke(["mlff", "build", "--n", "4", "--groups", "2", "--x", "0", "--seed", "8", "-o", out]))
    d = read(out / "outputs" / "structures.extxyz").get_all_distances(mic=True)
    np.fill_diagonal(d, 9)
    assert d.min() > 0.9


def test_build_imports_no_torch(tmp_path):
    """Building cells is ASE and numpy: it pays no torch import (2-4 s on a small CPU box)."""
    import subprocess
    import sys

    code = ("import sys\nfrom tubcli.cli import main\n"
            "try:\n    main(['mlff', 'build', '--x', '1', '-o', 'B', '-q'])\n"
            "except SystemExit as e:\n    assert e.code in (0, None)\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "B" / "outputs" / "structures.extxyz").is_file()
