"""Regression tests of `tub atlas embed` and `train` input safety (QA sweep): PathoROB center names that
share a file or are not a file name, skip-existing that must not let another input's output stand in,
one --slide-coords file for one slide only, train errors naming train's options, and the README's
first embed example. Tiny generated inputs, the random-weight demo ViT."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tubcli.errors import TubError
from tubcli.testing import expect_exit, invoke

ENC = ["--arch", "vit-t8-demo", "--random-init"]
README = Path(__file__).resolve().parents[2] / "plugins" / "tub-atlas" / "README.md"


def atlas(*args, code: int = 0):
    return expect_exit(invoke(["atlas", *args]), code)


def pathorob_layout(root: Path, centers: list[str], slides: int = 1) -> Path:
    """``root/<slide>/<patch>.png`` tiles (2 per slide, ``slides`` per center) and ``root/metadata.csv``."""
    rng = np.random.default_rng(0)
    rows = []
    for c, center in enumerate(centers):
        for s in range(slides):
            slide = f"s{c}" if slides == 1 else f"s{c}-{s}"
            (root / slide).mkdir(parents=True, exist_ok=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / slide / f"p{k}.png")
                rows.append({"subset": "ID", "slide_id": slide, "patch_id": f"p{k}", "biological_class": f"b{s % 2}",
                             "medical_center": center})
    meta = root / "metadata.csv"
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return meta


def tile_folder(folder: Path, slide: str, n: int = 2) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{slide}_{64 * i}_0.png")
    return folder


# ------------------------------------------------------------------ defects 1, 2: PathoROB center files
def test_pathorob_centers_sharing_one_file_name_are_an_error(tmp_path):
    meta = pathorob_layout(tmp_path / "d", ["Hosp A", "Hosp_A"])
    r = atlas("embed", "--format", "pathorob", "--metadata", meta, *ENC, "-o", tmp_path / "r", code=2)
    assert "'Hosp A'" in r.stderr and "'Hosp_A'" in r.stderr and "Hosp_A.npz" in r.stderr
    assert not (tmp_path / "r/encoder.json").exists()  # refused before any work
    assert not list((tmp_path / "r").rglob("*.npz"))


@pytest.mark.parametrize("center", ["../../escaped", "Hosp/B", "..", ""])
def test_pathorob_center_names_never_write_outside_the_outputs_folder(tmp_path, center):
    meta = pathorob_layout(tmp_path / "d", [center, "ok"])
    run = tmp_path / "deep" / "r"
    r = atlas("embed", "--format", "pathorob", "--metadata", meta, *ENC, "-o", run, code=2)
    assert "medical_center" in r.stderr and "rename" in r.stderr
    assert not list(tmp_path.rglob("*.npz")), "nothing may be written for a center that is not a file name"


def test_output_names_are_single_file_names_inside_outputs(tmp_path):
    from tub_atlas.embedding import output_path

    assert output_path("pathorob", tmp_path, "Hosp_A") == tmp_path / "Hosp_A.npz"
    for bad in ("../x", "a/b", "..", "."):
        with pytest.raises(TubError, match="cannot name an output"):
            output_path("npy", tmp_path, bad)


def test_pathorob_center_with_spaces_round_trips_through_pathorob_ri(tmp_path):
    """'Hosp A' -> outputs/Hosp_A.npz, the name tub pathorob (and the official scripts) look up."""
    from tubcli.plugins import get_plugins

    meta = pathorob_layout(tmp_path / "d", ["Hosp A", "Hosp B"], slides=4)
    r = atlas("embed", "--format", "pathorob", "--metadata", meta, *ENC, "-o", tmp_path / "r", "--json")
    assert json.loads(r.stdout)["centers"] == {"Hosp A": "Hosp_A.npz", "Hosp B": "Hosp_B.npz"}
    assert sorted(p.name for p in (tmp_path / "r/outputs").iterdir()) == ["Hosp_A.npz", "Hosp_B.npz"]
    if "pathorob" not in get_plugins().records:
        pytest.skip("tub-pathorob not installed")
    r = invoke(["pathorob", "ri", str(tmp_path / "r/outputs"), "--metadata", str(meta), "--k", "3",
                "-o", str(tmp_path / "ri"), "--json"])
    assert r.exit_code == 0, r.stderr + r.stdout
    assert 0 <= json.loads(r.stdout)["robustness_index"] <= 1


# ------------------------------------------------------------------ defect 4: skip-existing checks the origin
def test_an_existing_output_of_another_input_is_not_skipped(tmp_path):
    folder = tile_folder(tmp_path / "a" / "tiles", "s1")
    npz = tmp_path / "b" / "tiles.npz"
    npz.parent.mkdir()
    np.savez(npz, tiles=np.full((3, 64, 64, 3), 200, np.uint8), slide_id=np.array(["s2"] * 3))
    run = tmp_path / "r"
    atlas("embed", folder, *ENC, "-o", run)
    r = atlas("embed", npz, *ENC, "-o", run, code=2)
    assert "tiles.npz" in r.stderr and str(folder) in r.stderr and "--overwrite" in r.stderr
    assert np.load(run / "outputs/tiles/embeddings.npy").shape[0] == 2  # untouched
    # the same input again (spelt otherwise) is still skipped; --overwrite embeds the new one
    r = atlas("embed", f"{folder}/", *ENC, "-o", run, "--json")
    assert json.loads(r.stdout)["batch"]["skipped_existing"] == 1
    r = atlas("embed", npz, *ENC, "-o", run, "--overwrite", "--json")
    assert json.loads(r.stdout)["tiles"] == 3 and np.load(run / "outputs/tiles/embeddings.npy").shape[0] == 3


def test_h5_outputs_record_their_origin_and_refuse_another_input(tmp_path):
    a, b = tmp_path / "a" / "slide1.h5", tmp_path / "b" / "slide1.npz"
    a.parent.mkdir()
    b.parent.mkdir()
    with h5py.File(a, "w") as f:
        f["imgs"] = np.zeros((2, 64, 64, 3), np.uint8)
        f["coords"] = np.array([[0, 0], [64, 0]])
    np.savez(b, tiles=np.zeros((2, 64, 64, 3), np.uint8))
    run = tmp_path / "r"
    atlas("embed", a, *ENC, "--format", "h5", "-o", run)
    with h5py.File(run / "outputs/slide1.h5") as f:
        assert f.attrs["origin"] == f"{a}:0"
    r = atlas("embed", b, *ENC, "--format", "h5", "-o", run, code=2)
    assert "slide1.npz" in r.stderr and "slide1.h5" in r.stderr


def test_pathorob_output_with_other_tiles_is_not_skipped(tmp_path):
    meta = pathorob_layout(tmp_path / "d", ["c0", "c1"])
    run = tmp_path / "r"
    atlas("embed", "--format", "pathorob", "--metadata", meta, *ENC, "-o", run)
    text = meta.read_text().replace(",s1,p1,", ",s1,p0,")  # same CSV path, center c1 now lists other tiles
    meta.write_text(text)
    r = atlas("embed", "--format", "pathorob", "--metadata", meta, *ENC, "-o", run, code=2)
    assert "c1.npz" in r.stderr and "'c1'" in r.stderr


# ------------------------------------------------------------------ defect 9: one coords file, one slide
def test_one_slide_coords_file_serves_its_own_slide_only(tmp_path):
    from tub_atlas.slides import find_coords_file, write_coords_h5

    coords = tmp_path / "case01.h5"
    write_coords_h5(coords, np.array([[0, 0]]), {"patch_size": 64, "patch_size_level0": 64, "name": "case01"})
    s1, s2 = tmp_path / "case01.svs", tmp_path / "case02.svs"  # never opened: refused up front
    s1.write_bytes(b"")
    s2.write_bytes(b"")
    r = atlas("embed", s1, s2, *ENC, "--format", "h5", "--slide-coords", coords, "-o", tmp_path / "r", code=2)
    assert "2 slides" in r.stderr and "folder" in r.stderr
    r = atlas("embed", s2, *ENC, "--format", "h5", "--slide-coords", coords, "-o", tmp_path / "r2", code=2)
    assert "'case01'" in r.stderr and "case02.svs" in r.stderr
    assert find_coords_file(s1, coords) == coords
    with pytest.raises(TubError, match="case01"):
        find_coords_file(s2, coords)


# ------------------------------------------------------------------ defect 12: train names its own options
def test_train_errors_name_train_options(tmp_path):
    tiles = tile_folder(tmp_path / "t", "s1")
    stray = re.compile(r"(?<![\w-])--(weights|random-init|arch)\b")  # embed's options, not train's
    r = atlas("train", tiles, "--teacher-arch", "vit-t8-demo", "-o", tmp_path / "a", code=2)
    assert "--teacher-weights" in r.stderr and "--teacher-random-init" in r.stderr
    assert not stray.search(r.stderr), r.stderr
    r = atlas("train", tiles, "--teacher-random-init", "-o", tmp_path / "b", code=2)
    assert "--teacher-arch" in r.stderr and not stray.search(r.stderr), r.stderr
    r = atlas("embed", tiles, "-o", tmp_path / "c", code=2)  # embed still names its own
    assert "--weights" in r.stderr and "--random-init" in r.stderr


def test_student_weights_of_another_preset_name_student_arch(tmp_path):
    from tub_atlas.checkpoint import model_json, save_weights
    from tub_atlas.synthetic import preset_config, random_vit

    cfg = preset_config("vit-t8-demo")
    w = tmp_path / "demo.safetensors"
    save_weights(w, random_vit(cfg, seed=0).state_dict(), model_json(cfg, norm="imagenet", pool="cls"))
    tiles = tile_folder(tmp_path / "t", "s1")
    r = atlas("train", tiles, "--teacher-arch", "vit-t8-demo", "--teacher-random-init", "--student-arch",
              "vit-s8-reg8", "--student-weights", w, "--steps", "1", "-o", tmp_path / "a", code=2)
    assert "--student-arch" in r.stderr and "--arch" not in r.stderr.replace("--student-arch", "")


# ------------------------------------------------------------------ defect 13: README example runs as written
def test_readme_first_embed_example_inputs_are_accepted(tmp_path, monkeypatch):
    """The inputs of the README's first `embed` line, created as files, pass the same-name rule."""
    from tub_atlas.cli import _input_names

    line = next(ln for ln in README.read_text().splitlines() if ln.startswith("tub atlas embed") and "--weights" in ln
                and not ln.split()[3].startswith("-"))
    args = shlex.split(line.rstrip("\\"))[3:]
    inputs = args[:next(i for i, a in enumerate(args) if a.startswith("-"))]
    monkeypatch.chdir(tmp_path)
    for a in inputs:
        Path(a).mkdir() if a.endswith("/") else Path(a).touch()
    assert len(inputs) >= 3
    assert len(_input_names([Path(a) for a in inputs])) == len(inputs)


