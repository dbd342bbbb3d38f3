"""`tub mlff diffusion` on a real (Langevin, Lennard-Jones) MD trajectory: --estimator ase gives the
D of ase.md.analysis.DiffusionCoefficient on the same frames (spec: within 1 %; here to 1e-6),
--timestep serves frames without info['time_fs'] (ASE .traj, other codes), and the default
multi-origin estimator is reported next to it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.io import Trajectory, read, write
from tubcli.testing import expect_ok as _ok, expect_one_line_error as _err, invoke

DT_FS = 20.0  # fs between saved frames (4 steps of 5 fs)
BOX = np.array([10.0, 10.0, 8.0])


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    """12 Na atoms, LJ, Langevin at 800 K in a periodic 10 x 10 x 8 A box, 201 frames every 20 fs
    (~0.7 s). Written wrapped into the cell, without info['time_fs']: as extxyz and as ASE .traj."""
    from ase.calculators.lj import LennardJones
    from ase.md.langevin import Langevin

    d = tmp_path_factory.mktemp("md")
    rng = np.random.default_rng(0)
    grid = np.array([[i, j, k] for i in range(3) for j in range(2) for k in range(2)], float) * [3.3, 5, 4] + 1
    atoms = Atoms("Na12", positions=grid + rng.normal(0, 0.1, grid.shape), cell=BOX, pbc=True)
    atoms.calc = LennardJones(sigma=3.0, epsilon=0.02, rc=6.0, smooth=True)
    dyn = Langevin(atoms, 5 * units.fs, temperature_K=800, friction=0.01 / units.fs, rng=rng, fixcm=False)
    frames = []
    for step in range(201):
        if step:
            dyn.run(4)
        f = atoms.copy()  # positions and momenta, no calculator, no info
        f.wrap()
        frames.append(f)
    write(d / "na.extxyz", frames, format="extxyz")
    with Trajectory(str(d / "na.traj"), "w") as tr:
        for f in frames:
            tr.write(f)
    return d


def _unwrapped_frames(path) -> list[Atoms]:
    """The frames as read back, unwrapped here independently of tub (Cartesian minimum image, orthorhombic box)."""
    wrapped = np.stack([a.positions for a in read(path, ":")])
    step = np.diff(wrapped, axis=0)
    step -= BOX * np.round(step / BOX)
    pos = np.concatenate([wrapped[:1], wrapped[:1] + np.cumsum(step, axis=0)])
    assert np.abs(pos - wrapped).max() > 5.0  # atoms did cross the cell: unwrapping matters
    return [Atoms("Na12", positions=p) for p in pos]


def _ase(frames, segments, axes):
    """ASE's DiffusionCoefficient in cm^2/s: the mean over segments of the slopes along ``axes`` (x, y for 2-D)."""
    from ase.md.analysis import DiffusionCoefficient

    dc = DiffusionCoefficient(frames, timestep=DT_FS * units.fs)
    dc.calculate(ignore_n_images=0, number_of_segments=segments)
    slopes = np.asarray(dc.slopes[0])[:, axes]  # [segment, axis], A^2 per ASE time unit
    return slopes.mean() * units.fs * 0.1, slopes.std() * units.fs * 0.1


def _run(args, out):
    r = _ok(invoke(["mlff", "diffusion", *args, "-o", out, "--json"]))
    return json.loads(r.stdout)["runs"][0]


