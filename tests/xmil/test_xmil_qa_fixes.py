"""Regressions from a QA sweep: the level-0 tile size of CLAM/TRIDENT/npz bags, reused TRIDENT
coords, reference checkpoints of other tasks and of numpy 2, numeric per-slide .pt folders, evaluate
--target, and the heatmap/train messages around them. Every test builds its own tiny model (no
training), so each runs in about a second."""

import json
import types
import zipfile

import numpy as np
import pytest
import torch

from tubcli.errors import TubError
from tubcli.testing import expect_error_line, invoke

from tub_xmil.bags import is_patch_folder, read_bag, write_features_h5
from tub_xmil.checkpoint import build_model, read_state_dict
from tub_xmil.heatmap import render_overlay

DIM = 8


def _ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def _model(head_dim=2, seed=0):
    torch.manual_seed(seed)
    return build_model("attnmil", DIM, head_dim, features_dim=8, inner_attention_dim=4).eval()


def _tub_model(folder, head_dim=2, seed=0, task="classification"):
    """A tub checkpoint folder (model.safetensors + model.json) of an untrained AttnMIL."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    m = _model(head_dim, seed)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({
        "arch": "attnmil", "task": task, "classes": [str(i) for i in range(head_dim)],
        "kwargs": {"input_dim": DIM, "head_dim": head_dim, "features_dim": 8, "inner_attention_dim": 4}}))
    return folder, m


def _xmil_checkpoint(path, head_dim, **extra):
    """A reference best_model.pt: model_state_dict with ``classifier.*`` head keys, no model.json."""
    m = _model(head_dim)
    sd = {("classifier." + k[len("linear_head."):] if k.startswith("linear_head.") else k): v
          for k, v in m.state_dict().items()}
    torch.save({"model_state_dict": sd, "epoch": 3, **extra}, path)
    return path, m


def _grid(n, step, cols=4):
    return np.array([[(i % cols) * step, (i // cols) * step] for i in range(n)], np.int64)


def _feats(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _clam_h5(path, coords, feats, coord_attrs=None):
    """CLAM h5_files layout: features + coords, attributes only where given (extract_features_fp writes none)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        d = f.create_dataset("coords", data=coords)
        d.attrs.update(coord_attrs or {})
    return path


def _geojson_sides(folder, stem, method="attention"):
    gj = json.loads((folder / "outputs" / f"{stem}_{method}.geojson").read_text())
    return {f["geometry"]["coordinates"][0][1][0] - f["geometry"]["coordinates"][0][0][0] for f in gj["features"]}


# ---------------------------------------------------------------- D1: CLAM patch_level > 0
def test_clam_coords_at_patch_level_1_give_level0_tiles(tmp_path):
    model, _ = _tub_model(tmp_path / "m")
    coords = _grid(8, 256)
    bag = _clam_h5(tmp_path / "s.h5", coords, _feats(8),
                   {"patch_size": 128, "patch_level": 1, "downsample": [2.0, 2.0], "name": "s"})
    assert read_bag(bag)[2]["patch_size_level0"] == 256  # the bag reader converts as the coords reader does
    _ok(invoke(["xmil", "heatmap", bag, "--model", model, "--method", "attention", "-o", tmp_path / "h"]))
    assert _geojson_sides(tmp_path / "h", "s") == {256}
    rec = json.loads((tmp_path / "h" / "outputs" / "s_attention_scores.json").read_text())
    assert rec["patch_size_level0"] == 256


# ---------------------------------------------------------------- D2: no tile-size attribute
def test_heatmap_infers_tile_size_from_the_coords_grid(tmp_path):
    model, _ = _tub_model(tmp_path / "m")
    coords = np.delete(_grid(12, 96), [1, 6], axis=0)  # a regular grid with gaps
    (tmp_path / "b").mkdir()
    _clam_h5(tmp_path / "b" / "s.h5", coords, _feats(10))
    np.savez(tmp_path / "b" / "z.npz", features=_feats(10, 1), coords=coords)
    _ok(invoke(["xmil", "heatmap", tmp_path / "b", "--model", model, "--method", "attention", "-o", tmp_path / "h"]))
    assert _geojson_sides(tmp_path / "h", "s") == {96} and _geojson_sides(tmp_path / "h", "z") == {96}
    assert "inferred from the coordinate grid" in (tmp_path / "h" / "tub.log").read_text()
    # a stated size wins over the inference
    _ok(invoke(["xmil", "heatmap", tmp_path / "b" / "s.h5", "--model", model, "--method", "attention",
                "--patch-size-level0", "64", "-o", tmp_path / "h2"]))
    assert _geojson_sides(tmp_path / "h2", "s") == {64}


