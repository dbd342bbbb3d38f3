"""Model files: tub's safetensors + JSON, and the reference SpookyNet ``parameters.pth``.

tub format: ``<name>.safetensors`` (tensors) and ``<name>.json`` ({"architecture": ...,
"spookynet": config, "elements": [...], "energy_shift": ...}). The reference format (a dict of
hyper-parameters plus ``state_dict``) is read with ``torch.load(weights_only=True)`` and mapped
onto tub's module names with the explicit key mapping below; nothing is unpickled beyond tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tubcli.errors import TubError
from tubcli.io import torch_load_weights, weights_only_reason

from .physical_terms import D4_TABLES
from .spookynet import ACTIVATION_NAMES, BASIS_FUNCTIONS, SpookyNet, SpookyNetConfig

# reference name -> tub name, applied in order to every state-dict key
_KEY_RULES: list[tuple[str, str]] = [
    (r"^nuclear_embedding\.element_embedding$", "nuclear.element"),
    (r"^nuclear_embedding\.electron_config$", "nuclear.electron_config"),
    (r"^nuclear_embedding\.config_linear\.", "nuclear.config_map."),
    (r"^magmom_embedding\.", "spin_embedding."),
    (r"_embedding\.linear_q\.", "_embedding.query."),
    (r"_embedding\.linear_k\.", "_embedding.key."),
    (r"_embedding\.linear_v\.", "_embedding.value."),
    (r"_embedding\.resblock\.", "_embedding.mlp."),
    (r"_embedding\.featurize_k\.", "_embedding.key."),  # use_nonlinear_embedding=True
    (r"_embedding\.featurize_v\.", "_embedding.value."),
    (r"_embedding\.resblock_k\.", "_embedding.key_mlp."),
    (r"_embedding\.resblock_v\.", "_embedding.value_mlp."),
    (r"^radial_basis_functions\._alpha$", "rbf.alpha_raw"),
    (r"^radial_basis_functions\.", "rbf."),
    (r"^module\.(\d+)\.local_interaction\.radial_", r"interactions.\1.local.filter_"),
    (r"^module\.(\d+)\.local_interaction\.resblock_", r"interactions.\1.local.mlp_"),
    (r"^module\.(\d+)\.local_interaction\.resblock\.", r"interactions.\1.local.mlp_out."),
    (r"^module\.(\d+)\.local_interaction\.projection_", r"interactions.\1.local.proj_"),
    (r"^module\.(\d+)\.nonlocal_interaction\.resblock_", r"interactions.\1.nonlocal_.mlp_"),
    (r"^module\.(\d+)\.nonlocal_interaction\.attention\.omega$", r"interactions.\1.nonlocal_.omega"),
    (r"^module\.(\d+)\.residual_pre\.stack\.", r"interactions.\1.pre.blocks."),
    (r"^module\.(\d+)\.residual_post\.stack\.", r"interactions.\1.post.blocks."),
    (r"^module\.(\d+)\.resblock\.", r"interactions.\1.out."),
    (r"\.residual\.stack\.", ".stack.blocks."),
    (r"\.activation(\d?)\.", r".act\1."),
    (r"\.linear(\d?)\.", r".lin\1."),
    (r"^output\.weight$", "readout.weight"),
    (r"^zbl_repulsion_energy\._adiv$", "zbl.adiv_raw"),
    (r"^zbl_repulsion_energy\._apow$", "zbl.apow_raw"),
    (r"^d4_dispersion_energy\._(s6|s8|a1|a2|scaleq)$", r"d4.\1_raw"),
]
_ZBL_VECTORS = {"c_raw": ["_c1", "_c2", "_c3", "_c4"], "a_raw": ["_a1", "_a2", "_a3", "_a4"]}
_REF_HYPER = {"num_features", "num_basis_functions", "num_modules", "cutoff", "lr_cutoff",
              "use_zbl_repulsion", "use_electrostatics", "use_d4_dispersion", "compute_d4_atomic",
              "module_keep_prob", "activation", "basis_functions", "exp_weighting"}


class CheckpointError(TubError, ValueError):
    """A model file that cannot be read as asked (a one-line TubError, exit 2)."""


def map_reference_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Translate a reference state dict; returns (tub state dict, D4 tables)."""
    out: dict[str, torch.Tensor] = {}
    tables: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "keep_prob":
            continue  # derived from module_keep_prob
        if key.startswith("d4_dispersion_energy.") and key.split(".", 1)[1] in D4_TABLES:
            tables[key.split(".", 1)[1]] = value
            continue
        if key.startswith("zbl_repulsion_energy._") and key.split(".")[1] in sum(_ZBL_VECTORS.values(), []):
            continue
        new = key
        for pattern, repl in _KEY_RULES:
            new = re.sub(pattern, repl, new)
        out[new] = value
    for name, parts in _ZBL_VECTORS.items():
        keys = [f"zbl_repulsion_energy.{p}" for p in parts]
        if all(k in sd for k in keys):
            out[f"zbl.{name}"] = torch.cat([sd[k].reshape(1) for k in keys])
    return out, tables