def test_ase_estimator_equals_ase_diffusion_coefficient_on_md(md, capsys):
    frames = _unwrapped_frames(md / "na.extxyz")
    for blocks in (1, 4):
        got = _run([md / "na.extxyz", "--estimator", "ase", "--timestep", DT_FS, "--blocks", blocks,
                    "--axes", "xy"], md / f"ase{blocks}")
        ref, ref_std = _ase(frames, blocks, [0, 1])
        assert got["estimator"] == "ase" and got["frames"] == 201
        assert got["D_cm2_s"] == pytest.approx(ref, rel=1e-6)  # the bar is 1 %
        assert got["D_std_ase_cm2_s"] == pytest.approx(ref_std, rel=1e-6)
        assert got["D_err_cm2_s"] is None if blocks == 1 else got["D_err_cm2_s"] > 0  # NaN (null): no error bar from 1
        with capsys.disabled():
            print(f"\n  ase estimator, xy, {blocks} segment(s): tub {got['D_cm2_s']:.6e}, ASE {ref:.6e} cm^2/s, "
                  f"relative difference {abs(got['D_cm2_s'] / ref - 1):.1e}")
    # 3-D: ASE's own get_diffusion_coefficients() (mean over x, y, z) and its std
    from ase.md.analysis import DiffusionCoefficient

    dc = DiffusionCoefficient(frames, timestep=DT_FS * units.fs)
    dc.calculate(ignore_n_images=0, number_of_segments=2)
    (d3,), (s3,) = dc.get_diffusion_coefficients()
    got = _run([md / "na.extxyz", "--estimator", "ase", "--timestep", DT_FS, "--blocks", 2, "--axes", "xyz"],
               md / "ase3d")
    assert got["D_cm2_s"] == pytest.approx(d3 * units.fs * 0.1, rel=1e-6)
    assert got["D_std_ase_cm2_s"] == pytest.approx(s3 * units.fs * 0.1, rel=1e-6)