def test_tile_size_that_cannot_be_inferred_is_a_one_line_error(tmp_path):
    from tub_xmil.tiling import size_from_grid

    assert size_from_grid(np.array([[0, 0], [96, 0], [200, 0]])) is None       # off the 96-px grid
    assert size_from_grid(np.array([[0, 0], [100, 0], [0, 200]])) is None      # x and y spacing disagree
    assert size_from_grid(np.array([[0, 0], [0, 96], [0, 288]])) == 96         # one column suffices
    model, _ = _tub_model(tmp_path / "m")
    _clam_h5(tmp_path / "one.h5", np.array([[512, 512]]), _feats(1))
    res = invoke(["xmil", "heatmap", tmp_path / "one.h5", "--model", model, "--method", "attention",
                  "-o", tmp_path / "h"])
    assert res.exit_code == 1
    err = json.loads((tmp_path / "h" / "failures.jsonl").read_text().splitlines()[0])["error"]
    assert "tile size unknown" in err and "--patch-size-level0" in err and "\n" not in err


# ---------------------------------------------------------------- D3: TRIDENT's own layout
def test_coords_dir_takes_trident_patches_names(tmp_path):
    import h5py

    from tub_xmil.pipeline import coords_file, slide_coords
    from tub_xmil.synthetic import render_slide, write_pyramid

    img, _, _ = render_slide(512, 512, positive=False)
    slide = write_pyramid(tmp_path / "s.tiff", img, mpp=0.5, levels=1)
    tri = tmp_path / "trident" / "20x_256px_0px_overlap"
    (tri / "patches").mkdir(parents=True)
    with h5py.File(tri / "patches" / "s_patches.h5", "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [256, 0]], np.int64))
        d.attrs.update({"patch_size": 256, "patch_size_level0": 256, "level0_magnification": 20,
                        "target_magnification": 20, "overlap": 0})
    assert coords_file(tri, "s") == tri / "patches" / "s_patches.h5"
    assert coords_file(tri / "patches", "s") == tri / "patches" / "s_patches.h5"
    sl, coords, size0, attrs = slide_coords(slide, types.SimpleNamespace(mpp=None), tri)
    sl.close()
    assert coords.tolist() == [[0, 0], [256, 0]] and size0 == 256 and attrs["level0_width"] == 512
    with pytest.raises(TubError, match="s_patches.h5"):
        coords_file(tmp_path, "s")


# ---------------------------------------------------------------- D4: reference checkpoints of other tasks
def test_single_output_reference_checkpoint_takes_its_task_from_task(tmp_path):
    ckpt, m = _xmil_checkpoint(tmp_path / "best_reg.pt", head_dim=1)
    write_features_h5(tmp_path / "s.h5", _feats(6), _grid(6, 64), {"patch_size_level0": 64})
    expect_error_line(invoke(["xmil", "explain", tmp_path / "s.h5", "--model", ckpt, "-o", tmp_path / "e0"]),
                      "--task regression")
    _ok(invoke(["xmil", "explain", tmp_path / "s.h5", "--model", ckpt, "--task", "regression",
                "--method", "gi", "-o", tmp_path / "e"]))
    rec = json.loads((tmp_path / "e" / "outputs" / "s.json").read_text())
    with torch.no_grad():
        raw = float(m(torch.from_numpy(_feats(6))[None])[0, 0])
    assert rec["task"] == "regression" and rec["prediction"] == pytest.approx(raw, abs=1e-6)  # not softmax's 1.0
    expect_error_line(invoke(["xmil", "explain", tmp_path / "s.h5", "--model", ckpt, "--task", "classification",
                              "-o", tmp_path / "e2"]), "at least 2 outputs")
    ckpt2, _ = _xmil_checkpoint(tmp_path / "best_cls.pt", head_dim=2)
    expect_error_line(invoke(["xmil", "explain", tmp_path / "s.h5", "--model", ckpt2, "--task", "regression",
                              "-o", tmp_path / "e3"]), "one output")


# ---------------------------------------------------------------- D5: numpy 2 pickles
def test_reference_checkpoint_with_numpy2_scalars_loads_weights_only(tmp_path):
    ckpt, m = _xmil_checkpoint(tmp_path / "best.pt", 2, val_loss=np.float64(0.5), val_auc=np.float32(0.9))
    with zipfile.ZipFile(ckpt) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        data = {i.filename: z.read(i.filename) for i in z.infolist()}
    assert b"numpy._core.multiarray" in data[pkl]  # numpy >= 2 naming, as the QA file
    assert torch.equal(read_state_dict(ckpt)["classifier.weight"], m.state_dict()["linear_head.weight"])
    with zipfile.ZipFile(tmp_path / "np1.pt", "w") as z:  # the same file as numpy < 2 wrote it
        for name, raw in data.items():
            z.writestr(name, raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if name == pkl else raw)
    assert "classifier.weight" in read_state_dict(tmp_path / "np1.pt")
    # anything else pickled is still refused, with a whole line naming it
    torch.save({"model_state_dict": {"w": torch.ones(1)}, "arr": np.arange(3)}, tmp_path / "arr.pt")
    with pytest.raises(TubError) as err:
        read_state_dict(tmp_path / "arr.pt")
    msg = str(err.value)
    assert "numpy._core.multiarray._reconstruct," in msg and msg.endswith("as safetensors")
    assert "\x1b" not in msg and "\n" not in msg


# ---------------------------------------------------------------- D6: numeric per-slide .pt folders
def test_numeric_pt_files_are_slides_and_per_patch_folders_one_bag(tmp_path):
    model, _ = _tub_model(tmp_path / "m")
    slides = tmp_path / "pt_files"
    slides.mkdir()
    for sid, n in (("1001", 5), ("1002", 7)):
        torch.save(torch.from_numpy(_feats(n, int(sid))), slides / f"{sid}.pt")
    patches = tmp_path / "per_patch"
    patches.mkdir()
    for i, v in enumerate(_feats(4)):
        torch.save(torch.from_numpy(v), patches / f"{i}.pt")
    rows = tmp_path / "per_patch_rows"  # (1, D) per patch, xMIL's 0..N-1 names
    rows.mkdir()
    for i, v in enumerate(_feats(3)):
        torch.save(torch.from_numpy(v)[None], rows / f"{i}.pt")
    assert not is_patch_folder(slides) and is_patch_folder(patches) and is_patch_folder(rows)
    with pytest.raises(TubError, match="one per slide"):
        read_bag(slides)
    _ok(invoke(["xmil", "explain", slides, patches, "--model", model, "--method", "attention", "-o", tmp_path / "e"]))
    recs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "e" / "outputs").glob("*.json")}
    assert {k: r["n_patches"] for k, r in recs.items()} == {"1001": 5, "1002": 7, "per_patch": 4}


