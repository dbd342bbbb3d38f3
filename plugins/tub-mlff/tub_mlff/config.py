"""Configs of the mlff verbs (pydantic; every field reachable with --set)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, field_validator
from tubcli.config import Section, TubConfig


class KeysSection(Section):
    energy: str = Field("energy", description="extxyz info key of the energy (eV)")
    forces: str = Field("forces", description="extxyz array key of the forces (eV/A)")
    stress: str = Field("stress", description="extxyz info key of the stress (eV/A^3, ASE's sign and Voigt order "
                        "xx yy zz yz xz xy, or 3x3)")
    virial: str = Field("virials", description="extxyz info key of a virial (eV; MACE/NequIP), read as stress -W/V "
                        "where a frame has no stress")
    charge: str = Field("charge", description="extxyz info key of the total charge (e)")
    spin: str = Field("spin", description="extxyz info key of the unpaired electrons")
    charges: str = Field("ref_charges", description="extxyz array key of reference atomic charges (e; optional)")
    dipole: str = Field("dipole", description="extxyz info key of the reference dipole (e A; molecules; optional)")


class ModelSection(Section):
    num_features: int = Field(64, ge=1, description="feature size F")
    num_basis_functions: int = Field(16, ge=1, description="radial basis size K")
    num_modules: int = Field(3, ge=1, description="interaction modules T")
    cutoff: float = Field(5.291772105638412, gt=0, description="short-range cutoff (A)")
    lr_cutoff: Optional[float] = Field(None, gt=0, description="long-range cutoff for Coulomb/D4 (A)")
    zbl: bool = Field(True, description="ZBL repulsion term")
    electrostatics: bool = Field(True, description="Coulomb term of the predicted charges")
    d4: bool = Field(False, description="D4 dispersion; its tables are buffers of a model file with D4 (a "
                     "reference .pth or a tub model made from one): use --init-from that file; from scratch d4=false")
    module_keep_prob: float = Field(1.0, gt=0, le=1, description="module dropout keep probability")


class ModelVerbConfig(TubConfig):
    """A verb that runs the model: forces need fp32 or fp64, so --help, config files and TUB_PRECISION offer
    only those."""

    precision: Literal["fp32", "fp64"] = Field("fp32", description="compute dtype of the model (forces need fp32 "
                                                                     "or fp64)")


class BuildConfig(TubConfig):
    n: int = Field(4, ge=2, description="graphene supercell n x n")
    groups: int = Field(1, ge=0, description="aminophenyl groups on the top face (of each sheet)")
    stacking: Literal["slab", "gallery", "bilayer"] = Field(
        "gallery", description="slab (one sheet, vacuum), gallery (sheets stacked every --interlayer) or bilayer (two "
        "AB-stacked sheets --interlayer apart, vacuum outside)")
    interlayer: float = Field(9.5, gt=0, description="sheet spacing for gallery and bilayer cells (A)")
    vacuum: float = Field(20.0, gt=0, description="cell height for slabs, added to --interlayer for bilayers (A)")
    x: list[int] = Field([0, 1, 2], min_length=1, description="Na atoms per cell to build")
    sites: Literal["ring", "amine", "top", "bottom", "gallery", "random"] = Field("random", description="Na sites")
    variants: int = Field(1, ge=1, description="structures per Na count (different Na sites and rattles); x=0 "
                          "gets them only with rattle > 0, else one bare host (its copies would be identical)")
    rattle: float = Field(0.0, ge=0, description="Gaussian displacement of all atoms (A)")

    @field_validator("x")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError(f"Na counts must be 0 or more, got {min(v)}")
        return v


class LabelConfig(TubConfig):
    structures: list[Path] = Field(default_factory=list, description="extxyz files to label")
    method: Literal["GFN1-xTB", "GFN2-xTB", "dft"] = Field("GFN1-xTB", description="labeller")
    xc: str = Field("PBE", description="DFT functional (method=dft)")
    basis: str = Field("def2-SVP", description="DFT basis (method=dft)")
    density_fit: bool = Field(False, description="RI density fitting for the DFT SCF (method=dft; faster)")
    cluster_radius: Optional[float] = Field(
        None, gt=0, description="carve H-capped clusters of this radius (A) from periodic cells (method=dft)")
    cluster_center: str = Field("Na", description="cluster centres: an element (one cluster per atom) or indices '0,12'")


class TrainConfig(ModelVerbConfig):
    data: Optional[Path] = Field(None, description="labelled extxyz training data")
    valid: Optional[Path] = Field(None, description="separate validation extxyz (else split from data)")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="validation share when no --valid")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="held-out test share (reported at the end)")
    split_by: str = Field("auto", description="frames with the same info[KEY] stay in one split (e.g. traj: one MD "
                          "trajectory, whose consecutive frames are near copies); auto = traj when every frame has "
                          "it, none = frame by frame")
    keys: KeysSection = KeysSection()
    model: ModelSection = ModelSection()
    init_from: Optional[Path] = Field(None, description="start from a model file (.safetensors or reference .pth)")
    epochs: int = Field(200, ge=1, description="maximum epochs")
    batch_size: int = Field(8, ge=1, description="structures per batch")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    lr_schedule: Literal["plateau", "cosine"] = Field(
        "plateau", description="plateau: multiply by lr_factor after lr_patience stalled epochs; cosine: anneal to min_lr over epochs")
    lr_patience: int = Field(10, ge=0, description="plateau schedule: stalled epochs before the learning rate drops")
    lr_factor: float = Field(0.5, gt=0, lt=1, description="plateau schedule: factor applied to the learning rate")
    min_lr: float = Field(1e-5, ge=0, description="lowest learning rate of either schedule")
    loss: Literal["mse", "huber"] = Field(
        "mse", description="mse, or huber: quadratic below huber_delta and linear above, to fit the MAE rather than outliers")
    huber_delta: float = Field(0.01, gt=0, description="huber loss: error (eV/atom, eV/A, eV/A^3) where it turns linear")
    energy_weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of the energy-per-atom loss")
    forces_weight: float = Field(10.0, ge=0, allow_inf_nan=False, description="weight of the force loss")
    stress_weight: float = Field(0.0, ge=0, allow_inf_nan=False, description="weight of the stress loss")
    charges_weight: float = Field(0.0, ge=0, allow_inf_nan=False,
                                  description="weight of the atomic-charge loss (needs reference charges)")
    dipole_weight: float = Field(0.0, ge=0, allow_inf_nan=False,
                                 description="weight of the dipole loss, as SpookyNet's paper trains (molecules)")
    e0s: Union[Literal["auto", "fit", "isolated"], dict[str, float]] = Field(
        "auto", description="per-element energies E0 (MACE's --E0s): isolated = from the frames with "
        "config_type=IsolatedAtom (always in the training share; forces optional); fit (or average) = least squares "
        "on the training energies; Cu=3.51,Au=3.80 or {29: 3.51, 79: 3.80} = given (eV; the file's IsolatedAtom "
        "frames are then left out); auto = isolated if the data has such frames, else fit")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA decay of the weights (0 = no averaging; warmed up "
                             "over the first steps as torch_ema/MACE do)")
    patience: int = Field(30, ge=1, description="early-stopping patience (epochs)")
    max_minutes: Optional[float] = Field(None, gt=0, description="stop a member after this many minutes")
    ensemble: int = Field(1, ge=1, description="committee size (members differ by seed)")
    keep: Literal["best", "last"] = Field("best", description="save the EMA weights of the best validation loss or the last epoch")


    @field_validator("e0s", mode="before")
    @classmethod
    def _e0_pairs(cls, value):
        """``Cu=3.51,Au=3.80``, ``{29: 3.51, 79: 3.80}`` or a YAML mapping: element symbols or atomic
        numbers to eV; ``average`` (MACE's name for the least-squares fit) is ``fit``."""
        if isinstance(value, str) and value.strip() == "average":
            return "fit"
        if isinstance(value, str) and value.strip().startswith("{"):
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"e0s {value!r} is not a mapping; write {{29: 3.51, 79: 3.80}} or Cu=3.51,Au=3.80") from None
        if isinstance(value, str) and "=" in value:
            pairs = [item.partition("=") for item in value.split(",") if item.strip()]
            try:
                value = {k.strip(): float(v) for k, _, v in pairs}
            except ValueError:
                raise ValueError(f"e0s {value!r}: write element=eV pairs, e.g. Cu=3.51,Au=3.80") from None
        if isinstance(value, dict):
            from ase.data import atomic_numbers, chemical_symbols

            out = {}
            for key, energy in value.items():
                key = str(key).strip()
                symbol = chemical_symbols[int(key)] if key.isdigit() and 0 < int(key) < len(chemical_symbols) else key
                if symbol not in atomic_numbers or symbol == "X":
                    raise ValueError(f"e0s: {key!r} is not an element; use symbols (Cu) or atomic numbers (29)")
                if isinstance(energy, str):  # YAML 1.1 reads -1e-3 (no dot) as text; other float fields take it
                    try:
                        energy = float(energy)
                    except ValueError:
                        pass
                if not isinstance(energy, (int, float)) or isinstance(energy, bool):
                    raise ValueError(f"e0s: the energy of {symbol} must be a number (eV), not {energy!r}")
                out[symbol] = float(energy)
            return out
        return value


