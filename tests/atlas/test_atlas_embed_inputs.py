"""`tub atlas embed` as a batch verb and its input checks: slides.npz covers the whole run folder, one bad
input is one line in failures.jsonl, pixel dtypes and tile sizes, output names; plus the small input
checks of inspect, convert and evaluate. Tiny generated inputs, the random-weight demo ViT."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tubcli.errors import TubError
from tubcli.testing import invoke
from tub_atlas.tiles import read_input

ENC = ["--arch", "vit-t8-demo", "--random-init"]


def tile_folder(folder: Path, slide: str, n: int = 2, size=(64, 64), seed: int = 0) -> Path:
    """``n`` random RGB tiles ``<slide>_<x>_0.png`` of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / f"{slide}_{64 * i}_0.png")
    return folder


def atlas(*args, code: int = 0):
    r = invoke(["atlas", *map(str, args)])
    assert r.exit_code == code, r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    return r


def slides_in(run: Path) -> list[str]:
    with np.load(run / "slides.npz") as z:
        return sorted(z.files)


def failures(run: Path) -> dict[str, str]:
    lines = (run / "failures.jsonl").read_text().splitlines()
    return {Path(json.loads(line)["item"]).name: json.loads(line)["error"] for line in lines}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from tub_atlas.checkpoint import model_json, save_weights
    from tub_atlas.presets import get_preset
    from tub_atlas.synthetic import preset_config, random_vit

    p = get_preset("vit-t8-demo")
    cfg = preset_config(p.name)
    path = tmp_path_factory.mktemp("w") / "demo.safetensors"
    save_weights(path, random_vit(cfg, seed=0).state_dict(),
                 model_json(cfg, norm=p.norm, pool=p.pool, preset=p.name, img_size=p.img_size))
    return path


# ------------------------------------------------------------------ defect 1: slides.npz
def test_slides_npz_covers_every_output_of_the_run_folder(tmp_path):
    a, b = tile_folder(tmp_path / "a", "sA"), tile_folder(tmp_path / "b", "sB", seed=1)
    run = tmp_path / "r"
    atlas("embed", a, *ENC, "-o", run)
    atlas("embed", a, b, *ENC, "-o", run)  # a is skipped, b is added
    assert slides_in(run) == ["sA", "sB"]
    r = atlas("embed", a, b, *ENC, "-o", run, "--json")  # all skipped: the table stays whole
    assert json.loads(r.stdout)["batch"]["skipped_existing"] == 2 and slides_in(run) == ["sA", "sB"]
    with np.load(run / "slides.npz") as z:  # mean of the slide's tile embeddings
        assert np.allclose(z["sB"], np.load(run / "outputs/b/embeddings.npy").mean(0), atol=1e-6)
    for i in range(2):  # two shards of one job array, one run folder
        atlas("embed", a, b, *ENC, "--shard", f"{i}/2", "-o", tmp_path / "s")
    assert slides_in(tmp_path / "s") == ["sA", "sB"]
    # the per-input tables are not a PathoROB folder: the error points at their union
    r = atlas("evaluate", run / "slides", "-o", tmp_path / "p", code=2)
    assert f"give their union {run / 'slides.npz'}" in r.stderr and "PathoROB" not in r.stderr


def test_a_slide_in_two_inputs_is_a_failure_not_an_overwrite(tmp_path):
    a, c = tile_folder(tmp_path / "a", "sA"), tile_folder(tmp_path / "c", "sA", seed=2)
    run = tmp_path / "r"
    atlas("embed", a, c, *ENC, "-o", run, code=1)
    assert "slide 'sA' is in two inputs" in failures(run)["c"]
    assert not (run / "outputs/c").exists() and slides_in(run) == ["sA"]


