"""``PluginApp``: a plugin's declaration, and the Typer commands the core builds from it (DESIGN §4).

A plugin names everything lazily (``"module:function"``), so ``tub --help`` and
``tub <plugin> --help`` import no verb code; a verb's module and config are imported only when
that verb runs or its own ``--help`` is shown.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from tubcli.errors import ItemFailures, Terminated, TubError, first_line, on_sigterm, terminating
from tubcli.io import to_json
from tubcli.progress import log_file_only

SHARED_OPTIONS = ("config", "set", "device", "precision", "seed", "out", "resume", "shard", "overwrite",
                  "print_config", "json", "quiet", "verbose", "traceback")


def resolve_ref(ref: str, hints: dict | None = None) -> Any:
    """Import ``"module:attr"``; a missing optional package becomes a TubError with its install hint."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        hint = (hints or {}).get(missing)
        if hint:
            raise TubError(f"this needs the package {missing!r}, which is not installed; {hint}") from None
        raise
    try:
        return getattr(module, attr) if attr else module
    except AttributeError:
        raise TubError(f"{module_name} has no {attr!r} (plugin declaration out of date)") from None


@dataclass
class Verb:
    """One verb of a plugin.

    ``args`` are config fields bound to positional arguments (only the last may be a list);
    ``options`` maps extra flag names to config field paths. ``batch`` verbs iterate with
    ``run.batch``; ``training`` verbs checkpoint and honour ``--resume``; ``overwrite`` verbs
    (and batch verbs) honour ``--overwrite`` (``run.overwrite``) for outputs that exist.
    ``item_fields`` are config fields that, like the inputs, only choose which items a batch run
    produces (e.g. one set of files per method), so a rerun into the same directory with other
    values adds outputs instead of being refused. ``resume_may_change`` are the settings a resumed
    training may change (how long it runs, how often it logs or saves); any other change is
    refused, since the checkpoint continues the training that the recorded settings describe.
    ``continues``: a rerun with the same ``-o`` continues where an interrupted run stopped (batch verbs
    always do, by item); what a stopped run is told to do depends on it.
    """

    name: str
    run: str
    config: str | None = None
    help: str = ""
    args: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    batch: bool = False
    training: bool = False
    overwrite: bool = False
    item_fields: tuple[str, ...] = ()
    resume_may_change: tuple[str, ...] = ()
    continues: bool = False


@dataclass
class PluginApp:
    """A plugin's table of contents: name, verbs, demo and requirements, all lazy."""

    name: str
    help: str
    verbs: list[Verb]
    demo: str | None = None
    requires: dict[str, str] = field(default_factory=dict)
    optional: dict[str, str] = field(default_factory=dict)
    version: str = ""

    def verb(self, name: str) -> Verb:
        for verb in self.verbs:
            if verb.name == name:
                return verb
        known = ", ".join(v.name for v in self.verbs)
        raise TubError(f"{self.name} has no verb {name!r}; its verbs: {known}")

    @property
    def hints(self) -> dict:
        return {**self.optional, **self.requires}

    def config_model(self, verb: Verb):
        if verb.config is None:
            from tubcli.config import TubConfig

            return TubConfig
        return resolve_ref(verb.config, self.hints)

    def click_group(self) -> TyperGroup:
        return PluginGroup(self)


# --------------------------------------------------------------------------- click glue
class SuggestingGroup(TyperGroup):
    """A command group that answers a mistyped command with the close names (typer's own suggestion looks
    only at eagerly registered commands, which a plugin's lazy verbs are not)."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            ctx.fail(f"no such command '{name}'{did_you_mean(name, self.list_commands(ctx))}")
        return super().resolve_command(ctx, args)


def did_you_mean(typo: str, names: list[str], strip: str = "") -> str:
    """`` (did you mean 'x'?)`` for the names close to ``typo`` (compared without the ``strip`` prefix
    characters, so that every ``--option`` is not 'close' to ``--bogus`` by its dashes), or ``""``."""
    from difflib import get_close_matches

    bare = {n.lstrip(strip): n for n in names}
    close = [bare[m] for m in get_close_matches(typo.lstrip(strip), list(bare), n=3)]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


class PluginGroup(SuggestingGroup):
    """A plugin's sub-command group whose verb commands are built only when needed."""

    def __init__(self, app: PluginApp):
        super().__init__(name=app.name, help=app.help, no_args_is_help=True, subcommand_metavar="VERB [ARGS]...",
                         rich_markup_mode=None)  # plain, as `tub --help`: a list of verbs needs no rich (0.2 s)
        self.app = app

    def list_commands(self, ctx):
        return [v.name for v in self.app.verbs]

    def get_command(self, ctx, name):
        try:
            verb = self.app.verb(name)
        except TubError:
            return None
        return LazyVerbCommand(self.app, verb)

    def format_commands(self, ctx, formatter):
        rows = [(v.name, v.help.split("\n")[0]) for v in self.app.verbs]
        if rows:
            with formatter.section("Verbs"):
                formatter.write_dl(rows)


