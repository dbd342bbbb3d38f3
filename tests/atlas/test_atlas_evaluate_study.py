"""``atlas evaluate`` / ``explain`` for a study: per-row predictions and the split written out, AUROC and
slide counts, slide-level bootstrap intervals, ``--labels CSV`` for inputs without labels (slides.npz,
TRIDENT/CLAM h5 files and folders, slide h5s with empty labels), ``--metadata`` refused where unused,
and the probe's encoder provenance checked by ``explain``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from tubcli.testing import invoke


def _run(*args):
    return invoke(["atlas", *map(str, args)])


def _ok(*args):
    r = _run(*args, "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def _fails(*args):
    r = _run(*args)
    assert r.exit_code == 2, r.stderr + r.stdout
    lines = [line for line in r.stderr.strip().splitlines() if " WARNING " not in line]  # logged warnings aside
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _study(n_slides=30, tiles=4, d=12, classes=("benign", "tumour"), seed=0):
    """Tiles of slides; each slide has one class; features a noisy class signal (not separable)."""
    rng = np.random.default_rng(seed)
    slide_class = np.arange(n_slides) % len(classes)
    rows = np.repeat(np.arange(n_slides), tiles)
    y = slide_class[rows]
    x = rng.standard_normal((len(rows), d)) + 0.8 * np.eye(d)[y]
    slides = np.array([f"S{i:02d}" for i in rows])
    patches = np.array([f"p{j}" for j in range(len(rows))])
    return x.astype(np.float32), np.array(classes)[y], slides, patches


def _npz(path, x, labels, slides, patches=None, split=None):
    arrays = {"features": x, "labels": labels, "slide_id": slides}
    if patches is not None:
        arrays["patch_id"] = patches
    if split is not None:
        arrays["split"] = split
    np.savez(path, **arrays)
    return path


def _split_by_slide(slides, test_every=3):
    """Every third slide is test, the slide after it val, the rest train (classes alternate by slide)."""
    idx = np.array([int(s[1:]) for s in slides])
    return np.where(idx % test_every == 0, "test", np.where(idx % test_every == 1, "val", "train"))


# ---------------------------------------------------------------- (A) predictions, splits, AUROC, slide counts
def test_predictions_csv_holds_every_test_row_and_agrees_with_sklearn(tmp_path):
    x, labels, slides, patches = _study()
    split = _split_by_slide(slides)
    f = _npz(tmp_path / "f.npz", x, labels, slides, patches, split)
    m = _ok("evaluate", f, "--runs", "2", "--max-steps", "300", "--k", "5", "-o", tmp_path / "r")
    pred = _csv(tmp_path / "r/outputs/predictions.csv")
    te = np.flatnonzero(split == "test")
    assert [int(r["row"]) for r in pred] == te.tolist()
    assert [r["slide_id"] for r in pred] == slides[te].tolist()
    assert [r["patch_id"] for r in pred] == patches[te].tolist()
    assert {r["split"] for r in pred} == {"test"} and [r["label"] for r in pred] == labels[te].tolist()
    assert all(r["source"] == str(f.resolve()) for r in pred)
    # kNN: predictions and vote shares are scikit-learn's (uniform vote = predict_proba)
    tr = split == "train"
    ref = KNeighborsClassifier(5, metric="cosine", algorithm="brute").fit(x[tr].astype(np.float64), labels[tr])
    assert [r["knn_pred"] for r in pred] == ref.predict(x[te].astype(np.float64)).tolist()
    votes = np.array([[float(r["knn_vote_benign"]), float(r["knn_vote_tumour"])] for r in pred])
    assert np.allclose(votes, ref.predict_proba(x[te].astype(np.float64)), atol=1e-12)
    # linear: the best run's probabilities give its prediction, its balanced accuracy and its AUROC
    proba = np.array([[float(r["linear_prob_benign"]), float(r["linear_prob_tumour"])] for r in pred])
    assert np.allclose(proba.sum(1), 1, atol=1e-12)
    assert [r["linear_pred"] for r in pred] == np.array(["benign", "tumour"])[proba.argmax(1)].tolist()
    best = m["linear"]["runs"][m["linear"]["best_run"]]
    assert best["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels[te], [r["linear_pred"] for r in pred]), abs=1e-12)
    assert best["auroc"] == pytest.approx(roc_auc_score(labels[te] == "tumour", proba[:, 1]), abs=1e-12)
    assert 0.5 < best["auroc"] < 1 and m["linear"]["auroc"]["mean"] is not None
    assert (tmp_path / "r/outputs/roc.png").stat().st_size > 0  # the best run's curve
    # slide counts and the split of every slide, once
    assert (m["n_train_slides"], m["n_val_slides"], m["n_test_slides"]) == (10, 10, 10)
    splits = _csv(tmp_path / "r/outputs/splits.csv")
    assert [r["slide_id"] for r in splits] == sorted(set(slides))
    assert {r["slide_id"]: r["split"] for r in splits} == dict(zip(slides, split))


def test_seeded_split_is_written_and_a_slide_in_two_splits_is_warned_about(tmp_path):
    x, labels, slides, _ = _study(n_slides=20)
    m = _ok("evaluate", _npz(tmp_path / "f.npz", x, labels, slides), "--method", "knn", "-o", tmp_path / "r")
    splits = {r["slide_id"]: r["split"] for r in _csv(tmp_path / "r/outputs/splits.csv")}
    assert len(splits) == 20 and sum(v == "test" for v in splits.values()) == m["n_test_slides"] > 0
    pred = _csv(tmp_path / "r/outputs/predictions.csv")
    assert len(pred) == m["n_test"] and all(splits[r["slide_id"]] == "test" for r in pred)
    split = _split_by_slide(slides)
    split[np.flatnonzero(slides == "S01")[0]] = "test"  # S01 (val) now has a test tile
    _ok("evaluate", _npz(tmp_path / "g.npz", x, labels, slides, split=split), "--method", "knn", "-o", tmp_path / "s")
    both = {r["slide_id"]: r["split"] for r in _csv(tmp_path / "s/outputs/splits.csv")}
    assert both["S01"] == "val+test"
    assert "1 slide(s) have rows in more than one split (e.g. 'S01')" in (tmp_path / "s/tub.log").read_text()


def test_multiclass_auroc_is_sklearn_one_vs_rest_macro(tmp_path):
    x, labels, slides, _ = _study(n_slides=36, classes=("a", "b", "c"), seed=1)
    split = _split_by_slide(slides, 4)
    m = _ok("evaluate", _npz(tmp_path / "f.npz", x, labels, slides, split=split), "--method", "linear",
            "--runs", "1", "--max-steps", "300", "-o", tmp_path / "r")
    pred = _csv(tmp_path / "r/outputs/predictions.csv")
    proba = np.array([[float(r[f"linear_prob_{c}"]) for c in "abc"] for r in pred])
    want = roc_auc_score(labels[split == "test"], proba, multi_class="ovr", average="macro", labels=list("abc"))
    assert m["linear"]["runs"][0]["auroc"] == pytest.approx(want, abs=1e-12)
    assert "knn_pred" not in pred[0]  # only the probe that ran


def test_auroc_is_null_with_a_logged_reason_when_a_class_has_no_test_rows(tmp_path):
    x, labels, slides, _ = _study(n_slides=36, classes=("a", "b", "c"), seed=2)
    split = _split_by_slide(slides, 4)
    split[(split == "test") & (labels == "c")] = "train"
    m = _ok("evaluate", _npz(tmp_path / "f.npz", x, labels, slides, split=split), "--method", "linear",
            "--runs", "2", "--max-steps", "100", "-o", tmp_path / "r")
    assert m["linear"]["auroc"]["mean"] is None and all(r["auroc"] is None for r in m["linear"]["runs"])
    assert "'c'" in m["linear"]["auroc_undefined"]
    assert "AUROC is undefined (null): class(es) 'c' have no test rows" in (tmp_path / "r/tub.log").read_text()


# ---------------------------------------------------------------- (A) slide-level bootstrap
def test_slide_bootstrap_resamples_whole_slides():
    """Two slides of 9 and 1 rows: a draw holds 2, 10 or 18 rows (resampling rows would always give 10),
    and the interval is the percentile of the draws, reproduced here with the same generator."""
    from tub_atlas.probes import slide_bootstrap

    slide_of_row = ["A"] * 9 + ["B"]
    sizes = []
    res = slide_bootstrap(lambda rows: sizes.append(len(rows)) or {"n": float(len(rows))}, slide_of_row, 400, seed=7)
    assert set(sizes) == {2, 10, 18} and res["slides"] == 2 and res["resamples_used"]["n"] == 400
    rng = np.random.default_rng(7)
    want = [float((np.array([9, 1])[rng.integers(0, 2, 2)]).sum()) for _ in range(400)]
    assert res["n"] == pytest.approx(np.quantile(want, [0.025, 0.975]).tolist())


def test_bootstrap_intervals_are_seeded_and_bracket_the_score(tmp_path):
    x, labels, slides, _ = _study(n_slides=30)
    f = _npz(tmp_path / "f.npz", x, labels, slides, split=_split_by_slide(slides))
    base = ["evaluate", f, "--runs", "1", "--max-steps", "200", "--bootstrap", "300"]
    a = _ok(*base, "-o", tmp_path / "a")
    b = _ok(*base, "-o", tmp_path / "b")
    c = _ok(*base, "--seed", "5", "-o", tmp_path / "c")
    for method in ("knn", "linear"):
        ci = a[method]["ci"]
        assert ci["level"] == 0.95 and ci["resamples"] == 300 and ci["slides"] == 10
        assert ci == b[method]["ci"] and ci != c[method]["ci"]
        score = a[method]["balanced_accuracy"] if method == "knn" else a["linear"]["runs"][0]["balanced_accuracy"]
        lo, hi = ci["balanced_accuracy"]
        assert lo <= score <= hi and lo < hi
    lo, hi = a["linear"]["ci"]["auroc"]
    assert lo <= a["linear"]["runs"][0]["auroc"] <= hi
    assert "ci" not in _ok("evaluate", f, "--method", "knn", "-o", tmp_path / "d")["knn"]  # default: none
    assert "rough" not in (tmp_path / "a/tub.log").read_text()
    _ok("evaluate", f, "--method", "both", "--bootstrap", "20", "-o", tmp_path / "e")
    log = (tmp_path / "e/tub.log").read_text()  # said once, though both probes are resampled
    assert log.count("--bootstrap 20: the 95% interval of so few resamples is rough") == 1


# ---------------------------------------------------------------- (B) --labels CSV for any input
def test_labels_csv_labels_embeds_slides_npz(tmp_path):
    """embed's slides.npz: one array per slide, key = slide id (SlideTables in embedding.py)."""
    rng = np.random.default_rng(0)
    ids = [f"case-{i}" for i in range(24)]
    y = np.arange(24) % 2
    np.savez(tmp_path / "slides.npz", **{s: (rng.standard_normal(8) + 2 * np.eye(8)[c]).astype(np.float32)
                                         for s, c in zip(ids, y)})
    msg = _fails("evaluate", tmp_path / "slides.npz", "-o", tmp_path / "r0")
    assert "slides.npz" in msg and "24 of 24" in msg and "--labels CSV" in msg
    split = ["test" if i % 4 == 0 else "train" for i in range(24)]
    labels = _write_csv(tmp_path / "labels.csv", ["slide_id", "label", "split"],
                        [(s, ["neg", "pos"][c], p) for s, c, p in zip(ids, y, split)])
    m = _ok("evaluate", tmp_path / "slides.npz", "--labels", labels, "--method", "knn", "--k", "3",
            "-o", tmp_path / "r")
    assert m["classes"] == ["neg", "pos"] and (m["n_train"], m["n_test"], m["n_test_slides"]) == (18, 6, 6)
    assert [r["slide_id"] for r in _csv(tmp_path / "r/outputs/predictions.csv")] == ids[::4]
    short = _write_csv(tmp_path / "short.csv", ["slide_id", "label"], [(s, "neg") for s in ids[:21]])
    msg = _fails("evaluate", tmp_path / "slides.npz", "--labels", short, "-o", tmp_path / "r2")
    assert "short.csv has no label for 3 of 24 row(s)" in msg and "'case-21'" in msg
    tiles = tmp_path / "tiles.npz"  # one row per tile, same width: one probe over both would mix two tasks
    np.savez(tiles, features=rng.standard_normal((4, 8)).astype(np.float32), labels=np.array(["neg", "pos"] * 2),
             slide_id=np.array(ids[:4]))
    msg = _fails("evaluate", tmp_path / "slides.npz", tiles, "--labels", labels, "-o", tmp_path / "r3")
    assert "mix slide embeddings (slides.npz) and tile embeddings" in msg
    bom = tmp_path / "bom.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    bom.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())
    assert _ok("evaluate", tmp_path / "slides.npz", "--labels", bom, "--method", "knn", "--k", "3",
               "-o", tmp_path / "r4")["n_test"] == 6