# ------------------------------------------------------------------ defect 2: per-input failures
def test_one_bad_input_is_one_failure_and_the_others_are_embedded(tmp_path):
    a = tile_folder(tmp_path / "a", "sA")
    (tmp_path / "slide.svs").write_bytes(b"not a slide" * 10)
    (tmp_path / "tiles.npz").write_bytes(b"junk" * 100)
    run = tmp_path / "r"
    r = atlas("embed", a, tmp_path / "slide.svs", tmp_path / "tiles.npz", *ENC, "-o", run, code=1)
    assert "2 of 3 items failed" in r.stderr
    assert set(failures(run)) == {"slide.svs", "tiles.npz"}
    assert "not an .npz archive" in failures(run)["tiles.npz"]
    assert (run / "outputs/a/embeddings.npy").is_file() and slides_in(run) == ["sA"]
    # a path that does not exist or a kind tub cannot read is a mistake in the command: exit 2, nothing run
    (tmp_path / "notes.txt").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "notes.txt"):
        atlas("embed", a, bad, *ENC, "-o", tmp_path / "x", code=2)
    assert not (tmp_path / "x/outputs/a").exists()


# ------------------------------------------------------------------ defect 3: pixel dtypes
def test_16_bit_tiles_scale_by_their_range_like_8_bit_ones(tmp_path):
    v8 = np.random.default_rng(0).integers(0, 256, (2, 16, 16), dtype=np.uint8)
    v16 = v8.astype(np.uint16) * 257  # the same grey levels, 16-bit
    (tmp_path / "g").mkdir()
    Image.fromarray(v16[0]).save(tmp_path / "g/s_0_0.png")
    assert Image.open(tmp_path / "g/s_0_0.png").mode == "I;16"
    rgb8 = np.repeat(v8[..., None], 3, axis=-1)
    assert np.array_equal(read_input(tmp_path / "g").read(0, 1)[0], rgb8[0])
    np.savez(tmp_path / "u16.npz", tiles=np.repeat(v16[..., None], 3, axis=-1))
    assert np.array_equal(read_input(tmp_path / "u16.npz").read(0, 2), rgb8)
    np.savez(tmp_path / "i64.npz", tiles=rgb8.astype(np.int64))  # plain integers 0..255 stay as they are
    assert np.array_equal(read_input(tmp_path / "i64.npz").read(0, 2), rgb8)


@pytest.mark.parametrize("values, needle", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                            (200.0, r"float tiles must be RGB in \[0, 1\]")])
def test_float_tiles_must_be_finite_and_in_0_1(tmp_path, values, needle):
    arr = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    arr[1, 2, 3, 0] = values
    np.savez(tmp_path / "f.npz", tiles=arr)
    ts = read_input(tmp_path / "f.npz")
    with pytest.raises(TubError, match=needle) as exc:
        ts.read(0, 2)
    assert str(tmp_path / "f.npz") in str(exc.value)


def test_integer_tiles_outside_0_255_are_an_error(tmp_path):
    np.savez(tmp_path / "i.npz", tiles=np.full((1, 8, 8, 3), 300, np.int32))
    with pytest.raises(TubError, match=r"outside 0\.\.255"):
        read_input(tmp_path / "i.npz").read(0, 1)


# ------------------------------------------------------------------ defect 4: tile sizes
def test_tile_sizes_the_model_cannot_take_name_the_file(tmp_path):
    mixed = tile_folder(tmp_path / "mixed", "sM", n=1)
    tile_folder(tmp_path / "odd", "sM", n=1, size=(100, 40))
    (tmp_path / "odd/sM_0_0.png").rename(mixed / "sM_64_0.png")
    thin = tile_folder(tmp_path / "thin", "sT", n=1, size=(30, 100))
    run = tmp_path / "r"
    atlas("embed", mixed, thin, *ENC, "-o", run, code=1)
    err = failures(run)
    assert "sM_64_0.png is 100x40 px but" in err["mixed"] and "sM_0_0.png is 64x64" in err["mixed"]
    assert "sT_0_0.png: 30x100 px tiles become 64x213 px" in err["thin"] and "8-px patches" in err["thin"]


