"""Test helpers: ``invoke`` (the real CLI in-process) and ``check_plugin`` (the conformance suite).

Like scikit-learn's ``check_estimator``: every plugin's tests call ``check_plugin("<name>")``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tubcli.errors import TubError


CALLER_VARIABLES = ("TUB_", "SLURM_ARRAY_", "RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Prefixes of the environment variables that change what a tub command does (settings, shards of an
array job, torchrun ranks): tests must not inherit them from the shell or job that runs pytest."""


def caller_variables(environ=None) -> list[str]:
    """The variables of this environment that :data:`CALLER_VARIABLES` names (``TUB_NO_PROGRESS`` aside)."""
    environ = os.environ if environ is None else environ
    return [k for k in environ if k.startswith(CALLER_VARIABLES) and k != "TUB_NO_PROGRESS"]


def isolate_environment(monkeypatch) -> None:
    """Drop the caller's tub-relevant variables for one test (``monkeypatch``: pytest's fixture), so that
    a suite run inside a SLURM array job or with ``TUB_DEVICE=cuda`` exported tests what it means to, and
    reset the ``tub`` logger (see :func:`reset_tub_logger`). Use
    it in an autouse fixture of the plugin's ``conftest.py``; a test then sets what it needs itself."""
    for key in caller_variables():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TUB_NO_PROGRESS", "1")
    reset_tub_logger()


def reset_tub_logger() -> None:
    """Give the ``tub`` logger a fresh process's state: a CLI run in an earlier test configured it to
    stop propagating (and left its handlers), so pytest's ``caplog`` saw its records only in some orders."""
    import logging

    from tubcli.progress import LOGGER_NAME

    log = logging.getLogger(LOGGER_NAME)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate = True
    log.setLevel(logging.NOTSET)


def invoke(args: list[str], env: dict | None = None, catch_exceptions: bool = False):
    """Run ``tub ARGS`` in-process with click's CliRunner; ``result.stdout``/``stderr`` are separate.
    The process environment is seen (see :func:`isolate_environment`), with ``env`` on top (None unsets)."""
    from click.testing import CliRunner

    from tubcli.cli import build_app

    runner = CliRunner()
    merged = {"TUB_NO_PROGRESS": "1", **(env or {})}
    return runner.invoke(build_app(), [str(a) for a in args], env=merged, catch_exceptions=catch_exceptions)


def _plugin(name: str):
    from tubcli.plugins import get_plugins

    record = get_plugins().records.get(name)
    assert record is not None, f"plugin {name!r} is not installed (no entry point in group 'tub')"
    assert record.error is None, f"plugin {name!r} failed to load: {record.error}"
    assert record.app is not None, f"plugin {name!r} registered no PluginApp (implement tub_register)"
    return record.app


