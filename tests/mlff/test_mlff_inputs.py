"""Bad input to the mlff verbs gets a one-line error (exit 2) before anything is written, and inputs
that used to give silently wrong numbers give the right ones. Tiny inputs, random small models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import graphene, molecule
from ase.io import read, write
from tubcli.testing import expect_error_line, expect_ok as _ok, expect_one_line_error as _err, invoke

from tub_mlff.calculator import SpookyNetCalculator
from tub_mlff.checkpoints import save_model
from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
from tub_mlff.structures import add_sodium, janus_graphene


def _written(out) -> list[str]:
    """Files a failed verb left in its outputs folder (none expected)."""
    return sorted(p.name for p in (out / "outputs").glob("*")) if (out / "outputs").exists() else []


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two random small models of different feature widths (8 and 16)."""
    d = tmp_path_factory.mktemp("models")
    for width in (8, 16):
        m = SpookyNet(SpookyNetConfig(num_features=width, num_basis_functions=4, num_modules=1,
                                      use_electrostatics=False, use_d4_dispersion=False), seed=0)
        save_model(m.eval(), d / f"w{width}", extra={"elements": [1, 6, 7, 11]})
    return d


@pytest.fixture(scope="module")
def methane(tmp_path_factory, models):
    """Four rattled CH4 labelled by the width-8 model: with forces, and energies only."""
    d = tmp_path_factory.mktemp("ch4")
    calc = SpookyNetCalculator(str(models / "w8.safetensors"), dtype=torch.float64)
    full, energies = [], []
    for k in range(4):
        a = molecule("CH4")
        a.rattle(0.05, seed=k)
        a.calc = calc
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = None
        a.info["energy"] = e
        energies.append(a.copy())
        a.arrays["forces"] = f
        full.append(a)
    write(d / "full.extxyz", full, format="extxyz")
    write(d / "energies.extxyz", energies, format="extxyz")
    return d


# -- config bounds (pydantic): exit 2 before any run folder content ---------------------------------
@pytest.mark.parametrize("args, key", [
    (["build", "--interlayer", "0"], "interlayer"),
    (["build", "--x", "-1"], "x"),
    (["build", "--variants", "0", "--x", "2"], "variants"),
    (["md", "s.extxyz", "--interval", "-3"], "interval"),
    (["md", "s.extxyz", "--interval", "0"], "interval"),
    (["md", "s.extxyz", "--steps", "0"], "steps"),
    (["md", "s.extxyz", "--steps", "-5"], "steps"),
    (["md", "s.extxyz", "--temp", "-1"], "temp"),
    (["md", "s.extxyz", "--timestep", "0"], "timestep"),
    (["md", "s.extxyz", "--set", "friction=0"], "friction"),
    (["train", "d.extxyz", "--ensemble", "0"], "ensemble"),
    (["train", "d.extxyz", "--batch-size", "0"], "batch_size"),
    (["train", "d.extxyz", "--set", "valid_fraction=1.0"], "valid_fraction"),
    (["train", "d.extxyz", "--set", "ema_decay=1.5"], "ema_decay"),
    (["train", "d.extxyz", "--set", "ema_decay=1.0"], "ema_decay"),
    (["train", "d.extxyz", "--set", "energy_weight=-1"], "energy_weight"),
    (["diffusion", "t.extxyz", "--blocks", "0"], "blocks"),
    (["diffusion", "t.extxyz", "--blocks", "-2"], "blocks"),
    (["diffusion", "t.extxyz", "--set", "fit_end=1.5"], "fit_end"),
    (["explain", "s.extxyz", "--walks", "1"], "walks"),
])
def test_out_of_range_options_are_one_line_errors(tmp_path, args, key):
    out = tmp_path / "run"
    line = _err(invoke(["mlff", *args, "-o", out]))
    assert f"'{key}'" in line and not _written(out)


@pytest.mark.parametrize("stacking, interlayer", [("gallery", "7.0"), ("bilayer", "6.5"), ("gallery", "2.0")])
def test_a_gallery_too_narrow_for_the_groups_is_refused(tmp_path, stacking, interlayer):
    out = tmp_path / "run"
    line = _err(invoke(["mlff", "build", "--n", "3", "--stacking", stacking, "--interlayer", interlayer,
                        "--x", "1", "-o", out]))
    assert "too narrow" in line and "raise --interlayer" in line and not _written(out)
    _ok(invoke(["mlff", "build", "--n", "3", "--stacking", stacking, "--interlayer", "8.0", "--x", "1",
                "-o", tmp_path / "ok", "-q"]))


