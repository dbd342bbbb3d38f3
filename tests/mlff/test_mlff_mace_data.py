"""Training data as MACE and NequIP users write it: REF_* keys, virials, isolated-atom E0s, spin in unpaired
electrons, and an EMA that warms up. Tiny EMT-labelled Cu/Au cells, one-module models, an epoch or two."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from tubcli.errors import TubError
from tubcli.testing import expect_ok as _ok, expect_one_line_error as _err, invoke

from tub_mlff.data import Keys, labels, to_graph

ISOLATED = {"Cu": 3.51, "Au": 3.80}  # EMT's energies of the lone atoms (eV)
TINY = ["--set", "model.num_features=8", "--set", "model.num_basis_functions=4", "--set", "model.num_modules=1",
        "--set", "model.electrostatics=false", "--batch-size", "4"]


def _cell(k: int) -> Atoms:
    rng = np.random.default_rng(k)
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a[int(rng.integers(4))].symbol = "Au"
    a.set_cell(a.cell * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
    a.rattle(0.05, seed=k)
    a.calc = EMT()
    e, f, stress = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
    a.calc = None
    a.info.update(REF_energy=e, REF_virial=(-stress * a.get_volume()).ravel(), config_type="bulk")
    a.arrays["REF_forces"] = f
    return a


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mace")
    frames = [_cell(k) for k in range(12)]
    for symbol, energy in ISOLATED.items():  # MACE's isolated atoms: no forces, no cell
        frames.append(Atoms(symbol, info={"REF_energy": energy, "config_type": "IsolatedAtom"}))
    write(d / "train.extxyz", frames, format="extxyz")
    return d


def test_the_ema_warms_up_as_torch_ema_does():
    """Update n uses min(decay, (1 + n) / (10 + n)): a short run does not save mostly its random start."""
    from tub_mlff.training import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, 0.99)
    expected = 0.0
    for n in range(200):
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema.update(model)
        decay = min(0.99, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * 1.0
        assert ema.shadow["weight"].item() == pytest.approx(expected, abs=1e-6)
    assert ema.updates == 200 and ema.shadow["weight"].item() > 0.8  # a fixed 0.99 would give 1 - 0.99**200 = 0.87
    assert EMA(model, 0.99).shadow["weight"].item() == 1.0


def test_a_virial_is_read_as_the_stress_it_is():
    a = _cell(0)
    a.calc = EMT()
    stress = a.get_stress(voigt=False)
    a.calc = None
    keys = Keys(energy="REF_energy", forces="REF_forces", virial="REF_virial")
    _, _, s, _, _ = labels(a, keys)
    np.testing.assert_allclose(s, stress, atol=1e-12)  # sigma = -W / V, ASE's sign
    w = a.info["REF_virial"].reshape(3, 3)
    a.info["REF_virial"] = w[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # Voigt order xx yy zz yz xz xy
    np.testing.assert_allclose(labels(a, keys)[2], stress, atol=1e-12)
    a.info["REF_virial"] = w.ravel()[:5]
    with pytest.raises(TubError, match="virial under 'REF_virial' must have 6 or 9 numbers"):
        labels(a, keys)


def test_a_spin_given_as_multiplicity_is_refused_with_the_reason():
    a = _cell(1)
    a.info["total_spin"] = 1  # a multiplicity (2S + 1) for these even-electron cells
    with pytest.raises(TubError, match=r"spin 1 \(unpaired electrons\) is impossible.*not the multiplicity"):
        labels(a, Keys(energy="REF_energy", forces="REF_forces", spin="total_spin"))


def test_a_lone_atom_needs_no_forces():
    g = to_graph(Atoms("Cu", info={"REF_energy": 3.51}), 5.0, Keys(energy="REF_energy", forces="REF_forces"))
    assert g.energy == 3.51 and g.forces.tolist() == [[0.0, 0.0, 0.0]]


def test_isolated_atom_energies_set_the_element_bias_exactly():
    """--e0s: the initial model gives each isolated atom exactly its E0 (physical terms included)."""
    from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
    from tub_mlff.training import init_element_bias

    keys = Keys(energy="REF_energy")
    bulk_graphs = [to_graph(_cell(k), 5.0, Keys(energy="REF_energy", forces="REF_forces")) for k in range(3)]
    isolated = [to_graph(Atoms(s, info={"REF_energy": e}), 5.0, keys) for s, e in ISOLATED.items()]
    model = SpookyNet(SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=1,
                                      use_d4_dispersion=False), seed=0).double()
    init_element_bias(model, bulk_graphs, torch.float64, isolated=isolated)
    model.eval()
    for g, energy in zip(isolated, ISOLATED.values()):
        out = model(torch.tensor(g.Z), torch.tensor([0.0], dtype=torch.float64), torch.tensor([g.S], dtype=torch.float64),
                    torch.tensor(g.R), torch.tensor(g.idx_i), torch.tensor(g.idx_j))
        assert out["energy"].item() == pytest.approx(energy, abs=1e-10)


def test_train_takes_isolated_atoms_as_e0s_and_never_validates_on_them(data, tmp_path):
    out = tmp_path / "iso"
    res = _ok(invoke(["mlff", "train", data / "train.extxyz", "--energy-key", "REF_energy", "--forces-key",
                      "REF_forces", "--virials-key", "REF_virial", "--set", "stress_weight=1", "--epochs", "1",
                      *TINY, "--set", "valid_fraction=0.25", "--set", "test_fraction=0.25", "-o", out, "--json"]))
    log = (out / "tub.log").read_text()
    assert "E0s (isolated-atom frames): Cu=3.51 eV, Au=3.8 eV" in log
    import json

    m = json.loads(res.stdout)
    assert m["train_frames"] == 6 + 2 and m["valid_frames"] + m["test_frames"] == 6  # both lone atoms train
    assert "stress_mae_meV_A3" in m["test"]  # the virials became stress labels
    assert m["valid"]["frames"] == m["valid_frames"] and m["valid"]["forces_mae_meV_A"] > 0  # the saved model's


def test_e0s_given_or_missing_and_stress_in_the_wrong_units(data, tmp_path):
    common = ["mlff", "train", data / "train.extxyz", "--energy-key", "REF_energy", "--forces-key", "REF_forces",
              "--epochs", "1", *TINY]
    line = _err(invoke([*common, "--e0s", "Cu=3.5", "-q", "-o", tmp_path / "a"]))
    assert "no isolated-atom energy for Au" in line
    assert "not an element" in _err(invoke([*common, "--e0s", "Qq=1,Cu=3", "-o", tmp_path / "b"]))
    (tmp_path / "e0.yaml").write_text("e0s: {Cu: -1e-3}\n")  # YAML 1.1 reads -1e-3 as text; it is a number
    assert "Cu: -0.001" in invoke(["mlff", "train", "-c", tmp_path / "e0.yaml", "--print-config"]).stdout
    res = _ok(invoke([*common, "--e0s", "{29: 3.5, 79: 3.9}", "--set", "valid_fraction=0.25",
                      "--set", "test_fraction=0.25", "-o", tmp_path / "c", "--json"]))
    log = (tmp_path / "c" / "tub.log").read_text()
    assert "E0s (given): Cu=3.5 eV, Au=3.9 eV" in log and "the 2 IsolatedAtom frames" in log
    import json

    m = json.loads(res.stdout)  # the file's isolated atoms left out; the given E0s' atoms train
    assert m["train_frames"] == 6 + 2 and m["valid_frames"] + m["test_frames"] == 6
    # a virial (eV) given as the stress: 100x too large, which the warning names
    res = _ok(invoke([*common, "--stress-key", "REF_virial", "--set", "stress_weight=1", "-o", tmp_path / "d"]))
    assert "a stress label reaches" in res.stderr and "--virials-key" in res.stderr


def test_evaluate_reports_each_config_type(data, tmp_path):
    import json

    frames = [_cell(k) for k in range(20, 24)]
    for a in frames[2:]:
        a.info["config_type"] = "hot"
    write(tmp_path / "test.extxyz", frames, format="extxyz")
    model = tmp_path / "m"
    _ok(invoke(["mlff", "train", data / "train.extxyz", "--energy-key", "REF_energy", "--forces-key", "REF_forces",
                "--epochs", "1", *TINY, "-o", model]))
    res = _ok(invoke(["mlff", "evaluate", tmp_path / "test.extxyz", "--model", model, "--energy-key", "REF_energy",
                      "--forces-key", "REF_forces", "--set", "plots=false", "-o", tmp_path / "ev", "--json"]))
    m = json.loads(res.stdout)
    by = m["by_config_type"]
    assert sorted(by) == ["bulk", "hot"] and by["bulk"]["frames"] == by["hot"]["frames"] == 2
    pooled = (by["bulk"]["energy_mae_meV_atom"] + by["hot"]["energy_mae_meV_atom"]) / 2  # equal frames and sizes
    assert m["energy_mae_meV_atom"] == pytest.approx(pooled, rel=1e-9)


def test_config_weights_scale_each_frames_terms_of_the_loss():
    """MACE's config_weight / config_*_weight: a frame at weight 0 adds nothing whatever its labels; weight 2
    everywhere doubles the loss."""
    from tub_mlff.data import collate
    from tub_mlff.spookynet import SpookyNet, SpookyNetConfig
    from tub_mlff.training import TrainSettings, batch_loss

    keys = Keys(energy="REF_energy", forces="REF_forces", virial="REF_virial")
    model = SpookyNet(SpookyNetConfig(num_features=8, num_basis_functions=4, num_modules=1, use_electrostatics=False,
                                      use_d4_dispersion=False), seed=0).double()
    s = TrainSettings(stress_weight=1.0)

    def loss(frames):
        graphs = [to_graph(a, 5.0, keys) for a in frames]
        return batch_loss(model, collate(graphs, torch.float64), s, create_graph=False)[0].item()

    a, b = _cell(30), _cell(31)
    b.info["config_weight"] = 0.0
    first = loss([a, b])
    b.info["REF_energy"] += 5.0
    b.arrays["REF_forces"] += 1.0
    b.info["REF_virial"] = b.info["REF_virial"] * 3
    assert loss([a, b]) == pytest.approx(first, rel=1e-12)
    del b.info["config_weight"]
    plain = loss([a, b])
    for frame in (a, b):
        frame.info["config_weight"] = 2.0
    assert loss([a, b]) == pytest.approx(2 * plain, rel=1e-12)
    b.info["config_forces_weight"] = -1
    with pytest.raises(TubError, match="config weights must be finite and >= 0"):
        loss([a, b])


def test_frames_at_weight_zero_neither_shift_the_e0_fit_nor_need_their_labels():
    from tub_mlff.data import element_energies

    keys = Keys(energy="REF_energy", forces="REF_forces")
    good = [to_graph(_cell(k), 5.0, keys) for k in range(40, 46)]
    junk = []
    for k in range(46, 50):
        a = _cell(k)
        a.info.update(REF_energy=1e3, config_energy_weight=0.0, config_forces_weight=0.0)
        del a.arrays["REF_forces"]  # not needed at weight 0
        junk.append(to_graph(a, 5.0, keys))
    assert all(g.forces is not None and not g.forces.any() for g in junk)
    np.testing.assert_allclose(element_energies(good + junk), element_energies(good), atol=1e-9)


def test_a_virial_without_a_3d_cell_is_skipped_like_a_stress():
    a = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], info={"REF_energy": -1.0, "REF_virial": np.ones(9)})
    a.arrays["REF_forces"] = np.zeros((2, 3))
    assert labels(a, Keys(energy="REF_energy", forces="REF_forces", virial="REF_virial"))[2] is None
