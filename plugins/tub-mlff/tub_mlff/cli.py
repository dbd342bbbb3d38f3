"""Thin verb functions: validate inputs, call the science modules, write outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tubcli.config import given_fields
from tubcli.errors import TubError
from tubcli.io import atomic_path, file_sha256, remove_figure, write_json, write_text

from tub_mlff import DEMO_MODEL


# -- helpers ---------------------------------------------------------------------------------
def _dtype(run):
    import torch

    return torch.float64 if run.cfg.precision == "fp64" else torch.float32  # config.ModelVerbConfig: fp32 or fp64


def _say_precision_unused(cfg, run) -> None:
    """build, label (xTB, PySCF) and diffusion (numpy) run no model: a --precision other than the default is said,
    not only recorded in config.yaml."""
    if cfg.precision != "fp32":
        run.log.warning("tub mlff %s runs no model: --precision %s changes nothing here", run.verb, cfg.precision)


def _command_line() -> str:
    """The command that is running, as a user would type it (recorded in a trained model's JSON)."""
    import shlex
    import sys

    return shlex.join(["tub", *sys.argv[1:]] if Path(sys.argv[0]).name == "tub" else sys.argv)


def _models(paths) -> list[Path]:
    """The model files; a `tub mlff train` run directory stands for its model (all members of a committee)."""
    from .checkpoints import model_files

    found = []
    for p in [Path(p) for p in (paths or [])] or [DEMO_MODEL]:
        if p.is_dir():
            members = model_files(p)
            if not members:
                raise TubError(f"{p} is a folder without a trained model (checkpoints/model.safetensors); give the "
                               "run directory of `tub mlff train` or a .safetensors file")
            found += members
        elif not p.exists():
            raise TubError(f"model file {p} not found; give a .safetensors (with its .json), a reference .pth or "
                           "the run directory of `tub mlff train`")
        else:
            found.append(p)
    return found


def _init_model(path) -> Path | None:
    """The one model file ``--init-from`` stands for: a file, or a `tub mlff train` run directory of one model."""
    if path is None or not Path(path).is_dir():
        return path
    files = _models([path])
    if len(files) > 1:
        raise TubError(f"--init-from {path} holds a committee of {len(files)} models; give one member's "
                       f"file, e.g. {files[0]}")
    return files[0]


def _model_names(model_paths) -> list[str]:
    """The model files that made a verb's numbers, for its results (the shipped demo model when none was given)."""
    return [str(p) for p in model_paths] or [f"{DEMO_MODEL.name} (the shipped demo model)"]


def _calculator(run, model_paths, atoms=None, charge=None, spin=None, lr_cutoff=None, ewald_kmax=None,
                name: str = "structure"):
    from .calculator import SpookyNetCalculator
    from .checkpoints import CheckpointError

    q = charge if charge is not None else float((atoms.info.get("charge", 0.0) if atoms is not None else 0.0))
    s = spin
    if s is None and atoms is not None:
        s = atoms.info.get("spin")
    if atoms is not None:  # before any output: the calculator would refuse them only at its first step
        from .validation import check_charge_spin

        q, s = check_charge_spin(atoms, q, s, name)
    try:
        return SpookyNetCalculator([str(p) for p in _models(model_paths)], charge=q, spin=float(s or 0.0),
                                   dtype=_dtype(run), device=run.device,
                                   lr_cutoff=lr_cutoff if lr_cutoff is not None else "auto", ewald_kmax=ewald_kmax)
    except CheckpointError:  # already a one-line TubError (and a ValueError: keep it out of the next clause)
        raise
    except ValueError as exc:
        raise TubError(f"{exc}; check the model files and options") from None


def _warn_composition(run, span: dict | None, frames, name: str) -> None:
    """Warn (once) when a structure's element counts are not a combination of the model's training
    compositions: the training data then do not determine its energy (per-element energies that
    the data could not separate), as for the demo model on any host but its 3x3 one."""
    from .data import outside_composition_span

    if span is None:
        return
    outside = [a for a in frames if outside_composition_span(a.numbers, span)]
    if outside:
        run.log.warning("%s: %d structure(s) (e.g. %s) have element counts that are no combination of the model's "
                        "training compositions, so its energies there are not determined by the training data and "
                        "can be off by eV; use a model trained on such compositions", name, len(outside),
                        outside[0].get_chemical_formula())


def _data_sha256(path: Path) -> str:
    """sha256 of a data file's bytes; of a folder (an ASE BundleTrajectory), of its files' names and bytes."""
    if not path.is_dir():
        return file_sha256(path)
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def _write_extxyz(path: Path, frames) -> Path:
    from ase.io import write

    with atomic_path(path) as tmp:
        write(str(tmp), frames, format="extxyz")
    return path


def _need(value, flag: str, what: str):
    if value is None or (isinstance(value, list) and not value):
        raise TubError(f"missing {flag}: give {what}")
    return value


# -- build ---------------------------------------------------------------------------------------
def build(cfg, run) -> dict:
    from .structures import add_sodium, close_contact, host_formula, janus_graphene, spin_for
    from .validation import check_structure

    _say_precision_unused(cfg, run)
    try:
        host = janus_graphene(cfg.n, cfg.groups, cfg.stacking, cfg.interlayer, cfg.vacuum, seed=cfg.seed)
        apart = janus_graphene(cfg.n, cfg.groups, cfg.stacking, max(cfg.interlayer, 40.0), max(cfg.vacuum, 40.0),
                               seed=cfg.seed)
    except ValueError as exc:
        raise TubError(f"cannot build the host: {exc}") from None
    if len(apart) == len(host) and (hit := close_contact(host, apart)):
        i, j, d = hit
        raise TubError(f"the host is too narrow: {host[i].symbol} and {host[j].symbol} of different sheets or groups "
                       f"come {d:.2f} A apart (--interlayer {cfg.interlayer:g}, --set vacuum={cfg.vacuum:g}); the "
                       "aminophenyl groups need about 8 A between sheets: raise --interlayer (or vacuum)")
    frames = []
    for x in cfg.x:
        for v in range(cfg.variants if x > 0 or cfg.rattle > 0 else 1):  # unrattled x=0 copies are all the host
            try:
                a = add_sodium(host, x, cfg.sites, seed=run.item_seed(f"{x}-{v}")) if x > 0 else host.copy()
            except ValueError as exc:
                raise TubError(f"x={x}: {exc}") from None
            if cfg.rattle > 0:
                a.rattle(cfg.rattle, seed=run.item_seed(f"rattle-{x}-{v}") % (2 ** 31))
            a.info.update({"x": x / max(host.info["groups"], 1), "na_count": x, "charge": 0, "spin": spin_for(a)})
            a.info["anchors"] = " ".join(map(str, host.info["anchors"]))
            check_structure(a, name=f"the built cell with x={x}", fix="raise --interlayer (gallery, bilayer) "
                            "or --set vacuum= (slab), or lower --rattle")
            frames.append(a)
    out = _write_extxyz(run.outputs_dir / "structures.extxyz", frames)
    run.log.info("wrote %d structures to %s", len(frames), out)
    return {"structures": len(frames), "atoms_per_host": len(host), "host_formula": host_formula(cfg.n, cfg.groups),
            "output": str(out)}


# -- label ---------------------------------------------------------------------------------------
_LABELLED = r".+_\d{6}(_c\d{5})?\.extxyz"
XTB_MAX_Z = 86  # GFN1-/GFN2-xTB (tblite) are parametrised for H..Rn
GAMMA_ONLY_WARN_A = 15.0  # periodic cells shorter than this get a k-point convergence warning (tblite: Gamma only)


def _label_items(cfg, files, run) -> tuple[list[str], int]:
    """Batch items 'stem::frame::centre::path' (centre -1 = the whole frame); checks inputs first."""
    from .clusters import ClusterError, centres_of
    from .data import read_structures
    from .labelling import check_dft_settings
    from .validation import check_charge_spin, check_structure

    if cfg.cluster_radius is not None and cfg.method != "dft":
        raise TubError(f"--cluster-radius carves clusters for method=dft; {cfg.method} labels periodic cells "
                       "directly, so drop --cluster-radius or use --set method=dft")
    if cfg.cluster_radius is not None and cfg.cluster_radius <= 0:
        raise TubError(f"--cluster-radius must be positive (got {cfg.cluster_radius}); give e.g. 5")
    unique: dict[Path, Path] = {}
    for f in files:  # the same file given twice is one input
        unique.setdefault(Path(f).resolve(), f)
    files = list(unique.values())
    stems: dict[str, Path] = {}
    for f in files:  # outputs are named <stem>_<frame>.extxyz, so two inputs may not share a stem
        if Path(f).stem in stems:
            raise TubError(f"{stems[Path(f).stem]} and {f} would both write {Path(f).stem}_<frame>.extxyz; "
                           "rename one of them or label them into separate -o folders")
        stems[Path(f).stem] = f
    items, without, elements, shortest = [], 0, set(), np.inf
    for f in files:
        for k, atoms in enumerate(read_structures(f)):
            check_structure(atoms, None, name=f"{f} frame {k}", model=False)  # DFT may cover more than the model
            elements |= set(atoms.get_chemical_symbols())
            if atoms.pbc.any():
                shortest = min(shortest, float(atoms.cell.lengths()[atoms.pbc].min()))
            head = f"{Path(f).stem}::{k:06d}"
            if cfg.method != "dft" or cfg.cluster_radius is None:
                check_charge_spin(atoms, atoms.info.get("charge", 0), atoms.info.get("spin"), f"{f} frame {k}")
                if cfg.method == "dft" and np.any(atoms.pbc):
                    raise TubError(f"{f} frame {k} is periodic and PySCF labels clusters; add --cluster-radius R "
                                   "(e.g. 5) to carve H-capped clusters around --cluster-center (default Na)")
                items.append(f"{head}::-1::{f}")
                continue
            try:
                centres = centres_of(atoms, cfg.cluster_center)
            except ClusterError as exc:
                raise TubError(f"{f} frame {k}: {exc}") from None
            without += not centres
            items += [f"{head}::{c:05d}::{f}" for c in centres]
    if not items:
        raise TubError(f"no cluster centre '{cfg.cluster_center}' in any structure; give --cluster-center "
                       "with an element present or atom indices")
    if cfg.method == "dft":
        check_dft_settings(cfg.xc, cfg.basis, elements)
    else:  # tblite's GFN1/GFN2-xTB parameters end at Rn: fail before any work, not once per item
        from ase.data import atomic_numbers

        beyond = sorted((el for el in elements if atomic_numbers[el] > XTB_MAX_Z), key=atomic_numbers.get)
        if beyond:
            where = next(f"{f} frame {k}" for f in files for k, a in enumerate(read_structures(f))
                         if set(a.get_chemical_symbols()) & set(beyond))
            raise TubError(f"{cfg.method} (tblite) has parameters up to Rn (Z={XTB_MAX_Z}) but {where} contains "
                           f"{', '.join(beyond)}; leave out the structures with {', '.join(beyond)} or label them with "
                           "--set method=dft and a basis that covers them")
        if shortest < GAMMA_ONLY_WARN_A:
            run.log.warning("tblite computes periodic cells at the Gamma point only, and the shortest periodic cell "
                            "vector here is %.1f A: energies per atom are not k-point converged (graphene: 0.27 eV/atom "
                            "between 3x3 and 4x4 cells), so label every cell size you will simulate, or supercells",
                            shortest)
    if without:
        run.log.warning("%d structure(s) have no %s atom; no cluster carved from them", without, cfg.cluster_center)
    return items, without


def structure_digest(atoms) -> str:
    """SHA-256 of a structure (elements, positions and cell to 1e-6 A, pbc): a labelled output
    records the input it was made from, so a rerun notices an input replaced under the same name."""
    import hashlib

    h = hashlib.sha256()
    for a in (atoms.numbers.astype(np.int64), np.round(atoms.positions, 6) + 0.0,
              np.round(np.asarray(atoms.cell), 6) + 0.0, np.asarray(atoms.pbc, dtype=np.int8)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _check_label_sources(items, run, cache) -> None:
    """Outputs a rerun would skip must come from the same input structures (skip-existing goes by
    name; an input file replaced by other structures would otherwise keep its old labels)."""
    from ase.io import read

    from .data import read_structures

    for item in items:
        out = _label_output(run, item)
        if not out.exists():
            continue
        try:
            stored = read(str(out)).info.get("source_digest")
        except Exception as exc:  # damaged after it was written (outputs are atomic): named, not a traceback
            from tubcli.runs import unreadable_output

            raise unreadable_output(out, exc) from None
        if stored is None:  # labelled before outputs recorded their source
            continue
        _, idx, _, path = item.split("::", 3)
        frames = cache.setdefault(path, read_structures(path))
        if stored != structure_digest(frames[int(idx)]):
            raise TubError(f"{out.name} in {run.outputs_dir} was labelled from another structure than frame "
                           f"{int(idx)} of {path} now holds (the input changed under the same name); use a new -o, "
                           "or --overwrite to label it again")


def _label_output(run, item: str) -> Path:
    stem, idx, centre, _ = item.split("::", 3)
    return run.outputs_dir / (f"{stem}_{idx}.extxyz" if centre == "-1" else f"{stem}_{idx}_c{centre}.extxyz")


def label(cfg, run) -> dict:
    import re

    from .clusters import ClusterError, carve_cluster
    from .data import read_structures
    from .labelling import label_pyscf, label_xtb

    files = _need(cfg.structures, "STRUCTURES", "one or more extxyz files")
    _say_precision_unused(cfg, run)
    items, without = _label_items(cfg, files, run)
    cache: dict[str, list] = {}
    if not run.overwrite:
        _check_label_sources(items, run, cache)
    done = 0
    for item, out in run.batch(items, output_for=lambda it: _label_output(run, it)):
        with run.item(item):
            stem, idx, centre, path = item.split("::", 3)
            frames = cache.setdefault(path, read_structures(path))
            atoms = frames[int(idx)]
            if centre != "-1":
                try:
                    atoms = carve_cluster(atoms, int(centre), cfg.cluster_radius)
                except ClusterError as exc:
                    raise TubError(f"{path} frame {int(idx)}: {exc}") from None
                atoms.info["parent_frame"] = int(idx)
                run.log.info("cluster around atom %d of frame %d: %d atoms (%s)", int(centre), int(idx),
                             len(atoms), atoms.get_chemical_formula())
            if cfg.method == "dft":
                labelled = label_pyscf(atoms, cfg.xc, cfg.basis, density_fit=cfg.density_fit)
            else:
                labelled = label_xtb(atoms, cfg.method)
            labelled.info["source_digest"] = structure_digest(frames[int(idx)])
            _write_extxyz(out, labelled)
            done += 1
    # gather every finished item (also from other shards) into one file
    from ase.io import read

    from tubcli.runs import ItemLock

    with ItemLock(run.dir / "labelled.extxyz").waiting():  # shards ending together: the last gathers all
        mine = {_label_output(run, it) for it in items}  # not files an earlier run on other inputs left here
        parts = sorted(p for p in mine if p.exists())
        others = [p for p in run.outputs_dir.glob("*.extxyz") if re.fullmatch(_LABELLED, p.name) and p not in mine]
        merged = [read(str(p)) for p in parts]
        pending = sum(not _label_output(run, it).exists() for it in items)
        # while shards (or failed items) are missing, the merge is labelled.partial.extxyz: a file named
        # labelled.extxyz is the whole data set, never half of it
        full, partial = run.dir / "labelled.extxyz", run.dir / "labelled.partial.extxyz"
        target = partial if pending else full
        if merged:
            _write_extxyz(target, merged)
        if not pending:
            partial.unlink(missing_ok=True)
        elif full.exists():  # an earlier complete run's set, smaller than this one: not the whole data set now
            full.unlink()
            run.log.warning("removed %s of an earlier run: it lacks this run's %d pending item(s)", full.name, pending)
    if others:
        run.log.warning("%d labelled file(s) in %s (e.g. %s) are not of this run's structures (an earlier run on other "
                        "inputs); %s leaves them out", len(others), run.outputs_dir, others[0].name, target.name)
    if pending:
        run.log.warning("%d of %d items are not labelled yet (other shards, or failures): %s holds the %d done; "
                        "labelled.extxyz is written when all are", pending, len(items), partial.name, len(merged))
    result = {"labelled_now": done, "labelled_total": len(merged), "items": len(items), "method": cfg.method,
              "output": str(target)}
    if cfg.method == "dft":
        result["xc_basis"] = f"{cfg.xc}/{cfg.basis}"
    if cfg.cluster_radius is not None:
        result.update({"clusters": len(items), "frames_without_center": without,
                       "cluster_radius": cfg.cluster_radius})
    return result


# -- train ---------------------------------------------------------------------------------------
ISOLATED_ATOM = "IsolatedAtom"  # MACE's config_type of the frames that carry the E0s


def _isolated_atoms(frames, e0s, data) -> tuple[list, list]:
    """(other frames, isolated-atom frames): the frames with ``config_type=IsolatedAtom`` are set apart
    for the E0s (``e0s`` auto or isolated), so that no split puts one into validation or test; with
    given E0s they are left out (their energies would contradict the given ones); ``fit`` keeps them as
    ordinary frames."""
    iso = [a for a in frames if a.info.get("config_type") == ISOLATED_ATOM]
    if e0s == "isolated" and not iso:
        raise TubError(f"--e0s isolated: {data} has no frame with config_type={ISOLATED_ATOM}; add one per element "
                       "(one atom, its energy), give --e0s Cu=...,Au=... or use --e0s fit")
    if e0s == "fit" or not iso:
        return frames, []
    for a in iso:
        if len(a) != 1:
            raise TubError(f"{data}: a config_type={ISOLATED_ATOM} frame has {len(a)} atoms; it must hold one")
    rest = [a for a in frames if a.info.get("config_type") != ISOLATED_ATOM]
    return rest, ([] if isinstance(e0s, dict) else iso)  # given E0s replace the file's isolated atoms


def _e0_graphs(isolated_frames, e0s, keys, data, radius) -> list | None:
    """One-atom graphs whose energies are the E0s: the isolated-atom frames (forces zero by symmetry if
    absent), or one atom per element of a given ``Cu=3.51,...`` mapping; None to fit E0s by least squares."""
    from ase import Atoms

    from .data import to_graph

    if isolated_frames:
        graphs = _graphs(isolated_frames, radius, keys, f"{data} ({ISOLATED_ATOM})", need_forces=False)
    elif isinstance(e0s, dict):
        graphs = []
        for symbol, energy in e0s.items():
            atom = Atoms(symbol)
            atom.info[keys.energy] = energy
            graphs.append(to_graph(atom, radius, keys, name=f"e0s {symbol}", need_forces=False))
    else:
        return None
    for g in graphs:
        if g.forces is None:
            g.forces = np.zeros((1, 3))
    return graphs


def _e0_table(isolated) -> dict:
    from ase.data import chemical_symbols

    return {chemical_symbols[int(g.Z[0])]: float(g.energy) for g in isolated}


def _graphs(frames, radius, keys, name, need_forces: bool = True):
    from .data import to_graph

    return [to_graph(a, radius, keys, name=f"{name} frame {k}", need_forces=need_forces) for k, a in enumerate(frames)]


def _default_lr_cutoff(models, run) -> float:
    """Periodic data and no lr_cutoff: Coulomb/D4 end smoothly at 10 A, as in the calculator (a warning
    says so), instead of at the neighbour-list radius; sets it on ``models`` and returns it."""
    from .calculator import DEFAULT_PERIODIC_LR_CUTOFF as lr_cutoff

    run.log.warning("periodic structures and no lr_cutoff: using lr_cutoff=%g A for Coulomb and D4, as the "
                    "calculator does (--set model.lr_cutoff=L to choose)", lr_cutoff)
    for mm in models:
        mm.set_lr_cutoff(lr_cutoff)
    return lr_cutoff


def _open_long_range(models) -> list[bool]:
    """Per model: Coulomb or D4 without a long-range cutoff of its own (decided per structure set)."""
    return [m.config.lr_cutoff is None and (m.config.use_electrostatics or m.config.use_d4_dispersion)
            for m in models]


def _pair_radius(models, open_lr: list[bool], periodic: bool, run) -> float:
    """The pair-list radius for a set of structures, each model's long-range cutoff set as the calculator
    sets it: a model in ``open_lr`` gets 10 A in cells (with a warning) and all pairs in molecules."""
    if any(open_lr) and periodic:
        _default_lr_cutoff([m for m, o in zip(models, open_lr) if o], run)
    for m, o in zip(models, open_lr):
        if o and not periodic:
            m.set_lr_cutoff(None)
    if any(open_lr) and not periodic:
        return 1e4  # molecules: all pairs
    return max(max(m.config.cutoff, m.config.lr_cutoff or 0.0) for m in models)


def _stress_coverage(graphs, key: str, what: str, run) -> int:
    """How many frames have a cell and a stress label; warns when some periodic frames lack one
    (``what`` then uses the others; molecules never have stress)."""
    from .data import stress_frames

    n, cells = len(stress_frames(graphs)), sum(g.cell is not None for g in graphs)
    if 0 < n < cells:
        run.log.warning("%d of %d periodic frames have no stress under '%s'; %s uses the other %d",
                        cells - n, cells, key, what, n)
    largest = max((float(np.abs(g.stress).max()) for g in graphs if g.stress is not None), default=0.0)
    if largest > STRESS_UNIT_LIMIT:  # 160 GPa: far past the stress of almost any training set
        run.log.warning("a stress label reaches %.3g eV/A^3 (%.0f GPa): tub reads stress in eV/A^3 with ASE's sign; "
                        "a stress in GPa or kbar, or a virial (eV: give it with --virials-key), under '%s' is read as "
                        "the wrong quantity", largest, largest * 160.21766, key)
    return n


STRESS_UNIT_LIMIT = 1.0  # eV/A^3


def _check_architecture(state: dict, model, path) -> None:
    """TubError unless a training checkpoint's weights fit ``model`` (the architecture of the config)."""
    own, saved = model.state_dict(), state["model"]
    for key in sorted(set(own) | set(saved)):
        if key not in own or key not in saved or tuple(own[key].shape) != tuple(saved[key].shape):
            got = list(saved[key].shape) if key in saved else "absent"
            want = list(own[key].shape) if key in own else "absent"
            raise TubError(f"the checkpoint {path} holds another architecture than the config ({key}: {got} there, "
                           f"{want} from the config); resume with that run's --set model.* options or use a new -o")


def _training_data(data, valid) -> list[dict]:
    """The files a training reads, each with the sha256 of its bytes: kept in every checkpoint (a resume on
    edited or replaced files would train one model on two data sets) and in model.json (evaluate notices
    a test file that is one of them). Hashing the bytes is cheap and needs no choice of what a frame is."""
    return [{"role": role, "path": str(path), "sha256": _data_sha256(Path(path))}
            for role, path in (("train", data), ("valid", valid)) if path is not None]


def _check_training_data(state: dict, now: list[dict], ckpt) -> None:
    """TubError when a training file's bytes differ from those the checkpoint was trained on (checkpoints
    written before the fingerprint was kept have none and resume unchecked)."""
    then = {d["role"]: d["sha256"] for d in state.get("training_data") or []}
    for d in now:
        if d["role"] in then and then[d["role"]] != d["sha256"]:
            raise TubError(f"{d['path']} changed since the checkpoint {ckpt} was written (another sha256), so the "
                           "resumed run would mix two data sets; train on it in a new -o (or drop --resume and "
                           "pass --overwrite to start this run again), or restore the file")


def _without_repeats(prints, tr, va, te, run):
    """The validation and test shares without frames that repeat a training frame (or, for test, a
    validation frame): same atoms and positions (``prints``: ``data.frame_fingerprints``), as the common
    start structure of MD runs from one cell that a split by run puts in every share. Their errors would
    measure the fit, not the model."""
    seen = set(prints[list(tr)].tolist())
    va_kept = [i for i in va if prints[i] not in seen]
    seen |= set(prints[va_kept].tolist())
    te_kept = [i for i in te if prints[i] not in seen]
    dropped = len(va) - len(va_kept) + len(te) - len(te_kept)
    if dropped:
        run.log.warning("%d validation/test frame(s) repeat a training or validation frame (same atoms and positions, "
                        "e.g. the start structure of several MD runs): left out of those shares", dropped)
    return va_kept, te_kept


def _save_fitted_frames(path: Path, prints: dict, init_from) -> None:
    """Beside each model file, the fingerprints of the frames it was fitted on and validated with (with
    those of an --init-from model), so that evaluate notices test frames among them in any file."""
    base = _fitted_frames_file(Path(init_from)) if init_from is not None else None
    if base is not None:
        with np.load(base) as z:
            prints = {role: np.concatenate([z[role], prints[role]]) for role in prints}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **prints)


def _fitted_frames_file(model_file: Path) -> Path | None:
    path = model_file.with_name(model_file.name.replace(".safetensors", "") + ".frames.npz")
    return path if model_file.suffix == ".safetensors" and path.is_file() else None


def _warn_fitted_frames(run, model_files: list[Path], frames, data) -> bool:
    """Warn when test frames are frames a model was fitted on or chose its epoch on (same atoms and
    positions, in any file): their errors measure the fit, not the model. False for models trained
    before the fingerprints were kept (the whole-file check serves them)."""
    from .data import frame_fingerprints

    files = [f for f in (_fitted_frames_file(Path(m)) for m in model_files) if f is not None]
    if not files:
        return False
    test = frame_fingerprints(frames)
    seen = {"train": [], "valid": []}
    for f in files:
        with np.load(f) as z:
            for role in seen:
                seen[role].append(z[role])
    for role, what in (("train", "trained on"), ("valid", "validated on (its epoch was chosen on them)")):
        hits = int(np.isin(test, np.concatenate(seen[role])).sum())
        if hits:
            run.log.warning("%d of %d frames of %s are frames the model was %s (same atoms and positions): their "
                            "errors flatter it; evaluate on frames it never saw", hits, len(test), data, what)
    return True


def _warn_training_files(run, metas: list[dict], data) -> None:
    """Warn when the file to evaluate is one of the model's training files (same bytes, from model.json):
    its errors then measure the fit, not the model. Models without the record (reference, demo) pass."""
    if not any(meta.get("training_data") for meta in metas):
        return
    digest = _data_sha256(Path(data))
    seen = {(d.get("role"), d.get("path")) for meta in metas for d in meta.get("training_data") or []
            if d.get("sha256") == digest}
    for role, path in sorted(seen, key=str):
        what = "trained on (most of) these frames" if role == "train" else "chose its epoch on these frames (--valid)"
        run.log.warning("%s has the same bytes as the model's %s file %s: the model was %s, so these errors "
                        "flatter it; evaluate on frames it never saw (train's own test share is in its "
                        "metrics.json 'test')", data, "training" if role == "train" else "validation", path, what)


# model.* options that define the architecture (weights and what they mean) -> SpookyNetConfig field;
# lr_cutoff and module_keep_prob are not among them: --init-from applies those
_ARCHITECTURE = {"num_features": "num_features", "num_basis_functions": "num_basis_functions",
                 "num_modules": "num_modules", "cutoff": "cutoff", "zbl": "use_zbl_repulsion",
                 "electrostatics": "use_electrostatics", "d4": "use_d4_dispersion"}


def _check_init_architecture(m, mcfg, path) -> None:
    """TubError when an explicitly given model.* architecture option differs from the --init-from model's."""
    import math

    diffs = []
    for field, attr in _ARCHITECTURE.items():
        if field not in m.model_fields_set:
            continue
        want, have = getattr(m, field), getattr(mcfg, attr)
        same = math.isclose(want, have, rel_tol=1e-9) if isinstance(want, float) else want == have
        if not same:
            diffs.append((field, want, have))
    if diffs:
        said = ", ".join(f"model.{f}={str(w).lower() if isinstance(w, bool) else w} "
                         f"(the model has {str(h).lower() if isinstance(h, bool) else h})" for f, w, h in diffs)
        drop = " and ".join(f"--set model.{f}" for f, _, _ in diffs)
        raise TubError(f"--init-from takes the architecture from {path}, which differs from {said}; "
                       f"drop {drop} or train from scratch")


def _split_groups(frames, split_by: str, data, run) -> list | None:
    """The group label of every frame for ``split_indices`` (None: split frame by frame)."""
    if split_by == "none":
        return None
    if split_by == "auto" and not all("traj" in f.info for f in frames):
        tagged = sum("traj" in f.info for f in frames)
        if tagged:  # e.g. labelled MD frames pooled with built cells: the MD runs' near-copies get split up
            run.log.warning("%s: %d of %d frames carry info['traj'] (an MD run's name), the others none, so the "
                            "split goes frame by frame and one run's correlated frames can land in both train and "
                            "test; give every frame an info['traj'] (e.g. its file's name) to split by run, or "
                            "--set split_by=none to split by frame knowingly", data, tagged, len(frames))
        return None
    key = "traj" if split_by == "auto" else split_by
    missing = sum(key not in f.info for f in frames)
    if missing:
        raise TubError(f"{data}: {missing} of {len(frames)} frames have no info['{key}'] to split by; "
                       "give --set split_by=KEY with a key every frame has, or --set split_by=none")
    groups = [f.info[key] for f in frames]
    n = len(set(map(str, groups)))
    run.log.info("splitting by info['%s']: %d groups, each in one of train/valid/test", key, n)
    if n < 3:
        run.log.warning("only %d group(s) in info['%s']: whole groups go to test first, so validation (and maybe "
                        "training) gets none; give --valid, more %s groups, or --set split_by=none", n, key, key)
    return groups


def train(cfg, run) -> dict:
    import torch

    from .checkpoints import load_model, save_model
    from .data import Keys, composition_span, frame_fingerprints, read_structures, split_indices
    from .spookynet import SpookyNet, SpookyNetConfig
    from .training import TrainSettings, fit
    from .validation import check_structure

    data = _need(cfg.data, "DATA", "a labelled extxyz file")
    if not any((cfg.energy_weight, cfg.forces_weight, cfg.stress_weight, cfg.charges_weight, cfg.dipole_weight)):
        raise TubError("every loss weight is 0, so nothing would be learned; give energy_weight or forces_weight > 0")
    if cfg.lr_schedule == "cosine" and cfg.min_lr >= cfg.lr:
        raise TubError(f"min_lr {cfg.min_lr:g} is not below lr {cfg.lr:g}: the cosine schedule would raise the "
                       "learning rate; give a smaller min_lr")
    if cfg.valid is None and cfg.valid_fraction + cfg.test_fraction >= 1:
        raise TubError(f"valid_fraction + test_fraction is {cfg.valid_fraction + cfg.test_fraction:g}, which leaves no "
                       "training frames; keep their sum below 1")
    frames = read_structures(data)
    keys = Keys(**cfg.keys.model_dump())
    for k, a in enumerate(frames):
        check_structure(a, None, name=f"{data} frame {k}")
    n_frames = len(frames)
    frames, isolated_frames = _isolated_atoms(frames, cfg.e0s, data)
    if isinstance(cfg.e0s, dict) and len(frames) < n_frames:
        run.log.info("--e0s given: the %d %s frames of %s are left out", n_frames - len(frames), ISOLATED_ATOM, data)
    m = cfg.model
    mcfg = SpookyNetConfig(num_features=m.num_features, num_basis_functions=m.num_basis_functions,
                           num_modules=m.num_modules, cutoff=m.cutoff, lr_cutoff=m.lr_cutoff,
                           use_zbl_repulsion=m.zbl, use_electrostatics=m.electrostatics, use_d4_dispersion=m.d4,
                           module_keep_prob=m.module_keep_prob)
    base, base_meta = None, {}
    init_from = _init_model(cfg.init_from)
    if init_from is not None:
        base, base_meta = load_model(init_from, torch.float32)
        if cfg.ensemble > 1:
            run.log.warning("--init-from with --ensemble: every member starts from the same weights and they differ "
                            "only by batch order, so their spread (the MD uncertainty) will be near zero; fine-tune "
                            "each member of a committee (--init-from RUN_DIR of a committee per member) or train "
                            "the committee from scratch")
        mcfg = base.config
        _check_init_architecture(m, mcfg, cfg.init_from)
        if m.lr_cutoff is not None:
            base.set_lr_cutoff(m.lr_cutoff)
        if "module_keep_prob" in m.model_fields_set:  # a training-time switch: applied, not taken from the file
            mcfg.module_keep_prob = m.module_keep_prob
    elif m.d4:
        raise TubError("--set model.d4=true needs D4 tables: start from a reference model with --init-from")
    valid_frames = read_structures(cfg.valid) if cfg.valid is not None else []
    for k, a in enumerate(valid_frames):
        check_structure(a, None, name=f"{cfg.valid} frame {k}")
    periodic = any(np.any(a.pbc) for a in frames + valid_frames)
    if periodic and (mcfg.use_electrostatics or mcfg.use_d4_dispersion) and mcfg.lr_cutoff is None:
        mcfg.lr_cutoff = _default_lr_cutoff([base] if base is not None else [], run)
    radius = max(mcfg.cutoff, mcfg.lr_cutoff or 0.0) if (mcfg.use_electrostatics or mcfg.use_d4_dispersion) else mcfg.cutoff
    if not periodic and (mcfg.use_electrostatics or mcfg.use_d4_dispersion) and mcfg.lr_cutoff is None:
        radius = 1e4  # molecules: all pairs
    need_forces = cfg.forces_weight > 0
    graphs = _graphs(frames, radius, keys, str(data), need_forces)
    isolated = _e0_graphs(isolated_frames, cfg.e0s, keys, data, radius)
    groups = _split_groups(frames, cfg.split_by, data, run)
    prints = frame_fingerprints(frames)
    if cfg.valid is not None:  # the file replaces the validation share: none is taken from DATA
        valid = _graphs(valid_frames, radius, keys, str(cfg.valid), need_forces)
        tr, _, te = split_indices(len(graphs), 0.0, cfg.test_fraction, cfg.seed, groups)
        _, te = _without_repeats(prints, tr, [], te, run)
        train_g, test_g = [graphs[i] for i in tr], [graphs[i] for i in te]
    else:
        tr, va, te = split_indices(len(graphs), cfg.valid_fraction, cfg.test_fraction, cfg.seed, groups)
        va, te = _without_repeats(prints, tr, va, te, run)
        train_g, valid, test_g = [graphs[i] for i in tr], [graphs[i] for i in va], [graphs[i] for i in te]
    if not train_g:
        raise TubError(f"{data} has too few frames to train ({len(graphs)}); give more labelled structures")
    if isolated:  # E0s: trained on too, so the isolated atoms keep their energies as the weights move
        missing = sorted({int(z) for g in train_g for z in g.Z} - {int(g.Z[0]) for g in isolated})
        if missing:
            from ase.data import chemical_symbols

            raise TubError(f"e0s: no isolated-atom energy for {', '.join(chemical_symbols[z] for z in missing)}; "
                           "give every element of the training frames one (or --e0s fit)")
        trained = {int(z) for g in train_g for z in g.Z}
        isolated = [g for g in isolated if int(g.Z[0]) in trained]  # not an element the data lacks
        train_g = train_g + isolated
        run.log.info("E0s (%s): %s", "isolated-atom frames" if isolated_frames else "given",
                     ", ".join(f"{a}={e:.6g} eV" for a, e in _e0_table(isolated).items()))
    if not valid:
        run.log.warning("no validation frames (%d frames in all): early stopping and keep=best follow the training "
                        "loss and the validation errors are not measured; give --valid or more frames", len(graphs))
    for weight, field, key, what in ((cfg.charges_weight, "charges", cfg.keys.charges, "atomic charges (array)"),
                                     (cfg.dipole_weight, "dipole", cfg.keys.dipole, "dipoles (info; molecules only)")):
        if weight > 0 and any(getattr(g, field) is None for g in train_g + valid):
            raise TubError(f"{field}_weight > 0 but not every frame has {what} under '{key}'; "
                           f"set --set keys.{field}=KEY or drop the weight")
    if cfg.stress_weight > 0 and not _stress_coverage(train_g + valid, cfg.keys.stress, "the stress loss", run):
        raise TubError(f"stress_weight > 0 but no periodic frame has a stress (info) under '{cfg.keys.stress}'; "
                       "set --set keys.stress=KEY or drop the weight")
    if cfg.stress_weight == 0 and any(g.stress is not None for g in train_g):
        run.log.info("the training frames have stress labels, but stress_weight is 0: the stress is not trained "
                     "(--set stress_weight=W to fit it; 1 weighs 1 eV/A^3 like 1 eV/atom)")
    run.log.info("frames: %d train, %d validation (%s), %d test (%s of %s)", len(train_g), len(valid),
                 cfg.valid if cfg.valid is not None else f"{cfg.valid_fraction:g} of {data}", len(test_g),
                 f"{cfg.test_fraction:g}", data)
    settings = TrainSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, lr_schedule=cfg.lr_schedule,
                             lr_patience=cfg.lr_patience, lr_factor=cfg.lr_factor, min_lr=cfg.min_lr,
                             energy_weight=cfg.energy_weight,
                             forces_weight=cfg.forces_weight, stress_weight=cfg.stress_weight,
                             charges_weight=cfg.charges_weight, dipole_weight=cfg.dipole_weight,
                             ema_decay=cfg.ema_decay, patience=cfg.patience, max_minutes=cfg.max_minutes,
                             fine_tune=base is not None, keep=cfg.keep, isolated=isolated,
                             loss=cfg.loss, huber_delta=cfg.huber_delta)
    # the elements the model learned: those of its training frames (and of the model it started from)
    elements = sorted({int(z) for g in train_g for z in g.Z} | set(base_meta.get("elements") or []))
    unseen = sorted({int(z) for a in frames for z in a.numbers} - set(elements))
    if unseen:
        from ase.data import chemical_symbols
        run.log.warning("%s appear only in the validation/test frames (the split by %s put them there): the model "
                        "is not trained on them and md/evaluate will refuse them; use another --seed or "
                        "--set split_by=none", ", ".join(chemical_symbols[z] for z in unseen),
                        "trajectory" if groups is not None else "frame")
    span = composition_span(train_g)  # kept in model.json: md/ocv/evaluate/explain warn outside it
    dtype = _dtype(run)
    training_data = _training_data(data, cfg.valid)
    seen_prints = {"train": prints[list(tr)],  # the frames the weights or their epoch depend on
                   "valid": frame_fingerprints(valid_frames) if cfg.valid is not None else prints[list(va)]}
    state = run.load_checkpoint()
    if state is not None:
        _check_architecture(state, SpookyNet(SpookyNetConfig.from_dict(mcfg.to_dict())), run.resume_from)
        _check_training_data(state, training_data, run.resume_from)
    first_member = int(state["member"]) if state else 0
    if first_member > 0 and state.get("epochs") not in (None, cfg.epochs):
        raise TubError(f"--epochs {cfg.epochs} on a committee trained for {state['epochs']}: members "
                       f"0..{first_member - 1} are finished, so only the last would train on; resume with the same "
                       "--epochs, or train a new committee (or fine-tune each member with --init-from)")
    results = []
    for member in range(cfg.ensemble):
        name = "model" if cfg.ensemble == 1 else f"model_{member}"
        if member < first_member and (run.checkpoints_dir / f"{name}.safetensors").exists():
            # finished before the interruption: loaded, so that the test metrics cover the whole committee
            done_model, done_meta = load_model(run.checkpoints_dir / f"{name}.safetensors", dtype)
            results.append({"model": done_model, "kept_epoch": done_meta.get("kept_epoch")})
            continue
        torch.manual_seed(cfg.seed + member)
        model = SpookyNet(SpookyNetConfig.from_dict(mcfg.to_dict()), seed=cfg.seed + member) if base is None \
            else load_model(init_from, torch.float32)[0].train()
        if base is not None and mcfg.lr_cutoff is not None:
            model.set_lr_cutoff(mcfg.lr_cutoff)
        if base is not None:
            model.config.module_keep_prob = mcfg.module_keep_prob
        res = fit(model, train_g, valid, settings, run, dtype=dtype, device=run.device, seed=cfg.seed,
                  state=state if (state and int(state["member"]) == member) else None, member=member,
                  record={"training_data": training_data})
        if run.is_main:  # torchrun: every rank holds the same weights; rank 0 writes them
            _save_fitted_frames(run.checkpoints_dir / f"{name}.frames.npz", seen_prints,
                                init_from if base is not None else None)
            save_model(res["model"], run.checkpoints_dir / name,
                       extra={"elements": elements, "composition_span": span,
                              # the calculator warns at another total charge or spin: nothing trained it there
                              "trained_charges": sorted({int(round(g.Q)) for g in train_g}),
                              "trained_spins": sorted({int(round(g.S)) for g in train_g}),
                              "trained_on": str(data), "member": member, "kept_epoch": res["kept_epoch"],
                              # with the --init-from model's: evaluate warns on any file the weights saw
                              "training_data": (base_meta.get("training_data") or []) + training_data,
                              "train_frames": len(train_g), "world_size": run.world_size,
                              "command": _command_line(), "train_config": cfg.model_dump(mode="json")})
        results.append(res)
        state = None
    from .evaluation import error_metrics, predict

    metrics = {"members": cfg.ensemble, "train_frames": len(train_g), "valid_frames": len(valid),
               "test_frames": len(test_g), "elements": elements}
    if run.world_size > 1:
        metrics["world_size"] = run.world_size
    for name, frames_of in (("valid", valid), ("test", test_g)):  # the saved model (committee mean) on each share
        if frames_of and run.is_main:
            preds = predict([r["model"] for r in results], frames_of, dtype, run.device)
            metrics[name] = error_metrics(frames_of, preds)
    metrics["model"] = str(run.checkpoints_dir / ("model.safetensors" if cfg.ensemble == 1 else "model_0.safetensors"))
    if cfg.ensemble > 1:
        metrics["models"] = [str(run.checkpoints_dir / f"model_{k}.safetensors") for k in range(cfg.ensemble)]
    if run.is_main and _training_figure(run, cfg.ensemble, results, cfg.keep):
        metrics["training_curves"] = str(run.outputs_dir / "training.png")
    return metrics


