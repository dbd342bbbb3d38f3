"""Guards found by an audit: inputs are never overwritten, output names never collide, documented option
syntax works, bad values are one-line errors (exit 2), and error messages name what the user gave."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tubcli.images import read_rgb as _read_rgb
from tub_pathorob.clustering_score import clustering_score
from tub_pathorob.config import EvaluateConfig, RIConfig
from tub_pathorob.robustify import ComBat, load_robustification
from tub_pathorob.robustness_index import k_candidates, robustness_index, shuffle_and_reduce
from tub_pathorob.stain import HE_REF, synthetic_tile
from tub_pathorob.synthetic import synthetic_features
from tubcli.errors import TubError
from tubcli.testing import expect_ok, invoke


def _one_error(result) -> str:
    """Exit 2 and exactly one ``error:`` line (log lines may precede it), no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """make-data output (official folder + features.npy + metadata.csv) and a train run on it."""
    tmp = tmp_path_factory.mktemp("guards")
    expect_ok(invoke(["pathorob", "make-data", "features", "--classes", "2", "--centers", "2", "--slides-per-cell",
                      "3", "--tiles-per-slide", "10", "--dim", "8", "-o", tmp / "md"]))
    out = tmp / "md" / "outputs"
    expect_ok(invoke(["pathorob", "train", out / "features", "--metadata", out / "metadata.csv", "--k", "5",
                      "-o", tmp / "tr"]))
    return tmp, out


# ----------------------------------------------------------------- 1: outputs never overwrite inputs
def _refused_as_input(message: str) -> bool:
    """The plugin's guard, or the core's (an input inside the run's outputs), which now comes first."""
    return "would overwrite" in message or "lies inside the run directory" in message


def test_robustify_refuses_to_write_into_the_input_folder(data, tmp_path):
    tmp, out = data
    copy = tmp_path / "copy"
    shutil.copytree(out.parent, copy)
    _strip_command(copy)  # the plugin's own guard, also for run directories whose env.json names no verb
    before = _snapshot(copy / "outputs")
    r = invoke(["pathorob", "robustify", copy / "outputs" / "features", "--metadata", copy / "outputs" / "metadata.csv",
                "--model", tmp / "tr", "-o", copy])
    assert _refused_as_input(_one_error(r))
    assert _snapshot(copy / "outputs") == before


def test_robustify_refuses_to_overwrite_a_plain_npy_and_its_metadata(data, tmp_path):
    tmp, out = data
    folder = tmp_path / "run" / "outputs" / "features"
    folder.mkdir(parents=True)
    shutil.copy(out / "features.npy", folder / "features.npy")
    shutil.copy(out / "metadata.csv", folder / "metadata.csv")
    before = _snapshot(folder)
    r = invoke(["pathorob", "robustify", folder / "features.npy", "--metadata", folder / "metadata.csv",
                "--model", tmp / "tr", "-o", tmp_path / "run"])
    assert _refused_as_input(_one_error(r))
    assert _snapshot(folder) == before
    # a separate run directory is fine, and the model may be given as the train run directory (defect 8)
    expect_ok(invoke(["pathorob", "robustify", folder / "features.npy", "--metadata", folder / "metadata.csv",
                      "--model", tmp / "tr", "-o", tmp_path / "other"]))
    assert (tmp_path / "other" / "outputs" / "features" / "features.npy").is_file()
    assert _snapshot(folder) == before


def test_robustify_refuses_to_overwrite_the_metadata_found_beside_the_features(data, tmp_path):
    tmp, out = data
    folder = tmp_path / "run" / "outputs" / "features"
    folder.mkdir(parents=True)
    shutil.copy(out / "features.npy", folder / "x.npy")
    shutil.copy(out / "metadata.csv", folder / "metadata.csv")  # used when --metadata is not given
    before = _snapshot(folder)
    r = invoke(["pathorob", "robustify", folder / "x.npy", "--model", tmp / "tr", "-o", tmp_path / "run"])
    assert _refused_as_input(_one_error(r))
    assert _snapshot(folder) == before


