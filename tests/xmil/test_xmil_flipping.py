"""Patch flipping and task metrics (spec §2.5, §2.6)."""

import numpy as np
import pytest
import torch

from tub_xmil.attention_mil import AttentionMIL
from tub_xmil.flipping import block_sizes, flip_curve, slide_flipping
from tub_xmil.metrics import auprc2, concordance_index, regression_metrics


def test_block_sizes_follow_ascending_histogram_bins():
    s = np.arange(100, dtype=float)[::-1]  # order of the input does not matter
    b = block_sizes(s, "10%-of-all")
    assert b.sum() == 100 and len(b) == 10
    assert b.tolist() == np.histogram(s, bins=np.append(s.min(), np.percentile(s, np.arange(10, 101, 10))))[0].tolist()
    assert block_sizes(s, "one-by-one").tolist() == [1] * 100
    assert block_sizes(np.arange(10.0), "30%-of-all").sum() == 10  # 30, 60, 90, +100


def test_flip_curve_endpoints_and_planted_order():
    torch.manual_seed(0)
    m = AttentionMIL(4, 2, features_dim=8).eval()
    x = torch.randn(20, 4)
    f = lambda b: torch.softmax(m(b[None]), -1)[0, 1].item()  # noqa: E731
    s = np.random.default_rng(0).normal(size=20)
    drop = flip_curve(m, x, s, approach="drop", strategy="10%-of-all", target=1)
    add = flip_curve(m, x, s, approach="add", strategy="10%-of-all", target=1)
    with torch.no_grad():
        assert np.isclose(drop[0], f(x)) and np.isclose(drop[-1], f(torch.zeros_like(x)))
        assert np.isclose(add[0], f(torch.zeros_like(x))) and np.isclose(add[-1], f(x))
        keep = np.sort(np.argsort(s)[::-1][2:])  # first MoRF block drops the 2 highest scores
        assert np.isclose(drop[1], f(x[torch.as_tensor(keep)]))


def test_flip_curve_of_a_small_bag_at_1_percent_equals_the_bag_by_bag_definition():
    """1%-of-all on 20 patches: 101 points, most blocks empty (each distinct bag is scored once); every
    point is f of the bag left after its block, as spec §2.5 defines it."""
    torch.manual_seed(2)
    m = AttentionMIL(4, 2, features_dim=8).eval()
    x = torch.randn(20, 4)
    s = np.random.default_rng(1).normal(size=20)
    ranked = np.argsort(s, kind="quicksort")[::-1]
    for approach in ("drop", "add"):
        curve = flip_curve(m, x, s, approach=approach, strategy="1%-of-all", target=1)
        want = []
        with torch.no_grad():
            for k in np.cumsum(block_sizes(s, "1%-of-all")):
                keep = np.sort(ranked[k:] if approach == "drop" else ranked[:k])
                bag = x[torch.as_tensor(keep)] if len(keep) else torch.zeros_like(x)
                want.append(torch.softmax(m(bag[None]), -1)[0, 1].item())
        assert len(curve) == 101 and np.allclose(curve[1:], want, atol=1e-6)


def test_srg_of_true_single_scores_beats_reversed():
    torch.manual_seed(1)
    m = AttentionMIL(4, 2, features_dim=8).eval()
    x = torch.randn(30, 4)
    from tub_xmil.explain import keep_one_scores
    s = keep_one_scores(m, x, target=1)
    good = slide_flipping(m, x, s, target=1, strategy="10%-of-all", approaches=("drop",))["drop"]["srg"]
    bad = slide_flipping(m, x, -s, target=1, strategy="10%-of-all", approaches=("drop",))["drop"]["srg"]
    assert good > 0 > bad and np.isclose(good, -bad)


