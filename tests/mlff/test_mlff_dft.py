"""DFT labels through PySCF and the H-capped clusters they are computed on.

Pins the unit/sign conventions of ``label_pyscf`` (forces = a central finite difference of its own
energies; the H atom's energy in eV), the open-shell handling (UKS, <S^2>), and the cluster carving
of ``tub_mlff.clusters`` (no clashes, full valences, parent mapping, input untouched), plus the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.io import read, write
from ase.neighborlist import neighbor_list
from tubcli.errors import TubError
from tubcli.testing import invoke
from tubcli.testing import expect_ok as _ok, expect_one_line_error as _err

from tub_mlff.clusters import ClusterError, bond_cutoffs, carve_cluster, centres_of
from tub_mlff.structures import add_sodium, janus_graphene

pyscf = pytest.importorskip("pyscf")
from tub_mlff.labelling import label_pyscf  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


# -- label_pyscf -------------------------------------------------------------------------------
def test_forces_are_minus_the_gradient_of_the_energy():
    """F = -dE/dR in eV/A: central differences of label_pyscf's own energies (catches Hartree/Bohr slips)."""
    a = molecule("NH3")
    a.rattle(0.05, seed=3)
    out = label_pyscf(a, "PBE", "sto-3g", conv_tol=1e-11)
    forces = out.arrays["forces"]
    assert out.info["spin"] == 0 and "s_squared" not in out.info  # closed shell: RKS
    h = 1e-3
    for i, c in [(0, 0), (0, 2), (1, 1), (3, 0)]:
        plus, minus = a.copy(), a.copy()
        plus.positions[i, c] += h
        minus.positions[i, c] -= h
        fd = -(label_pyscf(plus, "PBE", "sto-3g", conv_tol=1e-11).info["energy"]
               - label_pyscf(minus, "PBE", "sto-3g", conv_tol=1e-11).info["energy"]) / (2 * h)
        assert abs(fd - forces[i, c]) < 1e-3, (i, c, fd, forces[i, c])
    assert np.abs(forces).max() > 0.5  # rattled: the comparison is not between zeros
    assert abs(out.arrays["ref_charges"].sum()) < 1e-6  # Mulliken charges sum to the total charge
    assert out.arrays["ref_charges"][0] < 0  # N pulls electrons from H
    assert a.calc is None and "forces" not in a.arrays  # the input is not labelled in place


def test_energy_is_in_ev_and_open_shells_run_uks():
    """H atom, UHF/cc-pVTZ: -0.49981 E_h = -13.60 eV; Na atom and NH2 radical: UKS doublets."""
    h = label_pyscf(Atoms("H", positions=[[0, 0, 0]]), "HF", "cc-pvtz")
    assert h.info["spin"] == 1 and abs(h.info["energy"] - (-0.499810 * 27.211386)) < 2e-3
    assert abs(h.info["s_squared"] - 0.75) < 1e-8  # one electron: a pure doublet
    na = label_pyscf(Atoms("Na", positions=[[0, 0, 0]]), "PBE", "sto-3g")
    assert na.info["spin"] == 1 and abs(na.info["s_squared"] - 0.75) < 1e-2
    assert np.abs(na.arrays["forces"]).max() < 1e-6
    nh2 = molecule("NH2")
    out = label_pyscf(nh2, "PBE", "sto-3g")
    assert out.info["spin"] == 1 and abs(out.info["s_squared"] - 0.75) < 0.02
    assert abs(out.arrays["ref_charges"].sum()) < 1e-6
    triplet = nh2.copy()
    triplet.info["spin"] = 3  # quartet NH2: n_alpha - n_beta = 3 is allowed, and higher in energy
    hi = label_pyscf(triplet, "PBE", "sto-3g")
    assert hi.info["spin"] == 3 and hi.info["energy"] > out.info["energy"] + 1.0
    cation = molecule("NH3")
    cation.info["charge"] = 1  # NH3+: 9 electrons, a doublet by parity
    q = label_pyscf(cation, "PBE", "sto-3g")
    assert q.info["spin"] == 1 and abs(q.arrays["ref_charges"].sum() - 1.0) < 1e-6


