"""Lazy bags: `tub xmil train`/`evaluate` keep each slide's bag path and read the features when a
step needs them (one bag in memory, as CLAM/TRIDENT do), not every bag up front. Results are the
same bits as with every bag held in memory; every bag is still checked (NaN/inf, empty, one feature
dimension) before the first training step and before anything is written."""

import json
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tubcli.errors import TubError
from tubcli.testing import expect_error_line, invoke

import tub_xmil.dataset as dataset
from tub_xmil.bags import read_bag, write_features_h5

# slide id -> (label, split); uneven bag sizes, so that a mixed-up bag would change the numbers
SLIDES = {f"s{i}": (i % 2, "train" if i < 6 else ("val" if i < 8 else "test")) for i in range(10)}
DIM = 8


def _ok(res):
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return res


def _bag(path, seed, n, dim=DIM, label=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[: max(1, n // 4), 0] += 2.0 * label
    coords = np.stack([np.arange(n) * 64, np.zeros(n)], 1).astype(np.int64)
    write_features_h5(path, x, coords, {"patch_size_level0": 64})
    return path


def _labels(path, slides=SLIDES, header="slide_id,label,split"):
    path.write_text(header + "\n" + "".join(f"{s},{lab},{sp}\n" for s, (lab, sp) in slides.items()))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lazy")
    (d / "bags").mkdir()
    for i, (sid, (label, _)) in enumerate(SLIDES.items()):
        _bag(d / "bags" / f"{sid}.h5", seed=i, n=5 + 3 * i, label=label)
    _labels(d / "labels.csv")
    return d


def _train_cmd(data, out, *extra, epochs=3):
    return ["xmil", "train", "--features", data / "bags", "--labels", data / "labels.csv", "--epochs", epochs,
            "--set", "model.features_dim=8", "--set", "model.dropout=0.3", "-o", out, "--json", *extra]


def _eval_cmd(data, model, out):
    return ["xmil", "evaluate", "--model", model, "--features", data / "bags", "--labels", data / "labels.csv",
            "--split", "all", "--strategy", "25%-of-all", "-o", out, "--json"]


class _Reads:
    """Counts read_bag calls per slide, and how many bags read before are still alive at each read."""

    def __init__(self):
        self.count = Counter()
        self.refs = []
        self.alive_at_read = []

    def __call__(self, path):
        self.alive_at_read.append(self.alive())
        x, coords, attrs = read_bag(path)
        self.count[path.stem] += 1
        self.refs.append(weakref.ref(x))
        return x, coords, attrs

    def alive(self):
        return sum(r() is not None for r in self.refs)


@pytest.fixture
def reads(monkeypatch):
    r = _Reads()
    monkeypatch.setattr(dataset, "read_bag", r)
    return r


def _eager(monkeypatch):
    """load_slides as it was: every bag read and held by its Slide."""
    lazy_load = dataset.load_slides

    def load(*args, **kw):
        slides, classes = lazy_load(*args, **kw)
        held = [dataset.Slide(s.slide_id, s.features, s.coords, s.label, s.time, s.event, s.split)
                for s in slides]
        assert not any(s.lazy for s in held)
        return held, classes

    monkeypatch.setattr(dataset, "load_slides", load)


# ---------------------------------------------------------------- (a) the same bits as eager loading
@pytest.mark.parametrize("task", ["classification", "survival"])
def test_lazy_training_and_evaluation_match_eager_loading(tmp_path, data, monkeypatch, task):
    from safetensors.torch import load_file

    if task == "survival":  # survival relabels the slides (bins) in place: the lazy Slide must keep that
        rows = dict(SLIDES)
        (tmp_path / "bags").symlink_to(data / "bags")
        (tmp_path / "labels.csv").write_text("slide_id,time,event,split\n" + "".join(
            f"{s},{3 + 2 * i},{i % 3 != 0:d},{sp}\n" for i, (s, (_, sp)) in enumerate(rows.items())))
        data = tmp_path
    extra = ["--task", task]
    outs = {}
    for mode in ("lazy", "eager"):
        with monkeypatch.context() as mp:
            if mode == "eager":
                _eager(mp)
            res = json.loads(_ok(invoke(_train_cmd(data, tmp_path / mode, *extra))).stdout)
            model = tmp_path / mode / "checkpoints"
            ev = json.loads(_ok(invoke(_eval_cmd(data, model, tmp_path / f"ev_{mode}"))).stdout)
        res.pop("weights")
        res.pop("training_curves")
        ev.pop("flipping_figure", None)  # paths into each mode's own run
        test_predictions = Path(res.pop("test_predictions")).read_text()
        outs[mode] = {"train": res, "evaluate": ev, "test_predictions": test_predictions,
                      "metrics": (tmp_path / mode / "metrics.jsonl").read_text(),
                      "weights": load_file(str(model / "model.safetensors")),
                      "last": torch.load(model / "last.pt"),
                      "flipping": (tmp_path / f"ev_{mode}" / "outputs" / "flipping.json").read_text()}
    lazy, eager = outs["lazy"], outs["eager"]
    assert lazy["train"] == eager["train"] and lazy["train"]["test_slides"] == 2
    assert lazy["test_predictions"] == eager["test_predictions"]
    assert lazy["metrics"] == eager["metrics"] and len(lazy["metrics"].splitlines()) == 3
    assert lazy["evaluate"] == eager["evaluate"] and lazy["flipping"] == eager["flipping"]
    a, b = lazy["weights"], eager["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    for part in ("model", "optimizer"):
        pa, pb = lazy["last"][part], eager["last"][part]
        if part == "optimizer":
            pa, pb = pa["state"], pb["state"]
            pa = {f"{i}.{k}": v for i, st in pa.items() for k, v in st.items()}
            pb = {f"{i}.{k}": v for i, st in pb.items() for k, v in st.items()}
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa), part


def test_lazy_resume_repeats_the_uninterrupted_run(tmp_path, data):
    from safetensors.torch import load_file

    _ok(invoke(_train_cmd(data, tmp_path / "full")))
    _ok(invoke(_train_cmd(data, tmp_path / "cut", epochs=1)))  # stopped after epoch 0
    _ok(invoke([*_train_cmd(data, tmp_path / "cut"), "--resume", "auto"]))
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "model.safetensors")) for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- (b) laziness
def test_load_slides_checks_every_bag_and_keeps_none(data, reads):
    slides, classes = dataset.load_slides(data / "bags", data / "labels.csv", "classification")
    assert classes == ["0", "1"] and [s.slide_id for s in slides] == list(SLIDES)
    assert reads.count == Counter({s: 1 for s in SLIDES})  # each bag read once, to check it
    assert max(reads.alive_at_read) == 0 and reads.alive() == 0  # read, check, drop: no bag kept
    for i, s in enumerate(slides):
        assert s.lazy and s._features is None and s._coords is None
        assert s.shape == (5 + 3 * i, DIM) and s.path.name == f"{s.slide_id}.h5"
    assert reads.count == Counter({s: 1 for s in SLIDES})  # the shape needed no read
    x = slides[3].features  # read now, the same tensor as read_bag gives
    ref, coords, _ = read_bag(data / "bags" / "s3.h5")
    assert x.dtype == torch.float32 and torch.equal(x, ref)
    assert np.array_equal(slides[3].coords, coords) and slides[3]._features is None
    assert reads.count["s3"] == 3


def test_training_reads_each_bag_once_per_epoch_one_at_a_time(tmp_path, data, reads):
    res = json.loads(_ok(invoke(_train_cmd(data, tmp_path / "r"))).stdout)
    assert (res["train_slides"], res["val_slides"], res["test_slides"]) == (6, 2, 2)
    epochs = 3
    # 1 check at load + 1 training step (train) or 1 validation prediction (val) per epoch; test: 1 at the end
    want = {s: 1 + (epochs if sp in ("train", "val") else 1) for s, (_, sp) in SLIDES.items()}
    assert reads.count == Counter(want)
    assert max(reads.alive_at_read) == 0  # no earlier bag alive when the next is read
    reads.count.clear()
    reads.alive_at_read.clear()
    _ok(invoke(_eval_cmd(data, tmp_path / "r" / "checkpoints", tmp_path / "ev")))
    flipped = {r["slide_id"] for r in json.loads((tmp_path / "ev" / "outputs" / "flipping.json").read_text())}
    # check + prediction, and one read for all flipping methods of a slide
    assert reads.count == Counter({s: 2 + (s in flipped) for s in SLIDES})
    assert max(reads.alive_at_read) == 0


def test_a_bag_changed_after_loading_is_an_error(tmp_path, data):
    for f in ("s0", "s1"):
        _bag(tmp_path / f"{f}.h5", seed=0, n=4)
    _labels(tmp_path / "l.csv", {"s0": (0, "train"), "s1": (1, "train")})
    slides, _ = dataset.load_slides(tmp_path, tmp_path / "l.csv", "classification")
    _bag(tmp_path / "s1.h5", seed=0, n=7)
    with pytest.raises(TubError, match=r"s1.h5: the bag changed while running: features are now \(7, 8\)"):
        slides[1].features


def test_slides_holding_a_tensor_behave_as_before():
    x = torch.ones(3, 4)
    s = dataset.Slide("a", x, None, 1.0, split="test")
    assert s.features is x and s.coords is None and s.shape == (3, 4) and not s.lazy
    with pytest.raises(ValueError):
        dataset.Slide("b")


# ---------------------------------------------------------------- (c) bad bags: errors before training
@pytest.mark.parametrize("bad,needle", [
    ("nan", "s9.h5: 1 of 32 patches have NaN or infinite features"),
    ("empty", "s9.h5: the bag has no patches"),
    ("dim", "s9.h5: features are 4-d, those of slide s0 are 8-d; all bags must come from one encoder"),
    ("missing", "for 1 slide(s) of"),
    ("duplicate", "slide_id 's9' is on lines 11 and 12"),
])
def test_bad_bags_are_one_line_errors_before_training(tmp_path, data, bad, needle, monkeypatch):
    import tub_xmil.training as training

    bags = tmp_path / "bags"
    bags.mkdir()
    for sid in SLIDES:  # the bad one is the last: every bag is checked before the first step
        (bags / f"{sid}.h5").symlink_to(data / "bags" / f"{sid}.h5")
    (bags / "s9.h5").unlink()
    rows = dict(SLIDES)
    if bad == "nan":
        _bag(bags / "s9.h5", 9, 32)
        import h5py
        with h5py.File(bags / "s9.h5", "r+") as f:
            f["features"][5, 1] = np.inf
    elif bad == "empty":
        _bag(bags / "s9.h5", 9, 0)
    elif bad == "dim":
        _bag(bags / "s9.h5", 9, 32, dim=4)
    elif bad == "duplicate":
        _bag(bags / "s9.h5", 9, 32)
    labels = _labels(tmp_path / "l.csv", rows)
    if bad == "duplicate":
        labels.write_text(labels.read_text() + "s9,0,train\n")
    steps = []
    monkeypatch.setattr(training, "task_loss", lambda *a: steps.append(1))
    res = invoke(["xmil", "train", "--features", bags, "--labels", labels, "--epochs", "1",
                  "--set", "model.features_dim=8", "-o", tmp_path / "r"])
    expect_error_line(res, needle)
    assert not steps and not (tmp_path / "r" / "metrics.jsonl").exists()
    assert not (tmp_path / "r" / "checkpoints").exists() or not list((tmp_path / "r" / "checkpoints").iterdir())


def test_evaluate_checks_bags_against_the_model_before_any_output(tmp_path, data):
    _ok(invoke(_train_cmd(data, tmp_path / "r", epochs=1)))
    (tmp_path / "bags").mkdir()
    _bag(tmp_path / "bags" / "s0.h5", 0, 5)
    _bag(tmp_path / "bags" / "s1.h5", 1, 5, dim=4)
    labels = _labels(tmp_path / "l.csv", {"s0": (0, "test"), "s1": (1, "test")})
    res = invoke(["xmil", "evaluate", "--model", tmp_path / "r" / "checkpoints", "--features", tmp_path / "bags",
                  "--labels", labels, "-o", tmp_path / "ev"])
    expect_error_line(res, "s1.h5: features are 4-d, the model expects 8-d")
    assert not (tmp_path / "ev" / "outputs" / "flipping.json").exists()