def test_stainnorm_refuses_to_write_over_its_input_tiles(tmp_path):
    tiles = tmp_path / "run" / "outputs" / "a"
    _write_tiles(tiles, ["x.png"])
    before = _snapshot(tiles)
    r = invoke(["pathorob", "stainnorm", tiles, "--overwrite", "-o", tmp_path / "run"])
    assert _refused_as_input(_one_error(r))
    assert _snapshot(tiles) == before


def test_metric_files_never_overwrite_an_input(data, tmp_path):
    """A metadata CSV that sits where `ri` writes balanced-accuracies-bio.csv is refused, not replaced."""
    _, out = data
    meta = tmp_path / "run" / "outputs" / "balanced-accuracies-bio.csv"
    meta.parent.mkdir(parents=True)
    shutil.copy(out / "metadata.csv", meta)
    before = meta.read_bytes()
    r = invoke(["pathorob", "ri", out / "features.npy", "--metadata", meta, "--k", "5", "--no-auc",
                "-o", tmp_path / "run"])
    assert _refused_as_input(_one_error(r))
    assert meta.read_bytes() == before


# ----------------------------------------------------------------- 2: stainnorm output names
def _write_tiles(folder, names):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(synthetic_tile(HE_REF, 16, seed=i)).save(folder / name)


def test_stainnorm_keeps_folder_and_extension_in_output_names(tmp_path):
    st = tmp_path / "st"
    _write_tiles(st / "a", ["x.png", "y.png", "y.jpg"])
    _write_tiles(st / "b", ["x.png"])
    r = expect_ok(invoke(["pathorob", "stainnorm", st / "a", st / "b", "--json", "-o", tmp_path / "pst"]))
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["written"] == 4 and res["batch"]["skipped_existing"] == 0
    outputs = sorted(str(p.relative_to(tmp_path / "pst" / "outputs")) for p in (tmp_path / "pst" / "outputs").rglob("*.png"))
    assert outputs == ["a/x.png", "a/y.jpg.png", "a/y.png", "b/x.png"]


def test_stainnorm_name_collision_is_an_upfront_error(tmp_path):
    st = tmp_path / "st"
    _write_tiles(st / "a", ["x.png"])
    _write_tiles(st / "b", ["x.png"])
    r = invoke(["pathorob", "stainnorm", st / "a" / "x.png", st / "b" / "x.png", "-o", tmp_path / "pst"])
    assert "would both be written to x.png" in _one_error(r)
    assert not list((tmp_path / "pst" / "outputs").rglob("*.png"))


def test_apd_from_raw_same_dataset_twice_is_an_error(tmp_path):
    raw = {"ID_test_accuracies": [[0.8, 0.9], [0.7, 0.8]], "OOD_test_accuracies": [[0.7, 0.8], [0.6, 0.7]]}
    for model in ("m1", "m2"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "camelyon_raw.json").write_text(json.dumps(raw))
    r = invoke(["pathorob", "apd-from-raw", tmp_path / "m1" / "camelyon_raw.json", tmp_path / "m2" / "camelyon_raw.json",
                "-o", tmp_path / "run"])
    assert "both dataset 'camelyon'" in _one_error(r)
    for bad, words in (({**raw, "ID_test_accuracies": [[0.8, 0.9], [0.7]]}, "not a table of numbers"),
                       ({**raw, "OOD_test_accuracies": [[0.7, 0.8, 0.9], [0.6, 0.7, 0.8]]}, "both are splits")):
        (tmp_path / "m1" / "camelyon_raw.json").write_text(json.dumps(bad))  # was a raw numpy ValueError, exit 1
        assert words in _one_error(invoke(["pathorob", "apd-from-raw", tmp_path / "m1" / "camelyon_raw.json",
                                           "-o", tmp_path / "bad"]))


