"""End-to-end CLI tests of every atlas verb on tiny generated data, the conformance suite and the hook."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tubcli.testing import check_plugin, invoke


@pytest.fixture(scope="module")
def data(atlas_demo_tiles):
    return atlas_demo_tiles


def ok(args):
    r = invoke(["atlas", *map(str, args)])
    assert r.exit_code == 0, r.stderr + r.stdout
    return r


def fails(args, code=2):
    r = invoke(["atlas", *map(str, args)])
    assert r.exit_code == code, r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    return r


def test_conformance():
    check_plugin("atlas")


def test_eva_manifest_splits_slides_over_all_inputs(data, tmp_path):
    """One ImageFolder per slide (the CLAM/TRIDENT organisation): each input's own split is all train,
    the run's eva_manifest.csv splits the 16 slides 70/15/15 by class over all of them."""
    from tub_atlas.tiles import read_folder

    for row in read_folder(data / "tiles").rows:
        dest = tmp_path / "perslide" / row["slide_id"] / row["label"]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["origin"], dest)
    inputs = sorted((tmp_path / "perslide").iterdir())
    ok(["embed", *inputs, "--weights", data / "vit-t8-demo-random.safetensors", "--format", "eva",
        "-o", tmp_path / "eva"])
    per_input = {r["split"] for p in inputs for r in csv.DictReader(open(tmp_path / "eva/outputs" / p.name / "manifest.csv"))}
    assert per_input == {"train"}
    union = list(csv.DictReader(open(tmp_path / "eva/eva_manifest.csv")))
    split = {r["slide_id"]: r["split"] for r in union}
    assert len(split) == 16 and sorted(split.values()).count("test") >= 2
    assert {r["target"] for r in union if r["split"] == "test"} == {"0", "1"}  # both classes tested
    # evaluate on the run folder probes that split (each input alone was all train: "0 test rows")
    res = json.loads(ok(["evaluate", tmp_path / "eva", "--method", "knn", "--json", "-o", tmp_path / "ev"]).stdout)
    assert res["classes"] == ["class0", "class1"]
    assert res["n_test_slides"] == sorted(split.values()).count("test") and res["n_test"] > 0
    # an output of an older tub has no slide ids: its tiles would each count as a slide, so no manifest
    first = tmp_path / "eva/outputs" / inputs[0].name / "manifest.csv"
    rows = list(csv.DictReader(open(first)))
    with open(first, "w", newline="") as f:
        w = csv.DictWriter(f, ["origin", "embeddings", "target", "split"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    r = ok(["embed", *inputs, "--weights", data / "vit-t8-demo-random.safetensors", "--format", "eva",
            "-o", tmp_path / "eva", "--json"])
    assert json.loads(r.stdout)["eva_manifest"] is None and "older tub without slide ids" in r.stderr
    assert not (tmp_path / "eva/eva_manifest.csv").exists()  # the earlier one is not left to be taken for this


def test_weights_replaced_at_the_same_path_are_not_taken_for_the_embedded_ones(data, tmp_path):
    from safetensors.torch import load_file, save_file

    W = tmp_path / "w.safetensors"
    shutil.copy(data / "vit-t8-demo-random.safetensors", W)
    args = ["embed", data / "tiles.npz", "--weights", W, "-o", tmp_path / "e"]
    ok(args)
    assert len(json.loads((tmp_path / "e/encoder.json").read_text())["weights_sha256"]) == 64
    shutil.copy(W, tmp_path / "copy.safetensors")  # a copy (new mtime, same bytes) is the same weights
    shutil.copy(tmp_path / "copy.safetensors", W)
    assert json.loads(ok([*args, "--json"]).stdout)["batch"]["skipped_existing"] == 1
    sd = load_file(str(W))
    sd["cls_token"] = sd["cls_token"] + 1.0  # retrained in place
    save_file(sd, str(W))
    r = fails(args)
    assert "--weights" in r.stderr and "is not the file" in r.stderr and "its sha256 changed" in r.stderr
    assert json.loads(ok([*args, "--overwrite", "--json"]).stdout)["batch"]["processed"] == 1


def test_inspect_and_bad_checkpoints(data, tmp_path):
    W = data / "vit-t8-demo-random.safetensors"
    r = ok(["inspect", W, "--json", "-o", tmp_path / "i"])
    info = json.loads(r.stdout)
    assert (info["patch_size"], info["embed_dim"], info["depth"], info["reg_tokens"], info["mlp"]) == \
        (8, 192, 2, 4, "gelu")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(W))
    sd["fc_norm.weight"] = torch.ones(192)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    r = fails(["inspect", tmp_path / "bad.safetensors", "-o", tmp_path / "j"])
    assert "fc_norm.weight" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # torch.save(model): a pickle, not tensors
    r = fails(["inspect", tmp_path / "module.pt", "-o", tmp_path / "k"])
    assert "it pickles torch.nn.modules.linear.Linear, Python code rather than tensors" in r.stderr and "model.state_dict()" in r.stderr


def test_convert_dinov2_then_embed_identically(data, tmp_path):
    from safetensors.torch import load_file

    from tub_atlas.synthetic import to_dinov2

    W = data / "vit-t8-demo-random.safetensors"
    torch.save({"teacher": to_dinov2(load_file(str(W)))}, tmp_path / "dino.pth")
    before = (tmp_path / "dino.pth").read_bytes()
    ok(["convert", tmp_path / "dino.pth", tmp_path / "conv.safetensors", "--preset", "vit-t8-demo",
        "-o", tmp_path / "c"])
    assert (tmp_path / "dino.pth").read_bytes() == before  # input untouched
    meta = json.loads((tmp_path / "conv.json").read_text())
    assert meta["vit"]["reg_tokens"] == 4 and meta["preset"] == "vit-t8-demo"
    outs = []
    for w in (W, tmp_path / "conv.safetensors"):
        out = tmp_path / f"e_{w.stem}"
        ok(["embed", data / "tiles.npz", "--weights", w, "--arch", "vit-t8-demo", "-o", out])
        outs.append(np.load(out / "outputs" / "tiles" / "embeddings.npy"))
    assert np.abs(outs[0] - outs[1]).max() < 1e-5


def test_embed_formats_and_skip_existing(data, tmp_path, monkeypatch):
    W = data / "vit-t8-demo-random.safetensors"
    base = ["--arch", "vit-t8-demo", "--weights", W]
    ok(["embed", data / "tiles", *base, "-o", tmp_path / "npy"])
    ok(["embed", data / "tiles.npz", *base, "-o", tmp_path / "npz"])  # same slides: one input per run
    a = np.load(tmp_path / "npy/outputs/tiles/embeddings.npy")
    b = np.load(tmp_path / "npz/outputs/tiles/embeddings.npy")
    rows_a = list(csv.DictReader(open(tmp_path / "npy/outputs/tiles/manifest.csv")))
    rows_b = list(csv.DictReader(open(tmp_path / "npz/outputs/tiles/manifest.csv")))
    key = {(r["slide_id"], r["patch_id"]): i for i, r in enumerate(rows_b)}
    order = [key[(r["slide_id"], r["patch_id"])] for r in rows_a]
    assert a.shape == (32, 384) and np.abs(a - b[order]).max() < 1e-5  # PNG folder == NPZ array
    assert {r["label"] for r in rows_a} == {"class0", "class1"}  # ImageFolder labels
    slides = np.load(tmp_path / "npy/slides.npz")
    assert len(slides.files) == 16  # 2 classes x 2 centres x 4 slides
    # second run on the same folder skips existing outputs
    r = ok(["embed", data / "tiles", *base, "-o", tmp_path / "npy", "--json"])
    rerun = json.loads(r.stdout)
    assert rerun["batch"]["skipped_existing"] == 1
    assert rerun["tiles"] == 32  # the run's total, not this invocation's (which embedded none)
    # h5 (CLAM/TRIDENT) from an HDF5 tile array with coords
    with h5py.File(tmp_path / "slide1.h5", "w") as f:
        f["imgs"] = np.load(data / "tiles.npz")["tiles"][:5]
        f["coords"] = np.arange(10).reshape(5, 2) * 256
    ok(["embed", tmp_path / "slide1.h5", *base, "--format", "h5", "-o", tmp_path / "h5"])
    with h5py.File(tmp_path / "h5/outputs/slide1.h5") as f:
        assert f["features"].shape == (5, 384) and f["coords"][4].tolist() == [2048, 2304]
        # the encoder as tub-xmil reads it: the hook loader's name when it gives the same features
        assert (f.attrs["encoder"], f.attrs["encoder_pool"], f.attrs["encoder_tile_size"]) == \
            ("vit-t8-demo", "cls+mean", 64)
        assert len(f.attrs["encoder_weights_sha256"]) == 64
    ok(["embed", tmp_path / "slide1.h5", *base, "--pool", "mean", "--format", "h5", "-o", tmp_path / "h5m"])
    with h5py.File(tmp_path / "h5m/outputs/slide1.h5") as f:  # no loader pools by mean: a name none has
        assert (f.attrs["encoder"], f.attrs["encoder_pool"]) == ("tub atlas vit-t8-demo (pool mean)", "mean")
    done = tmp_path / "h5/outputs/slide1.h5"
    done.write_bytes(done.read_bytes()[:100])  # damaged after it was written
    r = invoke(["atlas", "embed", tmp_path / "slide1.h5", *base, "--format", "h5", "-o", tmp_path / "h5"])
    assert r.exit_code == 2 and f"{done} exists but cannot be read" in r.stderr and "delete it" in r.stderr
    # non-ASCII slide and class names (numpy's "S" strings are ASCII only: the item failed)
    (tmp_path / "uni" / "Tumör").mkdir(parents=True)
    for p in sorted((data / "tiles" / "class0").iterdir())[:2]:
        shutil.copy(p, tmp_path / "uni" / "Tumör" / f"Fall-ü_{p.name}")
    ok(["embed", tmp_path / "uni", *base, "--format", "h5", "-o", tmp_path / "h5u"])
    with h5py.File(tmp_path / "h5u/outputs/uni.h5") as f:
        assert {x.decode() for x in f["label"][()]} == {"Tumör"} and f["slide_id"][0].decode().startswith("Fall-ü")
    ok(["embed", tmp_path / "uni", *base, "--format", "h5", "-o", tmp_path / "h5u"])  # the rerun's check reads them
    # eva layout
    ok(["embed", data / "tiles.npz", *base, "--format", "eva", "-o", tmp_path / "eva"])
    man = list(csv.DictReader(open(tmp_path / "eva/outputs/tiles/manifest.csv")))
    assert set(man[0]) == {"origin", "embeddings", "target", "split", "slide_id"}
    assert torch.load(tmp_path / "eva/outputs/tiles" / man[0]["embeddings"]).shape == (384,)
    # the run's manifest for eva: integer targets (eva's loader takes int64), embeddings relative to the run
    union = list(csv.DictReader(open(tmp_path / "eva/eva_manifest.csv")))
    classes = json.loads((tmp_path / "eva/eva_classes.json").read_text())
    assert classes == ["class0", "class1"] and [classes[int(u["target"])] for u in union] == [m["target"] for m in man]
    assert torch.load(tmp_path / "eva" / union[0]["embeddings"]).shape == (384,)
    # evaluate reads every layout embed writes
    for feats in (tmp_path / "eva/outputs/tiles", tmp_path / "npz/outputs/tiles"):
        r = ok(["evaluate", feats, "--method", "knn", "--json", "-o", tmp_path / f"ev_{feats.parent.parent.name}"])
        assert json.loads(r.stdout)["dim"] == 384
    # the embed run directory itself stands for its embeddings (it was taken for a PathoROB folder)
    whole = json.loads(ok(["evaluate", tmp_path / "npy", "--method", "knn", "--json", "-o", tmp_path / "ev_run"]).stdout)
    part = json.loads(ok(["evaluate", tmp_path / "npy/outputs/tiles", "--method", "knn", "--json",
                          "-o", tmp_path / "ev_part"]).stdout)
    assert whole["knn"] == part["knn"] and whole["n_test"] == part["n_test"] > 0
    # --metadata labels an npy folder's rows by slide_id/patch_id (it was accepted and ignored)
    with open(tmp_path / "npy/outputs/tiles/manifest.csv", newline="") as f:
        man = list(csv.DictReader(f))
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "patch_id", "biological_class", "medical_center"])
        w.writerows([r["slide_id"], r["patch_id"], "tissue_" + r["label"], "c"] for r in man[::-1])
    relabelled = json.loads(ok(["evaluate", tmp_path / "npy", "--metadata", tmp_path / "meta.csv", "--method", "knn",
                                "--json", "-o", tmp_path / "ev_meta"]).stdout)
    assert relabelled["classes"] == ["tissue_class0", "tissue_class1"] and relabelled["knn"] == whole["knn"]
    # the probes run on the CPU: a GPU asked for is said to be unused (torch here only claims to have one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    r = ok(["evaluate", feats, "--method", "knn", "--device", "cuda:1", "-o", tmp_path / "ev_cuda"])
    assert "computes on the CPU: --device cuda:1" in r.stderr


