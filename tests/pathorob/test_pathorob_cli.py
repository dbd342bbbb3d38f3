"""Conformance and end-to-end CLI runs of every verb on tiny data."""

import json

import numpy as np
import pytest

from tubcli.testing import check_plugin, invoke


def test_conformance():
    check_plugin("pathorob")


def _ok(args):
    r = invoke(args)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pr")
    _ok(["pathorob", "make-data", "features", "--classes", "2", "--centers", "3", "--slides-per-cell", "3",
         "--tiles-per-slide", "20", "--dim", "16", "--paired", "-o", tmp / "md"])
    return tmp, tmp / "md" / "outputs"


def test_ri_evaluate_explain(made):
    tmp, out = made
    r = _ok(["pathorob", "ri", out / "features", "--metadata", out / "metadata.csv", "--k", "7", "--json",
             "-o", tmp / "ri"])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    from tub_pathorob.robustness_index import SUMMARY_KEYS

    assert tuple(summary) == SUMMARY_KEYS
    # a run directory is not features (its slides.npz-like files were read as centers): say where they are
    r = invoke(["pathorob", "ri", out.parent, "--metadata", out / "metadata.csv", "-o", tmp / "ri_run"])
    assert r.exit_code == 2 and f"give the features in it ({out})" in r.stderr
    assert json.loads((tmp / "ri" / "outputs" / "results_summary.json").read_text()) == summary
    # same numbers from the plain .npy layout
    r2 = _ok(["pathorob", "ri", out / "features.npy", "--metadata", out / "metadata.csv", "--k", "7", "--json",
              "--no-auc", "-o", tmp / "ri2"])
    assert json.loads(r2.stdout.strip().splitlines()[-1])["robustness_index"] == summary["robustness_index"]
    # paired subsets, bootstrap, official layout
    r3 = _ok(["pathorob", "ri", out / "features", "--metadata", out / "metadata_paired.csv", "--k", "7", "--paired",
              "--bootstrap", "20", "--no-auc", "--layout", "official", "--model-name", "m", "--json", "-o", tmp / "ri3"])
    s3 = json.loads(r3.stdout.strip().splitlines()[-1])
    assert "robustness_index-std" in s3
    assert (tmp / "ri3" / "outputs" / "robustness_index" / "m" / "custom" / "-1_7" / "results_summary.json").is_file()
    _ok(["pathorob", "evaluate", out / "features", "--metadata", out / "metadata.csv", "--k", "7", "--metrics", "ri",
         "--metrics", "cs", "--K", "2", "--trials", "2", "--no-auc", "-o", tmp / "ev"])
    res = json.loads((tmp / "ev" / "outputs" / "results.json").read_text())
    assert set(res) == {"robustness_index", "clustering_score"}
    assert (tmp / "ev" / "outputs" / "clustering_score" / "aris.csv").is_file()
    _ok(["pathorob", "explain", out / "features", "--metadata", out / "metadata.csv", "--k", "7",
         "--max-k-curve", "30", "-o", tmp / "ex"])
    for f in ("breakdown.json", "slides.csv", "composition.png", "projection.png", "ri_curve.png", "center_pairs.png"):
        assert (tmp / "ex" / "outputs" / f).stat().st_size > 0
    bd = json.loads((tmp / "ex" / "outputs" / "breakdown.json").read_text())
    assert set(bd["per_center"]) == {"center0", "center1", "center2"} and len(bd["center_pairs"]) == 3


def test_clustering_verb(made):
    tmp, out = made
    r = _ok(["pathorob", "clustering", out / "features.npy", "--metadata", out / "metadata.csv", "--K", "2",
             "--trials", "2", "--json", "-o", tmp / "cs"])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["num_combinations"] == 3 and s["num_trials"] == 2
    # an empty class/center cell leaves its experiments out of the mean: said, not silent; and --seed is not used
    import csv

    with open(out / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["biological_class"] for r in rows})
    for r in rows:
        if r["biological_class"] == classes[0] and r["medical_center"] == "center2":
            r["medical_center"] = "center0"
    with open(tmp / "gap.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = _ok(["pathorob", "clustering", out / "features.npy", "--metadata", tmp / "gap.csv", "--K", "2", "--trials", "2",
             "--seed", "7", "-o", tmp / "cs_gap"])
    assert "2 of 3 class/center experiments have an empty cell" in r.stderr and "--seed 7 changes nothing" in r.stderr


