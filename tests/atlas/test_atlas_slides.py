"""Whole-slide input: a small pyramidal TIFF (written here with tifffile, read through OpenSlide) is
tiled on its tissue, tiles equal the known pixels, and `embed` turns it into per-slide h5 features."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from tubcli.errors import TubError  # noqa: E402
from tubcli.testing import invoke  # noqa: E402

from tub_atlas.slides import SlideTiles, is_whole_slide, otsu_threshold, tissue_mask  # noqa: E402

BG = 240


def make_slide(path, mpp=0.25, tissue=(slice(128, 384), slice(192, 512)), blank=False, mpp_y=None):
    """1024 x 768 RGB level 0 + a 2x mean-downsampled level 1, both 256-px tiled; returns both arrays."""
    rng = np.random.default_rng(0)
    img = np.full((768, 1024, 3), BG, np.uint8)
    img += rng.integers(0, 6, img.shape, dtype=np.uint8)  # grey noise: unsaturated background
    if not blank:
        ys, xs = tissue
        h, w = ys.stop - ys.start, xs.stop - xs.start
        pink = np.array([200, 80, 150]) + rng.integers(-25, 26, (h, w, 3))
        img[ys, xs] = np.clip(pink, 0, 255).astype(np.uint8)
    l1 = img.reshape(384, 2, 512, 2, 3).mean((1, 3)).round().astype(np.uint8)
    kw = dict(tile=(256, 256), photometric="rgb", compression="zlib")
    res = dict(resolution=(1e4 / mpp, 1e4 / (mpp_y or mpp)), resolutionunit="CENTIMETER") if mpp else {}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subfiletype=0, **kw, **res)
        tw.write(l1, subfiletype=1, **kw)
    return img, l1


def failures(run) -> dict[str, str]:
    """failures.jsonl of a run folder as {file name: error}."""
    lines = (run / "failures.jsonl").read_text().splitlines()
    return {Path(json.loads(line)["item"]).name: json.loads(line)["error"] for line in lines}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("wsi") / "case01.tif"
    img, l1 = make_slide(path)
    return path, img, l1


def test_otsu_and_tissue_mask_on_a_two_class_image():
    vals = np.concatenate([np.full(300, 20), np.full(100, 200)]).astype(np.uint8)
    t = otsu_threshold(vals)
    assert 20 <= t < 200
    rgb = np.full((10, 10, 3), 235, np.uint8)
    rgb[:4] = (190, 70, 140)
    assert tissue_mask(rgb)[:4].all() and not tissue_mask(rgb)[4:].any()
    assert not tissue_mask(np.full((8, 8, 3), 230, np.uint8)).any()  # blank: no tissue at all


def test_level0_tissue_grid_and_pixels(slide):
    path, img, _ = slide
    assert is_whole_slide(path)
    tiler = SlideTiles(path, tile_px=64, level=0, tissue_min=0.25)
    # tissue rows 128:384, columns 192:512 -> grid cells y 2..5, x 3..7 (64-px cells), all fully covered
    expected = {(x * 64, y * 64) for y in range(2, 6) for x in range(3, 8)}
    assert set(map(tuple, tiler.coords.tolist())) == expected and tiler.grid == (16, 12)
    tiles = tiler.read(0, len(tiler))
    for (x, y), t in zip(tiler.coords, tiles):
        assert np.array_equal(t, img[y:y + 64, x:x + 64])


def test_a_slide_without_a_small_level_is_refused_before_openslide_reads_it_whole(slide, monkeypatch):
    """OpenSlide makes a thumbnail from a whole level: a single-level 100k x 100k TIFF asked for ~40 GB."""
    import tubcli.images

    path, _, _ = slide
    monkeypatch.setattr(tubcli.images, "MAX_THUMBNAIL_SOURCE_PX", 100)  # this test slide's smallest level is larger
    with pytest.raises(TubError, match="no pyramid level small enough for a thumbnail .* not pyramidal"):
        SlideTiles(path, tile_px=64, level=0, tissue_min=0.25)


def test_target_mpp_reads_the_matching_pyramid_level(slide):
    path, img, l1 = slide
    tiler = SlideTiles(path, tile_px=64, mpp=0.5, tissue_min=0.25)  # 0.25 µm/px slide: 2x -> level 1
    assert (tiler.level, tiler.footprint0, tiler.read_px) == (1, 128, 64)
    # 128-px level-0 cells: x cells 1 (half tissue), 2, 3; y cells 1, 2
    assert set(map(tuple, tiler.coords.tolist())) == {(x * 128, y * 128) for y in (1, 2) for x in (1, 2, 3)}
    for (x, y), t in zip(tiler.coords, tiler.read(0, len(tiler))):
        assert np.array_equal(t, l1[y // 2:y // 2 + 64, x // 2:x // 2 + 64])
    half = SlideTiles(path, tile_px=64, mpp=0.5, tissue_min=0.75)
    assert len(half) == 4  # the half-covered column drops out


def test_embed_whole_slide_to_h5_matches_embedding_the_crops(slide, tmp_path):
    from tub_atlas.encoder import load_encoder

    path, img, _ = slide
    made = invoke(["atlas", "make-data", tmp_path / "d", "--n-per-class", "2", "--checkpoint", "vit-t8-demo",
                   "-o", tmp_path / "mk"])
    assert made.exit_code == 0, made.stderr
    W = tmp_path / "d" / "vit-t8-demo-random.safetensors"
    r = invoke(["atlas", "embed", str(path), "--weights", str(W), "--format", "h5", "--slide-tile-size", "64",
                "--pool", "cls+mean", "--json", "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tiles"] == 20 and res["whole_slides"][0]["level"] == 0
    with h5py.File(tmp_path / "e/outputs/case01.h5") as f:
        feats, coords = f["features"][()], f["coords"][()]
    assert feats.shape == (20, 2 * 192)
    enc, _ = load_encoder("auto", W)
    crops = np.stack([img[y:y + 64, x:x + 64] for x, y in coords])
    with torch.inference_mode():
        ref = enc(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0).numpy()
    assert np.abs(feats - ref).max() < 1e-5
    slides = np.load(tmp_path / "e/slides.npz")
    assert np.allclose(slides["case01"], feats.mean(0), atol=1e-6)
    assert "resized" not in r.stderr
    # 128-px tiles at 0.5 µm/px go into the 64-px encoder at 1 µm/px: said, not only recorded as 0.5
    r = invoke(["atlas", "embed", str(path), "--weights", str(W), "--slide-tile-size", "128", "--slide-mpp", "0.5",
                "-o", str(tmp_path / "e2")])
    assert r.exit_code == 0 and "whole-slide tiles of 128 px are resized to the encoder's 64 px input (at 0.5 " \
        "µm/px the encoder sees 1)" in r.stderr, r.stderr


def test_a_folder_of_slides_is_tiled_slide_by_slide(slide, tmp_path):
    import shutil

    from PIL import Image

    path, _, _ = slide
    folder = tmp_path / "wsis"
    folder.mkdir()
    for name in ("a.tif", "b.tiff"):
        shutil.copy(path, folder / name)
    W = tmp_path / "w.safetensors"
    assert invoke(["atlas", "make-data", tmp_path / "d", "--n-per-class", "2", "--checkpoint", "vit-t8-demo",
                   "-o", tmp_path / "mk"]).exit_code == 0
    shutil.copy(tmp_path / "d" / "vit-t8-demo-random.safetensors", W)
    r = invoke(["atlas", "embed", folder, "--weights", W, "--format", "h5", "--slide-tile-size", "64", "--json",
                "-o", tmp_path / "e"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["tiles"] == 40  # 20 tissue tiles per slide, not one "tile" per slide
    for name in ("a", "b"):
        with h5py.File(tmp_path / "e" / "outputs" / f"{name}.h5") as f:
            assert f["features"].shape[0] == 20 and (f["coords"][()] >= 0).all()
    r = invoke(["atlas", "tile", folder, "--slide-tile-size", "64", "--json", "-o", tmp_path / "t"])
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "t" / "outputs" / "patches").iterdir()) == ["a.h5", "b.h5"]
    damaged = tmp_path / "t" / "outputs" / "patches" / "a.h5"
    damaged.write_bytes(damaged.read_bytes()[:64])  # after it was written: named, not skipped as done
    r = invoke(["atlas", "tile", folder, "--slide-tile-size", "64", "-o", tmp_path / "t"])
    assert r.exit_code == 2 and f"{damaged} exists but cannot be read" in r.stderr, r.stderr
    # an unreadable slide (sorted first) fails alone; the folder is still one of slides (it was refused)
    (folder / "0_truncated.tiff").write_bytes(b"garbage")
    r = invoke(["atlas", "tile", folder, "--slide-tile-size", "64", "--json", "-o", tmp_path / "t3"])
    assert r.exit_code == 1 and json.loads(r.stdout)["slides"] == 2, r.stderr
    failed = [json.loads(x)["item"] for x in (tmp_path / "t3" / "failures.jsonl").read_text().splitlines()]
    assert [Path(f).name for f in failed] == ["0_truncated.tiff"]
    (folder / "0_truncated.tiff").unlink()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tile.png")
    r = invoke(["atlas", "embed", folder, "--weights", W, "-o", tmp_path / "mixed"])
    assert r.exit_code == 2 and "holds whole slides (a.tif) and tile images (tile.png)" in r.stderr
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiles / "x.tif")  # a plain TIFF tile, not a slide
    r = invoke(["atlas", "tile", tiles, "-o", tmp_path / "t2"])
    assert r.exit_code == 2 and "holds no whole-slide images" in r.stderr


def test_slides_in_class_folders_are_not_taken_for_tiles(slide, tmp_path):
    """A Camelyon-style tree root/<class>/*.tif made each whole slide one resized "tile" labelled by its class."""
    import shutil

    path, _, _ = slide
    for cls in ("normal", "tumor"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        shutil.copy(path, tmp_path / "tree" / cls / f"{cls}_001.tif")
    r = invoke(["atlas", "embed", tmp_path / "tree", "--arch", "vit-t8-demo", "--random-init", "-o", tmp_path / "e"])
    assert r.exit_code == 1 and "normal_001.tif is a whole slide, not a tile; give the folders that hold" in r.stderr
    assert not [p for p in (tmp_path / "e").rglob("*") if p.suffix in (".npy", ".h5", ".npz")]  # nothing embedded
    svs = tmp_path / "svstree" / "tumor"
    svs.mkdir(parents=True)
    (svs / "t.svs").write_bytes(b"")  # no tile image at all: the slide is still named
    r = invoke(["atlas", "embed", tmp_path / "svstree", "--arch", "vit-t8-demo", "--random-init", "-o", tmp_path / "s"])
    assert r.exit_code == 1 and "t.svs is a whole slide, not a tile" in r.stderr
    # tiles saved as tiled TIFFs (OpenSlide opens any tiled TIFF) are still tiles: no pyramid
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "tt" / cls).mkdir(parents=True)
        for i in range(2):
            tifffile.imwrite(tmp_path / "tt" / cls / f"s{i}_p0.tif", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                             tile=(16, 16), photometric="rgb")
    r = invoke(["atlas", "embed", tmp_path / "tt", "--arch", "vit-t8-demo", "--random-init", "--json", "-o", tmp_path / "t"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tiles"] == 4, r.stderr


def test_a_20x_scan_at_0504_um_per_px_is_read_as_is_for_05(tmp_path):
    """Aperio 20x scans record 0.504 µm/px: --slide-mpp 0.5 reads level 0 unscaled and records 0.504;
    beyond the 5% tolerance it is refused, naming --slide-mag."""
    path = tmp_path / "aperio.tif"
    make_slide(path, mpp=0.504)
    tiler = SlideTiles(path, tile_px=64, mpp=0.5, tissue_min=0.25)
    assert (tiler.level, tiler.footprint0, tiler.read_px, tiler.target_mpp) == (0, 64, 64, 0.504)
    with pytest.raises(TubError, match=r"finer than the slide's 0.504 µm/px by more than 5%; .*--slide-mag 20"):
        SlideTiles(path, tile_px=64, mpp=0.45, tissue_min=0.25)


def test_a_slide_without_openslide_names_the_install(slide, monkeypatch):
    """Without OpenSlide a pyramidal .tif was called "not a whole-slide image OpenSlide can open"."""
    import tub_atlas.slides as slides

    monkeypatch.setattr(slides, "openslide_available", lambda: False)
    with pytest.raises(TubError, match=r"case01.tif: reading whole slides needs OpenSlide: pip install 'tub-atlas\[slides\]'"):
        slides.check_slide_path(slide[0])


def test_slide_errors_are_item_failures(tmp_path):
    """Settings that do not fit a slide, or a slide without tissue, fail that slide (its line in
    failures.jsonl, exit 1), not the whole batch."""
    no_res = tmp_path / "nores.tif"
    make_slide(no_res, mpp=None)
    blank = tmp_path / "blank.tif"
    make_slide(blank, blank=True)
    base = ["atlas", "embed", "--arch", "vit-t8-demo", "--random-init", "--slide-tile-size", "64"]
    for i, (extra, src, needle) in enumerate(((["--slide-mpp", "0.5"], no_res, "resolution"),
                                              (["--slide-level", "5"], no_res, "levels 0..1"),
                                              ([], blank, "no tissue"))):
        out = tmp_path / f"o{i}{src.stem}"  # one run folder per setting (a reused one must keep its settings)
        r = invoke([*base, *extra, str(src), "-o", str(out)])
        assert r.exit_code == 1, r.stderr + r.stdout
        assert needle in (out / "failures.jsonl").read_text() and "Traceback" not in r.stderr
    # a small plain TIFF tile is still one tile, not a slide
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "tile.tif")
    assert not is_whole_slide(tmp_path / "tile.tif")


def test_target_magnification_follows_trident(tmp_path):
    """--slide-mag uses the slide's nominal magnification (TRIDENT's mpp bins): a 0.2527 µm/px scan is
    40x, so 20x means exactly 2x footprints; --slide-mpp 0.5 gives round(64 * 0.5 / 0.2527) = 127 instead."""
    from tub_atlas.slides import nominal_magnification

    assert [nominal_magnification(m, None) for m in (0.12, 0.18, 0.2527, 0.5, 1.0, 2.0)] == [80, 60, 40, 20, 10, 5]
    assert nominal_magnification(None, "20") == 20 and nominal_magnification(None, None) is None
    path = tmp_path / "scan.tif"
    make_slide(path, mpp=0.2527)
    by_mag = SlideTiles(path, tile_px=64, mag=20, tissue_min=0.25)
    assert (by_mag.mag0, by_mag.footprint0, by_mag.level, by_mag.read_px) == (40.0, 128, 1, 64)
    a = by_mag.coords_attrs()
    assert (a["level0_magnification"], a["target_magnification"], a["patch_size_level0"]) == (40.0, 20, 128)
    by_mpp = SlideTiles(path, tile_px=64, mpp=0.5, tissue_min=0.25)
    assert by_mpp.footprint0 == 127
    assert by_mpp.describe()["target_mag"] == by_mpp.coords_attrs()["target_magnification"] == 20.0  # not None
    base = ["atlas", "tile", str(path), "--slide-tile-size", "64"]
    r = invoke([*base, "--slide-mag", "20", "--slide-mpp", "0.5", "-o", str(tmp_path / "both")])
    assert r.exit_code == 2 and "either" in r.stderr
    # settings that do not fit one slide fail that slide (exit 1), as in embed
    r = invoke([*base, "--slide-mag", "80", "-o", str(tmp_path / "high")])
    assert r.exit_code == 1 and "above the slide's 40x" in failures(tmp_path / "high")["scan.tif"]
    no_res = tmp_path / "nores.tif"
    make_slide(no_res, mpp=None)
    r = invoke(["atlas", "tile", str(no_res), "--slide-mag", "20", "-o", str(tmp_path / "nores")])
    assert r.exit_code == 1 and "objective power" in failures(tmp_path / "nores")["nores.tif"]
    coarse = tmp_path / "coarse.tif"
    make_slide(coarse, mpp=3.0)
    r = invoke(["atlas", "tile", str(coarse), "--slide-mag", "5", "-o", str(tmp_path / "coarse")])
    assert r.exit_code == 1 and "coarser than any nominal magnification" in failures(tmp_path / "coarse")["coarse.tif"]
    r = invoke([*base, "--slide-mag", "20", "--json", "-o", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.stderr


def test_tile_one_bad_slide_is_one_failure_and_shards_open_only_their_own(tmp_path):
    """Junk bytes named .svs and a slide whose resolution the settings need but it does not record are
    their lines in failures.jsonl while the good slide is tiled (exit 1); a shard that does not own the
    junk file never opens it."""
    good, junk, no_res = tmp_path / "case01.tif", tmp_path / "junk.svs", tmp_path / "nores.tif"
    make_slide(good)
    junk.write_bytes(b"not a slide" * 10)
    make_slide(no_res, mpp=None)
    base = ["atlas", "tile", "--slide-tile-size", "64", "--slide-mpp", "0.5"]
    run = tmp_path / "r"
    r = invoke([*base, str(good), str(junk), str(no_res), "--json", "-o", str(run)])
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
    assert set(failures(run)) == {"junk.svs", "nores.tif"} and "resolution" in failures(run)["nores.tif"]
    assert (run / "outputs/patches/case01.h5").is_file() and (run / "outputs/visualization/case01.png").is_file()
    assert not (run / "outputs/patches/junk.h5").exists()
    # sorted paths case01.tif, junk.svs: shard 0/2 owns the good slide only and does not look at junk.svs
    r = invoke([*base, str(good), str(junk), "--shard", "0/2", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.stderr
    r = invoke([*base, str(good), str(junk), "--shard", "1/2", "-o", str(tmp_path / "s")])
    assert r.exit_code == 1 and set(failures(tmp_path / "s")) == {"junk.svs"}
    # missing paths, non-slides and two slides with one name are mistakes in the command: exit 2
    twin = tmp_path / "twin" / "case01.svs"
    twin.parent.mkdir()
    twin.write_bytes(b"x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad, needle in ((tmp_path / "missing.svs", "does not exist"), (tmp_path / "notes.txt", "not a whole-slide image"),
                        (tmp_path / "notes", "holds no whole-slide images"),
                        (twin, "would both write outputs named 'case01'")):
        r = invoke([*base, str(good), str(bad), "-o", str(tmp_path / "x")])
        assert r.exit_code == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "x/outputs/patches").exists()


def test_explain_one_bad_input_is_one_failure(slide, tmp_path):
    """explain reads each input inside its batch item: a blank slide and junk bytes named .svs are their
    lines in failures.jsonl, the good slide is explained (exit 1); a missing path stops it up front."""
    good = slide[0]
    blank, junk = tmp_path / "blank.tif", tmp_path / "junk.svs"
    make_slide(blank, blank=True)
    junk.write_bytes(b"not a slide" * 10)
    base = ["atlas", "explain", "--arch", "vit-t8-demo", "--random-init", "--method", "rollout", "--max-tiles", "2"]
    run = tmp_path / "r"
    r = invoke([*base, str(good), str(blank), str(junk), "-o", str(run)])
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
    assert set(failures(run)) == {"blank.tif", "junk.svs"} and "no tissue" in failures(run)["blank.tif"]
    assert np.load(run / "outputs/case01/maps.npy").shape[0] == 2
    assert sorted(p.name for p in (run / "outputs").iterdir()) == ["case01"]
    r = invoke([*base, str(good), str(tmp_path / "missing.svs"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "x/outputs/case01").exists()


def test_explain_tiles_a_slide_at_the_asked_resolution(slide, tmp_path):
    """explain read whole slides at level 0, 224 px, whatever the probe was trained on; it takes the tiling
    settings of embed: --slide-mpp 0.5 on this 0.25 µm/px slide reads 64-px tiles from level 1."""
    import csv

    path, _, l1 = slide
    run = tmp_path / "r"
    r = invoke(["atlas", "explain", str(path), "--arch", "vit-t8-demo", "--random-init", "--method", "rollout",
                "--slide-mpp", "0.5", "--slide-tile-size", "64", "-o", str(run)])
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(open(run / "outputs/case01/manifest.csv")))
    # tissue rows 128:384, columns 192:512 at level 0 -> level-1 rows 64:192, columns 96:256: 64-px cells
    # 2 rows x 3 columns (the half-covered column passes the 0.25 tissue minimum), 128 level-0 px apart
    assert {(int(r["x"]), int(r["y"])) for r in rows} == {(x, y) for x in (128, 256, 384) for y in (128, 256)}
    assert np.load(run / "outputs/case01/maps.npy").shape == (6, 8, 8)


def test_coords_from_a_features_file_do_not_carry_its_encoder(slide, tmp_path):
    from tub_atlas.slides import read_slide

    path = slide[0]
    coords = tmp_path / "case01.h5"
    with h5py.File(coords, "w") as f:
        f["coords"] = np.array([[192, 128], [256, 128]], np.int64)
        f["coords"].attrs.update({"patch_size": 64, "patch_level": 0, "encoder": "geo", "precision": "bf16"})
    attrs = read_slide(path, tile_px=64, coords=coords).extra["tiler"].coords_attrs()
    assert "encoder" not in attrs and "precision" not in attrs and attrs["patch_size"] == 64


def test_an_empty_coords_file_is_named_not_the_tissue_settings(slide, tmp_path):
    """With --slide-coords nothing is segmented: "lower --slide-tissue-min" was advice that could not help."""
    from tubcli.errors import TubError
    from tub_atlas.slides import read_slide

    coords = tmp_path / "case01.h5"
    with h5py.File(coords, "w") as f:
        f["coords"] = np.zeros((0, 2), np.int64)
        f["coords"].attrs.update({"patch_size": 64, "patch_level": 0})
    with pytest.raises(TubError, match=r"case01.h5 holds no tiles; tile the slide again") as err:
        read_slide(slide[0], tile_px=64, coords=coords)
    assert "tissue-min" not in str(err.value)


def _warnings(run, needle: str) -> list[str]:
    """The WARNING lines of a run's tub.log that contain ``needle``."""
    return [line for line in (run / "tub.log").read_text().splitlines() if "WARNING" in line and needle in line]


def test_slide_base_mpp_over_a_recorded_mpp_is_used_and_warned_once_per_slide(tmp_path):
    """--slide-base-mpp replaced a recorded mpp silently, for every slide of the batch: it is still used as
    asked, but a slide recording another mpp (> 5% off) gets one WARNING line naming both values; a slide
    without an mpp, or one within 5%, gets none."""
    rec, nores, near = tmp_path / "rec.tif", tmp_path / "nores.tif", tmp_path / "near.tif"
    make_slide(rec, mpp=0.25)
    make_slide(nores, mpp=None)
    make_slide(near, mpp=0.49)
    run = tmp_path / "t"
    r = invoke(["atlas", "tile", str(rec), str(nores), str(near), "--slide-base-mpp", "0.5", "--slide-mpp", "0.5",
                "--slide-tile-size", "64", "-o", str(run)])
    assert r.exit_code == 0, r.stderr
    for name in ("rec", "nores"):  # the override is used: 0.5 µm/px tiles are 64 level-0 px, not 128
        with h5py.File(run / f"outputs/patches/{name}.h5") as f:
            assert (f["coords"].attrs["patch_size_level0"], f["coords"].attrs["level0_mpp"]) == (64, 0.5)
    said = _warnings(run, "--slide-base-mpp")
    assert len(said) == 1 and "rec.tif" in said[0], said
    assert "--slide-base-mpp 0.5" in said[0] and "0.25 µm/px the slide records" in said[0]
    # embed (and explain) tile through the same code: the warning is in their logs too, once per slide
    e = tmp_path / "e"
    r = invoke(["atlas", "embed", str(rec), str(nores), "--slide-base-mpp", "0.5", "--slide-mpp", "0.5",
                "--slide-tile-size", "64", "--arch", "vit-t8-demo", "--random-init", "--format", "h5", "-o", str(e)])
    assert r.exit_code == 0, r.stderr
    said = _warnings(e, "--slide-base-mpp")
    assert len(said) == 1 and "rec.tif" in said[0] and "0.25" in said[0], said
    # at the coordinates of patch files it was ignored without a word: it gives them their resolution too
    c = tmp_path / "c"
    r = invoke(["atlas", "embed", str(nores), "--slide-coords", str(run / "outputs/patches"), "--slide-base-mpp",
                "0.25", "--arch", "vit-t8-demo", "--random-init", "--format", "h5", "-o", str(c)])
    assert r.exit_code == 0, r.stderr
    with h5py.File(c / "outputs/nores.h5") as f:
        assert (f["coords"].attrs["level0_mpp"], f["coords"].attrs["target_mpp"]) == (0.25, 0.25)


def test_level_dim_is_the_size_of_patch_level_as_clam_writes_it(slide, tmp_path):
    """CLAM's create_patches_fp stores the patch_level's dimensions as level_dim (= downsampled_level_dim);
    tub wrote level 0's. Coordinates carried from an older tub patch file are rewritten to the level written."""
    path = slide[0]
    tiler = SlideTiles(path, tile_px=64, mpp=0.5, tissue_min=0.25)
    a = tiler.coords_attrs()
    assert a["patch_level"] == 1 and a["level_dim"] == a["downsampled_level_dim"] == [512, 384]
    assert (a["level0_width"], a["level0_height"]) == (1024, 768)
    old = tmp_path / "case01.h5"  # an older tub tile file: level 0's size as level_dim beside patch_level 1
    with h5py.File(old, "w") as f:
        f["coords"] = np.array([[256, 128]], np.int64)
        f["coords"].attrs.update({"patch_size": 64, "patch_level": 1, "patch_size_level0": 128,
                                  "downsample": [2.0, 2.0], "downsampled_level_dim": [512, 384],
                                  "level_dim": [1024, 768]})
    a = SlideTiles.from_coords(path, old).coords_attrs()
    assert a["patch_level"] == 1 and a["level_dim"] == a["downsampled_level_dim"] == [512, 384]


def test_probe_records_its_tiling_and_explain_warns_on_another(slide, tmp_path):
    """probe.json recorded arch/pool/weights but not the tiling of its embeddings, so explaining slides at
    1 µm/px with a probe trained on 0.5 µm/px tiles ran without a word. evaluate records what the features
    h5 (and the embed run) say; explain warns, one line naming both values; an older probe.json is not checked."""
    import csv
    import shutil

    path = slide[0]
    e, ev = tmp_path / "e", tmp_path / "ev"
    r = invoke(["atlas", "embed", str(path), "--slide-mpp", "0.5", "--slide-tile-size", "64", "--arch", "vit-t8-demo",
                "--random-init", "--format", "h5", "-o", str(e)])
    assert r.exit_code == 0, r.stderr
    with h5py.File(e / "outputs/case01.h5") as f:
        patches = [f"{x}_{y}" for x, y in f["coords"][()]]
    assert len(patches) == 6
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patch_id", "label", "split"])
        for i, p in enumerate(patches):
            w.writerow(["case01", p, "ab"[i % 2], ("train", "val", "test")[i // 2]])
    r = invoke(["atlas", "evaluate", str(e), "--labels", str(tmp_path / "labels.csv"), "--method", "linear",
                "--runs", "1", "--max-steps", "20", "-o", str(ev)])
    assert r.exit_code == 0, r.stderr
    probe = ev / "outputs/probe.safetensors"
    record = json.loads(probe.with_suffix(".json").read_text())
    assert record["tiling"] == {"slides": 1, "target_mpp": 0.5, "tile_px": 64}
    from tub_atlas.features import features_tiling

    assert features_tiling([e / "slides.npz"]) == record["tiling"]  # slide embeddings: the embed run's records
    assert features_tiling([tmp_path / "labels.csv"]) is None

    base = ["atlas", "explain", str(path), "--arch", "vit-t8-demo", "--random-init", "--method", "lrp", "--target",
            "probe", "--index", "0", "--max-tiles", "1"]

    def explain(probe_file, *tiling, out):
        r = invoke([*base, "--probe", str(probe_file), *tiling, "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.stderr
        return _warnings(tmp_path / out, "the probe was trained on")

    said = explain(probe, "--slide-mpp", "1.0", "--slide-tile-size", "64", out="x1")
    assert len(said) == 1 and "1 µm/px" in said[0] and "0.5 µm/px" in said[0] and "--slide-mpp 1" in said[0], said
    said = explain(probe, "--slide-mpp", "0.5", "--slide-tile-size", "32", out="x2")
    assert len(said) == 1 and "32-px tiles" in said[0] and "64-px tiles" in said[0], said
    assert explain(probe, "--slide-mpp", "0.5", "--slide-tile-size", "64", out="x3") == []
    older = tmp_path / "older"  # a probe.json of an earlier evaluate: no tiling, no check, no error
    older.mkdir()
    shutil.copy(probe, older / "probe.safetensors")
    (older / "probe.json").write_text(json.dumps({k: v for k, v in record.items() if k != "tiling"}))
    assert explain(older / "probe.safetensors", "--slide-mpp", "1.0", "--slide-tile-size", "64", out="x4") == []


def test_a_slide_with_non_square_pixels_is_refused_unless_the_base_mpp_is_given(tmp_path):
    """0.25 x 0.5 µm pixels (openslide.mpp-y) made rectangular tiles and µm² areas off by 2x, without a word."""
    path = tmp_path / "ns.tif"
    make_slide(path, mpp=0.25, mpp_y=0.5)
    with pytest.raises(TubError, match=r"pixels are not square \(0.25 x 0.5 µm.*--slide-base-mpp"):
        SlideTiles(path, tile_px=128)
    assert SlideTiles(path, tile_px=128, base_mpp=0.25).mpp0 == 0.25


def test_a_greyscale_slide_fails_with_the_reason_instead_of_an_empty_coords_file(tmp_path):
    path = tmp_path / "g.tif"
    img, _ = make_slide(path)
    grey = np.repeat(img.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    tifffile.imwrite(path, grey, tile=(256, 256), photometric="rgb", resolution=(4e4, 4e4),
                     resolutionunit="CENTIMETER")
    with pytest.raises(TubError, match="no colour .greyscale.*--slide-coords"):
        SlideTiles(path, tile_px=128)
    blank = tmp_path / "b.tif"
    make_slide(blank, blank=True)
    assert len(SlideTiles(blank, tile_px=128)) == 0  # glass: empty, as documented


def test_a_damaged_tile_names_where_it_is(slide):
    path, _, _ = slide
    tiler = SlideTiles(path, tile_px=128)

    def damaged(*args):
        raise RuntimeError("TIFFRGBAImageGet failed, last error: ZIPDecode")

    tiler.slide.read_region = damaged
    x, y = tiler.coords[0]
    with pytest.raises(TubError, match=rf"case01.tif: cannot read the tile at level-0 \({x}, {y}\), level 0: TIFF"):
        tiler.read(0, 2)


def test_files_beside_the_slides_of_a_folder_are_named(tmp_path, caplog):
    from tub_atlas.slides import slides_in_folder

    make_slide(tmp_path / "a.tif")
    (tmp_path / "labels.csv").write_text("slide_id\n")
    with caplog.at_level("INFO", logger="tub"):
        assert [p.name for p in slides_in_folder(tmp_path)] == ["a.tif"]
    assert "1 file(s) of other kinds left out (labels.csv)" in caplog.text