def test_embed_pathorob_layout_is_read_by_metadata_order(data, tmp_path):
    W = data / "vit-t8-demo-random.safetensors"
    meta = data / "pathorob" / "metadata.csv"
    ok(["embed", "--format", "pathorob", "--metadata", meta, "--arch", "vit-t8-demo", "--weights", W,
        "--pool", "cls", "-o", tmp_path / "pr"])
    rows = list(csv.DictReader(open(meta)))
    for center in {r["medical_center"] for r in rows}:
        z = np.load(tmp_path / "pr/outputs" / f"{center}.npz")
        keys = {f"{r['slide_id']}-{r['patch_id']}" for r in rows if r["medical_center"] == center}
        assert set(z.files) == keys and z[next(iter(keys))].shape == (192,)
    # and evaluate reads it back through the metadata
    r = ok(["evaluate", tmp_path / "pr/outputs", "--metadata", meta, "--method", "knn", "--json",
            "-o", tmp_path / "ev"])
    assert json.loads(r.stdout)["n_train"] + json.loads(r.stdout)["n_test"] <= 32


def test_pathorob_ri_reads_the_embed_output(data, tmp_path):
    pytest.importorskip("tub_pathorob")
    from tubcli.plugins import get_plugins

    if "pathorob" not in get_plugins().records:
        pytest.skip("tub-pathorob not installed")
    W = data / "vit-t8-demo-random.safetensors"
    meta = data / "pathorob" / "metadata.csv"
    ok(["embed", "--format", "pathorob", "--metadata", meta, "--arch", "vit-t8-demo", "--weights", W,
        "-o", tmp_path / "pr"])
    r = invoke(["pathorob", "ri", tmp_path / "pr/outputs", "--metadata", meta, "--k", "3",
                "-o", tmp_path / "ri", "--json"])
    assert r.exit_code == 0, r.stderr + r.stdout
    assert 0 <= json.loads(r.stdout)["robustness_index"] <= 1