# ---------------------------------------------------------------- D7: evaluate --target
def test_evaluate_explains_the_given_target(tmp_path):
    from tub_xmil.config import EvaluateConfig

    assert "label class" in EvaluateConfig.model_fields["target"].description
    model, _ = _tub_model(tmp_path / "m")
    (tmp_path / "b").mkdir()
    for i in range(4):
        write_features_h5(tmp_path / "b" / f"s{i}.h5", _feats(6, i), _grid(6, 64), {"patch_size_level0": 64})
    (tmp_path / "l.csv").write_text("slide_id,label,split\n" + "".join(f"s{i},{i % 2},test\n" for i in range(4)))
    base = ["xmil", "evaluate", "--model", model, "--features", tmp_path / "b", "--labels", tmp_path / "l.csv",
            "--method", "random", "--strategy", "50%-of-all"]
    flips = {}
    for t in ("0", "1"):
        _ok(invoke([*base, "--target", t, "-o", tmp_path / f"ev{t}"]))
        flips[t] = json.loads((tmp_path / f"ev{t}" / "outputs" / "flipping.json").read_text())
        assert {r["target"] for r in flips[t]} == {int(t)}
    # p(class 0) = 1 - p(class 1): a slide is a false prediction for exactly one of the two targets
    assert all(a["false_pred"] != b["false_pred"] for a, b in zip(flips["0"], flips["1"]))


# ---------------------------------------------------------------- minor: heatmap slide dir, train labels
def test_heatmap_slide_dir_missing_is_an_error_and_a_missing_slide_a_warning(tmp_path):
    model, _ = _tub_model(tmp_path / "m")
    bag = tmp_path / "s.h5"
    write_features_h5(bag, _feats(6), _grid(6, 64), {"patch_size_level0": 64})
    expect_error_line(invoke(["xmil", "heatmap", bag, "--model", model, "--slide-dir", tmp_path / "nope",
                              "-o", tmp_path / "h0"]), "--slide-dir", "not a folder")
    (tmp_path / "slides").mkdir()
    _ok(invoke(["xmil", "heatmap", bag, "--model", model, "--method", "attention", "--slide-dir",
                tmp_path / "slides", "-o", tmp_path / "h"]))
    assert "WARNING" in (tmp_path / "h" / "tub.log").read_text()
    rec = json.loads((tmp_path / "h" / "outputs" / "s_attention_scores.json").read_text())
    assert rec["background"].startswith("black: no s.")


