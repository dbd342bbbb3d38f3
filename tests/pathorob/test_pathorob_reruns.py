"""Reruns and fit scope: OOD rows at train time (README chain), same-verb reruns leave no stale outputs,
stainnorm skips an existing output only if it was made from the same tile and target."""

import csv
import json
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from tub_pathorob.stain import HE_REF, synthetic_tile
from tubcli.testing import expect_ok, invoke

README = Path(__file__).resolve().parents[2] / "plugins" / "tub-pathorob" / "README.md"


def _error(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


def _make(run, centers=3, *extra):
    expect_ok(invoke(["pathorob", "make-data", "features", "--classes", "2", "--centers", str(centers),
                      "--slides-per-cell", "2", "--tiles-per-slide", "4", "--dim", "4", *extra, "-o", run]))
    return run / "outputs"


def _mark_ood(csv_path, center="center2"):
    rows = list(csv.DictReader(open(csv_path)))
    for r in rows:
        r["subset"] = "OOD" if r["medical_center"] == center else "ID"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _readme_chain(name: str) -> list[str]:
    """The README's ``tub pathorob {name} runs/data/...`` command line, as words after ``tub``."""
    for line in README.read_text().splitlines():
        if line.startswith(f"tub pathorob {name} runs/data/"):
            return shlex.split(line.split("#")[0])[1:]
    raise AssertionError(f"README has no `tub pathorob {name} runs/data/...` line")


# ----------------------------------------------------------------- D2: OOD rows and the README chain
def test_readme_train_robustify_chain_runs_with_ood_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _make(Path("runs/data"))
    _mark_ood(out / "metadata.csv")
    expect_ok(invoke(_readme_chain("train")))
    expect_ok(invoke(_readme_chain("robustify")))
    robust = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("robust"))
    assert sorted(p.name for p in (robust / "outputs" / "features").iterdir()) == \
        ["center0.npz", "center1.npz", "center2.npz"]


def test_protocol_fit_excludes_ood_and_the_error_names_include_ood(tmp_path):
    out = _make(tmp_path / "md")
    _mark_ood(out / "metadata.csv")
    feats, meta = out / "features", out / "metadata.csv"
    expect_ok(invoke(["pathorob", "train", feats, "--metadata", meta, "--k", "3", "-o", tmp_path / "tr"]))
    saved = json.loads((tmp_path / "tr" / "checkpoints" / "robustification.json").read_text())
    assert saved["centers"] == ["center0", "center1"] and saved["ood_centers_excluded"] == ["center2"]
    e = _error(invoke(["pathorob", "robustify", feats, "--metadata", meta, "--model", tmp_path / "tr",
                       "-o", tmp_path / "rb"]))
    assert "'center2' was not seen" in e and "excluded at fit time" in e and "--include-ood" in e


# ----------------------------------------------------------------- D3: same-verb reruns
def test_robustify_rerun_removes_the_earlier_runs_center_files(tmp_path):
    big, small = _make(tmp_path / "md3"), _make(tmp_path / "md2", 2)
    expect_ok(invoke(["pathorob", "train", big / "features", "--metadata", big / "metadata.csv", "--method",
                      "center-mean", "--k", "3", "-o", tmp_path / "tr"]))
    for out in (big, small):
        expect_ok(invoke(["pathorob", "robustify", out / "features", "--metadata", out / "metadata.csv",
                          "--model", tmp_path / "tr", "-o", tmp_path / "rb"]))
    assert sorted(p.name for p in (tmp_path / "rb" / "outputs" / "features").iterdir()) == \
        ["center0.npz", "center1.npz"]
    # the plain layout into the same folder is robustify's own output in another layout: named as such
    e = _error(invoke(["pathorob", "robustify", small / "features.npy", "--metadata", small / "metadata.csv",
                       "--model", tmp_path / "tr", "-o", tmp_path / "rb"]))
    assert "already holds outputs/features/center0.npz" in e and "robustify's output" in e
    assert "another layout" in e and "another run's data" not in e


