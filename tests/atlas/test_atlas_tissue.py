"""Tissue segmentation and tiling as CLAM/TRIDENT do it, on generated images: a tissue block with a real
hole and a small hole, a disk of known area, a speck of debris and pen strokes (green on glass, blue and
black over tissue). Checked: holes above a_h stay holes, smaller ones are filled, debris is dropped, ink
is excluded (and is tissue without the filter), areas in µm² match the drawing, outlines are exact,
overlapping grids have the right stride and count, and coordinates land on tissue at level 0."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tubcli.testing import invoke

from tub_atlas.slides import grid_positions, overlap_pixels, tissue_fractions
from tub_atlas.tissue import (TissueParams, close_mask, hsv, mask_outlines, median_filter, pen_mask, ring_area,
                              segment_tissue)

PINK, GREEN_INK, BLUE_INK, BLACK_INK = (200, 80, 150), (40, 160, 90), (40, 60, 190), (20, 20, 25)


def draw_scene(shape=(256, 384), seed=0):
    """In-memory thumbnail (2 µm/px): A = block rows 20:120, cols 20:150 with a 30x40 hole and a 6x6 hole;
    B = disk r 40 at (190, 80); speck 8x8; green stroke on glass; blue stroke over A's right edge;
    black stroke inside A. Returns the image and the drawn parts."""
    rng = np.random.default_rng(seed)
    img = (240 + rng.integers(0, 6, (*shape, 3))).astype(np.int32)
    tissue = np.zeros(shape, bool)
    tissue[20:120, 20:150] = True
    tissue[50:80, 50:90] = False   # real hole (1200 px = 4800 µm²)
    tissue[95:101, 120:126] = False  # small hole (36 px = 144 µm²)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    disk = (yy - 190) ** 2 + (xx - 80) ** 2 <= 40 ** 2
    tissue |= disk
    speck = np.zeros(shape, bool)
    speck[200:208, 250:258] = True
    img[tissue | speck] = np.clip(np.array(PINK) + rng.integers(-25, 26, (int((tissue | speck).sum()), 3)), 0, 255)
    parts = {"tissue": tissue, "disk": disk, "speck": speck}
    for name, (rs, cs), col in (("green", (slice(160, 168), slice(160, 370)), GREEN_INK),
                                ("blue", (slice(60, 150), slice(135, 141)), BLUE_INK),
                                ("black", (slice(30, 34), slice(30, 70)), BLACK_INK)):
        m = np.zeros(shape, bool)
        m[rs, cs] = True
        img[m] = col
        parts[name] = m
    return img.astype(np.uint8), parts


@pytest.mark.parametrize("size", [1, 3, 5, 7, 9, 11])
def test_median_filter_equals_scipys(size):
    """The sorting-network median (six times faster on a 2048-px thumbnail) against scipy's rank filter:
    equal on every pixel, with ties, at the edges and on images smaller than the window."""
    from scipy import ndimage

    rng = np.random.default_rng(size)
    for shape in [(61, 47), (3, 2), (1, 5), (5, 1), (size + 1, 2 * size)]:
        img = rng.integers(0, 256, shape).astype(np.uint8)
        img[: shape[0] // 3] = rng.integers(0, 3, (shape[0] // 3, shape[1]))  # many ties
        want = ndimage.median_filter(img, size=size, mode="nearest")
        assert np.array_equal(median_filter(img, size), want)
        assert np.array_equal(median_filter(img, size, strip=7), want)  # strips that do not divide the rows


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
def test_closing_by_separated_square_equals_the_square(size):
    from scipy import ndimage

    rng = np.random.default_rng(size)
    mask = ndimage.binary_opening(rng.random((70, 90)) < 0.45)
    mask[:, :3] = mask[:2] = True  # tissue at the image edge
    st = np.ones((size, size), bool)
    want = ndimage.binary_erosion(ndimage.binary_dilation(np.pad(mask, size), st), st)[size:-size, size:-size]
    assert np.array_equal(close_mask(mask, size), want) and not np.array_equal(want, mask)


def test_segmentation_keeps_real_holes_drops_debris_and_excludes_pen():
    img, parts = draw_scene()
    params = dict(min_area=1000.0, min_hole_area=2000.0)
    plain = segment_tissue(img, 2.0, TissueParams(**params))
    t = segment_tissue(img, 2.0, TissueParams(**params, pen=("green", "blue", "black")))
    for res in (plain, t):
        assert not res.mask[65, 70] and res.holes[65, 70]        # the real hole stays a hole
        assert res.mask[98, 123] and not res.holes[98, 123]      # the small hole is filled
        assert not res.mask[parts["speck"]].any() and res.dropped >= 1  # debris dropped
    # without the pen filter the green stroke is "tissue" (saturated), with it it is gone
    assert plain.mask[164, 250] and plain.mask[100, 138]
    assert not t.mask[parts["green"]].any() and not t.mask[parts["blue"]].any()
    assert not t.mask[parts["black"]].any()
    assert t.pen[parts["green"]].all() and not t.pen[parts["disk"]].any()
    assert len(t.component_areas) == 2                            # block A and disk B, no stroke
    # areas (µm², 4 µm² per pixel): the disk, and block A minus its real hole and the dilated ink
    disk_um2 = np.pi * 40 ** 2 * 4
    b = t.labels[190, 80]
    assert abs(t.component_areas[b - 1] - disk_um2) / disk_um2 < 0.02
    a = t.labels[25, 25]
    expected_a = (100 * 130 - 30 * 40 - 62 * 10 - 8 * 44) * 4.0  # ink dilated by 2 px on each side
    assert abs(t.component_areas[a - 1] - expected_a) / expected_a < 0.02
    assert abs(t.area - sum(t.component_areas)) < 1e-6
    # min hole area above the real hole: it gets filled too; min area above the disk: the disk goes
    filled = segment_tissue(img, 2.0, TissueParams(min_area=30000.0, min_hole_area=5000.0, pen=("green",)))
    assert filled.mask[65, 70] and not filled.mask[190, 80]


def test_areas_are_resolution_independent():
    img, _ = draw_scene()
    small = img[::2, ::2]  # the same scene at 4 µm/px
    p = TissueParams(min_area=1000.0, min_hole_area=2000.0, median=3, close=2, pen=("green", "blue", "black"))
    fine, coarse = segment_tissue(img, 2.0, p), segment_tissue(small, 4.0, p)
    d_f = fine.component_areas[fine.labels[190, 80] - 1]
    d_c = coarse.component_areas[coarse.labels[95, 40] - 1]
    assert abs(d_f - d_c) / d_f < 0.03
    with pytest.raises(ValueError, match="resolution is unknown"):
        segment_tissue(img, None, TissueParams())


def test_pen_rules_spare_he_colours():
    he = np.array([[(230, 150, 190), (200, 80, 150), (70, 50, 130), (150, 130, 200), (80, 90, 150),
                    (110, 60, 140), (245, 240, 243)]], np.uint8)  # eosin, haematoxylin (incl. bluish), glass
    assert not pen_mask(he, ("blue", "green", "black")).any()
    ink = np.array([[GREEN_INK, BLUE_INK, BLACK_INK, (100, 130, 200), (30, 150, 160), (210, 30, 40)]], np.uint8)
    assert pen_mask(ink, ("blue", "green", "black", "red")).all()
    assert pen_mask(ink[:, 5:], ("red",)).all() and not pen_mask(ink[:, 5:], ("blue", "green", "black")).any()
    h, s, v = hsv(np.array([[(255, 0, 0), (0, 255, 0), (0, 0, 255)]], np.uint8))
    assert np.allclose(h, [[0, 120, 240]]) and np.allclose(s, 1) and np.allclose(v, 1)


def test_outlines_are_exact_polygons_with_holes():
    img, _ = draw_scene()
    t = segment_tissue(img, 2.0, TissueParams(min_area=1000.0, min_hole_area=2000.0, pen=("green", "blue", "black")))
    polys = mask_outlines(t.mask, t.labels)
    assert [p["id"] for p in polys] == [1, 2]
    for p in polys:
        area = ring_area(p["exterior"]) + sum(ring_area(h) for h in p["holes"])
        assert area == (t.labels == p["id"]).sum() and ring_area(p["exterior"]) > 0
        assert all(ring_area(h) < 0 for h in p["holes"])
    assert len(polys[t.labels[25, 25] - 1]["holes"]) == 2  # the real hole and the black ink
    # pixels touching only diagonally are one component (8-connectivity) and one ring
    m = np.zeros((5, 5), bool)
    m[1, 1] = m[2, 2] = m[3, 3] = True
    (p,) = mask_outlines(m)
    assert ring_area(p["exterior"]) == 3 and p["holes"] == []
    ring = np.zeros((5, 5), bool)
    ring[1:4, 1:4] = True
    ring[2, 2] = False
    (p,) = mask_outlines(ring)
    assert ring_area(p["exterior"]) == 9 and [ring_area(h) for h in p["holes"]] == [-1]


def test_overlap_grid_stride_and_count():
    assert overlap_pixels(0, 64) == 0 and overlap_pixels(16, 64) == 16 and overlap_pixels(0.25, 64) == 16
    xs = grid_positions(1000, 64, 48)
    assert xs[1] - xs[0] == 48 and len(xs) == -(-1000 // 48) and xs[-1] < 1000
    from tubcli.errors import TubError

    for bad in (64, 100, 1.5, -3):
        with pytest.raises(TubError):
            overlap_pixels(bad, 64)
    # tissue fraction: outside the mask counts as no tissue, a half-covered tile is 0.5
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    mask[:, 9] = True
    f = tissue_fractions(mask, np.array([[0, 0], [40, 0], [60, 0], [90, 90]]), 20, (0.1, 0.1))
    assert np.allclose(f, [1.0, 0.5, 0.0, 0.25])  # the last tile is 3/4 outside the slide


# ------------------------------------------------------------------ whole slides through OpenSlide
openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

MPP0 = 0.5


@pytest.fixture(scope="module")
def scene_slide(tmp_path_factory):
    """The scene at 8x: 3072 x 2048 level 0 at 0.5 µm/px (so the 2 µm/px thumbnail is level 2, 4x)."""
    img, parts = draw_scene(shape=(256, 384))
    lvl0 = np.kron(img, np.ones((8, 8, 1), np.uint8))
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    h, w = lvl0.shape[:2]
    levels = [lvl0] + [lvl0.reshape(h // f, f, w // f, f, 3).mean((1, 3)).round().astype(np.uint8) for f in (2, 4)]
    kw = dict(tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], subfiletype=0, resolution=(1e4 / MPP0, 1e4 / MPP0), resolutionunit="CENTIMETER", **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **kw)
    truth = {k: np.kron(v, np.ones((8, 8), bool)) for k, v in parts.items()}
    return path, truth


TILE_ARGS = ["--slide-mpp", "1.0", "--slide-tile-size", "64", "--slide-thumb-size", "768",
             "--slide-min-area", "4000", "--slide-min-hole-area", "8000",
             "--slide-pen", "green", "--slide-pen", "blue", "--slide-pen", "black"]


def test_tile_verb_writes_trident_coords_qc_and_contours(scene_slide, tmp_path):
    import h5py
    from PIL import Image

    path, truth = scene_slide
    r = invoke(["atlas", "tile", str(path), *TILE_ARGS, "--slide-overlap", "0.5", "--json", "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)["whole_slides"][0]
    out = tmp_path / "t/outputs"
    with h5py.File(out / "patches/scene.h5") as f:
        coords, attrs = f["coords"][()], dict(f["coords"].attrs)
    # 1 µm/px from 0.5 µm/px: footprint 128 level-0 px read from level 1; overlap 32 px -> step 64 at level 0
    assert (attrs["patch_size"], attrs["patch_level"], attrs["patch_size_level0"]) == (64, 1, 128)
    assert (attrs["overlap"], attrs["step_level0"], attrs["target_mpp"], attrs["level0_mpp"]) == (32, 64, 1.0, 0.5)
    assert (attrs["level0_magnification"], attrs["target_magnification"]) == (20.0, 10.0)
    assert res["grid"] == [3072 // 64, 2048 // 64] and res["tissue_tiles"] == len(coords) > 0
    again = invoke(["atlas", "tile", str(path), *TILE_ARGS, "--slide-overlap", "0.5", "--json", "-o", str(tmp_path / "t")])
    assert json.loads(again.stdout)["whole_slides"] == [res]  # a rerun reports the run's slides, not none
    assert (coords % 64 == 0).all()
    # every kept tile is on drawn tissue at level 0 (>= 25 % up to mask rounding), none on ink or debris
    tissue0 = truth["tissue"] & ~truth["blue"] & ~truth["black"]
    frac = np.array([tissue0[y:y + 128, x:x + 128].mean() for x, y in coords])
    assert frac.min() >= 0.2 and np.median(frac) > 0.75
    for junk in ("green", "speck"):
        assert not any(truth[junk][y:y + 128, x:x + 128].any() for x, y in coords)
    # and every tile with >= 35 % drawn tissue is kept (nothing lost)
    ys, xs = np.meshgrid(np.arange(0, 2048, 64), np.arange(0, 3072, 64), indexing="ij")
    want = {(x, y) for x, y in zip(xs.ravel(), ys.ravel()) if tissue0[y:y + 128, x:x + 128].mean() >= 0.35
            and tissue0[y:y + 128, x:x + 128].shape == (128, 128)}
    assert want <= set(map(tuple, coords.tolist()))
    # tissue area in µm²: disk + block minus the hole and the ink (dilated by 2 mask px = 1 scene px);
    # a scene pixel is 8 level-0 px = 4 µm wide here
    drawn = (np.pi * 40 ** 2 + 100 * 130 - 30 * 40 - 61 * 8 - 6 * 42) * 16.0
    assert abs(res["tissue_area_um2"] - drawn) / drawn < 0.03 and res["tissue_components"] == 2
    qc = Image.open(out / "visualization/scene.png")
    assert qc.size == (768, 512)
    px = np.asarray(qc.convert("RGB")).reshape(-1, 3)
    assert ((px == (30, 60, 220)).all(1)).sum() > 100  # tile squares drawn
    gj = json.loads((out / "contours_geojson/scene.geojson").read_text())
    assert len(gj["features"]) == 2 and sorted(f["properties"]["holes"] for f in gj["features"]) == [0, 2]
    ext = np.array(gj["features"][0]["geometry"]["coordinates"][0])
    assert ext[:, 0].max() <= 3072 and ext[:, 1].max() <= 2048  # level-0 pixels
    # QuPath's measurement table: the areas, summing to the reported tissue area
    assert sum(f["properties"]["measurements"]["area_um2"] for f in gj["features"]) == \
        pytest.approx(res["tissue_area_um2"], rel=1e-3)


def test_overlap_changes_count_and_embed_writes_coords_attrs(scene_slide, tmp_path):
    import h5py

    path, _ = scene_slide
    counts = {}
    for ov in ("0", "32"):
        r = invoke(["atlas", "tile", str(path), *TILE_ARGS, "--slide-overlap", ov, "--json", "-o", str(tmp_path / ov)])
        assert r.exit_code == 0, r.stderr
        with h5py.File(tmp_path / ov / "outputs/patches/scene.h5") as f:
            counts[ov] = f["coords"][()]
    assert (counts["0"] % 128 == 0).all() and (counts["32"] % 64 == 0).all()
    assert set(map(tuple, counts["0"].tolist())) <= set(map(tuple, counts["32"].tolist()))
    assert 3 * len(counts["0"]) <= len(counts["32"]) <= 5 * len(counts["0"])  # ~4x on a 2D grid
    r = invoke(["atlas", "embed", str(path), *TILE_ARGS, "--arch", "vit-t8-demo", "--random-init", "--format", "h5",
                "--slide-overlap", "0", "--json", "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.stderr
    with h5py.File(tmp_path / "e/outputs/scene.h5") as f:
        assert np.array_equal(f["coords"][()], counts["0"]) and f["features"].shape == (len(counts["0"]), 384)
        assert f["coords"].attrs["patch_level"] == 1 and f["coords"].attrs["target_mpp"] == 1.0
    assert (tmp_path / "e/qc/scene.png").is_file() and (tmp_path / "e/qc/scene.geojson").is_file()


def test_bad_tiling_parameters_are_one_line_errors(scene_slide, tmp_path):
    path, _ = scene_slide
    base = ["atlas", "tile", str(path), "--slide-tile-size", "64", "--slide-thumb-size", "256"]
    for extra, needle in ((["--slide-overlap", "64"], "smaller than the tile"),
                          (["--slide-overlap", "1.5"], "whole"),
                          (["--slide-overlap", "-0.5"], "slide_overlap"),
                          (["--slide-min-area", "-5"], "slide_min_area"),
                          (["--slide-min-hole-area", "-1"], "slide_min_hole_area"),
                          (["--slide-median", "4"], "odd"),
                          (["--slide-pen", "purple"], "slide_pen")):
        r = invoke([*base, *extra, "-o", str(tmp_path / f"o{len(needle)}{extra[1]}")])
        assert r.exit_code == 2, (extra, r.stderr, r.stdout)
        err = r.stderr.strip()
        assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1, (extra, err)
    (tmp_path / "empty").mkdir()
    r = invoke(["atlas", "tile", str(tmp_path / "empty"), "-o", str(tmp_path / "nd")])
    assert r.exit_code == 2 and "holds no whole-slide images" in r.stderr  # a folder without slides


def test_embed_at_coordinates_from_tile_and_clam_patch_files(scene_slide, tmp_path):
    """TRIDENT/CLAM order: segment + patch once ('tile'), then embed at those coordinates; a CLAM-style
    file (patch_size + patch_level only) reads patch_size pixels of that level."""
    import h5py

    path, _ = scene_slide
    r = invoke(["atlas", "tile", str(path), *TILE_ARGS, "--slide-overlap", "16", "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.stderr
    with h5py.File(tmp_path / "t/outputs/patches/scene.h5") as f:
        tiled = f["coords"][()]
    emb = ["atlas", "embed", str(path), "--arch", "vit-t8-demo", "--random-init", "--format", "h5", "--json"]
    r = invoke([*emb, "--slide-coords", str(tmp_path / "t"), "-o", str(tmp_path / "e1")])
    assert r.exit_code == 0, r.stderr
    direct = invoke([*emb, *TILE_ARGS, "--slide-overlap", "16", "-o", str(tmp_path / "e2")])
    assert direct.exit_code == 0, direct.stderr
    with h5py.File(tmp_path / "e1/outputs/scene.h5") as f1, h5py.File(tmp_path / "e2/outputs/scene.h5") as f2:
        assert np.array_equal(f1["coords"][()], tiled) and np.array_equal(f2["coords"][()], tiled)
        assert np.abs(f1["features"][()] - f2["features"][()]).max() == 0.0
        assert f1["coords"].attrs["overlap"] == 16 and f1["coords"].attrs["patch_size_level0"] == 128
    # a CLAM patch file: 32 px tiles of level 2 (4x) at two corners
    from tub_atlas.slides import SlideTiles

    clam = tmp_path / "clam" / "scene.h5"
    clam.parent.mkdir()
    with h5py.File(clam, "w") as f:
        d = f.create_dataset("coords", data=np.array([[256, 256], [512, 1280]], np.int64))
        d.attrs["patch_size"], d.attrs["patch_level"] = 32, 2
    t = SlideTiles.from_coords(path, clam)
    assert (t.level, t.footprint0, t.read_px, t.tile_px) == (2, 128, 32, 32)
    lvl2 = np.asarray(t.slide.read_region((0, 0), 2, t.slide.level_dimensions[2]).convert("RGB"))
    tiles = t.read(0, 2)
    assert np.array_equal(tiles[0], lvl2[64:96, 64:96]) and np.array_equal(tiles[1], lvl2[320:352, 128:160])
    bad = invoke([*emb, "--slide-coords", str(tmp_path / "nowhere"), "-o", str(tmp_path / "e3")])
    assert bad.exit_code == 2 and "no patch file" in bad.stderr
    # tiling settings beside a patch file would be recorded in config.yaml, not used
    bad = invoke([*emb, "--slide-coords", str(tmp_path / "t"), "--slide-mpp", "0.5", "--slide-pen", "blue",
                  "-o", str(tmp_path / "e4")])
    assert bad.exit_code == 2 and "--slide-mpp, --slide-pen do not apply with --slide-coords" in bad.stderr


def test_slides_without_resolution_need_base_mpp_or_no_area_filters(tmp_path):
    img = np.full((512, 512, 3), 240, np.uint8)
    img[128:384, 128:384] = PINK
    path = tmp_path / "nores.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")  # tiled, no resolution tags
    base = ["atlas", "tile", str(path), "--slide-tile-size", "64", "--json"]
    r = invoke([*base, "-o", str(tmp_path / "a")])  # a problem of this slide: its failure, exit 1
    assert r.exit_code == 1 and "--slide-base-mpp" in (tmp_path / "a/failures.jsonl").read_text()
    for extra, key in ((["--slide-base-mpp", "0.5"], "tissue_area_um2"),
                       (["--slide-min-area", "0", "--slide-min-hole-area", "0"], "tissue_area_px")):
        r = invoke([*base, *extra, "-o", str(tmp_path / extra[0])])
        assert r.exit_code == 0, r.stderr
        res = json.loads(r.stdout)["whole_slides"][0]
        assert res["tissue_tiles"] == 16
        px = 256 * 256
        assert abs(res[key] - (px * 0.25 if key.endswith("um2") else px)) / px < 0.01
    # embed rejects impossible tiling the same way, before any slide is read
    r = invoke(["atlas", "embed", str(path), "--arch", "vit-t8-demo", "--random-init", "--slide-tile-size", "64",
                "--slide-overlap", "80", "-o", str(tmp_path / "e")])
    assert r.exit_code == 2 and "smaller than the tile" in r.stderr and "Traceback" not in r.stderr