def _training_figure(run, members: int, results: list[dict], keep: str):
    """outputs/training.png: losses, validation errors and learning rate per epoch (a line per committee
    member), each member's kept epoch marked: whether the model converged, over-fitted or stopped early."""
    from tubcli.plots import metric_rows, training_curves

    group = "member" if members > 1 else None
    kept = {k: r["kept_epoch"] for k, r in enumerate(results) if r.get("kept_epoch") is not None}
    return training_curves(run.outputs_dir / "training.png", metric_rows(run.dir / "metrics.jsonl", "epoch", group),
                           "epoch", [["train_loss", "val_loss"], ["val_energy_mae_per_atom"], ["val_forces_mae"], ["lr"]],
                           group=group, best=kept, title=f"EMA weights kept: {keep} "
                           f"({'lowest val_loss' if keep == 'best' else 'last epoch'}; without validation frames "
                           "val_loss is the training loss); energies in eV/atom, forces in eV/A")


# -- evaluate ------------------------------------------------------------------------------------
def evaluate(cfg, run) -> dict:
    from ase.stress import full_3x3_to_voigt_6_stress

    from .checkpoints import load_model, model_composition_span, model_elements
    from .data import Keys, read_structures, stress_frames
    from .evaluation import error_metrics, metrics_by_config_type, predict
    from .plots import parity_plot
    from .validation import check_structure

    data = _need(cfg.data, "DATA", "a labelled extxyz file")
    frames = read_structures(data)
    loaded = [load_model(p, _dtype(run)) for p in _models(cfg.model)]  # CheckpointError: one line, exit 2
    models = [m for m, _ in loaded]
    meta_elements = model_elements([meta for _, meta in loaded])
    for k, a in enumerate(frames):
        check_structure(a, meta_elements, name=f"{data} frame {k}")
    _warn_composition(run, model_composition_span([meta for _, meta in loaded]), frames, str(data))
    if not _warn_fitted_frames(run, _models(cfg.model), frames, data):
        _warn_training_files(run, [meta for _, meta in loaded], data)
    radius = _pair_radius(models, _open_long_range(models), any(np.any(a.pbc) for a in frames), run)
    graphs = _graphs(frames, radius, Keys(**cfg.keys.model_dump()), str(data), need_forces=False)
    with_forces = all(g.forces is not None for g in graphs)
    if not with_forces:
        run.log.warning("not every frame of %s has forces under '%s': energy errors only (set --forces-key if "
                        "they are stored under another name)", data, cfg.keys.forces)
    _stress_coverage(graphs, cfg.keys.stress, "the stress MAE/RMSE", run)
    preds = predict(models, graphs, _dtype(run), run.device)
    metrics = error_metrics(graphs, preds)
    by_type = metrics_by_config_type(graphs, preds, [a.info.get("config_type") for a in frames])
    if by_type:
        metrics["by_config_type"] = by_type
    if "charges_mae_e" in metrics and (untrained := _untrained_charges(cfg.model)):
        run.log.warning("%s learned no charges (charges_weight and dipole_weight 0 in its training config): "
                        "charges_mae_e measures charges that only carry the total charge", untrained)
    stressed = stress_frames(graphs) if "stress_mae_meV_A3" in metrics else []
    for name in ("energy", "forces", "stress"):  # a parity plot an earlier run left here is not this one's
        remove_figure(run.outputs_dir / f"parity_{name}.png")
    if cfg.plots:
        n = np.array([len(g.Z) for g in graphs])
        parity_plot(run.outputs_dir / "parity_energy.png", [g.energy / len(g.Z) for g in graphs],
                    preds["energy"] / n, "energy per atom", "eV/atom", metrics["energy_mae_meV_atom"],
                    metrics["energy_rmse_meV_atom"], "meV/atom")
    if cfg.plots and with_forces:
        parity_plot(run.outputs_dir / "parity_forces.png", np.concatenate([g.forces for g in graphs]),
                    np.concatenate(preds["forces"]), "force component", "eV/Å", metrics.get("forces_mae_meV_A"),
                    metrics.get("forces_rmse_meV_A"), "meV/Å")
    if cfg.plots and stressed:
        parity_plot(run.outputs_dir / "parity_stress.png", np.stack([graphs[k].stress for k in stressed]),
                    preds["stress"][stressed], "stress", "eV/Å³", metrics["stress_mae_meV_A3"],
                    metrics["stress_rmse_meV_A3"], "meV/Å³")
    # per frame; forces to 1e-6 eV/A, stress as ASE's Voigt-6 (xx yy zz yz xz xy, eV/A^3), null without a cell
    stress = preds.get("stress")
    write_json(run.outputs_dir / "predictions.json",
               {"energy": preds["energy"].tolist(), "energy_ref": [g.energy for g in graphs],
                "forces": [np.round(f, 6).tolist() for f in preds["forces"]],
                "stress": [None if stress is None or g.cell is None else full_3x3_to_voigt_6_stress(stress[k]).tolist()
                           for k, g in enumerate(graphs)]})
    return {**metrics, "model": _model_names(cfg.model)}


