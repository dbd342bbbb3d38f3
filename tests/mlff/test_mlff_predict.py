"""`tub mlff predict`: the model's energies, forces, stress and charges of unlabelled structures, equal to
what the ASE calculator gives for the same structures, beside (never over) a file's own labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read, write

from tubcli.testing import expect_error_line, invoke
from tub_mlff import DEMO_MODEL
from tub_mlff.calculator import SpookyNetCalculator


def test_predictions_equal_the_calculator_for_molecules_and_cells(cell, tmp_path):
    ch4, nh3 = molecule("CH4"), molecule("NH3")
    nh3.rattle(0.05, seed=1)
    # exact Td symmetry ties the largest attention key over the four H, and which one wins is rounding (the
    # README's nonlocal-attention caveat): forces then differ by 1e-3 eV/A between two evaluation orders
    ch4.rattle(0.05, seed=2)
    write(tmp_path / "mixed.extxyz", [ch4, cell, nh3])
    res = invoke(["mlff", "predict", tmp_path / "mixed.extxyz", "--precision", "fp64", "-o", tmp_path / "p"])
    assert res.exit_code == 0, res.stderr
    got = read(tmp_path / "p" / "outputs" / "mixed.extxyz", ":")
    rows = (tmp_path / "p" / "outputs" / "mixed.csv").read_text().splitlines()
    assert rows[0].startswith("frame,formula,n_atoms,energy_eV") and len(rows) == 4
    for k, (ref, out) in enumerate(zip(read(tmp_path / "mixed.extxyz", ":"), got)):  # positions as stored
        ref.calc = SpookyNetCalculator(str(DEMO_MODEL), dtype=torch.float64)
        assert out.info["mlff_energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-6)
        assert np.allclose(out.arrays["mlff_forces"], ref.get_forces(), atol=1e-6)
        assert float(rows[k + 1].split(",")[3]) == pytest.approx(ref.get_potential_energy(), abs=1e-5)
        if ref.pbc.any():
            assert np.allclose(out.info["mlff_stress"], ref.get_stress(), atol=1e-7)
            assert "mlff_dipole" not in out.info
        else:
            assert "mlff_stress" not in out.info and out.info["mlff_dipole"].shape == (3,)
        assert out.arrays["mlff_charges"].sum() == pytest.approx(0.0, abs=1e-5)  # the total charge
        assert np.array_equal(out.positions, ref.positions)


def test_a_labelled_file_keeps_its_labels_and_a_committee_gives_its_spread(tmp_path, tiny_model):
    a = molecule("CH4")
    a.info["energy"] = -1.5
    a.arrays["forces"] = np.ones((5, 3))
    data = tmp_path / "lab.extxyz"
    write(data, a)
    before = data.read_bytes()
    m0, m1 = tiny_model(tmp_path / "m0"), DEMO_MODEL
    res = invoke(["mlff", "predict", data, "--model", m0, "--model", m1, "--prefix", "pred_", "-o", tmp_path / "p"])
    assert res.exit_code == 0, res.stderr
    out = read(tmp_path / "p" / "outputs" / "lab.extxyz")
    assert out.get_potential_energy() == -1.5 and np.array_equal(out.get_forces(), np.ones((5, 3)))
    assert out.info["pred_energy_std"] > 0 and "pred_energy" in out.info and data.read_bytes() == before
    again = invoke(["mlff", "predict", data, "--model", m0, "--model", m1, "--prefix", "pred_", "-o", tmp_path / "p",
                    "--json"])  # all done (by this job or others): the totals are the outputs', not this job's
    assert json.loads(again.stdout)["frames"] == 1 and json.loads(again.stdout)["frames_now"] == 0
    expect_error_line(invoke(["mlff", "predict", data, "--prefix", "1bad", "-o", tmp_path / "q"]), "prefix")


def test_structures_the_model_cannot_take_are_one_line_errors(tmp_path):
    write(tmp_path / "fe.extxyz", molecule("CH4"))
    (tmp_path / "b").mkdir()
    write(tmp_path / "b" / "fe.xyz", molecule("NH3"))
    expect_error_line(invoke(["mlff", "predict", tmp_path / "fe.extxyz", tmp_path / "b" / "fe.xyz", "-o",
                              tmp_path / "p"]), "two inputs would both write fe.extxyz")
    o2 = molecule("O2")
    write(tmp_path / "o2.extxyz", o2)
    res = invoke(["mlff", "predict", tmp_path / "o2.extxyz", "-o", tmp_path / "p2"])
    assert res.exit_code == 1 and "contains O, which the model was not trained on" in res.stderr
    assert not (tmp_path / "p2" / "outputs" / "o2.extxyz").exists()


def test_a_poscar_gets_an_output_ase_reads_and_untrained_charges_are_named(tmp_path):
    """'POSCAR.extxyz' is read by ase.io.read as a VASP file (its glob *POSCAR*); the demo model never saw a
    charged frame, which the calculator says and predict did not."""
    ion = molecule("NH3")
    ion.info["charge"] = 1
    ion.info["spin"] = 1
    cell = molecule("CH4")
    cell.cell, cell.pbc = [8, 8, 8], True
    write(tmp_path / "POSCAR", cell, format="vasp")
    write(tmp_path / "ion.extxyz", ion)
    res = invoke(["mlff", "predict", tmp_path / "POSCAR", tmp_path / "ion.extxyz", "-o", tmp_path / "p"])
    assert res.exit_code == 0, res.stderr
    assert len(read(tmp_path / "p" / "outputs" / "poscar.extxyz", ":")) == 1  # plain ase.io.read
    assert "total charge 1, the model was trained on total charge 0 only" in res.stderr
