"""Atomic file writing and the few formats the core speaks (JSON, YAML, safetensors)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tubcli.errors import TubError, first_line


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    The temporary name keeps the final suffix (``.h5``, ``.png``) so writers that look at it work.
    A killed process leaves only a ``.tmp-*`` file, never a complete-looking output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_dir():
            if path.exists():
                shutil.rmtree(path)
        # mkstemp makes the file 0600; give the output the mode a plain open() would (shared
        # group directories on clusters rely on the umask)
        os.chmod(tmp_path, (0o777 if tmp_path.is_dir() else 0o666) & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as exc:
        # torch.save says "unexpected pos 926912 vs 926800" on a full disk: ask the folder (before the
        # partial file frees its space) so that the user reads "no space left", not the writer's words
        refused = None
        if isinstance(exc, Exception) and not isinstance(exc, (OSError, TubError)):
            rust = re.search(r"\(os error (\d+)\)", str(exc))  # safetensors: "I/O error: ... (os error 28)"
            refused = OSError(int(rust.group(1)), os.strerror(int(rust.group(1)))) if rust else \
                _write_refused(path.parent)
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            tmp_path.unlink(missing_ok=True)
        if refused is not None:
            raise OSError(refused.errno, refused.strerror, str(path)) from exc
        raise


def _write_refused(folder: Path, size: int = 2 ** 20) -> OSError | None:
    """The OSError that writing ``size`` bytes into ``folder`` gets now (a full disk, a quota), or None."""
    try:
        fd, name = tempfile.mkstemp(prefix=".tmp-probe-", dir=folder)
    except OSError as exc:
        return exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
    return None


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Delete the ``.tmp-*`` files that :func:`atomic_path` left beside ``path`` when a writer was
    killed. Call it only while holding the output's lock (no live writer then). Returns how many.

    Matches exactly ``.tmp-<stem>-<8 mkstemp characters><suffix>``, so the temporaries of an output
    whose name merely starts with the same stem are never touched.
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".tmp-{path.stem}-") + r"[a-z0-9_]{8}" + re.escape(path.suffix))
    removed = 0
    if path.parent.is_dir():
        for stale in path.parent.glob(f".tmp-{path.stem}-*"):
            if pattern.fullmatch(stale.name):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
                removed += 1
    return removed


def remove_orphaned_temporaries(folder: str | os.PathLike, before: float) -> int:
    """Delete the ``.tmp-<stem>-XXXXXXXX<suffix>`` files and folders that :func:`atomic_path` left anywhere
    under ``folder`` beside a finished ``<stem><suffix>``, and that nothing has written to since ``before``
    (a time): what a killed job left of an item's side outputs (figures, GeoJSON, QC images), which the
    per-item sweep of :func:`remove_stale_temporaries` does not reach, once the rerun has made them. Call
    it when a run is complete and no other job is writing there. Returns how many."""
    pattern = re.compile(r"\.tmp-(.+)-[a-z0-9_]{8}(\.[^.]+)?")
    removed = 0
    for stale in sorted(Path(folder).rglob(".tmp-*")) if Path(folder).is_dir() else []:
        match = pattern.fullmatch(stale.name)
        final = stale.with_name(match[1] + (match[2] or "")) if match else None
        try:
            if final is None or not final.exists() or stale.lstat().st_mtime >= before:
                continue  # a user's own file, or a write not yet redone (or going on)
        except FileNotFoundError:  # inside a temporary folder removed just before
            continue
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def to_json(data: Any, **kwargs) -> str:
    """Strict JSON text: numpy values as numbers, NaN/inf as null (bare NaN breaks jq and JSON readers)."""
    return json.dumps(_finite(data), allow_nan=False, default=_json_default, **kwargs)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") or hasattr(obj, "item"):  # numpy / torch arrays and scalars
        return _finite(obj.tolist() if hasattr(obj, "tolist") else obj.item())
    return obj


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, to_json(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TubError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise TubError(f"{path} is not valid JSON: {exc}") from None


def write_csv(path: str | os.PathLike, rows: list[dict], fields: list[str]) -> Path:
    """A CSV of dict rows with header ``fields``, written atomically (:func:`write_text`)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks: recorded with outputs so that a rerun notices
    another file at the same path (e.g. weights replaced in place)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_yaml(path: str | os.PathLike, data: Any) -> Path:
    import yaml

    return write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Save tensors (contiguous, on CPU) with string metadata, atomically. safetensors writes several
    metadata keys in a random order: give one key where identical runs must give identical files."""
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=meta)
    return Path(path)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict]:
    """Return ``(tensors, metadata)`` from a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TubError(f"weights file {path} does not exist; pass the path of a .safetensors file")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise TubError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    return tensors, meta