# ------------------------------------------------------------------ defect 5: output names
def test_output_names_depend_on_each_input_alone(tmp_path):
    one, two = tile_folder(tmp_path / "p/one", "s1"), tmp_path / "q/two.npz"
    two.parent.mkdir()
    np.savez(two, tiles=np.zeros((2, 64, 64, 3), np.uint8), slide_id=np.array(["s2", "s2"]))
    run = tmp_path / "r"
    atlas("embed", two, one, *ENC, "-o", run)
    r = atlas("embed", one, two, f"{one}/", *ENC, "-o", run, "--json")  # other order; one given twice
    batch = json.loads(r.stdout)["batch"]
    assert batch["items"] == 2 and batch["skipped_existing"] == 2
    assert sorted(p.name for p in (run / "outputs").iterdir()) == ["one", "two"]
    # a folder and a file with the same stem would write one output: an error before anything runs
    np.savez(tmp_path / "p/one.npz", tiles=np.zeros((1, 64, 64, 3), np.uint8))
    r = atlas("embed", tmp_path / "p/one.npz", one, *ENC, "-o", tmp_path / "c", code=2)
    assert "would both write outputs named 'one'" in r.stderr and "one.npz" in r.stderr
    assert not (tmp_path / "c/outputs/one").exists()


# ------------------------------------------------------------------ defect 6: array files, heads
def test_bad_array_files_are_one_line_errors(tmp_path):
    tiles = np.zeros((3, 8, 8, 3), np.uint8)
    (tmp_path / "junk.npz").write_bytes(b"junk" * 100)
    np.savez(tmp_path / "obj.npz", tiles=tiles, labels=np.array(["a", None, "b"], dtype=object))
    np.savez(tmp_path / "empty.npz", tiles=tiles[:0])
    np.savez(tmp_path / "labels.npz", tiles=tiles, labels=np.array(["a", "b"]))
    with h5py.File(tmp_path / "labels.h5", "w") as f:
        f["imgs"] = tiles
        f["label"] = np.array([b"a"])
    cases = {"junk.npz": "not an .npz archive", "obj.npz": "cannot load array 'labels'",
             "empty.npz": r"empty \(0 tiles\)", "labels.npz": "'labels' has 2 entries for 3 tiles",
             "labels.h5": "'label' has 1 entries for 3 tiles"}
    for name, needle in cases.items():
        with pytest.raises(TubError, match=needle):
            read_input(tmp_path / name)


def test_heads_that_do_not_divide_the_width_are_an_error(tmp_path, weights):
    r = atlas("inspect", weights, "--heads", "5", "-o", tmp_path / "i", code=2)
    assert "5 attention heads" in r.stderr and "width 192" in r.stderr
    tile_folder(tmp_path / "a", "sA")
    atlas("embed", tmp_path / "a", "--weights", weights, "--heads", "5", "-o", tmp_path / "e", code=2)


# ------------------------------------------------------------------ defect 7: small input checks
def test_convert_keeps_an_existing_output_unless_overwrite(tmp_path, weights):
    out = tmp_path / "conv.safetensors"
    args = ["convert", weights, out, "--preset", "vit-t8-demo"]
    atlas(*args, "-o", tmp_path / "c1")
    before = out.read_bytes()
    r = atlas(*args, "-o", tmp_path / "c2", code=2)
    assert "exists" in r.stderr and "--overwrite" in r.stderr and out.read_bytes() == before
    atlas(*args, "--overwrite", "-o", tmp_path / "c3")


def test_directory_weights_and_bad_img_size_are_errors(tmp_path, weights):
    folder = tmp_path / "weights"
    folder.mkdir()
    r = atlas("inspect", folder, "-o", tmp_path / "i", code=2)
    assert "is a directory" in r.stderr
    a = tile_folder(tmp_path / "a", "sA")
    r = atlas("embed", a, "--weights", folder, "-o", tmp_path / "e", code=2)
    assert "is a directory" in r.stderr
    for size in ("0", "60"):
        r = atlas("embed", a, "--weights", weights, "--img-size", size, "-o", tmp_path / f"s{size}", code=2)
        assert "--img-size" in r.stderr