def test_metrics_against_definitions():
    from sklearn.metrics import r2_score

    y, p = np.array([1.0, 2, 3, 4]), np.array([1.1, 1.9, 3.2, 3.7])
    r = regression_metrics(y, p)
    assert np.isclose(r["r2"], r2_score(y, p)) and np.isclose(r["pearson_r"], np.corrcoef(y, p)[0, 1])
    t, e = np.array([1, 2, 3, 4.0]), np.array([1, 1, 0, 1])
    assert concordance_index(t, e, -t) == 1.0 and concordance_index(t, e, t) == 0.0
    assert concordance_index(t, e, np.zeros(4)) == 0.5
    # tied times: an event and a censoring at one time are comparable (lifelines, scikit-survival: 0.5
    # here), two events at one time are not
    assert concordance_index([5, 5, 10], [1, 0, 1], [1, 2, 0.5]) == 0.5
    assert concordance_index([5, 5, 10], [1, 1, 1], [1, 2, 0.5]) == 1.0
    ev = np.array([1, 1, 0, -1, -1])
    assert auprc2(ev, np.array([2.0, 1, 0, -1, -2])) == 1.0
    assert auprc2(np.zeros(5), np.arange(5.0)) is None


def test_xmil_symmetric_gain_is_add_morf_minus_drop_morf():
    from tub_xmil.attention_mil import AttentionMIL
    from tub_xmil.flipping import slide_flipping
    torch.manual_seed(0)
    m = AttentionMIL(4, 2, features_dim=8).eval()
    x = torch.randn(30, 4)
    s = np.random.default_rng(0).normal(size=30)
    r = slide_flipping(m, x, s, target=1, strategy="10%-of-all")
    assert r["symmetric_gain"] == pytest.approx(r["add"]["morf"].mean() - r["drop"]["morf"].mean())


class _CountsPlanted(torch.nn.Module):
    """Class-1 logit grows with the number of planted patches (feature 0 = 1) in the bag."""

    def forward(self, x):
        x = x if x.dim() == 3 else x[None]
        z = 3.0 * x[..., 0].sum(1) - 6.0
        return torch.stack([torch.zeros_like(z), z], dim=-1)


def test_tied_scores_merge_histogram_blocks_and_rank_blocks_credit_a_perfect_map():
    """Five decisive patches among 95 tied ones: the spec's histogram puts the ties in one block, so a perfect
    0/1 explanation scored SRG 0 at 10%-of-all (random: ~0); equal blocks from the ranking give it its due."""
    from tub_xmil.flipping import tied_blocks

    x = torch.zeros(100, 4)
    x[:5, 0] = 1.0
    oracle = np.zeros(100)
    oracle[:5] = 1.0
    assert block_sizes(oracle, "10%-of-all").tolist() == [0] * 9 + [100] and tied_blocks(oracle, "10%-of-all")
    assert block_sizes(oracle, "10%-of-all", ties="rank").tolist() == [10] * 10
    model = _CountsPlanted()
    spec = slide_flipping(model, x, oracle, "classification", 1, "10%-of-all", approaches=("drop",))
    rank = slide_flipping(model, x, oracle, "classification", 1, "10%-of-all", approaches=("drop",), ties="rank")
    one = slide_flipping(model, x, oracle, "classification", 1, "one-by-one", approaches=("drop",))
    assert spec["drop"]["srg"] == pytest.approx(0.0, abs=1e-12)
    assert rank["drop"]["srg"] > 0.5 and one["drop"]["srg"] > 0.5
    untied = np.random.default_rng(0).random(100)
    assert not tied_blocks(untied, "10%-of-all") and not tied_blocks(untied, "1%-of-all")


def test_flipping_plot_averages_slides_of_any_size_on_the_flipped_fraction(tmp_path, monkeypatch):
    """One-by-one curves of bags of 3 and 5 patches average on a common 0..1 grid: the plotted mean is
    the mean of each curve interpolated there."""
    import tub_xmil.plots as plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=120: drawn.append(fig) or path)
    recs = []
    for n in (3, 5):
        down, up = np.linspace(1, 0, n + 1), np.linspace(0, 1, n + 1)
        recs.append({"m": {a: {"morf": down, "lerf": up, "aupc_morf": down.mean(), "srg": (up - down).mean()}
                           for a in ("drop", "add")}})
    plots.flipping_plot(tmp_path / "f.png", recs, ["m"], "classification", "one-by-one")
    ax = drawn[0].axes[0]
    morf = ax.get_lines()[0]
    np.testing.assert_allclose(morf.get_ydata(), 1 - morf.get_xdata(), atol=1e-12)  # both curves are 1 - fraction
    assert len(drawn[0].axes) == 2 and "AUPC-MoRF 0.500" in morf.get_label()
    plots.pyplot().close(drawn[0])  # save_figure, replaced here, would have closed it
