"""SpookyNet's further reference options: ssp activation, the other radial bases, exp_weighting,
Cartesian d functions (use_irreps=False) and the nonlinear charge/spin embedding.

Each basis and the activation are checked against their closed forms (computed here with numpy),
forces against finite differences of the energy for a random-weight model with each option, and
tub's own save/load round trip. Parity with the reference code itself is measured outside CI
(plugin README, "Measured")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tub_mlff.checkpoints import CheckpointError, load_model, load_reference, save_model
from tub_mlff.layers import ResidualMLP, ShiftedSoftplus, parallel_residual_mlps
from tub_mlff.properties import compute
from tub_mlff.spookynet import SpookyNet, SpookyNetConfig, radial_basis

RC = 5.0
K = 8
ALPHA = 0.9448630629184640  # the exponential bases' initial alpha (0.5 / bohr)
R = np.array([0.4, 1.3, 2.7, 4.1, 4.9])

OPTIONS = [
    dict(activation="ssp"),
    dict(basis_functions="exp-gaussian"),
    dict(basis_functions="exp-gaussian", exp_weighting=False),
    dict(basis_functions="exp-bernstein", exp_weighting=False),
    dict(basis_functions="bernstein"),
    dict(basis_functions="gaussian"),
    dict(basis_functions="sinc"),
    dict(use_irreps=False),
    dict(use_nonlinear_embedding=True),
    dict(activation="ssp", basis_functions="gaussian", use_irreps=False, use_nonlinear_embedding=True),
]


def _fc(r):
    return np.where(r < RC, np.exp(-r ** 2 / ((RC - r) * (RC + r))), 0.0)


def _closed_form(name: str, r: np.ndarray, exp_weighting: bool = True) -> np.ndarray:
    r = r[:, None]
    k = np.arange(K)[None, :]
    binom = np.array([math.comb(K - 1, v) for v in range(K)])[None, :]
    y = np.exp(-ALPHA * r)
    if name == "exp-bernstein":
        g = binom * y ** (K - 1 - k) * (1 - y) ** k * (y if exp_weighting else 1.0)
    elif name == "exp-gaussian":
        g = np.exp(-K * (y - (1 - k / (K - 1))) ** 2) * (y if exp_weighting else 1.0)
    elif name == "bernstein":
        x = r / RC
        g = binom * x ** (K - 1 - k) * (1 - x) ** k
    elif name == "gaussian":
        g = np.exp(-(K / RC) * (r - k * RC / (K - 1)) ** 2)
    elif name == "sinc":
        t = np.pi * (k + 1) * r / RC
        g = np.sin(t) / t
    return g * _fc(r)


def _basis(name, exp_weighting=True):
    cfg = SpookyNetConfig(num_basis_functions=K, cutoff=RC, basis_functions=name, exp_weighting=exp_weighting)
    return radial_basis(cfg).double()


@pytest.mark.parametrize("name,exp_weighting", [("exp-bernstein", True), ("exp-bernstein", False),
                                                ("exp-gaussian", True), ("exp-gaussian", False),
                                                ("bernstein", True), ("gaussian", True), ("sinc", True)])
def test_basis_functions_match_their_closed_forms(name, exp_weighting):
    r = torch.tensor(R)
    fc = torch.tensor(_fc(R))
    got = _basis(name, exp_weighting)(r, fc).detach().numpy()
    np.testing.assert_allclose(got, _closed_form(name, R, exp_weighting), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ["exp-bernstein", "exp-gaussian", "bernstein", "gaussian", "sinc"])
def test_basis_times_cutoff_goes_smoothly_to_zero_at_the_cutoff(name):
    from tub_mlff.layers import cutoff_function

    r = torch.tensor([RC - 0.05, RC - 1e-2, RC - 1e-4], dtype=torch.float64, requires_grad=True)
    g = _basis(name)(r, cutoff_function(r, RC))
    (grad,) = torch.autograd.grad(g.sum(), r)
    assert torch.isfinite(g).all() and torch.isfinite(grad).all()
    assert g[1:].abs().max() < 1e-100 and grad[1:].abs().max() < 1e-90  # f_c(rc - 0.01) = e^-250
    mx = g.abs().max(dim=1).values
    assert 0 < mx[0] < 1e-15 and (mx[1:] <= mx[:-1]).all()  # decreasing towards the cutoff


def test_shifted_softplus_matches_its_formula_and_has_finite_gradients_at_beta_zero():
    torch.manual_seed(0)
    act = ShiftedSoftplus(6).double()
    with torch.no_grad():
        act.alpha.copy_(torch.tensor([1.0, 0.7, 1.3, 2.0, 0.5, 1.1]))
        act.beta.copy_(torch.tensor([1.0, 0.3, 2.5, 0.0, -0.8, 5.0]))
    x = torch.linspace(-4, 4, 9, dtype=torch.float64).unsqueeze(-1).expand(9, 6).contiguous()
    xn, a, b = x.numpy(), act.alpha.detach().numpy(), act.beta.detach().numpy()
    b_safe = np.where(b != 0, b, 1.0)
    want = a * np.where(b != 0, (np.logaddexp(0.0, b_safe * xn) - np.log(2.0)) / b_safe, 0.5 * xn)
    np.testing.assert_allclose(act(x).detach().numpy(), want, rtol=1e-13, atol=1e-15)
    assert act(torch.zeros(1, 6, dtype=torch.float64)).abs().max() == 0.0  # shifted: f(0) = 0
    xg = x.clone().requires_grad_(True)
    act(xg).sum().backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(act.beta.grad).all()


def test_batched_residual_mlps_equal_one_by_one_with_ssp():
    torch.manual_seed(1)
    mlps = [ResidualMLP(8, activation="ssp").double() for _ in range(3)]
    with torch.no_grad():
        for m in mlps:
            for p in m.parameters():
                p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(5, 8, dtype=torch.float64)
    for a, b in zip(parallel_residual_mlps(mlps, x), [m(x) for m in mlps]):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def _random_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = SpookyNetConfig(num_features=16, num_basis_functions=K, num_modules=2, use_d4_dispersion=False, **kw)
    model = SpookyNet(cfg, seed=seed).double()
    with torch.no_grad():  # away from the zero initialisation so every path matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _batch():
    """Two molecules (C2H3NO cation doublet, CH2 singlet) in one batch."""
    rng = np.random.default_rng(4)
    pos = np.vstack([rng.normal(scale=1.1, size=(6, 3)),
                     [(0.0, 0.0, 20.0), (-0.865, -0.584, 20.0), (0.865, -0.584, 20.3)]])
    seg = [0] * 6 + [1] * 3
    ii, jj = [], []
    for i in range(9):
        for j in range(9):
            if i != j and seg[i] == seg[j]:
                ii.append(i)
                jj.append(j)
    return dict(Z=torch.tensor([6, 6, 1, 1, 7, 8, 6, 1, 1]), Q=torch.tensor([1.0, 0.0], dtype=torch.float64),
                S=torch.tensor([1.0, 0.0], dtype=torch.float64), R=torch.tensor(pos), idx_i=torch.tensor(ii),
                idx_j=torch.tensor(jj), batch_seg=torch.tensor(seg), num_batch=2)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_forces_are_minus_the_energy_gradient(opts):
    model = _random_model(**opts)
    b = _batch()
    forces = compute(model, b)["forces"].detach().numpy()
    h = 1e-5
    for atom, axis in [(0, 0), (2, 1), (4, 2), (5, 0), (7, 1), (8, 2)]:
        e = []
        for sign in (1, -1):
            R = b["R"].clone()
            R[atom, axis] += sign * h
            e.append(compute(model, {**b, "R": R}, forces=False)["energy"].sum().item())
        fd = -(e[0] - e[1]) / (2 * h)
        assert abs(fd - forces[atom, axis]) < 1e-6 * max(1.0, abs(fd)), (atom, axis, fd, forces[atom, axis])


def test_options_change_the_model_and_unknown_ones_are_refused():
    b = _batch()
    e = {str(o): compute(_random_model(**o), b, forces=False)["energy"].sum().item() for o in [{}] + OPTIONS}
    assert len({round(v, 9) for v in e.values()}) == len(e)
    with pytest.raises(ValueError, match="basis_functions"):
        SpookyNet(SpookyNetConfig(basis_functions="fourier"))
    with pytest.raises(ValueError, match="activation"):
        SpookyNet(SpookyNetConfig(activation="relu"))


def test_save_load_round_trip_keeps_the_options(tmp_path):
    opts = dict(activation="ssp", basis_functions="exp-gaussian", exp_weighting=False, use_irreps=False,
                use_nonlinear_embedding=True)
    model = _random_model(**opts)
    save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    assert {k: meta["spookynet"][k] for k in opts} == opts
    again, _ = load_model(tmp_path / "m.safetensors", torch.float64)
    assert again.config == model.config
    b = _batch()
    out, ref = compute(again, b), compute(model, b)
    assert torch.equal(out["energy"], ref["energy"]) and torch.equal(out["forces"], ref["forces"])


def test_old_model_json_without_the_option_keys_loads_with_the_defaults(tmp_path):
    model = _random_model()
    save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    for key in ("activation", "basis_functions", "exp_weighting", "use_irreps", "use_nonlinear_embedding"):
        del meta["spookynet"][key]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    again, _ = load_model(tmp_path / "m.safetensors", torch.float64)
    assert again.config == SpookyNetConfig.from_dict(model.config.to_dict())
    b = _batch()
    assert torch.equal(compute(again, b)["energy"], compute(model, b)["energy"])


def test_reference_files_name_an_unsupported_option_in_one_line(tmp_path):
    path = tmp_path / "parameters.pth"
    torch.save({"state_dict": {}, "activation": "relu"}, path)
    with pytest.raises(CheckpointError, match="activation='relu' is not supported") as exc:
        load_reference(path)
    assert "\n" not in str(exc.value)
    torch.save({"state_dict": {}, "basis_functions": "fourier"}, path)
    with pytest.raises(CheckpointError, match="basis_functions='fourier' is not supported"):
        load_reference(path)


def test_reference_file_without_the_switches_means_the_old_architecture(tmp_path):
    """The reference reads a file without use_irreps / use_nonlinear_embedding as the older model
    (Cartesian d functions, nonlinear embedding); tub builds the same, as the parameters it asks
    for show."""
    path = tmp_path / "parameters.pth"
    torch.save({"state_dict": {}, "num_features": 8, "num_modules": 1, "use_d4_dispersion": False}, path)
    with pytest.raises(CheckpointError, match="charge_embedding.key.bias"):
        load_reference(path)
