"""AttnLRP (Achtibat et al., ICML 2024, arXiv 2402.05602) for the tub ViT: the balance it keeps, an
explicit relevance-form backward pass of its rules, patch-flipping faithfulness, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tubcli.testing import invoke

from tub_atlas.encoder import Encoder, Transform
from tub_atlas.lrp import lrp, make_target, relevance_budget
from tub_atlas.synthetic import random_vit
from tub_atlas.vit import ViTConfig, softmax_rule

CONFIGS = {
    "swiglu-prefix-regs": ViTConfig(patch_size=8, embed_dim=48, depth=2, num_heads=4, reg_tokens=4,
                                    pos_layout="prefix", pos_grid=4, mlp="swiglu", mlp_hidden=64),
    "gelu-patches-regs": ViTConfig(patch_size=8, embed_dim=48, depth=2, num_heads=4, reg_tokens=2,
                                   pos_layout="patches", pos_grid=4, mlp="gelu", mlp_hidden=96),
}


def _encoder(cfg: ViTConfig, dtype=torch.float64, std=0.2, pool="cls+mean") -> Encoder:
    # std 0.2: attention far from uniform, so the softmax path carries real relevance
    return Encoder(random_vit(cfg, seed=0, std=std).to(dtype), Transform(img_size=cfg.img_size), pool)


def _targets(enc, dtype):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, enc.dim, generator=g, dtype=dtype)
    b = torch.randn(3, generator=g, dtype=dtype)
    ref = torch.randn(enc.dim, generator=g, dtype=dtype)
    return {"dim": make_target("dim", 5), "probe": make_target("probe", 2, probe=(W, b)),
            "similarity": make_target("similarity", reference=ref)}


# ------------------------------------------------------------------ (a) what AttnLRP conserves
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_attnlrp_balance_pixels_additive_terms_and_softmax_biases(name, dtype, tol):
    """f = Σ pixels + Σ additive terms + Σ softmax Taylor biases (Prop. 3.1 is a Taylor expansion
    *with* bias); the softmax share is real, so pixels + additive terms alone do not balance."""
    enc = _encoder(CONFIGS[name], dtype)
    x01 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=dtype)
    for kind, target in _targets(enc, dtype).items():
        b = relevance_budget(enc, x01, target, rule="attn")
        assert b["pixels"].shape == (1, 32, 32)
        scale = max(abs(b["f"]), abs(b["input"]), abs(b["additive"]), abs(b["softmax"]))  # terms can cancel
        assert abs(b["input"] + b["additive"] + b["softmax"] - b["f"]) <= tol * scale, kind
        assert abs(b["softmax"]) > 1e-3 * abs(b["f"]), kind  # the bias term is not negligible here
        assert abs(b["input"] + b["additive"] - b["f"]) > 1e-3 * abs(b["f"]), kind
        assert float(b["pixels"].abs().sum()) > 1e-2 * abs(b["f"]), kind  # pixels carry real relevance
        cp = relevance_budget(enc, x01, target, rule="cp")  # CP-LRP: no softmax term, same balance
        scale = max(abs(cp["f"]), abs(cp["input"]), abs(cp["additive"]))
        assert cp["softmax"] == 0 and abs(cp["input"] + cp["additive"] - cp["f"]) <= tol * scale
        assert abs(cp["f"] - b["f"]) <= 1e-12 * abs(b["f"]) + (0 if dtype == torch.float64 else 1e-6)
    assert enc.vit.lrp is False and all(blk.attn.softmax_bias is None for blk in enc.vit.blocks)


@pytest.mark.parametrize("rule", ["cp", "attn"])
def test_lrp_on_a_frozen_encoder_leaves_it_frozen(rule):
    """Encoders from the patch-encoder hook come with requires_grad off; LRP must still balance."""
    enc = _encoder(CONFIGS["gelu-patches-regs"]).requires_grad_(False)
    x01 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    R, f, rest = lrp(enc, x01, make_target("dim", 1), return_terms=True, rule=rule)
    assert abs(float(R.sum()) + rest - f) <= 1e-10 * max(abs(f), abs(rest))
    assert not any(p.requires_grad for p in enc.parameters())


def test_softmax_rule_is_prop_3_1():
    """Gradient × Input through ``softmax_rule`` gives R_in = x ⊙ (R_out − s Σ R_out), and the Taylor
    bias β satisfies s = J x + β with J the softmax Jacobian."""
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(2, 5, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    s, beta = softmax_rule(x)
    assert torch.allclose(s, torch.softmax(x, -1), atol=0, rtol=0)
    gx, gb = torch.autograd.grad((s * w).sum(), [x, beta])
    R_out = s.detach() * w  # relevance of s for f = Σ w s
    expected = x.detach() * (R_out - s.detach() * R_out.sum(-1, keepdim=True))
    assert torch.allclose(x.detach() * gx, expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(gb, w)
    sd, xd = s.detach(), x.detach()
    Jx = sd * (xd - (sd * xd).sum(-1, keepdim=True))
    assert torch.allclose(Jx + beta.detach(), sd, atol=1e-13)


# ------------------------------------------------------------------ (b) explicit backward of the rules
def _ln_rule(norm, x, R_y):
    """Identity rule on 1/σ (Prop. 3.4): y = (w/σ) ⊙ (I − 11ᵀ/D) x + b, ε-rule (ε = 0) on that map."""
    c = x - x.mean(-1, keepdim=True)
    sigma = torch.sqrt(c.pow(2).mean(-1, keepdim=True) + norm.eps)
    y = c / sigma * norm.weight + norm.bias
    G = R_y / y * norm.weight / sigma  # Mᵀ(R_y / y), M = diag(w/σ)(I − 11ᵀ/D)
    return x * (G - G.mean(-1, keepdim=True)), y


def _lin_rule(x, W, R_y, y):
    """ε-rule (Eq. 8) with ε = 0 for y = x Wᵀ + b: R_x = x ⊙ ((R_y / y) W)."""
    return x * ((R_y / y) @ W)


def _explicit_lrp(enc: Encoder, x01: torch.Tensor, W: torch.Tensor, b: torch.Tensor, c: int, rule: str):
    """Relevance-form LRP of (W·[cls, mean] + b)[c] for a 1-block ViT, message by message (B = 1)."""
    m = enc.vit
    cfg = m.cfg
    blk = m.blocks[0]
    P, D, H = cfg.patch_size, cfg.embed_dim, cfg.num_heads
    xn = enc.transform(x01)[0]
    with torch.no_grad():
        # ---- forward, keeping every intermediate
        patches = F.unfold(xn[None], P, stride=P)[0].T  # (N, 3PP), (C, kh, kw) order as the conv weight
        Wpe = m.patch_embed.proj.weight.reshape(D, -1)
        e = patches @ Wpe.T + m.patch_embed.proj.bias
        N, n_pre = e.shape[0], m.num_prefix_tokens
        prefix = [m.cls_token[0]] + ([m.reg_token[0]] if m.reg_token is not None else [])
        if cfg.pos_layout == "patches":
            pos = m.pos_embed[0]
            t0 = torch.cat(prefix + [e + pos])
        else:
            pos = m.pos_embed[0, n_pre:]
            t0 = torch.cat(prefix + [e]) + m.pos_embed[0]
        c0 = t0 - t0.mean(-1, keepdim=True)
        h = c0 / torch.sqrt(c0.pow(2).mean(-1, keepdim=True) + blk.norm1.eps) * blk.norm1.weight + blk.norm1.bias
        qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        T, hd = qkv.shape[0], D // H
        q, k, v = qkv.reshape(T, 3, H, hd).permute(1, 2, 0, 3)  # (H, T, hd) each
        L = (q * blk.attn.scale) @ k.transpose(-1, -2)
        s = torch.softmax(L, -1)
        O = s @ v
        o = O.transpose(0, 1).reshape(T, D)
        p = o @ blk.attn.proj.weight.T + blk.attn.proj.bias
        a = p * blk.ls1.gamma
        t1 = t0 + a
        c1 = t1 - t1.mean(-1, keepdim=True)
        h2 = c1 / torch.sqrt(c1.pow(2).mean(-1, keepdim=True) + blk.norm2.eps) * blk.norm2.weight + blk.norm2.bias
        u = h2 @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        if cfg.mlp == "swiglu":
            gt, vl = u.chunk(2, -1)
            act = F.silu(gt) * vl
        else:
            act = F.gelu(u)
        mm = act @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        ml = mm * blk.ls2.gamma
        t2 = t1 + ml
        R_z = torch.zeros_like(t2)
        _, z = _ln_rule(m.norm, t2, R_z)
        pooled = torch.cat([z[0], z[n_pre:].mean(0)])

        # ---- backward: relevance messages
        R_pool = pooled * W[c]  # linear target; the probe bias keeps its own share
        R_z[0] += R_pool[:D]
        R_z[n_pre:] += z[n_pre:] * W[c, D:] / N  # mean pooling, ε-rule: (R/out) = W[c, D:]
        R_t2, _ = _ln_rule(m.norm, t2, R_z)
        R_t1, R_ml = t1 / t2 * R_t2, ml / t2 * R_t2  # residual sum, Eq. 8
        R_mm = R_ml  # LayerScale: one input, one output
        R_act = _lin_rule(act, blk.mlp.fc2.weight, R_mm, mm)
        if cfg.mlp == "swiglu":
            R_u = torch.cat([0.5 * R_act, 0.5 * R_act], -1)  # uniform rule (Eq. 7), identity for silu (Eq. 9)
        else:
            R_u = R_act  # identity rule (Eq. 9)
        R_h2 = _lin_rule(h2, blk.mlp.fc1.weight, R_u, u)
        R_t1 = R_t1 + _ln_rule(blk.norm2, t1, R_h2)[0]
        R_t0, R_a = t0 / t1 * R_t1, a / t1 * R_t1
        R_o = _lin_rule(o, blk.attn.proj.weight, R_a, p)
        R_O = R_o.reshape(T, H, hd).transpose(0, 1)
        if rule == "attn":
            G = R_O / (2 * O)  # Prop. 3.3: ε-rule over the sum, uniform rule over the two factors
            R_s, R_v = s * (G @ v.transpose(-1, -2)), v * (s.transpose(-1, -2) @ G)
            R_L = L * (R_s - s * R_s.sum(-1, keepdim=True))  # softmax rule, Prop. 3.1
            G = R_L / (2 * L)
            R_q = q * (blk.attn.scale * G @ k)
            R_k = k * (blk.attn.scale * G.transpose(-1, -2) @ q)
        else:  # CP-LRP: attention probabilities are constants, everything goes to the values
            R_v = v * (s.transpose(-1, -2) @ (R_O / O))
            R_q = R_k = torch.zeros_like(q)
        R_qkv = torch.stack([R_q, R_k, R_v]).permute(2, 0, 1, 3).reshape(T, 3 * D)
        R_h = _lin_rule(h, blk.attn.qkv.weight, R_qkv, qkv)
        R_t0 = R_t0 + _ln_rule(blk.norm1, t0, R_h)[0]
        R_e = e / (e + pos) * R_t0[n_pre:]  # positions (and CLS/registers) keep their share
        R_patches = _lin_rule(patches, Wpe, R_e, e)
        R_pix = F.fold(R_patches.T[None], xn.shape[-2:], P, stride=P)[0].sum(0)
    return R_pix


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rule", ["attn", "cp"])
def test_gradient_graph_equals_explicit_relevance_messages(name, rule):
    cfg = ViTConfig(**{**CONFIGS[name].to_dict(), "depth": 1})
    enc = _encoder(cfg, pool="cls+mean")
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, enc.dim, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    x01 = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64)
    R = lrp(enc, x01, make_target("probe", 1, probe=(W, b)), rule=rule)[0]
    R_ref = _explicit_lrp(enc, x01, W, b, 1, rule)
    assert R.shape == R_ref.shape == (32, 32)
    assert (R - R_ref).abs().max() <= 1e-10 * R_ref.abs().max()  # measured ~2e-15


def test_attnlrp_and_cp_lrp_differ():
    """The check above can tell the rule sets apart: on the same block they give different maps."""
    cfg = ViTConfig(**{**CONFIGS["gelu-patches-regs"].to_dict(), "depth": 1})
    enc = _encoder(cfg)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, enc.dim, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    x01 = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64)
    t = make_target("probe", 1, probe=(W, b))
    R_attn, R_cp = lrp(enc, x01, t, rule="attn")[0], lrp(enc, x01, t, rule="cp")[0]
    assert (R_attn - R_cp).abs().max() > 1e-2 * R_cp.abs().max()
    assert (R_attn - _explicit_lrp(enc, x01, W, b, 1, "cp")).abs().max() > 1e-2 * R_cp.abs().max()


# ------------------------------------------------------------------ (c) patch-flipping faithfulness
def test_patch_flipping_both_lrp_variants_beat_random():
    """Majority task with known evidence patches (synthetic.patch_insert_task), a small ViT trained on
    it; MoRF AUPC of the class-1 logit (lower = more faithful), ABPC (higher = more faithful) and the
    share of the top-k patches that are class-1 evidence. Figures: docs/benchmarks/atlas.md."""
    from tub_atlas.faithfulness import patch_flipping_experiment

    r = patch_flipping_experiment(n_train=256, n_eval=12, steps=300, seed=0, depth=2)
    assert r["test_acc"] > 0.9 and r["n_eval"] >= 8
    assert r["conservation_max_rel_error"] < 1e-4  # fp32
    m = r["methods"]
    for name in ("lrp", "attnlrp"):
        assert m[name]["morf"] < m["random"]["morf"] - 1.0, (name, m)  # the logit falls faster
        assert m[name]["abpc"] > m["random"]["abpc"] + 1.0, (name, m)
        assert m[name]["topk_hit"] > 0.8 > m["random"]["topk_hit"] + 0.3, (name, m)


def test_patch_flipping_on_sharp_attention_random_models():
    """Untrained ViT with std-0.3 weights (sharp attention): no ground truth, but flipping patches in
    the LRP orders moves a random embedding dimension far more than random or rollout orders do."""
    from tub_atlas.faithfulness import random_model_flipping

    r = random_model_flipping(n_tiles=10, std=0.3, depth=4, seed=0)
    m = r["methods"]
    for name in ("lrp", "attnlrp"):
        assert m[name]["abpc"] > m["random"]["abpc"] + 0.5, (name, m)
        assert m[name]["abpc"] > m["rollout"]["abpc"] + 0.5, (name, m)
    assert r["rank_corr_cp_attn"] < 0.95  # the softmax path changes the maps here


# ------------------------------------------------------------------ (d) CLI
def test_cli_explain_method_attnlrp(tmp_path):
    root = tmp_path / "d"
    r = invoke(["atlas", "make-data", str(root), "--n-per-class", "2", "--checkpoint", "vit-t8-demo",
                "--depth", "1", "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.stderr
    W = root / "vit-t8-demo-random.safetensors"
    out = tmp_path / "x"
    r = invoke(["atlas", "explain", str(root / "tiles.npz"), "--arch", "vit-t8-demo", "--weights", str(W),
                "--method", "attnlrp", "--target", "dim", "--index", "3", "--max-tiles", "2", "--json",
                "-o", str(out)])
    assert r.exit_code == 0, r.stderr + r.stdout
    res = json.loads(r.stdout)
    assert res["method"] == "attnlrp" and res["tiles"] == 2
    assert res["conservation_max_rel_error"] < 1e-3  # fp32, softmax biases included
    maps = np.load(out / "outputs/tiles/maps.npy")
    assert maps.shape == (2, 8, 8) and np.isfinite(maps).all() and np.abs(maps).max() > 0
    assert len(list((out / "outputs/tiles").glob("*.png"))) == 2
    r = invoke(["atlas", "explain", str(root / "tiles.npz"), "--arch", "vit-t8-demo", "--weights", str(W),
                "--method", "attnlrp", "--target", "probe", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--probe" in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout
