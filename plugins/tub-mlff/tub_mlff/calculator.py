"""ASE calculator for SpookyNet models and committees of them.

Properties: energy, free_energy, forces, stress (periodic), charges, dipole (molecules), energies (per atom),
features (the members' mean; left out for a committee whose members differ in width), hessian, plus
``energy_std``/``forces_std``/``stress_std``/``charges_std``/``dipole_std``/``hessian_std``/``force_disagreement``
for committees (the spread of the members, Politis-style query-by-committee uncertainty). The neighbour
list uses a Verlet skin: it is rebuilt (and the structure checked) only when an atom moved more than
skin/2 or the cell, pbc, or atoms changed.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from tubcli.device import resolve_device
from tubcli.errors import TubError

from .neighbors import neighbor_list
from .properties import compute
from .structures import spin_for
from .validation import check_charge_spin, check_structure

DEFAULT_PERIODIC_LR_CUTOFF = 10.0  # Angstrom


class SpookyNetCalculator(Calculator):
    """ASE calculator: ``SpookyNetCalculator(model_or_models_or_path, charge=0, spin=None)``; ``"demo"``
    (the default) is the small model shipped for trying things out, every CLI verb's default ``--model``.

    ``spin`` is the number of unpaired electrons (0 singlet, 2 triplet). None (the default) takes
    the lowest multiplicity the electron count allows (0 or 1, ``structures.spin_for``), as the CLI
    verbs do, so that an odd-electron cell is not run as an impossible singlet; a charge or spin the
    electron count cannot make is a TubError (``check=False`` skips this and the structure checks:
    for parity with codes that take any spin). The spin is a property of the whole cell (SpookyNet's
    electronic embedding spreads it over the atoms), as in the Gamma-point xTB labels: a small
    odd-electron cell of a metal (one bcc Na atom) gets a different energy per atom than its even
    supercell. Take references such as mu_Na from a cell large enough for that to vanish (`ocv` uses
    16 atoms) or pass ``spin=0`` for a closed-shell picture. For periodic cells a
    model without ``lr_cutoff`` gets ``lr_cutoff=10 A`` (a warning says so) so that Coulomb and
    D4 end smoothly instead of at the neighbour-list radius. ``ewald_kmax`` switches the Coulomb
    term of periodic cells to an Ewald sum (``SpookyNet.set_ewald``).

    ``charge`` and ``spin`` are ASE parameters: ``calc.set(charge=1)`` (or ``calc.charge = 1``) changes them
    and discards the results; ``atoms.info`` and initial charges or magnetic moments are not read (the CLI
    verbs read ``info['charge']``/``info['spin']``). A keyword that is neither these nor ASE's is an error.
    A module passed in is used as it is (put in eval mode; ``lr_cutoff`` and ``ewald_kmax`` are set on
    it) unless it must be converted to ``dtype`` or ``device``: then the calculator converts a copy and
    the caller's module is left as it was.

    Finite differences (of forces, for Hessians or phonons) need ``dtype=torch.float64``: float32 energies
    round at ~1e-5 relative. The nonlocal attention of SpookyNet (as the reference implements it and tub
    reproduces for parity) subtracts the maximum of its keys inside the feature map, beside a small
    constant, so forces jump by ~1e-4–1e-3 eV/A where that maximum passes from one atom to another: a
    finite-difference Hessian with a tiny step is then not symmetric, and NVE drift does not shrink as dt^2
    below ~0.25 fs. The ``hessian`` property is analytic (exact between such points).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "charges", "dipole", "energies",
                              "hessian", "features",
                              # committees only: the members' spread (absent from a single model's results)
                              "energy_std", "forces_std", "stress_std", "charges_std", "dipole_std", "hessian_std",
                              "force_disagreement"]
    _ASE_KEYWORDS = {"restart", "ignore_bad_restart_file", "label", "atoms", "directory"}

    def __init__(self, model="demo", charge: float = 0.0, spin: float | None = None, dtype=torch.float32,
                 device: str | torch.device = "cpu", lr_cutoff: float | str | None = "auto",
                 skin: float = 0.5, elements: set[int] | None = None, check: bool = True,
                 ewald_kmax: int | None = None, **kwargs):
        unknown = sorted(set(kwargs) - self._ASE_KEYWORDS)
        if unknown:  # ASE would keep them as parameters nobody reads (a typo such as Charge=1 would run neutral)
            raise TypeError(f"SpookyNetCalculator got unknown keyword(s) {', '.join(unknown)}; it takes charge, spin, "
                            "dtype, device, lr_cutoff, skin, elements, check, ewald_kmax and ASE's "
                            f"{', '.join(sorted(self._ASE_KEYWORDS))}")
        super().__init__(charge=float(charge), spin=_spin(spin), **kwargs)
        from .checkpoints import load_model, model_composition_span, model_elements, model_files, model_trained_states

        dtype = _torch_dtype(dtype)
        device = device if isinstance(device, torch.device) else \
            resolve_device(str(device), "fp64" if dtype == torch.float64 else "fp32")

        if isinstance(model, str) and model == "demo":
            from tub_mlff import DEMO_MODEL

            model = DEMO_MODEL
        members = model if isinstance(model, (list, tuple)) else [model]
        # a `tub mlff train` run directory stands for its model (every member of a committee)
        members = [f for m in members for f in (model_files(m) if isinstance(m, (str, Path)) else [m])]
        if not members:
            raise TubError(f"{model} holds no trained model (checkpoints/model.safetensors)")
        models, metas = [], []
        for m in members:
            if isinstance(m, (str, Path)):
                m, meta = load_model(m, dtype)
                metas.append(meta)
                # a model the calculator loaded itself is only evaluated: without weight gradients
                # autograd records no graph for the weights-only parts (embeddings, MLP weights),
                # ~10 % less time per MD step on small cells; forces (d/dR) are unchanged
                m.requires_grad_(False)
            elif any(t.dtype != dtype or t.device != torch.device(device) for t in _tensors(m)):
                m = copy.deepcopy(m)  # converting the caller's module would break whatever else uses it
            models.append(m.to(device=device, dtype=dtype).eval())
        if ewald_kmax is not None:
            for m in models:
                m.set_ewald(ewald_kmax)
        self.models = models
        self.dtype, self.device = dtype, torch.device(device)
        self.skin = float(skin)
        self.lr_option = lr_cutoff
        self.check = check
        if elements is None:
            elements = model_elements(metas)
        self.elements = elements if elements is not None else models[0].supported_elements()
        self.composition_span = model_composition_span(metas)  # None: the model does not record it
        # total charges / spins of the training frames (None: not recorded, a module passed in)
        self.trained_charges, self.trained_spins = model_trained_states(metas) if metas else (None, None)
        self._untrained_said: set = set()
        cut = {m.cutoff for m in models}
        if len(cut) != 1:
            raise ValueError("committee members must share the short-range cutoff")
        self._nl_key = None
        self._nl = None
        self._auto_lr: set[int] = set()  # models given DEFAULT_PERIODIC_LR_CUTOFF by "auto" for a cell
        self._stress_asked_here = False  # stress was asked at the current configuration
        self._stress_rate = 0.0  # how often it was asked at the recent ones (halving weights)

    # -- parameters ----------------------------------------------------------------------------
    @property
    def charge(self) -> float:
        return self.parameters["charge"]

    @charge.setter
    def charge(self, value) -> None:
        self.set(charge=value)

    @property
    def spin(self) -> float | None:
        return self.parameters["spin"]

    @spin.setter
    def spin(self, value) -> None:
        self.set(spin=value)

    def set(self, **kwargs) -> dict:
        """ASE's ``set``: ``charge`` and ``spin`` (checked); a change discards the results."""
        unknown = sorted(set(kwargs) - {"charge", "spin"})
        if unknown:
            raise TypeError(f"SpookyNetCalculator.set takes charge and spin, not {', '.join(unknown)}")
        checked = {k: float(v) if k == "charge" else _spin(v) for k, v in kwargs.items()}
        changed = super().set(**checked)
        if changed:
            self.reset()
            self._nl = None  # the next call rebuilds the list and checks the new charge and spin
        return changed

    # -- neighbour list ----------------------------------------------------------------------
    def _configure_lr(self, periodic: bool) -> None:
        for m in self.models:
            if not m.uses_long_range:
                continue
            if self.lr_option not in ("auto", None):
                if m.lr_cutoff != float(self.lr_option):
                    m.set_lr_cutoff(float(self.lr_option))
            elif periodic and m.lr_cutoff is None:
                if self.lr_option == "auto":
                    warnings.warn(f"periodic cell and no lr_cutoff: using lr_cutoff={DEFAULT_PERIODIC_LR_CUTOFF} A "
                                  "for Coulomb and D4 (pass lr_cutoff= to choose)", stacklevel=3)
                    m.set_lr_cutoff(DEFAULT_PERIODIC_LR_CUTOFF)
                    self._auto_lr.add(id(m))
                else:
                    raise ValueError("periodic cells need an lr_cutoff for the long-range terms")
            elif not periodic and id(m) in self._auto_lr:  # a molecule after a cell: all pairs again, as
                m.set_lr_cutoff(None)  # on a fresh calculator (the energy must not depend on what came before)
                self._auto_lr.discard(id(m))

    def _list_radius(self) -> float | None:
        m = self.models[0]
        radius = m.cutoff
        for mm in self.models:
            if mm.uses_long_range:
                if mm.lr_cutoff is None:
                    return None  # all pairs
                radius = max(radius, mm.lr_cutoff)
        return radius + self.skin

    @staticmethod
    def _list_key(atoms) -> bytes:
        return b"|".join([np.asarray(atoms.numbers, np.int64).tobytes(), np.asarray(atoms.pbc, bool).tobytes(),
                          np.asarray(atoms.cell, np.float64).tobytes()])

    def _list_is_current(self, atoms) -> bool:
        """The neighbour list still holds every pair within the cutoff: same atoms, cell and pbc, and no atom
        moved more than half the skin since it was built."""
        if self._nl is None or self._nl_key != self._list_key(atoms):
            return False
        return np.sqrt(((atoms.get_positions() - self._nl_pos) ** 2).sum(-1).max()) < 0.5 * self.skin

    def _neighbors(self, atoms):
        periodic = bool(np.any(atoms.pbc))
        key = self._list_key(atoms)
        pos = atoms.get_positions()
        if self._list_is_current(atoms):
            return self._nl
        if self.check:  # at every rebuild: atoms that came close since the last check moved more than skin/2
            check_structure(atoms, self.elements)
            q, s = check_charge_spin(atoms, self.charge, self.spin)
            self._say_untrained(q, s)
        self._configure_lr(periodic)
        radius = self._list_radius()
        if radius is None:  # molecule with untruncated long range: all pairs
            n = len(atoms)
            ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
            keep = ii != jj
            i, j, off = ii[keep], jj[keep], None
            d = np.linalg.norm(pos[j] - pos[i], axis=1)
        else:
            i, j, off, d = neighbor_list(pos, atoms.cell if periodic else None, atoms.pbc, radius)
            off = off if periodic else None
        L = lambda a: torch.as_tensor(a, dtype=torch.long, device=self.device)  # noqa: E731
        T = lambda a: None if a is None else torch.as_tensor(a, dtype=self.dtype, device=self.device)  # noqa: E731
        # short-range list (both directions) and a half list for the long-range terms
        sr = d < self.models[0].cutoff + self.skin
        lr_pairs = None
        if any(m.uses_long_range for m in self.models):
            if off is None:
                half = i < j
            else:
                image = (off[:, 0] * 4096 + off[:, 1]) * 4096 + off[:, 2]
                half = (i < j) | ((i == j) & (image > 0))
            lr_pairs = (L(i[half]), L(j[half]), T(None if off is None else off[half]))
        self._nl = (L(i[sr]), L(j[sr]), T(None if off is None else off[sr]), lr_pairs)
        self._nl_key, self._nl_pos = key, pos.copy()
        return self._nl

    def _say_untrained(self, charge: int, spin: int) -> None:
        """A warning (once per value) for a total charge or spin that no training frame had: the charge and
        spin embeddings never learned it (a model trained on neutral frames gives every charge one energy)."""
        from .checkpoints import untrained_states

        for what, value, trained in untrained_states(charge, spin, self.trained_charges, self.trained_spins,
                                                     self._untrained_said):
            warnings.warn(f"{what} {value}: the model was trained on {what} {trained} only; its energies and forces "
                          "here are not determined by its training data", stacklevel=4)

    def batch_for(self, atoms) -> dict:
        """The model input for one structure (also used by `explain`)."""
        i, j, off, lr_pairs = self._neighbors(atoms)
        periodic = bool(np.any(atoms.pbc))
        spin = spin_for(atoms, round(self.charge)) if self.spin is None else self.spin
        return {
            "Z": torch.as_tensor(atoms.numbers, dtype=torch.long, device=self.device),
            "Q": torch.tensor([self.charge], dtype=self.dtype, device=self.device),
            "S": torch.tensor([float(spin)], dtype=self.dtype, device=self.device),
            "R": torch.as_tensor(atoms.get_positions(), dtype=self.dtype, device=self.device),
            "idx_i": i, "idx_j": j, "cell_offsets": off, "lr_pairs": lr_pairs,
            "cell": torch.as_tensor(np.asarray(atoms.cell)[None], dtype=self.dtype, device=self.device)
            if periodic else None,
            "num_batch": 1,
        }

    # -- ASE interface ---------------------------------------------------------------------------
    def get_property(self, name, atoms=None, allow_calculation=True):
        value = super().get_property(name, atoms, allow_calculation)
        if name in ("stress", "stress_std"):  # also when served from the results computed with the forces
            self._stress_asked_here = True
        return value

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if self.check and not np.isfinite(atoms.positions).all():  # overlaps etc.: at neighbour-list rebuilds
            raise TubError("the structure has non-finite (NaN or inf) coordinates; fix the structure")
        batch = self.batch_for(atoms)
        periodic = batch["cell"] is not None and abs(np.linalg.det(np.asarray(atoms.cell))) > 1e-9
        stress_asked = bool({"stress", "stress_std"} & set(properties))
        if stress_asked and batch["cell"] is not None and not periodic:
            raise TubError("stress needs a cell with a volume; this periodic structure has a zero cell vector along "
                           "its open direction: give it a vacuum length (e.g. atoms.cell[2, 2] = 20)")
        if system_changes:  # a new configuration: how often was the stress asked at the recent ones?
            self._stress_rate = 0.5 * self._stress_rate + 0.5 * self._stress_asked_here
            self._stress_asked_here = False
        # NPT integrators and cell filters ask forces, then stress, at (nearly) every configuration: the stress
        # then comes with the forces from one evaluation instead of a second one; an NVT run that logs the
        # pressure every N steps computes it once more after each such step
        want_stress = periodic and (stress_asked or self._stress_rate >= 0.3)
        want_hessian = "hessian" in properties
        outs = [compute(m, batch, forces=True, stress=want_stress, hessian=want_hessian) for m in self.models]
        e = np.array([o["energy"].item() for o in outs])
        if not np.isfinite(e).all():
            raise TubError("the model's energy is not finite for this structure (overlapping atoms?); fix the "
                           "geometry")
        f = np.stack([o["forces"].detach().cpu().numpy() for o in outs]).astype(np.float64)
        q = np.stack([o["charges"].detach().cpu().numpy() for o in outs]).astype(np.float64)
        ea = np.stack([o["atomic_energy"].detach().cpu().numpy() for o in outs]).astype(np.float64)
        self.results["energy"] = float(e.mean())
        self.results["free_energy"] = float(e.mean())
        self.results["forces"] = f.mean(0)
        self.results["charges"] = q.mean(0)
        self.results["energies"] = ea.mean(0)
        molecule = not np.any(atoms.pbc)  # sum q r of a cell depends on which image of each atom is taken
        if molecule:
            self.results["dipole"] = (q.mean(0)[:, None] * atoms.get_positions()).sum(0)
        if want_stress:
            s = np.stack([o["stress"][0].detach().cpu().numpy() for o in outs]).astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(s.mean(0))
            if len(outs) > 1:
                self.results["stress_std"] = full_3x3_to_voigt_6_stress(s.std(0, ddof=0))
        feats = [o["features"].detach().cpu().numpy() for o in outs]
        if len({f.shape for f in feats}) == 1:  # members of different widths have no common feature space
            self.results["features"] = np.mean(feats, axis=0)
        if want_hessian:
            h = np.stack([o["hessian"].detach().cpu().numpy() for o in outs]).astype(np.float64)
            self.results["hessian"] = h.mean(0)
            if len(outs) > 1:
                self.results["hessian_std"] = h.std(0)
        for name in ("e_nn", "e_zbl", "e_coulomb", "e_d4"):
            self.results[name] = np.mean([o[name].detach().cpu().numpy() for o in outs], axis=0)
        if len(outs) > 1:
            self.results["energy_std"] = float(e.std(ddof=0))
            self.results["forces_std"] = f.std(0, ddof=0)
            self.results["charges_std"] = q.std(0, ddof=0)
            if molecule:
                dip = (q[:, :, None] * atoms.get_positions()[None]).sum(1)
                self.results["dipole_std"] = dip.std(0, ddof=0)
            # per-atom force disagreement: RMS deviation of member force vectors from the mean
            dev = np.sqrt(((f - f.mean(0)) ** 2).sum(-1).mean(0))
            self.results["force_disagreement"] = dev


def _spin(value) -> float | None:
    """None (the lowest multiplicity the electron count allows) or the number of unpaired electrons."""
    return None if value is None else float(value)


def _tensors(module):
    return [*module.parameters(), *module.buffers()]


def _torch_dtype(dtype):
    """``torch.float64``, ``"float64"``, ``"fp64"`` (the CLI's spelling), ``np.float64``: the torch dtype (float32 or
    float64), or a clear error."""
    from tubcli.device import as_torch_dtype

    try:
        found = as_torch_dtype(dtype)
    except ValueError:
        found = None
    if found not in (torch.float32, torch.float64):
        raise ValueError(f"dtype {dtype!r} is not supported; use torch.float32 or torch.float64 ('fp32', 'fp64')")
    return found
