"""End-to-end: every xmil verb through the real CLI on tiny generated data."""

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tubcli.testing import check_plugin, invoke


def test_conformance():
    check_plugin("xmil")


def _ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("xmil")
    _ok(invoke(["xmil", "make-data", "--out-dir", d / "data", "--n-slides", "4", "--set", "width=1024", "--set", "height=768",
                "-o", d / "run_make"]))
    return d


def test_make_data_writes_readable_slides(data):
    slides = sorted((data / "data" / "slides").glob("*.tiff"))
    assert len(slides) == 4
    assert (data / "data" / "labels.csv").read_text().startswith("slide_id,label,split")


def test_make_data_never_replaces_a_users_folder_and_checks_its_sizes(tmp_path):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "labels.csv").write_text("slide_id,label\npatientA,1\n")
    res = invoke(["xmil", "make-data", "--out-dir", mine, "--n-slides", "2", "-o", tmp_path / "r1"])
    assert res.exit_code == 2 and "exists and is not empty; choose a new folder" in res.stderr
    assert (mine / "labels.csv").read_text() == "slide_id,label\npatientA,1\n"
    for bad, key in (("width=-5", "'width'"), ("mpp=-0.5", "'mpp'"), ("n_slides=0", "'n_slides'")):
        res = invoke(["xmil", "make-data", "--out-dir", tmp_path / "new", "--set", bad, "-o", tmp_path / "r2"])
        assert res.exit_code == 2 and f"invalid config value for {key} (from --set)" in res.stderr, res.stderr
    assert not (tmp_path / "new").exists()