class EvaluateConfig(ModelVerbConfig):
    data: Optional[Path] = Field(None, description="labelled extxyz test data")
    model: list[Path] = Field(default_factory=list, description="model file(s) or train run directories; several = "
                              "committee [default: the shipped demo model, demo_nacnh: Na/C/N/H]")
    keys: KeysSection = KeysSection()
    plots: bool = Field(True, description="write parity plots")


class PredictConfig(ModelVerbConfig):
    structures: list[Path] = Field(default_factory=list, description="structure files (extxyz or any format ASE "
                                   "reads), labelled or not")
    model: list[Path] = Field(default_factory=list, description="model file(s) or train run directories; several = "
                              "committee [default: the shipped demo model, demo_nacnh: Na/C/N/H]")
    keys: KeysSection = KeysSection()
    prefix: str = Field("mlff_", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                        description="prefix of the predictions' info/array keys (mlff_energy, mlff_forces, ...)")
    batch_size: int = Field(16, ge=1, description="structures per model call")


class MDConfig(ModelVerbConfig):
    structure: Optional[Path] = Field(None, description="starting structure (extxyz, last frame used)")
    model: list[Path] = Field(default_factory=list, description="model file(s) or train run directories; several = "
                              "committee [default: the shipped demo model, demo_nacnh: Na/C/N/H]")
    temp: float = Field(300.0, ge=0, allow_inf_nan=False, description="temperature (K)")
    steps: int = Field(1000, ge=1, description="total MD steps (a resumed run continues to this)")
    ensemble: Literal["nvt-langevin", "nvt-bussi", "nve", "npt"] = Field("nvt-langevin", description="ensemble")
    timestep: float = Field(0.5, gt=0, allow_inf_nan=False, description="time step (fs)")
    friction: float = Field(0.01, gt=0, allow_inf_nan=False, description="Langevin friction (1/fs)")
    taut: float = Field(100.0, gt=0, allow_inf_nan=False, description="thermostat time constant (fs)")
    pressure: float = Field(0.0, allow_inf_nan=False, description="NPT pressure (GPa; positive compresses)")
    npt_cell: Literal["full", "iso"] = Field(
        "full", description="NPT cell: full (every cell parameter moves: layered cells swell along c) or iso "
        "(the shape is kept, only the volume changes)")
    taup: float = Field(1000.0, gt=0, allow_inf_nan=False, description="barostat time constant (fs)")
    interval: int = Field(10, ge=1, description="steps between saved frames")
    charge: Optional[float] = Field(None, description="total charge (default: from the structure, else 0)")
    spin: Optional[float] = Field(None, ge=0, description="unpaired electrons (default: from the structure or parity)")
    lr_cutoff: Optional[float] = Field(None, gt=0, description="long-range cutoff for periodic runs (A; default 10)")
    ewald_kmax: Optional[int] = Field(
        None, ge=1, description="Ewald-sum the Coulomb term over reciprocal vectors |n| <= kmax (periodic cells)")


