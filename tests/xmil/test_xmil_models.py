"""The science of tub-xmil's models and explanations, pinned by properties that can fail."""

import numpy as np
import pytest
import torch

from tub_xmil.attention_mil import AttentionMIL
from tub_xmil.explain import explain, integrated_gradients, keep_one_scores, drop_one_scores, lrp_scores
from tub_xmil.lrp import LRPParams, output_relevance
from tub_xmil.mamba_mil import MambaMIL, selective_scan, selective_scan_sequential
from tub_xmil.tasks import survival_bin_edges, survival_bins, survival_loss, survival_risk
from tub_xmil.transmil import TransMIL, moore_penrose_pinv


def _bag(n=40, d=24, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.2


@pytest.mark.parametrize("layers,out_layers,gated", [(1, 0, False), (2, 1, False), (1, 0, True)])
def test_lrp_conserves_logit_attnmil(layers, out_layers, gated):
    torch.manual_seed(1)
    m = AttentionMIL(24, 3, features_dim=32, num_layers=layers, n_out_layers=out_layers, gated=gated).eval()
    x = _bag()
    logit = m(x)[0, 2].item()
    s = lrp_scores(m, x, target=2, params=LRPParams(no_bias=True))
    assert abs(s.sum() - logit) <= 1e-4
    assert np.abs(s).max() > 1e-3  # not trivially zero


def test_lrp_regression_and_survival_conservation():
    torch.manual_seed(2)
    reg = AttentionMIL(24, 1, features_dim=16).eval()
    x = _bag()
    assert abs(lrp_scores(reg, x, task="regression").sum() - reg(x)[0, 0].item()) <= 1e-4
    surv = AttentionMIL(24, 4, features_dim=16).eval()
    s = lrp_scores(surv, x, task="survival")
    z = surv(x).detach()
    R = output_relevance(z, "survival", 0)  # z * d risk / dz, conserved down to the patches
    assert abs(s.sum() - R.sum().item()) <= 1e-4


def test_ah_rule_matches_closed_form():
    """R_id = a_i h_id / (sum_j a_j h_jd) R_d at the attention pooling (xMIL Eq. 5)."""
    torch.manual_seed(3)
    m = AttentionMIL(24, 2, features_dim=16).eval()
    x = _bag()
    _, det = lrp_scores(m, x, target=1, return_details=True)
    h = torch.relu(m.linear_layers(x[None]))
    a = torch.softmax(m.attention(h), 1)
    z = (a * h).sum(1)
    Rz = det["relevance"]["classifier"]
    expected = a * h / (z + 1e-8 * torch.where(z >= 0, 1.0, -1.0)) * Rz[:, None]
    assert torch.allclose(det["relevance"]["aggregation"], expected, atol=1e-6)


def test_ig_completeness_attnmil():
    torch.manual_seed(4)
    m = AttentionMIL(24, 2, features_dim=16).eval()
    x = _bag()
    s = integrated_gradients(m, x, target=1, n_steps=50)
    diff = (m(x)[0, 1] - m(torch.zeros_like(x))[0, 1]).item()
    assert abs(s.sum() - diff) < 1e-3 * max(1.0, abs(diff))


@pytest.mark.parametrize("arch", ["attnmil", "transmil", "mambamil", "additivemil"])
def test_single_batched_equals_one_bag_at_a_time(arch):
    from tub_xmil.checkpoint import build_model

    torch.manual_seed(5)
    kw = {"attnmil": {"features_dim": 16}, "transmil": {"n_feat": 32}, "mambamil": {"features_dim": 16},
          "additivemil": {"features_dim": 16, "n_out_layers": 1}}[arch]
    m = build_model(arch, 24, 2, **kw).eval()
    x = _bag(n=12)
    s = keep_one_scores(m, x, target=1)
    with torch.no_grad():
        loop = np.array([torch.softmax(m(x[i:i + 1][None]), -1)[0, 1].item() for i in range(len(x))])
    assert np.abs(s - loop).max() < 1e-6
    d = drop_one_scores(m, x, target=1)
    with torch.no_grad():
        full = torch.softmax(m(x[None]), -1)[0, 1].item()
        loop = np.array([full - torch.softmax(m(torch.cat([x[:i], x[i + 1:]])[None]), -1)[0, 1].item()
                         for i in range(len(x))])
    assert np.abs(d - loop).max() < 1e-6


def test_selective_scan_chunked_equals_recurrence():
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(2, 8, 70, generator=g), torch.randn(2, 8, 70, generator=g)
    A = -torch.rand(8, 4, generator=g) * 3
    B, C = torch.randn(2, 4, 70, generator=g), torch.randn(2, 4, 70, generator=g)
    D, bias = torch.randn(8, generator=g), torch.randn(8, generator=g)
    ref = selective_scan_sequential(u, dt, A, B, C, D, bias)
    for chunk in (1, 7, 32):
        assert torch.allclose(selective_scan(u, dt, A, B, C, D, bias, chunk=chunk), ref, atol=1e-5)


def test_moore_penrose_iteration_inverts_softmax_matrix():
    a = torch.softmax(torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0)), -1)
    z = moore_penrose_pinv(a, iters=20)
    assert torch.allclose(z, torch.linalg.pinv(a), atol=1e-3)


