"""Drop-one (occlusion) at scale: AdditiveMIL's O(N F) closed form equals re-running psi on every
drop-one bag; the generic path's bags per forward follow a memory budget without changing scores."""

import logging

import numpy as np
import pytest
import torch

from tub_xmil.additive_mil import AdditiveMIL, drop_one_closed_form
from tub_xmil.checkpoint import build_model
from tub_xmil.explain import drop_bags_per_forward, drop_one_scores


def _x(n, d=24, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.5 + 0.2


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("out_layers,bias,gated", [(0, True, False), (0, True, True), (2, False, False)])
@pytest.mark.parametrize("n", [2, 3, 17, 400])
def test_additive_closed_form_equals_batched_drop(out_layers, bias, gated, n):
    torch.manual_seed(n)
    m = AdditiveMIL(24, 3, features_dim=16, n_out_layers=out_layers, bias=bias, gated=gated).double().eval()
    assert m._psi_affine() is not None
    x = _x(n, seed=n)
    with torch.no_grad():
        closed, batched = m.drop_one_logits(x), m.drop_one_logits_batched(x)
    assert _rel(closed, batched) < 1e-10
    s = drop_one_scores(m, x, target=2)  # through the scores as the CLI computes them
    with torch.no_grad():
        full = torch.softmax(m(x[None]), -1)[0, 2]
        ref = (full - torch.softmax(batched, -1)[:, 2]).numpy()
    assert np.abs(s - ref).max() < 1e-12


def test_additive_closed_form_float32_within_rounding():
    torch.manual_seed(0)
    m = AdditiveMIL(24, 2, features_dim=16).eval()
    x = _x(3000, dtype=torch.float32)
    with torch.no_grad():
        closed, batched = m.drop_one_logits(x), m.drop_one_logits_batched(x)
    assert closed.dtype == torch.float32
    assert _rel(closed, batched) < 1e-6


@pytest.mark.parametrize("dominant", [5.0, 40.0, 800.0])
def test_additive_closed_form_with_a_dominant_patch(dominant):
    """One patch holding (almost) all the softmax mass: Z - e_i cancels, the row is summed directly."""
    g = torch.Generator().manual_seed(1)
    n = 50
    s = torch.randn(n, generator=g, dtype=torch.float64)
    s[7] += dominant
    c = torch.randn(n, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    out = drop_one_closed_form(s, c, b)
    ref = []
    for i in range(n):
        keep = torch.arange(n) != i
        a = torch.softmax(s[keep], 0)
        ref.append((a[:, None] * c[keep] + b).sum(0))
    ref = torch.stack(ref)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-10
    assert (out[7] - ref[7]).abs().max() < 1e-10 * ref[7].abs().max()  # the dominant row itself


def test_additive_dominant_patch_through_the_model():
    torch.manual_seed(3)
    m = AdditiveMIL(24, 2, features_dim=16).double().eval()
    with torch.no_grad():
        m.attention[-1].weight.mul_(1000.0)  # a sharply peaked softmax
    x = _x(60, seed=3)
    with torch.no_grad():
        a = m.attention_weights(x[None])[0]
        closed, batched = m.drop_one_logits(x), m.drop_one_logits_batched(x)
    assert a.max() > 0.99  # > 1/2: the row summed directly
    assert _rel(closed, batched) < 1e-10


def test_additive_single_patch_bag_scores_the_zero_bag():
    """Spec §2.5: the empty bag left by dropping the only patch is the zero bag of the original size
    (the closed form alone stays NaN there, the softmax over no patch)."""
    m = AdditiveMIL(24, 2, features_dim=16).double().eval()
    with torch.no_grad():
        zero = m(torch.zeros(1, 1, 24, dtype=torch.float64))
        assert torch.equal(m.drop_one_logits(_x(1)), zero)
        assert torch.equal(m.drop_one_logits_batched(_x(1)), zero)
        assert torch.isnan(drop_one_closed_form(torch.zeros(1), torch.ones(1, 2))).all()


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n", [2, 17, 300])
def test_attnmil_closed_form_equals_rerunning_every_drop_one_bag(gated, n):
    """AttnMIL's O(N F) drop-one (closed-form renormalised pooling) equals the masked O(N^2 F) path and
    the model run on each bag X minus {x_i} (a dominant patch: test_additive_closed_form_with_a_dominant_patch)."""
    from tub_xmil.attention_mil import AttentionMIL

    torch.manual_seed(n)
    m = AttentionMIL(24, 3, features_dim=16, gated=gated).double().eval()
    x = _x(n, seed=n)
    with torch.no_grad():
        closed, masked = m.drop_one_logits(x), m.drop_one_logits_masked(x)
        rerun = torch.cat([m(torch.cat([x[:i], x[i + 1:]])[None]) for i in range(n)])
        assert _rel(closed, masked) < 1e-10 and _rel(closed, rerun) < 1e-10
        x32 = x.float()
        assert _rel(m.float().drop_one_logits(x32), m.drop_one_logits_masked(x32)) < 1e-5


def test_additive_keeps_the_batched_path_where_psi_is_not_affine(monkeypatch):
    m = AdditiveMIL(24, 2, features_dim=16, n_out_layers=1, bias=True).eval()
    assert m._psi_affine() is None  # ReLU(W a h + b) is not a (.) + b
    assert m.train()._psi_affine() is None  # dropout
    m.eval()
    calls = []
    monkeypatch.setattr(m, "drop_one_logits_batched", lambda x: calls.append(1) or torch.zeros(len(x), 2))
    m.drop_one_logits(_x(5, dtype=torch.float32))
    assert calls == [1]


def test_additive_batched_block_follows_the_budget(monkeypatch):
    torch.manual_seed(0)
    m = AdditiveMIL(24, 2, features_dim=16, n_out_layers=1).double().eval()
    x = _x(40)
    with torch.no_grad():
        ref = m.drop_one_logits_batched(x)
        shapes = []
        pool = m.pool_kept
        monkeypatch.setattr(m, "pool_kept", lambda a, h, k: shapes.append(a.shape[0]) or pool(a, h, k))
        m.drop_budget_bytes = 1
        small = m.drop_one_logits_batched(x)
    assert set(shapes) == {1} and len(shapes) == 40
    assert _rel(small, ref) < 1e-12


def _generic(arch):
    torch.manual_seed(7)
    kw = {"transmil": {"n_feat": 32}, "mambamil": {"features_dim": 16}}[arch]
    return build_model(arch, 24, 2, **kw).eval()


@pytest.mark.parametrize("arch", ["transmil", "mambamil"])
def test_generic_drop_tiny_budget_equals_default(arch):
    m = _generic(arch)
    x = _x(23, dtype=torch.float32)
    default = drop_one_scores(m, x, target=1)
    one_bag = drop_one_scores(m, x, target=1, budget=1)
    fixed64 = drop_one_scores(m, x, target=1, batch=64)  # the former fixed batch
    with torch.no_grad():
        full = torch.softmax(m(x[None]), -1)[0, 1]
        loop = np.array([(full - torch.softmax(m(torch.cat([x[:i], x[i + 1:]])[None]), -1)[0, 1]).item()
                         for i in range(len(x))])
    for s in (default, one_bag, fixed64):
        assert np.abs(s - loop).max() < 1e-6


@pytest.mark.parametrize("arch", ["transmil", "mambamil"])
def test_generic_bags_per_forward_shrink_with_n(arch, monkeypatch):
    m = _generic(arch)
    widest = max([24] + [p.shape[0] for p in m.parameters() if p.dim() >= 2])
    budget = 40 * widest * 4 * 14  # room for ~40 tokens of activations
    counts = {n: drop_bags_per_forward(m, n, 24, 4, budget) for n in (5, 11, 21, 41, 81)}
    assert counts[5] == 5 and counts[81] == 1
    assert all(counts[a] >= counts[b] for a, b in zip(list(counts)[:-1], list(counts)[1:]))
    assert counts[11] > counts[41]
    seen = {}
    forward = m.forward

    def record(x, *a, **k):
        seen.setdefault(x.shape[1], []).append(x.shape[0])  # bag length -> bags per forward
        return forward(x, *a, **k)

    monkeypatch.setattr(m, "forward", record)
    for n in (11, 41):
        seen.clear()
        drop_one_scores(m, _x(n, dtype=torch.float32), budget=budget)
        sizes = seen[n - 1]
        assert max(sizes) == counts[n] and sum(sizes) == n
    # a large budget keeps at most the former 64 bags per forward
    assert drop_bags_per_forward(m, 100, 24, 4, 2 ** 40) == 64


def test_generic_drop_warns_from_the_time_its_first_forward_predicts(monkeypatch):
    """The warning came at a fixed 5000 patches, where MambaMIL's drop-one runs for hours (~12 min already
    at 1000): it now comes from the first forward's time times the number of forwards."""
    import tub_xmil.explain as ex

    class _Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    m = _generic("transmil")
    keep, log = _Keep(), logging.getLogger("tub")  # the CLI may have stopped "tub" propagating
    log.addHandler(keep)
    try:
        monkeypatch.setattr(ex, "DROP_WARN_SECONDS", 0.0)
        drop_one_scores(m, _x(9, dtype=torch.float32), batch=3)
        warned = [msg for msg in keep.messages if "forward passes" in msg]
        assert len(warned) == 1 and "9 patches will take about" in warned[0] and "lrp or ig" in warned[0]
        keep.messages.clear()
        drop_one_scores(m, _x(9, dtype=torch.float32), batch=9)  # one forward: done before any warning
        monkeypatch.setattr(ex, "DROP_WARN_SECONDS", 3600.0)
        drop_one_scores(m, _x(9, dtype=torch.float32), batch=3)
        assert not [msg for msg in keep.messages if "forward passes" in msg]
    finally:
        log.removeHandler(keep)


def test_long_drop_and_ig_log_their_progress_inside_the_item(monkeypatch):
    """A slide's drop-one or IG ran for minutes without a line: they now log done/total and the time
    left every TUB_LOG_EVERY seconds."""
    import tub_xmil.explain as ex
    from tubcli.progress import setup_logging

    lines = []
    setup_logging()
    log = logging.getLogger("tub")
    monkeypatch.setattr(log.handlers[0], "emit", lambda record: lines.append(record.getMessage()))
    monkeypatch.setenv("TUB_LOG_EVERY", "1e-9")
    m = _generic("transmil")
    drop_one_scores(m, _x(9, dtype=torch.float32), batch=3)
    assert [line.split(" (")[0] for line in lines] == ["drop-one, 9 bags of 8 patches 3/9",
                                                       "drop-one, 9 bags of 8 patches 6/9"]
    assert "left)" in lines[0]
    lines.clear()
    monkeypatch.setattr(ex, "DROP_BUDGET_BYTES", 1)  # one step per forward
    ex.integrated_gradients(m, _x(9, dtype=torch.float32), target=1, n_steps=4)
    assert [line.split(" (")[0] for line in lines] == [f"integrated gradients, 4 steps of 9 patches {k}/4"
                                                       for k in (1, 2, 3)]


def test_ig_batches_its_steps_within_the_activation_budget(monkeypatch):
    """IG sized its batches of steps from the input alone: TransMIL ran all 50 steps of a 1000-patch bag
    in one forward (~6 GB). The steps now share drop-one's activation budget; batching changes only
    float rounding."""
    import tub_xmil.explain as ex
    from tub_xmil.transmil import TransMIL

    torch.manual_seed(0)
    m = TransMIL(input_dim=24, head_dim=2, n_feat=32).eval()
    x = torch.randn(1, 40, 24)
    whole = ex.integrated_gradients(m, x, target=1, n_steps=12)
    calls = []
    monkeypatch.setattr(ex, "DROP_BUDGET_BYTES", 41 * ex._widest_layer(m, 24) * 4 * ex.DROP_ACTIVATION_FACTOR * 3)
    monkeypatch.setattr(ex, "saved_bytes_per_bag", lambda *a, **k: 1)  # the drop-one formula alone
    handle = m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    batched = ex.integrated_gradients(m, x, target=1, n_steps=12)
    handle.remove()
    assert max(calls) < 12 and sum(calls) == 12
    np.testing.assert_allclose(batched, whole, rtol=1e-4, atol=1e-6)


def test_ig_steps_per_forward_count_what_autograd_keeps_per_bag(monkeypatch):
    """TransMIL's Nystrom iterations keep a fixed amount per bag for the backward, whatever its size, so
    IG on small bags ran all 50 steps in one forward (3 GB at 100 patches, 1 GB at 5000). Steps per
    forward now also divide the budget by the bytes autograd keeps for one bag."""
    import tub_xmil.explain as ex
    from tub_xmil.transmil import TransMIL

    torch.manual_seed(0)
    m = TransMIL(input_dim=24, head_dim=2, n_feat=32).eval()
    x = torch.randn(40, 24)
    per_bag = ex.saved_bytes_per_bag(m, x, target=1)
    # a linear layer keeps its input: at least the bag itself and the 32-wide tokens
    assert per_bag >= 40 * (24 + 32) * 4
    # a long bag is extrapolated from two probes; linear models make that exact
    long = torch.randn(300, 24)
    exact = ex.saved_bytes_per_bag(m, long, target=1, probe=512)
    assert abs(ex.saved_bytes_per_bag(m, long, target=1, probe=128) - exact) < 0.1 * exact
    monkeypatch.setattr(ex, "DROP_BUDGET_BYTES", 3 * per_bag)
    calls = []
    handle = m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    ex.integrated_gradients(m, x[None], target=1, n_steps=12)
    handle.remove()
    assert calls[0] == 1 and max(calls[1:]) == 3 and sum(calls[1:]) == 12  # the probe, then 3 steps a forward