def load_reference(path: str | Path, dtype: torch.dtype = torch.float32, lr_cutoff=None) -> SpookyNet:
    """Load a ``parameters.pth`` written by the reference SpookyNet (OUnke/SpookyNet)."""
    try:
        saved = torch_load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - report the reason in one line
        raise CheckpointError(f"cannot read reference checkpoint {path}: {weights_only_reason(exc)}") from exc
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise CheckpointError(f"{path} is not a SpookyNet parameter file (no 'state_dict')")
    if saved.get("activation", "swish") not in ACTIVATION_NAMES:
        raise CheckpointError(f"{path}: activation={saved['activation']!r} is not supported "
                              f"(one of {', '.join(ACTIVATION_NAMES)})")
    if saved.get("basis_functions", "exp-bernstein") not in BASIS_FUNCTIONS:
        raise CheckpointError(f"{path}: basis_functions={saved['basis_functions']!r} is not supported "
                              f"(one of {', '.join(BASIS_FUNCTIONS)})")
    sd = saved["state_dict"]
    if any(".residual_" in k and "embedding" in k for k in sd):
        raise CheckpointError(f"{path} uses the pre-2021 key layout; re-save it with the reference code first")
    kw = {k: saved[k] for k in _REF_HYPER if k in saved}
    kw["zmax"] = saved.get("Zmax", 87)
    # files written before these switches existed mean the old architecture (the reference's reading)
    kw["use_irreps"] = bool(saved.get("use_irreps", False))
    kw["use_nonlinear_embedding"] = bool(saved.get("use_nonlinear_embedding", True))
    nr = {k[len("num_residual_"):]: int(v) for k, v in saved.items() if k.startswith("num_residual_")}
    cfg = SpookyNetConfig.from_dict({**kw, "num_residual": nr})
    if lr_cutoff is not None:
        cfg.lr_cutoff = lr_cutoff
    model = SpookyNet(cfg).to(dtype)  # in the target dtype first: float64 weights stay float64
    state, tables = map_reference_state_dict(sd)
    _load_state(model, state, tables, path)
    return model.to(dtype).eval()