def test_transmil_rollout_is_a_distribution_over_tokens():
    torch.manual_seed(6)
    m = TransMIL(24, 2, n_feat=32).eval()
    x = _bag(n=10)
    r = m.attention_rollout(x)[0]
    assert r.shape == (10,) and (r > 0).all() and r.sum() < 1.0  # the rest sits on CLS/padding tokens
    assert explain(m, x, "attention").shape == (10,)


def test_transmil_square_padding_appends_first_tokens():
    h = torch.arange(5.0)[None, :, None]
    padded, side = TransMIL.square_pad(h)
    assert side == 3 and padded[0, :, 0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]


def test_mamba_lrp_runs_and_tracks_logit():
    torch.manual_seed(7)
    m = MambaMIL(24, 2, features_dim=16).eval()
    x = _bag(n=20)
    s, det = lrp_scores(m, x, target=1, params=LRPParams(no_bias=True), return_details=True)
    assert s.shape == (20,) and np.isfinite(s).all()
    # the half rule and the skip path keep relevance of the explained logit's order of magnitude
    assert abs(s.sum()) > 0.05 * abs(det["explained_output"][0, 1].item())


def test_survival_loss_by_hand():
    z = torch.tensor([[0.2, -0.1, 0.3, 0.0]])
    h = torch.sigmoid(z)[0]
    S = torch.cumprod(1 - h, 0)
    # event in bin 2 (uncensored): -(log S_1 + log h_2)
    assert torch.isclose(survival_loss(z, torch.tensor([2]), torch.tensor([0.0])), -(torch.log(S[1]) + torch.log(h[2])))
    # censored in bin 0: -log S_0... with S indexed from 1: -log S(bin 0) = -log(1 - h_0)
    assert torch.isclose(survival_loss(z, torch.tensor([0]), torch.tensor([1.0])), -torch.log(S[0]))
    assert torch.isclose(survival_risk(z)[0], -S.sum())


def test_survival_bins_are_training_quartiles():
    t = np.arange(1, 101, dtype=float)
    e = survival_bin_edges(t, 4)
    assert e[0] == 0 and np.isinf(e[-1])
    assert np.bincount(survival_bins(t, e), minlength=4).tolist() == [25, 25, 25, 25]


def test_random_scores_are_seeded():
    x = _bag()
    m = AttentionMIL(24, 2, features_dim=8)
    assert np.array_equal(explain(m, x, "random", seed=3), explain(m, x, "random", seed=3))
    assert not np.array_equal(explain(m, x, "random", seed=3), explain(m, x, "random", seed=4))