# -- predict -------------------------------------------------------------------------------------
def predict(cfg, run) -> dict:
    """Energies, forces, stress, atomic charges and the committee spread of structures, labelled or not
    (what MACE's ``eval_configs`` writes): one extxyz and one CSV per input file. The predictions go under
    ``<prefix>`` keys beside what the frames hold, so a labelled file keeps its reference labels and the two
    can be compared; the input is never modified."""
    from ase.stress import full_3x3_to_voigt_6_stress

    from .checkpoints import load_model, model_composition_span, model_elements, model_trained_states, untrained_states
    from .data import Keys, read_structures, to_graph
    from .evaluation import predict as predict_frames
    from .validation import check_charge_spin, check_structure

    files = [Path(f) for f in _need(cfg.structures, "STRUCTURES", "one or more structure files")]
    outputs: dict[str, Path] = {}  # output name -> input
    for f in files:
        if not f.exists():  # before any work: a mistyped name is not one failed item of a batch
            raise TubError(f"{f} not found; give structure files (extxyz or any format ASE reads)")
        name = _predicted_name(f)
        if name in outputs and outputs[name].resolve() != f.resolve():
            raise TubError(f"two inputs would both write {name} ({outputs[name]}, {f}); rename one")
        outputs[name] = f
    loaded = [load_model(p, _dtype(run)) for p in _models(cfg.model)]
    models = [m for m, _ in loaded]
    elements = model_elements([meta for _, meta in loaded])
    span = model_composition_span([meta for _, meta in loaded])
    trained_charges, trained_spins = model_trained_states([meta for _, meta in loaded])
    open_lr = _open_long_range(models)  # their cutoffs are decided per file below, as the calculator does
    keys = Keys(**cfg.keys.model_dump())
    p, frames_done, said = cfg.prefix, 0, set()
    for path, out in run.batch(list(outputs.values()), output_for=lambda f: run.outputs_dir / _predicted_name(f)):
        with run.item(path):
            frames = read_structures(path)
            for k, a in enumerate(frames):
                name = f"{path} frame {k}"
                check_structure(a, elements, name=name)
                q, spin = check_charge_spin(a, float(a.info.get(keys.charge, 0.0)), a.info.get(keys.spin), name)
                for what, value, trained in untrained_states(q, spin, trained_charges, trained_spins, said):
                    run.log.warning("%s: %s %s, the model was trained on %s %s only; its predictions there are not "
                                    "determined by its training data", name, what, value, what, trained)
            _warn_composition(run, span, frames, str(path))
            radius = _pair_radius(models, open_lr, any(np.any(a.pbc) for a in frames), run)
            graphs = [to_graph(a, radius, keys, labelled=False, name=f"{path} frame {k}") for k, a in enumerate(frames)]
            preds = predict_frames(models, graphs, _dtype(run), run.device, batch_size=cfg.batch_size)
            rows = ["frame,formula,n_atoms,energy_eV,energy_per_atom_eV,energy_std_eV,fmax_eV_A"]
            for k, (a, g) in enumerate(zip(frames, graphs)):
                e, f = float(preds["energy"][k]), np.asarray(preds["forces"][k])
                a.info[f"{p}energy"] = e
                a.arrays[f"{p}forces"] = f
                a.arrays[f"{p}charges"] = np.asarray(preds["charges"][k])
                if g.cell is not None and "stress" in preds:
                    a.info[f"{p}stress"] = full_3x3_to_voigt_6_stress(preds["stress"][k])
                if g.cell is None:  # a cell's dipole depends on the images chosen
                    a.info[f"{p}dipole"] = np.asarray(preds["dipole"][k])
                if len(models) > 1:
                    a.info[f"{p}energy_std"] = float(preds["energy_std"][k])
                fmax = float(np.linalg.norm(f, axis=1).max())
                std = f"{preds['energy_std'][k]:.6f}" if len(models) > 1 else ""
                rows.append(f"{k},{a.get_chemical_formula()},{len(a)},{e:.6f},{e / len(a):.6f},{std},{fmax:.6f}")
            write_text(out.with_suffix(".csv"), "\n".join(rows) + "\n")
            _write_extxyz(out, frames)  # last: its existence marks the file done
            frames_done += len(frames)
    # the totals of the outputs, as every batch verb reports them: also those of other shards and earlier jobs
    tables = [run.outputs_dir / _predicted_name(f) for f in outputs.values()]
    total = sum(len(t.with_suffix(".csv").read_text().splitlines()) - 1 for t in tables if t.exists())
    return {"frames": total, "frames_now": frames_done, "files": len(outputs), "prefix": p,
            "model": _model_names(cfg.model)}


