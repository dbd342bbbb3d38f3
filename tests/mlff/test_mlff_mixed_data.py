"""Data sets as users bring them: cells and molecules mixed, stress on some frames only, a separate
validation file, a committee resumed after a kill, the README's train command on periodic cells, and
the calculator's default spin. Tiny random models label tiny structures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.io import read, write
from tubcli.testing import expect_ok as _ok, expect_one_line_error as _err, invoke

from tub_mlff import training
from tub_mlff.calculator import SpookyNetCalculator
from tub_mlff.checkpoints import save_model
from tub_mlff.data import Keys, collate, split_indices, to_graph
from tub_mlff.evaluation import error_metrics, predict
from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
from tub_mlff.structures import spin_for
from tub_mlff.training import TrainSettings, batch_loss

SMALL = ["--set", "model.num_features=8", "--set", "model.num_modules=1", "--set", "model.num_basis_functions=4",
         "--batch-size", "4", "-q"]
NO_COULOMB = ["--set", "model.electrostatics=false"]


def _model(**kw) -> SpookyNet:
    torch.manual_seed(0)
    m = SpookyNet(SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=1, **kw), seed=0)
    with torch.no_grad():  # random but not trivial (spin and charge embeddings matter)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 rattled, strained 4-atom bcc Na cells (energy, forces, stress) and 6 rattled CH4 (energy,
    forces) labelled by a small random model in float64; files cells, molecules, mixed."""
    d = tmp_path_factory.mktemp("mixed")
    teacher = _model(use_electrostatics=False, use_d4_dispersion=False)
    save_model(teacher, d / "teacher", extra={"elements": [1, 6, 11]})
    calc = SpookyNetCalculator(teacher, dtype=torch.float64)
    cells, mols = [], []
    for k in range(8):
        a = bulk("Na", "bcc", a=4.23, cubic=True).repeat((2, 1, 1))
        a.set_cell(a.cell * (1 + 0.02 * (k - 4) / 4), scale_atoms=True)
        a.rattle(0.08, seed=k)
        cells.append(a)
    for k in range(6):
        a = molecule("CH4")
        a.rattle(0.05, seed=k)
        mols.append(a)
    for a in cells + mols:
        a.calc = calc
        e, f = a.get_potential_energy(), a.get_forces()
        s = a.get_stress(voigt=False) if a.pbc.any() else None
        a.calc = None
        a.info["energy"], a.arrays["forces"] = e, f
        if s is not None:
            a.info["stress"] = s
    write(d / "cells.extxyz", cells, format="extxyz")
    write(d / "molecules.extxyz", mols, format="extxyz")
    write(d / "mixed.extxyz", [x for pair in zip(cells, mols) for x in pair] + cells[6:], format="extxyz")
    return d


def _run(args) -> dict:
    return json.loads(_ok(invoke(["mlff", *map(str, args), "--json"])).stdout)


# -- 1. --valid FILE replaces the validation share ----------------------------------------------------
def test_valid_file_takes_no_validation_frames_from_the_training_file(tmp_path, data):
    tr, va, te = split_indices(24, 0.0, 0.1, 0)
    assert (len(tr), len(va), len(te)) == (22, 0, 2)
    assert len(split_indices(24, 0.1, 0.1, 0)[1]) == 2 and len(split_indices(5, 0.01, 0.0, 0)[1]) == 1
    cells = data / "cells.extxyz"
    r = _run(["train", cells, "--valid", cells, "--epochs", "1", *SMALL, *NO_COULOMB, "-o", tmp_path / "t"])
    assert (r["train_frames"], r["valid_frames"], r["test_frames"]) == (7, 8, 1)  # 8 frames, test 10 %: 1


# -- 2. a committee resumed after a kill is scored whole ----------------------------------------------
class _Killed(Exception):
    pass


