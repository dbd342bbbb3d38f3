"""TransMIL explanations without the n'xn' attention matrix (LRP, rollout, gradient methods).

The Nyström attention A = a1 a2^+ a3 is kept in its factors; these tests compare against a dense
reference that forms A from the same a1, a2^+, a3 (the former implementation), and check that
the tensors created while explaining grow linearly, not quadratically, with the bag size.
"""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import tub_xmil.explain as xexplain
from tub_xmil.explain import explain, gradient_x_input, lrp_scores
from tub_xmil.lrp import LRPParams
from tub_xmil.transmil import NystromAttention, TransMIL


def _dense_attention(self, x, to_qkv, mode):
    """Reference: the same factors multiplied out to the dense n'xn' attention (the former
    implementation; mode 'scores' returns it)."""
    v, bf, cf, pad = self._factors(x, to_qkv)
    attn = bf if cf is None else bf @ cf
    if mode == "forward":
        return attn @ v, v, None, pad
    if mode == "lrp":
        return attn.detach() @ v, v, None, pad
    return attn @ v, v, attn, pad


def _dense_rollout(model, x, column_scaling):
    """Reference rollout: the full product of the n'xn' matrices (A + I)/2, normalised, then its CLS row."""
    x = x if x.dim() == 3 else x[None]
    n = x.shape[1]
    with torch.no_grad():
        _, attns = model.forward(x, return_attention=True)
        result = None
        for attn, _ in attns:
            assert attn.shape[-1] == attn.shape[-2] > n  # dense n'xn'
            a = attn.double().mean(1)
            a = (a + torch.eye(a.shape[-1], dtype=a.dtype)) / 2
            a = a / (a.sum(-1)[:, None, :] if column_scaling else a.sum(-1, keepdim=True))
            result = a if result is None else a @ result
    p = attns[0][1]
    return result[:, p, p + 1: p + 1 + n]


def _model(seed=0, n_feat=32, input_dim=24, attention="nystrom", zero_bias=False):
    torch.manual_seed(seed)
    m = TransMIL(input_dim, 2, n_feat=n_feat, attention=attention).eval()
    if zero_bias:
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(getattr(mod, "bias", None), torch.Tensor):
                    mod.bias.zero_()
    return m


