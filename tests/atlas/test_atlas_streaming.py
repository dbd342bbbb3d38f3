"""Memory at scale: ``atlas train`` reads only the tiles each step samples (folders, HDF5, NPZ, several
inputs) with weights bit-identical to reading every tile up front, and the kNN probe's chunked top-k
gives exactly the full stable sort's neighbours (ties by training index) for any chunk size."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tubcli.testing import invoke

from tub_atlas import tiles as tiles_mod
from tub_atlas.probes import knn_predict
from tub_atlas.tiles import TileStream, read_input, take_tiles


@pytest.fixture(scope="module")
def data(tmp_path_factory, atlas_demo_tiles):
    root = tmp_path_factory.mktemp("stream")
    (root / "d").symlink_to(atlas_demo_tiles)  # read only here
    t = np.load(root / "d" / "tiles.npz")["tiles"]
    with h5py.File(root / "chw.h5", "w") as f:  # channels first, float in [0, 1]: converted on read
        f["imgs"] = (t[:20].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    flat = root / "flat"  # no class folders: no kNN probe after training
    flat.mkdir()
    for p in sorted((root / "d" / "tiles").rglob("*.png")):
        (flat / f"{p.parent.name}_{p.name}").symlink_to(p)
    return root


def _eager(sets):
    """The old behaviour: every tile decoded into one array before step 1."""
    return np.concatenate([ts.read(0, len(ts)) for ts in sets]) if len(sets) > 1 else sets[0].read(0, len(sets[0]))


def _weights_digest(path) -> str:
    from safetensors.numpy import load_file

    sd, h = load_file(str(path)), hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(np.ascontiguousarray(sd[k]).tobytes())
    return h.hexdigest()


def _train(root, inputs, objective, out, steps=3, batch=8):
    common = ["--student-arch", "vit-t8-demo", "--student-depth", "1", "--batch-size", str(batch), "--crop-size",
              "32", "--steps", str(steps), "--device", "cpu", "--json", "-o", out]
    if objective == "dinov2":
        extra = ["--objective", "dinov2", "--local-crops", "2", "--local-crop-size", "16",
                 "--set", "dinov2.n_prototypes=128", "--set", "dinov2.head_hidden_dim=64",
                 "--set", "dinov2.head_bottleneck_dim=32"]
    else:
        extra = ["--teacher-arch", "vit-t8-demo", "--teacher-weights", root / "d" / "vit-t8-demo-random.safetensors"]
    r = invoke(["atlas", "train", *inputs, *extra, *common])
    assert r.exit_code == 0, r.stderr + r.stdout
    res = json.loads(r.stdout)
    names = ("model", "teacher") if objective == "dinov2" else ("model", "projections")
    return res, {n: _weights_digest(out / "checkpoints" / f"{n}.safetensors") for n in names}


@pytest.mark.parametrize("objective", ["distill", "dinov2"])
def test_streamed_training_equals_eager_bit_for_bit(data, tmp_path, monkeypatch, objective):
    inputs = [data / "d" / "tiles", data / "chw.h5", data / "d" / "tiles.npz"]  # folder + HDF5 + NPZ, labelled
    streamed, w_streamed = _train(data, inputs, objective, tmp_path / "s")
    monkeypatch.setattr(tiles_mod, "TileStream", _eager)
    eager, w_eager = _train(data, inputs, objective, tmp_path / "e")
    assert w_streamed == w_eager
    assert streamed["loss_last"] == eager["loss_last"]
    knn = {k: v for k, v in streamed.items() if "knn" in k}
    assert knn and knn == {k: v for k, v in eager.items() if "knn" in k}


def test_single_hdf5_input_streams_identically(data, tmp_path, monkeypatch):
    _, w_streamed = _train(data, [data / "chw.h5"], "distill", tmp_path / "s", steps=2)
    monkeypatch.setattr(tiles_mod, "TileStream", _eager)
    _, w_eager = _train(data, [data / "chw.h5"], "distill", tmp_path / "e", steps=2)
    assert w_streamed == w_eager


@pytest.mark.parametrize("objective", ["distill", "dinov2"])
def test_training_decodes_only_the_sampled_tiles(data, tmp_path, monkeypatch, objective):
    decoded, reads = [], []
    real_image, real_read = tiles_mod.read_image, tiles_mod.TileSet.read_indices

    def counting_image(p, *rest):
        decoded.append(p)
        return real_image(p, *rest)

    def counting_read(self, idx):
        reads.append(len(idx))
        return real_read(self, idx)

    monkeypatch.setattr(tiles_mod, "read_image", counting_image)
    monkeypatch.setattr(tiles_mod.TileSet, "read_indices", counting_read)
    steps, batch = 2, 4
    _train(data, [data / "flat"], objective, tmp_path / "r", steps=steps, batch=batch)
    n_tiles = len(list((data / "flat").iterdir()))
    assert n_tiles == 32 and 0 < len(decoded) <= steps * batch < n_tiles
    assert reads and max(reads) <= batch  # one step's distinct tiles per read, never the folder


def test_kNN_probe_after_training_reads_in_batches(data, tmp_path, monkeypatch):
    sizes = []
    real = tiles_mod.TileSet.read

    def counting(self, a, b):
        sizes.append(b - a)
        return real(self, a, b)

    monkeypatch.setattr(tiles_mod.TileSet, "read", counting)
    res, _ = _train(data, [data / "d" / "tiles"], "distill", tmp_path / "r", steps=1, batch=2)
    assert "student_knn_balanced_accuracy" in res
    assert sizes and max(sizes) <= 64 and sum(sizes) == 32  # one pass, both encoders per batch


def test_tile_stream_reads_indices_like_rows_of_the_eager_array(data):
    sets = [read_input(data / "d" / "tiles"), read_input(data / "chw.h5"), read_input(data / "d" / "tiles.npz")]
    assert isinstance(sets[2].extra["array"], np.memmap)  # numpy.savez's NPZ: mapped, not loaded
    eager = _eager(sets)
    stream = TileStream(sets)
    assert len(stream) == len(eager) == 32 + 20 + 32
    idx = np.array([83, 0, 40, 31, 32, 40, 5, 51, 52, 0])  # unsorted, repeated, across the three inputs
    got = take_tiles(stream, idx)
    assert len(got) == len(idx)
    for i, t in zip(idx, got):
        assert np.array_equal(t, eager[i]) and t.flags.c_contiguous
    assert np.array_equal(stream[10:60], eager[10:60])
    assert np.array_equal(stream[-1], eager[-1])
    assert [np.array_equal(a, b) for a, b in zip(take_tiles(eager, idx), got)] == [True] * len(idx)
    h5 = read_input(data / "chw.h5")
    assert np.array_equal(h5.read_indices(np.array([2, 3, 4, 9, 19])), h5.read(0, 20)[[2, 3, 4, 9, 19]])


def test_inputs_of_different_tile_sizes_are_a_clear_error(data, tmp_path):
    from PIL import Image

    from tubcli.errors import TubError

    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small / "a.png")
    with pytest.raises(TubError, match="share one size"):
        TileStream([read_input(data / "d" / "tiles"), read_input(small)])


def test_a_stray_or_broken_image_in_one_folder_fails_before_any_step(tmp_path):
    """Tiles are read on demand, but a file of another size or one PIL cannot open is an error when
    the stream is built (headers only), not when a step happens to draw it."""
    from PIL import Image

    from tubcli.errors import TubError

    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(folder / f"t{i}.png")
    TileStream([read_input(folder)])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "t9.png")
    with pytest.raises(TubError, match=r"t9.png is 40x40 px but .*t0.png is 32x32"):
        TileStream([read_input(folder)])
    (folder / "t9.png").write_bytes(b"not an image")
    with pytest.raises(TubError, match="cannot read image .*t9.png"):
        TileStream([read_input(folder)])


# ------------------------------------------------------------------ kNN
def _knn_reference(train_x, train_y, test_x, n_classes, k, vote="uniform", temperature=0.07):
    """The previous implementation: a full stable sort of every row of the similarity matrix."""
    tr = F.normalize(torch.as_tensor(train_x, dtype=torch.float64), dim=1)
    te = F.normalize(torch.as_tensor(test_x, dtype=torch.float64), dim=1)
    ty = torch.as_tensor(train_y, dtype=torch.long)
    k = min(k, tr.shape[0])
    sim = te @ tr.T
    order = torch.sort(-sim, dim=1, stable=True).indices[:, :k]
    top = torch.gather(sim, 1, order)
    w = torch.ones_like(top) if vote == "uniform" else torch.exp(top / temperature)
    scores = torch.zeros(sim.shape[0], n_classes, dtype=torch.float64).scatter_add_(1, ty[order], w)
    return scores.argmax(1).numpy(), order.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_is_identical_for_any_chunk_and_with_many_exact_ties(seed):
    rng = np.random.default_rng(seed)
    n, m, d = 400, 150, 2
    train_x = rng.integers(-2, 3, (n, d)).astype(np.float32)  # 25 distinct points: ties everywhere
    test_x = rng.integers(-2, 3, (m, d)).astype(np.float32)
    train_x[::37] = 0  # zero rows: similarity 0 to everything
    train_y = rng.integers(0, 5, n)
    for k in (1, 3, 20, 150, n):
        for vote in ("uniform", "weighted"):
            ref, _ = _knn_reference(train_x, train_y, test_x, 5, k, vote)
            for chunk in (None, 1, 7, 64):
                got = knn_predict(train_x, train_y, test_x, 5, k=k, vote=vote, chunk=chunk)
                assert np.array_equal(got, ref), (k, vote, chunk)


def test_knn_neighbours_equal_the_stable_sort_rows():
    from tub_atlas.probes import top_k_stable

    rng = np.random.default_rng(5)
    sim = torch.as_tensor(rng.integers(0, 4, (50, 300)).astype(np.float64) / 3)  # ties beyond any margin
    sim[:, :40] = 1.0  # 40 exact ties at the top
    sim[7] = 0.5  # a row that is one long tie
    for k in (1, 5, 39, 40, 41, 100, 300):
        assert torch.equal(top_k_stable(sim, k), torch.sort(-sim, dim=1, stable=True).indices[:, :k])


def test_knn_chunk_comes_from_a_memory_budget(monkeypatch):
    from tub_atlas import probes

    seen = []
    real = probes.top_k_stable

    def spy(sim, k):
        seen.append(sim.shape)
        return real(sim, k)

    monkeypatch.setattr(probes, "top_k_stable", spy)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1000, 8)), rng.integers(0, 3, 1000)
    a = knn_predict(x[:600], y[:600], x[600:], 3, k=5, memory_budget=600 * 8 * 50)  # 50 rows per chunk
    assert {s[0] for s in seen} == {50} and len(seen) == 8
    assert np.array_equal(a, _knn_reference(x[:600], y[:600], x[600:], 3, 5)[0])


def test_npz_tiles_are_memory_mapped_unless_compressed(tmp_path):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", tiles=tiles, labels=np.arange(6))
    np.savez_compressed(tmp_path / "c.npz", tiles=tiles, labels=np.arange(6))
    for name, mapped in (("a", True), ("c", False)):
        ts = read_input(tmp_path / f"{name}.npz")
        assert isinstance(ts.extra["array"], np.memmap) is mapped
        got = ts.read(1, 4)
        assert type(got) is np.ndarray and got.flags.writeable and np.array_equal(got, tiles[1:4])
        assert np.array_equal(ts.read_indices([0, 2, 5]), tiles[[0, 2, 5]])
        assert [r["label"] for r in ts.rows] == [str(i) for i in range(6)]