def test_evaluate_warns_when_the_test_split_lacks_a_class(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b"] * 6)
    split = np.array(["train"] * 6 + ["val", "val", "test", "val", "test", "val"])  # test rows: two 'a'
    np.savez(tmp_path / "f.npz", features=rng.normal(size=(12, 4)).astype(np.float32), labels=labels,
             split=split, slide_id=np.arange(12).astype(str))
    r = atlas("evaluate", tmp_path / "f.npz", "--method", "knn", "--k", "1", "--json", "-o", tmp_path / "e")
    res = json.loads(r.stdout)
    assert res["support"]["test"] == {"a": 2, "b": 0} and res["support"]["train"] == {"a": 3, "b": 3}
    assert "class(es) b have no test rows" in r.stderr


def test_make_data_with_a_preset_of_no_fixed_shape_writes_nothing(tmp_path):
    """`--checkpoint atlas2` wrote the tiles, then failed with a ValueError (exit 1), and its half-made
    folder blocked the rerun."""
    from tubcli.testing import expect_one_line_error

    line = expect_one_line_error(invoke(["atlas", "make-data", tmp_path / "d", "--checkpoint", "atlas2",
                                         "-o", tmp_path / "run"]))
    assert "does not fix its shapes" in line and "vit-t8-demo" in line
    assert not (tmp_path / "d").exists()


def test_a_broken_link_in_a_tile_folder_is_an_error_not_a_missing_tile(tmp_path):
    """A dangling symlink among the tiles was left out of the manifest silently (exit 0)."""
    folder = tmp_path / "tiles" / "tumor"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 100, 150)).save(folder / "a.png")
    (folder / "b.png").symlink_to(tmp_path / "gone.png")
    r = invoke(["atlas", "embed", tmp_path / "tiles", *ENC, "-o", tmp_path / "run"])
    assert r.exit_code == 1 and "b.png is a broken link (to " in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "run" / "outputs").rglob("manifest.csv"))  # the folder is a failed item


def test_a_precision_a_verb_does_not_compute_in_is_said(tmp_path):
    """`explain --precision bf16` gave maps bit-identical to fp32 and recorded bf16 without a word."""
    folder = tmp_path / "tiles" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 100, 150)).save(folder / "x.png")
    r = atlas("explain", tmp_path / "tiles", *ENC, "--max-tiles", "1", "--method", "lrp", "--precision", "bf16",
              "-o", tmp_path / "e")
    assert "does not compute in --precision bf16" in r.stderr
    r = atlas("explain", tmp_path / "tiles", *ENC, "--max-tiles", "1", "--method", "lrp", "-o", tmp_path / "e2")
    assert "does not compute in" not in r.stderr


def test_identical_make_data_runs_write_identical_weight_files(tmp_path):
    """Two metadata keys came out of safetensors in a random order: same seed, different bytes."""
    for name in ("a", "b"):
        atlas("make-data", tmp_path / name, "--n-per-class", "1", "--checkpoint", "vit-t8-demo", "--seed", "1",
              "-o", tmp_path / f"run_{name}")
    a, b = ((tmp_path / n / "vit-t8-demo-random.safetensors").read_bytes() for n in ("a", "b"))
    assert a == b


def test_dinov2_settings_with_the_distill_objective_are_refused(tmp_path):
    """`train --local-crops 2 --set dinov2.base_lr=0.5` (objective distill) ran and recorded them unused."""
    from tubcli.testing import expect_one_line_error

    folder = tmp_path / "tiles" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 100, 150)).save(folder / "x.png")
    line = expect_one_line_error(invoke(["atlas", "train", tmp_path / "tiles", "--teacher-arch", "vit-t8-demo",
                                         "--teacher-random-init", "--student-arch", "vit-t8-demo", "--steps", "1",
                                         "--local-crops", "2", "--set", "dinov2.base_lr=0.5", "-o", tmp_path / "t"]))
    assert "dinov2.local_crops, dinov2.base_lr act on --objective dinov2 only" in line


def test_options_of_the_probe_or_model_that_is_not_made_are_refused(tmp_path):
    """`evaluate --method knn --runs 3` and `make-data --depth 5` without --checkpoint ran and recorded them."""
    from tubcli.testing import expect_one_line_error

    np.savez(tmp_path / "f.npz", embeddings=np.zeros((4, 3), np.float32), labels=np.array(["a", "b"] * 2))
    line = expect_one_line_error(invoke(["atlas", "evaluate", tmp_path / "f.npz", "--method", "knn", "--runs", "3",
                                         "--max-steps", "10", "-o", tmp_path / "e"]))
    assert "--method knn does not use --runs, --max-steps" in line
    line = expect_one_line_error(invoke(["atlas", "evaluate", tmp_path / "f.npz", "--method", "linear", "--k", "3",
                                         "-o", tmp_path / "e2"]))
    assert "--method linear does not use --k" in line
    line = expect_one_line_error(invoke(["atlas", "make-data", tmp_path / "d", "--depth", "5", "-o", tmp_path / "m"]))
    assert "--depth sets the depth of the --checkpoint model" in line and not (tmp_path / "d").exists()