def test_evaluate_probes_and_explain_probe_class(data, tmp_path):
    W = data / "vit-t8-demo-random.safetensors"
    ok(["embed", data / "tiles.npz", "--arch", "vit-t8-demo", "--weights", W, "-o", tmp_path / "e"])
    r = ok(["evaluate", tmp_path / "e/outputs/tiles", "--runs", "2", "--max-steps", "200", "--json",
            "-o", tmp_path / "ev"])
    m = json.loads(r.stdout)
    assert len(m["linear"]["runs"]) == 2 and 0 <= m["knn"]["balanced_accuracy"] <= 1
    probe = tmp_path / "ev/outputs/probe.safetensors"
    r = ok(["explain", data / "tiles.npz", "--arch", "vit-t8-demo", "--weights", W, "--method", "lrp",
            "--target", "probe", "--probe", probe, "--index", "1", "--max-tiles", "2", "--json",
            "-o", tmp_path / "x"])
    assert json.loads(r.stdout)["conservation_max_rel_error"] < 1e-3  # fp32
    maps = np.load(tmp_path / "x/outputs/tiles/maps.npy")
    assert maps.shape == (2, 8, 8) and len(list((tmp_path / "x/outputs/tiles").glob("*.png"))) == 2
    with open(tmp_path / "x/outputs/tiles/manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))  # row i of maps.npy, by tile
    with np.load(data / "tiles.npz") as z:
        first = [str(s) for s in z["slide_id"][:2]]
    assert [r["row"] for r in manifest] == ["0", "1"] and [r["slide_id"] for r in manifest] == first
    assert all((tmp_path / "x/outputs/tiles" / r["overlay"]).is_file() for r in manifest)
    assert all(os.path.isabs(r["origin"]) for r in manifest)  # as embed's manifests: joins from any folder
    for r, m in zip(manifest, maps):  # each overlay's own colour scale (signed LRP: ±max|R|), so tiles compare
        assert float(r["colour_max"]) == pytest.approx(np.abs(m).max(), rel=1e-6) == -float(r["colour_min"])
    r = ok(["explain", data / "tiles.npz", "--arch", "vit-t8-demo", "--weights", W, "--method", "rollout",
            "--max-tiles", "1", "-o", tmp_path / "y"])
    assert "explaining its first 1 of" in r.stderr  # the cap is said, not silent
    roll = np.load(tmp_path / "y/outputs/tiles/maps.npy")
    assert roll.shape == (1, 8, 8) and (roll > 0).all()
    ref = next((data / "tiles" / "class0").glob("*.png"))
    ok(["explain", ref, "--arch", "vit-t8-demo", "--weights", W, "--target", "similarity", "--reference", ref,
        "-o", tmp_path / "z"])


@pytest.mark.parametrize("method, extra, named", [
    ("rollout", ["--target", "probe"], "--target"),
    ("rollout", ["--index", "3"], "--index"),
    ("lrp", ["--head-fusion", "max"], "--head-fusion"),
    ("lrp", ["--reference", "REF"], "--reference"),  # target dim reads --index only
    ("attnlrp", ["--target", "similarity", "--reference", "REF", "--index", "2"], "--index"),
])
def test_explain_refuses_settings_its_method_and_target_never_read(data, tmp_path, method, extra, named):
    ref = next((data / "tiles" / "class0").glob("*.png"))
    extra = [str(ref) if a == "REF" else a for a in extra]
    r = fails(["explain", ref, "--arch", "vit-t8-demo", "--random-init", "--method", method, *extra,
               "-o", tmp_path / "x"])
    assert named in r.output and f"--method {method}" in r.output and not (tmp_path / "x").exists()


def test_train_distils_saves_loadable_student_and_resumes(data, tmp_path):
    W = data / "vit-t8-demo-random.safetensors"
    args = ["train", data / "tiles", "--teacher-arch", "vit-t8-demo", "--teacher-weights", W,
            "--student-arch", "vit-t8-demo", "--student-depth", "1", "--batch-size", "8", "--crop-size", "64",
            "--set", "checkpoint_every=3", "--json"]
    r = ok([*args, "--steps", "6", "-o", tmp_path / "t"])
    m = json.loads(r.stdout)
    assert m["steps"] == 6 and "student_knn_balanced_accuracy" in m and Path(m["training_curves"]).is_file()
    student = tmp_path / "t/checkpoints/model.safetensors"
    assert json.loads((tmp_path / "t/checkpoints/model.json").read_text())["vit"]["depth"] == 1
    ok(["embed", data / "tiles.npz", "--weights", student, "-o", tmp_path / "se"])  # arch from model.json
    assert np.load(tmp_path / "se/outputs/tiles/embeddings.npy").shape == (32, 384)
    r = ok([*args, "--steps", "9", "-o", tmp_path / "t", "--resume", "auto"])
    assert json.loads(r.stdout)["steps"] == 9
    lines = (tmp_path / "t/metrics.jsonl").read_text().strip().splitlines()
    assert json.loads(lines[-1])["step"] == 9


def test_bench_and_random_init_policy(data, tmp_path):
    r = ok(["bench", "--arch", "vit-t8-demo", "--img-size", "64", "--repeats", "2", "--batch-size", "2",
            "--modes", "tokens,cls", "--reference", "--json", "-o", tmp_path / "b"])
    res = json.loads(r.stdout)
    assert res["tub_tiles_per_s"] > 0 and res["cls_tub_tiles_per_s"] > 0
    assert res["max_abs_diff_aten_reference"] == 0.0  # inference path with aten GEMMs: bit-identical
    assert res["max_abs_diff_reference"] < 1e-5  # default GEMMs (oneDNN on CPU): fp32 rounding only
    assert res["ratio_tub_over_reference_min"] <= res["ratio_tub_over_reference"] <= res["ratio_tub_over_reference_max"]
    r = fails(["embed", data / "tiles.npz", "--arch", "uni2-h", "-o", tmp_path / "n"])
    assert "--weights" in r.stderr
    ok(["embed", data / "tiles.npz", "--arch", "vit-t8-demo", "--random-init", "-o", tmp_path / "ri"])
    assert json.loads((tmp_path / "ri/encoder.json").read_text())["random_init"] is True


def test_bench_weight_precision_and_bad_options(tmp_path):
    r = ok(["bench", "--arch", "vit-t8-demo", "--img-size", "64", "--repeats", "1", "--batch-size", "1",
            "--precision", "bf16-weights", "--json", "-o", tmp_path / "b"])  # the README's documented mode
    res = json.loads(r.stdout)
    assert res["precision"] == "bf16-weights" and res["tub_tiles_per_s"] > 0
    assert "fp16-weights" in " ".join(ok(["bench", "--help"]).stdout.split())  # --help lists bench's own modes
    base = ["bench", "--arch", "vit-t8-demo", "--img-size", "64", "--repeats", "1"]
    assert "'bogus'" in fails([*base, "--modes", "tokens,bogus", "-o", tmp_path / "m"]).stderr
    assert "vit-t8-demo" in fails(["bench", "--arch", "nosuch", "-o", tmp_path / "a"]).stderr
    assert "patch size 8" in fails([*base[:3], "--img-size", "60", "-o", tmp_path / "i"]).stderr
    assert "shapes" in fails(["bench", "--arch", "atlas2", "-o", tmp_path / "s"]).stderr
    # under autocast the fast (oneDNN) inference path is off: reported as aten, and --gemm onednn refused
    r = ok([*base, "--batch-size", "1", "--precision", "bf16", "--json", "-o", tmp_path / "ac"])
    assert json.loads(r.stdout)["gemm_used"] == "aten"
    err = fails([*base, "--precision", "fp16", "--gemm", "onednn", "-o", tmp_path / "g"]).stderr
    assert "--gemm onednn does not run under autocast" in err and "ValueError" not in err
    from tub_atlas.inference import onednn_bf16

    assert ("bf16-weights" in err) == onednn_bf16()  # suggested only where oneDNN has bf16 kernels
    err = fails([*base, "--precision", "fp16-weights", "--gemm", "onednn", "-o", tmp_path / "g2"]).stderr
    assert "use --gemm aten or auto" in err and "ValueError" not in err


def test_bad_inputs_are_one_line_errors(data, tmp_path):
    fails(["embed", tmp_path / "missing", "--arch", "vit-t8-demo", "--random-init", "-o", tmp_path / "a"])
    fails(["inspect", tmp_path / "missing.safetensors", "-o", tmp_path / "b"])
    fails(["embed", data / "tiles.npz", "--arch", "no-such-model", "--random-init", "-o", tmp_path / "c"])
    (tmp_path / "empty").mkdir()  # a problem of one input's contents: its line in failures.jsonl, exit 1
    fails(["embed", tmp_path / "empty", "--arch", "vit-t8-demo", "--random-init", "-o", tmp_path / "d"], code=1)
    assert "contains no PNG/JPEG/TIFF tiles" in (tmp_path / "d/failures.jsonl").read_text()
    fails(["evaluate", data / "tiles.npz", "-o", tmp_path / "e"])  # tiles, not features
    fails(["convert", data / "vit-t8-demo-random.safetensors", data / "vit-t8-demo-random.safetensors",
           "-o", tmp_path / "f"])


def test_patch_encoder_hook_gives_dim_sized_embeddings(data):
    from tubcli.plugins import patch_encoders

    encs = patch_encoders()
    spec = encs["vit-t8-demo"]
    model = spec.load(None, "cpu", None)  # documented: random weights for this demo encoder only
    x = torch.rand(2, 3, spec.tile_size, spec.tile_size)
    with torch.no_grad():
        assert model(x).shape == (2, spec.dim)
    from tubcli.errors import TubError

    with pytest.raises(TubError, match="weights"):
        encs["uni2-h"].load(None, "cpu", None)
    m = spec.load(data / "vit-t8-demo-random.safetensors", "cpu", torch.float32)
    with torch.no_grad():
        assert m(x).shape == (2, 384)


def test_every_advertised_encoder_loads_through_the_hook(tmp_path):
    """Each name of the hook loads, via tubcli, random depth-1 weights of its preset and gives (B, dim)."""
    from safetensors.torch import save_file

    from tubcli.plugins import get_patch_encoder, patch_encoders
    from tub_atlas.synthetic import preset_config, random_vit

    names = sorted(n for n, spec in patch_encoders().items() if spec.loader.startswith("tub_atlas."))
    assert {"rudolfv-2", "rudolfv-2-b", "rudolfv-2-s", "uni2-h", "vit-t8-demo", "atlas"} <= set(names)
    for name in [n for n in names if n != "atlas"]:
        path = tmp_path / f"{name}.safetensors"
        save_file(random_vit(preset_config(name, depth=1), seed=0).state_dict(), path)  # no model.json
        spec = get_patch_encoder(name)
        model = spec.load(path, "cpu", None)
        with torch.no_grad():
            assert model(torch.rand(1, 3, spec.tile_size, spec.tile_size)).shape == (1, spec.dim), name
        path.unlink()


def test_the_atlas_encoder_takes_its_settings_from_the_checkpoint(tmp_path):
    """`--encoder atlas --weights W` (tub-xmil) is `tub atlas embed --weights W`: shapes, pooling, norm and
    tile size from W's model.json (a trained student, Atlas 2), so dim and tile size are known on loading."""
    from tubcli.errors import TubError
    from tubcli.plugins import get_patch_encoder
    from tub_atlas.checkpoint import model_json, save_weights
    from tub_atlas.encoder import load_encoder
    from tub_atlas.synthetic import preset_config, random_vit

    cfg = preset_config("vit-t8-demo")
    path = tmp_path / "student.safetensors"
    save_weights(path, random_vit(cfg, seed=1).state_dict(), model_json(cfg, norm="h-optimus", pool="mean",
                                                                        img_size=96))
    spec = get_patch_encoder("atlas")
    assert spec.dim is None and spec.tile_size is None
    module = spec.load(path, "cpu", None)
    got = spec.resolved(module)
    assert (got.dim, got.tile_size) == (192, 96)
    x = torch.rand(2, 3, 96, 96)
    enc, info = load_encoder("auto", path)
    with torch.no_grad():
        assert torch.equal(module(x), enc(x)) and info["pool"] == "mean"
    with pytest.raises(TubError, match="needs a local weights file"):
        spec.load(None, "cpu", None)
    for spelling in ("bf16", "bfloat16", torch.bfloat16):  # the CLI's spelling was a raw torch TypeError
        assert next(spec.load(path, "cpu", spelling).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="is not one of fp32, fp64, bf16, fp16"):
        spec.load(path, "cpu", "half-precision")
    enc, _ = load_encoder("auto", path, dtype="fp64")  # the documented builder takes them too
    assert next(enc.parameters()).dtype == torch.float64


def test_hook_table_matches_presets():
    from tub_atlas.plugin import ENCODERS, TILE_SIZE
    from tub_atlas.presets import PRESETS
    from tub_atlas.vit import pooled_dim

    for name, (dim, _, _) in ENCODERS.items():
        if dim is None:  # "atlas": from the weights' model.json
            continue
        p = PRESETS[name]
        assert dim == pooled_dim(p.embed_dim, p.pool)
        assert TILE_SIZE.get(name, 224) == p.img_size


def test_demo_runs(tmp_path):
    from tubcli.runs import Run
    from tub_atlas.config import TrainConfig
    from tub_atlas.demo import run_demo

    res = run_demo(Run("atlas", "demo", TrainConfig(device="cpu"), out=tmp_path / "demo"))
    assert res["reload_max_abs_diff"] == 0 and res["lrp_conservation_max_rel_error"] < 1e-3
    assert res["distill_loss_reduction"] > 0.3
    shutil.rmtree(tmp_path / "demo")


@pytest.mark.parametrize("pool", ["cls", "cls+mean"])
def test_embed_bf16_precision_is_close_to_fp32_and_really_reduced(data, tmp_path, pool):
    """`embed --precision bf16` (autocast; weights stay fp32) on CPU: within 3 % relative L2 of fp32 per
    tile, yet not identical (the GEMMs really ran in bf16)."""
    W = data / "vit-t8-demo-random.safetensors"
    common = ["embed", data / "tiles.npz", "--weights", W, "--pool", pool]
    ok([*common, "-o", tmp_path / "f32"])
    ok([*common, "--precision", "bf16", "-o", tmp_path / "b16"])
    a = np.load(tmp_path / "f32/outputs/tiles/embeddings.npy")
    b = np.load(tmp_path / "b16/outputs/tiles/embeddings.npy")
    assert a.shape == b.shape and b.dtype == np.float32
    rel = np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)
    assert 0 < rel.max() < 0.03