def test_resumed_committee_reports_the_whole_committee(tmp_path, data, monkeypatch):
    args = ["train", data / "cells.extxyz", "--epochs", "2", "--ensemble", "2", "--set", "test_fraction=0.25",
            *SMALL, *NO_COULOMB]
    whole = _run([*args, "-o", tmp_path / "whole"])
    real_fit = training.fit

    def killed_in_member_1(*a, **kw):
        if kw.get("member") == 1:
            kw["on_epoch"] = lambda epoch, metrics: (_ for _ in ()).throw(_Killed())
        return real_fit(*a, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(training, "fit", killed_in_member_1)
        r = invoke(["mlff", *map(str, args), "-o", tmp_path / "killed", "-q"], catch_exceptions=True)
    assert r.exit_code != 0 and not (tmp_path / "killed" / "checkpoints" / "model_1.safetensors").exists()
    resumed = _run([*args, "-o", tmp_path / "killed", "--resume", "auto"])
    assert resumed["members"] == 2
    for key in ("energy_mae_meV_atom", "forces_mae_meV_A", "stress_mae_meV_A3"):
        assert resumed["test"][key] == pytest.approx(whole["test"][key], rel=1e-6), key


# -- 3. stress on some frames only ----------------------------------------------------------------------
def test_evaluate_reports_stress_rmse_beside_the_mae(tmp_path, data):
    """Labels off by exactly +1 (xx) and -2 (yy) meV/A^3: MAE (1 + 2) / 9, RMSE sqrt((1 + 4) / 9) over 3x3."""
    frames = read(data / "cells.extxyz", ":")
    for a in frames:
        a.calc.results["stress"] = a.calc.results["stress"] + np.array([1e-3, -2e-3, 0, 0, 0, 0])
    write(tmp_path / "off.extxyz", frames, format="extxyz")
    args = ["mlff", "evaluate", tmp_path / "off.extxyz", "--model", data / "teacher.safetensors", "--precision",
            "fp64", "--set", "plots=false"]
    m = json.loads(_ok(invoke([*args, "-o", tmp_path / "ev", "--json"])).stdout)
    assert m["stress_mae_meV_A3"] == pytest.approx(3 / 9, abs=1e-6)
    assert m["stress_rmse_meV_A3"] == pytest.approx(np.sqrt(5 / 9), abs=1e-6)
    table = _ok(invoke([*args, "-o", tmp_path / "ev2"])).stdout
    assert any(ln.split()[:1] == ["stress_rmse_meV_A3"] for ln in table.splitlines())


def test_stress_is_trained_and_scored_on_the_frames_that_have_it(tmp_path, data):
    frames = read(data / "cells.extxyz", ":")
    frames[3].calc.results.pop("stress")  # ase reads energy/forces/stress into a SinglePointCalculator
    partial = tmp_path / "partial.extxyz"
    write(partial, frames, format="extxyz")
    graphs = [to_graph(a, 5.0, Keys()) for a in frames[:4]]
    batch = collate(graphs)
    assert batch["stress"].shape == (3, 3, 3) and batch["stress_index"].tolist() == [0, 1, 2]
    model = _model(use_electrostatics=False, use_d4_dispersion=False)
    _, parts = batch_loss(model, batch, TrainSettings(stress_weight=1.0))
    assert parts["s_mae"] > 0

    teacher = data / "teacher.safetensors"
    r = invoke(["mlff", "evaluate", partial, "--model", teacher, "-o", tmp_path / "ev", "--json"])
    m = json.loads(_ok(r).stdout)
    assert m["stress_frames"] == 7 and m["stress_mae_meV_A3"] < 1e-3  # the teacher scores itself
    assert "1 of 8 periodic frames have no stress" in r.stderr
    assert (tmp_path / "ev" / "outputs" / "parity_stress.png").exists()
    pred = json.loads((tmp_path / "ev" / "outputs" / "predictions.json").read_text())
    assert len(pred["forces"]) == 8 and np.shape(pred["forces"][0]) == (4, 3) and len(pred["stress"][0]) == 6
    assert np.allclose(pred["stress"][0], frames[0].get_stress(), atol=1e-6)
    # the same -o on molecules (no stress): the stress parity plot of the first run does not stay beside its results
    m = json.loads(_ok(invoke(["mlff", "evaluate", data / "molecules.extxyz", "--model", teacher, "-o", tmp_path / "ev",
                               "--json"])).stdout)
    assert "stress_mae_meV_A3" not in m and not (tmp_path / "ev" / "outputs" / "parity_stress.png").exists()
    assert (tmp_path / "ev" / "outputs" / "parity_energy.png").exists()

    r = invoke(["mlff", "train", partial, "--epochs", "1", "--set", "stress_weight=10", *SMALL, *NO_COULOMB,
                "-o", tmp_path / "tp"])
    assert "periodic frames have no stress" in _ok(r).stderr
    line = _err(invoke(["mlff", "train", data / "molecules.extxyz", "--epochs", "1", "--set", "stress_weight=10",
                        *SMALL, *NO_COULOMB, "-o", tmp_path / "tm"]))
    assert "stress_weight > 0" in line and "keys.stress" in line


# -- 4. cells and molecules in one data set -----------------------------------------------------------
def test_a_mixed_batch_predicts_what_each_structure_alone_does(data):
    frames = read(data / "mixed.extxyz", ":")
    model = _model(use_electrostatics=True, use_d4_dispersion=False, lr_cutoff=6.0).double()
    graphs = [to_graph(a, 6.0, Keys()) for a in frames]
    together = predict([model], graphs, torch.float64, batch_size=16)
    alone = predict([model], graphs, torch.float64, batch_size=1)
    assert np.allclose(together["energy"], alone["energy"], rtol=0, atol=1e-10)
    assert all(np.allclose(a, b, atol=1e-10) for a, b in zip(together["forces"], alone["forces"]))
    periodic = [g.cell is not None for g in graphs]
    assert np.isnan(together["stress"][~np.array(periodic)]).all()
    assert np.allclose(together["stress"][periodic], alone["stress"][periodic], atol=1e-12)
    assert error_metrics(graphs, together)["stress_frames"] == sum(periodic)


def test_train_and_evaluate_mix_cells_and_molecules(tmp_path, data):
    mixed = data / "mixed.extxyz"
    r = _run(["train", mixed, "--epochs", "1", "--set", "stress_weight=1", *SMALL, *NO_COULOMB, "-o", tmp_path / "t"])
    assert r["train_frames"] + r["valid_frames"] + r["test_frames"] == 14
    m = _run(["evaluate", mixed, "--model", data / "teacher.safetensors", "-o", tmp_path / "ev"])
    assert m["frames"] == 14 and m["stress_frames"] == 8 and m["energy_mae_meV_atom"] < 1e-3


# -- 5. the README's train command on periodic cells ----------------------------------------------------
def test_train_on_cells_with_coulomb_defaults_lr_cutoff_as_the_calculator(tmp_path, data):
    r = invoke(["mlff", "train", data / "cells.extxyz", "--epochs", "1", "--ensemble", "2", *SMALL,
                "-o", tmp_path / "t"])
    assert "lr_cutoff=10" in _ok(r).stderr
    meta = json.loads((tmp_path / "t" / "checkpoints" / "model_1.json").read_text())
    assert meta["spookynet"]["lr_cutoff"] == 10.0 and meta["spookynet"]["use_electrostatics"]


# -- 6. the calculator's default spin -----------------------------------------------------------------
def test_calculator_default_spin_follows_the_electron_count(data):
    model = _model(use_electrostatics=False, use_d4_dispersion=False)
    radical = molecule("CH3")  # 9 electrons: a doublet at least
    assert spin_for(radical) == 1

    def energy(**kw):
        a = radical.copy()
        a.calc = SpookyNetCalculator(model, dtype=torch.float64, **kw)
        return a.get_potential_energy()

    assert energy() == pytest.approx(energy(spin=1), abs=1e-12)
    assert abs(energy() - energy(spin=3)) > 1e-6  # an explicit spin still counts (a quartet)
    assert energy(charge=1) == pytest.approx(energy(charge=1, spin=0), abs=1e-12)  # CH3+: 8 electrons


# -- small: attention maps are named per module ----------------------------------------------------------
def test_explain_names_the_attention_maps(tmp_path, data):
    one = tmp_path / "one.extxyz"
    write(one, read(data / "molecules.extxyz", "0"), format="extxyz")
    _ok(invoke(["mlff", "explain", one, "--model", data / "teacher.safetensors", "-o", tmp_path / "x", "-q"]))
    with np.load(tmp_path / "x" / "outputs" / "attention_0000.npz") as z:
        assert sorted(z.files) == ["module_1"] and z["module_1"].shape == (5, 5)


# -- 7. per-element energies that the data cannot determine ------------------------------------------
def test_dependent_element_counts_finds_a_fixed_stoichiometry():
    """Frames of one host stoichiometry (plus a varying Na count and pure Na) fix H:C:N, so E0 of H, C
    and N is not identifiable; a second host ratio frees C but H:N stays 6:1 (every group has NH2 + 4 H)."""
    from ase.data import atomic_numbers

    from tub_mlff.data import Graph, composition_span, dependent_element_counts, outside_composition_span

    def frames(*counts):
        Zs = [np.repeat([atomic_numbers[s] for s in c], list(c.values())) for c in counts]
        return [Graph(Z, np.zeros((len(Z), 3)), None, None, None, None, 0, 0, energy=0.0) for Z in Zs]

    host = [dict(H=6, C=24, N=1, Na=x) for x in range(4)] + [dict(Na=16)]
    assert dependent_element_counts(frames(*host)) == "H6 C24 N1"
    assert dependent_element_counts(frames(*host, dict(H=6, C=38, N=1), dict(H=12, C=44, N=2))) == "H12 N2"
    assert dependent_element_counts(frames(dict(H=2, O=1), dict(H=2), dict(O=2))) is None
    assert dependent_element_counts(frames(dict(Na=2), dict(Na=4))) is None
    span = composition_span(frames(*host))  # what train keeps in model.json
    inside = [dict(H=6, C=24, N=1, Na=7), dict(H=12, C=48, N=2, Na=1), dict(Na=3)]
    outside = [dict(H=6, C=38, N=1), dict(H=12, C=44, N=2, Na=2), dict(H=6, C=24, N=2)]
    for c in inside + outside:
        Z = np.repeat([atomic_numbers[s] for s in c], list(c.values()))
        assert outside_composition_span(Z, span) is (c in outside), c


def test_train_warns_when_the_data_fix_an_element_ratio(tmp_path, data):
    r = _ok(invoke(["mlff", "train", data / "molecules.extxyz", "--epochs", "1", *SMALL, *NO_COULOMB,
                    "-o", tmp_path / "m"]))
    assert "element counts (H4 C1) are linearly dependent" in r.stderr
    r = _ok(invoke(["mlff", "train", data / "cells.extxyz", "--epochs", "1", *SMALL, *NO_COULOMB,
                    "-o", tmp_path / "c"]))
    assert "linearly dependent" not in r.stderr
    meta = json.loads((tmp_path / "c" / "checkpoints" / "model.json").read_text())
    assert meta["composition_span"] == {"elements": [11], "basis": [[1.0]]}
    assert meta["trained_charges"] == [0]  # the calculator warns at another charge (see test_mlff_spookynet)


def test_fine_tuning_corrects_the_element_bias_by_the_shift_of_the_new_labels():
    """--init-from keeps the model's element bias and adds the least-squares correction: labels that
    are the model's own energies shifted per element (+0.5 eV per H, -1.0 eV per C) give exactly that
    shift, and elements absent from the data keep theirs; a new model's fit (keep=False) replaces
    the whole bias instead."""
    model = _model(use_electrostatics=False, use_d4_dispersion=False).double()
    calc = SpookyNetCalculator(model, dtype=torch.float64)
    frames = []
    for k, name in enumerate(["CH4", "C2H6", "C2H4", "C2H2", "C6H6", "CH4"]):
        a = molecule(name)
        a.rattle(0.05, seed=k)
        a.calc = calc
        e = a.get_potential_energy() + 0.5 * (a.numbers == 1).sum() - 1.0 * (a.numbers == 6).sum()
        a.calc = None
        a.info["energy"] = e
        frames.append(to_graph(a, model.config.cutoff, need_forces=False))
    before = model.element_bias[:, 0].clone()
    training.init_element_bias(model, frames, torch.float64, keep=True)
    delta = (model.element_bias[:, 0] - before).detach().numpy()
    assert delta[1] == pytest.approx(0.5, abs=1e-8) and delta[6] == pytest.approx(-1.0, abs=1e-8)
    assert np.abs(np.delete(delta, [1, 6])).max() == 0.0  # Na, absent from the data, keeps its bias
    assert before[11].item() != 0.0
    training.init_element_bias(model, frames, torch.float64, keep=False)  # a new model: bias replaced
    assert model.element_bias[1, 0].item() == pytest.approx(before[1].item() + 0.5, abs=1e-8)
    assert model.element_bias[11, 0].item() == 0.0


# -- 8. training-workflow QA: elements of the training split, schedules, committees --------------------
def _with_traj(data, tmp_path, labels) -> Path:
    frames = read(data / "mixed.extxyz", ":")
    for a in frames:
        a.info["traj"] = labels(a)
    path = tmp_path / "traj.extxyz"
    write(path, frames, format="extxyz")
    return path


def test_elements_are_those_of_the_training_frames(tmp_path, data):
    """A split by trajectory that sends every CH4 frame to valid/test left H and C untrained, yet model.json
    listed them, so evaluate and md ran on them without a word."""
    path = _with_traj(data, tmp_path, lambda a: "ch4" if "C" in a.get_chemical_symbols() else f"na{len(a) % 2}")
    frames = read(path, ":")
    groups = [a.info["traj"] for a in frames]
    seed = next(s for s in range(100) if all("C" not in frames[i].get_chemical_symbols()
                                             for i in split_indices(len(frames), 0.2, 0.3, s, groups)[0]))
    r = invoke(["mlff", "train", path, "--epochs", "1", "--seed", str(seed), "--set", "test_fraction=0.3", *SMALL,
                *NO_COULOMB, "-o", tmp_path / "t"])
    assert r.exit_code == 0, r.stderr
    assert "H, C appear only in the validation/test frames" in r.stderr or \
        "C, H appear only in the validation/test frames" in r.stderr
    assert json.loads((tmp_path / "t" / "checkpoints" / "model.json").read_text())["elements"] == [11]


def test_two_trajectories_are_named_as_too_few_groups(tmp_path, data):
    path = _with_traj(data, tmp_path, lambda a: "ch4" if "C" in a.get_chemical_symbols() else "na")
    r = invoke(["mlff", "train", path, "--epochs", "1", *SMALL, *NO_COULOMB, "-o", tmp_path / "t"])
    assert r.exit_code == 0, r.stderr
    assert "only 2 group(s) in info['traj']" in r.stderr


def test_cosine_schedule_extended_by_a_resume_anneals_to_the_new_end(tmp_path, data):
    args = ["train", data / "cells.extxyz", "--set", "lr_schedule=cosine", *SMALL, *NO_COULOMB]
    _ok(invoke(["mlff", *map(str, args), "--epochs", "8", "-o", tmp_path / "long"]))
    _ok(invoke(["mlff", *map(str, args), "--epochs", "4", "-o", tmp_path / "ext"]))
    _ok(invoke(["mlff", *map(str, args), "--epochs", "8", "-o", tmp_path / "ext", "--resume", "auto"]))

    def lrs(run):
        return [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]

    long, ext = lrs(tmp_path / "long"), lrs(tmp_path / "ext")
    assert len(long) == len(ext) == 8
    assert ext[4:] == pytest.approx(long[4:], rel=1e-9)  # not restarted: ends at min_lr like the 8-epoch run
    assert ext[-1] < ext[3] * 5  # the old restart climbed back to the full rate (1e-3 from 1e-5)


@pytest.mark.parametrize("setting, needle", [("lr_factor=2", "lr_factor"), ("lr_patience=-1", "lr_patience"),
                                              ("min_lr=-1", "min_lr")])
def test_schedule_settings_are_checked(tmp_path, data, setting, needle):
    line = _err(invoke(["mlff", "train", data / "cells.extxyz", "--set", setting, *SMALL, "-o", tmp_path / "t"]))
    assert needle in line
    line = _err(invoke(["mlff", "train", data / "cells.extxyz", "--set", "lr_schedule=cosine", "--set", "min_lr=0.1",
                        *SMALL, "-o", tmp_path / "c"]))
    assert "would raise the learning rate" in line


def test_a_committee_fine_tuned_from_one_model_is_warned_about(tmp_path, data):
    _ok(invoke(["mlff", "train", data / "cells.extxyz", "--epochs", "1", *SMALL, *NO_COULOMB, "-o", tmp_path / "m"]))
    r = invoke(["mlff", "train", data / "cells.extxyz", "--epochs", "1", "--ensemble", "2", "--init-from",
                tmp_path / "m", "--batch-size", "4", "-o", tmp_path / "ft"])
    assert r.exit_code == 0, r.stderr
    assert "spread (the MD uncertainty) will be near zero" in r.stderr


def test_a_finished_committee_is_not_extended_member_by_member(tmp_path, data):
    """--resume auto with more --epochs extended only the last member; the first kept its weights."""
    args = ["mlff", "train", data / "cells.extxyz", "--ensemble", "2", *SMALL, *NO_COULOMB, "-o", tmp_path / "c"]
    _ok(invoke([*args, "--epochs", "2"]))
    line = _err(invoke([*args, "--epochs", "4", "--resume", "auto"]))
    assert "only the last would train on" in line