def test_softmax_and_contrastive_output_relevance():
    z = torch.tensor([[1.0, -0.5, 0.3]])
    p = torch.softmax(z, -1)[0]
    R = output_relevance(z, "softmax", 0)[0]
    assert torch.isclose(R[0], z[0, 0] * p[0] * (1 - p[0]))
    assert torch.allclose(R[1:], -z[0, 1:] * p[1:] * p[0])  # spec §2.3: the other classes' terms too
    zr = z.clone().requires_grad_(True)  # R = z * d p_c / d z
    (g,) = torch.autograd.grad(torch.softmax(zr, -1)[0, 0], zr)
    assert torch.allclose(R, (z * g)[0], atol=1e-7)
    Rc = output_relevance(z[:, :2], "contrastive", 0)[0]  # two classes: contrast with the other one
    assert torch.allclose(Rc, torch.tensor([1.0, 0.5])) and torch.isclose(Rc.sum(), z[0, 0] - z[0, 1])
    # three classes: the softmin of the differences, whose weights sum to 1 (Montavon et al. 2019, p. 202)
    R3 = output_relevance(z, "contrastive", 0)[0]
    d = z[0, 0] - z[0, 1:]
    w = torch.softmax(-d, 0)
    assert torch.isclose(R3[0], z[0, 0]) and torch.isclose(R3.sum(), (w * d).sum())
    assert torch.allclose(output_relevance(z, "contrastive", 0, contrastive=2)[0], torch.tensor([1.0, 0.0, -0.3]))
    torch.manual_seed(0)
    m = AttentionMIL(24, 3, features_dim=8).eval()
    s = explain(m, _bag(), "lrp", target=0, explained_rel="softmax")
    zz = m(_bag()).detach()
    assert abs(s.sum() - output_relevance(zz, "softmax", 0).sum().item()) <= 1e-4


def test_ig_linear_first_shortcut_equals_plain_path_integral():
    torch.manual_seed(8)
    m = AttentionMIL(24, 2, features_dim=16, num_layers=2).eval()

    class Plain(torch.nn.Module):  # same function, no shortcut available
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    x = _bag()
    fast = integrated_gradients(m, x, target=1)
    plain = integrated_gradients(Plain(m).eval(), x, target=1)
    assert np.abs(fast - plain).max() < 1e-6


@pytest.mark.parametrize("attention", ["nystrom", "dot_prod"])
def test_transmil_lrp_relevance_budget_with_cls_token(attention):
    """With all biases zero every TransMIL block is linear once the AH and LN rules detach their
    non-linear factors, so input relevance + relevance left on the CLS token = explained logit (Nyström
    and exact softmax attention, `model.attention`)."""
    torch.manual_seed(9)
    m = TransMIL(24, 2, n_feat=32, bias=True, attention=attention).eval()
    with torch.no_grad():
        for mod in m.modules():
            if getattr(mod, "bias", None) is not None and isinstance(mod.bias, torch.Tensor):
                mod.bias.zero_()
    x = _bag(n=16)
    s, det = lrp_scores(m, x, target=1, params=LRPParams(no_bias=False), return_details=True)
    total = s.sum() + det["cls_relevance"]
    assert abs(total - det["output_relevance"].sum().item()) <= 1e-4
    assert abs(det["cls_relevance"]) > 1e-3  # the CLS share is real, not negligible


def test_validation_split_is_stratified_and_keeps_patients_together():
    """An imbalanced cohort (6 vs 2 slides): every seed keeps both classes in training and puts each class's
    share in validation; slides of one patient never straddle the split."""
    from tub_xmil.dataset import Slide
    from tub_xmil.splits import validation_split

    slides = [Slide(f"s{i}", torch.zeros(1, 2), label=float(i >= 6)) for i in range(8)]
    for seed in range(20):
        train, val = validation_split(slides, 0.25, "classification", seed)
        assert sorted(s.label for s in val) == [0.0, 0.0] or sorted(s.label for s in val) == [0.0, 0.0, 1.0]
        assert {s.label for s in train} == {0.0, 1.0} and len(train) + len(val) == 8
    assert [s.slide_id for s in validation_split(slides, 0.5, "classification", 3)[1]] == \
        [s.slide_id for s in validation_split(slides, 0.5, "classification", 3)[1]]  # seeded
    cases = [Slide(f"p{i // 2}_{i % 2}", torch.zeros(1, 2), label=float(i >= 8), extra={"case_id": f"p{i // 2}"})
             for i in range(12)]
    for seed in range(20):
        train, val = validation_split(cases, 0.34, "classification", seed)
        assert not {s.extra["case_id"] for s in train} & {s.extra["case_id"] for s in val}
        assert {s.label for s in val} == {0.0, 1.0}