def test_md_checks_its_settings_before_writing(tmp_path, models):
    path = tmp_path / "ch4.extxyz"
    write(path, molecule("CH4"), format="extxyz")
    model = models / "w8.safetensors"
    out = tmp_path / "bussi"
    assert "--temp above 0" in _err(invoke(["mlff", "md", path, "--model", model, "--ensemble", "nvt-bussi",
                                            "--temp", "0", "--steps", "2", "-o", out]))
    assert not _written(out)
    bad = Atoms("CH", positions=[[0, 0, 0], [np.nan, 0, 0]])
    write(tmp_path / "nan.extxyz", bad, format="extxyz")
    out = tmp_path / "nan"
    assert "non-finite" in _err(invoke(["mlff", "md", tmp_path / "nan.extxyz", "--model", model, "--steps", "2",
                                        "-o", out]))
    assert not _written(out)
    write(tmp_path / "na.extxyz", Atoms("Na", positions=[[0, 0, 0]]), format="extxyz")  # its momenta became NaN
    out = tmp_path / "one"
    assert "at least 2 atoms" in _err(invoke(["mlff", "md", tmp_path / "na.extxyz", "--model", model, "--steps", "2",
                                              "-o", out]))
    assert not _written(out)
    (tmp_path / "dir.extxyz").mkdir()
    assert "is a folder" in _err(invoke(["mlff", "md", tmp_path / "dir.extxyz", "--model", model, "-o", tmp_path / "d"]))
    from ase.io.bundletrajectory import BundleTrajectory

    from tub_mlff.data import read_structures

    bundle = BundleTrajectory(str(tmp_path / "md.bundle"), "w")  # ASE's folder format is read, not refused
    bundle.write(molecule("CH4"))
    bundle.close()
    assert len(read_structures(tmp_path / "md.bundle")) == 1


def test_build_rejects_cells_whose_atoms_overlap(tmp_path):
    out = tmp_path / "b"
    line = _err(invoke(["mlff", "build", "--n", "2", "--interlayer", "3", "-o", out]))
    assert "too narrow" in line and "--interlayer" in line and not _written(out)


def test_build_gives_x0_its_variants_when_rattled(tmp_path):
    def counts(*extra):
        out = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        _ok(invoke(["mlff", "build", "--n", "2", "--groups", "0", "--x", "0", "--x", "1", "--variants", "3", "-o", out,
                    "-q", *extra]))
        frames = read(out / "outputs" / "structures.extxyz", ":")
        return frames, [int(f.info["na_count"]) for f in frames]

    frames, x = counts("--rattle", "0.05")
    assert x == [0, 0, 0, 1, 1, 1]  # rattled copies of the bare host: three different structures
    assert not np.allclose(frames[0].positions, frames[1].positions)
    assert counts()[1] == [0, 1, 1, 1]  # unrattled copies of the host would be identical: one


# -- label -----------------------------------------------------------------------------------------
def test_label_rejects_elements_beyond_xtb_before_any_work(tmp_path):
    write(tmp_path / "ok.extxyz", molecule("CH4"), format="extxyz")
    write(tmp_path / "heavy.extxyz", [molecule("CH4"), Atoms("UH", positions=[[0, 0, 0], [0, 0, 2.0]])],
          format="extxyz")
    out = tmp_path / "l_heavy"
    line = _err(invoke(["mlff", "label", tmp_path / "ok.extxyz", tmp_path / "heavy.extxyz", "-o", out]))
    assert "heavy.extxyz frame 1" in line and "U" in line and "Rn" in line and "GFN1-xTB" in line
    assert not _written(out) and not list(out.rglob("failures.jsonl"))


@pytest.mark.parametrize("setting, expect", [("spin=0", "spin 0 (unpaired electrons) is impossible with 9"),
                                              ("spin=-1", "'spin' (from --set): Input should be greater than or equal to 0"),
                                              ("charge=0.5", "not a whole number"), ("charge=30", "removes more electrons")])
def test_md_refuses_a_charge_or_spin_the_electrons_cannot_make(tmp_path, models, setting, expect):
    path = tmp_path / "ch3.extxyz"  # CH3: 9 electrons, so no singlet
    write(path, Atoms("CH3", positions=[[0, 0, 0], [1.09, 0, 0], [-0.55, 0.94, 0], [-0.55, -0.94, 0]]),
          format="extxyz")
    out = tmp_path / "md"
    assert expect in _err(invoke(["mlff", "md", path, "--model", models / "w8.safetensors", "--steps", "2",
                                  "--set", setting, "-o", out]))
    assert not _written(out)


def test_label_checks_charge_and_spin_of_every_frame_first(tmp_path):
    water, ion = molecule("H2O"), molecule("H2O")
    ion.info["charge"] = 30
    write(tmp_path / "mols.extxyz", [water, ion], format="extxyz")
    out = tmp_path / "l_charge"
    line = _err(invoke(["mlff", "label", tmp_path / "mols.extxyz", "-o", out]))
    assert "frame 1 (H2O): charge 30 removes more electrons than its 10" in line and not _written(out)


def test_label_checks_structures_and_output_names_first(tmp_path):
    write(tmp_path / "overlap.extxyz", Atoms("CH", positions=[[0, 0, 0], [0.1, 0, 0]]), format="extxyz")
    write(tmp_path / "nocell.extxyz", Atoms("CH", positions=[[0, 0, 0], [1.1, 0, 0]], pbc=True), format="extxyz")
    for name, expect in (("overlap", "overlap"), ("nocell", "no cell")):
        out = tmp_path / f"l_{name}"
        assert expect in _err(invoke(["mlff", "label", tmp_path / f"{name}.extxyz", "-o", out]))
        assert not _written(out)
    for sub in ("sa", "sb"):  # both would be written as cells_000000.extxyz: one would be lost
        (tmp_path / sub).mkdir()
        write(tmp_path / sub / "cells.extxyz", molecule("CH4"), format="extxyz")
    out = tmp_path / "l_clash"
    line = _err(invoke(["mlff", "label", tmp_path / "sa" / "cells.extxyz", tmp_path / "sb" / "cells.extxyz", "-o", out]))
    assert "cells_<frame>.extxyz" in line and not _written(out)