# ----------------------------------------------------------------- 3: --metrics syntax
def test_metrics_accept_commas_and_repeats():
    assert EvaluateConfig(metrics=["ri,apd,cs"]).metrics == ["ri", "apd", "cs"]
    assert EvaluateConfig(metrics=["ri", "cs"]).metrics == ["ri", "cs"]
    assert EvaluateConfig(metrics="ri, cs").metrics == ["ri", "cs"]  # a YAML string
    for bad in (["ri,xx"], [","]):
        with pytest.raises(ValueError):
            EvaluateConfig(metrics=bad)


def test_evaluate_with_comma_separated_metrics(data, tmp_path):
    _, out = data
    expect_ok(invoke(["pathorob", "evaluate", out / "features.npy", "--metadata", out / "metadata.csv", "--k", "5",
                      "--metrics", "ri,cs", "--K", "2", "--trials", "2", "--no-auc", "-o", tmp_path / "ev"]))
    res = json.loads((tmp_path / "ev" / "outputs" / "results.json").read_text())
    assert set(res) == {"robustness_index", "clustering_score"}
    # each metric keeps its own results_summary.json (the clustering one used to overwrite the RI one)
    for metric in res:
        assert json.loads((tmp_path / "ev" / "outputs" / metric / "results_summary.json").read_text()) == res[metric]


def test_docs_show_the_metrics_syntax_that_works():
    from pathlib import Path

    import tub_pathorob
    from tub_pathorob.plugin import app

    readme = (Path(tub_pathorob.__file__).parents[1] / "README.md").read_text()
    assert "--metrics ri apd cs" not in readme and "--metrics ri,apd,cs" in readme
    assert "--metrics ri,apd,cs" in app.verb("evaluate").help


# ----------------------------------------------------------------- 4: zero rows named as the user numbers them
def test_zero_row_error_names_the_users_row():
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=10, seed=2)
    X[7] = 0
    msg = str(pytest.raises(TubError, robustness_index, X, meta, k=5).value)
    assert msg.startswith("feature row 7 ") and meta.slide_id[7] in msg and meta.patch_id[7] in msg
    msg = str(pytest.raises(TubError, clustering_score, X, meta, K=2, trials=1).value)
    assert msg.startswith("feature row 7 ")


# ----------------------------------------------------------------- 5 and 8: saved robustifications
@pytest.fixture
def saved(tmp_path):
    X, meta = synthetic_features(centers=("a", "b", "c"), slides_per_cell=2, tiles_per_slide=10, dim=4, seed=5)
    ComBat().fit(X, meta.medical_center).save(tmp_path / "checkpoints" / "robustification")
    return tmp_path, X, meta


def _tamper_json(js, change):
    cfg = json.loads(js.read_text())
    change(cfg)
    js.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change", [
    lambda c: c.pop("centers"),
    lambda c: c.update(centers="a"),
    lambda c: c.update(centers=["a", "b"]),  # the arrays have 3 rows
    lambda c: c.update(covariate_levels=[]),
    lambda c: c.update(tol="x"),
    lambda c: c.update(method="zz"),
    lambda c: c.clear(),
])
def test_tampered_json_is_a_one_line_error(saved, change):
    tmp, _, _ = saved
    _tamper_json(tmp / "checkpoints" / "robustification.json", change)
    e = pytest.raises(TubError, load_robustification, tmp / "checkpoints" / "robustification.safetensors").value
    assert len(str(e).splitlines()) == 1 and "robustification" in str(e)


