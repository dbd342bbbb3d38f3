"""Regression tests of `tub atlas embed` skip-existing and input reading (QA sweep 2): origins recorded
absolute and compared from any folder, relative origins of older outputs, h5 outputs without an origin,
hidden folders in tile trees, center names too long for a file name. Tiny inputs, random demo ViT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tubcli.errors import TubError
from tubcli.testing import expect_exit, invoke

ENC = ["--arch", "vit-t8-demo", "--random-init"]


def atlas(*args, code: int = 0):
    return expect_exit(invoke(["atlas", *args]), code)


def tiles(folder: Path, slide: str, n: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{slide}_{64 * i}_0.png")
    return folder


def skipped(r) -> int:
    return json.loads(r.stdout)["batch"]["skipped_existing"]


# ------------------------------------------------------------------ D1: origins are absolute
def test_same_named_input_from_another_folder_is_refused_and_same_input_respelt_is_skipped(tmp_path, monkeypatch):
    tiles(tmp_path / "A" / "tiles", "sa")
    tiles(tmp_path / "B" / "tiles", "sb", seed=1)
    run = tmp_path / "r"
    monkeypatch.chdir(tmp_path / "A")
    atlas("embed", "tiles", *ENC, "-o", run)
    monkeypatch.chdir(tmp_path / "B")
    r = atlas("embed", "tiles", *ENC, "-o", run, code=2)
    assert str(tmp_path / "A/tiles") in r.stderr and "--overwrite" in r.stderr
    assert skipped(atlas("embed", "../A/tiles", *ENC, "-o", run, "--json")) == 1
    with open(run / "outputs/tiles/manifest.csv", newline="") as f:
        assert next(csv.DictReader(f))["origin"] == str(tmp_path / "A/tiles/sa_0_0.png")


def test_h5_origin_attribute_is_absolute(tmp_path, monkeypatch):
    tiles(tmp_path / "A" / "tiles", "sa")
    monkeypatch.chdir(tmp_path / "A")
    atlas("embed", "tiles", *ENC, "--format", "h5", "-o", tmp_path / "r")
    with h5py.File(tmp_path / "r/outputs/tiles.h5") as f:
        assert f.attrs["origin"] == str(tmp_path / "A/tiles/sa_0_0.png")
    monkeypatch.chdir(tmp_path)
    assert skipped(atlas("embed", "A/tiles", *ENC, "--format", "h5", "-o", tmp_path / "r", "--json")) == 1


def test_relative_origin_of_an_older_output_is_refused_unless_it_is_this_input(tmp_path, monkeypatch):
    tiles(tmp_path / "A" / "tiles", "sa")
    tiles(tmp_path / "B" / "tiles", "sb", seed=1)
    run = tmp_path / "r"
    monkeypatch.chdir(tmp_path / "A")
    atlas("embed", "tiles", *ENC, "-o", run)
    man = run / "outputs/tiles/manifest.csv"
    man.write_text(man.read_text().replace(str(tmp_path / "A") + "/", ""))  # as an older tub wrote it
    monkeypatch.chdir(tmp_path / "B")
    r = atlas("embed", "tiles", *ENC, "-o", run, code=2)
    assert "relative origin tiles/sa_0_0.png" in r.stderr and "--overwrite" in r.stderr
    monkeypatch.chdir(tmp_path / "A")
    assert skipped(atlas("embed", "tiles", *ENC, "-o", run, "--json")) == 1


# ------------------------------------------------------------------ D7: h5 outputs without an origin
def test_h5_without_origin_is_compared_by_its_tiles(tmp_path):
    folder = tiles(tmp_path / "d" / "tiles", "s1")
    npz = tmp_path / "d" / "tiles.npz"
    np.savez(npz, tiles=np.zeros((2, 64, 64, 3), np.uint8), slide_id=np.array(["s2", "s2"]))
    run = tmp_path / "r"
    atlas("embed", folder, *ENC, "--format", "h5", "-o", run)
    with h5py.File(run / "outputs/tiles.h5", "a") as f:
        del f.attrs["origin"]  # as an older tub wrote it
    r = atlas("embed", npz, *ENC, "--format", "h5", "-o", run, code=2)
    assert "records no origin" in r.stderr and "tiles.npz" in r.stderr and "'s1'" in r.stderr
    assert skipped(atlas("embed", folder, *ENC, "--format", "h5", "-o", run, "--json")) == 1


# ------------------------------------------------------------------ D5: hidden folders are not tiles
def test_hidden_files_and_folders_below_the_input_are_skipped(tmp_path):
    from tub_atlas.tiles import read_folder

    root = tmp_path / ".work" / "tiles"  # a hidden folder above the input is fine
    tiles(root / "class0", "s1")
    tiles(root / ".hidden", "z")
    tiles(root / "class0" / ".ipynb_checkpoints", "s1-checkpoint")
    tiles(root / "class1" / "sub", "s2")
    (root / "class1" / ".x_0_0.png").write_bytes((root / "class0/s1_0_0.png").read_bytes())
    ts = read_folder(root)
    assert [r["tile_id"] for r in ts.rows] == ["class0/s1_0_0.png", "class0/s1_64_0.png",
                                                "class1/sub/s2_0_0.png", "class1/sub/s2_64_0.png"]
    assert {r["label"] for r in ts.rows} == {"class0", "class1"}
    flat = tiles(tmp_path / "flat", "s3")
    tiles(flat / ".ipynb_checkpoints", "s3-checkpoint")
    ts = read_folder(flat)
    assert len(ts) == 2 and not ts.extra["image_folder"] and {r["label"] for r in ts.rows} == {""}


# ------------------------------------------------------------------ D6: center names too long for a file
def test_center_name_too_long_for_a_file_name_is_a_one_line_error(tmp_path):
    from tub_atlas.tiles import center_file_stem

    from tub_atlas.embedding import output_path

    with pytest.raises(TubError, match="medical_center 'aaaa.*too long"):
        center_file_stem("a" * 256)
    with pytest.raises(TubError, match="too long to name output files"):
        output_path("h5", tmp_path, "ä" * 128)  # an input name as long: 256 bytes
    center = "Ä" * 200  # 400 bytes in UTF-8
    (tmp_path / "s0").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "s0" / "p0.png")
    meta = tmp_path / "metadata.csv"
    meta.write_text(f"slide_id,patch_id,biological_class,medical_center\ns0,p0,b0,{center}\n", encoding="utf-8")
    r = atlas("embed", "--format", "pathorob", "--metadata", meta, *ENC, "-o", tmp_path / "r", code=2)
    assert "ÄÄÄÄ" in r.stderr and "too long" in r.stderr and "400 bytes" in r.stderr
    assert not (tmp_path / "r/encoder.json").exists()


def test_long_center_name_within_the_limit_is_written(tmp_path):
    from tub_atlas.tiles import MAX_STEM_BYTES, center_file_stem

    with pytest.raises(TubError, match="too long"):
        center_file_stem("c" * (MAX_STEM_BYTES + 1))
    center = "c" * MAX_STEM_BYTES  # its atomic_path temporary name fits too
    (tmp_path / "s0").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "s0" / "p0.png")
    meta = tmp_path / "metadata.csv"
    meta.write_text(f"slide_id,patch_id,biological_class,medical_center\ns0,p0,b0,{center}\n")
    atlas("embed", "--format", "pathorob", "--metadata", meta, *ENC, "-o", tmp_path / "r")
    assert (tmp_path / "r/outputs" / f"{center}.npz").is_file()