# -- train -----------------------------------------------------------------------------------------
SMALL = ["--set", "model.num_features=8", "--set", "model.num_modules=1", "--set", "model.num_basis_functions=4",
         "--set", "model.electrostatics=false", "--batch-size", "2"]


def test_train_energies_only_and_resume_with_another_architecture(tmp_path, methane, models):
    energies = methane / "energies.extxyz"
    assert "forces_weight=0" in _err(invoke(["mlff", "train", energies, *SMALL, "--epochs", "1", "-o", tmp_path / "e"]))
    out = tmp_path / "t"
    r = _ok(invoke(["mlff", "train", energies, *SMALL, "--epochs", "1", "--set", "forces_weight=0",
                    "--set", "test_fraction=0", "-o", out, "--json"]))
    assert (out / "checkpoints" / "model.safetensors").exists() and json.loads(r.stdout)["valid_frames"] == 1
    wider = [a.replace("num_features=8", "num_features=16") for a in SMALL]
    line = _err(invoke(["mlff", "train", energies, *wider, "--epochs", "2", "--set", "forces_weight=0",
                        "--set", "test_fraction=0", "-o", out, "--resume", "auto", "-q"]))
    assert "trained with other settings (model.num_features: 8 -> 16)" in line  # refused before any loading
    r = _ok(invoke(["mlff", "evaluate", energies, "--model", models / "w8.safetensors", "-o", tmp_path / "ev", "--json"]))
    assert "energy_mae_meV_atom" in json.loads(r.stdout) and "forces_mae_meV_A" not in json.loads(r.stdout)
    assert "leaves no training frames" in _err(invoke(["mlff", "train", energies, "--set", "valid_fraction=0.5",
                                                       "--set", "test_fraction=0.5", "-o", tmp_path / "f"]))


def test_init_from_keeps_its_architecture_and_applies_training_switches(tmp_path, methane, models):
    full, base = methane / "full.extxyz", models / "w8.safetensors"
    init = ["train", full, "--init-from", base, "--epochs", "1", "--set", "test_fraction=0", "-o"]
    for extra, flags in ((["--set", "model.num_features=16", "--set", "model.d4=true"], ("num_features", "d4")),
                         (["--set", "model.electrostatics=true"], ("electrostatics",)),
                         (["--set", "model.cutoff=4"], ("cutoff",))):
        out = tmp_path / f"bad{len(flags)}{flags[0]}"
        line = _err(invoke(["mlff", *init, out, *SMALL, *extra]))
        assert "--init-from takes the architecture from" in line and "train from scratch" in line
        assert all(f"--set model.{f}" in line for f in flags) and not (out / "checkpoints").exists()
    # the same architecture given explicitly is fine; dropout and lr_cutoff are training-time switches
    out = tmp_path / "ok"
    _ok(invoke(["mlff", *init, out, *SMALL, "--set", "model.module_keep_prob=0.5", "--set", "model.lr_cutoff=7",
                "-q"]))
    saved = json.loads((out / "checkpoints" / "model.json").read_text())["spookynet"]
    assert saved["num_features"] == 8 and saved["module_keep_prob"] == 0.5 and saved["lr_cutoff"] == 7
    # a train run directory stands for its model, as for --model ("runs/train.json not found" before)
    _ok(invoke(["mlff", "train", full, "--init-from", out, "--epochs", "1", "--set", "test_fraction=0", *SMALL, "-q",
                "-o", tmp_path / "again"]))
    saved = json.loads((tmp_path / "again" / "checkpoints" / "model.json").read_text())["spookynet"]
    assert saved["num_features"] == 8 and saved["lr_cutoff"] == 7  # the run's model, not a fresh default


def test_train_without_validation_frames_warns_once(tmp_path, methane):
    two = tmp_path / "two.extxyz"
    write(two, read(methane / "full.extxyz", ":2"), format="extxyz")
    r = _ok(invoke(["mlff", "train", two, *SMALL, "--epochs", "2", "--set", "test_fraction=0", "-o", tmp_path / "t"]))
    assert r.stderr.count("no validation frames") == 1