def test_train_and_robustify(made):
    tmp, out = made
    r = _ok(["pathorob", "train", out / "features", "--metadata", out / "metadata.csv", "--method", "combat",
             "--k", "7", "--json", "-o", tmp / "tr"])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["robustness_index_after"] > s["robustness_index_before"]
    model = tmp / "tr" / "checkpoints" / "robustification.safetensors"
    assert model.is_file() and model.with_suffix(".json").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    _ok(["pathorob", "robustify", out / "features", "--metadata", out / "metadata.csv", "--model", model,
         "-o", tmp / "rb"])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "features").iterdir()} == before  # input untouched
    assert sorted(p.name for p in (tmp / "rb" / "outputs" / "features").iterdir()) == sorted(before)
    r = _ok(["pathorob", "ri", tmp / "rb" / "outputs" / "features", "--metadata", out / "metadata.csv", "--k", "7",
             "--no-auc", "--json", "-o", tmp / "ri_rb"])
    assert json.loads(r.stdout.strip().splitlines()[-1])["robustness_index"] == pytest.approx(s["robustness_index_after"])


def test_apd_from_raw_verb(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for d, s in (("camelyon", 8), ("tcga", 7)):
        p = tmp_path / f"{d}_raw.json"
        p.write_text(json.dumps({"ID_test_accuracies": (0.8 + 0.1 * rng.random((s, 3))).tolist(),
                                 "OOD_test_accuracies": (0.7 + 0.1 * rng.random((s, 3))).tolist()}))
        files.append(p)
    r = _ok(["pathorob", "apd-from-raw", *files, "--json", "-o", tmp_path / "run"])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(s) == {"camelyon", "tcga", "aggregated"}
    assert (tmp_path / "run" / "outputs" / "aggregated_summary.json").is_file()


def test_apd_verb(tmp_path):
    _ok(["pathorob", "make-data", "features", "--preset", "tcga_4x4", "--dim", "4", "-o", tmp_path / "md"])
    out = tmp_path / "md" / "outputs"
    r = _ok(["pathorob", "apd", out / "features", "--metadata", out / "metadata.csv", "--dataset", "tcga",
             "--iterations", "1", "--json", "-o", tmp_path / "apd"])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(s) == {"apd_id", "apd_ood"}
    raw = json.loads((tmp_path / "apd" / "outputs" / "tcga_raw.json").read_text())
    assert np.asarray(raw["OOD_test_accuracies"]).shape == (7, 1)


def test_each_metric_reads_the_metadata_file_of_the_official_protocol(made, tmp_path):
    """Spec §2.1: the official CS uses the reduced files (`<class>-<center>` subsets), tolkach's RI too; one
    --metadata for every metric gave numbers labelled as the paper's. A file of another shape warns, and
    evaluate takes each metric's own file (--ri-metadata, --cs-metadata) over the same features."""
    import csv

    _, out = made
    with open(out / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    reduced = tmp_path / "reduced.csv"  # 10 tiles per class-center cell, as camelyon_reduced
    kept, per_cell = [], {}
    for r in rows:
        cell = f"{r['biological_class']}-{r['medical_center']}"
        if r["subset"] == "ID" and per_cell.get(cell, 0) < 10:
            per_cell[cell] = per_cell.get(cell, 0) + 1
            kept.append({**r, "subset": cell})
    with open(reduced, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    base = ["pathorob", "evaluate", out / "features", "--metadata", out / "metadata.csv", "--dataset", "camelyon",
            "--k", "5", "--K", "2", "--trials", "2", "--no-auc", "--json"]
    r = _ok([*base, "--metrics", "ri,cs", "-o", tmp_path / "one"])
    assert "official CS on camelyon uses camelyon_reduced" in r.stderr and "official RI" not in r.stderr
    r = _ok([*base, "--metrics", "ri,cs", "--cs-metadata", reduced, "-o", tmp_path / "own"])
    assert "official" not in r.stderr
    cs = json.loads(r.stdout)["clustering_score"]
    alone = _ok(["pathorob", "clustering", out / "features", "--metadata", reduced, "--K", "2", "--trials", "2",
                 "--json", "-o", tmp_path / "cs"])
    assert cs == json.loads(alone.stdout)  # the clustering score of the reduced file's 60 rows
    ri_only = [a for a in base if a not in ("--K", "--trials", "2")]  # the clustering's options would be idle
    assert json.loads(r.stdout)["robustness_index"] == json.loads(_ok([*ri_only, "--metrics", "ri", "-o",
                                                                        tmp_path / "ri"]).stdout)["robustness_index"]
    bad = invoke([*ri_only, "--metrics", "ri", "--cs-metadata", reduced, "-o", tmp_path / "idle"])
    assert bad.exit_code == 2 and "--cs-metadata is for --metrics cs" in bad.stderr
    # every option of a metric not asked for is refused, not recorded unused (--max-k is RI's k-search grid)
    bad = invoke([*base, "--metrics", "ri", "-o", tmp_path / "idle2"])
    assert bad.exit_code == 2 and "--K, --trials are for --metrics cs, which is not among ri" in bad.stderr
    bad = invoke([*base[:base.index("--k")], "--K", "2", "--metrics", "cs", "--max-k", "4", "-o", tmp_path / "idle3"])
    assert bad.exit_code == 2 and "--max-k is for --metrics ri" in bad.stderr and "--max-k-clusters" in bad.stderr
    # a clustering score that cannot run (K grid above the 40-row experiments) stops before RI writes anything
    no_K = base[:base.index("--K")] + base[base.index("--K") + 2:]
    bad = invoke([*no_K, "--metrics", "ri,cs", "--cs-metadata", reduced, "--max-k-clusters", "45",
                  "-o", tmp_path / "early"])
    assert bad.exit_code == 2 and "lower --max-k-clusters" in bad.stderr and not (tmp_path / "early").exists()


def test_tcga_4x4_is_evaluated_unpaired(tmp_path):
    """tcga_4x4 (ID/OOD subsets) is the unpaired TCGA file: paired mode (the tcga default for tcga_2x2)
    ran on its one subset, with the paired k grid; --paired on it has nothing to pair."""
    _ok(["pathorob", "make-data", "features", "--preset", "tcga_4x4", "--dim", "4", "-o", tmp_path / "md"])
    out = tmp_path / "md" / "outputs"
    base = ["pathorob", "ri", out / "features", "--metadata", out / "metadata.csv", "--dataset", "tcga", "--no-auc",
            "--json"]
    auto = json.loads(_ok([*base, "-o", tmp_path / "a"]).stdout)
    assert auto == json.loads(_ok([*base, "--no-paired", "-o", tmp_path / "u"]).stdout)
    bad = invoke([*base, "--paired", "-o", tmp_path / "p"])
    assert bad.exit_code == 2 and "nothing to pair" in bad.stderr


def test_stain_tiles(tmp_path):
    _ok(["pathorob", "make-data", "tiles", "--centers", "2", "--classes", "1", "--tiles-per-cell", "2",
         "--tile-size", "32", "-o", tmp_path / "t"])
    tiles = tmp_path / "t" / "outputs" / "tiles"
    target = sorted(tiles.iterdir())[0]
    for method in ("macenko", "reinhard"):
        _ok(["pathorob", "stainnorm", tiles, "--method", method, "--target", target, "-o", tmp_path / method])
        assert len(list((tmp_path / method / "outputs" / "tiles").glob("*.png"))) == 4  # outputs/<folder name>/


@pytest.mark.parametrize("case", ["missing_column", "single_center", "small_class", "unknown_slide", "semicolons"])
def test_bad_metadata_exit_2(made, tmp_path, case):
    _, out = made
    lines = (out / "metadata.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [ln.split(",") for ln in lines[1:]]
    ci = header.index("medical_center")
    k = "7"
    if case == "missing_column":
        header, rows = header[:-1], [r[:-1] for r in rows]
    elif case == "single_center":
        rows = [r for r in rows if r[ci] == "center0"]
    elif case == "small_class":
        k = "500"
    elif case == "unknown_slide":
        rows[0][header.index("slide_id")] = "nope"
    bad = tmp_path / "bad.csv"
    sep = ";" if case == "semicolons" else ","  # European Excel
    bad.write_text("\n".join(sep.join(r) for r in [header] + rows) + "\n")
    r = invoke(["pathorob", "ri", out / "features", "--metadata", bad, "--k", k, "-o", tmp_path / "run"])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.output
    assert case != "semicolons" or "is not comma-separated" in err[0]
    assert not (tmp_path / "run" / "outputs" / "results_summary.json").exists()


def test_demo_runs(tmp_path):
    from tubcli.runs import Run

    from tub_pathorob.config import RIConfig
    from tub_pathorob.demo import run_demo

    run = Run("pathorob", "demo", RIConfig(precision="bf16"), out=tmp_path / "demo")
    res = run_demo(run)
    assert res["RI after ComBat"] > res["RI before"] and res["RI after center-mean"] > res["RI before"]
    assert "--precision bf16 do not change that" in (tmp_path / "demo" / "tub.log").read_text()  # not silent


def test_make_data_tiles_metadata_is_pathorob_and_feeds_atlas_embed_and_ri(tmp_path):
    """tiles.csv has the PathoROB columns (slides nested in center x class, several tiles per slide), so
    `tub atlas embed --format pathorob --metadata tiles.csv` embeds the tiles and `ri` scores them."""
    import csv

    pytest.importorskip("tub_atlas")
    _ok(["pathorob", "make-data", "tiles", "--classes", "2", "--centers", "2", "--tiles-per-cell", "4",
         "--tile-size", "16", "-o", tmp_path / "pt"])
    out = tmp_path / "pt" / "outputs"
    with open(out / "tiles.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["subset", "slide_id", "patch_id", "biological_class", "medical_center", "path"]
    slides = {}
    for r in rows:
        assert (out / r["path"]).is_file() and r["subset"] == "ID"
        slides.setdefault(r["slide_id"], set()).add((r["biological_class"], r["medical_center"]))
    assert len(slides) == 8 and all(len(cells) == 1 for cells in slides.values())  # a slide lies in one cell
    assert len({(r["slide_id"], r["patch_id"]) for r in rows}) == len(rows) == 16
    _ok(["atlas", "make-data", tmp_path / "a", "--n-per-class", "1", "--checkpoint", "vit-t8-demo",
         "-o", tmp_path / "a_run"])
    _ok(["atlas", "embed", "--format", "pathorob", "--metadata", out / "tiles.csv", "--image-root", out,
         "--weights", tmp_path / "a" / "vit-t8-demo-random.safetensors", "-o", tmp_path / "emb"])
    r = _ok(["pathorob", "ri", tmp_path / "emb" / "outputs", "--metadata", out / "tiles.csv", "--k", "3", "--no-auc",
             "--json", "-o", tmp_path / "ri"])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["k_opt"] == 3 and 0.0 <= s["robustness_index"] <= 1.0


def test_robustify_with_a_class_covariate_warns_that_it_reads_labels(made):
    """ComBat with `--covariates biological_class` adds each row's class effect back when applied, so
    robustify reads the labels of the tiles it transforms: said in the log, and the labels do matter."""
    tmp, out = made
    _ok(["pathorob", "train", out / "features.npy", "--metadata", out / "metadata.csv", "--method", "combat",
         "--covariates", "biological_class", "--k", "7", "-o", tmp / "trc"])
    r = _ok(["pathorob", "robustify", out / "features.npy", "--metadata", out / "metadata.csv", "--model", tmp / "trc",
             "-o", tmp / "rbc"])
    assert "biological_class" in r.stderr and "labels" in r.stderr
    flipped = (out / "metadata.csv").read_text().replace("class0", "tmp").replace("class1", "class0").replace("tmp", "class1")
    (tmp / "flipped.csv").write_text(flipped)
    _ok(["pathorob", "robustify", out / "features.npy", "--metadata", tmp / "flipped.csv", "--model", tmp / "trc",
         "-o", tmp / "rbf"])
    a, b = (np.load(tmp / d / "outputs" / "features" / "features.npy") for d in ("rbc", "rbf"))
    assert np.abs(a - b).max() > 1e-3  # through the per-center scaling of the class-adjusted residuals
    half = tmp / "half.npy"  # output in the input's layout: float16 stays float16 (it came out float64, 4x the size)
    np.save(half, np.load(out / "features.npy").astype(np.float16))
    _ok(["pathorob", "robustify", half, "--metadata", out / "metadata.csv", "--model", tmp / "trc", "-o", tmp / "r16"])
    y16 = np.load(tmp / "r16" / "outputs" / "features" / "features.npy")
    assert y16.dtype == np.float16 and np.abs(y16.astype(np.float32) - a).max() < 0.05 * np.abs(a).max()


def test_a_center_named_by_a_path_is_refused_never_read_or_overwritten(tmp_path):
    """A metadata cell holding a path (or '..') would read and, in robustify, overwrite a file outside the
    features folder; it is a one-line error, and the file is untouched."""
    import csv
    import shutil

    _ok(["pathorob", "make-data", "features", "--slides-per-cell", "3", "--tiles-per-slide", "10", "--dim", "8",
         "-o", tmp_path / "d"])
    (tmp_path / "in" / "features").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "d/outputs/features/center1.npz", tmp_path / "in/features")
    victim = tmp_path / "elsewhere" / "center0.npz"
    shutil.copy(tmp_path / "d/outputs/features/center0.npz", victim)
    before = victim.read_bytes()
    rows = list(csv.reader(open(tmp_path / "d/outputs/metadata.csv")))
    col = rows[0].index("medical_center")
    with open(tmp_path / "in" / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        for r in rows[1:]:
            w.writerow([str(victim.with_suffix("")) if i == col and v == "center0" else v for i, v in enumerate(r)])
    res = invoke(["pathorob", "train", tmp_path / "in" / "features", "--metadata", tmp_path / "in" / "meta.csv",
                  "-o", tmp_path / "t"])
    assert res.exit_code == 2 and "cannot name a {center}.npz file in the features folder" in res.stderr
    assert victim.read_bytes() == before