@pytest.mark.parametrize("change", ["drop", "shape", "nan", "negative"])
def test_tampered_arrays_are_a_one_line_error(saved, change):
    from safetensors.numpy import load_file, save_file

    tmp, _, _ = saved
    st = tmp / "checkpoints" / "robustification.safetensors"
    arrays = load_file(str(st))
    if change == "drop":
        arrays.pop("gamma_star")
    elif change == "shape":
        arrays["gamma_star"] = arrays["gamma_star"][:, :2].copy()
    elif change == "nan":
        arrays["grand_mean"][0] = np.nan
    else:
        arrays["var_pooled"][0] = -1.0
    save_file(arrays, str(st))
    with pytest.raises(TubError, match="refit"):
        load_robustification(st)


def test_model_given_as_run_dir_checkpoints_or_file(saved):
    tmp, X, meta = saved
    ref = load_robustification(tmp / "checkpoints" / "robustification.safetensors").transform(X, meta.medical_center)
    for path in (tmp, tmp / "checkpoints", tmp / "checkpoints" / "robustification.json"):
        assert np.array_equal(load_robustification(path).transform(X, meta.medical_center), ref)
    with pytest.raises(TubError, match="no robustification found"):
        load_robustification(tmp / "nothing")


def test_unseen_center_is_named_plainly(saved):
    tmp, X, _ = saved
    model = load_robustification(tmp / "checkpoints" / "robustification.safetensors")
    e = pytest.raises(TubError, model.transform, X[:2], np.array(["newcenter", "a"])).value
    assert "center 'newcenter' was not seen" in str(e) and "np.str_" not in str(e)


# ----------------------------------------------------------------- 6 and 7: option values
@pytest.mark.parametrize("args", [
    ["ri", "--no-auc", "--k", "5", "--bootstrap", "-3"],
    ["ri", "--no-auc", "--k", "5", "--bootstrap", "1"],  # no spread: its std was 0.0, read as an exact RI
    ["evaluate", "--k", "5", "--metrics", "ri", "--bootstrap", "1"],
    ["ri", "--no-auc", "--k", "5", "--seed", "100000000000000000000000"],
    ["ri", "--no-auc", "--k", "5", "--seed", "-1"],
    ["ri", "--no-auc", "--k", "5", "--threads", "-2"],
    ["ri", "--no-auc", "--k-search", "--max-k", "-5"],
    ["ri", "--no-auc", "--k-search", "--max-k", "0"],
    ["ri", "--no-auc", "--k", "5", "--max-k", "5"],
    ["ri", "--no-auc", "--k", "5", "--k-search", "--max-k", "9"],
    ["ri", "--no-auc", "--k", "5", "--max-patches-per-combi", "0"],
    ["ri", "--no-auc", "--k", "5", "--max-patches-per-combi", "-7"],
    ["clustering", "--K", "5000"],
    ["clustering", "--K", "1"],
    ["clustering", "--trials", "0"],
    ["evaluate", "--k", "5", "--metrics", "ri", "--iterations", "0"],
    ["apd", "--dataset", "camelyon", "--iterations", "0"],
])
def test_bad_option_values_are_one_line_errors(data, tmp_path, args):
    _, out = data
    verb, *opts = args
    _one_error(invoke(["pathorob", verb, out / "features.npy", "--metadata", out / "metadata.csv", *opts,
                       "-o", tmp_path / "run"]))


@pytest.mark.parametrize("args", [["tiles", "--tile-size", "0"], ["features", "--classes", "0"],
                                  ["features", "--noise", "-1"]])
def test_bad_make_data_values_are_one_line_errors(tmp_path, args):
    _one_error(invoke(["pathorob", "make-data", *args, "-o", tmp_path / "run"]))


@pytest.mark.parametrize("args,named", [
    (["features", "--preset", "camelyon", "--classes", "3"], "--classes"),  # the preset's design was used silently
    (["features", "--tile-size", "32"], "--tile-size"),
    (["tiles", "--dim", "8", "--paired"], "--dim, --paired"),
    (["tiles", "--preset", "tcga_4x4"], "--preset"),
])
def test_make_data_options_that_do_not_apply_are_named(tmp_path, args, named):
    line = _one_error(invoke(["pathorob", "make-data", *args, "-o", tmp_path / "run"]))
    assert line.startswith("error: invalid config: ") and f"does not use {named}; drop it" in line
    assert not (tmp_path / "run" / "outputs").exists()