@pytest.mark.parametrize("verb, extra, named", [
    ("embed", ["--slide-mpp", "0.5"], "--slide-mpp"),
    ("embed", ["--slide-tile-size", "64", "--no-slide-qc"], "--slide-tile-size, --slide-qc"),
    ("explain", ["--slide-pen", "blue"], "--slide-pen"),
    ("embed", ["--image-root", "."], "--image-root"),
])
def test_whole_slide_and_pathorob_settings_on_plain_tiles_are_refused(tmp_path, verb, extra, named):
    """Tiling settings with no slide among the inputs (and --image-root without --format pathorob) would be
    recorded in config.yaml as if they had shaped the tiles."""
    (tmp_path / "tiles").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "tiles" / "a.png")
    r = atlas(verb, tmp_path / "tiles", *ENC, *extra, "-o", tmp_path / "r", code=2)
    assert named in r.output and not (tmp_path / "r").exists()


def test_slide_settings_on_a_pathorob_embed_are_refused(tmp_path):
    meta = pathorob_layout(tmp_path / "data", ["c1"])
    r = atlas("embed", *ENC, "--format", "pathorob", "--metadata", meta, "--slide-mag", "20",
              "-o", tmp_path / "r", code=2)
    assert "--slide-mag" in r.output and "pathorob" in r.output