def test_tile_then_skip_existing_and_bad_slides_reported(data):
    sl = data / "data" / "slides"
    bad = data / "bad"
    bad.mkdir()
    (bad / "corrupt.svs").write_bytes(b"not a slide at all")
    from tub_xmil.synthetic import render_slide, write_pyramid
    img, _, _ = render_slide(512, 512, False)
    write_pyramid(bad / "nompp.tiff", img, mpp=None, levels=2)
    write_pyramid(bad / "blank.tiff", np.full((512, 512, 3), 240, np.uint8), mpp=0.5, levels=2)
    res = invoke(["xmil", "tile", sl, bad, "-o", data / "tiles", "--patch-size", "128"])
    assert res.exit_code == 1  # some items failed, the rest were processed
    fails = [json.loads(line) for line in (data / "tiles" / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["item"].split("/")[-1] for f in fails) == ["blank.tiff", "corrupt.svs", "nompp.tiff"]
    assert all("\n" not in f["error"] for f in fails)
    assert "ERROR corrupt.svs: not a slide" in res.stderr  # the log names the slide once
    patches = sorted((data / "tiles" / "outputs" / "patches").glob("*.h5"))
    assert [p.stem for p in patches] == [f"slide_{i:03d}" for i in range(4)]  # nothing partial for bad ones
    assert not list((data / "tiles" / "outputs").rglob(".tmp-*"))
    with h5py.File(patches[0]) as f:
        assert f["coords"].dtype == np.int64 and f["coords"].attrs["patch_size_level0"] == 128
    # the nompp slide goes through with --mpp; finished slides are skipped
    res = _ok(invoke(["xmil", "tile", sl, bad / "nompp.tiff", "--mpp", "0.5", "-o", data / "tiles2",
                      "--patch-size", "128", "--json"]))
    first = json.loads(res.stdout)["patches"]
    res = _ok(invoke(["xmil", "tile", sl, "--mpp", "0.5", "-o", data / "tiles2", "--patch-size", "128", "--json"]))
    assert json.loads(res.stdout)["batch"]["skipped_existing"] == 4
    assert json.loads(res.stdout)["patches"] == first > 0  # the run's patches, not this invocation's (none)
    (data / "tiles2" / "outputs" / "patches" / ".tmp-slide_001-abcd1234.h5").write_bytes(b"")  # a killed writer's
    res = _ok(invoke(["xmil", "tile", sl, "--mpp", "0.5", "-o", data / "tiles2", "--patch-size", "128", "--json"]))
    assert json.loads(res.stdout)["patches"] == first
    # a finished output damaged afterwards is named, not skipped as done (it died in a traceback at the end)
    damaged = data / "tiles2" / "outputs" / "patches" / "slide_002.h5"
    kept = damaged.read_bytes()
    damaged.write_bytes(kept[:50])
    res = invoke(["xmil", "tile", sl, "--mpp", "0.5", "-o", data / "tiles2", "--patch-size", "128"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"{damaged} exists but cannot be read" in res.stderr and "delete it to make it again" in res.stderr
    damaged.unlink()
    res = _ok(invoke(["xmil", "tile", sl, "--mpp", "0.5", "-o", data / "tiles2", "--patch-size", "128", "--json"]))
    assert json.loads(res.stdout)["batch"]["processed"] == 1 and json.loads(res.stdout)["patches"] == first


def test_features_tile_like_tile_with_the_same_options(data, tiny_encoder):
    """features takes --target-mpp/--patch-size as tile does: the same grid, and its .h5 records the tissue filter."""
    slide = data / "data" / "slides" / "slide_002.tiff"
    tiled = _ok(invoke(["xmil", "tile", slide, "--target-mpp", "0.5", "--patch-size", "128", "-o", data / "t_opts"]))
    assert tiled.exit_code == 0
    _ok(invoke(["xmil", "features", slide, "--encoder", tiny_encoder, "--target-mpp", "0.5", "--patch-size", "128",
                "-o", data / "f_opts"]))
    with h5py.File(data / "t_opts" / "outputs" / "patches" / "slide_002.h5") as a, \
            h5py.File(data / "f_opts" / "outputs" / "features" / "slide_002.h5") as b:
        assert np.array_equal(a["coords"][:], b["coords"][:])
        assert (b.attrs["patch_size"], b.attrs["min_tissue"], b.attrs["min_std"]) == (128, 0.5, 8.0)


def test_features_without_encoder_plugin_is_a_clear_error(data):
    res = invoke(["xmil", "features", data / "data" / "slides", "--encoder", "no-such-encoder", "-o", data / "f0"])
    assert res.exit_code == 2 and "no-such-encoder" in res.stderr


def test_pipeline_features_train_explain_evaluate_heatmap(data, tiny_encoder, monkeypatch):
    import torch

    sl = data / "data" / "slides"
    # a tissue filter of its own: heatmap must tile slides with it too (the bags the model saw)
    _ok(invoke(["xmil", "features", sl, "--encoder", tiny_encoder, "--set", "tiling.patch_size=128",
                "--set", "tiling.min_tissue=0.2", "-o", data / "feat"]))
    fdir = data / "feat" / "outputs" / "features"
    assert len(list(fdir.glob("*.h5"))) == 4
    # reuse existing coordinates (CLAM/TRIDENT style) instead of tiling again (this test's own tiling,
    # so it does not depend on another test having run)
    _ok(invoke(["xmil", "tile", sl / "slide_000.tiff", "--mpp", "0.5", "-o", data / "coords", "--patch-size", "128"]))
    _ok(invoke(["xmil", "features", sl / "slide_000.tiff", "--encoder", tiny_encoder, "--coords-dir",
                data / "coords" / "outputs" / "patches", "-o", data / "feat_reuse"]))
    with h5py.File(data / "feat_reuse" / "outputs" / "features" / "slide_000.h5") as a, \
            h5py.File(data / "coords" / "outputs" / "patches" / "slide_000.h5") as b:
        assert np.array_equal(a["coords"][:], b["coords"][:])
    labels = data / "data" / "labels.csv"
    for task, arch in (("classification", "attnmil"), ("classification", "transmil"), ("classification", "mambamil")):
        res = _ok(invoke(["xmil", "train", "--features", fdir, "--labels", labels, "--task", task, "--arch", arch,
                          "--epochs", "2", "--set", "model.features_dim=16", "-o", data / f"train_{arch}", "--json"]))
        out = json.loads(res.stdout)
        assert out["train_slides"] == 2 and out["test_slides"] == 2
        rows = [json.loads(x) for x in (data / f"train_{arch}" / "metrics.jsonl").read_text().splitlines()]
        score = [r["train_auroc"] for r in rows]  # no validation slides: chosen on the training slides
        assert out["selected_on"].startswith("training") and score[out["best_epoch"]] == max(score)
        assert Path(out["training_curves"]).is_file()  # the loss and the selection scores per epoch
    model = data / "train_attnmil" / "checkpoints"
    assert (model / "model.safetensors").is_file() and json.loads((model / "model.json").read_text())["arch"] == "attnmil"
    # resume: a finished run resumes at its last epoch and trains two more
    _ok(invoke(["xmil", "train", "--features", fdir, "--labels", labels, "--epochs", "4",
                "--set", "model.features_dim=16", "-o", data / "train_attnmil", "--resume", "auto"]))
    lines = (data / "train_attnmil" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2, 3]
    # explain: all methods, outputs/explanations.csv with JSON columns
    res = _ok(invoke(["xmil", "explain", fdir, "--model", model, "--method", "lrp", "--method", "ig",
                      "--method", "single", "--method", "attention", "-o", data / "expl", "--json"]))
    rec = json.loads((data / "expl" / "outputs" / "slide_001.json").read_text())
    n = rec["n_patches"]
    assert all(len(rec[f"patch_scores_{m}"]) == n for m in ("lrp", "ig", "single", "attention"))
    # the LRP budget: AttnMIL without biases puts all of the explained output on the patches
    assert abs(rec["lrp_remainder"]) <= 1e-4 * max(1.0, abs(rec["lrp_output_relevance"]))
    assert rec["lrp_output_relevance"] == pytest.approx(sum(rec["patch_scores_lrp"]), abs=1e-4)
    # the tiles' extent goes with their corners, for a pathologist taking the file elsewhere
    assert (rec["patch_size_level0"], rec["mpp"], rec["target_mpp"]) == (128, 0.5, 0.5) and len(rec["coords"]) == n
    table = list(csv.DictReader((data / "expl" / "outputs" / "explanations.csv").open()))
    assert list(table[0]) == ["slide_id", "task", "target", "target_class", "prediction", "n_patches", "patch_scores_lrp",
                              "patch_scores_ig", "patch_scores_single", "patch_scores_attention"]
    classes = json.loads((model / "model.json").read_text())["classes"]
    row = next(r for r in table if r["slide_id"] == "slide_001")
    assert row["target_class"] == classes[rec["target"]] and float(row["prediction"]) == pytest.approx(rec["prediction"])
    assert json.loads(row["patch_scores_lrp"]) == rec["patch_scores_lrp"] and int(row["n_patches"]) == n
    # evaluate: task metrics and patch flipping incl. random baseline
    import tubcli.plots

    titles = []
    real_roc = tubcli.plots.roc_plot
    monkeypatch.setattr(tubcli.plots, "roc_plot", lambda *a, **k: titles.append(k.get("title")) or real_roc(*a, **k))
    res = _ok(invoke(["xmil", "evaluate", "--model", model, "--features", fdir, "--labels", labels, "--set",
                      "split=null", "--method", "lrp", "--method", "random", "--set", "flipping_ties=rank",
                      "-o", data / "eval", "--json"]))
    ev = json.loads(res.stdout)
    assert "balanced_accuracy" in ev and ev["slides"] == 4 and ev["flipping_ties"] == "rank"
    lo, hi = ev["ci"]["auroc"]  # the figure states the interval metrics.json has
    assert titles == [f"all slides, AUROC 95% CI {lo:.3f}–{hi:.3f} (slide bootstrap)"]
    # spec §2.5: by default 1%-of-all blocks (101 points); --score-order absolute ranks by |score|
    res = _ok(invoke(["xmil", "evaluate", "--model", model, "--features", fdir, "--labels", labels, "--set",
                      "split=null", "--method", "lrp", "--score-order", "absolute", "-o", data / "eval_abs", "--json"]))
    ev_abs = json.loads(res.stdout)
    assert ev_abs["score_order"] == "absolute"
    assert bool(ev_abs["flipping_slides"]) == (data / "eval_abs" / "outputs" / "flipping.png").is_file()
    from tub_xmil.bags import read_bag
    from tub_xmil.checkpoint import load_model
    from tub_xmil.config import EvaluateConfig
    from tub_xmil.flipping import slide_flipping
    from tub_xmil.pipeline import explain_bag

    net, _ = load_model(model)
    kept = [r for r in json.loads((data / "eval_abs" / "outputs" / "flipping.json").read_text()) if not r["false_pred"]]
    assert kept  # the trained model gets some slides right
    for rec in kept:
        x = read_bag(fdir / f"{rec['slide_id']}.h5")[0]
        lrp = explain_bag(net, x, "lrp", "classification", rec["target"], EvaluateConfig(), seed=0)
        want = slide_flipping(net, x, np.abs(lrp), "classification", rec["target"], "1%-of-all")
        assert len(rec["lrp"]["drop"]["morf"]) == 101
        assert np.allclose(rec["lrp"]["drop"]["morf"], want["drop"]["morf"])
        assert np.allclose(rec["lrp"]["add"]["lerf"], want["add"]["lerf"])
    if ev["flipping_slides"]:
        assert "lrp.drop.srg" in ev and "random.drop.srg" in ev
    # heatmap from slides (encoder via hook) and from feature files (+ slide dir)
    meta = json.loads((model / "model.json").read_text())
    assert meta["features"] == {"encoder": tiny_encoder, "target_mpp": 0.5, "patch_size": 128, "min_tissue": 0.2,
                                "min_std": 8.0, "precision": "fp32"}
    # from a slide, the encoder and tiling default to the training features' (model.json)
    res = _ok(invoke(["xmil", "heatmap", sl / "slide_001.tiff", "--model", model, "--method", "lrp", "-o", data / "hm",
                      "--json"]))
    used = json.loads(res.stdout)["slides"]
    assert (used["encoder"], used["patch_size"], used["min_tissue"], used["source"]["min_tissue"]) == \
        (tiny_encoder, 128, 0.2, "model.json (training features)")
    out = data / "hm" / "outputs"
    with h5py.File(fdir / "slide_001.h5") as f:  # the very tiles the model was trained on
        assert np.array_equal(np.array(json.loads((out / "slide_001_lrp_scores.json").read_text())["coords"]),
                              f["coords"][:])
    res = _ok(invoke(["xmil", "heatmap", sl / "slide_001.tiff", "--model", model, "--method", "lrp",
                      "--patch-size", "256", "-o", data / "hm256"]))
    assert "trained on features with patch_size 128; --patch-size 256" in res.stderr
    gj = json.loads((out / "slide_001_lrp.geojson").read_text())
    sc = json.loads((out / "slide_001_lrp_scores.json").read_text())
    from tub_xmil.heatmap import geojson_coords
    assert np.array_equal(geojson_coords(gj), np.array(sc["coords"]))
    from PIL import Image
    assert Image.open(out / "slide_001_lrp.png").size == (1024 // 32, 768 // 32)
    _ok(invoke(["xmil", "heatmap", fdir / "slide_002.h5", "--model", model, "--method", "single",
                "--slide-dir", sl, "-o", data / "hm2"]))
    assert (data / "hm2" / "outputs" / "slide_002_single.geojson").is_file()
    # the MIL model runs on the CPU in fp32 outside training: a GPU or precision asked for is said to be
    # unused (torch here only claims to have a GPU, so any tensor sent there would fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for verb in (["explain", fdir], ["evaluate", "--features", fdir, "--labels", labels, "--set", "split=null"],
                 ["heatmap", fdir / "slide_002.h5"]):
        res = _ok(invoke(["xmil", *verb, "--model", model, "--method", "lrp", "--device", "cuda:1",
                          "--precision", "bf16", "-o", data / f"cuda_{verb[0]}"]))
        assert "computes on the CPU: --device cuda:1" in res.stderr and "--precision bf16" in res.stderr


def test_survival_and_regression_training(data, tiny_encoder, tmp_path):
    fdir = data / "feat" / "outputs" / "features"
    if not fdir.exists():
        pytest.skip("needs the pipeline test's features")
    rows = ["slide_id,time,event,target,split"]
    for i in range(4):
        rows.append(f"slide_{i:03d},{10 + 5 * i},{i % 2},{0.5 * i},{'train' if i < 3 else 'test'}")
    (tmp_path / "surv.csv").write_text("\n".join(rows) + "\n")
    res = _ok(invoke(["xmil", "train", "--features", fdir, "--labels", tmp_path / "surv.csv", "--task", "survival",
                      "--epochs", "2", "--set", "model.features_dim=8", "-o", tmp_path / "surv", "--json"]))
    assert "train_slides" in json.loads(res.stdout)
    res = _ok(invoke(["xmil", "explain", fdir / "slide_000.h5", "--model", tmp_path / "surv" / "checkpoints",
                      "--method", "lrp", "--method", "drop", "-o", tmp_path / "se"]))
    rec = json.loads((tmp_path / "se" / "outputs" / "slide_000.json").read_text())
    assert rec["task"] == "survival" and len(rec["patch_scores_lrp"]) == rec["n_patches"]
    _ok(invoke(["xmil", "train", "--features", fdir, "--labels", tmp_path / "surv.csv", "--task", "regression",
                "--epochs", "1", "--set", "model.features_dim=8", "-o", tmp_path / "reg"]))


def test_model_settings_reach_the_architecture_or_are_refused(data, tiny_encoder, tmp_path):
    """Spec §2.1 settings: TransMIL layers/attention/dropout and AttnMIL's dropout strategy reach the model;
    settings an architecture has no use for (they were recorded in config.yaml and ignored) are refused."""
    fdir = data / "feat" / "outputs" / "features"
    if not fdir.exists():
        pytest.skip("needs the pipeline test's features")
    labels = data / "data" / "labels.csv"
    base = ["xmil", "train", "--features", fdir, "--labels", labels, "--epochs", "1"]
    _ok(invoke([*base, "--arch", "transmil", "--set", "model.features_dim=16", "--set", "model.num_layers=3",
                "--set", "model.attention=dot_prod", "--set", "model.dropout=0.2", "-o", tmp_path / "t"]))
    kw = json.loads((tmp_path / "t" / "checkpoints" / "model.json").read_text())["kwargs"]
    assert (kw["n_layers"], kw["attention"], kw["dropout_feat"]) == (3, "dot_prod", 0.2)
    _ok(invoke([*base, "--set", "model.features_dim=8", "--set", "model.dropout=0.3", "--set",
                "model.dropout_strategy=last", "-o", tmp_path / "a"]))
    from tub_xmil.checkpoint import load_model
    model, _ = load_model(tmp_path / "a" / "checkpoints")
    assert (model.feature_dropout.p, model.classifier_dropout.p) == (0.0, 0.3)
    for arch, setting in (("transmil", "model.gated=true"), ("mambamil", "model.n_out_layers=1"),
                          ("attnmil", "model.attention=dot_prod"), ("transmil", "model.num_layers=1")):
        res = invoke([*base, "--arch", arch, "--set", setting, "-o", tmp_path / "x"])
        assert res.exit_code == 2 and setting.split("=")[0] in res.stderr, res.stderr
        assert not (tmp_path / "x").exists()


def test_reference_checkpoint_loads_and_explains(tmp_path):
    from pathlib import Path

    ck = Path(__file__).parents[2].parent / "shared/reference/xmil/camelyon_attnmil_best_model.pt"
    if not ck.is_file():
        pytest.skip("reference checkpoint not available")
    import torch
    torch.save(torch.randn(30, 768, generator=torch.Generator().manual_seed(0)), tmp_path / "bag.pt")
    _ok(invoke(["xmil", "explain", tmp_path / "bag.pt", "--model", ck, "--method", "lrp", "--target", "1",
                "-o", tmp_path / "e"]))
    rec = json.loads((tmp_path / "e" / "outputs" / "bag.json").read_text())
    assert len(rec["patch_scores_lrp"]) == 30
    # attention maps are the same for every class: --target is said to change only the prediction
    r = _ok(invoke(["xmil", "explain", tmp_path / "bag.pt", "--model", ck, "--method", "attention", "--target", "1",
                    "-o", tmp_path / "a"]))
    assert "same map for every class" in r.stderr
    r = _ok(invoke(["xmil", "explain", tmp_path / "bag.pt", "--model", ck, "--method", "attention,lrp",
                    "--target", "1", "-o", tmp_path / "b"]))
    assert "same map for every class" not in r.stderr


def test_bad_model_and_bag_inputs_exit_2(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"junk")
    res = invoke(["xmil", "explain", tmp_path / "m.pt", "--model", tmp_path / "m.pt", "-o", tmp_path / "x"])
    assert res.exit_code == 2 and "Traceback" not in res.stderr


def test_resume_after_a_stop_repeats_the_uninterrupted_run(tmp_path):
    """Each epoch's shuffle and dropout come from (seed, epoch): resuming after epoch k must not
    replay epoch 0's order (it did: the generator restarted from the seed)."""
    import torch
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    bags = tmp_path / "bags"
    bags.mkdir()
    for i in range(8):
        np.savez(bags / f"s{i}.npz", features=rng.standard_normal((5, 6)).astype(np.float32))
    (tmp_path / "l.csv").write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(8)))
    base = ["xmil", "train", "--features", bags, "--labels", tmp_path / "l.csv", "--set", "model.features_dim=8",
            "--set", "model.dropout=0.3"]
    _ok(invoke([*base, "--epochs", "4", "-o", tmp_path / "full"]))
    _ok(invoke([*base, "--epochs", "2", "-o", tmp_path / "cut"]))  # stopped after epoch 1
    _ok(invoke([*base, "--epochs", "4", "-o", tmp_path / "cut", "--resume", "auto"]))
    for name in ("model.safetensors", "last.pt"):
        load = load_file if name.endswith(".safetensors") else (lambda p: torch.load(p)["model"])
        a, b = (load(str(tmp_path / run / "checkpoints" / name)) for run in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[json.loads(x)["train_loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("full", "cut")]
    assert losses[0] == losses[1]


def test_features_precision_and_slide_metadata(tmp_path, tiny_encoder):
    """--precision bf16 reaches the encoder (features close to, not equal to fp32) and is recorded;
    features from reused coords carry the slide's mpp and the tiling attributes."""
    from tub_xmil.synthetic import render_slide, write_pyramid

    img, _, _ = render_slide(1024, 768, True)
    write_pyramid(tmp_path / "s.tiff", img, mpp=0.5, levels=3)
    _ok(invoke(["xmil", "tile", tmp_path / "s.tiff", "--patch-size", "128", "-o", tmp_path / "t"]))
    feats = {}
    for prec in ("fp32", "bf16"):
        _ok(invoke(["xmil", "features", tmp_path / "s.tiff", "--encoder", tiny_encoder, "--coords-dir",
                    tmp_path / "t" / "outputs" / "patches", "--precision", prec, "-o", tmp_path / prec]))
        with h5py.File(tmp_path / prec / "outputs" / "features" / "s.h5") as f:
            feats[prec] = f["features"][:]
            attrs = dict(f.attrs)
        assert attrs["precision"] == prec and attrs["mpp"] == 0.5
        assert attrs["patch_size_level0"] == 128 and attrs["patch_size"] == 128
        # the 128 px tiles are resized to the encoder's 16: it sees 0.5 * 128 / 16 = 4 µm/px, recorded
        assert attrs["encoder_tile_size"] == 16 and attrs["encoder_mpp"] == 4.0
        assert (attrs["level0_width"], attrs["level0_height"]) == (1024, 768)
    assert not np.array_equal(feats["fp32"], feats["bf16"])
    np.testing.assert_allclose(feats["bf16"], feats["fp32"], rtol=0.02, atol=0.02)


def test_a_diverging_training_stops_with_exit_1_and_keeps_no_model(tmp_path):
    """A learning rate that blows the loss up ends the run (exit 1, one line) instead of saving NaN weights."""
    rng = np.random.default_rng(0)
    bags = tmp_path / "bags"
    bags.mkdir()
    for i in range(6):
        np.savez(bags / f"s{i}.npz", features=(1e3 * rng.standard_normal((5, 6))).astype(np.float32))
    (tmp_path / "l.csv").write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(6)))
    res = invoke(["xmil", "train", "--features", bags, "--labels", tmp_path / "l.csv", "--set", "lr=1e30",
                  "--epochs", "3", "-o", tmp_path / "run"])
    assert res.exit_code == 1 and res.stderr.strip().splitlines()[-1].startswith("error: training diverged")
    assert not (tmp_path / "run" / "checkpoints" / "model.safetensors").exists()
    res = invoke(["xmil", "train", "--features", bags, "--labels", tmp_path / "l.csv", "--set", "lr=.inf",
                  "-o", tmp_path / "inf"])
    assert res.exit_code == 2 and "not a finite number" in res.stderr


def test_labels_without_rows_and_features_given_as_a_file_are_named(tmp_path):
    bags = tmp_path / "bags"
    bags.mkdir()
    np.savez(bags / "s0.npz", features=np.ones((3, 4), np.float32))
    (tmp_path / "h.csv").write_text("slide_id,label\n")
    res = invoke(["xmil", "train", "--features", bags, "--labels", tmp_path / "h.csv", "-o", tmp_path / "a"])
    assert res.exit_code == 2 and "has a header but no rows" in res.stderr
    (tmp_path / "l.csv").write_text("slide_id,label\ns0,0\n")
    res = invoke(["xmil", "train", "--features", tmp_path / "l.csv", "--labels", tmp_path / "l.csv", "-o", tmp_path / "b"])
    assert res.exit_code == 2 and "is a file; pass the folder of bags" in res.stderr


def test_heatmap_from_slides_needs_the_encoder_of_the_training_features():
    """A model trained on features that record no encoder (atlas h5, CLAM) got slides embedded by the
    default random-weight encoder: features it never saw. Now that needs --encoder."""
    import logging

    from tubcli.errors import TubError

    from tub_xmil.cli import _slide_settings
    from tub_xmil.config import HeatmapConfig

    log = logging.getLogger("heatmap-test")
    with pytest.raises(TubError, match="record no encoder"):
        _slide_settings(HeatmapConfig(), {"target_mpp": 0.5, "patch_size": 64}, log)
    cfg, used = _slide_settings(HeatmapConfig(encoder="uni2-h"), {"target_mpp": 0.5, "patch_size": 64}, log)
    assert cfg.encoder == "uni2-h" and used["source"]["patch_size"] == "model.json (training features)"


def test_tiling_imports_no_torch(tmp_path):
    """make-data and tile need OpenSlide, not torch (2-4 s to import on a small CPU box, per job of an array)."""
    import subprocess
    import sys

    code = ("import sys\nfrom tubcli.cli import main\n"
            "for argv in (['xmil', 'make-data', '--n-slides', '2', '-o', 'D', '-q'],\n"
            "             ['xmil', 'tile', 'D/outputs/slides', '-o', 'T', '-q']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code in (0, None), argv\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "T" / "outputs").rglob("*.h5"))
