"""Labelled structures (extxyz) -> model inputs: graphs with pair lists, and batches of them.

extxyz keys are configurable (``--energy-key`` ...); defaults: info["energy"] (eV),
arrays["forces"] (eV/A), info["stress"] (eV/A^3, 3x3 or Voigt-6; optional), info["charge"] (e),
info["spin"] (unpaired electrons); optional arrays["ref_charges"] (e, what `tub mlff label` writes) and
info["dipole"] (e A, molecules). ASE's own SinglePointCalculator results are accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tubcli.errors import TubError

from .neighbors import neighbor_list
from .validation import check_charge_spin


@dataclass
class Keys:
    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"
    virial: str = "virials"
    charge: str = "charge"
    spin: str = "spin"
    charges: str = "ref_charges"
    dipole: str = "dipole"


def read_structures(path: str | Path, index: str = ":"):
    """Read all frames of an extxyz (or any ASE-readable) file, with a one-line error on failure."""
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise TubError(f"{path} not found; give an extxyz file with structures")
    if path.is_dir() and not (path / "metadata.json").is_file():  # an ASE BundleTrajectory is a folder
        raise TubError(f"{path} is a folder; give an extxyz file (or an ASE BundleTrajectory) with structures")
    if path.suffix.lower() in (".xyz", ".extxyz"):
        check_xyz_counts(path)
    try:
        frames = read(str(path), index=index)
    except Exception as exc:  # noqa: BLE001
        if path.suffix.lower() in (".xyz", ".extxyz") and (problem := xyz_row_problem(path)):
            raise TubError(problem) from None
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TubError(f"cannot read {path} as structures ({msg}); give a valid extxyz file") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise TubError(f"{path} contains no structures")
    return frames


def check_xyz_counts(path: Path) -> None:
    """TubError when a frame's atom-count line declares more atoms than the file holds lines for: ASE reads
    one line per declared atom even past the end, so a cut-short file or a corrupt count (10^9) would run for
    hours instead of failing. One pass over the lines; anything else is left to ASE's reader."""
    import itertools

    with open(path, "rb") as f:
        line_no = 0
        for first in f:
            line_no += 1
            if not first.strip():  # blank lines between or after frames
                continue
            try:
                n = int(first.split()[0])
            except ValueError:
                return  # not a count line: ASE says what is wrong
            need = n + 1  # the comment line and one line per atom
            got = sum(1 for _ in itertools.islice(f, need))
            if got < need:
                raise TubError(f"{path.name} line {line_no} declares {n} atoms but only {max(got - 1, 0)} atom "
                               "lines follow; the file is cut short or its count line is wrong")
            line_no += got


def xyz_row_problem(path: Path) -> str | None:
    """After ASE failed to read an (ext)xyz file: the first atom line with fewer columns than its frame's
    Properties= declare, a value that is not a number, or an unknown element symbol, as a one-line message
    with the line number; None when no line is at fault. Only run on failure, so reads cost nothing more."""
    from ase.data import atomic_numbers
    from ase.io.extxyz import key_val_str_to_dict, parse_properties

    with open(path, errors="replace") as f:
        lines = enumerate(f, 1)
        for _, first in lines:
            if not first.strip():
                continue
            try:
                n = int(first.split()[0])
                header_no, comment = next(lines)
                info = key_val_str_to_dict(comment.strip()) if comment.strip() else {}
                declared = info.get("Properties", "species:S:1:pos:R:3")
                props, names, _, convs = parse_properties(declared)
            except Exception:  # noqa: BLE001 -- a bad count or header: ASE's own message says it
                return None
            species = sum(props[k][1] for k in names[:names.index("species")]) if "species" in names else None
            for _ in range(n):
                line_no, line = next(lines, (0, ""))
                values = line.split()
                if len(values) < len(convs):
                    return (f"{path} line {line_no} has {len(values)} columns, fewer than the {len(convs)} that "
                            f"Properties= on line {header_no} declares ({declared}); give every atom line all "
                            f"{len(convs)} columns, or fix Properties=")
                if species is not None and values[species].capitalize() not in atomic_numbers:
                    return (f"{path} line {line_no}: unknown element symbol '{values[species]}'; use a chemical "
                            "symbol such as C or Na")
                for k, (conv, value) in enumerate(zip(convs, values)):
                    try:
                        conv(value)
                    except ValueError:
                        return (f"{path} line {line_no}: column {k + 1} ('{value}') is not a number as Properties= "
                                f"(line {header_no}) declares; fix the value or the Properties")
    return None


