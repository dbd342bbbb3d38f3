"""Input readers (official per-center npz, plain npy/npz, tub atlas embed output) and one-line errors."""

import numpy as np
import pytest

from tub_pathorob.features import load_features, write_official, write_plain
from tub_pathorob.metadata import Metadata, read_metadata
from tub_pathorob.robustness_index import robustness_index
from tub_pathorob.synthetic import synthetic_features
from tubcli.errors import TubError


@pytest.fixture
def data(tmp_path):
    X, meta = synthetic_features(centers=("Center A", "B"), slides_per_cell=3, tiles_per_slide=15, seed=1)
    meta.write_csv(tmp_path / "metadata.csv")
    return X, meta, tmp_path


def test_official_layout_round_trip(data):
    X, meta, tmp = data
    files = write_official(tmp / "feats", X, meta)
    assert sorted(f.name for f in files) == ["B.npz", "Center_A.npz"]  # spaces -> _
    with np.load(tmp / "feats" / "B.npz") as z:
        key = f"{meta.slide_id[-1]}-{meta.patch_id[-1]}"
        assert np.array_equal(z[key], X[-1])
    # rows follow the metadata order, whatever order it has
    p = np.random.default_rng(0).permutation(len(X))
    meta.take(p).write_csv(tmp / "shuffled.csv")
    Y, m2 = load_features(tmp / "feats", read_metadata(tmp / "shuffled.csv"))
    assert np.array_equal(Y, X[p]) and list(m2.slide_id) == list(meta.slide_id[p])


def test_official_layout_compressed_or_mixed_npz_takes_general_path(data):
    """The fast reader (offsets from the zip central directory) declines compressed or mixed-dtype npz
    files; the general reader then gives the same rows."""
    from tub_pathorob.features import _read_npz_matrix

    X, meta, tmp = data
    keys = meta.keys()
    folder = tmp / "feats_z"
    folder.mkdir()
    for center in dict.fromkeys(meta.medical_center):
        rows = np.flatnonzero(meta.medical_center == center)
        vec = {keys[i]: (X[i] if j else X[i].astype(np.float32)) for j, i in enumerate(rows)}  # one float32
        save = np.savez_compressed if center == "B" else np.savez
        save(folder / f"{center.replace(' ', '_')}.npz", **vec)
        data = (folder / f"{center.replace(' ', '_')}.npz").read_bytes()
        assert _read_npz_matrix(data, [keys[i] for i in rows]) is None  # mixed dtypes
        rest = [keys[i] for i in rows[:0:-1]]  # float64 members only, in reverse order
        if center == "B":
            assert _read_npz_matrix(data, rest) is None  # compressed
        else:
            assert np.array_equal(_read_npz_matrix(data, rest), X[rows[:0:-1]])
    Y, _ = load_features(folder, meta)
    assert np.allclose(Y, X, atol=1e-6)


def test_official_layout_names_the_vector_of_odd_length(data):
    X, meta, tmp = data
    keys = meta.keys()
    folder = tmp / "odd"
    folder.mkdir()
    for center in dict.fromkeys(meta.medical_center):
        rows = np.flatnonzero(meta.medical_center == center)
        vec = {keys[i]: X[i] for i in rows}
        if center == "Center A":
            vec[keys[rows[0]]] = X[rows[0], :3]  # the first vector read is the odd one
        np.savez(folder / f"{center.replace(' ', '_')}.npz", **vec)
    with pytest.raises(TubError, match=f"feature '{keys[0]}' has shape \\(3,\\), expected \\({X.shape[1]},\\)"):
        load_features(folder, meta)


def test_plain_npy_and_npz(data):
    X, meta, tmp = data
    write_plain(tmp / "X.npy", X)
    Y, _ = load_features(tmp / "X.npy", read_metadata(tmp / "metadata.csv"))
    assert np.array_equal(X, Y)
    np.savez(tmp / "X.npz", features=X)
    Y, _ = load_features(tmp / "X.npz", read_metadata(tmp / "metadata.csv"))
    assert np.array_equal(X, Y)


def test_atlas_embed_npy_output(data):
    """`tub atlas embed --format npy`: embeddings.npy + manifest.csv, matched by slide/patch."""
    X, meta, tmp = data
    d = tmp / "atlas"
    d.mkdir()
    p = np.random.default_rng(1).permutation(len(X))
    np.save(d / "embeddings.npy", X[p].astype(np.float32))
    meta.take(p).write_csv(d / "manifest.csv")
    Y, m = load_features(d, read_metadata(tmp / "metadata.csv"))
    assert np.array_equal(Y, X.astype(np.float32)) and Y.dtype == np.float32
    Y2, m2 = load_features(d, None)  # manifest doubles as metadata
    assert len(m2) == len(X)


