"""GNN-LRP relevant walks (tub_mlff.relevant_walks): exact bookkeeping, walk semantics, physics."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read, write
from tubcli.testing import expect_ok, expect_one_line_error, invoke

from tub_mlff.calculator import SpookyNetCalculator
from tub_mlff.checkpoints import load_model
from tub_mlff.cli import DEMO_MODEL
from tub_mlff.properties import compute
from tub_mlff.relevant_walks import WalkExplainer, _module, walk_relevances
from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
from tub_mlff.structures import spin_for


def _trained_like(modules=2, seed=0, activation="swish"):
    """Every weight non-zero (fresh models have zero-initialised layers that would hide leaks)."""
    torch.manual_seed(seed)
    cfg = SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=modules, use_d4_dispersion=False,
                          activation=activation)
    model = SpookyNet(cfg, seed=seed).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("activation", ["swish", "ssp"])
def test_walks_plus_biases_plus_references_are_the_network_energy(cell, activation):
    """Euler's theorem for the frozen-gate network: exact in float64, in a charged periodic cell
    (also for a reference model with shifted-softplus activations, gate sigma(h)/h)."""
    model = _trained_like(modules=3, activation=activation)
    batch = SpookyNetCalculator(model, charge=1.0, spin=spin_for(cell, 1) + 2, dtype=torch.float64).batch_for(cell)
    ex = WalkExplainer(model, batch)
    e_nn = float(compute(model, batch, forces=False)["e_nn"].detach().sum())
    assert ex.e_nn == pytest.approx(e_nn, abs=1e-12)
    total = ex.sets([tuple(range(ex.n))])[0]
    assert abs(total) > 1e-2 and abs(ex.bias) > 1e-2  # neither part is trivially zero
    assert total + ex.bias + ex.reference == pytest.approx(e_nn, abs=1e-9)


def _walk_by_forward_masks(model, batch, ex, walk):
    """Relevance of one walk, independently: masks in the forward pass (h -> m*h + (1-m)*h.detach())."""
    layout, seg = ex.layout, ex.batch_seg
    h0 = ex.states[0].detach().clone().requires_grad_(True)
    h = h0
    for t, mod in enumerate(model.interactions):
        keep = torch.zeros(ex.n, 1, dtype=h.dtype)
        keep[walk[t]] = 1.0
        h = keep * h + (1 - keep) * h.detach()
        h = _module(mod, h, layout, seg)
    last = torch.zeros(ex.n, 1, dtype=h.dtype)
    last[walk[-1]] = 1.0
    h = last * h + (1 - last) * h.detach()
    nf = h.shape[1] // 2
    energy = (model.readout(h[:, nf:])[:, 0]).sum()
    (g,) = torch.autograd.grad(energy, h0)
    return float((g * h0).detach()[walk[0]].sum())


def test_n_body_terms_equal_sums_over_explicit_walks():
    """Every walk of a 4-atom molecule through a 2-module model, one at a time; grouped by the set of
    atoms they visit, they give the 1-, 2- and 3-body terms of the inclusion-exclusion."""
    model = _trained_like(modules=2, seed=1)
    atoms = molecule("CH3")  # 4 atoms, 64 walks of 3 atoms
    batch = SpookyNetCalculator(model, spin=1.0, dtype=torch.float64).batch_for(atoms)
    res = walk_relevances(model, batch, atoms.get_all_distances(), order=3, radius=10.0)
    ex = WalkExplainer(model, batch)
    groups: dict[tuple, float] = {}
    for walk in itertools.product(range(4), repeat=3):
        key = tuple(sorted(set(walk)))
        groups[key] = groups.get(key, 0.0) + _walk_by_forward_masks(model, batch, ex, walk)
    assert sum(groups.values()) == pytest.approx(res.walks_total, abs=1e-10)
    for i in range(4):
        assert res.one_body[i] == pytest.approx(groups[(i,)], abs=1e-10)
    for i, j in itertools.combinations(range(4), 2):
        assert res.two_body[i, j] == pytest.approx(groups[(i, j)], abs=1e-10)
        assert res.two_body[j, i] == res.two_body[i, j]
    assert len(res.triples) == 4
    for (i, j, k), v in zip(res.triples, res.three_body):
        assert v == pytest.approx(groups[(i, j, k)], abs=1e-10)
    assert abs(res.higher_order) < 1e-10  # three-atom walks have no 4-body part
    assert np.abs(res.three_body).max() > 1e-4


def test_no_walk_joins_atoms_that_exchange_no_messages():
    """Without attention values, relevance moves only between atoms within the cutoff: two
    molecules 20 A apart share no 2-body term, and the terms within each molecule are non-zero."""
    model = _trained_like(modules=2, seed=2)
    with torch.no_grad():
        for mod in model.interactions:
            mod.nonlocal_.mlp_v.lin.weight.zero_()
            mod.nonlocal_.mlp_v.lin.bias.zero_()
    a = molecule("H2O")
    b = molecule("NH3")
    b.translate([20.0, 0, 0])
    atoms = a + b
    batch = SpookyNetCalculator(model, dtype=torch.float64).batch_for(atoms)
    res = walk_relevances(model, batch)
    across = res.two_body[:3, 3:]
    assert np.abs(across).max() < 1e-12  # inclusion-exclusion round-off only
    assert np.abs(res.two_body[:3, :3]).max() > 1e-3 and np.abs(res.two_body[3:, 3:]).max() > 1e-3
    # with the attention values back, the two molecules do interact through walks
    model2 = _trained_like(modules=2, seed=2)
    res2 = walk_relevances(model2, SpookyNetCalculator(model2, dtype=torch.float64).batch_for(atoms))
    assert np.abs(res2.two_body[:3, 3:]).max() > 1e-6


def test_shipped_model_binds_through_covalent_pairs(cell):
    """The demo model's strongest 2-body terms are the covalent bonds (negative: binding) and the
    terms fade with distance."""
    model, _ = load_model(DEMO_MODEL)
    model.eval()
    atoms = cell.copy()
    batch = SpookyNetCalculator(model, spin=spin_for(atoms)).batch_for(atoms)
    d = atoms.get_all_distances(mic=True)
    res = walk_relevances(model, batch, d, order=2)
    iu = np.triu_indices(len(atoms), 1)
    r, dist = res.two_body[iu], d[iu]
    bonded, far = r[dist < 1.6], r[dist > 4.0]
    assert bonded.mean() < -0.5
    assert np.abs(bonded).mean() > 20 * np.abs(far).mean()
    assert res.walks_total + res.bias + res.reference == pytest.approx(res.e_nn, abs=1e-3)


def test_explain_cli_writes_walks(tmp_path, cell):
    path = tmp_path / "cell.extxyz"
    write(path, cell)
    r = expect_ok(invoke(["mlff", "explain", path, "--walks", "3", "--walk-radius", "2.6", "--set", "attention=false",
                          "-o", tmp_path / "ex", "--json"]))
    w = json.loads(r.stdout)["walks"]["0"]
    parts = ["element_reference_eV", "bias_eV", "one_body_eV", "two_body_eV", "three_body_eV", "higher_order_eV"]
    assert sum(w[k] for k in parts) == pytest.approx(w["e_nn_eV"], abs=1e-3)
    assert w["triples"] > 0
    assert sum(w["two_body_by_elements_eV"].values()) == pytest.approx(w["two_body_eV"], abs=1e-4)
    z = np.load(tmp_path / "ex" / "outputs" / "walks_0000.npz")
    assert np.allclose(z["two_body"], z["two_body"].T)
    assert (z["distances"][tuple(z["triples"][:, [0, 1]].T)] < 2.6).all()
    frame = read(tmp_path / "ex" / "outputs" / "explained.extxyz")
    assert np.allclose(frame.arrays["mlff_walk_1body"], z["one_body"])
    assert "walks" in expect_one_line_error(invoke(["mlff", "explain", path, "--walks", "4", "-o", tmp_path / "bad"]))


def test_committee_explain_gives_the_members_mean_walks_and_attention(tmp_path, cell):
    """A committee's walks are the members' mean (linear in the output, so still exact for the
    committee's mean e_nn); its attention file holds each member's maps and their mean."""
    from tub_mlff.checkpoints import save_model

    models = [_trained_like(modules=2, seed=s) for s in (0, 1)]
    for s, m in enumerate(models):
        save_model(m.float(), tmp_path / f"m{s}", extra={"elements": [1, 6, 7, 11]})
    path = tmp_path / "cell.extxyz"
    write(path, cell)
    args = ["mlff", "explain", path, "--walks", "2", "--precision", "fp64", "--json"]
    one = [json.loads(expect_ok(invoke(args + ["--model", tmp_path / f"m{s}.safetensors", "-o", tmp_path / f"x{s}"]))
                      .stdout)["walks"]["0"] for s in (0, 1)]
    both = json.loads(expect_ok(invoke(args + ["--model", tmp_path / "m0.safetensors", "--model",
                                               tmp_path / "m1.safetensors", "-o", tmp_path / "x"])).stdout)["walks"]["0"]
    assert abs(one[0]["e_nn_eV"] - one[1]["e_nn_eV"]) > 1e-2  # the members differ
    for key in ("e_nn_eV", "bias_eV", "one_body_eV", "two_body_eV"):
        assert both[key] == pytest.approx((one[0][key] + one[1][key]) / 2, abs=1e-9)
    parts = ["element_reference_eV", "bias_eV", "one_body_eV", "two_body_eV", "higher_order_eV"]
    assert sum(both[k] for k in parts) == pytest.approx(both["e_nn_eV"], abs=1e-6)
    with np.load(tmp_path / "x" / "outputs" / "attention_0000.npz") as z, \
            np.load(tmp_path / "x1" / "outputs" / "attention_0000.npz") as z1:
        assert sorted(z.files) == ["member_0_module_1", "member_0_module_2", "member_1_module_1",
                                   "member_1_module_2", "module_1", "module_2"]
        assert np.allclose(z["member_1_module_2"], z1["module_2"])
        assert np.allclose(z["module_1"], (z["member_0_module_1"] + z["member_1_module_1"]) / 2)
        assert np.allclose(z["module_1"].sum(1), 1.0)