def test_traj_input_and_default_estimator(md, capsys):
    """An ASE .traj (no time_fs; temperature from the saved momenta) gives the extxyz's D; the default
    estimator (all origins, drift removed, fit 0.2-0.8) estimates the same D, so it lands near ASE's,
    but only within the noise of 12 atoms x 4 ps (ratios 0.65-1.7 over 16 seeds): a factor of 3."""
    xyz = _run([md / "na.extxyz", "--estimator", "ase", "--timestep", DT_FS, "--blocks", 1], md / "x")
    traj = _run([md / "na.traj", "--estimator", "ase", "--timestep", DT_FS, "--blocks", 1], md / "t")
    assert traj["D_cm2_s"] == pytest.approx(xyz["D_cm2_s"], rel=1e-6)
    assert 200 < traj["temperature_K"] < 2000
    default = _run([md / "na.traj", "--timestep", DT_FS], md / "d")
    assert default["estimator"] == "einstein" and default["D_err_cm2_s"] > 0
    start, end = default["fit_window_fs"]  # on record: 0.2-0.8 of the longest lag of a block (4 blocks of 201 frames)
    lag = (201 // default["blocks"] - 1) * DT_FS
    assert (start, end) == pytest.approx((0.2 * lag, 0.8 * lag), abs=DT_FS) and default["dims"] == len(default["axes"])
    assert 1 / 3 < default["D_cm2_s"] / xyz["D_cm2_s"] < 3
    with capsys.disabled():
        print(f"\n  same MD: default (einstein, 4 blocks) {default['D_cm2_s']:.3e} +- {default['D_err_cm2_s']:.1e}, "
              f"ase (1 segment) {xyz['D_cm2_s']:.3e} cm^2/s")


def test_diffusion_needs_times_and_consistent_settings(md, tmp_path):
    line = _err(invoke(["mlff", "diffusion", md / "na.extxyz", "-o", tmp_path / "e1"]))
    assert "time_fs" in line and "--timestep" in line
    stamped = read(md / "na.extxyz", ":")
    for k, f in enumerate(stamped):
        f.info["time_fs"] = k * DT_FS
    write(tmp_path / "stamped.extxyz", stamped, format="extxyz")
    assert "--timestep" in _err(invoke(["mlff", "diffusion", tmp_path / "stamped.extxyz", "--timestep", 10,
                                        "-o", tmp_path / "e2"]))
    same = _run([tmp_path / "stamped.extxyz", "--timestep", DT_FS, "--estimator", "ase"], tmp_path / "ok")
    assert same["D_cm2_s"] == pytest.approx(_run([tmp_path / "stamped.extxyz", "--estimator", "ase"],
                                                 tmp_path / "ok2")["D_cm2_s"], rel=1e-12)
    assert "fit_start" in _err(invoke(["mlff", "diffusion", tmp_path / "stamped.extxyz", "--estimator", "ase",
                                       "--set", "fit_start=0.1", "-o", tmp_path / "e3"]))


def _lammps_dump(frames, path, velocities: bool) -> None:
    """A LAMMPS text dump (metal units) of ``frames`` with atom types 1 and 2 (first and second half)."""
    n = len(frames[0])
    with open(path, "w") as f:
        for k, a in enumerate(frames):
            L = a.cell.lengths()
            f.write(f"ITEM: TIMESTEP\n{4 * k}\nITEM: NUMBER OF ATOMS\n{n}\nITEM: BOX BOUNDS pp pp pp\n"
                    + "".join(f"0 {x}\n" for x in L) + "ITEM: ATOMS id type x y z" + (" vx vy vz" if velocities else "") + "\n")
            v = a.get_velocities() * 1000 * units.fs  # A/ps
            for i, p in enumerate(a.positions):
                f.write(f"{i + 1} {1 + 2 * i // n} {p[0]:.8f} {p[1]:.8f} {p[2]:.8f}"
                        + (" {:.8f} {:.8f} {:.8f}".format(*v[i]) if velocities else "") + "\n")


def test_lammps_dumps_take_their_elements_from_species_and_temperatures_from_the_user(md, tmp_path):
    """ASE reads LAMMPS type n as atomic number n (1 = H), so masses and temperatures were those of H/He:
    --species maps the types (velocities kept), --temperature serves dumps without velocities."""
    traj = read(md / "na.traj", ":")
    _lammps_dump(traj, tmp_path / "v.lammpstrj", velocities=True)
    _lammps_dump(traj, tmp_path / "x.lammpstrj", velocities=False)
    ref = _run([md / "na.traj", "--estimator", "ase", "--timestep", DT_FS, "--blocks", 1], tmp_path / "ref")
    r = invoke(["mlff", "diffusion", tmp_path / "v.lammpstrj", "--timestep", DT_FS, "--element", "H",
                "-o", tmp_path / "raw"])
    assert r.exit_code == 0 and "type 1 = H, type 2 = He" in r.stderr and "--species" in r.stderr
    got = _run([tmp_path / "v.lammpstrj", "--species", "Na,Na", "--estimator", "ase", "--timestep", DT_FS,
                "--blocks", 1], tmp_path / "mapped")
    assert got["D_cm2_s"] == pytest.approx(ref["D_cm2_s"], rel=1e-6)
    assert got["temperature_K"] == pytest.approx(ref["temperature_K"], rel=1e-6)
    given = _run([tmp_path / "x.lammpstrj", "--species", "Na", "--species", "Na", "--temperature", 700,
                  "--timestep", DT_FS], tmp_path / "given")
    assert given["temperature_K"] == 700
    assert "types up to 2" in _err(invoke(["mlff", "diffusion", tmp_path / "x.lammpstrj", "--species", "Na",
                                           "--timestep", DT_FS, "-o", tmp_path / "e1"]))
    assert "no trajectory is a LAMMPS dump" in _err(invoke(["mlff", "diffusion", md / "na.traj", "--species", "Na",
                                                            "--timestep", DT_FS, "-o", tmp_path / "e2"]))
    assert "one per trajectory" in _err(invoke(["mlff", "diffusion", md / "na.traj", "--temperature", 300,
                                                "--temperature", 400, "--timestep", DT_FS, "-o", tmp_path / "e3"]))


def test_diffusive_regime_slope_and_displacement():
    from tub_mlff.diffusion import diffusive_regime

    t = np.arange(0, 101) * 10.0
    assert diffusive_regime(t, 1e-3 * t**2, (200, 800)) == pytest.approx((2.0, 640.0))  # free flight
    assert diffusive_regime(t, 0.01 * t, (200, 800))[0] == pytest.approx(1.0)  # Einstein regime


def _walk(path, step_A: float, velocity_A_fs: float, T_info=None, T_set=None, n=120, dt=10.0):
    """Eight Na atoms in a 30 A box: a Gaussian random walk of ``step_A`` per frame plus a constant velocity of
    ``velocity_A_fs`` in a random direction per atom."""
    rng = np.random.default_rng(3)
    v = rng.normal(size=(8, 3))
    v *= velocity_A_fs / np.linalg.norm(v, axis=1, keepdims=True)
    x = np.cumsum(rng.normal(0, step_A, (n, 8, 3)), axis=0) + dt * np.arange(n)[:, None, None] * v
    frames = []
    for k, p in enumerate(x):
        a = Atoms("Na8", positions=p + 15.0, cell=[30, 30, 30], pbc=True)
        a.info["time_fs"] = k * dt
        if T_info is not None:
            a.info.update({"temperature": T_info, "temperature_set_K": T_set})
        frames.append(a)
    write(path, frames, format="extxyz")


def test_a_d_from_the_ballistic_start_or_from_no_hop_is_flagged(tmp_path):
    """A 400-step run fitted its 'D' where the MSD still grew as t^2 and the Arrhenius D(300 K) came from it,
    without a word."""
    _walk(tmp_path / "diff.extxyz", step_A=1.0, velocity_A_fs=0.0)
    _walk(tmp_path / "fly.extxyz", step_A=0.0, velocity_A_fs=0.01)  # free flight: MSD = (v t)^2
    _walk(tmp_path / "rattle.extxyz", step_A=0.02, velocity_A_fs=0.0)
    r = _ok(invoke(["mlff", "diffusion", tmp_path / "diff.extxyz", "--element", "Na", "-o", tmp_path / "a"]))
    assert "not a diffusion coefficient" not in r.stderr
    r = _ok(invoke(["mlff", "diffusion", tmp_path / "fly.extxyz", tmp_path / "rattle.extxyz", "--temperature", 400,
                    "--temperature", 600, "--element", "Na", "-o", tmp_path / "b", "--json"]))
    runs = {Path(x["trajectory"]).stem: x for x in json.loads(r.stdout)["runs"]}
    assert runs["fly"]["msd_loglog_slope"] == pytest.approx(2.0, abs=0.01)
    assert "ballistic" in runs["fly"]["not_diffusive"]
    assert "no hop yet" in runs["rattle"]["not_diffusive"] and runs["rattle"]["msd_at_fit_end_A2"] < 1.0
    assert "fly.extxyz: its MSD grows as t^2.0" in r.stderr and "Arrhenius fit takes D from 2 run(s)" in r.stderr
    assert "not in the diffusive regime" in json.loads(r.stdout)["arrhenius"]["unreliable"]
    # the figures say it too, not only the log and the JSON; one trajectory into the same -o: no Arrhenius figure
    assert (tmp_path / "b" / "outputs" / "arrhenius.png").stat().st_size > 0
    assert not (tmp_path / "a" / "outputs" / "arrhenius.png").exists()
    _ok(invoke(["mlff", "diffusion", tmp_path / "diff.extxyz", "--element", "Na", "-o", tmp_path / "b"]))
    assert not (tmp_path / "b" / "outputs" / "arrhenius.png").exists()


def test_frames_far_from_the_thermostat_temperature_are_named(tmp_path):
    _walk(tmp_path / "hot.extxyz", step_A=1.0, velocity_A_fs=0.0, T_info=473.0, T_set=600.0)
    r = _ok(invoke(["mlff", "diffusion", tmp_path / "hot.extxyz", "--element", "Na", "-o", tmp_path / "a", "--json"]))
    assert "its frames average 473 K, the thermostat was set to 600 K: not equilibrated" in r.stderr
    assert json.loads(r.stdout)["runs"][0]["temperature_set_K"] == 600.0