def test_make_data_reruns_from_its_saved_config(tmp_path):
    """The saved config.yaml lists every field (defaults included): it must not trip the check above."""
    expect_ok(invoke(["pathorob", "make-data", "features", "--preset", "camelyon_reduced", "-o", tmp_path / "a"]))
    expect_ok(invoke(["pathorob", "make-data", "-c", tmp_path / "a" / "config.yaml", "-o", tmp_path / "b"]))
    assert (tmp_path / "b" / "outputs" / "features.npy").read_bytes() == (tmp_path / "a" / "outputs" / "features.npy").read_bytes()


def test_k_search_grid_respects_max_k():
    assert list(k_candidates(5)) == [1, 3, 5]
    assert list(k_candidates(21)) == [1, 3, 5, 7, 9, 11, 21]
    for official in (600, 1000, 1200):  # the reference's range(11, max_k, 10)
        assert list(k_candidates(official)) == [1, 3, 5, 7, 9] + list(range(11, official, 10))
    with pytest.raises(TubError):
        k_candidates(0)
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=10, seed=6)
    r = robustness_index(X, meta, k_search=True, max_k=5, auc=False)
    assert list(r.k_grid) == [1, 3, 5] and r.summary["k_opt"] <= 5


def test_max_patches_per_combi_must_be_a_row_count():
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=10, seed=6)
    assert len(shuffle_and_reduce(meta)) == len(meta)  # no cap: every row kept
    for bad in (0, -1, -7):
        with pytest.raises(TubError, match="omit"):
            robustness_index(X, meta, k=5, max_patches_per_combi=bad, auc=False)
    with pytest.raises(ValueError, match="omit"):
        RIConfig(max_patches_per_combi=-1)


def test_fixed_K_above_the_rows_fails_before_any_clustering():
    X, meta = synthetic_features(slides_per_cell=2, tiles_per_slide=10, seed=6)
    with pytest.raises(TubError, match="fewer than --K 5000"):
        clustering_score(X, meta, K=5000, trials=1)


def test_seed_bounds():
    RIConfig(seed=2 ** 32 - 1)
    for bad in (2 ** 32, -1):
        with pytest.raises(ValueError):
            RIConfig(seed=bad)


def test_evaluate_checks_the_apd_protocol_before_computing_any_metric(data, tmp_path):
    _, out = data  # make-data's centers/classes are no APD protocol's
    r = invoke(["pathorob", "evaluate", out / "features", "--metadata", out / "metadata.csv", "--metrics", "ri,apd",
                "--k", "5", "--dataset", "camelyon", "-o", tmp_path / "ev"])
    assert "camelyon APD protocol" in _one_error(r)
    assert not (tmp_path / "ev").exists()  # nothing half-written: the run directory is gone again


# ----------------------------------------------------------------- QA sweep: stainnorm inputs, -o of another verb
def _outputs(run):
    return sorted(str(p.relative_to(run / "outputs")) for p in (run / "outputs").rglob("*")
                  if p.suffix.lower() == ".png")


def test_stainnorm_reads_image_folder_trees_and_mirrors_their_sub_folders(tmp_path):
    """An ImageFolder tree (as `tub atlas make-data` writes) is read recursively; one tile name in two class
    folders gives two outputs; an upper-case .PNG keeps its name."""
    tiles = tmp_path / "data" / "tiles"
    _write_tiles(tiles / "class0", ["x.png", "A.PNG"])
    _write_tiles(tiles / "class1", ["x.png"])
    _write_tiles(tiles / "class1" / "deep", ["y.jpg"])
    _write_tiles(tiles / "class1" / ".tmp-half", ["z.png"])  # an unfinished write is no tile
    r = expect_ok(invoke(["pathorob", "stainnorm", tiles, "--json", "-o", tmp_path / "run"]))
    assert json.loads(r.stdout.strip().splitlines()[-1])["written"] == 4
    assert _outputs(tmp_path / "run") == ["tiles/class0/A.PNG", "tiles/class0/x.png", "tiles/class1/deep/y.jpg.png",
                                          "tiles/class1/x.png"]
    expect_ok(invoke(["pathorob", "stainnorm", tiles / "class0" / "A.PNG", "-o", tmp_path / "file"]))
    assert _outputs(tmp_path / "file") == ["A.PNG"]


