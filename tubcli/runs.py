"""Run directories, sharding, per-item locks, failures and checkpoints (DESIGN §5).

A run directory holds ``config.yaml``, ``env.json``, ``metrics.json(l)``, ``checkpoints/``,
``outputs/``, ``tub.log`` and, written last, ``DONE``. Every file goes through
:func:`tubcli.io.atomic_path`, so a killed run never leaves a complete-looking output.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tubcli import device as _device
from tubcli.errors import ItemFailures, Terminated, TubError, first_line, terminating
from tubcli.io import (atomic_path, file_sha256, remove_orphaned_temporaries, remove_stale_temporaries,
                       set_vector_figures, to_json, write_bytes, write_json, write_text)
from tubcli.progress import setup_logging, track

DONE = "DONE"


# --------------------------------------------------------------------------- sharding
def parse_shard(text: str | None, environ=None) -> tuple[int, int]:
    """``"i/n"`` (0-based i) or, when absent, SLURM array variables; ``(0, 1)`` otherwise."""
    env = os.environ if environ is None else environ
    if text is not None and not text.strip():  # `--shard "$SHARD"` with SHARD unset: every task would do all
        raise TubError("--shard is empty; give i/n (e.g. 0/4), or leave the option out to take the SLURM array's")
    if text:
        try:
            i_text, n_text = text.split("/")
            i, n = int(i_text), int(n_text)
        except ValueError:
            raise TubError(f"--shard expects i/n with integers, e.g. 0/4; got {text!r}") from None
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")
        try:
            task, first, step, n = (int(env.get(k, d)) for k, d in zip(names, ("", 0, 1, "")))
        except ValueError:
            raise TubError("the SLURM array variables (" + ", ".join(f"{k}={env.get(k)}" for k in names if k in env)
                           + ") are not integers; run inside a SLURM array job or pass --shard i/n") from None
        if step < 1 or (task - first) % step:
            raise TubError(f"SLURM array task {task} is not on the array's grid (min {first}, step {step}); "
                           "pass --shard i/n")
        i = (task - first) // step  # --array=0-8:2 gives tasks 0, 2, ..., 8 -> shards 0..4
    else:
        return 0, 1
    if n < 1 or not 0 <= i < n:
        raise TubError(f"shard {i}/{n} is out of range; use i/n with 0 <= i < n")
    return i, n


def shard_items(items: Iterable, index: int, count: int, key: Callable = str) -> list:
    """Sort ``items`` and take every ``count``-th from ``index``: shards partition the list exactly."""
    ordered = sorted(dict.fromkeys(items), key=key)
    return ordered[index::count]


# an output's name, so that `.{name}.lock.XXXXXXXX` (a lock's private file) and `.tmp-{stem}-XXXXXXXX{suffix}`
# stay within NAME_MAX (255)
MAX_OUTPUT_NAME = 255 - len("..lock.") - 9


# --------------------------------------------------------------------------- locks
def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits only to be reaped (Linux /proc; False where unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")


class ItemLock:
    """An ``O_CREAT|O_EXCL`` lock file beside an output: two jobs never process one item.

    A lock left by a dead process on this host is stale and is taken over. A lock is also a lease: its
    holder touches it every ``LEASE_REFRESH`` seconds, so one from another host that no one has touched
    for ``LEASE_EXPIRES`` is a job killed there (a node failure, a requeue elsewhere) and is taken over too.
    """

    LEASE_REFRESH = 60.0  # s
    LEASE_EXPIRES = 900.0  # s; beyond any clock skew between nodes and any stall of the refreshing thread
    _held: set = set()  # the lock files this process holds, refreshed by one daemon thread
    _refresher = None

    def __init__(self, output: str | os.PathLike):
        self.path = Path(str(output) + ".lock")
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                self._create(self.path)
            except FileExistsError:
                if self._break_if_stale():
                    continue
                return False
            self.held = True
            ItemLock._held.add(self.path)
            self._start_refreshing()
            return True
        return False

    @classmethod
    def refresh_held(cls) -> None:
        """Touch every lock this process holds: its lease stays alive."""
        for path in list(cls._held):
            with contextlib.suppress(OSError):
                os.utime(path)

    @classmethod
    def _start_refreshing(cls) -> None:
        if cls._refresher is not None and cls._refresher.is_alive():
            return
        import threading

        def loop():
            while True:
                time.sleep(cls.LEASE_REFRESH)
                cls.refresh_held()

        cls._refresher = threading.Thread(target=loop, name="tub-lock-lease", daemon=True)
        cls._refresher.start()

    def _break_if_stale(self) -> bool:
        """Remove a stale lock, re-checking it under a short-lived ``.break`` lock. Two jobs that both
        found the lock stale used to both remove it: the second removed the lock the first had just made,
        and both went on to process the item. Only the holder of ``.break`` removes a stale lock, and it
        looks again first, so it never removes a live one."""
        if not self._stale(self.path):
            return False
        guard = Path(str(self.path) + ".break")
        for _ in range(2):
            try:
                self._create(guard)
                break
            except FileExistsError:  # another job is breaking it now; a guard left by a killed job is stale
                if not self._stale(guard):
                    return False
                guard.unlink(missing_ok=True)
        else:
            return False
        try:
            if not self._stale(self.path):
                return False
            self.path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)

    @staticmethod
    def _create(path: Path) -> None:
        """Create the lock with its owner already inside: the owner is written to a private file that
        is then hard-linked to the lock name (atomic, fails if the lock exists). A job killed between
        an ``O_EXCL`` create and its write would leave an empty lock that no one could prove stale."""
        owner = f"{socket.gethostname()} {os.getpid()}\n"
        # a fresh name, created exclusively: a predictable one could be a link another user planted in a
        # shared folder, through which the write would truncate that link's target
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        private = Path(name)
        os.fchmod(fd, 0o644)  # other jobs (the group's, on a shared -o) read the owner to tell a stale lock
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        try:
            os.link(private, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: exclusive create, then write
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(owner)
        finally:
            private.unlink(missing_ok=True)

    UNREADABLE_STALE_AFTER = 60.0  # s; a live owner fills its lock within microseconds of creating it
    _PRIVATE = re.compile(r"\..+\.lock(\.break)?\.[a-z0-9_]{8}")  # the owner file _create links from

    @classmethod
    def remove_orphaned_private_files(cls, folder: Path, before: float) -> int:
        """Delete the owner files that :meth:`_create` makes and unlinks within microseconds, which a job
        killed in between (``kill -9``) left for good in ``folder`` (and below), untouched since ``before``.
        Call it when a run is complete and no other job is writing there."""
        removed = 0
        for leftover in sorted(folder.rglob(".*.lock.*")) if folder.is_dir() else []:
            with contextlib.suppress(OSError):
                if cls._PRIVATE.fullmatch(leftover.name) and leftover.lstat().st_mtime < before:
                    leftover.unlink()
                    removed += 1
        return removed

    @classmethod
    def _stale(cls, path: Path) -> bool:
        try:
            host, pid = path.read_text().split()
            pid = int(pid)
        except ValueError:  # empty or garbled: an O_EXCL create killed before its write
            with contextlib.suppress(OSError):
                return time.time() - path.stat().st_mtime > cls.UNREADABLE_STALE_AFTER
            return False
        except OSError:
            return False
        if host != socket.gethostname():  # its process cannot be asked: the lease tells
            with contextlib.suppress(OSError):
                return time.time() - path.stat().st_mtime > cls.LEASE_EXPIRES
            return False
        if pid == os.getpid():  # ours only if this process took it; else an earlier process with our pid (a
            return path not in cls._held  # container restarted under the same host name) left it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _zombie(pid)  # killed, but its parent (a script that never waits) has not reaped it yet

    def owner(self) -> str:
        """``host pid`` of the job holding the lock, as far as the file tells."""
        try:
            return " ".join(self.path.read_text().split()) or "owner unknown"
        except OSError:
            return "owner unknown"

    def release(self) -> None:
        """Remove the lock if this process holds it, also when a signal (SIGTERM, Ctrl-C) interrupted
        ``acquire`` after the lock file was made but before ``held`` was set."""
        mine = f"{socket.gethostname()} {os.getpid()}"
        if self.held or self.owner() == mine:
            ItemLock._held.discard(self.path)
            if self.owner() in (mine, "owner unknown"):  # not a lock another job took over meanwhile (a job
                self.path.unlink(missing_ok=True)  # suspended past its lease, e.g. a stopped process)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    @contextlib.contextmanager
    def waiting(self, timeout: float = 600.0):
        """Hold the lock, waiting while another job holds it (for a shared file that several shards
        update in turn, e.g. a table merged at the end of each)."""
        deadline = time.monotonic() + timeout
        while not self.acquire():
            if time.monotonic() > deadline:
                raise TubError(f"{self.path} has been held by another job for {timeout:.0f} s; "
                               "delete it if no job is running")
            time.sleep(0.2)
        try:
            yield
        finally:
            self.release()


# --------------------------------------------------------------------------- run directory
def default_runs_root() -> Path:
    return Path(os.environ.get("TUB_RUNS_DIR", "runs")).expanduser()  # a quoted '~/runs' means home


def find_resumable(parent: Path, chash: str, now: dict | None = None, may_change: set[str] = frozenset()) -> Path | None:
    """The newest run under ``parent`` with a ``checkpoints/last.pt`` and this config hash, else (given the
    config ``now``) the newest whose recorded config differs only in ``may_change`` and execution fields
    (``--epochs 6 --resume auto`` extends the run of ``--epochs 3``, whose directory has another hash)."""
    if not parent.is_dir():
        return None
    resumable = [d for d in parent.iterdir() if (d / "checkpoints" / "last.pt").is_file()]
    candidates = [d for d in resumable if d.name.endswith(chash)]
    if not candidates and now is not None:
        import yaml

        for d in resumable:
            try:
                earlier = yaml.safe_load((d / "config.yaml").read_text())
                cwd = json.loads((d / "env.json").read_text()).get("cwd")
            except (OSError, ValueError, AttributeError, yaml.YAMLError):
                continue
            if isinstance(earlier, dict) and not changed_settings(earlier, now, (EXECUTION_FIELDS - {"batch_size"}) |
                                                                  set(may_change), earlier_cwd=cwd):
                candidates.append(d)
    return max(candidates, key=lambda d: d.name) if candidates else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, has local changes) of the git checkout tub itself runs from (an editable install), not of
    the working folder (a user's analysis repository); (None, None) for an installed wheel."""
    import tubcli

    source = Path(tubcli.__file__).resolve().parent

    def git(*args):
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(source), *args], capture_output=True, text=True,
                             timeout=5)  # no index refresh: a run never writes into tub's own .git
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != source.parent:  # tubcli/ in another repository (a venv in a project)
            return None, None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD"), None if dirty is None else bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


