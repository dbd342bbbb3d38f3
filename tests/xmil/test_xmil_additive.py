"""AdditiveMIL (Javed et al. 2022): exact additivity of its patch scores, LRP on it, and the CLI."""

import json

import numpy as np
import pytest
import torch
from tubcli.testing import expect_ok, invoke

from tub_xmil.additive_mil import AdditiveMIL
from tub_xmil.explain import additive_patch_scores, explain, lrp_scores
from tub_xmil.lrp import LRPParams


def _bag(n=30, d=24, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.2


@pytest.mark.parametrize("out_layers,gated", [(0, False), (1, True)])
def test_patch_scores_add_up_to_the_logit_exactly(out_layers, gated):
    torch.manual_seed(0)
    m = AdditiveMIL(24, 3, features_dim=16, n_out_layers=out_layers, gated=gated).eval()
    x = _bag()
    with torch.no_grad():
        logits = m(x)[0]
        # the additive form by hand: psi(a_i h_i) summed over patches
        h = m.encode(x[None])
        a = torch.softmax(m.attention_logits(h), dim=1)
        by_hand = m.head(a * h)[0]
    for c in range(3):
        s = additive_patch_scores(m, x, target=c)
        assert np.allclose(s, by_hand[:, c].numpy(), atol=1e-6)
        assert abs(s.sum() - logits[c].item()) < 1e-5
    assert np.ptp(additive_patch_scores(m, x, target=1)) > 1e-3  # patches differ


def test_masked_patches_contribute_nothing():
    torch.manual_seed(1)
    m = AdditiveMIL(24, 2, features_dim=16).eval()
    x = torch.stack([_bag(seed=1), torch.cat([_bag(n=20, seed=2), torch.zeros(10, 24)])])
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    with torch.no_grad():
        padded = m(x, mask)[1]
        alone = m(_bag(n=20, seed=2)[None])[0]
    assert torch.allclose(padded, alone, atol=1e-6)


def test_lrp_conserves_the_logit():
    """(single/drop on AdditiveMIL: test_xmil_models.py::test_single_batched_equals_one_bag_at_a_time)"""
    torch.manual_seed(2)
    m = AdditiveMIL(24, 2, features_dim=16, n_out_layers=1).eval()
    x = _bag()
    s = lrp_scores(m, x, target=1, params=LRPParams(no_bias=True))  # biases give their share on
    assert abs(s.sum() - m(x)[0, 1].item()) < 1e-4
    assert np.abs(s).max() > 1e-4


def test_patch_scores_refuse_other_models_and_survival():
    from tub_xmil.attention_mil import AttentionMIL

    with pytest.raises(ValueError, match="additivemil"):
        explain(AttentionMIL(24, 2, features_dim=8), _bag(), "patch_scores")
    with pytest.raises(ValueError, match="survival"):
        explain(AdditiveMIL(24, 4, features_dim=8), _bag(), "patch_scores", task="survival")


def test_train_and_explain_additivemil_from_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    fdir = tmp_path / "bags"
    fdir.mkdir()
    rows = ["slide_id,label,split"]
    for i in range(6):
        x = rng.normal(size=(15, 8)).astype(np.float32)
        x[:3, 0] += 3.0 * (i % 2)  # class 1: three patches carry the signal
        np.savez(fdir / f"s{i}.npz", features=x)
        rows.append(f"s{i},{i % 2},{'train' if i < 4 else 'test'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    expect_ok(invoke(["xmil", "train", "--features", fdir, "--labels", tmp_path / "labels.csv", "--arch", "additivemil",
                      "--epochs", "3", "--set", "model.features_dim=8", "-o", tmp_path / "t"]))
    model = tmp_path / "t" / "checkpoints"
    assert json.loads((model / "model.json").read_text())["arch"] == "additivemil"
    expect_ok(invoke(["xmil", "explain", fdir / "s1.npz", "--model", model, "--method", "patch_scores",
                      "--method", "lrp", "-o", tmp_path / "e"]))
    rec = json.loads((tmp_path / "e" / "outputs" / "s1.json").read_text())
    assert len(rec["patch_scores_patch_scores"]) == 15
    r = invoke(["xmil", "explain", fdir / "s1.npz", "--model", model, "--method", "patch_scores", "--task", "survival",
                "-o", tmp_path / "bad"])
    assert r.exit_code == 2 and "survival" in r.stderr
