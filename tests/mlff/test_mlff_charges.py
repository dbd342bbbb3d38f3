"""Atomic charges and dipoles: read from extxyz, trained as loss terms, reported by evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read, write
from tubcli.testing import expect_ok, expect_one_line_error, invoke

from tub_mlff.data import Keys, collate, to_graph
from tub_mlff.evaluation import error_metrics, predict
from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
from tub_mlff.training import TrainSettings, batch_loss


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=1, use_d4_dispersion=False)
    m = SpookyNet(cfg, seed=seed).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def _labelled(model, shift_q=0.0, shift_mu=(0.0, 0.0, 0.0)):
    """Molecules labelled by ``model`` itself, charges and dipoles shifted by known amounts."""
    frames = [molecule(name) for name in ("H2O", "NH3", "CH4", "CH3OH")]
    graphs = [to_graph(a, 1e4, labelled=False) for a in frames]
    out = predict([model], graphs, torch.float64)
    for a, e, f, q, mu in zip(frames, out["energy"], out["forces"], out["charges"], out["dipole"]):
        a.info["energy"], a.arrays["forces"] = float(e), f
        a.arrays["ref_charges"] = q + shift_q
        a.info["dipole"] = mu + np.asarray(shift_mu)
    return frames


def test_evaluate_reports_charge_and_dipole_errors_and_the_energy_terms():
    model = _model()
    frames = _labelled(model, shift_q=0.1, shift_mu=(0.3, 0.0, -0.6))
    graphs = [to_graph(a, 1e4, Keys()) for a in frames]
    preds = predict([model], graphs, torch.float64)
    m = error_metrics(graphs, preds)
    assert m["charges_mae_e"] == pytest.approx(0.1, abs=1e-9)
    assert m["dipole_mae_eA"] == pytest.approx(0.3, abs=1e-9)
    assert m["energy_mae_meV_atom"] < 1e-6 and m["forces_mae_meV_A"] < 1e-6
    n = np.array([len(a) for a in frames])
    assert sum(m["energy_terms_meV_atom"].values()) == pytest.approx(1000 * np.mean(preds["energy"] / n), rel=1e-9)
    assert m["energy_terms_meV_atom"]["coulomb"] != 0.0 and m["energy_terms_meV_atom"]["zbl"] > 0.0


@pytest.mark.parametrize("term", ["charges", "dipole"])
def test_charge_and_dipole_losses_train_the_charges(term):
    teacher, student = _model(seed=0), _model(seed=1)
    frames = _labelled(teacher)
    batch = collate([to_graph(a, 1e4, Keys()) for a in frames], torch.float64)
    s = TrainSettings(energy_weight=0.0, forces_weight=0.0, **{f"{term}_weight": 1.0})
    loss, parts = batch_loss(student, batch, s, create_graph=False)
    key = "q_mae" if term == "charges" else "mu_mae"
    out = student(batch["Z"], batch["Q"], batch["S"], batch["R"], batch["idx_i"], batch["idx_j"],
                  batch_seg=batch["batch_seg"], num_batch=batch["num_batch"])
    ref = batch["charges"] if term == "charges" else batch["dipole"]
    pred = out["charges"] if term == "charges" else torch.zeros_like(ref).index_add_(
        0, batch["batch_seg"], out["charges"].unsqueeze(-1) * batch["R"])
    assert loss.item() == pytest.approx(((pred - ref) ** 2).mean().item(), rel=1e-9)
    first = parts[key]
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss, parts = batch_loss(student, batch, s)
        loss.backward()
        opt.step()
    assert parts[key] < 0.3 * first


def test_train_with_charge_weight_needs_reference_charges(tmp_path):
    frames = _labelled(_model())
    for a in frames:
        del a.arrays["ref_charges"]
    path = tmp_path / "mols.extxyz"
    moved = [a.copy() for a in frames]  # translated copies: other frames (the split keeps repeats out of
    for a in moved:                     # valid/test), the same labels (energies and forces do not change)
        a.positions += [0.37, 0.0, 0.0]
    write(path, frames + moved)
    line = expect_one_line_error(invoke(["mlff", "train", path, "--set", "charges_weight=1", "-o", tmp_path / "t",
                                         "--epochs", "1", "--set", "model.num_features=8"]))
    assert "ref_charges" in line
    r = expect_ok(invoke(["mlff", "train", path, "--set", "dipole_weight=1", "--epochs", "1", "--batch-size", "4",
                          "--set", "model.num_features=8", "--set", "model.num_modules=1",
                          "--set", "model.num_basis_functions=4", "-o", tmp_path / "t2", "--json"]))
    assert json.loads(r.stdout)["test"]["dipole_mae_eA"] >= 0.0


def test_explain_warns_when_the_model_never_learned_charges(tmp_path):
    """The shipped demo model was trained on energies and forces only: `explain` says its charges are
    uncalibrated; the same weights with a training config that fitted charges get no warning."""
    import shutil

    from tub_mlff.cli import DEMO_MODEL
    from tub_mlff.structures import add_sodium, janus_graphene

    atoms = add_sodium(janus_graphene(3, 1, stacking="gallery", interlayer=9.0), 1, "random", seed=0)
    write(tmp_path / "s.extxyz", atoms)
    r = expect_ok(invoke(["mlff", "explain", tmp_path / "s.extxyz", "-o", tmp_path / "e1"]))
    assert "learned no charges" in r.stderr
    shutil.copy(DEMO_MODEL, tmp_path / "m.safetensors")
    meta = json.loads(DEMO_MODEL.with_suffix(".json").read_text())
    meta["train_config"]["charges_weight"] = 1.0
    (tmp_path / "m.json").write_text(json.dumps(meta))
    r = expect_ok(invoke(["mlff", "explain", tmp_path / "s.extxyz", "--model", tmp_path / "m.safetensors",
                          "-o", tmp_path / "e2"]))
    assert "learned no charges" not in r.stderr


def test_explain_takes_the_spin_with_the_charge(tmp_path):
    """A built cell records its spin: another --set charge needs --set spin (as md has), and the
    charge and spin used are written with the explained frame."""
    from tub_mlff.structures import add_sodium, janus_graphene

    atoms = add_sodium(janus_graphene(3, 1, stacking="gallery", interlayer=9.0), 1, "random", seed=0)
    atoms.info["spin"] = float(atoms.numbers.sum() % 2)  # as build records it
    write(tmp_path / "s.extxyz", atoms)
    r = invoke(["mlff", "explain", tmp_path / "s.extxyz", "--set", "charge=1", "--set", "attention=false",
                "-o", tmp_path / "e1"])
    assert r.exit_code == 2 and "impossible" in r.stderr
    spin = float((atoms.numbers.sum() - 1) % 2)
    expect_ok(invoke(["mlff", "explain", tmp_path / "s.extxyz", "--set", "charge=1", "--set", f"spin={spin:g}",
                      "--set", "attention=false", "-o", tmp_path / "e2", "-q"]))
    out = read(tmp_path / "e2" / "outputs" / "explained.extxyz")
    assert (out.info["mlff_charge"], out.info["mlff_spin"]) == (1.0, spin)
    assert out.arrays["mlff_charges"].sum() == pytest.approx(1.0, abs=1e-4)