def test_embed_gemm_backends_agree_and_are_recorded(data, tmp_path):
    W = data / "vit-t8-demo-random.safetensors"
    ok(["embed", data / "tiles.npz", "--weights", W, "--gemm", "aten", "-o", tmp_path / "a"])
    ok(["embed", data / "tiles.npz", "--weights", W, "-o", tmp_path / "d"])
    a = np.load(tmp_path / "a/outputs/tiles/embeddings.npy")
    d = np.load(tmp_path / "d/outputs/tiles/embeddings.npy")
    assert np.abs(a - d).max() < 1e-5
    assert json.loads((tmp_path / "a/encoder.json").read_text())["gemm"] == "aten"
    fails(["embed", data / "tiles.npz", "--weights", W, "--gemm", "blas", "-o", tmp_path / "x"])
    # where the oneDNN inference path cannot run, --gemm onednn is refused before any input (it was silently not
    # used under bf16, failed on every input at fp64, and was ignored by explain's gradients), no run folder left
    for precision, words in (("bf16", "runs in fp32 only"), ("fp64", "runs in fp32 only")):
        err = fails(["embed", data / "tiles.npz", "--weights", W, "--gemm", "onednn", "--precision", precision,
                     "-o", tmp_path / precision]).stderr
        assert words in err and not (tmp_path / precision).exists()
    err = fails(["explain", data / "tiles.npz", "--weights", W, "--gemm", "onednn", "-o", tmp_path / "e"]).stderr
    assert "applies to inference only" in err and not (tmp_path / "e").exists()