def _head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a file (its format's signature), a one-line error if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise TubError(f"cannot read {path}: {exc.strerror or exc}") from None


def plain_name_problem(name: str) -> str:
    """Why ``name`` cannot be one file name inside a folder ('' when it can): a name taken from data (a
    medical center, a slide id) must never reach outside the folder it is written to or read from."""
    bad = next((c for c in ("/", "\\", "\0") if c in name), None)
    if bad:
        return f"it contains {bad!r}"
    if not name:
        return "it is empty"
    return f"{name!r} names a folder" if name in (".", "..") else ""


def load_numpy(path: str | os.PathLike):
    """``np.load(path, allow_pickle=False)`` of a .npy array or .npz archive, with a one-line error for
    anything else (an empty, cut-short or text file; numpy's own message would suggest unpickling it)."""
    import zipfile

    import numpy as np

    path = Path(path)
    head = _head(path, 6)
    if head != b"\x93NUMPY" and not head.startswith(b"PK"):
        why = "it is empty" if not head else "no NumPy header"
        raise TubError(f"{path} is not a NumPy .npy/.npz file ({why}); give the file np.save/np.savez wrote")
    try:
        _check_npy_sizes(path, head == b"\x93NUMPY")
        return np.load(path, allow_pickle=False)  # an .npz's directory is read here: a cut-off zip fails now
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        reason = first_line(exc)
        if "allow_pickle" in reason:
            raise TubError(f"{path} holds Python objects (dtype object), which tub does not unpickle (that could "
                           "run code); save numeric or string arrays") from None
        raise TubError(f"{path} is a damaged or cut-short NumPy file ({reason}); write it again") from None


def _check_npy_sizes(path: Path, single: bool) -> None:
    """ValueError when an array's header declares more data than its file (or .npz member) holds: numpy
    would first try to allocate the declared size (terabytes for a corrupt shape) and fail with a memory
    error that reads like a batch-size problem."""
    import zipfile

    import numpy as np

    def check(f, stored: int, name: str) -> None:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
        if dtype.hasobject:
            return  # refused later, with its own message
        need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        have = stored - f.tell()
        if need > have:
            raise ValueError(f"{name}header declares shape {shape} of {dtype} ({need:.3g} bytes) but {have} bytes "
                             "follow")

    if single:
        with open(path, "rb") as f:
            check(f, path.stat().st_size, "")
        return
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.filename.endswith(".npy"):
                with z.open(info) as f:
                    check(f, info.file_size, f"array {info.filename[:-4]!r}: ")


def check_torch_file(path: str | os.PathLike) -> None:
    """One-line error unless ``path`` starts like a file torch.save wrote (a zip archive, or the
    legacy pickle format); torch's own errors for other files say little ("105", "list index")."""
    path = Path(path)
    head = _head(path, 4)
    if not head:
        raise TubError(f"{path} is empty; give the checkpoint file that torch.save wrote")
    if not head.startswith(b"PK") and head[:1] != b"\x80":
        raise TubError(f"{path} is not a PyTorch checkpoint (no torch.save header); give a .pt/.pth written by "
                       "torch.save, or a .safetensors file")


def weights_only_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words: the pickled object it names
    (torch's own message opens with a banner that suggests ``weights_only=False``, i.e. running the file's
    code), a plain pickle that is no torch file, or the error's first line."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", text)
    if found:
        return (f"it pickles {found.group(1)}, Python code rather than tensors, which tub does not run")
    if "Unsupported operand" in text or "WeightsUnpickler error" in text:
        return "it is a plain Python pickle, not a torch.save file of tensors"
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def torch_load_weights(path: str | os.PathLike, **kwargs) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True, **kwargs)`` without torch's pickle-protocol
    warning (the refusal, if any, says what matters); errors are torch's, for the caller to word."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def load_torch_state(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)``: plain dicts of tensors and numbers, never a pickled object."""
    path = Path(path)
    if not path.is_file():
        raise TubError(f"checkpoint {path} does not exist")
    check_torch_file(path)
    try:
        return torch_load_weights(path)
    except Exception as exc:
        raise TubError(f"{path} cannot be loaded safely: {weights_only_reason(exc)}; re-save it as a plain state "
                       "dict or safetensors") from None


def pyplot():
    """``matplotlib.pyplot`` on the backend in use: the ``tub`` command sets Agg (``cli.main``; batch jobs
    have no display), a notebook calling a plugin's plot function keeps its inline backend."""
    import matplotlib.pyplot as plt

    return plt


_VECTOR_FIGURES = "none"  # the running verb's ``vector_figures`` (set by its Run)


def set_vector_figures(fmt: str) -> None:
    """``pdf`` or ``svg``: :func:`save_figure` also writes each PNG plot in that format; ``none``: PNG only."""
    global _VECTOR_FIGURES
    _VECTOR_FIGURES = fmt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (format from the suffix) and close it; a PNG also as a vector
    file beside it when the verb's ``vector_figures`` asks (TrueType fonts in PDF, text kept as text in SVG,
    so a journal's tools can edit the labels)."""
    import matplotlib

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    if _VECTOR_FIGURES != "none" and path.suffix.lower() == ".png":
        with matplotlib.rc_context({"pdf.fonttype": 42, "svg.fonttype": "none"}):
            with atomic_path(path.with_suffix(f".{_VECTOR_FIGURES}")) as tmp:
                fig.savefig(tmp, bbox_inches="tight", format=_VECTOR_FIGURES)
    pyplot().close(fig)
    return path


def remove_figure(path: str | os.PathLike) -> None:
    """Remove a figure and the vector copies :func:`save_figure` may have put beside it: an earlier
    invocation's plot that this one does not draw must not pass for its own."""
    path = Path(path)
    for stale in (path, path.with_suffix(".pdf"), path.with_suffix(".svg")):
        stale.unlink(missing_ok=True)


def refuse_broken_link(path: Path) -> None:
    """A link to a file that is gone, found in an input folder, is an error: left out silently, the run
    would cover fewer inputs than the folder lists and still report success."""
    if path.is_symlink() and not path.exists():
        raise TubError(f"{path} is a broken link (to {os.readlink(path)}); restore its target or remove the link")