def test_a_class_folder_that_cannot_be_read_or_is_a_broken_link_is_an_error(tmp_path, monkeypatch):
    """An unreadable class folder (group permissions on a shared file system) or a link to one on a volume
    the node lacks was skipped without a word: the run reported success with a class missing."""
    import os

    from tubcli.images import image_files

    tree = tmp_path / "tiles"
    tile_folder(tree / "tum", "s1")
    tile_folder(tree / "norm", "s2")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("norm"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", scandir)
        with pytest.raises(TubError, match=r"norm: cannot read this folder \(Permission denied\)"):
            image_files(tree)
    for name in ("gone", "grade_2.5"):  # a class folder on a volume this node lacks, with a dot in its name too
        (tree / name).symlink_to(tmp_path / "scratch" / name)
        with pytest.raises(TubError, match=f"{name} is a broken link"):
            image_files(tree)
        (tree / name).unlink()


def test_an_image_at_the_top_of_class_folders_is_left_out_with_a_warning(tmp_path):
    """One overview.png beside the class folders made the whole tree flat: every label empty, the overview
    embedded as a tile. It is left out now, as torchvision's ImageFolder leaves it, with a warning; files of
    other kinds in the tree are named in an INFO line."""
    tree = tmp_path / "tiles"
    tile_folder(tree / "tum", "s1")
    tile_folder(tree / "norm", "s2")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(tree / "overview.png")
    (tree / "tum" / "notes.gif").write_bytes(b"GIF89a")
    r = atlas("embed", tree, *ENC, "-o", tmp_path / "run")
    assert "1 image(s) at the top of a tree of class folders are left out (overview.png)" in r.stderr
    assert "1 file(s) of other kinds left out (tum/notes.gif)" in r.stderr
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "run" / "outputs").rglob("manifest.csv")))))
    assert sorted(row["label"] for row in rows) == ["norm", "norm", "tum", "tum"]


def test_exif_orientation_of_png_is_warned_in_embed_and_stainnorm_and_tiff_is_rotated_by_pil(tmp_path):
    """Only JPEGs were checked: a PNG or WebP with orientation 6 was embedded as stored without a word, and
    stainnorm dropped the tag silently. PIL's TIFF loader rotates by the tag itself."""
    from tubcli.images import read_rgb

    pixels = np.zeros((20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = tmp_path / "tiles"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "s_0_0.png", exif=exif.tobytes())
    Image.fromarray(pixels).save(tmp_path / "t.tif", exif=exif.tobytes())
    assert read_rgb(tmp_path / "t.tif").shape == (40, 20, 3)
    rotated = []
    assert read_rgb(folder / "s_0_0.png", rotated).shape == (20, 40, 3) and rotated[0][1] == 6
    r = atlas("embed", folder, *ENC, "-o", tmp_path / "run")
    assert "s_0_0.png has EXIF orientation 6 (not 1)" in r.stderr
    r = invoke(["pathorob", "stainnorm", str(folder), "-o", str(tmp_path / "sn")])
    assert "s_0_0.png has EXIF orientation 6 (not 1)" in r.stderr, r.stderr


def test_tiles_far_from_the_encoders_input_size_are_warned(tmp_path):
    tile_folder(tmp_path / "thumbs", "s1", size=(8, 8))
    r = atlas("embed", tmp_path / "thumbs", *ENC, "-o", tmp_path / "run")
    assert "is 8x8 px, resized" in r.stderr
    tile_folder(tmp_path / "tiles", "s1", size=(64, 64))
    assert "resized" not in atlas("embed", tmp_path / "tiles", *ENC, "-o", tmp_path / "run2").stderr