class LazyVerbCommand(TyperCommand):
    """Stands in for a verb until it is invoked or asked for help, then builds the real command."""

    def __init__(self, app: PluginApp, verb: Verb):
        super().__init__(name=verb.name, help=verb.help, short_help=verb.help.split("\n")[0],
                         rich_help_panel="Verbs")  # a plugin's help lists verbs, as tub's docs call them
        self.app, self.verb = app, verb
        self._real: TyperCommand | None = None

    def real(self) -> TyperCommand:
        if self._real is None:
            self._real = build_verb_command(self.app, self.verb)
        return self._real

    def make_context(self, info_name, args, parent=None, **extra):
        return self.real().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        return self.real().invoke(ctx)

    def get_params(self, ctx):
        return self.real().get_params(ctx)

    def get_help(self, ctx):
        return self.real().get_help(ctx)

    def main(self, *args, **kwargs):
        return self.real().main(*args, **kwargs)


class BrokenPlugin(TyperCommand):
    """What a plugin that failed to load answers with, whatever it is asked."""

    def __init__(self, name: str, error: str):
        super().__init__(name=name, help=f"(failed to load: {error})", add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        self.error = error

    def invoke(self, ctx):
        typer.echo(f"error: plugin {self.name!r} failed to load: {self.error}; run 'tub doctor'", err=True)
        raise typer.Exit(1)


# --------------------------------------------------------------------------- building a verb
def _plain_type(annotation) -> tuple[Any, bool]:
    """Map a pydantic field annotation to a type Typer understands; returns (type, is_list)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _plain_type(inner[0]) if len(inner) == 1 else (str, False)
    if origin in (list, tuple, set, typing.Sequence) or annotation in (list, tuple):
        inner = args[0] if args else str
        base, _ = _plain_type(inner)
        return base, True
    if origin is typing.Literal:
        return str, False
    if annotation in (str, int, float, bool, Path):
        return annotation, False
    return str, False


def _field_info(model, dotted: str):
    from tubcli.config import field_info

    info = field_info(model, dotted)
    if info is None:
        raise TubError(f"plugin declares option for unknown config field {dotted!r}")
    return info


def _choices(annotation) -> list[str]:
    """The allowed values of a Literal field (also inside list[...] / Optional[...])."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return [c for a in typing.get_args(annotation) for c in _choices(a)]


def _describe(info) -> str:
    text = (info.description or "").replace("[", "\\[")  # rich markup would swallow "[default: …]"
    choices = _choices(info.annotation)
    if choices and not all(c in text for c in choices):
        text = f"{text} (one of {', '.join(choices)})".strip()
    default = info.default
    if info.default_factory is not None and (repr(default) == "PydanticUndefined" or default is None):
        try:
            default = info.default_factory()
        except TypeError:  # a factory that needs the validated data
            default = None
        if default in ([], {}, ()):
            default = None
    if default is not None and not callable(default) and repr(default) != "PydanticUndefined":
        if hasattr(default, "model_dump"):
            return text
        if isinstance(default, list):  # as it is typed: ri,cs, not ['ri', 'cs']
            default = ",".join(map(str, default))
        text = f"{text} (config default: {default})".strip()
    return text


def build_verb_command(app: PluginApp, verb: Verb) -> TyperCommand:
    """Build the Typer command of one verb: its positionals, its flags and the shared options."""
    model = app.config_model(verb)
    params: list[inspect.Parameter] = []
    annotations: dict[str, Any] = {}
    bindings: dict[str, str] = {}  # python parameter name -> config path

    def add(pname, annotation, default):
        params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
        annotations[pname] = annotation

    for i, arg in enumerate(verb.args):
        info = _field_info(model, arg)
        base, is_list = _plain_type(info.annotation)
        if is_list and i != len(verb.args) - 1:
            raise TubError(f"{app.name} {verb.name}: only the last positional argument may take many values")
        pname = "arg_" + arg.replace(".", "__")
        annotation = Optional[list[base]] if is_list else Optional[base]
        add(pname, annotation, typer.Argument(None, help=_describe(info), metavar=arg.split(".")[-1].upper() + ("..." if is_list else ""), show_default=False))
        bindings[pname] = arg
    comma_lists: set[str] = set()  # list options that also take a,b (not paths: a file name may hold a comma)
    for flag, path in verb.options.items():
        if flag.replace("-", "_") in SHARED_OPTIONS:
            raise TubError(f"{app.name} {verb.name}: option --{flag} clashes with a shared option")
        info = _field_info(model, path)
        base, is_list = _plain_type(info.annotation)
        pname = "opt_" + flag.replace("-", "_")
        described = _describe(info)
        if flag.replace("-", "_") != path:  # what to write in a -c file, --set or TUB_* for this flag
            described = f"{described} (config key: {path})".strip()
        if base is bool and not is_list:
            add(pname, Optional[bool], typer.Option(None, f"--{flag}/--no-{flag}", help=described, show_default=False))
        elif is_list and base is not Path:  # the config model converts the items (numbers, choices)
            comma_lists.add(pname)
            add(pname, Optional[list[str]], typer.Option(None, f"--{flag}", show_default=False,
                                                         metavar=f"<{base.__name__}>",
                                                         help=f"{described} (a,b or repeated)".strip()))
        else:
            annotation = Optional[list[base]] if is_list else Optional[base]
            add(pname, annotation, typer.Option(None, f"--{flag}", help=described, show_default=False))
        bindings[pname] = path

    add("config", Optional[Path], typer.Option(None, "-c", "--config", help="YAML, TOML or JSON file with this verb's config.", rich_help_panel="Shared options"))
    add("set", Optional[list[str]], typer.Option(None, "--set", help="Override any config field: key.sub=value (repeatable).", rich_help_panel="Shared options"))
    add("device", Optional[str], typer.Option(None, "--device", help="auto | cpu | cuda[:i] | mps", rich_help_panel="Shared options"))
    precisions = " | ".join(_choices(model.model_fields["precision"].annotation))  # a verb may allow more
    add("precision", Optional[str], typer.Option(None, "--precision", help=precisions, rich_help_panel="Shared options"))
    add("seed", Optional[int], typer.Option(None, "--seed", help="One seed for everything.", rich_help_panel="Shared options"))
    add("out", Optional[Path], typer.Option(None, "-o", "--out", help="Run directory (default: runs/<plugin>/<verb>/<time>_<hash>).", rich_help_panel="Shared options"))
    add("resume", Optional[str], typer.Option(None, "--resume", help="auto | PATH: continue from the last checkpoint.", rich_help_panel="Shared options", hidden=not verb.training))
    add("shard", Optional[str], typer.Option(None, "--shard", help="i/n: process shard i of n, counted from 0 (0/4 … 3/4; default: from the SLURM array).", rich_help_panel="Shared options", hidden=not verb.batch))
    add("overwrite", bool, typer.Option(False, "--overwrite", help=_overwrite_help(verb), rich_help_panel="Shared options", hidden=not (verb.batch or verb.training or verb.overwrite)))
    add("print_config", bool, typer.Option(False, "--print-config", help="Print the resolved config and exit.", rich_help_panel="Shared options"))
    add("json", bool, typer.Option(False, "--json", help="Results on stdout as JSON.", rich_help_panel="Shared options"))
    add("quiet", bool, typer.Option(False, "-q", "--quiet", help="Warnings and errors only.", rich_help_panel="Shared options"))
    add("verbose", int, typer.Option(0, "-v", "--verbose", count=True, help="More log detail.", rich_help_panel="Shared options"))
    add("traceback", bool, typer.Option(False, "--traceback", help="Show the full stack on errors.", rich_help_panel="Shared options"))

    def command(**kwargs):
        for p in comma_lists & {k for k, v in kwargs.items() if v is not None}:
            kwargs[p] = [part.strip() for v in kwargs[p] for part in v.split(",") if part.strip()]
        flags = {path: kwargs[p] for p, path in bindings.items() if kwargs.get(p) is not None}
        for common in ("device", "precision", "seed"):
            if kwargs.get(common) is not None:
                flags[common] = kwargs[common]
        code = execute(app, verb, model, flags, kwargs)
        raise typer.Exit(code)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = annotations
    command.__name__ = verb.name.replace("-", "_")
    command.__doc__ = verb.help
    sub = typer.Typer(add_completion=False)
    sub.command(name=verb.name, help=verb.help)(command)
    return typer.main.get_command(sub)


def _overwrite_help(verb: Verb) -> str:
    if verb.batch:
        return "Recompute items whose outputs exist (also when the settings changed)."
    if verb.training:
        return "Start again in a run directory that holds a checkpoint."
    return "Replace outputs that exist."


RESULTS_PIPE_CLOSED = False  # a verb found stdout closed and handled it itself


def execute(app: PluginApp, verb: Verb, model, flags: dict, opts: dict) -> int:
    """Resolve the config, run the verb in a run directory, print results; return the exit code."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        return _execute(app, verb, model, flags, opts)
    terminating(reset=True)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _execute(app, verb, model, flags, opts)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _execute(app: PluginApp, verb: Verb, model, flags: dict, opts: dict) -> int:
    global RESULTS_PIPE_CLOSED
    from tubcli.config import config_yaml, resolve_config, unknown_env_warnings
    from tubcli.progress import log_every
    from tubcli.runs import Run, execution_fields

    RESULTS_PIPE_CLOSED = False  # per command (tests run many in one process)

    verbosity = -1 if opts.get("quiet") else int(opts.get("verbose") or 0)
    try:
        siblings = [app.config_model(v) for v in app.verbs]
        cfg = resolve_config(model, app.name, opts.get("config"), opts.get("set"), flags, siblings=siblings)
        log_every()  # a bad TUB_LOG_EVERY is refused before a run directory exists
        unknown_env = unknown_env_warnings(siblings, app.name)
        if opts.get("print_config"):
            for warning in unknown_env:
                typer.echo(f"warning: {warning}", err=True)
            _to_stdout(lambda: sys.stdout.write(json.dumps(cfg.model_dump(mode="json"), indent=2, ensure_ascii=False)
                                                + "\n" if opts.get("json") else config_yaml(cfg)), "the config")
            return 0
        func = resolve_ref(verb.run, app.hints)
        if opts.get("shard") is not None and not verb.batch:
            raise TubError(f"--shard applies to batch verbs only; '{verb.name}' does its whole input in one run")
        if opts.get("overwrite") and not (verb.batch or verb.training or verb.overwrite):
            raise TubError(f"--overwrite applies to batch and training verbs; '{verb.name}' "
                           + ("continues its outputs on a rerun with the same -o: give a new -o to start again"
                              if verb.continues else "replaces its outputs on every run: drop --overwrite"))
        if opts.get("resume") and not verb.training:  # it would be ignored (or start a fresh run elsewhere)
            then = "rerun it with the same -o to continue where it stopped" if verb.batch or verb.continues else \
                "rerun it without --resume"
            raise TubError(f"--resume continues a training; '{verb.name}' does not train: {then}")
        shard = opts.get("shard") if verb.batch else "0/1"  # a SLURM array does not split a non-batch verb
        run = Run(app.name, verb.name, cfg, out=opts.get("out"), resume=opts.get("resume"), shard=shard,
                  overwrite=bool(opts.get("overwrite")), verbosity=verbosity, plugin_version=app.version,
                  same_outputs_except={*verb.args, *verb.item_fields, *execution_fields(cfg)} if verb.batch else None,
                  training=verb.training, resume_may_change=set(verb.resume_may_change), continues=verb.continues)
        for warning in unknown_env:
            run.log.warning("%s", warning)
        failures = None
        try:
            metrics = run.finish(func(cfg, run))
        except ItemFailures as exc:  # the other items' results are real: metrics.json has them, stdout too
            failures, metrics = exc, exc.metrics
        except BaseException as exc:
            terminated = isinstance(exc, Terminated) or terminating()  # also when a C extension reworded it
            if isinstance(exc, TubError) and run.batch_stats and not terminated:
                run.write_metrics({"batch": run.batch_stats})
            log_file_only(run.log, "stopped: " + ("terminated (SIGTERM)" if terminated else
                                                  "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else
                                                  f"{type(exc).__name__}: {first_line(exc)}"))
            run.undo_if_unused()
            if terminated and not isinstance(exc, Terminated):
                raise Terminated() from exc
            raise
        if run.is_main:
            RESULTS_PIPE_CLOSED = not _to_stdout(lambda: print_results(metrics, as_json=bool(opts.get("json"))),
                                                 "the results", f"; the run directory has them: {run.dir}/metrics.json")
        if failures is not None:
            raise failures
        return 0
    except TubError as exc:
        report_error(exc, opts.get("traceback"))
        return exc.exit_code
    except KeyboardInterrupt as exc:
        how, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        if verb.training:
            then = "rerun with the same -o and --resume auto to continue from its last checkpoint"
        elif verb.batch or verb.continues:
            then = "rerun with the same -o to continue where it stopped"
        else:  # e.g. an evaluation: a rerun computes it all again
            then = f"'{verb.name}' keeps no partial result; rerun it to start over"
        typer.echo(f"error: {how}; {then}", err=True)
        return code
    except MemoryError as exc:
        typer.echo(f"error: not enough memory ({first_line(exc)}); ask for less: smaller sizes, fewer items or "
                   "a smaller --batch-size", err=True)
        return 1
    except OSError as exc:
        hint = None if opts.get("traceback") else os_error_hint(exc)
        if hint is None:
            report_error(exc, opts.get("traceback"))
        else:
            typer.echo(f"error: {hint}", err=True)
        return 1
    except Exception as exc:  # the last line of defence: one line, exit 1
        report_error(exc, opts.get("traceback"))
        return 1


def _to_stdout(write, what: str, then: str = "") -> bool:
    """Run ``write`` (to stdout) and flush; False when the reader closed stdout early (`| head`): the
    rest is dropped without a second error at exit. A full disk under `> out.txt` is a TubError about
    stdout, not about the run directory."""
    try:
        write()
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    except OSError as exc:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the buffer is not flushed again at exit
        raise TubError(f"cannot write {what} to stdout: {exc.strerror or exc}{then}") from None


def os_error_hint(exc: OSError) -> str | None:
    """What to do about a file system refusal (permissions, read-only, full disk, quota); None for others."""
    import errno

    shown = Path(exc.filename) if exc.filename else None
    ours = shown is not None and shown.name.startswith(".")
    if ours:  # tub's own temporary or lock file: name its folder
        shown = shown.parent
    where = f": {shown}" if shown is not None else ""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied{where}; check that the inputs are readable and that the outputs (the run "
                "directory: -o, or TUB_RUNS_DIR for the default one; an OUTPUT you named) lie in a folder you can "
                "write")
    if exc.errno == errno.ENOENT and ours:  # e.g. -o /proc/x: a folder that takes no new files
        return f"cannot create files in {shown} (it is gone, or takes no new files); give -o a writable folder"
    if exc.errno == errno.EROFS:
        return f"read-only file system{where}; give -o (or TUB_RUNS_DIR) a writable folder"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device or quota exceeded{where}; free some space or give -o a folder "
                "on another file system")
    return None


def report_error(exc: BaseException, traceback: bool | None) -> None:
    from tubcli.errors import one_line

    if traceback:
        import traceback as tb

        tb.print_exception(exc)
    hint = "" if isinstance(exc, TubError) or traceback else " (rerun with --traceback for details)"
    typer.echo(f"error: {one_line(exc)}{hint}", err=True)


def flatten(metrics: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flatten(value, name + "."))
        elif isinstance(value, list) and 0 < len(value) <= 8 and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):  # a few records (runs, folds): one row per field, not a repr
                rows.extend(flatten(item, f"{name}.{i}."))
        else:
            rows.append((name, value))
    return rows


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{len(value)} values]"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # names (methods, files): as a user would write them
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.6g}" for v in value) + "]"  # an interval, a few coordinates
    return str(value)


def print_results(metrics: dict, as_json: bool = False) -> None:
    """Results on stdout: JSON, or a two-column table."""
    if as_json:
        sys.stdout.write(to_json(metrics) + "\n")
        return
    rows = flatten(metrics)
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        sys.stdout.write(f"{key.ljust(width)}  {format_value(value)}\n")