def test_make_data_reruns_leave_no_stale_tiles_or_centers(tmp_path):
    run = tmp_path / "t"
    for centers in ("3", "2"):
        expect_ok(invoke(["pathorob", "make-data", "tiles", "--centers", centers, "--classes", "1",
                          "--tiles-per-cell", "2", "--tile-size", "8", "-o", run]))
    listed = list(csv.DictReader(open(run / "outputs" / "tiles.csv")))
    assert sorted(p.name for p in (run / "outputs" / "tiles").iterdir()) == sorted(Path(r["path"]).name
                                                                                    for r in listed)
    assert len(listed) == 4
    out = _make(tmp_path / "f", 3, "--paired")
    _make(tmp_path / "f", 2)
    assert sorted(p.name for p in (out / "features").iterdir()) == ["center0.npz", "center1.npz"]
    assert not (out / "metadata_paired.csv").exists()


# ----------------------------------------------------------------- D4: stainnorm records its inputs
def _tiles(folder: Path, cls: int, ext: str = ".png") -> Path:
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(synthetic_tile(HE_REF, 16, seed=10 * cls + i, cls=cls)).save(folder / f"t{i}{ext}")
    return folder


def test_stainnorm_skips_only_outputs_made_from_the_same_tile_and_target(tmp_path):
    a, b = _tiles(tmp_path / "A" / "tiles", 0), _tiles(tmp_path / "B" / "tiles", 1)
    target = tmp_path / "target.png"
    Image.fromarray(synthetic_tile(HE_REF, 16, seed=99, cls=0)).save(target)
    run = ["pathorob", "stainnorm", "--target", target, "-o", tmp_path / "snx"]
    expect_ok(invoke([*run[:2], a, *run[2:]]))
    made = (tmp_path / "snx" / "outputs" / "tiles" / "t0.png").read_bytes()
    expect_ok(invoke([*run[:2], a, *run[2:]]))  # same tiles and target: skipped
    e = _error(invoke([*run[:2], b, *run[2:]]))
    assert "outputs/tiles/t0.png was made from" in e and "--overwrite" in e
    Image.fromarray(synthetic_tile(HE_REF, 16, seed=98, cls=1)).save(target)  # same path, new image
    e = _error(invoke([*run[:2], a, *run[2:]]))
    assert "another method or --target" in e
    assert (tmp_path / "snx" / "outputs" / "tiles" / "t0.png").read_bytes() == made
    expect_ok(invoke([*run[:2], b, *run[2:], "--overwrite"]))
    assert (tmp_path / "snx" / "outputs" / "tiles" / "t0.png").read_bytes() != made
    expect_ok(invoke([*run[:2], b, *run[2:]]))


def test_stainnorm_reads_bmp_tiles_like_atlas(tmp_path):
    tiles = _tiles(tmp_path / "bmp", 0, ".bmp")
    expect_ok(invoke(["pathorob", "stainnorm", tiles, "-o", tmp_path / "sn"]))
    assert sorted(p.name for p in (tmp_path / "sn" / "outputs" / "bmp").iterdir()) == ["t0.bmp.png", "t1.bmp.png"]
    assert np.asarray(Image.open(tmp_path / "sn" / "outputs" / "bmp" / "t0.bmp.png")).shape == (16, 16, 3)


def test_stainnorm_records_a_tile_before_it_is_in_place(tmp_path, monkeypatch):
    """A job killed between a tile and its manifest record left a tile without a record, which every rerun
    refused (QA shards: 2 of 12 SIGTERMs on 400 tiles); the record now comes first, and a kill between the
    two leaves a record without a tile, which the rerun simply makes."""
    import tub_pathorob.cli as cli

    appended_while_in_place, append = [], cli._append_records

    def spy(path, records):
        appended_while_in_place.extend((path.parent / r["output"]).exists() for r in records)
        append(path, records)

    monkeypatch.setattr(cli, "_append_records", spy)
    tiles, out = _tiles(tmp_path / "tiles", 0), tmp_path / "sn" / "outputs"
    run = ["pathorob", "stainnorm", tiles, "-o", tmp_path / "sn"]
    expect_ok(invoke(run))
    assert appended_while_in_place == [False, False]
    (out / "tiles" / "t0.png").unlink()  # killed after the record, before the tile was in place
    expect_ok(invoke(run))
    assert (out / "tiles" / "t0.png").is_file()
    manifest = out / "stainnorm_manifest.jsonl"
    manifest.write_text("".join(ln + "\n" for ln in manifest.read_text().splitlines() if "t1.png" not in ln))
    e = _error(invoke(run))  # an older tub's kill: the tile without a record names the one file to delete
    assert "outputs/tiles/t1.png has no record" in e and "delete that file" in e