class OCVConfig(ModelVerbConfig):
    model: list[Path] = Field(default_factory=list, description="model file(s) or train run directories [default: "
                              "the shipped demo model, demo_nacnh: Na/C/N/H]")
    structures: Optional[Path] = Field(None, description="extxyz of Na_x host cells incl. the bare host (x=0)")
    n: int = Field(3, ge=2, description="graphene supercell when building structures")
    groups: int = Field(1, ge=0, description="aminophenyl groups when building")
    stacking: Literal["slab", "gallery", "bilayer"] = Field("gallery", description="stacking when building")
    interlayer: float = Field(9.0, gt=0, description="sheet spacing when building (A)")
    x_max: int = Field(3, ge=0, description="largest Na count per cell when building")
    variants: int = Field(2, ge=1, description="random site sets per Na count when building")
    relax_steps: int = Field(200, ge=0, description="most BFGS steps per structure (0 = single points)")
    fmax: float = Field(0.05, gt=0, description="relaxation force threshold (eV/A)")
    stress_tol: float = Field(0.02, gt=0, description="cell relaxation: residual stress threshold (GPa)")
    cell: Literal["auto", "fixed", "c", "full"] = Field(
        "auto", description="cell relaxation: fixed (atoms only), c (also the stacking axis under zero stress: the "
        "interlayer spacing and volume change of sodiation), full (every cell parameter); auto = c for cells periodic "
        "in 3-D that are not slabs, fixed otherwise")
    mu_na_lattice: Optional[float] = Field(
        None, gt=0, description="take mu_Na at this bcc Na lattice constant (A; experiment: 4.23) instead of at the "
        "potential's minimum, for the --reference hull too")
    reference: Optional[Literal["xtb"]] = Field(
        None, description="also compute the GFN1-xTB hull on the same structures and the largest voltage difference")
    reference_relax_steps: int = Field(0, ge=0, description="BFGS steps of xTB on each structure (0 = single points)")
    md_average: bool = Field(False, description="--structures holds MD frames (tub mlff md, NVT or NPT) at one "
                             "temperature: the mean energy per x (ΔG ≈ ΔU) against μ_Na + 3/2 k_B T, mean volumes and "
                             "spacings (NPT: ΔV/V₀); no relaxation")