def test_stainnorm_of_a_folder_without_tiles_is_a_one_line_error(tmp_path):
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    assert "no tile images found" in _one_error(invoke(["pathorob", "stainnorm", tmp_path / "empty",
                                                        "-o", tmp_path / "run"]))


def test_stainnorm_scales_16_bit_greyscale_tiles_instead_of_saturating_them(tmp_path):
    from PIL import Image

    grey = synthetic_tile(HE_REF, 32, seed=3).mean(-1).astype(np.uint8)  # 8-bit greyscale tile, 40..240
    Image.fromarray(grey).save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # PIL mode I;16
    read8, read16 = _read_rgb(tmp_path / "g8.png"), _read_rgb(tmp_path / "g16.png")
    assert read16.min() < 200 and np.array_equal(read16, read8)  # was all white (PIL clips 16-bit to 255)
    for name in ("g8", "g16"):  # read alike, both refused alike: a greyscale tile has no stains to normalise
        r = invoke(["pathorob", "stainnorm", tmp_path / f"{name}.png", "-o", tmp_path / f"run_{name}"])
        assert r.exit_code == 1 and "tile is greyscale" in (tmp_path / f"run_{name}" / "failures.jsonl").read_text()


def test_stainnorm_16_bit_rgb_tiff_normalises_like_its_8_bit_tile(tmp_path):
    tifffile = pytest.importorskip("tifffile")

    tile = synthetic_tile(HE_REF, 32, seed=4)
    tifffile.imwrite(tmp_path / "t16.tif", tile.astype(np.uint16) * 257, photometric="rgb")
    assert np.array_equal(_read_rgb(tmp_path / "t16.tif"), tile)


def test_stainnorm_32_bit_integer_tiles_out_of_range_are_reported_not_clipped(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((16, 16), 70000, np.int32), "I").save(tmp_path / "t.tif")
    r = invoke(["pathorob", "stainnorm", tmp_path / "t.tif", "-o", tmp_path / "run"])
    assert r.exit_code == 1 and not _outputs(tmp_path / "run")  # a batch verb: the bad item is listed
    failure = json.loads((tmp_path / "run" / "failures.jsonl").read_text().splitlines()[0])
    assert "outside 0..255" in json.dumps(failure) and "t.tif" in json.dumps(failure)


def _strip_command(run_dir):
    """A run directory as tub wrote it before env.json recorded the verb (what QA's folders hold)."""
    env = json.loads((run_dir / "env.json").read_text())
    env.pop("command", None)
    (run_dir / "env.json").write_text(json.dumps(env))


def test_robustify_refuses_the_run_directory_of_another_verb(data, tmp_path):
    """`robustify pdc/outputs/features.npy -o pdc` once wrote into make-data's outputs/features (beside its
    center npz files), replaced its metrics.json and moved its config.yaml aside, with exit 0."""
    tmp, out = data
    pdc = tmp_path / "pdc"
    shutil.copytree(out.parent, pdc)
    _strip_command(pdc)
    before = {k: v for k, v in _snapshot(pdc).items() if k.name != "tub.log"}
    r = invoke(["pathorob", "robustify", pdc / "outputs" / "features.npy", "--metadata",
                pdc / "outputs" / "metadata.csv", "--model", tmp / "tr", "-o", pdc])
    assert "another verb's run directory" in _one_error(r) or _refused_as_input(_one_error(r))
    assert {k: v for k, v in _snapshot(pdc).items() if k.name != "tub.log"} == before
    # without any record of the verb, outputs robustify does not write give it away
    (pdc / "config.yaml").unlink()
    r = invoke(["pathorob", "robustify", pdc / "outputs" / "features.npy", "--metadata",
                pdc / "outputs" / "metadata.csv", "--model", tmp / "tr", "-o", pdc])
    assert "already holds outputs/features/center0.npz" in _one_error(r) or _refused_as_input(_one_error(r))
    assert not (pdc / "outputs" / "features" / "features.npy").exists()
    assert (pdc / "metrics.json").read_bytes() == before[Path("metrics.json")]


