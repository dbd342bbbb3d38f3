"""Whole-slide feature layouts: a folder of per-slide h5 files (features, coords; patch_id = "x_y") and a
folder of per-slide atlas npy folders, read as one input and matched to the metadata by (slide_id, patch_id)."""

import json
import logging

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from tub_pathorob.features import load_features, read_inputs  # noqa: E402
from tub_pathorob.metadata import read_metadata  # noqa: E402
from tub_pathorob.synthetic import synthetic_features  # noqa: E402
from tubcli.errors import TubError  # noqa: E402
from tubcli.testing import invoke  # noqa: E402


@pytest.fixture
def cohort(tmp_path):
    """Synthetic tiles with level-0 coords (patch_id = "x_y"): one h5 per slide with its tiles in another
    order than the metadata, the same rows as a plain features.npy, and the metadata CSV."""
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=12, dim=16, seed=3)
    rng = np.random.default_rng(0)
    coords = np.zeros((len(X), 2), dtype=np.int64)
    for s in dict.fromkeys(meta.slide_id):
        rows = np.flatnonzero(meta.slide_id == s)
        coords[rows, 0] = rng.choice(50, size=len(rows), replace=False) * 224  # distinct tiles of one slide
        coords[rows, 1] = 448
    meta.columns["patch_id"] = np.array([f"{x}_{y}" for x, y in coords], dtype=object)
    h5_dir = tmp_path / "embed" / "outputs"
    h5_dir.mkdir(parents=True)
    for s in dict.fromkeys(meta.slide_id):
        rows = rng.permutation(np.flatnonzero(meta.slide_id == s))  # file order != metadata order
        with h5py.File(h5_dir / f"{s}.h5", "w") as f:
            f.create_dataset("features", data=X[rows].astype(np.float32))
            f.create_dataset("coords", data=coords[rows])
    meta.write_csv(tmp_path / "meta.csv")
    np.save(tmp_path / "features.npy", X.astype(np.float32))
    return X.astype(np.float32), meta, h5_dir, tmp_path


def test_h5_folder_equals_plain_matrix(cohort):
    X, meta, h5_dir, tmp = cohort
    Y, m = load_features(h5_dir, read_metadata(tmp / "meta.csv"))
    P, _ = load_features(tmp / "features.npy", read_metadata(tmp / "meta.csv"))
    assert Y.dtype == np.float32 and np.array_equal(Y, P) and np.array_equal(Y, X)
    assert list(m.patch_id) == list(meta.patch_id)


def test_h5_metadata_order_is_kept(cohort):
    X, meta, h5_dir, tmp = cohort
    p = np.random.default_rng(1).permutation(len(X))
    meta.take(p).write_csv(tmp / "shuffled.csv")
    Y, m = read_inputs(h5_dir, tmp / "shuffled.csv")
    assert np.array_equal(Y, X[p]) and list(m.slide_id) == list(meta.slide_id[p])


def test_h5_ri_through_cli_matches_plain(cohort):
    _, _, h5_dir, tmp = cohort
    runs = {}
    for name, feats in (("h5", h5_dir), ("plain", tmp / "features.npy")):
        r = invoke(["pathorob", "ri", feats, "--metadata", tmp / "meta.csv", "--k", "5", "--json", "-o", tmp / name])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert runs["h5"] == runs["plain"]
    # the embed run directory itself points at its outputs folder
    (h5_dir.parent / "env.json").write_text("{}")
    r = invoke(["pathorob", "ri", h5_dir.parent, "--metadata", tmp / "meta.csv", "--k", "5", "-o", tmp / "x"])
    assert r.exit_code == 2 and f"give the features in it ({h5_dir})" in r.stderr


def test_h5_missing_tile_and_slide_are_one_line_errors(cohort):
    X, meta, h5_dir, tmp = cohort
    rows = (tmp / "meta.csv").read_text().splitlines()
    patch = meta.patch_id[0]
    (tmp / "bad.csv").write_text("\n".join([rows[0], rows[1].replace(patch, "1_1"), *rows[2:]]) + "\n")
    r = invoke(["pathorob", "ri", h5_dir, "--metadata", tmp / "bad.csv", "--k", "5", "-o", tmp / "bad"])
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(err) == 1 and "Traceback" not in r.output
    assert f"{meta.slide_id[0]}.h5: 1 metadata row(s) of slide {meta.slide_id[0]} have no tile there" in err[0]
    assert "patch_id '1_1'" in err[0] and 'f"{x}_{y}"' in err[0]
    (h5_dir / f"{meta.slide_id[0]}.h5").unlink()
    with pytest.raises(TubError, match=f"no features file for slide_id '{meta.slide_id[0]}'"):
        read_inputs(h5_dir, tmp / "meta.csv")


