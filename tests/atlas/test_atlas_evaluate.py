"""``atlas evaluate`` on the inputs a user can get wrong (tiny generated NPZ/CSV files): non-finite
features, split columns (aliases, bad or empty cells), integer labels and kNN ties against scikit-learn,
PathoROB metadata without its columns, and a k larger than the training set."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, recall_score
from sklearn.neighbors import KNeighborsClassifier

from tubcli.testing import invoke


def _evaluate(*args):
    return invoke(["atlas", "evaluate", *map(str, args)])


def _ok(*args):
    r = _evaluate(*args, "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def _fails(*args):
    r = _evaluate(*args)
    assert r.exit_code == 2, r.stderr + r.stdout
    msg = r.stderr.strip()
    assert "Traceback" not in msg and len(msg.splitlines()) == 1
    return msg


def _npz(path, n=200, d=16, labels=None, split=None, seed=0):
    rng = np.random.default_rng(seed)
    y = np.asarray(labels) if labels is not None else rng.integers(0, 3, n)
    x = rng.standard_normal((len(y), d)) + 0.7 * np.eye(d)[y % d]
    arrays = {"features": x.astype(np.float32), "labels": y}
    if split is not None:
        arrays["split"] = np.asarray(split)
    np.savez(path, **arrays)
    return path


def _split(n, n_train=140, n_val=20):
    return np.array(["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val))


def test_nan_features_are_an_error_naming_file_and_rows(tmp_path):
    f = _npz(tmp_path / "nan.npz")
    z = dict(np.load(f))
    z["features"][17, 3] = np.nan
    z["features"][42, 0] = np.inf
    np.savez(f, **z)
    msg = _fails(f, "--method", "knn", "-o", tmp_path / "r")
    assert "nan.npz" in msg and "17, 42" in msg


def test_split_aliases_are_normalised(tmp_path):
    split = _split(200).astype(object)
    split[140:150] = "Valid"
    split[150:160] = " VALIDATION "
    split[160:] = "Test"
    split[:10] = "TRAIN"
    m = _ok(_npz(tmp_path / "a.npz", split=split.astype(str)), "--method", "knn", "-o", tmp_path / "r")
    assert (m["n_train"], m["n_val"], m["n_test"]) == (140, 20, 40)


@pytest.mark.parametrize("bad", ["bogus", ""])
def test_unknown_or_empty_split_is_an_error_naming_the_row(tmp_path, bad):
    split = _split(200)
    split = split.astype(object)
    split[57] = bad
    msg = _fails(_npz(tmp_path / "b.npz", split=split.astype(str)), "--method", "knn", "-o", tmp_path / "r")
    assert "row 57" in msg and f"split {bad!r}" in msg and "validation" in msg and "test" in msg


def test_empty_split_cell_in_a_manifest_names_its_line(tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    np.save(folder / "embeddings.npy", np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32))
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile_id", "label", "slide_id", "split"])
        for i, s in enumerate(["train", "train", "val", "", "test", "test"]):
            w.writerow([i, i % 2, f"s{i}", s])
    msg = _fails(folder, "--method", "knn", "-o", tmp_path / "r")
    assert "manifest.csv" in msg and "row 3 (line 5)" in msg


@pytest.mark.parametrize("k", [4, 20])
def test_integer_labels_sort_numerically_and_knn_ties_match_sklearn(tmp_path, k):
    rng = np.random.default_rng(3)
    labels = rng.choice([1, 2, 10], 240)
    split = _split(240, 180, 0)
    m = _ok(_npz(tmp_path / "ints.npz", labels=labels, split=split, seed=3), "--method", "knn", "--k", k,
            "-o", tmp_path / "r")
    assert m["classes"] == ["1", "2", "10"]
    x = np.load(tmp_path / "ints.npz")["features"].astype(np.float64)
    tr, te = split == "train", split == "test"
    ref = KNeighborsClassifier(k, metric="cosine", algorithm="brute").fit(x[tr], labels[tr]).predict(x[te])
    assert m["knn"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels[te], ref), abs=1e-12)
    assert m["knn"]["recall_per_class"] == pytest.approx(
        recall_score(labels[te], ref, labels=[1, 2, 10], average=None).tolist(), abs=1e-12)


def test_pathorob_metadata_without_its_columns_is_a_clear_error(tmp_path):
    feats = tmp_path / "outputs"
    feats.mkdir()
    np.savez(feats / "center0.npz", **{"s0-p0": np.zeros(4, np.float32)})
    meta = tmp_path / "meta.csv"
    meta.write_text("slide_id,patch_id\ns0,p0\n")
    msg = _fails(feats, "--metadata", meta, "-o", tmp_path / "r")
    assert "meta.csv" in msg and "biological_class, medical_center" in msg


def test_k_above_the_training_rows_is_clamped_and_reported(tmp_path):
    m = _ok(_npz(tmp_path / "k.npz", split=_split(200)), "--method", "knn", "--k", "1000", "-o", tmp_path / "r")
    assert m["n_train"] == 140 and m["knn"]["k"] == 140 and m["knn"]["k_requested"] == 1000
    assert "kNN uses k = 140" in (tmp_path / "r" / "tub.log").read_text()


def test_a_class_without_test_rows_has_no_recall():
    from tub_atlas.probes import classification_metrics

    m = classification_metrics(np.array([0, 0, 0]), np.array([0, 0, 1]), n_classes=2)
    assert m["recall_per_class"][0] == pytest.approx(2 / 3) and np.isnan(m["recall_per_class"][1])
    assert m["balanced_accuracy"] == pytest.approx(2 / 3) and m["support"] == [3, 0]


def test_eva_manifest_with_bf16_embeddings_is_read(tmp_path):
    """eva may store bf16 (or GPU) tensors: they load onto the CPU and widen to float32."""
    import torch

    from tub_atlas.features import read_features

    rows = []
    for i in range(4):
        torch.save(torch.full((3,), i + 0.5, dtype=torch.bfloat16), tmp_path / f"e{i}.pt")
        rows.append({"origin": f"t{i}", "embeddings": f"e{i}.pt", "target": str(i % 2), "split": "train"})
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    feats = read_features(tmp_path)
    assert feats.x.dtype == np.float32 and feats.x[:, 0].tolist() == [0.5, 1.5, 2.5, 3.5]


def test_an_eva_embedding_that_pickles_code_is_refused_in_one_line(tmp_path):
    """Loaded with weights_only like every other .pt: the error says why, never torch's advice to retry
    with weights_only=False."""
    import pickle

    import torch

    from tub_atlas.features import read_features
    from tubcli.errors import TubError

    torch.save(torch.ones(3), tmp_path / "e0.pt")
    torch.save({"x": torch.ones(3), "fn": print}, tmp_path / "e1.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    (tmp_path / "manifest.csv").write_text("origin,embeddings,target,split\nt0,e0.pt,0,train\nt1,e1.pt,1,train\n")
    with pytest.raises(TubError) as err:
        read_features(tmp_path)
    assert "e1.pt cannot be loaded safely: it " in str(err.value)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "manifest.csv").write_text("origin,embeddings,target,split\nt0,e0.pt,0,train\nt1,e9.pt,1,train\n")
    with pytest.raises(TubError, match="e9.pt does not exist"):
        read_features(tmp_path)


def test_make_data_out_is_a_path_with_the_home_folder(tmp_path, monkeypatch):
    """OUT was plain text: `~/d` made a folder named `~` here instead of d in the home folder."""
    from tubcli.testing import invoke

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    res = invoke(["atlas", "make-data", "~/d", "--n-per-class", "2", "-o", tmp_path / "r"])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "home" / "d" / "tiles").is_dir() and not (tmp_path / "~").exists()