# the packages whose versions decide a plugin's numbers (the ones installed are recorded)
RECORDED_PACKAGES = ("numpy", "scipy", "scikit-learn", "pandas", "torch", "safetensors", "h5py", "ase", "tblite",
                     "pyscf", "openslide-python", "openslide-bin", "tifffile", "pillow", "shap", "pydantic")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
HASH_LIMIT = 64 << 20  # inputs up to this size get a sha256 in env.json (bigger: size and mtime only) ...
HASH_BUDGET = 512 << 20  # ... up to this many bytes in all (a batch of slides is not read twice)


def input_record(cfg) -> list[dict]:
    """What identifies the inputs a run read: path, size, mtime and (small files) sha256; folders with the
    number of their entries. An auditor can then tell whether the data changed since."""
    out, budget = [], HASH_BUDGET
    for field, path in given_paths(cfg)[:1000]:
        entry = {"field": field, "path": str(path)}
        try:
            if path.is_dir():
                entry["entries"] = sum(1 for _ in path.iterdir())
            else:
                st = path.stat()
                entry.update(size=st.st_size, mtime=_dt.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"))
                if st.st_size <= min(HASH_LIMIT, budget):
                    entry["sha256"] = file_sha256(path)
                    budget -= st.st_size
        except OSError:
            pass
        out.append(entry)
    return out


def _cwd() -> str:
    try:
        return os.getcwd()
    except FileNotFoundError:  # the job's working folder was deleted under it
        raise TubError("the current folder no longer exists; cd into an existing folder and rerun") from None


def environment_record(plugin_version: str = "", command: str = "", cfg=None) -> dict:
    """What env.json keeps of the run's environment: the command, versions (tub, its git commit and whether
    it had local changes, the numerical packages), threads (a multi-threaded CPU reduction may differ in
    the last bits between runs: OMP_NUM_THREADS=1 makes training bit-reproducible), host and inputs."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    commit, dirty = git_commit()
    record = {
        "command": command,  # `tub <plugin> <verb>`: a run directory belongs to one verb
        "argv": sys.argv,
        "cwd": _cwd(),  # relative paths in config.yaml are relative to it
        "python": sys.version.split()[0],
        "tub": ver("tub"),
        "plugin": plugin_version,
        "torch": ver("torch"),
        "host": socket.gethostname(),
        "pid": os.getpid(),  # which job wrote the record (a failed run undoes only its own)
        "git_commit": commit,
        "git_local_changes": dirty,
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "slurm": {k: v for k, v in os.environ.items() if k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")},
        "packages": {p: v for p in RECORDED_PACKAGES if (v := ver(p))},
        "threads": {"cpu_count": os.cpu_count(), **{k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ}},
    }
    if "torch" in sys.modules:
        import torch

        record["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        record["threads"]["torch"] = torch.get_num_threads()
    if cfg is not None:
        record["inputs"] = input_record(cfg)
    return record


EXECUTION_FIELDS = frozenset({"device", "batch_size", "threads", "num_workers", "vector_figures"})


def execution_fields(cfg) -> frozenset:
    """EXECUTION_FIELDS less those a verb's config names in ``RESULT_FIELDS``: a field of an execution name
    that changes the results there (atlas evaluate's ``batch_size`` is the linear probe's)."""
    return EXECUTION_FIELDS - frozenset(getattr(type(cfg), "RESULT_FIELDS", ()))


def changed_settings(earlier: dict, now: dict, ignore: set[str], prefix: str = "", earlier_cwd: str | None = None) -> str:
    """``key: old -> new`` for the first settings that differ, ignoring the top-level ``ignore`` keys
    (a batch verb's inputs, execution-only fields); empty if none. A relative path recorded by a run
    started in ``earlier_cwd`` is read from there (a rerun from another folder spells it otherwise)."""
    diffs = []
    for key in sorted(set(earlier) | set(now)):
        if not prefix and key in ignore:
            continue
        a, b = earlier.get(key, _ABSENT), now.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = changed_settings(a, b, ignore, f"{prefix}{key}.", earlier_cwd)
            diffs += [inner] if inner else []
        elif not _same_setting(a, b, earlier_cwd):
            if a == b and isinstance(a, str):  # one relative spelling, two files: say which
                a, b = os.path.join(earlier_cwd, a), os.path.abspath(b)
            diffs.append(f"{prefix}{key}: {_shown(a)} -> {_shown(b)}")
    return "; ".join(diffs[:3])


_ABSENT = object()  # a key the record does not have (a setting added in a later version)


def _shown(value) -> str:
    """A setting as the user gave it: ``None`` is a default the verb resolves (e.g. from a preset)."""
    return "(default)" if value is None else "(not recorded)" if value is _ABSENT else str(value)


def _same_setting(a, b, a_cwd: str | None = None) -> bool:
    """Equal settings; a path counts as the same when it names the same file, however spelt (relative
    and absolute, a symlink, relative to the folder ``a_cwd`` the earlier run started in), and as
    another when one relative spelling names another file from here. Lists element by element."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_setting(x, y, a_cwd) for x, y in zip(a, b))
    if a == b:
        return not _other_file_from_here(a, a_cwd)
    return _same_file(a, b, a_cwd)


def _same_file(a, b, a_cwd: str | None = None) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    if a_cwd and not os.path.isabs(a):
        a = os.path.join(a_cwd, a)
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _other_file_from_here(path, cwd: str | None) -> bool:
    """``path``, relative, names two different existing files from ``cwd`` and from here."""
    if not (isinstance(path, str) and path and cwd and not os.path.isabs(path)):
        return False
    there = os.path.join(cwd, path)
    return os.path.exists(there) and os.path.exists(path) and not os.path.samefile(there, path)


def require_finite_loss(loss, step) -> float:
    """The loss as a float; a training whose loss turned inf/NaN stops here (exit 1), before the
    step that would carry it into the weights."""
    value = float(loss.detach() if hasattr(loss, "detach") else loss)
    if not math.isfinite(value):
        raise TubError(f"training diverged: the loss is {value} at step {step}; lower the learning rate (the lr "
                       "setting) or check the data for extreme values", exit_code=1)
    return value


def _holds_nan(state) -> bool:
    import torch

    if isinstance(state, torch.Tensor):
        return bool(state.is_floating_point() and torch.isnan(state).any())
    if isinstance(state, dict):
        return any(_holds_nan(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_holds_nan(v) for v in state)
    return False


_PLAIN = (int, float, bool, str, bytes, type(None))


def not_loadable_without_pickle(state, where: str = "state") -> str | None:
    """Where ``state`` holds something that ``--resume`` could not load with ``torch.load(weights_only=True)``
    (a numpy scalar or array, an object), as ``state['key'] (type)``; None when all of it loads."""
    import collections

    import torch

    if isinstance(state, torch.Tensor) or type(state) in _PLAIN or isinstance(state, (torch.dtype, torch.device)):
        return None  # exact types: numpy.float64 is a float subclass that needs pickle
    if type(state) in (dict, collections.OrderedDict):
        for key, value in state.items():
            found = (None if type(key) in _PLAIN else f"{where} (key {key!r}: {type(key).__name__})") or \
                not_loadable_without_pickle(value, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if type(state) in (list, tuple, torch.Size):
        return next((f for i, v in enumerate(state) if (f := not_loadable_without_pickle(v, f"{where}[{i}]"))), None)
    return f"{where} ({type(state).__module__}.{type(state).__qualname__})"


MODEL_FIELDS = frozenset({"model", "init_from"})  # may name a tub run directory (tub's output, not user data)


def given_paths(cfg) -> list[tuple[str, Path]]:
    """(field, path) of the existing paths among the config's top-level path fields: what the user gave
    to be read (fields marked ``json_schema_extra={"output": True}`` name what a verb writes and are
    left out)."""
    from tubcli.config import is_path_type

    out = []
    for name, info in type(cfg).model_fields.items():
        if not is_path_type(info.annotation) or _marked(info, "output"):
            continue
        value = getattr(cfg, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, Path)) and str(v) and os.path.exists(v):
                out.append((name, Path(v)))
    return out


def _marked(info, key: str) -> bool:
    return isinstance(info.json_schema_extra, dict) and bool(info.json_schema_extra.get(key))


def is_run_directory(path: Path) -> bool:
    return (path / "env.json").is_file() and (path / "config.yaml").is_file()


def refuse_output_among_inputs(cfg, run_dir: Path, given_o: bool = True) -> None:
    """No run directory may be an input, lie inside an input folder, or hold an input. Excepted: a tub
    run directory (or its checkpoints/) given as a model, which is tub's output and not scanned as
    data, and folders marked ``json_schema_extra={"lookup": True}`` (files are looked up there by name,
    never listed, e.g. an image root)."""
    here = run_dir.resolve()
    fields = type(cfg).model_fields
    for name, given in given_paths(cfg):
        g = given.resolve()
        exempt = _marked(fields[name], "lookup") or (
            name in MODEL_FIELDS and (is_run_directory(g) or is_run_directory(g.parent)))
        if g == here or (g.is_dir() and g in here.parents and not exempt):
            what = f"-o {run_dir}" if given_o else f"the default run directory {run_dir}"
            raise TubError(f"{what} is or lies inside the input {given}; its records and outputs would mix "
                           "with your data: pass -o with a run directory apart from the inputs")
        if here in g.parents:
            raise TubError(f"the input {given} lies inside the run directory {run_dir}, where this run's results "
                           "could replace it; copy it elsewhere or pass another -o")


def _failure_item(line: str) -> str | None:
    try:
        return json.loads(line).get("item")
    except (ValueError, AttributeError):
        return None


def archive_config(run_dir: Path) -> Path:
    """Move ``config.yaml`` to ``config.<n>.yaml`` (first free n): a rerun with other settings keeps
    the record of the earlier ones."""
    for n in range(1, 10_000):
        target = run_dir / f"config.{n}.yaml"
        if not target.exists():
            os.replace(run_dir / "config.yaml", target)
            return target
    raise TubError(f"too many archived configs in {run_dir}")


def new_run_dir(base: Path) -> Path:
    """Create ``base`` (or ``base-2``, ``base-3``, ...) exclusively: two runs of the same config
    started in the same second never share a directory."""
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)  # parents again each time: a failed run removes the empty folders it made
            return path
        except FileExistsError:
            continue
    raise TubError(f"cannot create a new run directory beside {base}; pass -o DIR")


def unreadable_output(path: Path, exc: BaseException) -> TubError:
    """The one-line error for a finished output that no longer reads: what to delete, not a rerun of all."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TubError(f"{path} exists but cannot be read ({reason}); delete it to make it again "
                    "(--overwrite makes every item again)")


class Run:
    """Everything a verb needs besides its config: directory, device, seeds, logging, batch, checkpoints."""

    def __init__(
        self,
        plugin: str,
        verb: str,
        cfg,
        out: str | os.PathLike | None = None,
        resume: str | None = None,
        shard: str | None = None,
        overwrite: bool = False,
        verbosity: int = 0,
        plugin_version: str = "",
        same_outputs_except: set[str] | None = None,
        training: bool = False,
        resume_may_change: set[str] | None = None,
        continues: bool = False,
    ):
        from tubcli.config import config_hash

        self.plugin, self.verb, self.cfg = plugin, verb, cfg
        self._continues = continues  # a rerun goes on from the outputs there (mlff md's trajectory)
        self.began = time.time()
        self.overwrite = overwrite
        self.seed = int(getattr(cfg, "seed", 0))
        set_vector_figures(getattr(cfg, "vector_figures", "none"))
        self.shard = parse_shard(shard)
        self.failures: list[dict] = []
        self._held_elsewhere: list[tuple[Path, ItemLock]] = []  # (output, the lock another job kept it under)
        self.batch_stats: dict = {}
        self._device = None
        self._dist = _device.dist_info()
        chash = config_hash(cfg)
        parent = default_runs_root() / plugin / verb
        self.resume_from: Path | None = None
        if getattr(cfg, "device", "auto") not in ("auto", None) or self._dist.enabled:
            self.device  # an explicit device that is absent fails here, before any work
        if self._dist.enabled:
            _device.init_distributed(self.device)
        run_dir = Path(out).expanduser() if out else None  # --out=~/x: the shell leaves that ~ alone
        self._folder_was_there = run_dir is not None and run_dir.is_dir()  # made by the user: never removed
        if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
            raise TubError(f"-o {run_dir} is a file; pass a directory for the run (a new or an earlier run's)")
        target = run_dir if run_dir is not None else parent
        # the folders above the run directory that this run makes (deepest first): a run that fails before any
        # output removes them again if they are still empty (`tub atlas inspect` with no file left ./runs/...)
        self._new_folders = [f for f in [*([parent] if run_dir is None else []), *target.parents] if not f.exists()]
        for folder in target.parents:
            if folder.exists() and not folder.is_dir():
                what = f"-o {run_dir}" if run_dir is not None else f"the runs folder {default_runs_root()} (TUB_RUNS_DIR)"
                raise TubError(f"{what}: {folder} is a file, not a folder; pass a run directory under a folder")
        if resume:
            self.resume_from, found_dir = self._resolve_resume(resume, run_dir, parent, chash, cfg,
                                                               resume_may_change or set())
            run_dir = run_dir or found_dir
        checked = False  # the run directory against the inputs
        if run_dir is None:
            if self.shard[1] > 1:
                job = os.environ.get("SLURM_ARRAY_JOB_ID", "shards")
                run_dir = parent / f"{job}_{chash}"
            else:
                base = parent / f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}_{chash}"
                refuse_output_among_inputs(cfg, base, given_o=False)  # before new_run_dir makes it
                run_dir = new_run_dir(base) if self.is_main else None
                run_dir = self._broadcast(run_dir)
                checked = True
        self.dir = Path(run_dir)
        self._given_o = out is not None
        if not checked and not is_run_directory(self.dir):  # before the claim lock makes any folder (an
            refuse_output_among_inputs(cfg, self.dir, self._given_o)  # earlier run's: in _claim, after its verb)
        self.command = f"tub {plugin} {verb}"
        self._training_lock: ItemLock | None = None
        # two jobs started together on one new -o: the second waits here and then sees the first's records
        claim = self._claim_lock() if self.is_main else None
        with claim.waiting(timeout=120) if claim else contextlib.nullcontext():
            self._claim(cfg, resume, overwrite, verbosity, plugin_version, same_outputs_except, training,
                        resume_may_change or set())
        self.log.debug("run directory %s", self.dir)
        if training and resume and self.resume_from is None:  # asked to continue, but there is nothing to continue
            where = f"in {self.dir}" if out else f"of an earlier run with these settings under {parent}"
            self.log.info("--resume %s: no checkpoint %s; starting fresh", resume, where)

    CLAIM = ".claim"

    def _claim_lock(self) -> ItemLock:
        """Beside the run directory (a new one does not exist yet); inside an existing one whose parent
        this user cannot write (``-o ~``, ``-o /scratch/$USER``). Every job on that -o sees the same parent
        permissions, so all take the same lock."""
        if self.dir.is_dir() and not os.access(self.dir.parent, os.W_OK):
            return ItemLock(self.dir / self.CLAIM)
        return ItemLock(self.dir.parent / f".{self.dir.name}.claim")

    def _claim(self, cfg, resume, overwrite, verbosity, plugin_version, same_outputs_except, training,
               resume_may_change) -> None:
        """Check the directory's earlier records against this run and write this run's."""
        earlier_command = self._earlier_command()
        if earlier_command and earlier_command != self.command:
            raise TubError(f"{self.dir} is the run directory of `{earlier_command}`; give this `{self.command}` "
                           "run its own -o (its records and outputs would mix with that run's)")
        if is_run_directory(self.dir):  # a new folder was checked before the claim
            refuse_output_among_inputs(cfg, self.dir, self._given_o)
        linked = [n for n in ("tub.log", "metrics.jsonl", "failures.jsonl", "config.yaml", "env.json", "metrics.json",
                              DONE) if (self.dir / n).is_symlink()]
        if self.is_main and linked:  # appends would go through the link into another file
            raise TubError(f"{self.dir}/{linked[0]} is a symbolic link; tub writes its own run records there: "
                           "remove the link, or use a new -o")
        if self.is_main and not (self.dir / "env.json").exists():
            # a folder of the user's (e.g. -o . in a project): files of tub's names there would be replaced
            def results_in(folder: Path) -> bool:  # another job's item locks and temporaries do not count
                return folder.is_dir() and any(not (c.name.startswith(".") or c.name.endswith(".lock"))
                                               for c in folder.iterdir())

            mine = [n for n in ("config.yaml", "metrics.json", "metrics.jsonl", DONE, "failures.jsonl", "outputs")
                    if (self.dir / n).is_file() or (n == "outputs" and results_in(self.dir / n))]
            if mine:
                raise TubError(f"-o {self.dir} holds {', '.join(mine)} but no tub run records (env.json), which this "
                               "run would replace; pass a new or empty folder, or an earlier run directory")
        self.outputs_dir = self.dir / "outputs"
        self.checkpoints_dir = self.dir / "checkpoints"
        earlier, now = self._earlier_config(), cfg.model_dump(mode="json")
        cwd = self._earlier_env().get("cwd")
        if earlier is not None and same_outputs_except is not None and not overwrite:
            changed = changed_settings(earlier, now, same_outputs_except, earlier_cwd=cwd)
            if changed:  # skip-existing would keep outputs that these settings no longer describe
                raise TubError(f"{self.dir} holds outputs made with other settings ({changed}); use a new -o, "
                               "the same settings, or --overwrite to recompute")
        checkpoint = (self.checkpoints_dir / "last.pt").exists()
        if training and resume and checkpoint and earlier is not None and not overwrite:
            changed = changed_settings(earlier, now, (EXECUTION_FIELDS - {"batch_size"}) | resume_may_change,
                                       earlier_cwd=cwd)
            if changed:  # the checkpoint continues the training its recorded settings describe
                allowed = f" (only {', '.join(sorted(resume_may_change))} may change)" if resume_may_change else ""
                raise TubError(f"{self.dir} was trained with other settings ({changed}); --resume continues that "
                               f"training: give the same settings{allowed}, or a new -o")
        source = self.resume_from.parent.parent if self.resume_from is not None else None
        if training and source is not None and source.resolve() != self.dir.resolve() and not overwrite:
            recorded = self._earlier_config(source)  # --resume PATH into a new -o: the checkpoint's own run settings
            changed = recorded is not None and changed_settings(
                recorded, now, (EXECUTION_FIELDS - {"batch_size"}) | resume_may_change,
                earlier_cwd=self._earlier_env(source).get("cwd"))
            if changed:
                allowed = f" (only {', '.join(sorted(resume_may_change))} may change)" if resume_may_change else ""
                raise TubError(f"--resume {self.resume_from}: that run was trained with other settings ({changed}); "
                               f"the checkpoint continues that training: give the same settings{allowed}")
        fresh_start = training and not resume and checkpoint
        if fresh_start and not overwrite:
            raise TubError(f"{self.dir} holds a training checkpoint; pass --resume auto to continue it, "
                           "--overwrite to start again, or a new -o")
        # a directory this run creates is removed again if the run fails before any output (one the user
        # made, found empty, is emptied again)
        fresh = not (self.dir.is_dir() and any(
            p.name != f"{self.CLAIM}.lock" and not p.name.startswith(f".{self.CLAIM}.lock.") for p in self.dir.iterdir()))
        self._before = None if fresh or not self.is_main else self._snapshot()
        self._archived: Path | None = None
        self._previous: Path | None = None
        mixed = None  # a warning for the log, once it is open
        try:  # a failure while the records are written (disk full, a deleted working folder) leaves no
            # half-made run directory that a rerun would refuse
            # one training job per directory (its checkpoints, metrics.jsonl), and one job continuing its outputs
            # (mlff md: two would append every step twice to one trajectory)
            if (training or self._continues) and self.is_main:
                self._training_lock = lock = ItemLock(self.dir / "training")
                if not lock.acquire() and training and resume and lock.owner().split()[0] != socket.gethostname():
                    # a requeued job resuming on another node: the lock's owner there was killed with its job
                    lock.path.unlink(missing_ok=True)
                    lock.acquire()
                if not lock.held:
                    doing = "training" if training else f"running {self.plugin} {self.verb}"
                    raise TubError(f"another job is {doing} in {self.dir} ({self._training_lock.owner()}); wait for it "
                                   f"to end or use a new -o (if no job is running, delete {self._training_lock.path})")
            if self.is_main:
                if fresh_start:  # --overwrite: the old training moves aside until this one has produced something
                    self._previous = self._set_aside(("checkpoints", "metrics.jsonl"))
                elif training and not checkpoint:  # a training killed before its first checkpoint starts over:
                    (self.dir / "metrics.jsonl").unlink(missing_ok=True)  # its rows would repeat the new ones
                ignore = same_outputs_except if same_outputs_except is not None else execution_fields(cfg)
                changed = earlier is not None and changed_settings(earlier, now, ignore, earlier_cwd=cwd)
                if changed:
                    self._archived = archive_config(self.dir)  # keep the record of the earlier settings
                    goes_on = self._continues or (training and self.resume_from is not None)  # from what is there
                    if not goes_on and self.outputs_dir.is_dir() and any(self.outputs_dir.iterdir()):
                        mixed = (f"{self.dir}/outputs holds files of an earlier run with other settings ({changed}; "
                                 f"now {self._archived.name}): those this run does not write stay beside its own; "
                                 "use a new -o for a set of this run's only")
                self.outputs_dir.mkdir(parents=True, exist_ok=True)
                if training:  # other verbs' weights (knnlrp's model, pathorob's robustification) make it on saving
                    self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
                (self.dir / DONE).unlink(missing_ok=True)  # a reused directory is incomplete again
                if self.shard[1] > 1:
                    (self.dir / f"{DONE}.{self.shard[0]}of{self.shard[1]}").unlink(missing_ok=True)
            self.log = setup_logging(verbosity if self.is_main else -2, self.dir / "tub.log" if self.is_main else None)
            if mixed:
                self.log.warning("%s", mixed)
            _device.seed_everything(self.seed)
            _device.exact_fp32()
            if self.is_main:
                from tubcli.config import config_yaml

                write_text(self.dir / "config.yaml", config_yaml(cfg))
                env = environment_record(plugin_version, self.command, cfg)
                with ItemLock(self.dir / "env.json").waiting():  # the shards of an array job share the file
                    if self.shard[1] > 1:  # every shard's own record is kept (hosts and versions may differ)
                        shards = {**self._earlier_env().get("shards", {}),
                                  f"{self.shard[0]}/{self.shard[1]}": {k: env[k] for k in ("argv", "host", "time",
                                                                                          "threads")}}
                        env["shards"] = dict(sorted(shards.items()))
                    if self._device is not None:
                        env.update(self._device_record())
                    write_json(self.dir / "env.json", env)
        except BaseException:
            self.undo_if_unused()
            raise

    def _earlier_command(self) -> str | None:
        """The verb an existing run directory was made by (None: new, or written before tub recorded it)."""
        return self._earlier_env().get("command") or None

    def _earlier_env(self, folder: Path | None = None) -> dict:
        try:
            env = json.loads(((folder or self.dir) / "env.json").read_text())
        except (OSError, ValueError):
            return {}
        return env if isinstance(env, dict) else {}

    def _earlier_config(self, folder: Path | None = None) -> dict | None:
        path = (folder or self.dir) / "config.yaml"
        if not path.is_file():
            return None
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except Exception:
            return None
        return data if isinstance(data, dict) else None

    RECORDS = ("config.yaml", "env.json", "metrics.json", DONE)

    def _snapshot(self) -> tuple[dict, list, set]:
        """The run records, the outputs' names and times, and the names present, of a directory this run
        reuses (or a user's folder that holds other files)."""
        records = {n: (self.dir / n).read_bytes() for n in self.RECORDS if (self.dir / n).is_file()}
        return records, self._product_state(), {p.name for p in self.dir.iterdir()}

    def _product_state(self) -> list:
        folders = [self.outputs_dir, self.checkpoints_dir]
        files = [self.dir / "metrics.jsonl", self.dir / "failures.jsonl"]
        paths = [p for d in folders if d.is_dir() for p in d.rglob("*")] + [p for p in files if p.exists()]
        return sorted((str(p), p.stat().st_mtime_ns) for p in paths)

    def _set_aside(self, names: tuple[str, ...]) -> Path:
        """Move ``names`` of the run directory into ``.previous/`` (cleared when this run finishes,
        moved back when it fails before producing anything)."""
        aside = self.dir / ".previous"
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in names:
            if (self.dir / name).exists():
                os.replace(self.dir / name, aside / name)
        return aside

    def _restore_aside(self) -> None:
        if self._previous is None or not self._previous.is_dir():
            return
        produced = (self.dir / "metrics.jsonl").exists() or (
            self.checkpoints_dir.is_dir() and any(self.checkpoints_dir.iterdir()))
        if not produced:
            for item in self._previous.iterdir():
                target = self.dir / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
            shutil.rmtree(self._previous, ignore_errors=True)

    def undo_if_unused(self) -> None:
        """After a failure before any output: remove the directory if this run made it, or put back an
        earlier run's records (config.yaml, env.json, DONE) if it reused one, so that a refused command
        leaves no run directory that looks like results and does not rewrite another run's history."""
        if not self.is_main:
            return
        self._release_training()
        self._restore_aside()
        if self._claimed_since():
            return  # another job on this -o has claimed the directory since: its records are not ours to undo
        if self._before is not None:
            records, state, names = self._before
            if self._product_state() == state:
                for name in self.RECORDS:
                    if name in records:
                        write_bytes(self.dir / name, records[name])
                if self._archived is not None:
                    self._archived.unlink(missing_ok=True)
                setup_logging(-1)  # closes tub.log
                for name in ("config.yaml", "env.json", "tub.log", "outputs", "checkpoints"):  # what this run added
                    path = self.dir / name
                    if name not in names and path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    elif name not in names:
                        path.unlink(missing_ok=True)
            return
        if self._product_state() or (self.dir / "metrics.json").exists():
            return
        setup_logging(-1)  # closes tub.log
        if not self._folder_was_there:
            shutil.rmtree(self.dir, ignore_errors=True)
            for folder in self._new_folders:
                try:
                    folder.rmdir()  # only while empty: another run may have put its directory there since
                except OSError:
                    break
            return
        for child in self.dir.iterdir():  # an empty folder the user made (its permissions, ACLs, group) stays
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def _claimed_since(self) -> bool:
        """Whether env.json was written by another job after this run claimed the directory."""
        path = self.dir / "env.json"
        try:
            text = path.read_bytes()
        except OSError:
            return False
        if self._before is not None and text == self._before[0].get("env.json"):
            return False  # the earlier run's record, as this run found it
        env = self._earlier_env()
        return (env.get("pid"), env.get("host")) not in ((None, None), (os.getpid(), socket.gethostname()))

    def _release_training(self) -> None:
        if self._training_lock is not None:
            self._training_lock.release()

    # ---- distributed
    @property
    def rank(self) -> int:
        return self._dist.rank

    @property
    def world_size(self) -> int:
        return self._dist.world_size

    @property
    def is_main(self) -> bool:
        return self._dist.is_main

    def _broadcast(self, value):
        if not self._dist.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def ddp(self, model):
        return _device.wrap_ddp(model, self.device)

    def sampler(self, dataset, shuffle: bool = True):
        return _device.distributed_sampler(dataset, shuffle=shuffle, seed=self.seed)

    def barrier(self) -> None:
        _device.barrier()

    # ---- device
    @property
    def device(self):
        if self._device is None:
            self._device = _device.resolve_device(getattr(self.cfg, "device", "auto"),
                                                  getattr(self.cfg, "precision", "fp32"))
            self._record_device()
        return self._device

    def _record_device(self) -> None:
        """Add the device the run computes on to ``env.json`` (``--device auto`` names none; a GPU's model and
        cuDNN tell GPU from CPU results afterwards, e.g. an LRP conservation error). A device resolved
        before the run directory exists (torchrun) is added when env.json is first written."""
        if not self.is_main or not hasattr(self, "dir") or not (self.dir / "env.json").is_file():
            return
        with ItemLock(self.dir / "env.json").waiting():  # the shards of an array job share the file
            env = self._earlier_env()
            if env:
                write_json(self.dir / "env.json", {**env, **self._device_record()})

    def _device_record(self) -> dict:
        import torch

        record = {"device": str(self._device)}
        if self._device.type == "cuda":
            try:  # a record: a driver that cannot say must not stop the run
                index = self._device.index if self._device.index is not None else torch.cuda.current_device()
                record.update({"gpu": torch.cuda.get_device_name(index),
                               "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
                               "cudnn": torch.backends.cudnn.version()})
            except (RuntimeError, AssertionError) as exc:
                record["gpu"] = f"unknown ({first_line(exc)})"
        if self.world_size > 1:
            record["world_size"] = self.world_size
        return record

    @property
    def dtype(self):
        return _device.resolve_dtype(getattr(self.cfg, "precision", "fp32"))

    def item_seed(self, item_id) -> int:
        return _device.item_seed(self.seed, str(item_id))

    # ---- progress and metrics
    def progress(self, iterable, total: int | None = None, desc: str = ""):
        if not self.is_main:
            return iter(iterable)
        return track(iterable, total=total, desc=desc)

    def write_metrics(self, metrics: dict) -> None:
        """``metrics.json``; the shards of an array job share it as ``{"shards": {"i/n": metrics}}`` (each
        shard replaces its own entry under the file's lock), so no shard's figures overwrite another's."""
        if not self.is_main:
            return
        path = self.dir / "metrics.json"
        if self.shard[1] == 1:
            write_json(path, metrics)
            return
        with ItemLock(path).waiting():
            try:
                shards = json.loads(path.read_text()).get("shards", {})
            except (OSError, ValueError, AttributeError):
                shards = {}
            shards[f"{self.shard[0]}/{self.shard[1]}"] = metrics
            write_json(path, {"shards": dict(sorted(shards.items()))})

    def log_metrics(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(to_json(row) + "\n")

    # ---- batch verbs
    def batch(self, items: Iterable, output_for: Callable, key: Callable = str,
              check_output: Callable | None = None, lock_for: Callable | None = None) -> Iterator[tuple]:
        """Sorted, sharded, skip-existing, locked iteration over ``items``; yields ``(item, output)``.

        Wrap the body in ``with run.item(item):`` so that one bad item is recorded in
        ``failures.jsonl`` and the others go on. ``check_output(path)`` reads an output that would be
        skipped; where it raises, the run stops with :func:`unreadable_output` (outputs are written
        atomically, so a damaged one was damaged afterwards, and counting it as done would hide that).
        ``lock_for(item)`` names the file locked for an item whose ``output_for`` changes as it is made
        (the first of several outputs still missing), so that two jobs never work on one item.
        """
        index, count = self.shard
        all_items = list(items)
        mine = shard_items(all_items, index, count, key=key)
        stats = {"items": len(dict.fromkeys(all_items)), "shard": f"{index}/{count}", "in_shard": len(mine),
                 "processed": 0, "skipped_existing": 0, "skipped_locked": 0, "failed": 0}
        self.batch_stats = stats
        for item in self.progress(mine, total=len(mine), desc=f"{self.plugin} {self.verb}"):
            out = Path(output_for(item))
            if len(os.fsencode(out.name)) > MAX_OUTPUT_NAME:  # its lock or temporary name would not fit
                with self.item(item):
                    raise TubError(f"the output name {out.name[:40]}... is {len(os.fsencode(out.name))} bytes; "
                                   f"at most {MAX_OUTPUT_NAME} fit beside tub's lock and temporary names (255 in all)"
                                   "; rename the input")
                stats["failed"] += 1
                continue
            if out.exists() and not self.overwrite:
                if check_output is not None:
                    try:
                        check_output(out)
                    except Exception as exc:
                        raise unreadable_output(out, exc) from None
                stats["skipped_existing"] += 1
                continue
            lock = ItemLock(lock_for(item) if lock_for is not None else out)
            failed_before = len(self.failures)
            try:  # from the lock's creation on: a signal at any point must not leave it behind
                if not lock.acquire():
                    stats["skipped_locked"] += 1
                    self._held_elsewhere.append((out, lock))
                    self.log.info("skipping %s: another job holds its lock", item)
                    continue
                if out.exists() and not self.overwrite:  # finished by another job while we looked
                    stats["skipped_existing"] += 1
                    continue
                if remove_stale_temporaries(out):  # a killed job's half-written output of this item
                    self.log.info("%s: removed the partial output of an earlier, interrupted job", item)
                yield item, out
            finally:
                lock.release()
            if len(self.failures) > failed_before:
                stats["failed"] += 1
            else:
                stats["processed"] += 1
                self._forget_failures(item)

    @contextlib.contextmanager
    def item(self, item):
        """Record any exception of one item in ``failures.jsonl`` and go on with the next."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if terminating():  # SIGTERM inside a C extension, reworded by it: stop, not an item's failure
                raise Terminated() from exc
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not isinstance(exc, TubError):
                message = f"{type(exc).__name__}: {message}"
            self.failures.append({"item": str(item), "error": message})
            named = message.startswith((str(item), f"{Path(str(item)).name}:"))  # the item named once
            self.log.error("%s", message if named else f"{item}: {message}")
            self.log.debug("traceback", exc_info=True)
            line = json.dumps({"item": str(item), "error": message, "shard": f"{self.shard[0]}/{self.shard[1]}"})
            self._rewrite_failures(item, line)

    def refuse_replaced_file(self, option: str, path) -> str:
        """The sha256 of a file the settings name by path only (``--weights``), recorded in the run
        folder's ``file_digests.json``: outputs a rerun would skip must come from the same bytes, and
        weights are often replaced in place (a model retrained into the same file). A copy with the
        same bytes is the same file."""
        digest = file_sha256(path)
        record = self.dir / "file_digests.json"
        digests = json.loads(record.read_text()) if record.is_file() else {}
        earlier = digests.get(option)
        outputs = self.outputs_dir.is_dir() and any(self.outputs_dir.iterdir())
        if outputs and not self.overwrite:
            if earlier is None:  # outputs of a run that recorded no digest: which bytes made them is unknown
                self.log.warning("%s records no sha256 of %s %s: the outputs it skips cannot be checked against "
                                 "this file (--overwrite recomputes them)", self.dir, option, path)
                return digest
            if earlier != digest:
                raise TubError(f"{option} {path} is not the file {self.dir} was made with (its sha256 changed); "
                               "use a new -o, or --overwrite to compute again")
        if self.is_main and earlier != digest:
            write_json(record, {**digests, option: digest})
        return digest

    def record_item(self, output: Path, record: dict) -> None:
        """Keep one item's results beside the run (``items/<digest of the output path>.json``), written
        *before* its output, so that a verb's totals (``item_records``) cover earlier invocations and
        other shards, as an uninterrupted run's would."""
        import hashlib

        rel = Path(output).resolve().relative_to(self.dir.resolve()).as_posix()
        name = hashlib.sha256(rel.encode()).hexdigest()[:24]  # any output name, within file-name limits
        write_json(self.dir / "items" / f"{name}.json", {"output": rel, **record})

    def item_records(self) -> list[dict]:
        """The records of every item whose output exists (an item whose output is gone no longer counts),
        in output order; each without its ``output`` key."""
        records = [json.loads(p.read_text()) for p in (self.dir / "items").glob("*.json")]
        return [{k: v for k, v in r.items() if k != "output"}
                for r in sorted(records, key=lambda r: r["output"]) if (self.dir / r["output"]).exists()]

    def _forget_failures(self, item) -> None:
        """Drop an earlier run's ``failures.jsonl`` lines of an item that has now succeeded."""
        if (self.dir / "failures.jsonl").exists():
            self._rewrite_failures(item, None)

    def _rewrite_failures(self, item, line: str | None) -> None:
        """Replace the item's lines in ``failures.jsonl`` by ``line`` (None: by nothing), so that the file
        lists what is still failed, once (under its lock: other shards write to it too)."""
        path = self.dir / "failures.jsonl"
        with ItemLock(path).waiting():
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            keep = [x for x in lines if _failure_item(x) != str(item)] + ([line + "\n"] if line else [])
            if keep == lines:
                return
            if keep:
                write_text(path, "".join(keep))
            else:
                path.unlink()

    # ---- checkpoints and weights
    def _resolve_resume(self, resume: str, run_dir: Path | None, parent: Path, chash: str, cfg, may_change: set[str]):
        if resume == "auto":
            if run_dir is not None:
                ckpt = run_dir / "checkpoints" / "last.pt"
                return (ckpt if ckpt.is_file() else None), run_dir
            found = find_resumable(parent, chash, cfg.model_dump(mode="json"), may_change)
            return (found / "checkpoints" / "last.pt", found) if found else (None, None)
        path = Path(resume)
        if path.is_dir():
            path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            raise TubError(f"--resume {resume}: no checkpoint there; give a run directory or a last.pt file")
        return path, path.parent.parent if path.parent.name == "checkpoints" else None

    def save_checkpoint(self, state: dict, best: bool = False, nan_allowed: tuple[str, ...] = ()) -> None:
        """``checkpoints/last.pt`` (and ``best.pt``), rank 0 only: plain dicts, lists and tuples of tensors,
        Python numbers and strings, which ``--resume`` loads without pickle; anything else (a numpy scalar or
        array) is a TypeError here, at the save, not days later at the resume. A NaN in a floating tensor stops
        the run as a diverged training, except under the top-level keys ``nan_allowed`` (a buffer of samples
        whose non-finite values are data)."""
        if not self.is_main:
            return
        import torch

        found = not_loadable_without_pickle(state)
        if found:
            raise TypeError(f"checkpoint {found} needs pickle to load, which --resume refuses; store tensors, Python "
                            "numbers and strings (float(x), torch.as_tensor(array))")
        if _holds_nan({k: v for k, v in state.items() if k not in nan_allowed}):  # broken weights are not kept
            raise TubError("training diverged: the weights hold NaN; lower the learning rate (the lr setting) or "
                           "check the data for extreme values", exit_code=1)
        log = self.dir / "metrics.jsonl"
        rows = len(log.read_text().splitlines()) if log.exists() else 0
        state = {**state, "_tub_metrics_rows": rows}  # so that a resume drops rows logged after this save
        for name in ("last.pt",) + (("best.pt",) if best else ()):
            remove_stale_temporaries(self.checkpoints_dir / name)  # what a killed save of this file left
            with atomic_path(self.checkpoints_dir / name) as tmp, open(tmp, "wb") as fh:
                torch.save(state, fh)  # a file object: the archive is not named after the random temporary

    def load_checkpoint(self) -> dict | None:
        """The state to resume from (``--resume``), or None for a fresh start."""
        if self.resume_from is None:
            return None
        from tubcli.io import load_torch_state

        self.log.info("resuming from %s", self.resume_from)
        state = load_torch_state(self.resume_from)
        rows = state.pop("_tub_metrics_rows", None)
        log = self.dir / "metrics.jsonl"
        if self.is_main and rows is not None and log.exists():  # rows of steps after the checkpoint come again
            lines = log.read_text().splitlines(keepends=True)
            if len(lines) > rows:
                write_text(log, "".join(lines[:rows]))
        return state

    def save_weights(self, tensors: dict, config: dict, name: str = "model") -> Path:
        """``checkpoints/<name>.safetensors`` + ``<name>.json`` (weights and the model config)."""
        from tubcli.io import save_safetensors

        path = self.checkpoints_dir / f"{name}.safetensors"
        if self.is_main:
            save_safetensors(path, tensors)
            write_json(self.checkpoints_dir / f"{name}.json", config)
        return path

    # ---- end of run
    def finish(self, metrics: dict | None) -> dict:
        """Write metrics and ``DONE`` when nothing failed and no item is left to another job's lock;
        raise when items failed."""
        self._release_training()
        metrics = dict(metrics or {})
        if self.batch_stats:
            metrics.setdefault("batch", self.batch_stats)
        if metrics:
            self.write_metrics(metrics)
        if self.failures:
            raise ItemFailures(len(self.failures), self.batch_stats.get("in_shard", len(self.failures)),
                               self.dir / "failures.jsonl", metrics)
        unfinished = [(out, lock) for out, lock in self._held_elsewhere if not out.exists()]
        if unfinished:  # another job (or a dead one's lock) still holds these: the run is not complete
            lock = unfinished[0][1]  # the lock it found (lock_for's, or the output's)
            self.log.warning("%d item(s) were locked by another job and have no output yet (e.g. %s, held by %s); "
                             "%s not written: rerun when that job has ended, or delete its lock %s if no job is "
                             "running (a job killed on another host leaves one, taken over 15 min after its last "
                             "refresh)", len(unfinished), unfinished[0][0].name, lock.owner(), DONE, lock.path)
        elif self.is_main:
            if self.shard[1] == 1 and (remove_orphaned_temporaries(self.outputs_dir, before=self.began)
                                       + ItemLock.remove_orphaned_private_files(self.outputs_dir, self.began)):
                self.log.info("removed the partial files an earlier, interrupted job left in %s", self.outputs_dir)
            name = DONE if self.shard[1] == 1 else f"{DONE}.{self.shard[0]}of{self.shard[1]}"
            write_text(self.dir / name, "")
            if self.shard[1] == 1:  # the whole input is done: markers of earlier sharded runs are stale
                for marker in self.dir.glob(f"{DONE}.*of*"):
                    marker.unlink(missing_ok=True)
            self.log.info("run directory %s", self.dir)  # where the outputs are (a default -o is not named elsewhere)
            if self._previous is not None:
                shutil.rmtree(self._previous, ignore_errors=True)
        return metrics