def test_robustify_may_come_back_to_its_own_run_directory(data, tmp_path):
    tmp, out = data
    args = ["pathorob", "robustify", out / "features.npy", "--metadata", out / "metadata.csv", "--model", tmp / "tr",
            "-o", tmp_path / "rb"]
    expect_ok(invoke(args))
    _strip_command(tmp_path / "rb")
    expect_ok(invoke(args))
    assert sorted(_snapshot(tmp_path / "rb" / "outputs")) == [Path("features/features.npy"),
                                                               Path("features/metadata.csv")]
    # the official layout would mix its center files with the plain ones
    r = invoke(["pathorob", "robustify", out / "features", "--metadata", out / "metadata.csv", "--model", tmp / "tr",
                "-o", tmp_path / "rb"])
    assert "already holds outputs/features/features.npy" in _one_error(r)


def test_make_data_refuses_the_run_directory_of_another_verb(data, tmp_path):
    tmp, out = data
    run = tmp_path / "rb"
    expect_ok(invoke(["pathorob", "robustify", out / "features", "--metadata", out / "metadata.csv",
                      "--model", tmp / "tr", "-o", run]))
    _strip_command(run)
    before = {k: v for k, v in _snapshot(run).items() if k.name != "tub.log"}
    r = invoke(["pathorob", "make-data", "features", "--classes", "2", "--centers", "2", "--slides-per-cell", "2",
                "--tiles-per-slide", "3", "-o", run])
    assert "another verb's run directory" in _one_error(r)
    assert {k: v for k, v in _snapshot(run).items() if k.name != "tub.log"} == before


def test_paired_k_beyond_the_neighbours_left_is_refused_not_lowered(tmp_path):
    """--paired --k 60 with 55 neighbours left ran at k 55 (exit 0), and explain crashed on the same k."""
    from tubcli.testing import expect_one_line_error, invoke

    assert invoke(["pathorob", "make-data", "features", "--classes", "2", "--centers", "3", "--slides-per-cell", "3",
                   "--tiles-per-slide", "5", "--paired", "-o", tmp_path / "dp", "-q"]).exit_code == 0
    base = [tmp_path / "dp" / "outputs" / "features", "--metadata", tmp_path / "dp" / "outputs" / "metadata_paired.csv",
            "--paired", "--k"]
    for verb, extra in (("ri", ["60", "--no-auc"]), ("explain", ["58", "--no-plots"])):
        line = expect_one_line_error(invoke(["pathorob", verb, *base, *extra, "-q", "-o", tmp_path / verb]))
        # refused by the per-subset class size (30 tiles per class and subset) or the neighbours left (55)
        assert ("class0 has 30 samples, fewer than k" in line or "only 55 neighbours remain" in line) and "lower" in line


def test_train_whose_report_fails_leaves_no_robustification(data, tmp_path):
    """The RI report before/after used to run after the save: exit 2 with a usable model left behind."""
    _, out = data
    r = invoke(["pathorob", "train", out / "features", "--metadata", out / "metadata.csv", "--k", "500",
                "-o", tmp_path / "tr"])
    assert "k" in _one_error(r)
    assert not list((tmp_path / "tr").rglob("robustification.*"))