def frame_fingerprints(frames) -> np.ndarray:
    """One uint64 per frame from its atomic numbers, positions (to 1e-4 A) and periodic cell: the same
    structure in any file (a copy, a subset, a re-split, another format) has the same print. For noticing
    test frames a model was fitted or validated on (data leakage), not for telling structures apart."""
    import hashlib

    prints = np.empty(len(frames), dtype=np.uint64)
    for k, a in enumerate(frames):
        h = hashlib.blake2b(digest_size=8)
        h.update(np.ascontiguousarray(a.numbers, dtype=np.int64).tobytes())
        h.update(np.round(np.asarray(a.positions, dtype=np.float64) * 1e4).astype(np.int64).tobytes())
        cell = np.where(np.asarray(a.pbc)[:, None], a.cell.array, 0.0)
        h.update(np.round(cell * 1e4).astype(np.int64).tobytes())
        prints[k] = np.frombuffer(h.digest(), dtype=np.uint64)[0]
    return prints


def _get(atoms, key, where):
    if where == "info" and key in atoms.info:
        return atoms.info[key]
    if where == "arrays" and key in atoms.arrays:
        return atoms.arrays[key]
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    return results.get(key)  # ASE's extxyz reader moves energy, free_energy, forces, stress … here


def labels(atoms, keys: Keys, need_forces: bool = True, name: str = "frame"):
    """(energy, forces, stress or None, charge, spin) of one labelled frame."""
    e = _get(atoms, keys.energy, "info")
    predicted = atoms.info.get("epot")  # the model's energy, which `md` writes beside its mark
    if atoms.info.get("predicted_by") and (e is None or predicted is None or abs(float(e) - float(predicted)) < 1e-9):
        # its energy and forces are a model's, not reference labels (frames relabelled by any code keep the
        # mark, but their energy is no longer the prediction)
        raise TubError(f"{name} holds the predictions of `{atoms.info['predicted_by']}` (an MD trajectory), not "
                       "reference labels; label the frames first (tub mlff label, or any code that writes new "
                       "energies and forces)")
    f = _get(atoms, keys.forces, "arrays")
    if f is None and len(atoms) == 1 and not atoms.pbc.any():
        f = np.zeros((1, 3))  # a lone atom: zero by symmetry (MACE-style IsolatedAtom frames store none)
    if f is None and need_forces and config_weights(atoms, name)[1] == 0:
        f = np.zeros((len(atoms), 3))  # never fitted (weight 0): a placeholder so the batch keeps the others'
        need_forces = False
    if e is None:
        raise TubError(f"{name} has no energy under '{keys.energy}'; set --energy-key to the info key that holds it")
    if need_forces and f is None:
        raise TubError(f"{name} has no forces under '{keys.forces}'; set --forces-key to the array that holds them, "
                       "or train on energies only with --set forces_weight=0")
    s = _get(atoms, keys.stress, "info")
    if s is not None:
        s = np.asarray(s, dtype=float)
        if s.shape == (6,):
            from ase.stress import voigt_6_to_full_3x3_stress

            s = voigt_6_to_full_3x3_stress(s)
        elif s.size == 9:
            s = s.reshape(3, 3)
        else:
            raise TubError(f"{name}: stress under '{keys.stress}' must have 6 or 9 numbers")
    elif (v := atoms.info.get(keys.virial)) is not None:
        s = stress_from_virial(atoms, v, keys.virial, name)
    q = float(atoms.info.get(keys.charge, 0.0))
    spin = atoms.info.get(keys.spin)
    try:  # a spin the electrons cannot make would train a model the calculator then refuses to run
        check_charge_spin(atoms, q, spin, name)
    except TubError as exc:
        hint = (f" ('{keys.spin}' must hold the unpaired electrons 2S, not the multiplicity 2S+1)"
                if spin is not None and "spin" in str(exc) else "")
        raise TubError(f"{exc}{hint}") from None
    if spin is None:
        spin = float((int(atoms.numbers.sum()) - int(round(q))) % 2)
    try:  # one bad label would silently drop a metric (NaN) or end in a bare ValueError
        e = float(e)
        f = None if f is None else np.asarray(f, dtype=float)
    except (TypeError, ValueError):
        raise TubError(f"{name}: the energy under '{keys.energy}' or the forces under '{keys.forces}' are not "
                       "numbers; fix or drop the frame") from None
    if not np.isfinite(e) or (f is not None and not np.isfinite(f).all()) or (s is not None and not np.isfinite(s).all()):
        raise TubError(f"{name}: non-finite energy, forces or stress (NaN or inf); fix or drop the frame")
    return e, f, s, q, float(spin)