def _x(n, d=24, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.1


@pytest.mark.parametrize("attention", ["nystrom", "full"])
@pytest.mark.parametrize("column_scaling", [False, True])
def test_rollout_cls_row_matches_dense_product(monkeypatch, attention, column_scaling):
    model, x = _model(attention=attention), _x(300)
    new = model.attention_rollout(x, column_scaling=column_scaling)[0].double().numpy()
    # the same factors a1 a2^+ and a3, multiplied out to n'xn' (float64 rollout product)
    with torch.no_grad():
        _, attns = model.forward(x[None], return_attention=True)
    if attention == "nystrom":
        (bf, cf), pad = attns[0]
        assert bf.shape[-1] == cf.shape[-2] == model.translayers[0].attn.num_landmarks
        assert cf.shape[-1] == bf.shape[-2] == 1 + 18 * 18 + pad  # n' tokens, never n'xn'
    monkeypatch.setattr(NystromAttention, "_attention", _dense_attention)
    ref = _dense_rollout(model, x, column_scaling)[0].numpy()
    assert new.shape == ref.shape == (300,)
    err = np.abs(new - ref)
    assert err.max() <= 1e-5 * np.abs(ref).max()
    assert (err / np.abs(ref)).max() <= 1e-4


@pytest.mark.parametrize("no_bias", [False, True])
def test_lrp_matches_dense_attention_float64_and_float32(monkeypatch, no_bias):
    model, x = _model(), _x(300)
    params = LRPParams(no_bias=no_bias)
    model.double()
    s64, d64 = lrp_scores(model, x.double(), target=1, params=params, return_details=True)
    s32_model = _model()
    s32, d32 = lrp_scores(s32_model, x, target=1, params=params, return_details=True)
    monkeypatch.setattr(NystromAttention, "_attention", _dense_attention)
    r64, e64 = lrp_scores(model, x.double(), target=1, params=params, return_details=True)
    r32, e32 = lrp_scores(s32_model, x, target=1, params=params, return_details=True)
    assert np.abs(s64 - r64).max() <= 1e-12 * np.abs(r64).max()
    assert abs(d64["cls_relevance"] - e64["cls_relevance"]) <= 1e-12 * abs(e64["cls_relevance"])
    assert np.abs(s32 - r32).max() <= 1e-5 * np.abs(r32).max()
    assert abs(d32["cls_relevance"] - e32["cls_relevance"]) <= 1e-5 * abs(e32["cls_relevance"])
    for k in ("fc1", "translayer-0", "translayer-1"):  # relevance at every token, CLS and padding too
        a, b = d64["relevance"][k], e64["relevance"][k]
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_lrp_conservation_with_cls_token_at_300_patches():
    """All biases zero: every block is linear under the AH/LN rules, so the input relevance plus
    the relevance left on the CLS token equals the explained logit (up to the eps stabiliser)."""
    model, x = _model(zero_bias=True).double(), _x(300).double()
    s, det = lrp_scores(model, x, target=1, params=LRPParams(no_bias=False), return_details=True)
    total = s.sum() + det["cls_relevance"]
    out = det["output_relevance"].sum().item()
    assert abs(total - out) <= 1e-6 * abs(out)
    assert abs(det["cls_relevance"]) > 1e-4


class _Sizes(TorchDispatchMode):
    """Largest tensor (elements) produced by any op, backward ops included."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _largest(model, x, method):
    with _Sizes() as s:
        if method == "lrp":
            lrp_scores(model, x, target=1, params=LRPParams(no_bias=False))
        elif method == "gi":
            gradient_x_input(model, x, target=1)
        else:
            explain(model, x, method, target=1)
    return s.max_numel


@pytest.mark.parametrize("method", ["lrp", "attention", "gi"])
def test_explanation_tensors_grow_linearly_with_bag_size(monkeypatch, method):
    model = _model(n_feat=16, input_dim=16)
    small, large = _largest(model, _x(1000, 16), method), _largest(model, _x(4000, 16), method)
    n_large = 1 + 64 ** 2  # n' tokens of the 4000-patch bag (before the Nyström padding)
    assert large <= 5 * small  # 4x the patches: about 4x (linear), 16x if n'xn' were formed
    assert large < n_large ** 2 / 8
    if method != "gi":  # the detector sees the dense reference's n'xn' attention (8 heads)
        monkeypatch.setattr(NystromAttention, "_attention", _dense_attention)
        monkeypatch.setattr(TransMIL, "attention_rollout",
                            lambda self, x, column_scaling=False: _dense_rollout(self, x, column_scaling))
        assert _largest(model, _x(1000, 16), method) >= 8 * (1 + 32 ** 2) ** 2


def test_20k_patch_bag_explains_without_quadratic_memory():
    """20k patches: the n'xn' attention alone would be 8 x 20001^2 x 4 B = 12.8 GB per layer."""
    model, x = _model(n_feat=16, input_dim=16), _x(20000, 16)
    r = model.attention_rollout(x)[0]
    assert r.shape == (20000,) and torch.isfinite(r).all() and (r > 0).all()
    s, det = lrp_scores(model, x, target=1, params=LRPParams(no_bias=False), return_details=True)
    assert s.shape == (20000,) and np.isfinite(s).all() and math.isfinite(det["cls_relevance"])


def _write_model_and_bag(tmp_path, n=150, d=24):
    from safetensors.torch import save_file
    mdir = tmp_path / "model"
    mdir.mkdir()
    model = _model(seed=3, input_dim=d)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, mdir / "model.safetensors")
    (mdir / "model.json").write_text(json.dumps({"arch": "transmil", "task": "classification", "classes": ["0", "1"],
                                                 "kwargs": {"input_dim": d, "head_dim": 2, "n_feat": 32}}))
    bag = tmp_path / "bag.h5"
    with h5py.File(bag, "w") as f:
        f["features"] = _x(n, d, seed=5).numpy()
        f["coords"] = np.stack([np.arange(n) % 15 * 256, np.arange(n) // 15 * 256], 1).astype(np.int64)
    return model, mdir, bag


@pytest.mark.parametrize("explained_rel", [None, "softmax"])
def test_cli_explain_runs_transmil_lrp_once(tmp_path, monkeypatch, explained_rel):
    from tubcli.testing import invoke

    model, mdir, bag = _write_model_and_bag(tmp_path)
    calls = []
    real = xexplain.lrp_scores

    def counting(*a, **k):
        calls.append(k.get("explained_rel"))
        return real(*a, **k)

    monkeypatch.setattr(xexplain, "lrp_scores", counting)
    args = ["xmil", "explain", bag, "--model", mdir, "--method", "lrp", "--method", "attention",
            "--target", "1", "-o", tmp_path / "run"]
    if explained_rel:
        args += ["--set", f"lrp.explained_rel={explained_rel}"]
    res = invoke(args)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    rec = json.loads((tmp_path / "run" / "outputs" / "bag.json").read_text())
    # one LRP pass gives the scores and the CLS report, both for the explained output (logit,
    # softmax or contrastive), so patch scores + CLS relevance add up to the reported output relevance
    assert len(calls) == 1
    x = _x(150, 24, seed=5)
    s, det = real(model, x, target=1, params=LRPParams(no_bias=False), explained_rel=explained_rel,
                  return_details=True)
    assert np.allclose(rec["patch_scores_lrp"], s, rtol=0, atol=1e-7)
    assert rec["lrp_cls_relevance"] == pytest.approx(det["cls_relevance"], rel=1e-6, abs=1e-9)
    assert rec["lrp_output_relevance"] == pytest.approx(float(det["output_relevance"].sum()), rel=1e-6)
    # what biases, ε and the LayerNorm rule absorbed: reported, so that patches + CLS + remainder = output
    assert rec["lrp_remainder"] == pytest.approx(rec["lrp_output_relevance"] - sum(rec["patch_scores_lrp"])
                                                 - rec["lrp_cls_relevance"], abs=1e-6)
    assert np.allclose(rec["patch_scores_attention"], model.attention_rollout(x)[0].numpy(), rtol=0, atol=1e-8)
