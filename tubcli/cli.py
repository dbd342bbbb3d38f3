"""The ``tub`` command: the root Typer app, ``plugins``, ``doctor``, ``config`` and ``demo``."""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from tubcli.errors import TubError
from tubcli.plugins import get_plugins
from tubcli.verbs import SuggestingGroup, did_you_mean

app = typer.Typer(
    name="tub",
    help="tub: research methods from TU Berlin / BIFOLD as everyday tools. `tub <plugin> <verb> --help` for details.",
    no_args_is_help=True,
    add_completion=False,
    cls=SuggestingGroup,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich's import alone (0.15 s) would put `tub --help` over half a second
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tub {_module_version('tub') or 'unknown'}")
        for record in get_plugins().records.values():
            typer.echo(f"{record.name} {record.version or '-'}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the versions of tub and its plugins and exit.")):
    pass


def _fail(exc: TubError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@app.command("plugins")
def plugins_command(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List installed plugins, their verbs and any load error."""
    rows = []
    for record in get_plugins().records.values():
        verbs = [v.name for v in record.app.verbs] if record.app else []
        rows.append({"name": record.name, "distribution": record.distribution, "version": record.version,
                     "verbs": verbs, "error": record.error})
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no plugins installed (pip install tub-<name>; in a clone: pip install -e plugins/tub-<name>)")
    for row in rows:
        status = f"ERROR {row['error']}" if row["error"] else " ".join(row["verbs"])
        typer.echo(f"{row['name']:<12} {row['distribution'] or '-':<16} {row['version'] or '-':<8} {status}")


def _module_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def doctor_report() -> dict:
    """Versions, each plugin's requirements (found or missing with the hint), torch and OpenSlide."""
    report: dict = {"python": platform.python_version(), "platform": platform.platform(), "tub": _module_version("tub"),
                    "plugins": [], "ok": True}
    for record in get_plugins().records.values():
        entry = {"name": record.name, "version": record.version, "error": record.error, "requires": {}, "optional": {}}
        if record.error:
            report["ok"] = False
        if record.app is not None:
            for kind in ("requires", "optional"):
                for module, hint in getattr(record.app, kind).items():
                    found = importlib.util.find_spec(module) is not None
                    entry[kind][module] = {"found": found, "hint": None if found else hint}
                    if kind == "requires" and not found:
                        report["ok"] = False
        report["plugins"].append(entry)
    try:
        import torch

        report["torch"] = {"version": torch.__version__, "cuda": torch.cuda.is_available(),
                           "cuda_devices": torch.cuda.device_count(), "cuda_version": torch.version.cuda,
                           "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    except ImportError:  # only a problem for plugins that require it, which their requirements say
        report["torch"] = None
    try:
        import openslide

        report["openslide"] = {"python": openslide.__version__, "library": openslide.__library_version__}
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        report["openslide"] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    return report


@app.command("doctor")
def doctor_command(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Check versions, plugin requirements, torch/CUDA/MPS and the OpenSlide library."""
    report = doctor_report()
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(f"python      {report['python']}  ({report['platform']})")
        typer.echo(f"tub         {report['tub']}")
        torch_info = report["torch"]
        if torch_info:
            typer.echo(f"torch       {torch_info['version']}  cuda={torch_info['cuda']} ({torch_info['cuda_devices']} devices)"
                       f"  mps={torch_info['mps']}")
        else:
            typer.echo("torch       not installed (pip install torch==2.13.0, or your CUDA build)")
        slide = report["openslide"]
        typer.echo(f"openslide   {slide.get('library') or 'not usable: ' + slide.get('error', '')}")
        for entry in report["plugins"]:
            head = f"plugin {entry['name']:<10} {entry['version'] or '-'}"
            typer.echo(head + (f"  LOAD ERROR: {entry['error']}" if entry["error"] else ""))
            for kind in ("requires", "optional"):
                for module, state in entry[kind].items():
                    mark = "ok" if state["found"] else f"missing ({state['hint']})"
                    typer.echo(f"  {'require' if kind == 'requires' else 'optional':<8} {module:<18} {mark}")
    raise typer.Exit(0 if report["ok"] else 1)


@app.command("config")
def config_command(
    plugin: str = typer.Argument(..., help="Plugin name."),
    verb: str = typer.Argument(..., help="Verb name."),
    config: Optional[Path] = typer.Option(None, "-c", "--config", help="Config file to validate."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="key.sub=value overrides."),
    schema: bool = typer.Option(False, "--schema", help="Print the JSON schema instead."),
):
    """Print a verb's fully resolved config (defaults < file < TUB_* env < --set) and validate it."""
    from tubcli.config import config_yaml, resolve_config, unknown_env_warnings

    try:
        plugin_app = get_app(plugin)
        model = plugin_app.config_model(plugin_app.verb(verb))
        if schema:
            typer.echo(json.dumps(model.model_json_schema(), indent=2))
            return
        siblings = [plugin_app.config_model(v) for v in plugin_app.verbs]
        cfg = resolve_config(model, plugin_app.name, config, sets, siblings=siblings)
    except TubError as exc:
        _fail(exc)
    for warning in unknown_env_warnings(siblings, plugin_app.name):
        typer.echo(f"warning: {warning}", err=True)
    sys.stdout.write(config_yaml(cfg))


def get_app(name: str):
    plugins = get_plugins()
    record = plugins.records.get(name)
    if record is None or (record.app is None and record.error is None):
        known = ", ".join(sorted(plugins.apps)) or "none"
        raise TubError(f"no plugin named {name!r}; installed: {known}")
    if record.error:
        raise TubError(f"plugin {name!r} failed to load: {record.error}", exit_code=1)
    return record.app


@app.command("demo")
def demo_command(
    plugin_names: Optional[list[str]] = typer.Argument(None, metavar="[PLUGIN]...", help="Plugins to demo (default: all)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Run directory (default: runs/demo/<time>)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:i] | mps"),
    as_json: bool = typer.Option(False, "--json", help="Summary as JSON."),
    traceback: bool = typer.Option(False, "--traceback", help="Show the full stack on errors."),
):
    """Run each plugin's quick-start pipeline on small generated data into one run directory."""
    import datetime as _dt

    from tubcli.config import TubConfig, resolve_config
    from tubcli.runs import Run
    from tubcli.verbs import report_error, resolve_ref

    plugins = get_plugins()
    try:
        names = plugin_names or sorted(n for n, r in plugins.records.items() if r.app is not None and r.app.demo)
        if not names:
            raise TubError("no installed plugin has a demo; install one (pip install tub-<name>; in a clone: "
                           "pip install -e plugins/tub-<name>)")
        apps = [get_app(n) for n in names]
        for plugin_app in apps:
            if not plugin_app.demo:
                raise TubError(f"plugin {plugin_app.name!r} declares no demo")
        # the common settings from the environment too (TUB_DEVICE, TUB_VECTOR_FIGURES, ...); --device wins
        cfg = resolve_config(TubConfig, "demo", flags={} if device == "auto" else {"device": device})
        if cfg.device != "auto":  # an absent device fails every demo alike: say it once, as a usage error
            from tubcli.device import resolve_device

            resolve_device(cfg.device)
    except TubError as exc:
        _fail(exc)
    from tubcli.runs import default_runs_root

    root = out or default_runs_root() / "demo" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if (root / "env.json").exists() or (root.exists() and not root.is_dir()):  # another verb's run, or a file
        _fail(TubError(f"-o {root} is {'a file' if not root.is_dir() else 'the run directory of another verb'}; "
                       "give the demo a new folder"))
    summary = []
    import signal

    from tubcli.errors import Terminated, on_sigterm, terminating
    from tubcli.progress import log_file_only

    terminating(reset=True)
    previous = signal.signal(signal.SIGTERM, on_sigterm)  # a batch job's time limit: one line, the run marked stopped
    try:
        for plugin_app in apps:
            start = time.perf_counter()
            row = {"plugin": plugin_app.name, "status": "ok", "seconds": 0.0, "figures": {},
                   "dir": str(root / plugin_app.name)}
            run = None
            try:
                run = Run(plugin_app.name, "demo", cfg, out=root / plugin_app.name,
                          plugin_version=plugin_app.version)
                figures = resolve_ref(plugin_app.demo, plugin_app.hints)(run) or {}
                run.finish(figures)
                row["figures"] = figures
            except KeyboardInterrupt as exc:
                stopped = isinstance(exc, Terminated) or terminating()
                if run is not None:
                    log_file_only(run.log, "stopped: " + ("terminated (SIGTERM)" if stopped else
                                                          "interrupted (SIGINT)"))
                    run.undo_if_unused()
                typer.echo(f"error: {'terminated (SIGTERM)' if stopped else 'interrupted'} during the {plugin_app.name} "
                           f"demo; rerun tub demo (with -o {root} it starts each demo again there)", err=True)
                raise typer.Exit(143 if stopped else 130) from None
            except Exception as exc:  # one failing demo must not hide the others
                report_error(exc, traceback)
                row["status"] = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            row["seconds"] = round(time.perf_counter() - start, 1)
            summary.append(row)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        from tubcli.io import to_json

        typer.echo(to_json(summary))
    else:
        from tubcli.verbs import flatten, format_value

        typer.echo(f"\ntub demo: {root}")
        typer.echo(f"{'plugin':<12} {'status':<8} {'seconds':>8}  results")
        for row in summary:
            status, _, why = row["status"].partition(": ")  # a failure's reason goes where its results would
            figures = why or ", ".join(f"{k}={format_value(v)}" for k, v in flatten(row["figures"])
                                       if not isinstance(v, (list, dict)))
            typer.echo(f"{row['plugin']:<12} {status:<8} {row['seconds']:>8}  {figures}")
    raise typer.Exit(0 if all(r["status"] == "ok" for r in summary) else 1)


def build_app():
    """The root click group: core commands plus one lazily built group per plugin."""
    from tubcli.verbs import BrokenPlugin

    group = typer.main.get_group(app)
    for name, record in get_plugins().records.items():
        if record.app is not None:
            group.add_command(record.app.click_group(), name)
        elif record.error:
            group.add_command(BrokenPlugin(name, record.error), name)
    for command in group.commands.values():  # the whole first paragraph, wrapped, not cut at 45 characters
        if command.short_help is None and command.help:
            command.short_help = " ".join(command.help.split("\n\n")[0].split())
    return group


def _private_matplotlib_dir_if_home_is_read_only() -> None:
    """Matplotlib writes its config and font cache under HOME (or MPLCONFIGDIR, XDG_*_HOME); where it cannot
    (a read-only home in a container or on compute nodes) it warns in two lines on every run, under -q too.
    Give it a private temporary folder then, as it would take itself, without the warning."""
    import os

    def writable(folder: str) -> bool:
        while not os.path.exists(folder):  # matplotlib creates it where its parent takes files
            parent = os.path.dirname(folder)
            if parent == folder:
                return False
            folder = parent
        return os.path.isdir(folder) and os.access(folder, os.W_OK)

    if os.environ.get("MPLCONFIGDIR"):
        folders = [os.environ["MPLCONFIGDIR"]]
    else:
        home = os.path.expanduser("~")
        if home == "~":  # no HOME: matplotlib uses a temporary folder quietly
            return
        folders = [os.path.join(os.environ.get(var) or os.path.join(home, default), "matplotlib")
                   for var, default in (("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache"))]
    if all(writable(f) for f in folders):
        return
    import atexit
    import shutil
    import tempfile

    try:
        private = tempfile.mkdtemp(prefix="tub-matplotlib-")
    except OSError:  # no writable temporary folder either: matplotlib's own warning says so
        return
    os.environ["MPLCONFIGDIR"] = private
    atexit.register(shutil.rmtree, private, True)


def main(argv: list[str] | None = None) -> None:
    import os

    os.environ["MPLBACKEND"] = "Agg"  # figures are files: no display, no GUI toolkit to import
    _private_matplotlib_dir_if_home_is_read_only()
    for name in ("stdout", "stderr"):  # closed by the caller (`tub ... >&-`): the output is not wanted
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    try:
        get_plugins().check_strict()
    except TubError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    on_devnull = _stdout_is_devnull()
    try:
        sys.exit(_run(argv))
    except SystemExit as exc:
        # the reader closed stdout early (`tub plugins | head -1`): click (typer's copy) then wraps
        # stdout, rich (help pages) points it at /dev/null, and both exit 1; end quietly with 0, as the
        # verbs do, so that a `set -o pipefail` script goes on
        from tubcli import verbs

        closed = type(sys.stdout).__name__ == "PacifyFlushWrapper" or (not on_devnull and _stdout_is_devnull())
        if exc.code == 1 and closed and not verbs.RESULTS_PIPE_CLOSED:  # a verb's own code stands (failed items)
            sys.exit(0)
        raise
    except OSError as exc:  # e.g. a full disk under `tub plugins > out.txt`
        typer.echo(f"error: cannot write the output: {exc.strerror or exc}", err=True)
        sys.exit(1)


def _run(argv: list[str] | None) -> int:
    """The app's exit code; a usage error (unknown option, bad value) is one ``error:`` line naming the
    command's help, as every other error, not a boxed panel in a batch job's log."""
    # recent typer raises its own copy of click's exceptions: take their base class from a public one
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = build_app()(args=argv, prog_name="tub", standalone_mode=False)
    except click_exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `tub` or `tub <plugin>` alone: its help, as --help's
            if exc.format_message():  # plain help comes with the error; rich help was printed already
                typer.echo(exc.format_message())
            return exc.exit_code
        ctx = getattr(exc, "ctx", None)
        see = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        message = exc.format_message().rstrip(".")
        message = message[:1].lower() + message[1:]  # as tub's own errors: "error: invalid value for …"
        if type(exc).__name__ == "NoSuchOption" and ctx is not None:  # click's suggestions match by the dashes
            options = [o for p in ctx.command.get_params(ctx) for o in p.opts + p.secondary_opts]
            message = f"no such option {exc.option_name}{did_you_mean(exc.option_name, options, strip='-')}"
        typer.echo(f"error: {message}{see}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 1
    return code if isinstance(code, int) else 0


def _stdout_is_devnull() -> bool:
    import os

    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    main()