def stress_from_virial(atoms, virial, key: str, name: str) -> np.ndarray | None:
    """The stress (eV/A^3, ASE's sign) of a virial W (eV) as MACE and NequIP store it: sigma = -W / V;
    None for a frame without a 3-D periodic cell."""
    w = np.asarray(virial, dtype=float)
    if w.size not in (6, 9):
        raise TubError(f"{name}: virial under '{key}' must have 6 or 9 numbers")
    if not atoms.pbc.all() or atoms.cell.rank < 3:
        return None  # no stress without a 3-D cell (a molecule, a slab): skipped, as a stress there would be
    if w.size == 6:
        from ase.stress import voigt_6_to_full_3x3_stress

        w = voigt_6_to_full_3x3_stress(w)
    return -w.reshape(3, 3) / atoms.get_volume()


@dataclass
class Graph:
    """One structure with its pair list, ready to batch."""

    Z: np.ndarray
    R: np.ndarray
    cell: np.ndarray | None
    idx_i: np.ndarray
    idx_j: np.ndarray
    offsets: np.ndarray | None
    Q: float
    S: float
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    charges: np.ndarray | None = None
    dipole: np.ndarray | None = None
    weights: tuple = (1.0, 1.0, 1.0)  # the frame's energy, force and stress loss weights (MACE's config_weight)


CONFIG_WEIGHTS = ("config_energy_weight", "config_forces_weight", "config_stress_weight")


def config_weights(atoms, name: str) -> tuple:
    """(energy, forces, stress) loss weights of a frame, as MACE reads them from its info: ``config_weight``
    times ``config_energy_weight`` / ``config_forces_weight`` / ``config_stress_weight`` (each default 1);
    0 drops that label of the frame from the loss."""
    try:
        base = float(atoms.info.get("config_weight", 1.0))
        weights = tuple(base * float(atoms.info.get(key, 1.0)) for key in CONFIG_WEIGHTS)
    except (TypeError, ValueError):
        raise TubError(f"{name}: config_weight and config_*_weight must be numbers") from None
    if not all(np.isfinite(w) and w >= 0 for w in weights):
        raise TubError(f"{name}: config weights must be finite and >= 0, got {weights}")
    return weights


def _charge_labels(atoms, keys: Keys, periodic: bool, name: str):
    """Reference atomic charges [N] and dipole [3] (molecules only), each None when absent."""
    q = atoms.arrays.get(keys.charges)
    if q is not None:
        q = np.asarray(q, dtype=float).reshape(-1)
        if q.shape != (len(atoms),):
            raise TubError(f"{name}: '{keys.charges}' must hold one charge per atom")
    mu = None if periodic else atoms.info.get(keys.dipole)
    if mu is None and not periodic and atoms.calc is not None:
        mu = getattr(atoms.calc, "results", {}).get("dipole")
    if mu is not None:
        mu = np.asarray(mu, dtype=float).reshape(-1)
        if mu.shape != (3,):
            raise TubError(f"{name}: the dipole under '{keys.dipole}' must have 3 components")
    return q, mu


def to_graph(atoms, radius: float, keys: Keys | None = None, labelled: bool = True,
             charge: float | None = None, spin: float | None = None, name: str = "frame",
             need_forces: bool = True) -> Graph:
    """Pair list within ``radius`` (both directions, with cell offsets for periodic frames)."""
    periodic = bool(np.any(atoms.pbc))
    i, j, off, _ = neighbor_list(atoms.positions, atoms.cell if periodic else None, atoms.pbc, radius)
    e = f = s = None
    charges = dipole = None
    q = float(atoms.info.get((keys or Keys()).charge, 0.0)) if charge is None else float(charge)
    sp = spin
    if labelled:
        e, f, s, q, sp0 = labels(atoms, keys or Keys(), need_forces=need_forces, name=name)
        sp = sp0 if spin is None else spin
        charges, dipole = _charge_labels(atoms, keys or Keys(), periodic, name)
    if sp is None:
        sp = atoms.info.get((keys or Keys()).spin)
        sp = float((int(atoms.numbers.sum()) - int(round(q))) % 2) if sp is None else float(sp)
    return Graph(Z=atoms.numbers.astype(np.int64), R=atoms.positions.astype(np.float64),
                 cell=np.asarray(atoms.cell, dtype=np.float64) if periodic else None,
                 idx_i=i, idx_j=j, offsets=off if periodic else None, Q=q, S=float(sp),
                 energy=e, forces=f, stress=s, charges=charges, dipole=dipole,
                 weights=config_weights(atoms, name) if labelled else (1.0, 1.0, 1.0))