def test_newton_fallback_reaches_the_same_scf_solution():
    a = molecule("H2O")
    ref = label_pyscf(a, "PBE", "sto-3g", conv_tol=1e-11)
    slow = label_pyscf(a, "PBE", "sto-3g", conv_tol=1e-11, max_cycle=2)
    assert ref.info["scf_solver"] == "diis" and slow.info["scf_solver"] == "newton"
    assert abs(slow.info["energy"] - ref.info["energy"]) < 1e-6
    assert np.abs(slow.arrays["forces"] - ref.arrays["forces"]).max() < 1e-4


def test_bad_dft_inputs_are_one_line_errors():
    bad_spin = molecule("NH3")
    bad_spin.info["spin"] = 1  # 10 electrons cannot have one unpaired
    with pytest.raises(TubError, match="impossible"):
        label_pyscf(bad_spin, "PBE", "sto-3g")
    with pytest.raises(TubError, match="basis"):
        label_pyscf(molecule("H2O"), "PBE", "no-such-basis")
    hi = Atoms("HI", positions=[[0, 0, 0], [0, 0, 1.61]])  # def2 past Kr: made for an ECP, wrong all-electron
    with pytest.raises(TubError, match="effective core potential.*ANO-RCC"):
        label_pyscf(hi, "PBE", "def2-SVP")
    cell = molecule("H2O")
    cell.cell, cell.pbc = [5, 5, 5], True
    with pytest.raises(TubError, match="cluster"):
        label_pyscf(cell, "PBE", "sto-3g")


# -- cluster carving -------------------------------------------------------------------------
def _coordination(atoms):
    cut = bond_cutoffs(atoms.get_chemical_symbols())
    if not cut:
        return np.zeros(len(atoms), int)
    return np.bincount(neighbor_list("i", atoms, cut), minlength=len(atoms))


def _cells():
    for stacking, seed in [("gallery", 0), ("gallery", 3), ("slab", 1)]:
        host = janus_graphene(4, 1, stacking, seed=seed)
        yield add_sodium(host, 3, "random", seed=seed)