class DiffusionConfig(TubConfig):
    trajectories: list[Path] = Field(default_factory=list,
                                     description="MD trajectories (extxyz, ASE .traj or any file ASE reads)")
    element: str = Field("Na", description="diffusing species")
    equilibration: float = Field(0.0, ge=0, description="discard the frames of the first this many ps (equilibration)")
    drift: Literal["framework", "all", "none"] = Field(
        "framework", description="drift removed: mean displacement of the host (the other elements), of all atoms, or none")
    axes: Literal["x", "y", "z", "xy", "xz", "yz", "xyz"] = Field("xy", description="axes of the MSD")
    fit_start: float = Field(0.2, ge=0, le=1, description="fit from this fraction of the longest lag")
    fit_end: float = Field(0.8, ge=0, le=1, description="fit up to this fraction of the longest lag (above fit_start)")
    blocks: int = Field(4, ge=1, description="blocks for error bars (segments for --estimator ase)")
    estimator: Literal["einstein", "ase"] = Field(
        "einstein", description="einstein: MSD averaged over all time origins, drift removed, fit from fit_start to "
        "fit_end (past the ballistic start); ase: ASE DiffusionCoefficient's estimator, same D as ASE on the same "
        "frames: one origin per block, no drift removal, fit over the whole block (noisier, can differ by ~10 %)")
    timestep: Optional[float] = Field(
        None, gt=0, description="fs between saved frames, for frames without info['time_fs'] (ASE .traj, LAMMPS)")
    target_temperature: float = Field(300.0, gt=0, description="Arrhenius extrapolation temperature (K)")
    species: list[str] = Field(default_factory=list, description="LAMMPS dumps: the element of each atom type in "
                               "type order, e.g. C,Na (ASE would read type n as atomic number n: 1 = H, 2 = He)")
    temperatures: list[float] = Field(default_factory=list, description="K of each trajectory, in order, for frames "
                                      "that record none (LAMMPS dumps without velocities); replaces the frames' own")

    @field_validator("species", "temperatures", mode="before")
    @classmethod
    def _comma_lists(cls, value):
        """C,Na as well as repeated options; kept in order and with repeats (two types may be one element)."""
        items = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(items, list):
            return value
        parts = [v for item in items for v in (item.split(",") if isinstance(item, str) else [item])]
        return [v.strip() if isinstance(v, str) else v for v in parts if not isinstance(v, str) or v.strip()]


class ExplainConfig(ModelVerbConfig):
    structures: Optional[Path] = Field(None, description="extxyz structures to explain")
    model: list[Path] = Field(default_factory=list,
                              description="model file(s) or train run directories; several = committee, adds each "
                              "atom's force disagreement [default: the shipped demo model, demo_nacnh: Na/C/N/H]")
    attention: bool = Field(True, description="also write attention maps")
    walks: int = Field(0, description="GNN-LRP relevant walks: 0 off, 2 = 1- and 2-body, 3 = also 3-body")
    walk_radius: float = Field(3.0, gt=0, description="3-body terms only for triples closer than this (A)")
    charge: Optional[float] = Field(None, description="total charge (default: from the structure)")
    spin: Optional[float] = Field(None, ge=0, description="unpaired electrons (default: from the structure or parity)")

    @field_validator("walks")
    @classmethod
    def _walk_order(cls, v: int) -> int:
        if v not in (0, 2, 3):
            raise ValueError(f"walks must be 0 (off), 2 (1- and 2-body) or 3 (also 3-body), not {v}")
        return v