def test_h5_duplicate_tile_and_unused_slide(cohort, caplog):
    X, meta, h5_dir, tmp = cohort
    s = meta.slide_id[-1]
    meta.where(meta.slide_id != s).write_csv(tmp / "fewer.csv")
    with caplog.at_level(logging.INFO):
        Y, m = read_inputs(h5_dir, tmp / "fewer.csv")  # a slide file the metadata does not name is skipped
    assert len(m) == len(meta) - (meta.slide_id == s).sum() and "1 of 12 slide file(s)" in caplog.text
    with h5py.File(h5_dir / f"{s}.h5", "a") as f:
        c = f["coords"][()]
        c[1] = c[0]
        f["coords"][...] = c
    with pytest.raises(TubError, match=r"is in rows 0 and 1; each tile must be there once"):
        read_inputs(h5_dir, tmp / "meta.csv")


def test_slide_level_metadata_expands_to_tiles(cohort, caplog):
    X, meta, h5_dir, tmp = cohort
    slides = list(dict.fromkeys(meta.slide_id))[::-1]  # slide order differs from the tile rows'
    first = [int(np.flatnonzero(meta.slide_id == s)[0]) for s in slides]
    lines = ["slide_id,biological_class,medical_center"] + [
        f"{s},{meta.biological_class[i]},{meta.medical_center[i]}" for s, i in zip(slides, first)]
    (tmp / "slides.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO):
        Y, m = read_inputs(h5_dir, tmp / "slides.csv")
    assert f"{len(X)} tile rows from {len(slides)} slides" in caplog.text
    assert list(dict.fromkeys(m.slide_id)) == slides and set(m.subset) == {"ID"}
    key = {k: i for i, k in enumerate(meta.keys())}
    order = [key[k] for k in m.keys()]  # every tile once, with its own features and its slide's labels
    assert sorted(order) == list(range(len(X))) and np.array_equal(Y, X[order])
    assert list(m.biological_class) == list(meta.biological_class[order])
    assert list(m.medical_center) == list(meta.medical_center[order])
    # the same RI as the tile-level table (the kNN is exact; rows differ only in order)
    r = invoke(["pathorob", "ri", h5_dir, "--metadata", tmp / "slides.csv", "--k", "5", "--no-auc", "--json",
                "-o", tmp / "slides"])
    t = invoke(["pathorob", "ri", h5_dir, "--metadata", tmp / "meta.csv", "--k", "5", "--no-auc", "--json",
                "-o", tmp / "tiles"])
    assert r.exit_code == 0 and t.exit_code == 0, r.output + t.output
    got, want = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (r, t))
    assert got["robustness_index"] == pytest.approx(want["robustness_index"], abs=1e-12)
    # other layouts name their tiles only through the metadata: patch_id stays required, and the error says so
    with pytest.raises(TubError, match="slide-level rows without patch_id are read only with a folder of per-slide h5"):
        read_inputs(tmp / "features.npy", tmp / "slides.csv")


def test_folder_of_atlas_npy_folders(cohort):
    X, meta, _, tmp = cohort
    nested = tmp / "npy" / "outputs"
    for s in dict.fromkeys(meta.slide_id):  # `tub atlas embed --format npy` on slides: one folder per slide
        rows = np.flatnonzero(meta.slide_id == s)[::-1]
        (nested / s).mkdir(parents=True)
        np.save(nested / s / "embeddings.npy", X[rows])
        meta.take(rows).write_csv(nested / s / "manifest.csv")
    p = np.random.default_rng(2).permutation(len(X))
    meta.take(p).write_csv(tmp / "shuffled.csv")
    Y, m = read_inputs(nested, tmp / "shuffled.csv")
    assert np.array_equal(Y, X[p]) and list(m.patch_id) == list(meta.patch_id[p])
    Y, m = read_inputs(nested, None)  # without --metadata the manifests are the metadata
    assert len(Y) == len(X) and np.array_equal(Y, X[[dict(zip(meta.keys(), range(len(X))))[k] for k in m.keys()]])
    lines = (tmp / "shuffled.csv").read_text().splitlines()
    (tmp / "bad.csv").write_text("\n".join([lines[0], lines[1].replace(meta.patch_id[p[0]], "9_9"), *lines[2:]]))
    with pytest.raises(TubError, match=r"1 metadata row\(s\) are not in any sub-folder's manifest.csv"):
        read_inputs(nested, tmp / "bad.csv")