def _trident_h5(path, x, coords):
    with h5py.File(path, "w") as f:
        f["features"] = x
        f["coords"] = coords


def test_trident_features_folder_is_probed_with_labels(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "features_uni"
    folder.mkdir()
    ids = [f"TCGA-{i:02d}" for i in range(12)]
    for i, s in enumerate(ids):
        n = 3 + i % 3
        _trident_h5(folder / f"{s}.h5", (rng.standard_normal((n, 6)) + 2 * np.eye(6)[i % 2]).astype(np.float32),
                    np.stack([np.arange(n) * 224, np.full(n, 448)], 1))
    msg = _fails("evaluate", folder, "-o", tmp_path / "r0")
    assert "TCGA-00.h5" in msg and "--labels CSV" in msg
    labels = _write_csv(tmp_path / "l.csv", ["slide_id", "label"], [(s, f"grade{i % 2}") for i, s in enumerate(ids)])
    m = _ok("evaluate", folder, "--labels", labels, "--method", "knn", "--k", "3", "-o", tmp_path / "r")
    assert m["n_train"] + m["n_val"] + m["n_test"] == sum(3 + i % 3 for i in range(12))
    assert m["n_train_slides"] + m["n_val_slides"] + m["n_test_slides"] == 12
    pred = _csv(tmp_path / "r/outputs/predictions.csv")
    assert pred[0]["patch_id"].endswith("_448") and pred[0]["source"].endswith(f"{pred[0]['slide_id']}.h5")
    # one TRIDENT file alone, too
    one = _ok("evaluate", folder / "TCGA-00.h5", folder / "TCGA-01.h5", folder / "TCGA-02.h5", folder / "TCGA-03.h5",
              "--labels", labels, "--method", "knn", "--k", "1", "-o", tmp_path / "r1")
    assert one["n_train_slides"] + one["n_val_slides"] + one["n_test_slides"] == 4


def test_slide_h5_with_empty_labels_names_the_file_and_takes_labels_by_tile(tmp_path):
    """embed's whole-slide h5 carries empty labels; a tile-level CSV (patch_id = x_y) labels its tiles."""
    rng = np.random.default_rng(4)
    paths = []
    for s in range(8):
        path = tmp_path / f"slide{s}.h5"
        coords = np.stack([np.arange(6) * 64, np.zeros(6, int)], 1)
        with h5py.File(path, "w") as f:
            f["features"] = (rng.standard_normal((6, 4)) + 2 * np.eye(4)[np.arange(6) % 2]).astype(np.float32)
            f["coords"] = coords
            f["slide_id"] = np.array([f"slide{s}"] * 6, dtype="S")
            f["label"] = np.array([""] * 6, dtype="S")
        paths.append(path)
    msg = _fails("evaluate", *paths, "-o", tmp_path / "r0")
    assert "slide0.h5 has no label for 6 of 6 row(s)" in msg and "--labels CSV" in msg
    rows = [(f"slide{s}", f"{t * 64}_0", ["stroma", "tumour"][t % 2]) for s in range(8) for t in range(6)]
    labels = _write_csv(tmp_path / "tiles.csv", ["slide_id", "patch_id", "label"], rows)
    m = _ok("evaluate", *paths, "--labels", labels, "--method", "knn", "--k", "3", "-o", tmp_path / "r")
    assert m["classes"] == ["stroma", "tumour"]
    assert m["support"]["train"]["stroma"] == m["support"]["train"]["tumour"] > 0  # tiles, not slides, labelled
    # a tile-level CSV cannot label an input that records no patch ids
    np.savez(tmp_path / "plain.npz", features=np.zeros((4, 4), np.float32), slide_id=np.array(["slide0"] * 4))
    msg = _fails("evaluate", tmp_path / "plain.npz", "--labels", labels, "-o", tmp_path / "r2")
    assert "records no patch ids" in msg


def test_labels_csv_split_replaces_the_input_split_and_bad_rows_are_named(tmp_path):
    x, labels, slides, _ = _study(n_slides=12)
    f = _npz(tmp_path / "f.npz", x, np.array([""] * len(x)), slides)
    ids = sorted(set(slides))
    csv_path = _write_csv(tmp_path / "l.csv", ["slide_id", "label", "split"],
                          [(s, f"c{i % 2}", "Test" if i < 4 else "train") for i, s in enumerate(ids)])
    m = _ok("evaluate", f, "--labels", csv_path, "--method", "knn", "--k", "3", "-o", tmp_path / "r")
    assert (m["n_test_slides"], m["n_train_slides"], m["n_val_slides"]) == (4, 8, 0)
    bad = _write_csv(tmp_path / "bad.csv", ["slide_id", "label", "split"],
                     [(ids[0], "c0", "train"), (ids[1], "c1", "holdout")])
    msg = _fails("evaluate", f, "--labels", bad, "-o", tmp_path / "r2")
    assert "bad.csv" in msg and "line 3" in msg and "'holdout'" in msg
    dup = _write_csv(tmp_path / "dup.csv", ["slide_id", "label"], [(ids[0], "c0"), (ids[0], "c1")])
    msg = _fails("evaluate", f, "--labels", dup, "-o", tmp_path / "r3")
    assert "lines 2 and 3" in msg
    nolabel = _write_csv(tmp_path / "nl.csv", ["slide_id", "class"], [(ids[0], "c0")])
    assert "no label column" in _fails("evaluate", f, "--labels", nolabel, "-o", tmp_path / "r4")


@pytest.mark.parametrize("kind", ["npz", "h5"])
def test_metadata_for_an_input_that_does_not_read_it_is_an_error(tmp_path, kind):
    x, labels, slides, _ = _study(n_slides=6)
    if kind == "npz":
        f = _npz(tmp_path / "f.npz", x, labels, slides)
    else:
        f = tmp_path / "f.h5"
        with h5py.File(f, "w") as h:
            h["features"] = x
            h["label"] = labels.astype("S")
            h["slide_id"] = slides.astype("S")
    meta = _write_csv(tmp_path / "meta.csv", ["slide_id", "patch_id", "biological_class", "medical_center"], [])
    msg = _fails("evaluate", f, "--metadata", meta, "-o", tmp_path / "r")
    assert "--metadata" in msg and str(f) in msg and "--labels CSV" in msg


# ---------------------------------------------------------------- (C) probe provenance in explain
@pytest.fixture(scope="module")
def mean_pool_probe(atlas_demo_tiles, tmp_path_factory):
    """A probe trained on mean-pooled vit-t8-demo features (192-dim, as CLS features are)."""
    root = tmp_path_factory.mktemp("probe")
    W = atlas_demo_tiles / "vit-t8-demo-random.safetensors"
    r = _run("embed", atlas_demo_tiles / "tiles.npz", "--arch", "vit-t8-demo", "--weights", W, "--pool", "mean",
             "-o", root / "e")
    assert r.exit_code == 0, r.stderr
    r = _run("evaluate", root / "e", "--runs", "1", "--max-steps", "50", "-o", root / "ev")
    assert r.exit_code == 0, r.stderr
    return W, root / "ev/outputs/probe.safetensors"


def test_probe_json_records_the_embed_runs_encoder(mean_pool_probe):
    W, probe = mean_pool_probe
    rec = json.loads(probe.with_suffix(".json").read_text())
    assert rec["dim"] == 192 and rec["encoder"]["pool"] == "mean" and rec["encoder"]["arch"] == "vit-t8-demo"
    assert Path(rec["encoder"]["weights"]).resolve() == W.resolve() and rec["encoder"]["transform"]["img_size"] == 64


def test_explain_refuses_a_probe_of_another_pooling_and_names_the_class(atlas_demo_tiles, mean_pool_probe, tmp_path):
    W, probe = mean_pool_probe
    base = ["explain", atlas_demo_tiles / "tiles.npz", "--arch", "vit-t8-demo", "--weights", W, "--target", "probe",
            "--probe", probe, "--index", "1", "--max-tiles", "1"]
    msg = _fails(*base, "--pool", "cls", "-o", tmp_path / "x")
    assert "pool 'mean'" in msg and "pool 'cls'" in msg and "--pool mean" in msg
    classes = json.loads(probe.with_suffix(".json").read_text())["classes"]
    r = _ok(*base, "--pool", "mean", "-o", tmp_path / "y")
    assert r["probe_class"] == classes[1] and repr(classes[1]) in r["explains"]
    assert "check they are the same" not in (tmp_path / "y/tub.log").read_text()  # same weights: no warning
    import shutil

    shutil.copy(W, tmp_path / "copy.safetensors")  # the same bytes elsewhere: the same model (sha256)
    _ok(*[tmp_path / "copy.safetensors" if a == W else a for a in base], "--pool", "mean", "-o", tmp_path / "c")
    assert "check they are the same" not in (tmp_path / "c/tub.log").read_text()
    other = tmp_path / "other.safetensors"  # other bytes: warned
    from safetensors.torch import load_file, save_file

    sd = load_file(str(W))
    sd["cls_token"] = sd["cls_token"] + 1.0
    save_file(sd, str(other))
    _ok(*[other if a == W else a for a in base], "--pool", "mean", "-o", tmp_path / "o")
    assert "check they are the same" in (tmp_path / "o/tub.log").read_text()
    msg = _fails(*base, "--pool", "cls+mean", "-o", tmp_path / "z")  # 384 wide: still named by its pooling
    assert "pool 'mean'" in msg and "--pool mean" in msg


def test_explain_says_what_width_a_probe_without_provenance_expects(atlas_demo_tiles, tmp_path):
    from tubcli.io import save_safetensors, write_json
    import torch

    save_safetensors(tmp_path / "probe.safetensors", {"weight": torch.zeros(2, 5), "bias": torch.zeros(2)})
    write_json(tmp_path / "probe.json", {"classes": ["a", "b"], "dim": 5})  # an older evaluate's record
    msg = _fails("explain", atlas_demo_tiles / "tiles.npz", "--arch", "vit-t8-demo", "--random-init", "--target",
                 "probe", "--probe", tmp_path / "probe.safetensors", "-o", tmp_path / "x")
    assert "expects 5-dim features" in msg and "gives 384 (pool cls+mean)" in msg and "--pool" in msg


def test_embed_runs_of_one_weights_file_copied_to_two_places_are_one_encoder(atlas_demo_tiles, tmp_path):
    """Node-local copies of the weights (same bytes, other paths) are one encoder; other bytes are not."""
    import shutil

    from safetensors.torch import load_file, save_file

    W = atlas_demo_tiles / "vit-t8-demo-random.safetensors"
    for name in ("a", "b"):
        shutil.copy(W, tmp_path / f"{name}.safetensors")
        _ok("embed", atlas_demo_tiles / "tiles.npz", "--weights", tmp_path / f"{name}.safetensors", "-o", tmp_path / name)
    assert _ok("evaluate", tmp_path / "a", tmp_path / "b", "--method", "knn", "-o", tmp_path / "ev")["n_test"] > 0
    sd = load_file(str(W))
    sd["cls_token"] = sd["cls_token"] + 1.0
    save_file(sd, str(tmp_path / "c.safetensors"))
    _ok("embed", atlas_demo_tiles / "tiles.npz", "--weights", tmp_path / "c.safetensors", "-o", tmp_path / "c")
    msg = _fails("evaluate", tmp_path / "a", tmp_path / "c", "--method", "knn", "-o", tmp_path / "ev2")
    assert "come from different encoders (weights_sha256" in msg


def test_a_knn_rerun_leaves_no_earlier_probe_and_shared_slide_ids_are_said(tmp_path):
    x, labels, slides, _ = _study(n_slides=30)
    f = _npz(tmp_path / "f.npz", x, labels, slides, split=_split_by_slide(slides))
    _ok("evaluate", f, "--runs", "1", "--max-steps", "50", "-o", tmp_path / "r")
    assert (tmp_path / "r/outputs/probe.json").is_file()
    _ok("evaluate", f, "--method", "knn", "-o", tmp_path / "r")
    assert not (tmp_path / "r/outputs/probe.json").exists() and not (tmp_path / "r/outputs/probe.safetensors").exists()
    # batch_size here is the linear probe's (it changes results): a setting, not an execution detail
    probe = ["evaluate", f, "--runs", "1", "--max-steps", "50", "-o", tmp_path / "r"]
    _ok(*probe)
    before = len(list((tmp_path / "r").glob("config.*.yaml")))
    _ok(*probe, "--set", "batch_size=64")  # only the probe's batch size differs: the earlier config is kept
    assert len(list((tmp_path / "r").glob("config.*.yaml"))) == before + 1
    g = _npz(tmp_path / "g.npz", x, labels, slides, split=_split_by_slide(slides))  # the same ids from another input
    _ok("evaluate", f, g, "--method", "knn", "-o", tmp_path / "both")
    assert "30 slide id(s) come from more than one input" in (tmp_path / "both/tub.log").read_text()