def test_bootstrap_intervals_match_the_normal_theory_of_a_mean_and_skip_undefined_draws():
    from tubcli.stats import bootstrap_intervals

    x = np.random.default_rng(0).normal(size=400)
    ci = bootstrap_intervals(lambda idx: {"mean": float(x[idx].mean())}, len(x), 2000, seed=1)
    half = 1.96 * x.std() / np.sqrt(len(x))
    assert abs(ci["mean"][0] - (x.mean() - half)) < 0.02 and abs(ci["mean"][1] - (x.mean() + half)) < 0.02
    labels = np.array([0] * 19 + [1])  # AUROC-like: undefined (NaN) when a draw misses the one positive
    ci = bootstrap_intervals(lambda idx: {"m": float("nan") if labels[idx].min() == labels[idx].max() else 1.0},
                             len(labels), 400, seed=0)
    assert 0 < ci["resamples_used"]["m"] < 400 and ci["m"] == [1.0, 1.0]  # P(draw has it) = 1 - 0.95^20 = 0.64


def test_balanced_class_weights_give_each_class_the_same_total():
    from tub_xmil.dataset import Slide
    from tub_xmil.training import class_weights

    slides = [Slide(f"s{i}", torch.zeros(1, 2), label=float(i >= 6)) for i in range(8)]  # 6 vs 2
    w = class_weights(slides, 3)  # a third class without training slides
    assert w == [8 / (3 * 6), 8 / (3 * 2), 0.0] and np.isclose(6 * w[0], 2 * w[1])
    assert class_weights(slides[4:], 2) == [1.0, 1.0]  # balanced data (2 and 2): unchanged losses


def test_r2_of_a_constant_target_is_undefined_even_when_its_mean_rounds():
    """The mean of three 0.1s misses 0.1 by a rounding step: ss_tot = 6e-34, and R² came out near -1e32
    (bootstrap resamples of a few regression slides hit this)."""
    from tub_xmil.metrics import regression_metrics, undefined_reason

    m = regression_metrics([0.1, 0.1, 0.1], [0.2, 0.3, 0.1])
    assert np.isnan(m["r2"]) and np.isnan(m["pearson_r"])
    assert undefined_reason("regression", labels=[0.1, 0.1, 0.1]).startswith("R² is undefined")
    assert regression_metrics([0.1, 0.2], [0.2, 0.2])["r2"] == pytest.approx(-1.0)


def test_xmil_gamma_rule_adds_positive_weights():
    from tub_xmil.lrp import gamma_module
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, -0.5]]))
        lin.bias.copy_(torch.tensor([0.2, -0.3]))
    g = gamma_module(lin, 0.25, no_bias=False)
    W = lin.weight.detach()
    assert torch.allclose(g.weight, W + 0.25 * W.clamp(min=0))
    assert torch.allclose(g.bias, lin.bias + 0.25 * lin.bias.clamp(min=0))


def test_the_python_explain_defaults_as_the_cli_and_checks_its_bag():
    """From a notebook, explain() explained class 0, used no_bias=True for TransMIL (the CLI: False, spec §3),
    returned zeros for a class the model lacks and NaN scores for a NaN bag."""
    from tub_xmil.config import ExplainConfig
    from tub_xmil.pipeline import choose_target, lrp_params_for

    torch.manual_seed(6)
    m = TransMIL(24, 3, n_feat=32).eval()
    x = _bag(n=10)
    cli_target = choose_target(m, x, "classification", None)
    cli = explain(m, x, "lrp", target=cli_target, lrp=lrp_params_for(m, ExplainConfig().lrp))
    assert np.array_equal(explain(m, x.numpy(), "lrp"), cli)  # numpy in, the predicted class, TransMIL's rule
    with pytest.raises(ValueError, match="target 3 is not a class of this model; use an index 0..2"):
        explain(m, x, "lrp", target=3)
    bad = x.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        explain(m, bad, "ig")
    with pytest.raises(ValueError, match="features are 20-d, the model expects 24-d"):
        explain(m, x[:, :20], "gi")
    with pytest.raises(ValueError, match="explain one bag at a time"):
        explain(m, torch.stack([x, x]), "lrp")
