"""Slides, tiling, formats and rendering: synthetic pyramids OpenSlide reads, tissue IoU, exact
round trips of heatmap coordinates, CLAM/TRIDENT/xMIL readers and one-line errors for bad input."""

import json

import numpy as np
import pytest
import torch

from tubcli.errors import TubError

from tub_xmil.bags import read_bag, write_features_h5
from tub_xmil.heatmap import geojson, geojson_coords, normalise, render_overlay, tile_boxes
from tub_xmil.slides import open_slide, slide_mpp
from tub_xmil.synthetic import render_slide, write_pyramid
from tub_xmil.tiling import otsu_threshold, read_coords_h5, tile_slide, write_patches_h5


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    img, tissue, signal = render_slide(3072, 2048, positive=True, seed=3)
    return write_pyramid(d / "s.tiff", img, mpp=0.5), tissue


def test_openslide_reads_synthetic_pyramid_with_mpp(big_slide):
    path, _ = big_slide
    s = open_slide(path)
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert s.level_count == 4 and [round(d) for d in s.level_downsamples] == [1, 2, 4, 8]
    assert slide_mpp(s, path) == pytest.approx(0.5)
    assert slide_mpp(s, path, override=0.25) == 0.25


def test_aperio_variant(tmp_path):
    img, _, _ = render_slide(1024, 768, positive=False, seed=0)
    p = write_pyramid(tmp_path / "a.svs", img, mpp=0.5, aperio=True, levels=2)
    s = open_slide(p)
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.objective-power"]) == 20
    assert slide_mpp(s, p) == pytest.approx(0.5)