def _predicted_name(path: Path) -> str:
    """``<stem>.extxyz``, in lower case where ASE would read that name as another format (``*POSCAR*``,
    ``*XDATCAR*``, ``*OUTCAR*``, ``*CONFIG*``: its globs are upper case)."""
    from ase.io.formats import filetype

    name = f"{path.stem}.extxyz"
    return name if filetype(name, read=False) == "extxyz" else name.lower()


# -- md ------------------------------------------------------------------------------------------
def md(cfg, run) -> dict:
    from .data import read_structures
    from .md import run_md

    path = _need(cfg.structure, "STRUCTURE", "an extxyz file with the starting structure")
    if cfg.ensemble != "npt" and (cfg.pressure != 0 or cfg.npt_cell != "full"):
        raise TubError(f"--pressure and npt_cell act on NPT only; add --ensemble npt (now {cfg.ensemble}) or drop them")
    # the thermostat/barostat constants of another ensemble would be ignored (and recorded as if used)
    acts_on = {"friction": ("nvt-langevin",), "taut": ("nvt-bussi", "npt"), "taup": ("npt",)}
    idle = given_fields(cfg, [k for k, ens in acts_on.items() if cfg.ensemble not in ens])
    if idle:
        raise TubError(f"{cfg.ensemble} does not use {', '.join(idle)} ("
                       + "; ".join(f"{k} acts on {'/'.join(acts_on[k])}" for k in idle) + "); drop it or choose that ensemble")
    atoms = read_structures(path, index="-1")[0]
    if len(atoms) < 2:  # 3N - 3 = 0: no temperature once the centre of mass is at rest
        raise TubError(f"{path}: MD needs at least 2 atoms (one atom has no degrees of freedom once its "
                       "centre-of-mass motion is removed); give a larger structure")
    if cfg.ewald_kmax is not None and not atoms.pbc.all():
        raise TubError(f"{path}: Ewald summation needs a cell periodic in all three directions "
                       f"(pbc={atoms.pbc.tolist()}); drop ewald_kmax")
    calc = _calculator(run, cfg.model, atoms, cfg.charge, cfg.spin, cfg.lr_cutoff, cfg.ewald_kmax, name=str(path))
    from .validation import check_structure

    check_structure(atoms, calc.elements, name=str(path))
    _warn_composition(run, calc.composition_span, [atoms], str(path))
    from .md import VACUUM_GAP_A, vacuum_gap

    fresh = not (run.outputs_dir / "trajectory.extxyz").exists()  # a resume goes on from its own state
    bulk = (atoms.pbc.all() and vacuum_gap(atoms)[0] <= VACUUM_GAP_A  # a slab's stress is no pressure (NPT
            and atoms.info.get("stacking") not in ("slab", "bilayer"))  # refuses it)
    if fresh and bulk and cfg.ensemble != "npt":  # a built, unrelaxed cell stays strained at constant volume
        from ase import units

        probe = atoms.copy()
        probe.calc = calc
        strain = float(np.abs(probe.get_stress()).max()) / units.GPa
        if strain > 1.0:
            run.log.warning("%s: the starting cell is under %.1f GPa (largest stress component) and %s keeps its "
                            "volume; relax the cell first (tub mlff ocv --cell auto writes outputs/relaxed.extxyz) or "
                            "run --ensemble npt", path, strain, cfg.ensemble)
    models = _models(cfg.model)
    settings = {"model": [str(p) for p in models], "model_sha256": [file_sha256(p) for p in models],
                "charge": calc.charge, "spin": calc.spin, "lr_cutoff": cfg.lr_cutoff, "ewald_kmax": cfg.ewald_kmax,
                "precision": cfg.precision}  # an fp32 continuation of an fp64 run would not be the exact one
    last = [0]

    def progress(done, total):
        if done - last[0] >= max(total // 10, 1) or done == total:
            run.log.info("md step %d / %d", done, total)
            last[0] = done

    summary = run_md(atoms, calc, run.outputs_dir / "trajectory.extxyz", run.outputs_dir / "thermo.csv",
                     cfg.steps, cfg.ensemble, cfg.timestep, cfg.temp, cfg.friction, cfg.taut, cfg.pressure,
                     cfg.taup, cfg.interval, seed=cfg.seed, log=run.log, progress=progress, settings=settings,
                     npt_cell=cfg.npt_cell)
    summary["trajectory"] = str(run.outputs_dir / "trajectory.extxyz")
    summary["committee"] = len(calc.models)
    summary["model"] = _model_names(cfg.model)
    return summary


# -- ocv -----------------------------------------------------------------------------------------
def ocv(cfg, run) -> dict:
    from .battery import sodiation_series
    from .plots import voltage_plot
    from .structures import add_sodium, janus_graphene, spin_for

    if cfg.reference == "xtb":
        from .labelling import require_tblite

        require_tblite()  # a missing tblite is an error before any work
    if cfg.structures is not None:
        from .data import read_structures

        frames = read_structures(cfg.structures)
    else:
        host = janus_graphene(cfg.n, cfg.groups, cfg.stacking, cfg.interlayer, seed=cfg.seed)
        frames = [host]
        for x in range(1, cfg.x_max + 1):
            for v in range(cfg.variants):
                frames.append(add_sodium(host, x, "random", seed=run.item_seed(f"ocv-{x}-{v}")))
        for f in frames:
            f.info["groups"] = host.info["groups"]
    from .validation import check_structure

    calcs = {}

    def calc_for(atoms):
        key = "bcc" if atoms is None else "host"
        if key not in calcs:
            calcs[key] = _calculator(run, cfg.model, atoms)
        c = calcs[key]
        c.spin = 0.0 if atoms is None else float(spin_for(atoms))
        return c

    for k, f in enumerate(frames):  # every structure is checked first (bcc Na's calculator: no charge or spin read)
        check_structure(f, calc_for(None).elements, name=f"{cfg.structures or 'built structure'} frame {k}")
    _check_host_series(frames, str(cfg.structures) if cfg.structures is not None
                       else f"the built series (--x-max {cfg.x_max})")
    temperature = _md_temperature(cfg, frames, run) if cfg.md_average else None
    _warn_composition(run, calc_for(frames[0]).composition_span, frames, str(cfg.structures or "the built series"))
    cell = cfg.cell
    if cell == "auto":
        layered = all(f.pbc.all() and f.info.get("stacking") not in ("slab", "bilayer") for f in frames)
        cell = "c" if layered else "fixed"
    res, relaxed = sodiation_series(frames, calc_for, 0 if cfg.md_average else cfg.relax_steps, cfg.fmax, cell=cell,
                                    mu_na_lattice=cfg.mu_na_lattice, stress_tol=cfg.stress_tol,
                                    temperature_K=temperature)
    _warn_scan_edge(res, "the model", run)
    if res.get("relaxations_unconverged"):
        run.log.warning("%d of %d relaxations did not reach fmax %g eV/A%s within %d steps (ocv.json: relaxation); "
                        "their energies and volumes are not minima: raise --relax-steps", res["relaxations_unconverged"],
                        len(frames), cfg.fmax, f" and {cfg.stress_tol:g} GPa" if cell != "fixed" else "",
                        cfg.relax_steps)
    if res["capacity_limited_by_sampled_x"]:
        run.log.warning("no Na plates up to x = %g, the largest x given: the capacity %.1f mAh/g is a lower bound; "
                        "sample higher x (build --x) to find where plating starts", max(res["x"]),
                        res["capacity_mAh_g"])
    summary = {"average_voltage_V": res["average_voltage_V"], "capacity_mAh_g": res["capacity_mAh_g"],
               "capacity_limited_by_sampled_x": res["capacity_limited_by_sampled_x"],
               "mu_na_eV": res["mu_na_eV"], "mu_na_lattice_A": res.get("mu_na_lattice_A"),
               "hull_points": len(res["hull_vertices"]), "plateaus": len(res["steps"]),
               "cell_relaxation": res["cell_relaxation"],
               "max_volume_change": _largest(res["volume_change"].values()),
               "max_spacing_change": _largest(res["spacing_change"].values()),
               "relaxations_unconverged": res.get("relaxations_unconverged", 0),
               "plating_from_x": res["plating_from_x"], "energy_per_x": res["energy_per_x"]}
    if "temperature_K" in res:
        summary["temperature_K"] = res["temperature_K"]
    if cfg.reference == "xtb":
        res["reference"] = _xtb_reference_hull(relaxed, res, cfg, run)
        summary.update({"reference": "GFN1-xTB",
                        "reference_average_voltage_V": res["reference"]["average_voltage_V"],
                        "max_voltage_difference_V": res["reference"]["max_voltage_difference_V"],
                        "max_voltage_difference_same_mu_V": res["reference"]["max_voltage_difference_same_mu_V"]})
    voltage_plot(run.outputs_dir / "voltage_profile.png", res["x"], res["formation_energy_eV"], res["steps"],
                 res["capacity_per_x_mAh_g"], reference=res.get("reference"), capacity_mAh_g=res["capacity_mAh_g"],
                 capacity_is_lower_bound=res["capacity_limited_by_sampled_x"], caveats=_ocv_caveats(res, len(frames)))
    _write_extxyz(run.outputs_dir / "relaxed.extxyz", _relaxed_frames(relaxed))
    write_json(run.outputs_dir / "ocv.json", res)
    return {**summary, "model": _model_names(cfg.model), "output": str(run.outputs_dir / "ocv.json")}


def _md_temperature(cfg, frames, run) -> float:
    """The one temperature of MD frames (their mean kinetic temperature, info['temperature'] as
    `tub mlff md` writes it) for ``--md-average``; frames that are not MD frames are an error."""
    if cfg.structures is None:
        raise TubError("--md-average reads MD frames: give --structures (frames of tub mlff md runs at each x)")
    flags = {"relax_steps": "--relax-steps", "cell": "--cell", "fmax": "--set fmax", "stress_tol": "--set stress_tol",
             "reference": "--reference"}
    idle = given_fields(cfg, list(flags))
    if idle:
        raise TubError(f"--md-average averages MD frames as they are; {', '.join(flags[f] for f in idle)} would not "
                       "be used: drop them")
    set_temps = {f.info.get("temperature_set_K") for f in frames}
    if None not in set_temps:  # the thermostats' temperatures (tub mlff md writes them)
        if len(set_temps) > 1:
            raise TubError(f"{cfg.structures}: the MD frames come from runs at {', '.join(f'{t:g}' for t in sorted(set_temps))}"
                           " K; average runs at one temperature")
        return float(set_temps.pop())
    temps = [f.info.get("temperature") for f in frames]
    if any(t is None for t in temps):
        raise TubError(f"{cfg.structures}: --md-average needs MD frames with info['temperature'] (as tub mlff md "
                       "writes them); these are not all MD frames")
    by_x: dict[int, list[float]] = {}
    for f, t in zip(frames, temps):
        by_x.setdefault(int((f.numbers == 11).sum()), []).append(float(t))
    means = {x: float(np.mean(ts)) for x, ts in by_x.items()}
    T = float(np.mean(temps))
    # a small cell's kinetic temperature fluctuates by sqrt(2 / 3N) (14 % at 33 atoms): runs at one set
    # temperature differ by that over a few frames, runs at 300 and 500 K by far more
    if max(means.values()) - min(means.values()) > 0.25 * T:
        raise TubError(f"{cfg.structures}: the MD frames are at different temperatures per Na count "
                       f"({', '.join(f'{x} Na: {t:.0f} K' for x, t in sorted(means.items()))}); average runs at "
                       "one temperature")
    run.log.warning("%s: the frames do not record their thermostat's temperature (info['temperature_set_K'], "
                    "written by tub mlff md): their mean kinetic temperature, %.0f K, is used, and runs whose set "
                    "temperatures differ by less than about 25 %% cannot be told apart", cfg.structures, T)
    return T


def _relaxed_frames(relaxed) -> list:
    """The relaxed structures with their model energy and Na count, to check, run MD on or label."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k, a in enumerate(relaxed):
        f = a.copy()
        f.calc = SinglePointCalculator(f, energy=float(a.get_potential_energy()))
        f.info.update({"ocv_input_frame": k, "n_na": int((a.numbers == 11).sum())})
        frames.append(f)
    return frames


def _check_host_series(frames, name: str, cell_tolerance: float = 0.2) -> None:
    """TubError unless ``frames`` are one host, Na-free and Na-loaded: the same non-Na atoms, pbc and
    cell (each periodic vector within ``cell_tolerance``, so that loading may swell the cell)."""
    counts = [int((f.numbers == 11).sum()) for f in frames]
    if 0 not in counts or max(counts) == 0:
        missing = "no Na-free frame" if 0 not in counts else "no frame with Na"
        raise TubError(f"ocv needs at least one Na-loaded structure and the Na-free host; {name} has {missing}")
    h = counts.index(0)
    host = frames[h]
    for k, f in enumerate(frames):
        if sorted(f.numbers[f.numbers != 11]) != sorted(host.numbers):
            raise TubError(f"{name}: frame {k} ({f.get_chemical_formula()}) is not the host of frame {h} "
                           f"({host.get_chemical_formula()}) plus Na; give the structures of one host only")
        moved = np.linalg.norm(f.cell.array - host.cell.array, axis=1)
        if (f.pbc != host.pbc).any() or (moved > cell_tolerance * np.linalg.norm(host.cell.array, axis=1))[host.pbc].any():
            raise TubError(f"{name}: frame {k} has another cell than the host (frame {h}) beyond "
                           f"{cell_tolerance:.0%}; give the structures of one host cell only")


def _largest(changes) -> float:
    """The change of largest magnitude; NaN when none was measured (fixed cell, no interlayer)."""
    measured = [v for v in changes if np.isfinite(v)]
    return max(measured, key=abs) if measured else float("nan")


def _ocv_caveats(report: dict, n_structures: int) -> list[str]:
    """The warnings of an ocv run about its own result, in short, for the voltage figure."""
    out = []
    cohesive = report.get("na_cohesive_energy_eV")
    if cohesive is not None and cohesive < 0.1:
        out.append(f"the model binds bcc Na by {cohesive:.3f} eV/atom (experiment 1.11): the voltages are not "
                   "against Na metal")
    from .battery import BCC_NA_EXPERIMENT

    a0 = report.get("mu_na_lattice_A")
    if report.get("mu_na_at_scan_edge"):
        out.append(f"mu_Na taken at the end of the bcc lattice scan (a = {a0:.2f} Å)")
    elif report.get("mu_na_choice") == "minimum" and abs(a0 / BCC_NA_EXPERIMENT - 1) > 0.05:
        out.append(f"the model's bcc Na minimum is at a = {a0:.2f} Å (experiment {BCC_NA_EXPERIMENT:.2f} Å): the "
                   "voltages shift with that mu_Na")
    if report.get("relaxations_unconverged"):
        out.append(f"{report['relaxations_unconverged']} of {n_structures} relaxations did not converge: their "
                   "energies are not minima")
    return out


def _warn_scan_edge(report: dict, who: str, run) -> None:
    from .battery import BCC_NA_EXPERIMENT

    cohesive = report.get("na_cohesive_energy_eV")
    if cohesive is not None and cohesive < 0.1:
        run.log.warning("bcc Na: %s binds Na metal by %.3f eV/atom (experiment 1.11 eV), so mu_Na is near the energy "
                        "of free Na atoms and the voltages are not against Na metal; use a model trained on bcc Na",
                        who, cohesive)
    a0 = report.get("mu_na_lattice_A")
    if report.get("mu_na_at_scan_edge"):
        run.log.warning("bcc Na: %s's energy still falls at the end of the lattice scan (a = %.2f A); mu_Na is "
                        "taken there, so the voltages depend on that choice", who, a0)
    elif report.get("mu_na_choice") == "minimum" and abs(a0 / BCC_NA_EXPERIMENT - 1) > 0.05:
        run.log.warning("bcc Na: %s's minimum is at a = %.2f A (experiment %.2f A), so its Na metal is poor and the "
                        "voltages shift with mu_Na; --mu-na-lattice %.2f takes mu_Na at experiment's lattice constant",
                        who, a0, BCC_NA_EXPERIMENT, BCC_NA_EXPERIMENT)


def _xtb_reference_hull(relaxed, res, cfg, run) -> dict:
    """The GFN1-xTB hull of the structures the model relaxed (spec target: within 0.05 V).

    Single points by default (the same structures); ``reference_relax_steps`` relaxes them further
    with xTB first. mu_Na comes from xTB's own bcc scan (16-atom cells, Gamma point, as the labels).
    """
    from ase.build import bulk
    from ase.calculators.calculator import CalculationFailed

    from .battery import max_voltage_difference, sodiation_series
    from .labelling import xtb_calculator

    bcc = bulk("Na", "bcc", a=4.2, cubic=True).repeat(2)
    run.log.info("GFN1-xTB reference hull: %d structures and the bcc Na scan", len(relaxed))
    try:
        ref, _ = sodiation_series(relaxed, lambda a: xtb_calculator(bcc if a is None else a),
                                  cfg.reference_relax_steps, cfg.fmax, cell=res["cell_relaxation"],
                                  mu_na_lattice=cfg.mu_na_lattice, stress_tol=cfg.stress_tol)
    except CalculationFailed as exc:
        raise TubError(f"tblite failed on the reference hull: {exc}", exit_code=1) from None
    _warn_scan_edge(ref, "GFN1-xTB", run)
    ref["method"] = "GFN1-xTB (tblite), " + (f"relaxed {cfg.reference_relax_steps} BFGS steps further"
                                            if cfg.reference_relax_steps else "single points on the model's structures")
    ref["max_voltage_difference_V"] = max_voltage_difference(res["steps"], ref["steps"])
    # the same comparison with xTB's mu_Na for both: what the Na_x host energetics alone contribute
    # (a shift of mu_Na by d moves every hull voltage by -d and leaves the hull vertices unchanged)
    d_mu = res["mu_na_eV"] - ref["mu_na_eV"]
    ref["mu_na_difference_eV"] = d_mu
    ref["max_voltage_difference_same_mu_V"] = max_voltage_difference(
        [{**s, "voltage_V": s["voltage_V"] - d_mu} for s in res["steps"]], ref["steps"])
    return ref


# -- diffusion -----------------------------------------------------------------------------------
def _one_trajectory(frames, times, path) -> tuple[list, list]:
    """The frames and times of one trajectory at evenly spaced times; TubError for anything else.

    A final frame off the saving grid (a run whose --steps is no multiple of --interval) is left out.
    """
    t = np.asarray(times, dtype=float)
    dt = np.diff(t)
    if len(dt) > 2 and 0 < dt[-1] < dt[0] and np.isclose(dt[:-1], dt[0], rtol=1e-4).all():
        frames, times, dt = frames[:-1], times[:-1], dt[:-1]
    bad = np.where((dt <= 0) | ~np.isclose(dt, dt[0], rtol=1e-4))[0] if len(dt) else []
    if len(bad):
        k = int(bad[0]) + 1
        raise TubError(f"{path}: frame {k} is at {t[k]:g} fs after {t[k - 1]:g} fs, but diffusion needs frames at "
                       f"evenly spaced, increasing times (every {dt[0]:g} fs here); give one trajectory from "
                       "`tub mlff md`, not runs joined together")
    for k, f in enumerate(frames):
        if len(f) != len(frames[0]) or (f.numbers != frames[0].numbers).any() or (f.pbc != frames[0].pbc).any():
            raise TubError(f"{path}: frame {k} has other atoms or pbc than frame 0; give one trajectory per file")
    return frames, times


def _arrhenius_problem(runs: list[dict]) -> str | None:
    """Why the runs cannot be fitted to ln D = ln D0 - Ea/kT (None: they can)."""
    T = np.array([r["temperature_K"] for r in runs], dtype=float)
    if not np.isfinite(T).all():
        return "a trajectory has no temperatures in its frames"
    if any(r["D_cm2_s"] <= 0 for r in runs):
        return "a trajectory has D <= 0 (too short to leave the ballistic regime?)"
    if T.max() < 1.05 * T.min():  # one temperature, within the thermostat's fluctuation
        return (f"all trajectories are at about the same temperature ({T.min():.0f}-{T.max():.0f} K); an Arrhenius "
                "fit needs runs at two or more temperatures (e.g. 500-900 K)")
    return None


def diffusion(cfg, run) -> dict:
    """D of ``cfg.element`` per trajectory (cm^2/s, with an error bar) and an Arrhenius fit over temperatures.

    Both estimators use the Einstein relation, D = MSD(t) / (2 d t) over the d = len(axes) axes, on
    positions unwrapped across the periodic directions:

    - ``einstein`` (default): the MSD is averaged over the atoms and every time origin, the drift
      (mean displacement of the host framework, ``drift``) is removed, and the straight line is fitted
      from fit_start to fit_end times the longest lag, after the ballistic start and before the noisy
      tail. D is the mean over ``blocks`` blocks, D_err its standard error.
    - ``ase``: ``ase.md.analysis.DiffusionCoefficient``'s estimator, with ``blocks`` as its segments:
      per segment the MSD from the segment's first frame only, no drift removal, a line fitted over
      the whole segment from lag 0. D is the mean of the slopes over segments and axes and equals
      ASE's on the same frames to rounding (2-D: the mean of ``dc.slopes[k][:, :2]`` x ``units.fs``
      x 0.1 = cm^2/s); D_err is the standard error over segments, ``D_std_ase_cm2_s`` ASE's std.

    They differ because one origin per segment is a noisier average than all of them, because a
    drift of the centre of mass adds to ASE's MSD, and because ASE's fit includes the ballistic start
    and the long lags. Times are info['time_fs'] (``tub mlff md``) or k x ``timestep`` fs (ASE .traj,
    LAMMPS); temperatures info['temperature'] or, failing that, the saved momenta.
    """
    from .data import read_structures
    from .diffusion import (A2_PER_FS_TO_CM2_PER_S, arrhenius_fit, ase_diffusion_coefficient, diffusion_coefficient,
                            diffusive_regime,
                            msd, unwrap)
    from .plots import arrhenius_plot, block_mean_msd, msd_plot

    paths = _need(cfg.trajectories, "TRAJECTORIES", "one or more MD trajectories (extxyz or ASE .traj)")
    _say_precision_unused(cfg, run)
    ase_style = cfg.estimator == "ase"
    if ase_style and (fixed := sorted({"drift", "fit_start", "fit_end"} & cfg.model_fields_set)):
        raise TubError(f"--estimator ase has no {'/'.join(fixed)} setting (one time origin per block, no drift "
                       "removal, fit over the whole block, as ASE); drop it or use --estimator einstein")
    if not ase_style and cfg.fit_start >= cfg.fit_end:
        raise TubError(f"fit_start ({cfg.fit_start:g}) must be below fit_end ({cfg.fit_end:g}): the fit runs from "
                       "fit_start to fit_end times the longest lag; e.g. --set fit_start=0.2 --set fit_end=0.8")
    if cfg.temperatures and len(cfg.temperatures) != len(paths):
        raise TubError(f"{len(cfg.temperatures)} --temperature value(s) for {len(paths)} trajectories; give one per "
                       "trajectory, in order, or none")
    if any(t <= 0 for t in cfg.temperatures):
        raise TubError("--temperature must be positive kelvin, one per trajectory")
    dumps = {p for p in paths if _is_lammps_dump(p)}
    if cfg.species and not dumps:
        raise TubError("--species names the elements of LAMMPS atom types, and no trajectory is a LAMMPS dump; "
                       "drop it")
    per_run, curves = [], {}
    for k_run, p in enumerate(paths):
        frames = _read_trajectory(p, p in dumps, cfg.species or None, run.log)
        stamps = [f.info.get("time_fs") for f in frames]
        if all(t is not None for t in stamps):
            times = [float(t) for t in stamps]
        elif cfg.timestep is None:
            raise TubError(f"{p}: frames lack info['time_fs']; pass --timestep FS (fs between saved frames)")
        else:
            times = [k * cfg.timestep for k in range(len(frames))]
        frames, times = _one_trajectory(frames, times, p)
        if cfg.timestep is not None and len(times) > 1 and not np.isclose(times[1] - times[0], cfg.timestep,
                                                                           rtol=1e-4):
            raise TubError(f"{p}: info['time_fs'] puts frames {times[1] - times[0]:g} fs apart, but --timestep is "
                           f"{cfg.timestep:g}; drop --timestep or correct it")
        kept = [k for k, t in enumerate(times) if t >= 1000 * cfg.equilibration]
        frames, times = [frames[k] for k in kept], [times[k] for k in kept]
        if len(frames) < 5:
            raise TubError(f"{p} has {len(frames)} frames after {cfg.equilibration:g} ps of equilibration; "
                           "diffusion needs at least 5: run longer or lower --equilibration")
        if len(frames) // cfg.blocks < 4:
            raise TubError(f"{p}: {len(frames)} frames in {cfg.blocks} blocks leave fewer than 4 frames per block; "
                           "lower --blocks or run longer")
        dt = float(times[1] - times[0])
        symbols = np.array(frames[0].get_chemical_symbols())
        sel = np.where(symbols == cfg.element)[0]
        if len(sel) == 0:
            raise TubError(f"{p} has no {cfg.element} atoms")
        host = np.where(symbols != cfg.element)[0]
        drift = [] if ase_style else {"framework": host if len(host) else None, "all": None, "none": []}[cfg.drift]
        scaled = np.stack([f.get_scaled_positions(wrap=True) for f in frames])  # wraps periodic directions only
        cells = np.stack([f.cell.complete().array for f in frames])  # a missing (open-direction) vector as a unit one
        pos = unwrap(scaled, cells, pbc=frames[0].pbc)
        if ase_style:
            res = ase_diffusion_coefficient(pos, dt, atoms=sel, axes=cfg.axes, segments=cfg.blocks)
        else:
            res = diffusion_coefficient(pos, dt, atoms=sel, axes=cfg.axes, fit_start=cfg.fit_start,
                                        fit_end=cfg.fit_end, blocks=cfg.blocks, drift_atoms=drift)
        temps = [f.info.get("temperature") for f in frames]
        if all(t is None for t in temps) and frames[0].has("momenta"):
            temps = [f.get_temperature() for f in frames]  # e.g. ASE .traj: kinetic temperature of the saved momenta
        T = float(np.mean([t for t in temps if t is not None])) if any(t is not None for t in temps) else float("nan")
        set_T = {f.info.get("temperature_set_K") for f in frames}  # the thermostat's, as `tub mlff md` writes it
        set_T = float(set_T.pop()) if len(set_T) == 1 and None not in set_T else None
        if cfg.temperatures:
            if np.isfinite(T) and abs(T - cfg.temperatures[k_run]) > 0.1 * cfg.temperatures[k_run]:
                run.log.warning("%s: its frames say %.0f K; --temperature %g K is used", p, T, cfg.temperatures[k_run])
            T = float(cfg.temperatures[k_run])
        elif set_T and np.isfinite(T) and abs(T - set_T) > 0.1 * set_T:
            run.log.warning("%s: its frames average %.0f K, the thermostat was set to %g K: not equilibrated (raise "
                            "--equilibration, ps, or run longer); the fit takes %.0f K (--temperature to choose)",
                            p, T, set_T, T)
        m = msd(pos, sel, cfg.axes, drift_atoms=drift)  # whole run, all origins: FFT, O(T log T)
        name = Path(p).parent.parent.name if Path(p).stem == "trajectory" else Path(p).stem  # tub md's layout
        bt, bm = block_mean_msd(pos, sel, cfg.axes, dt, cfg.blocks, drift, one_origin=ase_style)
        slope, msd_end = diffusive_regime(bt, bm, (res.fit_start_fs, res.fit_end_fs))
        regime = short = None
        if slope > 1.5:
            regime = (f"its MSD grows as t^{slope:.1f} in the fit window ({res.fit_start_fs:g}-{res.fit_end_fs:g} fs): "
                      "the ballistic start, not diffusion")
            short = f"MSD ∝ t^{slope:.1f}: ballistic"
        elif msd_end * 3 / res.dims < 1.0:  # less than 1 A^2 in 3-D terms (1/3 A^2 per axis)
            regime = (f"its {cfg.element} atoms moved {np.sqrt(max(msd_end, 0)):.2f} A (rms over {cfg.axes}) by the "
                      "fit window's end: vibration about their sites, no hop yet")
            short = f"rms {np.sqrt(max(msd_end, 0)):.2f} Å: no hop yet"
        if regime:
            run.log.warning("%s: %s; its D is not a diffusion coefficient: run longer MD", p, regime)
        per_run.append({"trajectory": str(p), "temperature_K": T, "temperature_set_K": set_T, "D_cm2_s": res.D_cm2_s,
                        "D_err_cm2_s": res.D_err_cm2_s, "frames": len(frames), "estimator": cfg.estimator,
                        # what the slope was fitted over, so that D can be checked against the MSD curve
                        "fit_window_fs": [float(res.fit_start_fs), float(res.fit_end_fs)], "axes": cfg.axes,
                        "dims": int(res.dims), "blocks": cfg.blocks,
                        "msd_loglog_slope": slope, "msd_at_fit_end_A2": msd_end, "not_diffusive": regime})
        if ase_style:
            per_run[-1]["D_std_ase_cm2_s"] = res.D_std * A2_PER_FS_TO_CM2_PER_S
        curves[f"{name} ({T:.0f} K)"] = {"t": np.arange(len(m)) * dt, "msd": m, "block_t": bt, "block_msd": bm,
                                        "window": (res.fit_start_fs, res.fit_end_fs), "D_cm2_s": res.D_cm2_s,
                                        "D_err_cm2_s": res.D_err_cm2_s, "dims": res.dims, "not_diffusive": short}
    msd_plot(run.outputs_dir / "msd.png", curves, cfg.axes, cfg.element, cfg.estimator)
    remove_figure(run.outputs_dir / "arrhenius.png")  # drawn again below only where this run fits one
    out = {"runs": per_run}
    if len(per_run) < 2:
        problem = "one trajectory; an Arrhenius fit needs runs at two or more temperatures"
        run.log.info("no Arrhenius fit: %s", problem)
    elif problem := _arrhenius_problem(per_run):
        run.log.warning("no Arrhenius fit: %s; D is reported per trajectory", problem)
    if problem:
        out["arrhenius_skipped"] = problem
    else:
        Ts = [r["temperature_K"] for r in per_run]
        fit = arrhenius_fit(Ts, [r["D_cm2_s"] for r in per_run], [r["D_err_cm2_s"] for r in per_run])
        out["arrhenius"] = {"Ea_eV": fit.Ea, "Ea_err_eV": fit.Ea_err, "D0_cm2_s": fit.D0,
                            f"D_{cfg.target_temperature:.0f}K_cm2_s": fit.D(cfg.target_temperature),
                            f"D_{cfg.target_temperature:.0f}K_err_cm2_s": fit.D_err(cfg.target_temperature),
                            # ×/÷ exp(σ ln D): the fit is in ln D, and an extrapolated ± can exceed D itself
                            f"D_{cfg.target_temperature:.0f}K_interval_cm2_s": list(fit.D_interval(cfg.target_temperature))}
        if not_diffusive := [r["trajectory"] for r in per_run if r["not_diffusive"]]:
            out["arrhenius"]["unreliable"] = f"not in the diffusive regime: {', '.join(not_diffusive)}"
            run.log.warning("the Arrhenius fit takes D from %d run(s) not in the diffusive regime; its Ea and D(%g K) "
                            "mean nothing until they are longer", len(not_diffusive), cfg.target_temperature)
        arrhenius_plot(run.outputs_dir / "arrhenius.png", per_run, fit, cfg.target_temperature, cfg.element,
                       out["arrhenius"].get("unreliable"))
    write_json(run.outputs_dir / "diffusion.json", out)
    return out


def _is_lammps_dump(path) -> bool:
    from ase.io.formats import filetype

    try:
        return filetype(str(path), guess=False).startswith("lammps-dump")
    except Exception:  # noqa: BLE001 -- unknown or unreadable: read_structures says what is wrong
        return False


def _read_trajectory(path, lammps_dump: bool, species: list[str] | None, log):
    """Frames of one trajectory. ASE reads a LAMMPS dump's atom type n as atomic number n (its momenta
    from those masses): ``species`` names the element of each type, and the velocities are kept."""
    from .data import read_structures

    frames = read_structures(path)
    if not lammps_dump:
        return frames
    types = sorted(set(frames[0].numbers.tolist()))
    if species is None:
        if types == list(range(1, len(types) + 1)):  # plain type ids, not elements from an element column
            log.warning("%s: LAMMPS atom types read as atomic numbers (%s), and masses, temperature and --element "
                        "follow them; give --species (e.g. C,Na) with the element of each type", path,
                        ", ".join(f"type {t} = {frames[0].symbols[list(frames[0].numbers).index(t)]}" for t in types))
        return frames
    from ase.data import atomic_numbers

    unknown = [s for s in species if s not in atomic_numbers]
    if unknown:
        raise TubError(f"--species {','.join(unknown)}: not element symbols; give one per LAMMPS atom type, e.g. C,Na")
    if types[-1] > len(species):
        raise TubError(f"{path} has atom types up to {types[-1]}, --species names {len(species)}; give the element "
                       "of every type, in type order")
    z = np.array([0] + [atomic_numbers[s] for s in species])
    for a in frames:
        v = a.get_velocities() if a.has("momenta") else None
        a.numbers = z[a.numbers]
        if v is not None:
            a.set_velocities(v)  # the dump's velocities, now with the right masses
    return frames


# -- explain -------------------------------------------------------------------------------------
def _explain_walks(calc, atoms, cfg, path) -> dict:
    """GNN-LRP n-body relevances of one structure (a committee: the members' mean, which explains the
    committee's mean e_nn exactly): NPZ to ``path``, a summary back."""
    from .relevant_walks import committee_mean, walk_relevances

    d = atoms.get_all_distances(mic=bool(np.any(atoms.pbc)))
    batch = calc.batch_for(atoms)
    w = committee_mean([walk_relevances(m, batch, d, order=cfg.walks, radius=cfg.walk_radius) for m in calc.models])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, one_body=w.one_body, two_body=w.two_body, triples=w.triples, three_body=w.three_body,
                            walks_total=w.walks_total, bias=w.bias, reference=w.reference, e_nn=w.e_nn, distances=d)
    sym = atoms.get_chemical_symbols()
    iu, ju = np.triu_indices(len(atoms), 1)
    by_elements: dict[str, float] = {}
    for i, j in zip(iu, ju):
        key = "-".join(sorted((sym[i], sym[j])))
        by_elements[key] = by_elements.get(key, 0.0) + float(w.two_body[i, j])
    strongest = np.argsort(-np.abs(w.two_body[iu, ju]))[:5]
    return {"e_nn_eV": w.e_nn, "element_reference_eV": w.reference, "bias_eV": w.bias,
            "one_body_eV": float(w.one_body.sum()), "two_body_eV": float(w.two_body[iu, ju].sum()),
            "three_body_eV": float(w.three_body.sum()), "triples": len(w.triples),
            "higher_order_eV": float(w.higher_order), "two_body_by_elements_eV": dict(sorted(by_elements.items())),
            "strongest_pairs": {f"{sym[iu[s]]}{iu[s]}-{sym[ju[s]]}{ju[s]}": {
                "distance_A": float(d[iu[s], ju[s]]), "relevance_eV": float(w.two_body[iu[s], ju[s]])} for s in strongest},
            "output": str(path), "one_body": w.one_body}