def stress_frames(graphs: list[Graph]) -> list[int]:
    """Indices of the frames that have a cell and a stress label: the ones stress is trained and scored on."""
    return [k for k, g in enumerate(graphs) if g.stress is not None and g.cell is not None]


def collate(graphs: list[Graph], dtype=torch.float32, device="cpu") -> dict:
    """Concatenate graphs into one batch dict (pair indices shifted, batch_seg set).

    A batch that mixes cells and molecules gives the molecules a zero cell and zero offsets (their
    pair vectors are then plain differences); the model reads such a cell as "not periodic". Labels
    that only some frames carry (stress) come with ``<name>_index``, the frames that have them.
    """
    offs = np.cumsum([0] + [len(g.Z) for g in graphs])
    periodic = [g.cell is not None for g in graphs]
    t = lambda a, dt=dtype: torch.as_tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
    batch = {
        "Z": t(np.concatenate([g.Z for g in graphs]), torch.long),
        "R": t(np.concatenate([g.R for g in graphs])),
        "Q": t([g.Q for g in graphs]),
        "S": t([g.S for g in graphs]),
        "idx_i": t(np.concatenate([g.idx_i + o for g, o in zip(graphs, offs)]), torch.long),
        "idx_j": t(np.concatenate([g.idx_j + o for g, o in zip(graphs, offs)]), torch.long),
        "batch_seg": t(np.concatenate([np.full(len(g.Z), k) for k, g in enumerate(graphs)]), torch.long),
        "num_batch": len(graphs),
        "n_atoms": t([len(g.Z) for g in graphs]),
    }
    if any(periodic):
        batch["cell"] = t(np.stack([g.cell if g.cell is not None else np.zeros((3, 3)) for g in graphs]))
        batch["cell_offsets"] = t(np.concatenate([g.offsets if g.offsets is not None else np.zeros((len(g.idx_i), 3))
                                                  for g in graphs]))
    if all(g.energy is not None for g in graphs):
        batch["energy"] = t([g.energy for g in graphs])
    if all(g.forces is not None for g in graphs):
        batch["forces"] = t(np.concatenate([g.forces for g in graphs]))
    stressed = stress_frames(graphs)
    if stressed:
        batch["stress"] = t(np.stack([graphs[k].stress for k in stressed]))
        if len(stressed) < len(graphs):
            batch["stress_index"] = t(stressed, torch.long)
    if all(g.charges is not None for g in graphs):
        batch["charges"] = t(np.concatenate([g.charges for g in graphs]))
    if all(g.dipole is not None for g in graphs):
        batch["dipole"] = t(np.stack([g.dipole for g in graphs]))
    if any(g.weights != (1.0, 1.0, 1.0) for g in graphs):  # per-frame loss weights (absent: all 1)
        w = np.array([g.weights for g in graphs])
        batch["weight_energy"] = t(w[:, 0])
        batch["weight_forces"] = t(np.repeat(w[:, 1], [len(g.Z) for g in graphs])[:, None])
        if stressed:
            batch["weight_stress"] = t(w[stressed, 2][:, None, None])
    return batch


