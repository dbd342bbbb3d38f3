"""A user's own function named in a setting: ``--set energy=my_target.py:log_prob`` or ``mypkg.targets:log_prob``.

Methods such as CVSI (an unnormalised density the user writes) or a user-defined metric take code, not
data. ``load_user_function`` imports it the way the user means it (a file path, or a module importable
from the working folder, which the ``tub`` console script does not put on ``sys.path``), answers every
mistake with one line about the user's file (never "plugin declaration out of date"), and returns the
file it came from, so that a batch verb can record its sha256 (``run.refuse_replaced_file``) and refuse
to mix outputs of an edited function with earlier ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

from tubcli.errors import TubError


def load_user_function(spec: str, setting: str = "function") -> tuple[Callable, Path | None]:
    """(the callable ``spec`` names, the file it is defined in or None). ``spec`` is ``FILE.py:NAME`` or
    ``MODULE:NAME``; ``setting`` names the option in the errors (``energy``, ``--target``)."""
    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise TubError(f"{setting} {spec!r}: give FILE.py:FUNCTION or MODULE:FUNCTION (e.g. targets.py:log_prob)")
    if where.endswith(".py") or os.sep in where or "/" in where:
        module, source = _from_file(Path(where).expanduser(), setting, spec)
    else:
        module, source = _from_module(where, setting, spec)
    if not hasattr(module, name):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise TubError(f"{setting} {spec!r}: {where} defines no {name!r}"
                       + (f" (it defines {', '.join(defined[:8])})" if defined else ""))
    func = getattr(module, name)
    if not callable(func):
        raise TubError(f"{setting} {spec!r}: {name} in {where} is not callable (a {type(func).__name__})")
    return func, source


def _from_file(path: Path, setting: str, spec: str):
    if not path.is_file():
        raise TubError(f"{setting} {spec!r}: no such file {path}")
    # a name of its own per file, so that two files called targets.py do not replace each other
    name = f"tub_user_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    _execute(lambda: loader_spec.loader.exec_module(module), path.name, setting, spec)
    return module, path.resolve()


def _from_module(name: str, setting: str, spec: str):
    sys.path.insert(0, os.getcwd())  # as `python -m` would: a module in the working folder
    try:
        module = _execute(lambda: importlib.import_module(name), name, setting, spec, requested=name)
    finally:
        sys.path.remove(os.getcwd())
    source = getattr(module, "__file__", None)
    return module, Path(source).resolve() if source else None


def _execute(run, what: str, setting: str, spec: str, requested: str | None = None):
    """Run the import; an error inside the user's code is one line naming it and its line."""
    try:
        return run()
    except ModuleNotFoundError as exc:
        if requested and exc.name and (requested + ".").startswith(exc.name + "."):
            raise TubError(f"{setting} {spec!r}: no module {exc.name!r} here or on the Python path; give the "
                           "file instead (path/to/file.py:FUNCTION)") from None
        raise TubError(f"{setting} {spec!r}: importing {what} needs the package {exc.name!r}, which is not "
                       "installed") from None
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything while it is imported
        tb = exc.__traceback__
        line = None
        while tb is not None:  # the deepest frame in the user's file
            # the user's file: FILE.py itself, or MODULE's last part (pkg.targets -> targets.py)
            if Path(tb.tb_frame.f_code.co_filename).stem == (Path(what).stem if what.endswith(".py")
                                                             else what.rpartition(".")[2]):
                line = tb.tb_lineno
            tb = tb.tb_next
        at = f" (line {line})" if line else ""
        raise TubError(f"{setting} {spec!r}: importing {what} failed{at}: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