def _untrained_charges(model_paths) -> str | None:
    """The first tub model whose recorded training config fitted neither charges nor dipoles (None if all did,
    or if a model records no training config, e.g. a reference parameters.pth)."""
    from .checkpoints import read_model_meta

    for p in _models(model_paths):
        if p.suffix == ".safetensors" and isinstance(tc := read_model_meta(p).get("train_config"), dict) \
                and not tc.get("charges_weight") and not tc.get("dipole_weight"):
            return p.name
    return None


def explain(cfg, run) -> dict:
    from .data import read_structures
    from .explain import attention_maps, classify_sodium_sites, committee_disagreement, decompose, site_summary
    from .validation import check_structure

    path = _need(cfg.structures, "STRUCTURES", "an extxyz file")
    frames = read_structures(path)
    if untrained := _untrained_charges(cfg.model):
        run.log.warning("%s learned no charges (charges_weight and dipole_weight 0 in its training config): its "
                        "atomic charges only carry the total charge, so read the per-atom and per-site charges "
                        "as uncalibrated", untrained)
    summary = {"structures": len(frames), "sites": {}}
    rows = []
    for k, atoms in enumerate(frames):
        calc = _calculator(run, cfg.model, atoms, cfg.charge, cfg.spin, name=f"{path} frame {k}")
        check_structure(atoms, calc.elements, name=f"{path} frame {k}")
        if k == 0:
            _warn_composition(run, calc.composition_span, frames, str(path))
        dec = decompose(calc, atoms)
        sites = classify_sodium_sites(atoms)
        per_site = site_summary(dec, sites)
        for label, v in per_site.items():
            agg = summary["sites"].setdefault(label, {"count": 0, "energy_sum": 0.0, "charge_sum": 0.0})
            agg["count"] += v["count"]
            agg["energy_sum"] += v["mean_atomic_energy_eV"] * v["count"]
            agg["charge_sum"] += v["mean_charge_e"] * v["count"]
        out = atoms.copy()
        for name in ("atomic_energy", "e_nn", "e_zbl", "e_coulomb", "e_d4", "charges", "polarizability_A3",
                     "c6_eVA6"):  # the last two: D4 models only
            if name in dec:
                out.arrays[f"mlff_{name}"] = dec[name]
        out.info["mlff_energy"] = dec["energy"]
        out.info["mlff_charge"], out.info["mlff_spin"] = calc.charge, calc.spin
        if len(calc.models) > 1:  # committee: where do the members disagree on the forces?
            dis = committee_disagreement(calc, atoms)
            out.arrays["mlff_force_disagreement"] = dis
            worst = summary.get("most_uncertain_atom")
            if worst is None or dis.max() > worst["force_disagreement_eV_A"]:
                i = int(dis.argmax())
                summary["most_uncertain_atom"] = {"structure": k, "atom": i, "element": atoms[i].symbol,
                                                  "force_disagreement_eV_A": float(dis[i])}
        rows.append(out)
        if cfg.attention:
            with atomic_path(run.outputs_dir / f"attention_{k:04d}.npz") as tmp, open(tmp, "wb") as f:
                np.savez_compressed(f, **attention_maps(calc, atoms))
        if cfg.walks:
            walks = _explain_walks(calc, atoms, cfg, run.outputs_dir / f"walks_{k:04d}.npz")
            out.arrays["mlff_walk_1body"] = walks.pop("one_body")
            summary.setdefault("walks", {})[str(k)] = walks
    _write_extxyz(run.outputs_dir / "explained.extxyz", rows)
    for label, agg in summary["sites"].items():
        agg["mean_atomic_energy_eV"] = agg.pop("energy_sum") / agg["count"]
        agg["mean_charge_e"] = agg.pop("charge_sum") / agg["count"]
    summary["output"] = str(run.outputs_dir / "explained.extxyz")
    summary["model"] = _model_names(cfg.model)
    return summary