# -- model files -----------------------------------------------------------------------------------
def test_damaged_model_files_are_one_line_errors_in_evaluate_and_md(tmp_path, models, methane):
    good = (models / "w8.safetensors").read_bytes()
    meta = (models / "w8.json").read_text()
    cases = {"nojson": (good, None), "badjson": (good, "{oops"), "empty": (b"", meta),
             "truncated": (good[: len(good) * 9 // 10], meta)}
    data = methane / "full.extxyz"
    for name, (tensors, js) in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(tensors)
        if js is not None:
            (tmp_path / f"{name}.json").write_text(js)
        for verb in (["evaluate", data], ["md", data, "--steps", "2"]):
            out = tmp_path / f"{verb[0]}_{name}"
            line = _err(invoke(["mlff", *verb, "--model", tmp_path / f"{name}.safetensors", "-o", out]))
            assert name in line and not _written(out)


def test_committee_of_different_widths_runs(models):
    a = molecule("CH4")
    calc = SpookyNetCalculator([str(models / "w8.safetensors"), str(models / "w16.safetensors")])
    a.calc = calc
    assert np.isfinite(a.get_forces()).all() and "features" not in calc.results  # no common feature space
    same = SpookyNetCalculator([str(models / "w8.safetensors")] * 2)
    a.calc = same
    a.get_forces()
    assert same.results["features"].shape == (5, 8)


def test_calculator_refuses_impossible_charge_spin_and_names_dtype_errors(models):
    from tubcli.errors import TubError

    path = str(models / "w8.safetensors")
    ch4 = molecule("CH4")  # 10 electrons
    for kw, match in (({"spin": 1}, "spin 1 .* impossible with 10 electrons"), ({"charge": 0.5}, "not a whole"),
                      ({"charge": 100}, "removes more electrons")):
        ch4.calc = SpookyNetCalculator(path, **kw)
        with pytest.raises(TubError, match=match):
            ch4.get_potential_energy()
    ch4.calc = SpookyNetCalculator(path, charge=1, spin=1)  # CH4+: 9 electrons, a doublet
    assert np.isfinite(ch4.get_potential_energy())
    for spelling in ("float64", "fp64", np.float64, torch.float64):  # the usual spellings (and the CLI's)
        assert SpookyNetCalculator(path, dtype=spelling).dtype == torch.float64
    with pytest.raises(ValueError, match="use torch.float32 or torch.float64"):
        SpookyNetCalculator(path, dtype="float16")


def test_calculator_takes_charge_and_spin_as_ase_parameters(models):
    """calc.set(charge=1) was silently ignored (the energy stayed neutral) and a typo such as Charge=1 ran neutral."""
    from tub_mlff.demo import MODEL  # trained: its electronic embedding tells charges and spins apart

    path = str(MODEL)
    ch4 = molecule("CH4")
    ch4.calc = calc = SpookyNetCalculator(path, dtype=torch.float64)
    neutral = ch4.get_potential_energy()
    cation = molecule("CH4")
    cation.calc = SpookyNetCalculator(path, dtype=torch.float64, charge=1)
    assert calc.set(charge=1) == {"charge": 1.0}
    assert ch4.get_potential_energy() == pytest.approx(cation.get_potential_energy(), abs=1e-12) != neutral
    calc.charge = 0  # the attribute is the parameter: no stale result
    assert ch4.get_potential_energy() == pytest.approx(neutral, abs=1e-12)
    calc.spin = 2  # a triplet CH4
    assert ch4.get_potential_energy() != pytest.approx(neutral, abs=1e-9) and calc.todict() == {"charge": 0.0, "spin": 2.0}
    with pytest.raises(TypeError, match="unknown keyword.*Charge"):
        SpookyNetCalculator(path, Charge=1)
    with pytest.raises(TypeError, match="charge and spin, not multiplicity"):
        calc.set(multiplicity=3)


def test_calculator_checks_each_new_geometry_not_only_the_first(models):
    """Overlaps, NaN and non-finite energies were only caught on the first call or a change of atoms/cell/pbc."""
    from tubcli.errors import TubError

    calc = SpookyNetCalculator(str(models / "w8.safetensors"), dtype=torch.float64)
    ok = molecule("CH4")
    ok.calc = calc
    ok.get_potential_energy()
    other = molecule("CH4")  # a new Atoms object with the same composition on the same calculator
    other.positions[1] = other.positions[0]
    other.calc = calc
    with pytest.raises(TubError, match="atoms 0 and 1 overlap"):
        other.get_potential_energy()
    ok.positions[2] = ok.positions[3] + 0.01  # moved onto another atom after the first call
    with pytest.raises(TubError, match="overlap"):
        ok.get_potential_energy()
    ok.positions[2, 0] = np.nan
    with pytest.raises(TubError, match="non-finite"):
        ok.get_potential_energy()


def test_calculator_converts_a_copy_of_a_module_of_another_dtype(models):
    """Two calculators of one module in two dtypes: the first broke (double != float) when the second converted it."""
    m = SpookyNet(SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=1, use_electrostatics=False,
                                  use_d4_dispersion=False), seed=0).eval()
    c64 = SpookyNetCalculator(m, dtype=torch.float64)
    c32 = SpookyNetCalculator(m, dtype=torch.float32)
    a, b = molecule("CH4"), molecule("CH4")
    a.calc, b.calc = c64, c32
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-4)
    assert next(m.parameters()).dtype == torch.float32 and c32.models[0] is m  # no conversion: used as it is


def test_committee_spread_is_an_ase_property(models):
    from ase.build import bulk

    calc = SpookyNetCalculator([str(models / "w8.safetensors"), str(models / "w16.safetensors")],
                               dtype=torch.float64, lr_cutoff=None)
    na = bulk("Na", "bcc", a=4.3, cubic=True)
    na.rattle(0.05, seed=0)
    na.calc = calc
    assert calc.get_property("energy_std", na) >= 0 and calc.get_property("forces_std", na).shape == (2, 3)
    stresses = [s.get_stress() for s in _members(na, models)]
    assert np.allclose(calc.get_property("stress_std", na), np.std(stresses, axis=0), atol=1e-12)
    from ase.calculators.calculator import PropertyNotImplementedError

    with pytest.raises(PropertyNotImplementedError):  # sum q r of a cell depends on the images chosen
        na.get_dipole_moment()


def _members(atoms, models):
    for width in (8, 16):
        a = atoms.copy()
        a.calc = SpookyNetCalculator(str(models / f"w{width}.safetensors"), dtype=torch.float64, lr_cutoff=None)
        yield a


# -- 2-D periodic sheets ---------------------------------------------------------------------------
def test_sheet_without_c_vector_is_open_along_z(models):
    from tub_mlff.validation import check_structure
    from tubcli.errors import TubError

    sheet = graphene(size=(3, 3, 1), vacuum=None)  # pbc (T, T, F), c = 0
    sheet.rattle(0.05, seed=1)
    check_structure(sheet)
    boxed = sheet.copy()
    boxed.cell[2] = [0, 0, 25.0]
    energies = []
    for a in (sheet, boxed):
        a.calc = SpookyNetCalculator(str(models / "w8.safetensors"), dtype=torch.float64)
        energies.append((a.get_potential_energy(), a.get_forces()))
    assert energies[0][0] == pytest.approx(energies[1][0], abs=1e-9)
    assert np.abs(energies[0][1] - energies[1][1]).max() < 1e-9
    sheet.calc = SpookyNetCalculator(str(models / "w8.safetensors"), dtype=torch.float64)
    with pytest.raises(TubError, match="stress needs a cell with a volume.*vacuum length"):
        sheet.get_stress()
    bad = sheet.copy()
    bad.pbc = True  # periodic along c, but c = 0
    with pytest.raises(TubError, match="no cell vector c"):
        check_structure(bad)


# -- ocv -------------------------------------------------------------------------------------------
def test_ocv_needs_one_host_with_and_without_sodium(tmp_path):
    h3 = janus_graphene(3, 1, "gallery", 9.0)
    h4 = janus_graphene(4, 1, "gallery", 9.0)
    taller = h3.copy()
    taller.cell[2, 2] = 15.0
    cases = {"mixed": ([h3, add_sodium(h4, 2, seed=1)], "not the host"),
             "cell": ([h3, add_sodium(taller, 1, seed=1)], "another cell"),
             "hostonly": ([h3], "Na-loaded structure and the Na-free host")}
    for name, (frames, expect) in cases.items():
        write(tmp_path / f"{name}.extxyz", frames, format="extxyz")
        out = tmp_path / f"o_{name}"
        assert expect in _err(invoke(["mlff", "ocv", "--structures", tmp_path / f"{name}.extxyz",
                                      "--relax-steps", "0", "-o", out]))
        assert not _written(out)
    assert "Na-free host" in _err(invoke(["mlff", "ocv", "--x-max", "0", "-o", tmp_path / "o_x0"]))


# -- diffusion -------------------------------------------------------------------------------------
def _walk(path, temperature, D, periodic, frames=200, dt=10.0, seed=0):
    """20 Na random walkers (D in A^2/fs) saved every dt fs; periodic in a 12 A box or a free cluster."""
    rng = np.random.default_rng(seed)
    pos = np.cumsum(rng.normal(0, np.sqrt(2 * D * dt), (frames, 20, 3)), 0) + 6.0
    out = []
    for t in range(frames):
        a = Atoms("Na20", positions=pos[t], cell=[12, 12, 12] if periodic else None, pbc=periodic)
        if periodic:
            a.wrap()
        a.info.update(time_fs=t * dt, temperature=temperature)
        out.append(a)
    write(path, out, format="extxyz")
    return pos


def test_diffusion_of_a_cluster_without_cell(tmp_path):
    from tub_mlff.diffusion import diffusion_coefficient

    pos = _walk(tmp_path / "free.extxyz", 600.0, 0.02, periodic=False)
    r = _ok(invoke(["mlff", "diffusion", tmp_path / "free.extxyz", "-o", tmp_path / "d", "--json"]))
    got = json.loads(r.stdout)["runs"][0]["D_cm2_s"]
    ref = diffusion_coefficient(pos, 10.0, atoms=np.arange(20), blocks=4)
    assert got == pytest.approx(ref.D_cm2_s, rel=1e-9) and got > 0.5 * 0.02 * 0.1


def test_diffusion_unwraps_the_periodic_directions_only():
    from tub_mlff.diffusion import unwrap

    s = np.array([[[0.95, 0.95, 0.2]], [[0.05, 0.05, 0.9]]])  # jumps across x and y; z is open
    cells = np.eye(3) * 10
    got = unwrap(s, cells, pbc=(True, True, False))
    assert got[1, 0] == pytest.approx([10.5, 10.5, 9.0])


def test_diffusion_rejects_joined_trajectories_and_bad_fit_settings(tmp_path):
    _walk(tmp_path / "a.extxyz", 600.0, 0.02, periodic=True)
    write(tmp_path / "twice.extxyz", read(tmp_path / "a.extxyz", ":") * 2, format="extxyz")
    assert "evenly spaced" in _err(invoke(["mlff", "diffusion", tmp_path / "twice.extxyz", "-o", tmp_path / "d1"]))
    assert "fit_start" in _err(invoke(["mlff", "diffusion", tmp_path / "a.extxyz", "--set", "fit_start=0.9",
                                       "--set", "fit_end=0.1", "-o", tmp_path / "d2"]))
    assert "--blocks" in _err(invoke(["mlff", "diffusion", tmp_path / "a.extxyz", "--blocks", "60",
                                      "-o", tmp_path / "d3"]))


def test_arrhenius_fit_needs_two_temperatures(tmp_path):
    _walk(tmp_path / "a.extxyz", 600.0, 0.02, periodic=True)
    _walk(tmp_path / "b.extxyz", 603.0, 0.02, periodic=True, seed=1)
    _walk(tmp_path / "c.extxyz", 900.0, 0.05, periodic=True, seed=2)
    for blocks in ("1", "4"):
        r = _ok(invoke(["mlff", "diffusion", tmp_path / "a.extxyz", tmp_path / "b.extxyz", "--blocks", blocks,
                        "-o", tmp_path / f"same{blocks}", "--json"]))
        res = json.loads(r.stdout)
        assert "arrhenius" not in res and "same temperature" in res["arrhenius_skipped"] and len(res["runs"]) == 2
    r = _ok(invoke(["mlff", "diffusion", tmp_path / "a.extxyz", tmp_path / "c.extxyz", "-o", tmp_path / "two",
                    "--json"]))
    assert json.loads(r.stdout)["arrhenius"]["Ea_eV"] > 0
    one = json.loads(_ok(invoke(["mlff", "diffusion", tmp_path / "a.extxyz", "-o", tmp_path / "one", "--json"])).stdout)
    assert "arrhenius" not in one and "one trajectory" in one["arrhenius_skipped"]


def test_grouped_split_keeps_each_trajectory_in_one_split():
    """split_by=traj: no trajectory has frames in two of train/valid/test (MD neighbours are near copies)."""
    from tub_mlff.data import split_indices

    groups = np.repeat(np.arange(20), 10)  # 20 trajectories of 10 frames
    for seed in range(5):
        tr, va, te = split_indices(200, 0.1, 0.1, seed, groups)
        assert sorted(np.concatenate([tr, va, te])) == list(range(200))
        sets = [set(groups[ix]) for ix in (tr, va, te)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert len(te) == 20 and len(va) == 20  # whole groups filling the 10 % shares
    tr, va, te = split_indices(200, 0.1, 0.1, 0)  # frame by frame: trajectories straddle the splits
    assert set(groups[tr]) & set(groups[te])
    tr, va, te = split_indices(20, 0.1, 0.1, 0, np.repeat([0, 1], 10))  # two groups: one for test, one to train
    assert len(tr) == 10 and len(te) == 10 and len(va) == 0


def test_train_split_by_needs_the_key_on_every_frame(tmp_path):
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k in range(6):
        a = molecule("CH4")
        a.rattle(0.05, seed=k)
        a.calc = SinglePointCalculator(a, energy=-1.0 - 0.01 * k, forces=np.zeros((5, 3)))
        frames.append(a)
    write(tmp_path / "d.extxyz", frames)
    msg = _err(invoke(["mlff", "train", tmp_path / "d.extxyz", "-o", tmp_path / "o", "--set", "split_by=traj"]))
    assert "info['traj']" in msg and "split_by=none" in msg


def test_model_may_be_a_train_run_directory(tmp_path, models):
    import shutil

    path = tmp_path / "ch4.extxyz"
    write(path, molecule("CH4"), format="extxyz")
    for run, names in (("single", ["model"]), ("committee", ["model_0", "model_1"])):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        for name in names:
            for ext in (".safetensors", ".json"):
                shutil.copy(models / f"w8{ext}", tmp_path / run / "checkpoints" / f"{name}{ext}")
        result = json.loads(_ok(invoke(["mlff", "md", path, "--model", tmp_path / run, "--steps", "2", "--json",
                                        "-o", tmp_path / f"md_{run}"])).stdout)
        assert result["committee"] == len(names)
    (tmp_path / "empty").mkdir()
    assert "without a trained model" in _err(invoke(["mlff", "md", path, "--model", tmp_path / "empty",
                                                     "--steps", "2", "-o", tmp_path / "md_empty"]))


def test_ring_sites_hold_two_sodium_per_group_ring():
    host = janus_graphene(n=4, groups=1)
    assert len(add_sodium(host, 2, "ring")) == len(host) + 2
    with pytest.raises(ValueError, match="at most 2 ring sites"):
        add_sodium(host, 3, "ring")


def test_labels_under_ase_calculator_keys_and_bad_labels(tmp_path):
    """ASE's extxyz reader moves free_energy (VASP's usual target) into the calculator results: it is
    found by its key; a NaN or text label is a one-line error naming the frame, not a lost metric."""
    import io

    from ase import Atoms
    from ase.io import read
    from tubcli.errors import TubError

    from tub_mlff.data import Keys, labels

    text = ('2\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:forces:R:3 free_energy=-3.5 '
            'pbc="T T T"\nNa 0 0 0 0.1 0 0\nNa 2 2 2 -0.1 0 0\n')
    frame = read(io.StringIO(text), format="extxyz")
    e, f, _, _, _ = labels(frame, Keys(energy="free_energy"))
    assert e == -3.5 and f[0, 0] == pytest.approx(0.1)
    bad = Atoms("Na2", positions=[[0, 0, 0], [2, 2, 2]], cell=[5, 5, 5], pbc=True)
    bad.arrays["forces"] = np.zeros((2, 3))
    for value in (float("nan"), "abc"):
        bad.info["energy"] = value
        with pytest.raises(TubError, match="frame 7: .*fix or drop the frame"):
            labels(bad, Keys(), name="frame 7")


def test_a_rerun_of_a_finished_md_reports_what_the_run_did(tmp_path, models):
    """`tub demo` twice into one folder failed: the rerun of a complete MD returned no mean temperature."""
    path = tmp_path / "ch4.extxyz"
    write(path, molecule("CH4"), format="extxyz")
    args = ["mlff", "md", path, "--model", models / "w8.safetensors", "--steps", "4", "--interval", "2", "--json",
            "-o", tmp_path / "md"]
    first, again = (json.loads(_ok(invoke(args)).stdout) for _ in range(2))
    assert again["steps_done"] == 4 and again["resumed_from"] == 4
    assert again["mean_temperature_K"] == pytest.approx(first["mean_temperature_K"], rel=1e-6)
    assert again["final_epot_eV"] == pytest.approx(first["final_epot_eV"], rel=1e-6)


def test_a_count_line_beyond_the_end_of_the_file_is_a_one_line_error_not_an_hour(tmp_path):
    """ASE reads one line per declared atom even past the end of the file: a corrupt count (10^9) ran for
    hours. Every verb reads structures through read_structures, which checks the counts first."""
    from ase.build import bulk

    from tub_mlff.data import read_structures
    from tubcli.errors import TubError

    a = bulk("Na", "bcc", a=4.2) * (2, 2, 2)
    a.info["energy"] = 0.0
    write(tmp_path / "ok.extxyz", [a, a])
    assert len(read_structures(tmp_path / "ok.extxyz")) == 2
    lines = (tmp_path / "ok.extxyz").read_text().splitlines(keepends=True)
    (tmp_path / "bad.extxyz").write_text("1000000000\n" + "".join(lines[1:]))
    with pytest.raises(TubError, match=r"line 1 declares 1000000000 atoms but only \d+ atom lines follow"):
        read_structures(tmp_path / "bad.extxyz")
    (tmp_path / "cut.extxyz").write_text("".join(lines[:-3]))  # the second frame cut short
    with pytest.raises(TubError, match="line 11 declares 8 atoms but only 5 atom lines follow"):
        read_structures(tmp_path / "cut.extxyz")


# -- structures every model verb refuses the same way ----------------------------------------------
def _uranium(path):
    host = Atoms("UH2", positions=[[0, 0, 0], [0, 0, 2.0], [0, 2.0, 0]])
    loaded = host + Atoms("Na", positions=[[2.5, 2.5, 2.5]])
    write(path, [host, loaded], format="extxyz")
    return path


@pytest.mark.parametrize("verb", ["train", "train --valid", "evaluate", "md", "explain", "ocv"])
def test_elements_beyond_rn_are_one_line_errors_in_every_model_verb(tmp_path, models, methane, verb):
    """U (Z=92) gave train an IndexError (exit 1), the others "not trained on": no model's tables hold it."""
    u, out, model = _uranium(tmp_path / "u.extxyz"), tmp_path / "out", ["--model", models / "w8.safetensors"]
    args = {"train": ["train", u, *SMALL, "--epochs", "1"],
            "train --valid": ["train", methane / "full.extxyz", "--valid", u, *SMALL, "--epochs", "1"],
            "evaluate": ["evaluate", u, *model], "md": ["md", u, *model, "--steps", "2"],
            "explain": ["explain", u, *model], "ocv": ["ocv", "--structures", u, *model, "--relax-steps", "0"]}[verb]
    expect_error_line(invoke(["mlff", *args, "-o", out]), "u.extxyz", "U (Z=92)", "Rn (Z=86)")
    assert not _written(out)


@pytest.mark.parametrize("verb", ["explain", "ocv"])
def test_a_frame_without_atoms_is_named_before_its_spin_or_host(tmp_path, models, verb):
    """explain said "spin 1 (unpaired electrons) is impossible with 0 electrons", ocv "not the host"."""
    ch4, empty = molecule("CH4"), Atoms(info={"spin": 1})  # a spin, as the frames of `build` carry
    path = tmp_path / "empty.extxyz"
    write(path, [empty, ch4, ch4 + Atoms("Na", positions=[[3, 3, 3]])], format="extxyz")
    args = ["explain", path] if verb == "explain" else ["ocv", "--structures", path, "--relax-steps", "0"]
    expect_error_line(invoke(["mlff", *args, "--model", models / "w8.safetensors", "-o", tmp_path / "o"]),
                      "empty.extxyz frame 0 has no atoms")


def test_unknown_symbols_short_rows_and_text_values_name_their_line(tmp_path):
    """ASE said "('Xx')" (a KeyError) and "could not assign tuple of length 7 to structure with 8 fields."."""
    from tubcli.errors import TubError

    from tub_mlff.data import read_structures

    a = molecule("CH4")
    a.arrays["forces"] = np.zeros((5, 3))
    write(tmp_path / "ok.extxyz", [a, a], format="extxyz")
    lines = (tmp_path / "ok.extxyz").read_text().splitlines(keepends=True)

    def damaged(name, line_no, change):  # line_no counts from 1, as the messages do
        bad = lines.copy()
        bad[line_no - 1] = change(bad[line_no - 1])
        (tmp_path / name).write_text("".join(bad))
        return tmp_path / name

    elem = damaged("elem.extxyz", 10, lambda ln: "Xx" + ln[1:])  # the second frame's first atom
    with pytest.raises(TubError, match=r"elem.extxyz line 10: unknown element symbol 'Xx'; use a chemical symbol"):
        read_structures(elem)
    short = damaged("short.extxyz", 4, lambda ln: " ".join(ln.split()[:-1]) + "\n")
    with pytest.raises(TubError, match=r"short.extxyz line 4 has 6 columns, fewer than the 7 that Properties= on "
                                       r"line 2 declares \(species:S:1:pos:R:3:forces:R:3\)"):
        read_structures(short)
    text = damaged("text.extxyz", 5, lambda ln: ln.split()[0] + " abc " + " ".join(ln.split()[2:]) + "\n")
    with pytest.raises(TubError, match=r"text.extxyz line 5: column 2 \('abc'\) is not a number"):
        read_structures(text)
    out = tmp_path / "ev"
    expect_error_line(invoke(["mlff", "evaluate", elem, "-o", out]), "line 10", "'Xx'")
    assert not _written(out)


def test_the_calculator_takes_the_shipped_demo_model_by_default():
    """From Python the demo model was reachable only through tub_mlff.cli: SpookyNetCalculator() failed."""
    from ase.build import molecule

    from tub_mlff import DEMO_MODEL
    from tub_mlff.calculator import SpookyNetCalculator

    atoms = molecule("CH4")
    atoms.calc = SpookyNetCalculator()
    e_default = atoms.get_potential_energy()
    atoms.calc = SpookyNetCalculator(str(DEMO_MODEL))
    assert atoms.get_potential_energy() == e_default


@pytest.mark.parametrize("verb, setting, key", [
    ("train", "model.num_features=0", "'model.num_features'"), ("train", "model.cutoff=-1", "'model.cutoff'"),
    ("train", "model.module_keep_prob=2", "'model.module_keep_prob'"), ("md", "lr_cutoff=-3", "'lr_cutoff'"),
    ("ocv", "x_max=-1", "'x_max'"), ("md", "spin=-1", "'spin'")])
def test_settings_out_of_range_are_refused_by_tub_config_as_by_the_verb(verb, setting, key):
    res = invoke(["config", "mlff", verb, "--set", setting])
    assert res.exit_code == 2 and f"invalid config value for {key} (from --set)" in res.stderr, res.stderr


def test_md_names_a_strained_starting_cell(tmp_path):
    """An unrelaxed built cell (3.7 GPa with the demo model) ran NVT at that strain without a word."""
    from ase.io import write

    from tub_mlff.structures import add_sodium, janus_graphene

    write(tmp_path / "built.extxyz", add_sodium(janus_graphene(3, 1, stacking="gallery"), 3, "random", seed=1))
    res = invoke(["mlff", "md", tmp_path / "built.extxyz", "--steps", 2, "--interval", 1, "-o", tmp_path / "m"])
    assert res.exit_code == 0, res.stderr
    assert "the starting cell is under" in res.stderr and "relax the cell first" in res.stderr
    res = invoke(["mlff", "md", tmp_path / "built.extxyz", "--steps", 4, "--interval", 1, "-o", tmp_path / "m"])
    assert res.exit_code == 0 and "the starting cell is under" not in res.stderr  # a resume: its own state
    write(tmp_path / "slab.extxyz", add_sodium(janus_graphene(3, 1, stacking="slab"), 1, "random", seed=1))
    res = invoke(["mlff", "md", tmp_path / "slab.extxyz", "--steps", 2, "--interval", 1, "-o", tmp_path / "s"])
    assert res.exit_code == 0 and "the starting cell is under" not in res.stderr  # vacuum: no pressure to name


@pytest.mark.parametrize("verb", ["train", "evaluate", "predict", "md", "ocv", "explain"])
def test_model_verbs_offer_fp32_and_fp64_only(verb, tmp_path, monkeypatch):
    """--help, config files and TUB_PRECISION offered bf16/fp16, which every model verb then refused at run time."""
    assert "fp32 | fp64 " in invoke(["mlff", verb, "--help"]).stdout
    given = [] if verb == "ocv" else ["x.extxyz"]  # ocv builds its structures unless --structures
    line = _err(invoke(["mlff", verb, *given, "--precision", "bf16", "-o", tmp_path / "r"]))
    assert "'precision'" in line and "'fp32' or 'fp64'" in line and not (tmp_path / "r").exists()
    monkeypatch.setenv("TUB_PRECISION", "fp16")
    assert "from TUB_PRECISION" in _err(invoke(["config", "mlff", verb]))


def test_verbs_without_a_model_say_that_precision_changes_nothing(tmp_path):
    r = _ok(invoke(["mlff", "build", "--n", "3", "--x", "1", "--precision", "fp64", "-o", tmp_path / "b"]))
    assert "tub mlff build runs no model: --precision fp64 changes nothing here" in r.stderr
    assert "changes nothing" not in _ok(invoke(["mlff", "build", "--n", "3", "--x", "1", "-o", tmp_path / "b2"])).stderr


def test_the_voltage_figure_caveats_follow_the_runs_warnings():
    from tub_mlff.cli import _ocv_caveats

    said = _ocv_caveats({"na_cohesive_energy_eV": 0.002, "mu_na_choice": "minimum", "mu_na_lattice_A": 5.40,
                         "relaxations_unconverged": 2}, 5)
    assert len(said) == 3 and "not against Na metal" in said[0] and "a = 5.40 Å (experiment 4.23 Å)" in said[1]
    assert said[2].startswith("2 of 5 relaxations")
    assert _ocv_caveats({"na_cohesive_energy_eV": 1.0, "mu_na_choice": "minimum", "mu_na_lattice_A": 4.3}, 5) == []