@pytest.mark.parametrize("radius", [3.0, 4.5, 6.0])
def test_clusters_have_full_valences_no_clashes_and_map_to_the_parent(radius):
    refused = []
    for cell in _cells():
        before = (cell.positions.copy(), cell.numbers.copy(), dict(cell.info), cell.cell.array.copy())
        parent_coord = _coordination(cell)
        width = min(abs(np.linalg.det(cell.cell)) / np.linalg.norm(np.cross(cell.cell[1], cell.cell[2])),
                    abs(np.linalg.det(cell.cell)) / np.linalg.norm(np.cross(cell.cell[0], cell.cell[2])))
        for c in centres_of(cell, "Na"):
            try:
                cl = carve_cluster(cell, c, radius)
            except ClusterError as exc:  # 3 A around some Na: every C inside is a dangling fragment, or none is
                assert radius == 3.0 and ("would leave the bare ion" in str(exc) or "that atom alone" in str(exc))
                refused.append(c)
                continue
            sym = np.array(cl.get_chemical_symbols())
            d = cl.get_all_distances()
            np.fill_diagonal(d, np.inf)
            assert d.min() > 0.9, (radius, c, d.min())
            assert not cl.pbc.any()
            pi, shift, cap_of = cl.arrays["parent_index"], cl.arrays["parent_shift"], cl.arrays["cap_of"]
            real = pi >= 0
            # every real atom is a periodic image of its parent atom, each image at most once
            np.testing.assert_allclose(cl.positions[real], cell.positions[pi[real]] + shift[real] @ cell.cell.array,
                                       atol=1e-10)
            assert len({(p, tuple(s)) for p, s in zip(pi[real], shift[real])}) == real.sum()
            assert (sym[real] == np.array(cell.get_chemical_symbols())[pi[real]]).all()
            # full valences: every kept C/N/H has its parent's number of covalent neighbours (caps included)
            coord = _coordination(cl)
            covalent = real & np.isin(sym, ["C", "N", "H"])
            np.testing.assert_array_equal(coord[covalent], parent_coord[pi[covalent]])
            # caps: H at the standard X-H length from the atom they saturate, one bond each
            caps = np.nonzero(~real)[0]
            assert (sym[caps] == "H").all() and (cap_of[caps] >= 0).all() and (cap_of[real] == -1).all()
            lengths = np.linalg.norm(cl.positions[caps] - cl.positions[cap_of[caps]], axis=1)
            expect = np.where(sym[cap_of[caps]] == "N", 1.01, 1.09)
            np.testing.assert_allclose(lengths, expect, atol=1e-12)
            assert (coord[caps] == 1).all()
            # Na: kept exactly when inside the sphere (all images), dropped otherwise
            na_in = sum(int(np.sum(np.linalg.norm(cell.positions[k] + np.array(s) @ cell.cell.array
                                                  - cell.positions[c]) <= radius))
                        for k in centres_of(cell, "Na")
                        for s in np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij"), -1).reshape(-1, 3))
            assert (sym == "Na").sum() == na_in
            assert pi[cl.arrays["in_sphere"]].size and c in pi[(sym == "Na")]
            # spin: the lowest allowed by the cluster's own electron count
            assert cl.info["spin"] == int(cl.numbers.sum()) % 2 and cl.info["cluster_center"] == c
            if radius < width / 2:  # one image per atom: the cluster is the minimum-image neighbourhood
                assert len(set(pi[real])) == real.sum()
                mic = cell.positions[pi[real]] - cell.positions[c]
                frac = np.linalg.solve(cell.cell.array.T, mic.T).T
                mic = (frac - np.round(frac)) @ cell.cell.array
                np.testing.assert_allclose(cl.positions[real] - cell.positions[c], mic, atol=1e-10)
        after = (cell.positions, cell.numbers, cell.info, cell.cell.array)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
        assert before[2].keys() == after[2].keys() and np.array_equal(before[3], after[3])
    assert (len(refused) >= 2) if radius == 3.0 else not refused  # of 9 Na; a bare Na was labelled before
    if radius == 3.0:  # nothing but the centre within the radius: refused too
        with pytest.raises(ClusterError, match="that atom alone"):
            carve_cluster(cell, centres_of(cell, "Na")[0], 2.0)


def test_cluster_beyond_half_the_cell_takes_several_images():
    cell = add_sodium(janus_graphene(4, 1, "gallery", seed=0), 1, "ring", seed=0)
    cl = carve_cluster(cell, len(cell) - 1, 7.0)  # 7 A > half of the 8.5 A in-plane width
    pi = cl.arrays["parent_index"]
    assert np.bincount(pi[pi >= 0]).max() >= 2  # some parent atoms appear as two images


def test_cluster_rules_on_the_aminophenyl_group():
    cell = janus_graphene(4, 1, "slab", seed=0)
    n_index = cell.get_chemical_symbols().index("N")
    # only the N inside: its own two H follow it, the cut N-C bond is capped -> NH3
    nh3 = carve_cluster(cell, n_index, 1.2)
    assert nh3.get_chemical_formula() == "H3N" and nh3.info["cluster_caps"] == 1
    # N and the para C inside: the C would need two caps and keep one bond -> pruned, NH3 again
    assert carve_cluster(cell, n_index, 1.5).get_chemical_formula() == "H3N"
    # the whole ring lies within 4.3 A of N: C6H4 ring + NH2, the ipso-anchor bond capped
    ring = carve_cluster(cell, n_index, 4.3)
    assert ring.get_chemical_formula() == "C6H7N" and ring.info["cluster_caps"] == 1
    with pytest.raises(ClusterError, match="out of range"):
        carve_cluster(cell, len(cell), 3.0)
    with pytest.raises(ClusterError, match="neither"):
        centres_of(cell, "Xx")


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_labels_clusters_carved_from_periodic_cells(tmp_path):
    host = janus_graphene(4, 1, "gallery", seed=0)
    cells = [host, add_sodium(host, 1, "ring", seed=0)]
    path = tmp_path / "cells.extxyz"
    write(path, cells, format="extxyz")
    original = path.read_bytes()
    out = tmp_path / "nh3"
    r = _ok(invoke(["mlff", "label", path, "--set", "method=dft", "--set", "basis=sto-3g", "--cluster-center", "N",
                    "--cluster-radius", "1.2", "-o", out, "--json"]))
    res = json.loads(r.stdout)
    assert res["clusters"] == 2 and res["labelled_total"] == 2 and res["xc_basis"] == "PBE/sto-3g"
    frames = read(out / "labelled.extxyz", ":")
    n_index = host.get_chemical_symbols().index("N")
    for k, a in enumerate(frames):
        assert a.get_chemical_formula() == "H3N" and not a.pbc.any()
        assert a.info["parent_frame"] == k and a.info["label_method"] == "PBE/sto-3g"
        assert a.info["label_settings"].startswith("pyscf ") and "conv_tol=1e-09 grid_level=3" in a.info["label_settings"]
        pi = a.arrays["parent_index"]
        assert sorted(pi) == [-1, n_index, n_index + 1, n_index + 2]
        np.testing.assert_allclose(a.positions[pi >= 0], cells[k].positions[pi[pi >= 0]], atol=1e-6)
        assert np.abs(a.get_forces().sum(0)).max() < 0.05  # free cluster: (almost) no net force
        assert a.get_potential_energy() < -1400  # NH3 at PBE/sto-3g: -55.7 E_h
    assert path.read_bytes() == original
    r = _ok(invoke(["mlff", "label", path, "--set", "method=dft", "--set", "basis=sto-3g", "--cluster-center", "N",
                    "--cluster-radius", "1.2", "-o", out, "--json"]))
    assert json.loads(r.stdout)["labelled_now"] == 0  # skip-existing

    # one cluster per Na; the bare host has none (a warning, not an error); a radius with no other atom inside
    # would make the Na alone its "cluster": that item fails (it was labelled as the Na's environment)
    r = invoke(["mlff", "label", path, "--set", "method=dft", "--set", "basis=sto-3g",
                "--cluster-radius", "2.0", "-o", tmp_path / "na", "--json"])
    assert r.exit_code == 1 and "that atom alone" in (tmp_path / "na" / "failures.jsonl").read_text()
    assert json.loads(r.stdout)["frames_without_center"] == 1
    lone = tmp_path / "lone.extxyz"  # a Na atom given as a structure of its own is a UKS doublet
    write(lone, Atoms("Na", positions=[[0, 0, 0]]), format="extxyz")
    _ok(invoke(["mlff", "label", lone, "--set", "method=dft", "--set", "basis=sto-3g", "-o", tmp_path / "na1"]))
    na = read(tmp_path / "na1" / "labelled.extxyz")
    assert na.get_chemical_formula() == "Na" and na.info["spin"] == 1 and na.info["s_squared"] > 0.74

    assert "--cluster-radius" in _err(invoke(["mlff", "label", path, "--set", "method=dft", "-o", tmp_path / "e1"]))
    assert "method=dft" in _err(invoke(["mlff", "label", path, "--cluster-radius", "3", "-o", tmp_path / "e2"]))
    assert "neither" in _err(invoke(["mlff", "label", path, "--set", "method=dft", "--cluster-radius", "3",
                                     "--cluster-center", "Xx", "-o", tmp_path / "e3"]))
    assert "out of range" in _err(invoke(["mlff", "label", path, "--set", "method=dft", "--cluster-radius", "3",
                                          "--cluster-center", "999", "-o", tmp_path / "e4"]))
    assert "no cluster centre" in _err(invoke(["mlff", "label", path, "--set", "method=dft", "--cluster-radius", "3",
                                               "--cluster-center", "Li", "-o", tmp_path / "e5"]))
    assert "no basis 'nonsense'" in _err(invoke(["mlff", "label", path, "--set", "method=dft", "--cluster-radius", "3",
                                                 "--set", "basis=nonsense", "-o", tmp_path / "e6"]))
    assert "functional" in _err(invoke(["mlff", "label", path, "--set", "method=dft", "--cluster-radius", "3",
                                        "--set", "xc=NOPE", "-o", tmp_path / "e7"]))
    assert path.read_bytes() == original


def test_spin_comes_from_info_then_from_ase_initial_magnetic_moments():
    """O2 from ase.build carries moments 1, 1: a triplet (labelled a closed-shell singlet, 1.7 eV too high, before)."""
    from tub_mlff.labelling import _charge_spin

    o2 = molecule("O2")
    assert _charge_spin(o2) == (0, 2)
    o2.info["spin"] = 0  # an explicit spin wins
    assert _charge_spin(o2) == (0, 0)
    assert _charge_spin(molecule("H2O")) == (0, 0)
    with pytest.raises(TubError, match="impossible"):
        _charge_spin(Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], magmoms=[1, 0, 0]))