def test_train_label_messages(tmp_path):
    (tmp_path / "b").mkdir()
    for i in range(4):
        write_features_h5(tmp_path / "b" / f"s{i}.h5", _feats(6, i), _grid(6, 64), {"patch_size_level0": 64})
    line = expect_error_line(invoke(["xmil", "train", "--features", tmp_path / "b", "-o", tmp_path / "r0"]),
                             "--labels")
    assert "None" not in line
    # class 'c' only in the test split: refused, not trained as an unlearnable output
    (tmp_path / "l.csv").write_text("slide_id,label,split\ns0,a,train\ns1,b,train\ns2,a,train\ns3,c,test\n")
    expect_error_line(invoke(["xmil", "train", "--features", tmp_path / "b", "--labels", tmp_path / "l.csv",
                              "--epochs", "1", "-o", tmp_path / "r1"]), "'c'", "no training slide", "s3")


# ---------------------------------------------------------------- minor: overlay blend (spec §2.7)
def test_overlay_blends_the_heat_canvas_with_alpha_64():
    thumb = np.full((4, 8, 3), 255, np.uint8)
    over, heat = render_overlay(thumb, np.array([[0, 0]]), np.array([1.0]), 4, 1, signed=False)
    a = 64 / 255
    assert np.array_equal(over[0, 0], np.rint((1 - a) * 255 + a * heat[0, 0].astype(float)).astype(np.uint8))
    assert (over[0, 7] == round((1 - a) * 255)).all()  # the black canvas dims unscored areas by alpha


def test_coords_dir_may_be_the_run_directory_of_tile(tmp_path):
    """`--coords-dir runs/tile` (tile's run directory) failed every slide; its patches lie in outputs/patches."""
    from tub_xmil.pipeline import coords_file

    (tmp_path / "outputs" / "patches").mkdir(parents=True)
    (tmp_path / "outputs" / "patches" / "s1.h5").write_bytes(b"")
    assert coords_file(tmp_path, "s1") == tmp_path / "outputs" / "patches" / "s1.h5"


def test_the_precision_of_the_features_is_part_of_their_provenance(tmp_path):
    """Bags embedded in bf16 and in fp32 trained together without a word, model.json recorded no precision, and
    explaining a bf16 bag with an fp32-trained model said nothing (bf16 features: 4.6e-3 relative L2 off fp32)."""
    rng = np.random.default_rng(0)
    coords = np.stack([np.arange(4) * 64, np.zeros(4)], 1).astype(np.int64)
    rows = ["slide_id,label"]
    for folder in ("mixed", "fp32"):
        (tmp_path / folder).mkdir()
    for i in range(8):
        x = rng.standard_normal((4, 8)).astype(np.float32)
        x[:, 0] += 2 * (i % 2)
        for folder in ("mixed", "fp32"):
            precision = "bf16" if folder == "mixed" and i < 3 else "fp32"
            write_features_h5(tmp_path / folder / f"s{i}.h5", x, coords, {"encoder": "vit-t8-demo", "precision": precision})
        rows.append(f"s{i},{'ab'[i % 2]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    train = ["xmil", "train", "--labels", tmp_path / "labels.csv", "--epochs", "1", "--set", "model.features_dim=8"]
    r = _ok(invoke([*train, "--features", tmp_path / "mixed", "-o", tmp_path / "m1"]))
    assert "the training bags differ in precision (bf16, fp32)" in r.stderr
    assert "precision" not in json.loads((tmp_path / "m1" / "checkpoints" / "model.json").read_text())["features"]
    r = _ok(invoke([*train, "--features", tmp_path / "fp32", "-o", tmp_path / "m2"]))
    assert "differ in" not in r.stderr
    assert json.loads((tmp_path / "m2" / "checkpoints" / "model.json").read_text())["features"]["precision"] == "fp32"
    r = _ok(invoke(["xmil", "explain", tmp_path / "mixed" / "s0.h5", "--model", tmp_path / "m2" / "checkpoints",
                    "-o", tmp_path / "e"]))
    assert "s0.h5: embedded in bf16, the model was trained on bags embedded in fp32" in r.stderr
    r = _ok(invoke(["xmil", "evaluate", "--model", tmp_path / "m2" / "checkpoints", "--features", tmp_path / "mixed",
                    "--labels", tmp_path / "labels.csv", "--set", "flipping=false", "--set", "split=null",
                    "--bootstrap", "0", "-o", tmp_path / "ev"]))
    assert "s0.h5: embedded in bf16, the model was trained on bags embedded in fp32" in r.stderr
