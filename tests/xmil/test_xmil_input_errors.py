"""Bad input is a one-line error before work starts (or a one-line per-slide failure), never a
traceback, a crash per slide or a silently wrong result: name collisions, labels and classes, NaN,
tiling parameters, explanation targets and methods, foreign model files."""

import csv
import json
import sys

import numpy as np
import pytest
import torch

from tubcli.errors import TubError
from tubcli.testing import expect_error_line, invoke

from tub_xmil.bags import read_bag, write_features_h5
from tub_xmil.synthetic import render_slide, write_pyramid

N_SLIDES = 4


def _ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def _bag(path, seed=0, n=6, dim=8):
    rng = np.random.default_rng(seed)
    coords = np.stack([np.arange(n) * 64, np.zeros(n)], 1).astype(np.int64)
    write_features_h5(path, rng.standard_normal((n, dim)).astype(np.float32), coords,
                      {"patch_size_level0": 64, "level0_width": 64 * n, "level0_height": 64})
    return path


def _csv(path, header, rows):
    path.write_text("\n".join([header, *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def _train(tmp, feats, labels, *extra):
    return invoke(["xmil", "train", "--features", feats, "--labels", labels, "--epochs", "1",
                   "--set", "model.features_dim=8", "-o", tmp, "--json", *extra])


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    d = tmp_path_factory.mktemp("bags")
    for i in range(N_SLIDES):
        _bag(d / f"s{i}.h5", seed=i)
    return d


@pytest.fixture(scope="module")
def model(bags, tmp_path_factory):
    """A 2-class model whose labels are the strings 'neg'/'pos'."""
    d = tmp_path_factory.mktemp("model")
    labels = _csv(d / "labels.csv", "slide_id,label,split", [(f"s{i}", ["neg", "pos"][i % 2], "train")
                                                            for i in range(N_SLIDES)])
    _ok(_train(d / "run", bags, labels))
    return d / "run" / "checkpoints"


# ---------------------------------------------------------------- 1: outputs keyed by stem
def test_inputs_with_one_stem_are_an_error_before_any_work(tmp_path, bags, model):
    img, _, _ = render_slide(256, 256, False)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_pyramid(tmp_path / sub / "s.tiff", img, mpp=0.5, levels=1)
    res = invoke(["xmil", "tile", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "t"])
    expect_error_line(res, "two inputs are named 's'", "collide")
    assert not (tmp_path / "t" / "outputs" / "patches").exists()
    _bag(tmp_path / "a" / "s.h5")
    np.savez(tmp_path / "a" / "s.npz", features=np.zeros((3, 8), np.float32))
    expect_error_line(invoke(["xmil", "explain", tmp_path / "a", "--model", model, "-o", tmp_path / "e"]),
                 "two inputs are named 's'")
    # the same file named twice (folder + file) is one input, not a collision
    res = _ok(invoke(["xmil", "explain", bags, bags / "s0.h5", "--model", model, "-o", tmp_path / "e2", "--json"]))
    assert json.loads(res.stdout)["batch"]["items"] == N_SLIDES


# ---------------------------------------------------------------- 2, 3: classes
def test_train_maps_labels_through_sorted_classes(tmp_path, bags):
    labels = _csv(tmp_path / "l.csv", "slide_id,label,split", [(f"s{i}", 1 + i % 2, "train") for i in range(N_SLIDES)])
    _ok(_train(tmp_path / "r", bags, labels))  # labels 1/2 used to be class indices: IndexError
    assert json.loads((tmp_path / "r" / "checkpoints" / "model.json").read_text())["classes"] == ["1", "2"]
    one = _csv(tmp_path / "one.csv", "slide_id,label", [(f"s{i}", 1) for i in range(N_SLIDES)])
    expect_error_line(_train(tmp_path / "r1", bags, one), "at least 2 classes")


def test_evaluate_uses_the_model_classes(tmp_path, bags, model):
    from tub_xmil.checkpoint import load_model

    rows = [(f"s{i}", "pos", "test") for i in range(3)]  # a subset: only the model's class 1
    labels = _csv(tmp_path / "pos.csv", "slide_id,label,split", rows)
    res = _ok(invoke(["xmil", "evaluate", "--model", model, "--features", bags, "--labels", labels,
                      "--set", "flipping=false", "-o", tmp_path / "ev", "--json"]))
    m, _ = load_model(model)
    with torch.no_grad():
        said_pos = [int(m(read_bag(bags / f"{sid}.h5")[0][None]).argmax()) == 1 for sid, _, _ in rows]
    with open(tmp_path / "ev" / "outputs" / "predictions.csv", newline="") as f:
        written = {r["slide_id"]: (r["label"], r["predicted"]) for r in csv.DictReader(f)}
    assert written == {sid: ("pos", "pos" if p else "neg") for (sid, _, _), p in zip(rows, said_pos)}
    assert json.loads(res.stdout)["balanced_accuracy"] is None  # one class: undefined, as AUROC
    unknown = _csv(tmp_path / "u.csv", "slide_id,label,split", [("s0", "maybe", "test")])
    expect_error_line(invoke(["xmil", "evaluate", "--model", model, "--features", bags, "--labels", unknown,
                         "-o", tmp_path / "ev2"]), "'maybe' is not a class of the model", "line 2")


def test_multiclass_auroc_over_the_classes_present():
    from sklearn.metrics import roc_auc_score

    from tub_xmil.metrics import classification_metrics

    rng = np.random.default_rng(0)
    p, y = rng.dirichlet([1, 1, 1], 30), rng.integers(0, 3, 30)
    assert classification_metrics(y, p)["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    sub = y != 2  # an evaluation set without class 2 used to raise in sklearn
    assert 0 <= classification_metrics(y[sub], p[sub])["auroc"] <= 1


# ---------------------------------------------------------------- 4: NaN, empty and duplicate labels
@pytest.mark.parametrize("header,rows,task,needle", [
    ("slide_id,target", [("s0", 1.0), ("s1", "nan")], "regression", "line 3 (slide s1): target 'nan'"),
    ("slide_id,time,event", [("s0", 3, 1), ("s1", "inf", 0)], "survival", "line 3 (slide s1): time 'inf'"),
    ("slide_id,label", [("s0", 1), ("s1", "")], "classification", "line 3 (slide s1): missing label"),
    ("slide_id,label", [("s0", 1), ("s1", 0), ("s0", 0)], "classification", "'s0' is on lines 2 and 4"),
    # R's Surv coding (1 censored, 2 dead) and fractions used to train silently
    ("slide_id,time,event", [("s0", 3, 1), ("s1", 5, 2)], "survival", "line 3 (slide s1): event '2' is not 0 or 1"),
    ("slide_id,time,event", [("s0", 3, 0.7), ("s1", 5, 1)], "survival", "line 2 (slide s0): event '0.7'"),
    ("slide_id,label,split", [("s0", 1, "train"), ("s1", 0, "dev")], "classification",
     "line 3 (slide s1): unknown split 'dev'; accepted (any case): train: train, training; val: val"),
])
def test_bad_label_rows_are_one_line_errors(tmp_path, bags, header, rows, task, needle):
    labels = _csv(tmp_path / "l.csv", header, rows)
    expect_error_line(_train(tmp_path / "r", bags, labels, "--task", task), needle)


def test_labels_from_excel_with_other_header_case_and_padded_ids_train(tmp_path, bags):
    rows = [(f" s{i} ", i % 2, "Train") for i in range(N_SLIDES)]
    labels = _csv(tmp_path / "l.csv", "Slide_ID , Label,SPLIT", rows)
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())  # Excel's "CSV UTF-8" byte-order mark
    res = _ok(_train(tmp_path / "r", bags, labels))
    assert json.loads(res.stdout)["train_slides"] == N_SLIDES
    both = _csv(tmp_path / "both.csv", "slide_id,Slide_ID,label", [("s0", "s0", 0), ("s1", "s1", 1)])
    expect_error_line(_train(tmp_path / "r2", bags, both), "two columns read as 'slide_id'")
    no_id = _csv(tmp_path / "noid.csv", "id,label", [("s0", 0), ("s1", 1)])
    expect_error_line(_train(tmp_path / "r3", bags, no_id), "needs a header with a slide_id column")


def test_every_slide_without_a_bag_is_named_at_once(tmp_path, bags):
    rows = [(f"s{i}", i % 2) for i in range(N_SLIDES)] + [("gone0", 0), ("gone1", 1), ("gone2", 0)]
    res = _train(tmp_path / "r", bags, _csv(tmp_path / "l.csv", "slide_id,label", rows))
    expect_error_line(res, "for 3 slide(s) of", "gone0, gone1, gone2; drop their rows")


@pytest.mark.parametrize("outside", ["../elsewhere/s0", "/abs/s1"])
def test_a_slide_id_never_reads_a_bag_outside_the_features_folder(tmp_path, bags, outside):
    _bag(tmp_path / "s9.h5")  # beside the features folder, reachable as ../s9 were it allowed
    rows = [(f"s{i}", i % 2) for i in range(N_SLIDES)] + [(outside, 1), (f"../{tmp_path.name}/s9", 0)]
    res = _train(tmp_path / "r", bags, _csv(tmp_path / "l.csv", "slide_id,label", rows))
    expect_error_line(res, f"slide_id {outside!r} points outside the features folder", "fix the labels CSV")


def test_non_finite_features_are_refused_at_load(tmp_path, bags, model):
    bad = _bag(tmp_path / "nan.h5")
    import h5py
    with h5py.File(bad, "r+") as f:
        f["features"][2, 3] = np.nan
    with pytest.raises(TubError, match="nan.h5: 1 of 6 patches have NaN"):
        read_bag(bad)
    res = invoke(["xmil", "explain", bad, "--model", model, "-o", tmp_path / "e"])
    assert res.exit_code == 1 and not list((tmp_path / "e" / "outputs").glob("*.json"))
    fail = json.loads((tmp_path / "e" / "failures.jsonl").read_text())
    assert "NaN" in fail["error"] and "Error:" not in fail["error"]


# ---------------------------------------------------------------- 5: tiling parameters
@pytest.mark.parametrize("args,key", [
    (["--mpp", "0"], "'mpp'"), (["--set", "tiling.patch_size=0"], "'tiling.patch_size'"),
    (["--set", "tiling.target_mpp=0"], "'tiling.target_mpp'"),
    (["--set", "tiling.min_tissue=2"], "'tiling.min_tissue'"),
])
def test_tiling_parameters_are_checked_up_front(tmp_path, args, key):
    expect_error_line(invoke(["xmil", "tile", tmp_path, *args, "-o", tmp_path / "t"]), key)


@pytest.mark.parametrize("args,key", [(["--epochs", "0"], "'epochs'"), (["--set", "lr=-1"], "'lr'"),
                                      (["--set", "val_fraction=1"], "'val_fraction'")])
def test_training_options_are_checked_up_front(tmp_path, args, key):
    expect_error_line(invoke(["xmil", "train", "--features", tmp_path, "--labels", tmp_path / "l.csv", *args,
                         "-o", tmp_path / "m"]), key)


def test_slide_smaller_than_a_tile_and_no_tissue_messages(tmp_path):
    from tub_xmil.slides import open_slide
    from tub_xmil.tiling import tile_slide

    img, _, _ = render_slide(256, 256, True)
    s = open_slide(write_pyramid(tmp_path / "s.tiff", img, mpp=0.5, levels=1))
    with pytest.raises(TubError, match="smaller than one 512 px tile"):
        tile_slide(s, 0.5, patch_size=512, min_tissue=0.0)
    blank = open_slide(write_pyramid(tmp_path / "b.tiff", np.full((256, 256, 3), 240, np.uint8), mpp=0.5, levels=1))
    with pytest.raises(TubError, match="tiling.min_tissue"):
        tile_slide(blank, 0.5, patch_size=64)


def test_a_slide_without_a_small_level_is_refused_with_the_conversion_to_make(tmp_path, monkeypatch):
    """A single-level giant would be read whole for the tissue thumbnail: refused, naming vips tiffsave."""
    import tubcli.images
    from tub_xmil.slides import open_slide
    from tub_xmil.tiling import tile_slide

    img, _, _ = render_slide(256, 256, True)
    s = open_slide(write_pyramid(tmp_path / "s.tiff", img, mpp=0.5, levels=1))
    monkeypatch.setattr(tubcli.images, "MAX_THUMBNAIL_SOURCE_PX", 100)  # the test slide's only level is larger
    with pytest.raises(TubError, match=r"no pyramid level small enough .*256x256 px.* vips tiffsave"):
        tile_slide(s, 0.5, patch_size=64)


# ---------------------------------------------------------------- 6: several heatmap methods
def test_heatmap_writes_each_method_and_skips_only_when_all_exist(tmp_path, bags, model):
    out = tmp_path / "hm"
    cmd = ["xmil", "heatmap", bags / "s1.h5", "--model", model, "-o", out, "--json"]
    _ok(invoke([*cmd, "--method", "lrp", "--method", "ig"]))
    for m in ("lrp", "ig"):
        for suffix in (".png", "_heat.png", ".geojson", "_scores.json"):
            assert (out / "outputs" / f"s1_{m}{suffix}").is_file(), (m, suffix)
    res = _ok(invoke([*cmd, "--method", "lrp", "--method", "attention"]))  # attention is missing: run
    assert json.loads(res.stdout)["batch"]["processed"] == 1 and (out / "outputs" / "s1_attention.png").is_file()
    res = _ok(invoke([*cmd, "--method", "ig", "--method", "attention"]))
    assert json.loads(res.stdout)["batch"]["skipped_existing"] == 1


def test_heatmaps_of_a_model_retrained_in_place_are_not_skipped_as_done(tmp_path, bags, model):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, tmp_path / "ck")
    cmd = ["xmil", "heatmap", bags / "s1.h5", "--model", tmp_path / "ck", "--method", "attention", "-o", tmp_path / "hm"]
    explain = ["xmil", "explain", bags / "s1.h5", "--model", tmp_path / "ck", "--method", "attention", "-o", tmp_path / "ex"]
    _ok(invoke(cmd))
    _ok(invoke(explain))
    sd = load_file(str(tmp_path / "ck" / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in sd.items()}, str(tmp_path / "ck" / "model.safetensors"))
    for args in (cmd, explain):
        expect_error_line(invoke(args), "--model", "is not the file", "sha256 changed", "--overwrite")
        _ok(invoke([*args, "--overwrite"]))


# ---------------------------------------------------------------- 7: explained target
def test_the_model_json_names_the_model_too(tmp_path, bags, model):
    """knnlrp takes --model model.json; xmil said "not a PyTorch checkpoint" for it."""
    _ok(invoke(["xmil", "explain", bags, "--model", model / "model.json", "--method", "attention", "-o",
                tmp_path / "a", "--json"]))
    _ok(invoke(["xmil", "explain", bags, "--model", model, "--method", "attention", "-o", tmp_path / "b"]))
    assert (tmp_path / "a" / "outputs" / "s0.json").read_text() == (tmp_path / "b" / "outputs" / "s0.json").read_text()


@pytest.mark.parametrize("target", ["2", "-1"])
def test_target_outside_the_model_classes(tmp_path, bags, model, target):
    expect_error_line(invoke(["xmil", "explain", bags, "--model", model, "--target", target, "-o", tmp_path / "e"]),
                 f"--target {target}", "0..1", "neg, pos")
    assert not (tmp_path / "e" / "outputs").exists() or not list((tmp_path / "e" / "outputs").iterdir())


# ---------------------------------------------------------------- 8: foreign or broken inputs
def test_foreign_model_files_and_tile_arrays(tmp_path, bags, model):
    from safetensors.torch import save_file

    vit = tmp_path / "vit"
    vit.mkdir()
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(vit / "model.safetensors"))
    (vit / "model.json").write_text(json.dumps({"arch": "vit_small", "dim": 384}))
    expect_error_line(invoke(["xmil", "explain", bags, "--model", vit, "-o", tmp_path / "e1"]),
                 "not the model.json of an xmil model")
    (vit / "bad.safetensors").write_bytes(b"\x00" * 40)
    expect_error_line(invoke(["xmil", "explain", bags, "--model", vit / "bad.safetensors", "-o", tmp_path / "e2"]),
                 "cannot read", "as safetensors")
    np.savez(tmp_path / "tiles.npz", tiles=np.zeros((4, 16, 16, 3), np.uint8), labels=np.zeros(4))
    with pytest.raises(TubError, match="not tiles"):
        read_bag(tmp_path / "tiles.npz")
    np.savez(tmp_path / "t2.npz", features=np.zeros((4, 16, 16, 3), np.float32))
    with pytest.raises(TubError, match=r"shape \(4, 16, 16, 3\)"):
        read_bag(tmp_path / "t2.npz")
    np.savez(tmp_path / "empty.npz", features=np.zeros((0, 384), np.float32))  # a features file, no tissue
    with pytest.raises(TubError, match="the bag has no patches") as err:
        read_bag(tmp_path / "empty.npz")
    assert "not tiles" not in str(err.value)


@pytest.mark.parametrize("strategy,ok", [("bogus", False), ("0%-of-all", False), ("25%-of-all", True),
                                         ("one-by-one", True)])
def test_flipping_strategy_is_a_config_error(strategy, ok):
    from pydantic import ValidationError

    from tub_xmil.config import EvaluateConfig

    if ok:
        assert EvaluateConfig(strategy=strategy).strategy == strategy
    else:
        with pytest.raises(ValidationError, match="P%-of-all"):
            EvaluateConfig(strategy=strategy)


def test_bogus_strategy_exits_2(tmp_path):
    expect_error_line(invoke(["xmil", "evaluate", "--strategy", "bogus", "-o", tmp_path / "e"]), "'strategy'")


# ---------------------------------------------------------------- second audit
def test_survival_events_written_as_floats_are_fine(tmp_path, bags):
    labels = _csv(tmp_path / "l.csv", "slide_id,time,event", [(f"s{i}", 3 + i, f"{i % 2}.0") for i in range(N_SLIDES)])
    _ok(_train(tmp_path / "r", bags, labels, "--task", "survival"))


@pytest.fixture(scope="module")
def regression_model(bags, tmp_path_factory):
    d = tmp_path_factory.mktemp("regression")
    labels = _csv(d / "labels.csv", "slide_id,target", [(f"s{i}", 0.5 * i) for i in range(N_SLIDES)])
    _ok(_train(d / "run", bags, labels, "--task", "regression"))
    return d / "run" / "checkpoints"


def test_task_other_than_the_models_is_an_error(tmp_path, bags, model, regression_model):
    labels = _csv(tmp_path / "l.csv", "slide_id,label,target,split",
                  [(f"s{i}", ["neg", "pos"][i % 2], i, "test") for i in range(N_SLIDES)])
    ev = ["xmil", "evaluate", "--features", bags, "--labels", labels, "--set", "flipping=false"]
    expect_error_line(invoke([*ev, "--model", model, "--task", "regression", "-o", tmp_path / "e1"]),
                 "--task regression", "trained for classification")
    expect_error_line(invoke(["xmil", "explain", bags, "--model", model, "--task", "regression", "--target", "1",
                         "-o", tmp_path / "e2"]), "trained for classification")
    expect_error_line(invoke(["xmil", "explain", bags, "--model", regression_model, "--task", "classification",
                         "-o", tmp_path / "e3"]), "trained for regression")
    # without --task: the model's own; naming the same task is fine
    res = _ok(invoke([*ev, "--model", regression_model, "-o", tmp_path / "e4", "--json"]))
    assert "r2" in json.loads(res.stdout)
    _ok(invoke([*ev, "--model", model, "--task", "classification", "-o", tmp_path / "e5"]))


def test_split_names_are_normalised_in_train_and_evaluate(tmp_path, bags, model):
    splits = ["Train", "TRAINING", "Valid", "holdout"]
    labels = _csv(tmp_path / "l.csv", "slide_id,label,split",
                  [(f"s{i}", ["neg", "pos"][i % 2], sp) for i, sp in enumerate(splits)])
    out = json.loads(_ok(_train(tmp_path / "r", bags, labels)).stdout)
    assert (out["train_slides"], out["val_slides"], out["test_slides"]) == (2, 1, 1)
    ev = ["xmil", "evaluate", "--model", model, "--features", bags, "--labels", labels, "--set", "flipping=false",
          "--json"]
    for split, n in (("valid", 1), ("Validation", 1), ("val", 1), ("train", 2), ("all", 4), (None, 1)):
        args = [] if split is None else ["--split", split]  # default: the test rows only
        res = _ok(invoke([*ev, *args, "-o", tmp_path / f"e_{split}"]))
        assert json.loads(res.stdout)["slides"] == n, split
    expect_error_line(invoke([*ev, "--split", "dev", "-o", tmp_path / "e_dev"]), "'split'", "unknown split 'dev'")
    assert "split: all" in (tmp_path / "e_all" / "config.yaml").read_text()  # not null, which TOML cannot say
    toml = tmp_path / "all.toml"
    toml.write_text('split = "all"\nflipping = false\n')
    res = _ok(invoke(["xmil", "evaluate", "--model", model, "--features", bags, "--labels", labels, "-c", toml,
                      "--json", "-o", tmp_path / "e_toml"]))
    assert json.loads(res.stdout)["slides"] == 4


def _help(verb) -> str:
    """The --help text as one line, without the panel borders."""
    return " ".join(_ok(invoke(["xmil", verb, "--help"])).stdout.replace("│", " ").split())


def test_evaluate_help_names_the_split_option_and_its_default():
    text = _help("evaluate")
    assert "--split" in text and "by default the test rows" in text


def test_help_strings_survive_rich_markup():
    """Typer renders help with rich markup: '[split]' in a description used to vanish."""
    from rich.text import Text

    from tub_xmil.plugin import app

    def texts(model):
        for f in model.model_fields.values():
            yield f.description or ""
            if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields"):
                yield from texts(f.annotation)

    for verb in app.verbs:
        for t in [verb.help, *texts(app.config_model(verb))]:
            assert Text.from_markup(t).plain == t, (verb.name, t)
    assert "time+event (event 0/1), optional split (train" in _help("train")


# ---------------------------------------------------------------- undefined validation / test metrics
@pytest.mark.parametrize("task,rows,rule", [
    ("classification", [("neg", "train"), ("pos", "train"), ("neg", "val"), ("neg", "val")], "last epoch"),
    ("regression", [(1.0, "train"), (2.0, "train"), (3.0, "val"), (3.0, "val")], "last epoch"),
])
def test_an_undefined_validation_metric_is_said_and_recorded(tmp_path, bags, task, rows, rule):
    """A one-class validation split (no AUROC) or a constant target (no R²) used to switch the best-epoch
    rule silently (model.json still said "validation" as if AUROC had chosen it)."""
    labels = _csv(tmp_path / "l.csv", "slide_id,label,split", [(f"s{i}", y, sp) for i, (y, sp) in enumerate(rows)])
    res = _ok(_train(tmp_path / "r", bags, labels, "--task", task, "--epochs", "3"))
    out = json.loads(res.stdout)
    assert out["selected_by"] == rule and out["selected_on"] == "validation"
    assert "undefined" in res.stderr and rule.replace("_", " ") in res.stderr
    meta = json.loads((tmp_path / "r" / "checkpoints" / "model.json").read_text())
    assert meta["selected_by"] == rule
    if rule == "last epoch":
        assert out["best_epoch"] == 2
    ev = _ok(invoke(["xmil", "evaluate", "--model", tmp_path / "r" / "checkpoints", "--features", bags,
                     "--labels", labels, "--split", "val", "--set", "flipping=false", "-o", tmp_path / "ev",
                     "--json"]))
    key = "auroc" if task == "classification" else "r2"
    assert json.loads(ev.stdout)[key] is None and "undefined" in ev.stderr and "null" in ev.stderr


def test_survival_validation_without_comparable_pairs_is_said(tmp_path, bags):
    labels = _csv(tmp_path / "l.csv", "slide_id,time,event,split",
                  [("s0", 5, 1, "train"), ("s1", 9, 0, "train"), ("s2", 4, 0, "val"), ("s3", 7, 0, "val")])
    res = _ok(_train(tmp_path / "r", bags, labels, "--task", "survival", "--epochs", "2",
                     "--set", "n_bins=2"))
    assert json.loads(res.stdout)["selected_by"] == "last epoch" and "C-index is undefined" in res.stderr


def test_defined_metrics_keep_their_rule_and_constant_targets_raise_no_numpy_warning():
    import warnings

    from tub_xmil.metrics import regression_metrics, undefined_reason

    assert undefined_reason("classification", labels=[0, 1, 1]) is None
    assert undefined_reason("survival", times=[1, 2], events=[1, 0]) is None
    assert undefined_reason("survival", times=[1, 1], events=[1, 1]) is not None  # tied events: not comparable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert np.isnan(m["r2"]) and np.isnan(m["pearson_r"])


def test_a_broken_link_in_a_slide_folder_is_an_error(tmp_path):
    """A dangling symlink to a slide was skipped silently: fewer slides tiled, exit 0, DONE."""
    img, _, _ = render_slide(256, 256, False)
    (tmp_path / "slides").mkdir()
    write_pyramid(tmp_path / "slides" / "a.tiff", img, mpp=0.5, levels=1)
    (tmp_path / "slides" / "b.tiff").symlink_to(tmp_path / "moved" / "b.tiff")
    expect_error_line(invoke(["xmil", "tile", tmp_path / "slides", "-o", tmp_path / "t"]),
                      "b.tiff is a broken link", "restore its target or remove the link")


def test_tiling_settings_with_coords_dir_are_refused(tmp_path):
    """`features --coords-dir … --set tiling.patch_size=128` used the patches files' 256-px tiles and recorded
    patch_size 128 in config.yaml."""
    (tmp_path / "coords").mkdir()
    expect_error_line(invoke(["xmil", "features", tmp_path / "s.tiff", "--coords-dir", tmp_path / "coords",
                              "--set", "tiling.patch_size=128", "--set", "tiling.min_std=2", "-o", tmp_path / "f"]),
                      "tiling.patch_size, tiling.min_std do not apply with --coords-dir")
    assert not (tmp_path / "f").exists()


def test_a_train_run_directory_is_a_model(tmp_path, bags, model):
    """`--model RUN` (the train run directory, as knnlrp takes it) failed: "RUN/model.safetensors not found"."""
    res = _ok(invoke(["xmil", "explain", bags / "s0.h5", "--model", model.parent, "-o", tmp_path / "e", "--json"]))
    assert json.loads(res.stdout)["batch"]["processed"] == 1


def test_settings_of_a_method_that_does_not_run_are_refused(tmp_path, bags, model):
    """`--method ig --set lrp.gamma=5` gave byte-identical output to no gamma (and recorded gamma 5)."""
    for extra, named in ((["--method", "ig", "--set", "lrp.gamma=5"], "lrp.gamma set but method is ig"),
                         (["--method", "attention", "--set", "ig_steps=7"], "ig_steps set but method is attention")):
        expect_error_line(invoke(["xmil", "explain", bags / "s0.h5", "--model", model, *extra, "-o", tmp_path / "e"]),
                          named, "to the methods (--method) or drop it")
    _ok(invoke(["xmil", "explain", bags / "s0.h5", "--model", model, "--method", "lrp,ig", "--set", "ig_steps=7",
                "--set", "lrp.gamma=0.5", "-o", tmp_path / "ok"]))


def test_results_name_the_lrp_settings_used_and_evaluate_warns_when_no_slide_is_kept(tmp_path, bags, model):
    """config.yaml keeps `no_bias: null`; the results say what it resolved to (AttnMIL: True, logit)."""
    res = _ok(invoke(["xmil", "explain", bags / "s0.h5", "--model", model, "--method", "lrp", "-o", tmp_path / "e",
                      "--json"]))
    assert json.loads(res.stdout)["lrp_settings"] == {"gamma": 0.0, "eps": 1e-8, "no_bias": True, "output_relevance": "logit"}
    res = _ok(invoke(["xmil", "explain", bags / "s0.h5", "--model", model, "--method", "lrp", "-o", tmp_path / "e2",
                      "--set", "lrp.explained_rel=softmax", "--json"]))
    assert json.loads(res.stdout)["lrp_settings"]["output_relevance"] == "softmax"
    # both targets: for one of them every slide is a false prediction (p <= 0.5), said, not silent
    labels = _csv(tmp_path / "l.csv", "slide_id,label,split", [(f"s{i}", ["neg", "pos"][i % 2], "test")
                                                               for i in range(N_SLIDES)])
    warned = []
    for target in ("0", "1"):
        res = _ok(invoke(["xmil", "evaluate", "--model", model, "--features", bags, "--labels", labels, "--method",
                          "lrp", "--target", target, "-o", tmp_path / f"ev{target}", "--json"]))
        out = json.loads(res.stdout)
        if out["flipping_slides"] == 0:
            warned.append("every slide (4) was excluded as a false prediction" in res.stderr)
        assert out["lrp_settings"]["no_bias"] is True
        assert out["ci"]["resamples"] == 1000 and len(out["ci"]["balanced_accuracy"]) == 2  # bootstrap over slides
        assert "resamples only 4 slides: it understates the uncertainty" in res.stderr
    assert warned == [True]


def test_an_edited_model_json_is_named_before_it_allocates_its_model(tmp_path, bags, model):
    """features_dim 1e9 in model.json once allocated (or failed to allocate) 64 GB before any check."""
    import shutil

    edited = tmp_path / "ck"
    shutil.copytree(model, edited)
    meta = json.loads((edited / "model.json").read_text())
    meta["kwargs"]["features_dim"] = 10**9
    (edited / "model.json").write_text(json.dumps(meta))
    res = invoke(["xmil", "explain", bags / "s0.h5", "--model", edited, "-o", tmp_path / "e"])
    expect_error_line(res, "but the attnmil model its model.json describes has")


def test_features_without_an_encoder_plugin_name_the_install(monkeypatch):
    """pip install tub-xmil alone offers no patch encoder: the error names the extra that brings tub-atlas."""
    import tubcli.plugins

    from tub_xmil.features import get_encoder

    monkeypatch.setattr(tubcli.plugins, "patch_encoders", lambda: {})
    with pytest.raises(TubError, match=r"no patch encoders are installed .*pip install 'tub-xmil\[encoders\]'"):
        get_encoder("vit-t8-demo")


def test_a_slide_without_openslide_names_the_install(tmp_path, monkeypatch):
    from tub_xmil.slides import open_slide

    img, _, _ = render_slide(256, 256, True)
    path = write_pyramid(tmp_path / "s.tiff", img, mpp=0.5, levels=1)
    monkeypatch.setitem(sys.modules, "openslide", None)  # `import openslide` fails
    with pytest.raises(TubError, match="s.tiff needs OpenSlide.*pip install openslide-python openslide-bin"):
        open_slide(path)


def test_cross_validation_folds_partition_patients_stratified():
    """Every slide is held out in exactly one fold; a patient's slides share a fold; each class spreads evenly."""
    from tub_xmil.dataset import Slide
    from tub_xmil.splits import cross_validation_fold

    slides = [Slide(f"s{i}", torch.zeros(1, 2), label=float(i % 3 == 0), extra={"case_id": f"p{i // 2}"})
              for i in range(40)]  # 20 patients of two slides each
    held = [cross_validation_fold(slides, k, 5, "classification", seed=7) for k in range(5)]
    tested = [s.slide_id for rest, out in held for s in out]
    assert sorted(tested) == sorted(s.slide_id for s in slides)  # a partition
    for rest, out in held:
        assert not {s.slide_id for s in rest} & {s.slide_id for s in out}
        assert len({s.extra["case_id"] for s in out} & {s.extra["case_id"] for s in rest}) == 0
    per_fold = [[sum(s.label == c for s in out) for c in (0.0, 1.0)] for _, out in held]
    for c in (0, 1):
        counts = [f[c] for f in per_fold]
        assert max(counts) - min(counts) <= 2  # one patient (two slides) of the class at most
    again = cross_validation_fold(slides, 2, 5, "classification", seed=7)[1]
    assert [s.slide_id for s in again] == [s.slide_id for s in held[2][1]]  # same seed, same fold in every job
    with pytest.raises(TubError, match="20 patients/slides cannot fill 25 folds"):
        cross_validation_fold(slides, 0, 25, "classification", seed=7)


def test_train_one_fold_holds_it_out_and_records_it_for_evaluate(tmp_path, bags):
    labels = _csv(tmp_path / "labels.csv", "Slide_ID,label", [(f"s{i}", ["neg", "pos"][i % 2]) for i in range(N_SLIDES)])
    res = json.loads(_ok(_train(tmp_path / "f1", bags, labels, "--fold", "1/2")).stdout)
    assert res["fold"] == "1/2" and res["test_slides"] == 2 and res["train_slides"] == 2
    with open(res["fold_labels"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == [f"s{i}" for i in range(N_SLIDES)]
    assert sorted(r["split"] for r in rows) == ["test", "test", "train", "train"]
    assert {r["label"] for r in rows if r["split"] == "test"} == {"neg", "pos"}  # stratified
    ev = json.loads(_ok(invoke(["xmil", "evaluate", "--model", tmp_path / "f1" / "checkpoints", "--features", bags,
                                "--labels", res["fold_labels"], "-o", tmp_path / "ev", "--json"])).stdout)
    assert ev["slides"] == 2  # the held-out fold
    other = json.loads(_ok(_train(tmp_path / "f0", bags, labels, "--fold", "0/2")).stdout)
    with open(other["fold_labels"], newline="") as f:
        assert {r["slide_id"] for r in csv.DictReader(f) if r["split"] == "test"} == \
            {r["slide_id"] for r in rows if r["split"] == "train"}  # the two folds' test sets partition the slides
    split = _csv(tmp_path / "split.csv", "slide_id,label,split", [("s0", "neg", "train"), ("s1", "pos", "train"),
                                                                   ("s2", "neg", "test"), ("s3", "pos", "train")])
    expect_error_line(_train(tmp_path / "f2", bags, split, "--fold", "0/2"), "--fold 0/2", "drop its split column")
    expect_error_line(_train(tmp_path / "f3", bags, labels, "--fold", "2/2"), "--fold", "0..K-1")