def test_onednn_gemm_on_a_gpu_device_is_refused_up_front():
    """`--gemm onednn` is a CPU kernel: on a GPU device it is an error before any work (not ignored)."""
    from tub_atlas.cli import _check_gemm
    from tubcli.errors import TubError

    _check_gemm("onednn", torch.device("cpu"))
    _check_gemm("auto", torch.device("cuda", 1))
    with pytest.raises(TubError, match="onednn runs on the CPU only"):
        _check_gemm("onednn", torch.device("cuda", 1))


def test_a_student_from_scratch_starts_from_a_training_initialisation(data, tmp_path, monkeypatch):
    """Students started from the test initialisation (every tensor N(0, 0.02), LayerScale 0.1, biases non-zero);
    DINOv2 and timm start from truncated N(0, 0.02) weights, zero biases, LayerNorm (1, 0), LayerScale 1e-5."""
    from tub_atlas.synthetic import preset_config
    from tub_atlas.vit import VisionTransformer

    m = VisionTransformer(preset_config("vit-s8-reg8", depth=2)).init_for_training(torch.Generator().manual_seed(0))
    p = dict(m.named_parameters())
    assert all(torch.all(v == 1e-5) for k, v in p.items() if k.endswith("gamma"))
    assert all(torch.all(v == 0) for k, v in p.items() if k.endswith("bias"))
    assert torch.all(p["norm.weight"] == 1) and p["cls_token"].abs().max() < 1e-5
    w = p["blocks.0.mlp.fc1.weight"]
    assert w.abs().max() <= 0.04 and 0.015 < w.std() < 0.02  # N(0, 0.02) cut at ±2σ: std 0.0176
    started = []
    real = VisionTransformer.init_for_training
    monkeypatch.setattr(VisionTransformer, "init_for_training", lambda self, g=None: started.append(1) or real(self, g))
    ok(["train", data / "tiles", "--teacher-arch", "vit-t8-demo", "--teacher-weights", data / "vit-t8-demo-random.safetensors",
        "--student-arch", "vit-t8-demo", "--student-depth", "1", "--batch-size", "8", "--crop-size", "64",
        "--steps", "1", "-o", tmp_path / "t"])
    assert started == [1]