def check_plugin(name: str, subprocess_checks: bool = True) -> None:
    """Assert that plugin ``name`` follows the contract of docs/plugin-guide.md.

    - it loads, registers a PluginApp and has ``train``, ``evaluate`` and ``explain``;
    - every verb's function and config resolve, its config is a ``TubConfig`` with ``extra="forbid"``,
      and its defaults (where complete) round-trip through a YAML file;
    - every verb builds a command whose ``--help`` works, and a misspelt config key is exit 2;
    - a path argument that does not exist is a one-line error with exit 2, not a traceback;
    - the demo resolves; ``tub <name> --help`` imports no torch (in a subprocess).
    """
    from tubcli.config import TubConfig, config_yaml, resolve_config
    from tubcli.verbs import PluginApp, _field_info, _plain_type, build_verb_command, resolve_ref

    clean = dict.fromkeys(caller_variables())  # the checks mean the defaults, not the caller's TUB_DEVICE

    def tub(args):  # this suite's calls, in the clean environment
        return invoke(args, env=clean)

    app = _plugin(name)
    assert isinstance(app, PluginApp)
    names = [v.name for v in app.verbs]
    assert len(names) == len(set(names)), f"duplicate verbs in {names}"
    for required in ("train", "evaluate", "explain"):
        assert required in names, f"plugin {name!r} lacks the verb {required!r}"
    assert app.help, "the plugin needs a one-line help"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for verb in app.verbs:
            assert verb.help, f"{name} {verb.name}: missing help"
            func = resolve_ref(verb.run)
            assert callable(func), f"{name} {verb.name}: {verb.run} is not callable"
            model = app.config_model(verb)
            assert issubclass(model, TubConfig), f"{name} {verb.name}: config must subclass tubcli.config.TubConfig"
            assert model.model_config.get("extra") == "forbid", f"{name} {verb.name}: config must forbid extra keys"
            build_verb_command(app, verb)
            result = tub([name, verb.name, "--help"])
            assert result.exit_code == 0, f"{name} {verb.name} --help failed: {result.output}"

            try:
                default = model()
            except Exception:
                default = None  # required fields: nothing to round-trip
            if default is not None:
                path = tmp / f"{verb.name}.yaml"
                path.write_text(config_yaml(default))
                again = resolve_config(model, name, path, environ={})
                assert again == default, f"{name} {verb.name}: config does not round-trip through YAML"

            bad = tmp / f"{verb.name}-bad.yaml"
            bad.write_text("definitely_not_a_key: 1\n")
            result = tub([name, verb.name, "-c", str(bad), "--print-config"])
            assert result.exit_code == 2, f"{name} {verb.name}: misspelt key gave exit {result.exit_code}"
            assert "definitely_not_a_key" in result.stderr and str(bad) in result.stderr

            for arg in verb.args:
                info = _field_info(model, arg)
                base, _ = _plain_type(info.annotation)
                written = isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("output")
                if base is Path and not written:  # an input (a positional the verb writes may be new)
                    missing = tmp / "does-not-exist" / "input.bin"
                    result = tub([name, verb.name, str(missing), "-o", str(tmp / "run" / verb.name)])
                    assert result.exit_code == 2, (
                        f"{name} {verb.name}: a missing input gave exit {result.exit_code}, want 2: {result.output}")
                    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
                    assert lines, f"{name} {verb.name}: no 'error:' line for a missing input: {result.stderr}"
                    assert "Traceback" not in result.output
                    break

    if app.demo:
        assert callable(resolve_ref(app.demo)), f"{name}: demo {app.demo} is not callable"
    for module in list(app.requires) + list(app.optional):
        assert module.replace("_", "").replace(".", "").isalnum(), f"{name}: {module!r} is not a module name"

    if subprocess_checks:
        code = (
            "import sys\n"
            "from tubcli.cli import main\n"
            "try:\n"
            f"    main([{name!r}, '--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported by tub --help'\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in clean} | {"TUB_NO_PROGRESS": "1"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, f"`tub {name} --help` imported torch or failed: {proc.stderr[-2000:]}"


def raises_tub_error(func, *args, **kwargs) -> TubError:
    """Call ``func`` and return the TubError it raised (assertion error otherwise)."""
    try:
        func(*args, **kwargs)
    except TubError as exc:
        return exc
    raise AssertionError(f"{getattr(func, '__name__', func)} raised no TubError")


def expect_ok(result):
    """Assert a CLI result from :func:`invoke` exited 0 (shows stdout/stderr otherwise); returns it."""
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def expect_exit(result, code: int = 0):
    """Assert the exit ``code`` with no traceback (exit 2: exactly one ``error:`` line); returns the result."""
    assert result.exit_code == code, result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    if code == 2:
        assert len([ln for ln in result.stderr.splitlines() if ln.startswith("error:")]) == 1, result.stderr
    return result


def expect_error_line(result, *needles: str) -> str:
    """Exit 2 with exactly one ``error:`` line naming every needle and no traceback; log lines before it
    are allowed (a verb may log progress before it meets the bad input). Returns the line."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def expect_one_line_error(result) -> str:
    """Assert the project's bad-input contract: exit 2, one stderr line, no traceback; returns the line."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]