def split_indices(n: int, valid_fraction: float, test_fraction: float, seed: int, groups=None):
    """Random train/valid/test split of n frames (reproducible from seed).

    A positive ``valid_fraction`` keeps at least one validation frame (from 3 frames on); 0 keeps
    none, as with ``--valid``, whose file replaces the validation share. ``groups`` (one label per
    frame, e.g. the MD trajectory) keeps each group in one split: consecutive MD frames are near
    copies, and a test frame whose neighbours were trained on measures interpolation, not the
    model. Whole groups in random order fill the test share, then the validation share (each at
    least one group when its fraction is positive and there are three groups or more).
    """
    rng = np.random.default_rng(seed)
    n_test = int(round(test_fraction * n))
    n_val = max(int(round(valid_fraction * n)), 1 if n > 2 and valid_fraction > 0 else 0)
    if groups is None:
        perm = rng.permutation(n)
        return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]
    labels = np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    members = [np.flatnonzero(labels == g) for g in rng.permutation(labels.max() + 1)]
    parts, k = [], 0
    for want, fraction in ((n_test, test_fraction), (n_val, valid_fraction)):
        taken = []
        while k < len(members) - 1 and fraction > 0 and (sum(map(len, taken)) < want or not taken):
            taken.append(members[k])
            k += 1
        parts.append(np.concatenate(taken) if taken else np.array([], dtype=int))
    train = np.concatenate(members[k:]) if k < len(members) else np.array([], dtype=int)
    return train, parts[1], parts[0]


def composition_matrix(graphs: list[Graph]) -> tuple[list[int], np.ndarray]:
    """The elements present and the element-count matrix (frames x elements)."""
    elems = sorted({int(z) for g in graphs for z in g.Z})
    return elems, np.array([[np.sum(g.Z == z) for z in elems] for g in graphs], dtype=float)


def _composition_svd(graphs: list[Graph]):
    """Elements, element-count matrix (frames x elements), its rank and right singular vectors."""
    elems, A = composition_matrix(graphs)
    _, sv, vt = np.linalg.svd(A, full_matrices=True)
    return elems, A, int(np.sum(sv > sv.max() * 1e-10)) if sv.size else 0, vt


def dependent_element_counts(graphs: list[Graph]) -> str | None:
    """The elements whose counts are linearly dependent over all frames ("H6 C24 N1", as in the frame
    with most of them), or None.

    Their per-element energies are then not identifiable: any split of their energy among them fits
    the data equally well, so a model trained on one host stoichiometry can be off by eV on another
    (measured: ~1 eV/atom on a 4x4 sheet for a model trained on 3x3 cells only). Found from the null
    space of the frames' element-count matrix (the least-squares system of ``element_energies``).
    """
    from ase.data import chemical_symbols

    elems, A, rank, vt = _composition_svd(graphs)
    null = vt[rank:]
    if not len(null):
        return None
    involved = np.abs(null).max(0) > 1e-8
    example = A[np.argmax(A[:, involved].sum(1))]
    return " ".join(f"{chemical_symbols[z]}{int(n)}" for z, n, k in zip(elems, example, involved) if k)


def composition_span(graphs: list[Graph]) -> dict:
    """The span of the training frames' element-count vectors (orthonormal basis), kept in model.json:
    a structure whose counts lie outside it has an energy the training data do not determine."""
    elems, _, rank, vt = _composition_svd(graphs)
    basis = vt[:rank] * np.sign(vt[:rank, :].sum(1, keepdims=True) + 1e-300)  # sign fixed: same file everywhere
    return {"elements": elems, "basis": np.round(basis, 12).tolist()}


def outside_composition_span(numbers, span: dict) -> bool:
    """True when the element counts of ``numbers`` are not a linear combination of the training
    compositions in ``span`` (``composition_span``); elements the model lacks are another check."""
    counts = np.array([np.sum(np.asarray(numbers) == z) for z in span["elements"]], dtype=float)
    B = np.asarray(span["basis"], dtype=float).reshape(-1, len(counts))
    return bool(np.linalg.norm(counts - B.T @ (B @ counts)) > 1e-6 * max(np.linalg.norm(counts), 1.0))


def element_energies(graphs: list[Graph], zmax: int = 87) -> np.ndarray:
    """Per-element reference energies E0[Z] by least squares on total energies (MACE's E0s), each frame
    weighted by its energy weight (``config_weight`` x ``config_energy_weight``; 0 leaves it out)."""
    graphs = [g for g in graphs if g.weights[0] > 0]
    if not graphs:
        return np.zeros(zmax)
    elems, A = composition_matrix(graphs)
    y = np.array([g.energy for g in graphs])
    w = np.sqrt([g.weights[0] for g in graphs])
    coef = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)[0]
    e0 = np.zeros(zmax)
    e0[elems] = coef
    return e0