def test_tissue_iou_with_planted_mask(big_slide):
    path, tissue = big_slide
    s = open_slide(path)
    t = tile_slide(s, 0.5, target_mpp=0.5, patch_size=256, min_tissue=0.5)
    assert t.patch_size_level0 == 256 and (t.coords % 256 == 0).all()
    pred = np.zeros((2048 // 256, 3072 // 256), bool)
    pred[t.coords[:, 1] // 256, t.coords[:, 0] // 256] = True
    truth = tissue.reshape(8, 256, 12, 256).mean((1, 3)) >= 0.5  # ground-truth tiles
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou >= 0.9, iou
    # a pixel-level check of the Otsu mask on the thumbnail too
    gt = tissue[:: int(t.thumb_downsample), :: int(t.thumb_downsample)][: t.mask.shape[0], : t.mask.shape[1]]
    assert (t.mask & gt).sum() / (t.mask | gt).sum() >= 0.9


def test_tissue_mask_keeps_pale_speckle_in_tissue_and_drops_specks_on_glass():
    """CLAM's median blur and closing: 40% pale pixels inside a tissue disk stay tissue (a raw Otsu mask loses
    them, and with them tiles at min_tissue 0.5), 3% coloured specks on the glass are not tissue."""
    from tub_xmil.tiling import tissue_mask

    rng = np.random.default_rng(0)
    img = np.full((200, 200, 3), 240, np.uint8)
    r2 = (np.mgrid[:200, :200] - 100.0) ** 2
    disk = r2.sum(0) < 70 ** 2
    img[disk] = (200, 120, 180)
    img[disk & (rng.random((200, 200)) < 0.4)] = 240
    img[~disk & (rng.random((200, 200)) < 0.03)] = (150, 60, 120)
    mask = tissue_mask(img)
    assert mask[r2.sum(0) < 64 ** 2].mean() > 0.98 and not mask[r2.sum(0) > 76 ** 2].any()
    raw = tissue_mask(img, median=1, close=1)
    assert raw[disk].mean() < 0.65 and raw[~disk].mean() > 0.02  # what the filters are for


def test_target_mpp_changes_level0_tile_size(big_slide):
    path, _ = big_slide
    t = tile_slide(open_slide(path), 0.5, target_mpp=1.0, patch_size=256)
    assert t.patch_size_level0 == 512
    t2 = tile_slide(open_slide(path), 0.25, target_mpp=0.5, patch_size=128)  # slide read as 40x
    assert t2.patch_size_level0 == 256


def test_otsu_splits_two_modes():
    v = np.concatenate([np.full(500, 20.0), np.full(300, 200.0)])
    t = otsu_threshold(v)
    assert 20 < t <= 200
    assert ((v > t) == (v == 200)).all()


def test_heatmap_png_and_geojson_round_trip_to_level0(big_slide, tmp_path):
    path, _ = big_slide
    t = tile_slide(open_slide(path), 0.5)
    scores = np.linspace(-1, 1, len(t.coords))
    ds = 32
    thumb = np.full((2048 // ds, 3072 // ds, 3), 255, np.uint8)
    over, heat = render_overlay(thumb, t.coords, scores, t.patch_size_level0, ds, signed=True)
    boxes = tile_boxes(t.coords, t.patch_size_level0, ds)
    assert np.array_equal(boxes[:, :2] * ds, t.coords)  # exact: level-0 = PNG pixel * 32
    covered = heat.any(-1)
    expected = np.zeros_like(covered)
    for x0, y0, x1, y1 in boxes:
        expected[y0:y1, x0:x1] = True
    assert np.array_equal(covered, expected)
    gj = json.loads(json.dumps(geojson(t.coords, scores, t.patch_size_level0, "lrp")))
    assert np.array_equal(geojson_coords(gj), t.coords)
    f0 = gj["features"][0]
    assert f0["geometry"]["type"] == "Polygon" and f0["properties"]["measurements"]["xmil_lrp"] == scores[0]


def test_signed_colour_scale_centres_zero():
    v = normalise(np.array([-2.0, 0.0, 1.0]), signed=True)
    assert v[1] == 0.5 and v[0] == 0.0 and v[2] == 0.75
    assert (normalise(np.zeros(4), signed=False) == 0).all()  # all-zero map guarded
    # a sparse map (two relevant tiles among many ~0) keeps its relevant tiles red, the rest neutral
    s = np.concatenate([np.full(40, -3e-5), [1.4, 1.7]])
    v = normalise(s, signed=True)
    assert v[-1] == 1.0 and v[-2] > 0.9 and np.allclose(v[:40], 0.5, atol=1e-3)
    # one overflowed score is not drawn; it no longer blanks the map (every tile NaN, rendered black)
    v = normalise(np.array([-2.0, np.inf, 0.0, 1.0]), signed=True)
    assert np.isnan(v[1]) and (v[[0, 2, 3]] == [0.0, 0.5, 0.75]).all()
    from tub_xmil.heatmap import render_overlay

    thumb = np.full((8, 32, 3), 200, np.uint8)
    _, heat = render_overlay(thumb, np.array([[0, 0], [8, 0], [16, 0], [24, 0]]), np.array([-2.0, np.nan, 0.0, 1.0]),
                             8, 1.0, signed=True)
    assert (heat[:, 8:16] == 0).all() and heat[:, 24:].any() and heat[:, :8].any()


def test_bad_slides_give_one_line_errors(tmp_path):
    (tmp_path / "corrupt.svs").write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(TubError):
        open_slide(tmp_path / "corrupt.svs")
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    with pytest.raises(TubError, match="not a slide"):
        open_slide(tmp_path / "photo.png")
    img, _, _ = render_slide(1024, 768, positive=False)
    p = write_pyramid(tmp_path / "nompp.tiff", img, mpp=None, levels=2)
    with pytest.raises(TubError, match="--mpp"):
        slide_mpp(open_slide(p), p)
    blank = write_pyramid(tmp_path / "blank.tiff", np.full((768, 1024, 3), 240, np.uint8), mpp=0.5, levels=2)
    with pytest.raises(TubError, match="no tissue"):
        tile_slide(open_slide(blank), 0.5)
    for err in (TubError("x"),):
        assert "\n" not in str(err)


def test_clam_and_trident_h5_and_xmil_pt_bags(tmp_path, big_slide):
    import h5py

    path, _ = big_slide
    t = tile_slide(open_slide(path), 0.5)
    write_patches_h5(tmp_path / "tub.h5", t, "s")
    coords, attrs = read_coords_h5(tmp_path / "tub.h5")
    assert np.array_equal(coords, t.coords) and attrs["patch_size_level0"] == 256
    # CLAM patches at patch_level 1 (downsample 2): level-0 size = patch_size * 2
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [512, 0]]))
        d.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": [2.0, 2.0], "name": "s"})
    _, a = read_coords_h5(tmp_path / "clam.h5")
    assert a["patch_size_level0"] == 512
    # TRIDENT features file
    feats = np.random.default_rng(0).normal(size=(len(t.coords), 5)).astype(np.float32)
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=t.coords)
    x, c, _ = read_bag(tmp_path / "trident.h5")
    assert torch.equal(x, torch.from_numpy(feats)) and np.array_equal(c, t.coords)
    write_features_h5(tmp_path / "tubf.h5", feats, t.coords, {"patch_size_level0": 256})
    assert read_bag(tmp_path / "tubf.h5")[2]["patch_size_level0"] == 256
    # xMIL bag: (N, D) tensor in patch_id order; and a folder of per-patch files
    torch.save(torch.from_numpy(feats), tmp_path / "s.pt")
    assert torch.equal(read_bag(tmp_path / "s.pt")[0], torch.from_numpy(feats))
    (tmp_path / "per_patch").mkdir()
    for i in (0, 1, 10, 2):
        torch.save(torch.from_numpy(feats[i]), tmp_path / "per_patch" / f"{i}.pt")
    x = read_bag(tmp_path / "per_patch")[0]
    assert torch.equal(x, torch.from_numpy(feats[[0, 1, 2, 10]]))
    np.savez(tmp_path / "s.npz", features=feats, coords=t.coords)
    assert np.array_equal(read_bag(tmp_path / "s.npz")[1], t.coords)


def test_bag_reader_refuses_pickled_objects(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(TubError, match="plain Python pickle, not a torch.save file"):
        read_bag(tmp_path / "evil.pt")
    torch.save({"features": torch.ones(2, 3), "obj": Evil()}, tmp_path / "evil_bag.pt")
    with pytest.raises(TubError, match="it pickles print, Python code rather than tensors"):
        read_bag(tmp_path / "evil_bag.pt")
    from tub_xmil.checkpoint import read_state_dict
    torch.save({"model_state_dict": {"w": torch.ones(1)}, "obj": Evil()}, tmp_path / "evil_ckpt.pt")
    with pytest.raises(TubError, match="safely"):
        read_state_dict(tmp_path / "evil_ckpt.pt")


def test_xmil_bag_with_patch_metadata_gives_coords(tmp_path):
    (tmp_path / "features").mkdir()
    meta = tmp_path / "patches" / "s1" / "metadata"
    meta.mkdir(parents=True)
    torch.save(torch.arange(6.0).reshape(3, 2), tmp_path / "features" / "s1.pt")
    meta.joinpath("df.csv").write_text(
        'patch_id,position_abs,position_rel,patch_size_abs,annotation_classes\n'
        '2,"(512, 0)","(2, 0)",256,[]\n0,"(0, 0)","(0, 0)",256,[]\n1,"(256, 0)","(1, 0)",256,[]\n')
    x, coords, attrs = read_bag(tmp_path / "features" / "s1.pt")
    assert coords.tolist() == [[0, 0], [256, 0], [512, 0]] and attrs["patch_size_level0"] == 256


def test_a_target_finer_than_the_scan_is_refused(big_slide):
    """0.5 µm/px asked for 0.25: every tile would be upsampled 2x and labelled with detail the scan lacks."""
    path, _ = big_slide
    with pytest.raises(TubError, match="finer than the slide's 0.5 µm/px by more than 5%"):
        tile_slide(open_slide(path), 0.5, target_mpp=0.25, patch_size=128)
    assert tile_slide(open_slide(path), 0.5, target_mpp=0.48, patch_size=128).patch_size_level0 == 123  # within 5%


def test_an_mpp_override_that_contradicts_the_slide_is_a_warning(big_slide, caplog):
    path, _ = big_slide
    with caplog.at_level("WARNING", logger="tub"):
        assert slide_mpp(open_slide(path), path, override=0.51) == 0.51  # within 5%: silent
        assert not caplog.records
        assert slide_mpp(open_slide(path), path, override=0.25) == 0.25
    assert "--mpp 0.25 replaces the 0.5 µm/px the slide records" in caplog.text


def test_patches_name_the_pyramid_level_they_are_read_at(big_slide, tmp_path):
    """CLAM readers cut read_region(coord, patch_level, patch_size): with the level the tiles are really read
    at, they get the same pixels as tub (a fake patch_level 0 cut half the physical tile)."""
    from tub_xmil.slides import read_tile

    path, _ = big_slide
    s = open_slide(path)
    t = tile_slide(s, 0.5, target_mpp=1.0, patch_size=128)  # 256 level-0 px, level 1 has them at 128 px
    write_patches_h5(tmp_path / "p.h5", t, "s")
    coords, attrs = read_coords_h5(tmp_path / "p.h5")
    assert (attrs["patch_level"], attrs["read_size"], attrs["patch_size"]) == (1, 128, 128)
    assert list(attrs["downsample"]) == [2.0, 2.0] and list(attrs["level_dim"]) == list(s.level_dimensions[1])
    x, y = coords[len(coords) // 2]
    clam = np.asarray(s.read_region((int(x), int(y)), attrs["patch_level"], (attrs["patch_size"],) * 2).convert("RGB"))
    np.testing.assert_array_equal(clam, read_tile(s, x, y, attrs["patch_size_level0"], 128))


def test_geojson_is_in_qupaths_frame_for_slides_with_bounds():
    """QuPath shows a slide with openslide.bounds-x/-y (MRXS) cropped to them: its pixel (0, 0) is the
    level-0 point (bounds-x, bounds-y), so the polygons are shifted by it and the origin is recorded."""
    from tub_xmil.slides import slide_bounds

    class Mrxs:
        properties = {"openslide.bounds-x": "1200", "openslide.bounds-y": "3400"}

    assert slide_bounds(Mrxs()) == (1200, 3400) and slide_bounds(type("T", (), {"properties": {}})()) == (0, 0)
    coords = np.array([[1200, 3400], [1456, 3400]])
    gj = json.loads(json.dumps(geojson(coords, np.array([0.1, 0.2]), 256, "lrp", origin=(1200, 3400))))
    assert gj["features"][0]["geometry"]["coordinates"][0][0] == [0, 0]
    assert gj["features"][1]["geometry"]["coordinates"][0][2] == [512, 256]
    assert gj["properties"]["origin_level0"] == [1200, 3400]
    np.testing.assert_array_equal(geojson_coords(gj), coords)


def test_a_damaged_tile_names_where_it_is():
    from tub_xmil.slides import read_tile

    class Damaged:
        level_downsamples = (1.0,)

        def get_best_level_for_downsample(self, ds):
            return 0

        def read_region(self, *args):
            raise RuntimeError("TIFFRGBAImageGet failed")

    with pytest.raises(TubError, match=r"tile at level-0 \(512, 768\), level 0: TIFFRGBAImageGet failed"):
        read_tile(Damaged(), 512, 768, 256, 256)


def test_a_file_that_is_no_image_is_not_sent_to_tiff_conversion(tmp_path):
    (tmp_path / "notes.svs").write_text("patient notes\n")
    with pytest.raises(TubError, match="not a slide in a format OpenSlide knows") as info:
        open_slide(tmp_path / "notes.svs")
    assert "convert" not in str(info.value)


def test_aperio_objective_power_follows_the_mpp(tmp_path):
    img, _, _ = render_slide(512, 512, positive=False, seed=0)
    s = open_slide(write_pyramid(tmp_path / "a.svs", img, mpp=0.25, aperio=True, levels=1))
    assert float(s.properties["openslide.objective-power"]) == 40 and slide_mpp(s, tmp_path / "a.svs") == 0.25


def test_non_finite_tile_embeddings_fail_the_slide(big_slide):
    """An fp16 overflow in the encoder gave NaN bags without a word; atlas refuses them, and so does xmil."""
    from types import SimpleNamespace

    from tub_xmil.features import embed_tiles

    path, _ = big_slide
    s = open_slide(path)
    coords = np.array([[0, 0], [256, 0], [512, 0]])

    def overflowing(x):  # the second tile overflows
        out = torch.ones(len(x), 4, dtype=x.dtype)
        out[1, 2] = float("inf")
        return out

    spec = SimpleNamespace(tile_size=32)
    with pytest.raises(TubError, match=r"tile at level-0 \(256, 0\) is NaN or inf.*use --precision bf16 or fp32"):
        embed_tiles(s, coords, 256, spec, overflowing, dtype=torch.float16)
    ok = embed_tiles(s, coords[[0, 2]], 256, spec, lambda x: torch.ones(len(x), 4))
    assert ok.shape == (2, 4) and np.isfinite(ok).all()


def test_a_slide_with_non_square_pixels_is_refused_unless_mpp_is_given(tmp_path):
    """0.25 x 0.5 µm pixels (openslide.mpp-y) made 64 x 128 µm tiles without a word."""
    tifffile = pytest.importorskip("tifffile")
    img, _, _ = render_slide(512, 512, positive=False, seed=0)
    path = tmp_path / "ns.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.5),
                     resolutionunit="CENTIMETER", metadata=None)
    slide = open_slide(path)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
    with pytest.raises(TubError, match=r"pixels are not square \(0.25 x 0.5 µm.*give --mpp"):
        slide_mpp(slide, path)
    assert slide_mpp(slide, path, override=0.25) == 0.25


def test_a_greyscale_slide_says_why_no_tissue_is_found(tmp_path):
    """Saturation is zero on a greyscale slide: 'lower tiling.min_tissue' could not help."""
    img, _, _ = render_slide(1024, 768, positive=False, seed=0)
    grey = np.repeat(img.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    path = write_pyramid(tmp_path / "g.tif", grey, mpp=0.5, levels=2)
    slide = open_slide(path)
    with pytest.raises(TubError, match="no colour .greyscale.*--coords-dir"):
        tile_slide(slide, 0.5, 0.5, 128, name="g.tif")
    colour = write_pyramid(tmp_path / "c.tif", img, mpp=0.5, levels=2)
    assert len(tile_slide(open_slide(colour), 0.5, 0.5, 128, name="c.tif").coords) > 0


def test_files_in_a_slide_folder_that_are_not_slides_are_named(tmp_path, caplog):
    """A PNG beside the slides was left out without a word ('2 of 2 items failed' for a folder of 4)."""
    from tub_xmil.pipeline import expand_inputs
    from tub_xmil.slides import SLIDE_SUFFIXES

    for name in ("a.svs", "b.png", "c.jpg", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("INFO", logger="tub"):
        assert [p.name for p in expand_inputs([tmp_path], SLIDE_SUFFIXES)] == ["a.svs"]
    assert "2 file(s) of other kinds left out (b.png, c.jpg)" in caplog.text


def test_links_of_other_names_to_one_slide_are_named_in_a_warning(tmp_path, caplog):
    """A folder of links into a slide archive with two names for one slide gave one output under the first
    name and not a word about the other: its labels then found no features."""
    from tub_xmil.pipeline import expand_inputs
    from tub_xmil.slides import SLIDE_SUFFIXES

    archive, links = tmp_path / "archive", tmp_path / "links"
    archive.mkdir(), links.mkdir()
    (archive / "s1.svs").write_bytes(b"x")
    (archive / "s2.svs").write_bytes(b"y")
    for name, target in (("a.svs", "s1.svs"), ("b.svs", "s1.svs"), ("c.svs", "s2.svs")):
        (links / name).symlink_to(archive / target)
    with caplog.at_level("WARNING", logger="tub"):
        found = expand_inputs([links, links / "c.svs"], SLIDE_SUFFIXES)  # c named twice: once, silently
    assert [p.name for p in found] == ["a.svs", "c.svs"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("1 input(s) are the same file as a.svs (links: b.svs)")
