"""Where frames and models come from: a training resumed on edited data is refused, MD frames carry the
name of their run (so that a split by trajectory keeps a run's correlated frames together once they are
labelled), and evaluate says so when the test file is the model's own training file. Tiny models."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.io import read, write
from tubcli.testing import expect_ok as _ok, expect_one_line_error as _err, invoke

from tub_mlff.calculator import SpookyNetCalculator
from tub_mlff.cli import _split_groups
from tub_mlff.data import split_indices

SMALL = ["--set", "model.num_features=8", "--set", "model.num_modules=1", "--set", "model.num_basis_functions=4",
         "--set", "model.electrostatics=false", "--batch-size", "2", "--set", "valid_fraction=0.2",
         "--set", "test_fraction=0"]
DEMO = Path(__file__).parents[2] / "plugins/tub-mlff/tub_mlff/models/demo_nacnh.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """A random tiny model, six CH4 frames it labelled (and six others), and a rattled bcc Na cell."""
    d = tmp_path_factory.mktemp("prov")
    tiny_model(d / "tiny")
    calc = SpookyNetCalculator(str(d / "tiny.safetensors"), dtype=torch.float64)
    for name, seeds in (("ch4.extxyz", range(6)), ("other.extxyz", range(10, 16))):
        frames = []
        for k in seeds:
            a = molecule("CH4")
            a.rattle(0.05, seed=k)
            a.calc = calc
            e, f = a.get_potential_energy(), a.get_forces()
            a.calc = None
            a.info["energy"], a.arrays["forces"] = e, f
            frames.append(a)
        write(d / name, frames, format="extxyz")
    na = bulk("Na", "bcc", a=4.23, cubic=True).repeat((2, 2, 1))
    na.rattle(0.05, seed=0)
    write(d / "na.extxyz", na, format="extxyz")
    return d


def _train(data, out, *extra):
    return invoke(["mlff", "train", data, *SMALL, "--epochs", "1", "-o", out, *extra])


# -- 1. a resume on edited training data is refused ------------------------------------------------
def test_train_resume_refuses_training_data_changed_since_the_checkpoint(tmp_path, setup):
    data = tmp_path / "data.extxyz"
    shutil.copy(setup / "ch4.extxyz", data)
    _ok(_train(data, tmp_path / "run"))
    shutil.copy(setup / "other.extxyz", data)  # the user replaced the file: same name, same settings
    line = _err(_train(data, tmp_path / "run", "--epochs", "2", "--resume", "auto", "-q"))
    assert "data.extxyz changed since the checkpoint" in line and "new -o" in line and "--overwrite" in line
    _ok(_train(data, tmp_path / "fresh"))  # in a new -o the edited data train as usual


def test_train_resume_of_a_checkpoint_without_the_fingerprint_goes_on(tmp_path, setup):
    data = tmp_path / "data.extxyz"
    shutil.copy(setup / "ch4.extxyz", data)
    _ok(_train(data, tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert {d["role"] for d in state.pop("training_data")} == {"train"}
    torch.save(state, last)  # as written before checkpoints kept the fingerprint
    _ok(_train(data, tmp_path / "run", "--epochs", "2", "--resume", "auto"))


# -- 2. MD frames carry their run's name, which train's split groups by ----------------------------
def _md(setup, out, seed, steps):
    return _ok(invoke(["mlff", "md", setup / "na.extxyz", "--model", setup / "tiny.safetensors", "--steps", str(steps),
                       "--interval", "5", "--timestep", "1", "--temp", "300", "--seed", str(seed), "-o", out]))


def test_md_frames_name_their_run_so_a_split_keeps_each_run_together(tmp_path, setup):
    for run, seed in (("a", 1), ("b", 2)):
        _md(setup, tmp_path / f"md_{run}", seed, 10)
    _md(setup, tmp_path / "md_a", 1, 20)  # extended (resumed): its new frames keep the run's name
    names = {}
    for run in "ab":
        frames = read(tmp_path / f"md_{run}" / "outputs" / "trajectory.extxyz", ":")
        assert len(frames) == (5 if run == "a" else 3)
        assert len({f.info["traj"] for f in frames}) == 1  # every frame, one name
        names[run] = frames[0].info["traj"]
    assert names["a"] != names["b"]
    # labelled (the label verb keeps info), then pooled as a user would for training
    labelled, run_of = [], []
    for run in "ab":
        src = tmp_path / f"md_{run}.extxyz"
        shutil.copy(tmp_path / f"md_{run}" / "outputs" / "trajectory.extxyz", src)
        _ok(invoke(["mlff", "label", src, "-o", tmp_path / f"label_{run}", "-q"]))
        frames = read(tmp_path / f"label_{run}" / "labelled.extxyz", ":")
        assert all("predicted_by" not in f.info and f.info["traj"] == names[run] for f in frames)
        labelled += frames
        run_of += [run] * len(frames)
    log = SimpleNamespace(log=logging.getLogger("test"))
    groups = _split_groups(labelled, "auto", "pooled.extxyz", log)  # what `train` splits by
    assert groups is not None and len(set(groups)) == 2
    for seed in range(5):
        parts = split_indices(len(labelled), 0.2, 0.3, seed, groups)
        for run in "ab":  # each run's frames in exactly one of train/valid/test
            members = {k for k, r in enumerate(run_of) if r == run}
            assert sum(bool(members & set(p.tolist())) for p in parts) == 1


# -- 3. evaluate on the model's own training file warns --------------------------------------------
def test_evaluate_warns_when_the_test_file_is_the_models_training_file(tmp_path, setup):
    data = tmp_path / "train.extxyz"
    shutil.copy(setup / "ch4.extxyz", data)
    _ok(_train(data, tmp_path / "run", "--set", "valid_fraction=0.2", "--set", "test_fraction=0.2"))
    model = tmp_path / "run" / "checkpoints" / "model.safetensors"
    shutil.copy(data, tmp_path / "renamed.extxyz")  # same bytes under another name
    for test in (data, tmp_path / "renamed.extxyz"):
        r = _ok(invoke(["mlff", "evaluate", test, "--model", model, "-o", tmp_path / f"ev_{test.stem}"]))
        assert "of 6 frames of" in r.stderr and "the model was trained on" in r.stderr
    # frames it was fitted on, re-written in another format, are found too (a whole-file check missed them)
    from tub_mlff.data import frame_fingerprints

    frames = read(data, ":")
    with np.load(tmp_path / "run" / "checkpoints" / "model.frames.npz") as z:
        fitted = [a for a in frames if frame_fingerprints([a])[0] in z["train"]]
        assert 0 < len(fitted) < 6 and len(z["valid"]) >= 1  # the test share is in neither
    write(tmp_path / "fitted.traj", fitted)
    r = _ok(invoke(["mlff", "evaluate", tmp_path / "fitted.traj", "--model", model, "-o", tmp_path / "ev_traj"]))
    assert f"{len(fitted)} of {len(fitted)} frames of" in r.stderr
    r = _ok(invoke(["mlff", "evaluate", setup / "other.extxyz", "--model", model, "-o", tmp_path / "ev_other"]))
    assert "the model was" not in r.stderr
    (tmp_path / "run" / "checkpoints" / "model.frames.npz").unlink()  # a model trained before the prints
    r = _ok(invoke(["mlff", "evaluate", data, "--model", model, "-o", tmp_path / "ev_old"]))
    assert "same bytes as the model's training file" in r.stderr and str(data) in r.stderr
    # models without the record (the shipped demo model) evaluate as before
    r = _ok(invoke(["mlff", "evaluate", data, "--model", DEMO, "-o", tmp_path / "ev_demo", "--json"]))
    assert "same bytes" not in r.stderr and np.isfinite(json.loads(r.stdout)["energy_mae_meV_atom"])


def test_a_split_of_frames_partly_named_by_run_warns(caplog):
    """Labelled MD frames (info['traj']) pooled with built cells (none) were split frame by frame silently."""
    from ase import Atoms

    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]) for _ in range(6)]
    for f in frames[:4]:
        f.info["traj"] = "md-run"
    log = SimpleNamespace(log=logging.getLogger("split-test"))
    with caplog.at_level(logging.WARNING, logger="split-test"):
        assert _split_groups(frames, "auto", "pooled.extxyz", log) is None
    assert "4 of 6 frames carry info['traj']" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="split-test"):
        assert _split_groups(frames, "none", "pooled.extxyz", log) is None
        assert _split_groups(frames[4:], "auto", "cells.extxyz", log) is None  # no MD frames: nothing to say
    assert caplog.text == ""


def test_frames_repeated_across_runs_stay_out_of_the_validation_and_test_shares(tmp_path, setup):
    """MD runs from one cell share their start frame: a split by run put it in train, valid and test, and
    the test errors measured the fit. Repeats of a training (or validation) frame leave the other shares."""
    from ase.io import read, write

    from tub_mlff.data import frame_fingerprints

    frames = read(setup / "ch4.extxyz", ":") + read(setup / "other.extxyz", ":")
    pooled = []
    for k in range(4):  # four "runs", each starting from the same labelled frame
        for a in [frames[0]] + frames[1 + 2 * k: 3 + 2 * k]:
            b = a.copy()
            b.info["traj"] = f"run{k}"
            b.info["energy"], b.arrays["forces"] = a.get_potential_energy(), a.get_forces()
            pooled.append(b)
    write(tmp_path / "pooled.extxyz", pooled)
    r = _ok(_train(tmp_path / "pooled.extxyz", tmp_path / "run", "--set", "valid_fraction=0.25",
                   "--set", "test_fraction=0.25"))
    assert "repeat a training or validation frame" in r.stderr
    with np.load(tmp_path / "run" / "checkpoints" / "model.frames.npz") as z:
        train, valid = set(z["train"].tolist()), set(z["valid"].tolist())
    assert not train & valid
    start = int(frame_fingerprints([frames[0]])[0])
    assert start in train and start not in valid