def test_bad_metadata_errors_are_one_line(data, tmp_path):
    X, meta, tmp = data
    bad = tmp / "bad.csv"
    bad.write_text("subset,slide_id,patch_id,medical_center\nID,s,0,A\n")
    e = pytest.raises(TubError, read_metadata, bad).value
    assert "biological_class" in str(e) and "\n" not in str(e)
    twice = "subset,slide_id,patch_id,biological_class,medical_center\nID,s,0,x,A\nID,s,1,x,A\nID,s,0,x,A\n"
    bad.write_text(twice)
    with pytest.raises(TubError, match="lines 2 and 4 are the same tile"):
        read_metadata(bad)
    bad.write_text(twice.replace("ID,s,1,x,A\n", "ID,s,1,x,A\n\n"))  # a blank line: lines still count
    with pytest.raises(TubError, match="lines 2 and 5 are the same tile"):
        read_metadata(bad)
    bad.write_text(twice.replace("ID,s,0,x,A\n", "S1,s,0,x,A\n", 1))  # paired subsets may share a tile
    assert len(read_metadata(bad)) == 3
    # unknown slide ids: the metadata names a tile that has no feature
    write_official(tmp / "feats", X, meta)
    cols = {k: v.copy() for k, v in meta.columns.items()}
    cols["slide_id"][0] = "NOT-A-SLIDE"
    e = pytest.raises(TubError, load_features, tmp / "feats", Metadata(cols, "m.csv")).value
    assert "NOT-A-SLIDE" in str(e) and "\n" not in str(e)
    # row count mismatch for plain features
    write_plain(tmp / "X.npy", X[:-1])
    assert "rows" in str(pytest.raises(TubError, load_features, tmp / "X.npy", meta).value)


def test_single_center_and_small_class_and_zero_rows():
    X, meta = synthetic_features(centers=("only",), slides_per_cell=3, tiles_per_slide=10, seed=2)
    assert "one medical center" in str(pytest.raises(TubError, robustness_index, X, meta, k=5).value)
    X, meta = synthetic_features(slides_per_cell=1, tiles_per_slide=5, seed=2)
    e = pytest.raises(TubError, robustness_index, X, meta, k=11).value
    assert "fewer than k=11" in str(e)
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=10, seed=2)
    X[3] = 0
    assert "all zeros" in str(pytest.raises(TubError, robustness_index, X, meta, k=5).value)
    with pytest.raises(TubError, match="custom dataset"):
        robustness_index(X, meta)


def test_class_center_name_collision():
    X, meta = synthetic_features(classes=("A", "B"), centers=("A", "C"), slides_per_cell=2, tiles_per_slide=10)
    assert "overlap" in str(pytest.raises(TubError, robustness_index, X, meta, k=3).value)


def test_atlas_manifest_with_label_column(tmp_path):
    """tub atlas writes `label` (the class) and medical_center in manifest.csv; no --metadata needed."""
    X, meta = synthetic_features(slides_per_cell=2, tiles_per_slide=5, seed=3)
    d = tmp_path / "emb"
    d.mkdir()
    np.save(d / "embeddings.npy", X.astype(np.float32))
    rows = ["tile_id,origin,label,slide_id,patch_id,x,y,medical_center"]
    rows += [f"{i},img{i}.png,{b},{s},{p},0,0,{c}" for i, (b, s, p, c) in
             enumerate(zip(meta.biological_class, meta.slide_id, meta.patch_id, meta.medical_center))]
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    Y, m = load_features(d, None)
    assert np.array_equal(Y, X.astype(np.float32)) and list(m.biological_class) == list(meta.biological_class)


def test_robustified_atlas_folder_keeps_the_atlas_manifest(tmp_path):
    """`robustify` on a `tub atlas embed --format npy` folder replaced manifest.csv by the PathoROB metadata
    (no `label`/`origin`), so `tub atlas evaluate` on the output failed; the manifest is now the input's,
    with its rows in the order of the written embeddings."""
    from tub_pathorob.features import write_like

    X, meta = synthetic_features(slides_per_cell=2, tiles_per_slide=5, seed=3)
    d = tmp_path / "emb"
    d.mkdir()
    p = np.random.default_rng(0).permutation(len(X))  # the manifest in another order than the metadata
    np.save(d / "embeddings.npy", X[p].astype(np.float32))
    rows = ["tile_id,origin,label,slide_id,patch_id,x,y,split"]
    rows += [f"{i},img{i}.png,{meta.biological_class[i]},{meta.slide_id[i]},{meta.patch_id[i]},0,0,train" for i in p]
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    Y, m = load_features(d, meta)
    write_like(d, tmp_path / "out", Y + 1.0, m)
    written = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert written[0] == rows[0]
    assert sorted(written[1:]) == sorted(rows[1:])
    Z, _ = load_features(tmp_path / "out", meta)  # read back through the manifest: rows match by key
    assert np.allclose(Z, X + 1.0, atol=1e-5)  # float32 embeddings
    pytest.importorskip("tub_atlas")
    from tub_atlas.features import read_features

    got = read_features(tmp_path / "out")
    assert list(got.labels) == list(m.biological_class) and np.allclose(got.x, Y + 1.0, atol=1e-5)  # row j = manifest row j