def _load_state(model: SpookyNet, state: dict, tables: dict, path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: parameters do not match the architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    if model.d4 is not None:
        if not tables:
            raise CheckpointError(f"{path}: D4 dispersion is on but the file has no D4 tables")
        model.d4.load_tables(tables)


def save_model(model: SpookyNet, path: str | Path, extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``path``.safetensors and ``path``.json (weights + architecture, no pickle)."""
    from safetensors.torch import save_file
    from tubcli.io import atomic_path

    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.d4 is not None:
        tensors.update({f"d4.{k}": v.detach().cpu().contiguous() for k, v in model.d4.tables().items()})
    meta = {"architecture": "spookynet", "spookynet": model.config.to_dict(), **(extra or {})}
    st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
    with atomic_path(st) as tmp_st, atomic_path(js) as tmp_js:  # the umask's mode, never half-written
        save_file(tensors, str(tmp_st))
        tmp_js.write_text(json.dumps(meta, indent=2))
    return st, js


def read_model_meta(path: str | Path) -> dict:
    path = Path(path)
    js = path.with_suffix(".json")
    if not js.exists():
        raise CheckpointError(f"{js} not found; a tub model is a .safetensors file with a .json beside it")
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{js} is not valid JSON ({exc}); restore the .json written with the model") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{js} is not a tub model description; restore the .json written with the model")
    return meta


def model_elements(metas: list[dict]) -> set[int] | None:
    """Elements every committee member was trained on (from their model.json), None if none says."""
    sets = [set(meta["elements"]) for meta in metas if meta.get("elements")]
    return set.intersection(*sets) if sets else None


def model_trained_states(metas: list[dict]) -> tuple[set[int] | None, set[int] | None]:
    """The total charges and spins the training frames had (model.json ``trained_charges``/``trained_spins``,
    every member's), each None when a member does not record it (models of older tub versions)."""
    def union(key):
        values = [meta.get(key) for meta in metas]
        return None if not values or any(v is None for v in values) else {int(x) for v in values for x in v}

    return union("trained_charges"), union("trained_spins")


def untrained_states(charge: int, spin: int, trained_charges, trained_spins, said: set) -> list[tuple[str, int, str]]:
    """(what, value, trained values) for each total charge or spin that no training frame had and that is
    not in ``said`` yet (added to it): the charge and spin embeddings never learned it (a model trained on
    neutral frames gives every charge one energy). The calculator warns of them, and so does `predict`."""
    out = []
    for what, value, trained in (("total charge", charge, trained_charges), ("spin", spin, trained_spins)):
        if trained is not None and value not in trained and (what, value) not in said:
            said.add((what, value))
            out.append((what, value, ", ".join(map(str, sorted(trained)))))
    return out


def model_composition_span(metas: list[dict]) -> dict | None:
    """The span of the training compositions (``data.composition_span``) from model.json, None for
    models that do not record it (reference files, older tub models)."""
    return next((meta["composition_span"] for meta in metas if meta.get("composition_span")), None)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[SpookyNet, dict]:
    """Load a tub model (.safetensors + .json) or a reference ``.pth``; returns (model, meta)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file {path} not found")
    if path.suffix == ".pth" or path.suffix == ".pt" and not path.with_suffix(".json").exists():
        return load_reference(path, dtype), {"architecture": "spookynet", "source": "reference"}
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    meta = read_model_meta(path)
    if meta.get("architecture") != "spookynet":
        raise CheckpointError(f"{path}: unknown architecture {meta.get('architecture')!r}")
    try:
        cfg = SpookyNetConfig.from_dict(meta["spookynet"])
        model = SpookyNet(cfg)  # unknown activation/basis names raise ValueError here
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.with_suffix('.json')} has no valid 'spookynet' model config ({exc}); "
                              "restore the .json written with the model") from None
    model = model.to(dtype)  # in the target dtype first: float64 weights stay float64
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for empty/truncated files
        raise CheckpointError(f"cannot read {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                              "the file is damaged or not a safetensors file: copy or train it again") from None
    tables = {k[3:]: tensors.pop(k) for k in list(tensors) if k.startswith("d4.") and k[3:] in D4_TABLES}
    _load_state(model, tensors, tables, path)
    return model.to(dtype).eval(), meta


def model_files(path) -> list[Path]:
    """The model files a path stands for: a file itself, or the members of a `tub mlff train` run
    directory (or its checkpoints/ folder): model_0…model_N-1 of a committee, else model.safetensors."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    ckpt = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    return sorted(ckpt.glob("model_*.safetensors"), key=lambda m: int(m.stem[6:]) if m.stem[6:].isdigit() else -1) \
        or sorted(ckpt.glob("model.safetensors"))

