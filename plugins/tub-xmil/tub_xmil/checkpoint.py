"""Model construction and safe weight loading (tub safetensors, tub checkpoints, xMIL ``.pt``).

xMIL checkpoints (``best_model.pt``) pickle numpy scalars next to ``model_state_dict``; they are
read with ``torch.load(weights_only=True)`` and an allow-list of exactly those numpy types, never
with unrestricted unpickling. Head keys ``classifier.*`` (xMIL main) map to ``linear_head.*``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tubcli.errors import TubError
from tubcli.io import check_torch_file, torch_load_weights, weights_only_reason

ARCHS = ("attnmil", "transmil", "mambamil", "additivemil")


def build_model(arch: str, input_dim: int, head_dim: int, **kw) -> torch.nn.Module:
    if arch == "attnmil":
        from tub_xmil.attention_mil import AttentionMIL
        return AttentionMIL(input_dim, head_dim, **kw)
    if arch == "transmil":
        from tub_xmil.transmil import TransMIL
        return TransMIL(input_dim, head_dim, **kw)
    if arch == "additivemil":
        from tub_xmil.additive_mil import AdditiveMIL
        return AdditiveMIL(input_dim, head_dim, **kw)
    if arch == "mambamil":
        from tub_xmil.mamba_mil import MambaMIL
        return MambaMIL(input_dim, head_dim, **kw)
    raise TubError(f"unknown model {arch!r}; choose one of {', '.join(ARCHS)}")


def _numpy_allow_list():
    """numpy scalars and their dtypes, under both module names: numpy < 2 pickles scalars as
    ``numpy.core.multiarray.scalar``, numpy >= 2 as ``numpy._core.multiarray.scalar``."""
    import numpy as np
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allow = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allow += [type(np.dtype(c)) for c in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "bool")]
    return allow


def _first_line(exc: Exception, limit: int = 160) -> str:
    """A clean one-line reason: the object a weights-only load refused, else the error's first line
    (colour codes removed, shortened at a word), else the error's type."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if "Weights only load failed" in text:
        return weights_only_reason(exc)
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return line


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a model from safetensors, a tub checkpoint or an xMIL/other ``.pt`` file (safe)."""
    path = Path(path)
    if not path.is_file():
        raise TubError(f"weights file {path} not found; pass a .safetensors or .pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 (SafetensorError and friends: a corrupt or truncated file)
            raise TubError(f"cannot read {path} as safetensors ({_first_line(exc)}); is the file complete?") from None
    check_torch_file(path)
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()):
            obj = torch_load_weights(path)
    except Exception as exc:  # noqa: BLE001
        raise TubError(f"cannot read {path} safely ({_first_line(exc)}); re-save its model_state_dict "
                       "with torch.save(state_dict) or as safetensors") from None
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TubError(f"{path} holds no state dict of tensors; expected model_state_dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def map_reference_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """xMIL main uses ``classifier.*`` for the AttnMIL head; the journal branch ``linear_head.*``."""
    return {("linear_head." + k[len("classifier."):] if k.startswith("classifier.") else k): v
            for k, v in sd.items()}


def infer_attnmil_config(sd: dict[str, torch.Tensor]) -> dict:
    """AttnMIL hyper-parameters read off the shapes of a reference state dict."""
    w0 = sd["linear_layers.0.0.weight"]
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("linear_layers.")})
    n_out = len({k.split(".")[1] for k in sd if k.startswith("out_layers.")})
    return {"input_dim": int(w0.shape[1]), "features_dim": int(w0.shape[0]),
            "inner_attention_dim": int(sd["attention.0.weight"].shape[0]),
            "head_dim": int(sd["linear_head.weight"].shape[0]), "num_layers": n_layers,
            "n_out_layers": n_out, "bias": "linear_head.bias" in sd,
            "gated": any(k.startswith("attention_gate.") for k in sd)}


def _is_model_json(mj) -> bool:
    """What :func:`load_model` needs of a model.json; other tools write model.json files too."""
    if not isinstance(mj, dict):
        return False
    kw = mj.get("kwargs")
    return mj.get("arch") in ARCHS and isinstance(kw, dict) and {"input_dim", "head_dim"} <= set(kw)


def model_file(path: str | Path) -> Path:
    """The weights file ``--model`` names: itself, ``model.safetensors`` of a checkpoints/ folder or of
    a train run directory, or the weights beside a ``model.json`` given instead of them."""
    path = Path(path)
    if path.suffix.lower() == ".json" and path.with_suffix(".safetensors").is_file():
        return path.with_suffix(".safetensors")
    if path.is_dir() and not (path / "model.safetensors").exists() and (path / "checkpoints" / "model.safetensors").exists():
        path = path / "checkpoints"  # a train run directory: its weights are in checkpoints/
    return path / "model.safetensors" if path.is_dir() else path


def load_model(path: str | Path, model_json: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """A model and its config from tub weights (``model.safetensors`` + ``model.json``) or an
    xMIL AttnMIL checkpoint (architecture inferred from the tensor shapes)."""
    import json

    path = model_file(path)
    sd = map_reference_keys(read_state_dict(path))
    if model_json is None:
        mj = path.with_suffix(".json")
        if mj.is_file():
            try:
                model_json = json.loads(mj.read_text())
            except ValueError:
                model_json = {}  # reported just below as not an xmil model.json
    if model_json is None:
        if "linear_layers.0.0.weight" not in sd:
            raise TubError(f"{path} has no model.json next to it and is not an AttnMIL checkpoint; "
                           "pass the run's checkpoints/ folder")
        cfg = infer_attnmil_config(sd)
        # no "task": shapes cannot tell a 1-logit regression head from a survival or 1-class head
        model_json = {"arch": "attnmil", "kwargs": cfg, "inferred": True}
    if not _is_model_json(model_json):
        raise TubError(f"{path.with_suffix('.json')} is not the model.json of an xmil model (no arch/kwargs); "
                       "pass the checkpoints/ folder of a 'tub xmil train' run")
    kw = dict(model_json["kwargs"])
    input_dim, head_dim = kw.pop("input_dim"), kw.pop("head_dim")
    with torch.device("meta"):  # shapes first, no memory: an edited model.json (features_dim 1e9) would allocate
        shapes = {k: tuple(v.shape) for k, v in build_model(model_json["arch"], input_dim, head_dim, **kw)
                  .state_dict().items()}
    wrong = next((k for k, v in sd.items() if k in shapes and tuple(v.shape) != shapes[k]), None)
    if wrong is not None:
        raise TubError(f"{path}: tensor {wrong} is {tuple(sd[wrong].shape)}, but the {model_json['arch']} model its "
                       f"model.json describes has {shapes[wrong]}; use the model.json saved with these weights")
    model = build_model(model_json["arch"], input_dim, head_dim, **kw)
    missing, unexpected = model.load_state_dict(sd, strict=False)  # shapes of shared keys checked above
    if missing or unexpected:
        raise TubError(f"{path} does not fit a {model_json['arch']} model "
                       f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.eval()
    return model, model_json