def test_paired_subset_with_a_class_smaller_than_k_is_named():
    """Paired RI runs one kNN per subset; a class with fewer than k tiles in one subset (while the pooled
    class is large enough) used to pass the pooled check and run."""
    from tub_pathorob.synthetic import paired_subsets

    X, meta = synthetic_features(classes=("a", "b"), centers=("m0", "m1", "m2"), slides_per_cell=3,
                                 tiles_per_slide=4, dim=8, seed=0)
    paired, index = paired_subsets(meta)
    sub = "a-b-m0-m1"
    small = np.flatnonzero((paired.subset == sub) & (paired.biological_class == "a"))[8:]  # keep 8 of 24
    keep = np.setdiff1d(np.arange(len(paired)), small)
    paired, index = paired.take(keep), index[keep]
    with pytest.raises(TubError, match=f"subset '{sub}'.*class a has 8 samples, fewer than k=9"):
        robustness_index(X[index], paired, k=9, paired=True, auc=False)
    assert robustness_index(X[index], paired, k=7, paired=True, auc=False).summary["k_opt"] == 7


def test_precision_and_device_that_do_not_apply_are_said(data, tmp_path):
    """`ri --precision bf16` ran in numpy's own precision and config.yaml recorded bf16 without a word."""
    _, out = data
    r = invoke(["pathorob", "ri", out / "features.npy", "--metadata", out / "metadata.csv", "--k", "5", "--no-auc",
                "--precision", "bf16", "-o", tmp_path / "r"])
    assert r.exit_code == 0 and "--precision bf16 do not change that" in r.stderr
    r = invoke(["pathorob", "ri", out / "features.npy", "--metadata", out / "metadata.csv", "--k", "5", "--no-auc",
                "-o", tmp_path / "r2"])
    assert "do not change that" not in r.stderr


def test_an_undefined_robustness_index_is_explained(tmp_path):
    """Features that keep every (class, center) cell apart leave no SO or OS neighbour: RI = 0/0 is null (as the
    reference's NaN) and the log says why, instead of a bare null."""
    expect_ok(invoke(["pathorob", "make-data", "--classes", "2", "--centers", "2", "--slides-per-cell", "3",
                      "--tiles-per-slide", "20", "--dim", "16", "--bio", "5", "--center", "5", "--slide", "0",
                      "--noise", "0.01", "-o", tmp_path / "d", "-q"]))
    out = tmp_path / "d" / "outputs"
    r = expect_ok(invoke(["pathorob", "ri", out / "features", "--metadata", out / "metadata.csv", "--k", "5",
                          "--no-auc", "-o", tmp_path / "ri", "--json"]))
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["robustness_index"] is None and res["bio_vs_confounding"] == 1.0
    assert "robustness index is undefined at k=5" in r.stderr and "SO + OS = 0" in r.stderr


def test_one_dimensional_features_are_a_one_line_error():
    """X[:, 0] passed to robustness_index raised numpy's AxisError from deep inside."""
    X, meta = synthetic_features(slides_per_cell=3, tiles_per_slide=10, seed=2)
    with pytest.raises(TubError, match=r"features must be a 2-D array \(rows, dims\), got shape \(\d+,\)"):
        robustness_index(X[:, 0], meta, k=5)


def test_covariates_from_set_split_as_from_the_flag():
    """`--set covariates=a,b` was the one column 'a,b' (the flag splits it) and `--set covariates=[a, b]` the
    column '[a, b]' (QA configrt)."""
    import yaml

    for given in (["--covariates", "biological_class,slide_id"], ["--set", "covariates=biological_class,slide_id"],
                  ["--set", "covariates=[biological_class, slide_id]"]):
        r = expect_ok(invoke(["pathorob", "train", *given, "--print-config"]))
        assert yaml.safe_load(r.stdout)["covariates"] == ["biological_class", "slide_id"], given
