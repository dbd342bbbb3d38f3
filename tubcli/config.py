"""Configs: pydantic models with ``extra="forbid"`` and one precedence rule (DESIGN §4).

Precedence: command-line flags > ``--set`` > ``TUB_*`` environment variables > config file >
defaults. Only values the user actually gave are merged, so a default never overrides the file.
Environment variables: ``TUB_DEVICE``, ``TUB_PRECISION``, ``TUB_SEED``, ``TUB_VECTOR_FIGURES`` for the common fields and
``TUB_<PLUGIN>_<FIELD>`` for a plugin's own (``__`` separates nested fields).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tubcli.errors import TubError

Precision = Literal["fp32", "fp64", "bf16", "fp16"]
COMMON_FIELDS = ("device", "precision", "seed", "vector_figures")


class Section(BaseModel):
    """A block of a config; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("*", mode="after")
    @classmethod
    def _expand_home(cls, value):
        """``~`` in a path the shell did not expand (``--out=~/x``, a quoted value, a YAML file) means the home
        folder, as in the shell; taken literally it would make a folder named ``~``."""
        if isinstance(value, Path):
            return value.expanduser()
        if isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            return [v.expanduser() for v in value]
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_item_lists(cls, data):
        """A config file, ``TUB_*`` variable or ``--set`` may give a list of one item as the item
        (``model: x.safetensors``, ``x: 2``), as the flags do."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            info = cls.model_fields.get(name)
            if info is not None and isinstance(value, (str, Path, int, float)) and _is_list(info.annotation):
                out[name] = [value]
        return out


def _is_list(annotation) -> bool:
    """list[...] or Optional[list[...]]."""
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list
                                                        for a in typing.get_args(annotation))


def _is_number(annotation) -> bool:
    """int, float or Optional of one of them."""
    options = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    return bool(options) and all(a in (int, float) for a in options)


def _is_text(annotation) -> bool:
    """str, Optional[str] or a Literal of strings: a setting whose value is text (a list of strings is not)."""
    if _is_list(annotation):
        return False
    options = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, str) for a in options)
    return options == [str]


class TubConfig(Section):
    """Fields every verb config has."""

    device: str = Field("auto", description="auto | cpu | cuda[:i] | mps")
    precision: Precision = Field("fp32", description="compute dtype where it applies")
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="one seed for everything (0 … 2**32 − 1, the range numpy and scikit-learn take)")
    vector_figures: Literal["none", "pdf", "svg"] = Field(
        "none", description="also write each plot as a vector file beside its PNG (pdf | svg, editable text), "
                            "for papers; none: PNG only")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """Checked here too, so that `tub config` rejects what the verb would."""
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")
        return value


def given_fields(section: BaseModel, names=None) -> list[str]:
    """The fields of ``section`` (all, or ``names``) whose value differs from the default: the settings a
    user gave. A dumped config (config.yaml, --print-config) repeats the defaults, so a default counts as
    not given and a run's saved config reruns. For refusing settings that the chosen mode would ignore."""
    fields = type(section).model_fields
    return [n for n in (fields if names is None else names)
            if getattr(section, n) != fields[n].get_default(call_default_factory=True)]


def split_commas(value):
    """A list option given as ``--x a,b``, ``--x a --x b``, a YAML list or one string: one list, each
    item once (for a ``field_validator(..., mode="before")``); other values pass through."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        return value
    out = []
    for item in items:
        out += [v.strip() for v in item.split(",") if v.strip()] if isinstance(item, str) else [item]
    return list(dict.fromkeys(out))


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML, TOML or JSON config file into a dict."""
    path = Path(path)
    if path.is_dir():
        raise TubError(f"config file {path} is a directory; pass a YAML, TOML or JSON file to -c")
    if not path.is_file():
        raise TubError(f"config file {path} does not exist; pass an existing YAML, TOML or JSON file to -c")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TubError(f"config file {path} is not UTF-8 text; pass a YAML, TOML or JSON file to -c") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser as a package
                import tomli as tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_no_repeated_keys)
        else:
            data = _load_yaml(text)
    except Exception as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML puts the position on a later line of its message
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise TubError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TubError(f"config file {path} must hold a mapping of keys to values")
    return data


def _no_repeated_keys(pairs: list) -> dict:
    """A mapping whose keys are each given once: a key repeated in a long hand-edited file would otherwise
    change the run silently (the last value wins in YAML and JSON; TOML refuses it itself)."""
    keys = [k for k, _ in pairs]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated is not None:
        raise ValueError(f"the key {repeated!r} is given twice in one mapping; keep one")
    return dict(pairs)


def _load_yaml(text: str):
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice in one "
                                                            "mapping; keep one", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)


def is_path_type(annotation) -> bool:
    """Path, Optional[Path], list[Path] …: a field that names a file or folder (not a setting such as
    ``kind: svm`` whose value may happen to name a folder)."""
    if annotation is Path:
        return True
    return any(is_path_type(a) for a in typing.get_args(annotation))


def run_config_paths_from_anywhere(model: type[BaseModel], data: dict, file) -> dict:
    """A run's own ``config.yaml`` (``env.json`` beside it) given with ``-c`` from another folder: its
    relative paths are relative to the folder the run was started in (env.json's ``cwd``), so they are
    made absolute against that folder. Any other config file: paths as written, from here."""
    env = Path(file).parent / "env.json"
    try:
        cwd = json.loads(env.read_text()).get("cwd") if env.is_file() else None
    except (OSError, ValueError, AttributeError):
        cwd = None
    if not cwd or os.path.realpath(cwd) == os.path.realpath(os.getcwd()):
        return data

    def fix(v):
        return os.path.join(cwd, v) if isinstance(v, str) and v and not os.path.isabs(v) else v

    def anchor(node: type[BaseModel], values: dict) -> dict:
        out = dict(values)
        for key, value in values.items():
            info, sub = node.model_fields.get(key), field_model(node, key)
            if sub is not None and isinstance(value, dict):
                out[key] = anchor(sub, value)
            elif info is not None and is_path_type(info.annotation):
                out[key] = [fix(v) for v in value] if isinstance(value, list) else fix(value)
        return out

    return anchor(model, data)


def field_model(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The nested model class of field ``name`` if it is one, else None."""
    info = model.model_fields.get(name)
    ann = getattr(info, "annotation", None)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():  # Optional[Model]
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def check_keys(model: type[BaseModel], data: dict, source: str, prefix: str = "") -> None:
    """Raise a TubError naming the first key of ``data`` that ``model`` does not know."""
    for key, value in data.items():
        if key not in model.model_fields:
            import difflib

            close = difflib.get_close_matches(str(key), list(model.model_fields), n=1, cutoff=0.7)
            if close:
                raise TubError(f"unknown config key {prefix + key!r} in {source}; did you mean {prefix + close[0]!r}?")
            known = ", ".join(sorted(model.model_fields))
            raise TubError(f"unknown config key {prefix + key!r} in {source}; known keys here: {known}")
        sub = field_model(model, key)
        if sub is not None and isinstance(value, dict):
            check_keys(sub, value, source, prefix + key + ".")


def set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TubError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_value(text: str) -> Any:
    """A ``--set``/environment value: YAML scalars and lists (``3``, ``true``, ``[1, 2]``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except Exception:
        return text


def env_values(model: type[BaseModel], plugin: str, environ=None, siblings=None) -> dict:
    """Values from ``TUB_*`` variables that name fields of ``model`` (``siblings``: the configs of all
    the plugin's verbs, see :func:`env_field`)."""
    environ = os.environ if environ is None else environ
    out: dict = {}
    for name in COMMON_FIELDS:
        key = f"TUB_{name.upper()}"
        if key in environ and name in model.model_fields:
            out[name] = typed_value(model, name, environ[key])
    prefix = f"TUB_{plugin.upper()}_"
    spelled = spelled_fields(siblings)
    for key, text in environ.items():
        dotted = env_field(model, key[len(prefix):], spelled) if key.startswith(prefix) else None
        if dotted is None:
            continue  # not tub's, or a setting of another verb of the same plugin
        set_path(out, dotted, typed_value(model, dotted, text))
    return out


def env_field(model: type[BaseModel], name: str, spelled: frozenset[str] = frozenset()) -> str | None:
    """The dotted field that ``TUB_<PLUGIN>_<name>`` sets (``__`` between nested fields), or None. Each
    part matches a field of the same spelling first, else the one field equal to it up to case
    (``EPOCHS`` sets ``epochs``, ``C`` sets ``C``), unless a verb of the plugin has a field spelled like
    the part (``spelled``: the top-level field names of all its verbs), which the variable then names:
    pathorob's ``..._K`` sets the cluster count ``K`` (clustering, evaluate), never ``ri``'s ``k``."""
    node: type[BaseModel] | None = model
    out: list[str] = []
    for depth, part in enumerate(name.split("__")):
        if node is None:
            return None
        fields = node.model_fields
        same_case = [f for f in fields if f.lower() == part.lower()]
        if part in fields:
            match = part
        elif depth == 0 and part in spelled:
            return None  # another verb's field of exactly this name
        else:
            match = same_case[0] if len(same_case) == 1 else None
        if match is None:
            return None
        out.append(match)
        node = field_model(node, match)
    return ".".join(out)


def spelled_fields(models) -> frozenset[str]:
    """The top-level field names of a plugin's verb configs (for :func:`env_field`)."""
    return frozenset(name for m in models or () for name in m.model_fields)


def env_variable(loc, plugin: str, environ=None) -> str:
    """The ``TUB_*`` variable that set the field at ``loc`` (a plugin's own wins over a common one), so
    that an error names what the user exported, not "the environment"."""
    environ = os.environ if environ is None else environ
    keys = [f"TUB_{plugin.upper()}_" + "__".join(str(p) for p in loc),
            f"TUB_{plugin.upper()}_" + "__".join(str(p).upper() for p in loc)]
    if len(loc) == 1 and loc[0] in COMMON_FIELDS:
        keys.append(f"TUB_{str(loc[0]).upper()}")
    return next((k for k in keys if k in environ), "the environment")


def unknown_env_vars(models: list[type[BaseModel]], plugin: str, environ=None) -> list[str]:
    """``TUB_<PLUGIN>_*`` variables that name no field of any of the plugin's verbs: a typo
    (``TUB_XMIL_EPOCS``) would otherwise be ignored without a word."""
    environ = os.environ if environ is None else environ
    prefix = f"TUB_{plugin.upper()}_"
    spelled = spelled_fields(models)
    return sorted(key for key in environ if key.startswith(prefix) and not any(
        env_field(m, key[len(prefix):], spelled) for m in models))


def unknown_env_warnings(models: list[type[BaseModel]], plugin: str, environ=None) -> list[str]:
    """One warning per :func:`unknown_env_vars` entry, worded alike by runs, ``--print-config`` and
    ``tub config`` (the commands a user checks a variable with)."""
    return [f"{key} names no setting of 'tub {plugin}' and is ignored; see 'tub {plugin} <verb> --help' for the "
            "settings" for key in unknown_env_vars(models, plugin, environ)]


def field_info(model: type[BaseModel] | None, dotted: str):
    """The pydantic FieldInfo of ``a.b.c`` in ``model`` (through nested sections), or None."""
    node, parts = model, dotted.split(".")
    for part in parts[:-1]:
        node = field_model(node, part) if node is not None and part in node.model_fields else None
    return node.model_fields.get(parts[-1]) if node is not None else None


def parse_sets(sets: list[str] | None, model: type[BaseModel] | None = None) -> dict:
    out: dict = {}
    for item in sets or []:
        if "=" not in item:
            raise TubError(f"--set expects key=value, got {item!r}")
        key, _, text = item.partition("=")
        set_path(out, key.strip(), typed_value(model, key.strip(), text))
    return out


def typed_value(model: type[BaseModel] | None, dotted: str, text: str) -> Any:
    """``parse_value``, except that a text field keeps the text: ``target=2020`` or
    ``device=on`` are strings, not the number or boolean YAML would make of them."""
    value = parse_value(text)
    info = field_info(model, dotted)
    if info is None or isinstance(value, str) or value is None:
        return value
    return text.strip() if _is_text(info.annotation) else value


def resolve_config(
    model: type[BaseModel],
    plugin: str,
    file: str | os.PathLike | None = None,
    sets: list[str] | None = None,
    flags: dict | None = None,
    environ=None,
    siblings=None,
) -> BaseModel:
    """Merge defaults < file < environment < ``--set`` < flags and validate. ``siblings``: the configs of
    all the plugin's verbs, which tell which ``TUB_<PLUGIN>_*`` spelling names which field."""
    layers: list[tuple[str, dict]] = []
    if file is not None:
        data = read_config_file(file)
        check_keys(model, data, str(file))
        data = run_config_paths_from_anywhere(model, data, file)
        layers.append((str(file), data))
    layers.append(("the environment", env_values(model, plugin, environ, siblings)))
    set_data = parse_sets(sets, model)
    check_keys(model, set_data, "--set")
    layers.append(("--set", set_data))
    flag_data: dict = {}
    for dotted, value in (flags or {}).items():
        set_path(flag_data, dotted, value)
    layers.append(("command-line flags", flag_data))
    for where, data in layers:
        _check_scalar_kinds(model, data, where if where != "the environment" else None, plugin, environ)
    merged: dict = {}
    for _, data in layers:
        merged = deep_merge(merged, data)
    _refuse_trust_from_afar(model, layers, plugin, environ)
    try:
        cfg = model.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        source = next((name for name, data in reversed(layers) if _has_path(data, err["loc"])), "defaults")
        if source == "the environment":
            source = env_variable(err["loc"], plugin, environ)
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        if not loc:  # a check across fields (a model validator): its message names the options
            raise TubError(f"invalid config: {msg}") from None
        raise TubError(f"invalid config value for {loc!r} (from {source}): {msg}") from None
    global _DEVICE_SOURCE
    _DEVICE_SOURCE = next((name for name, data in reversed(layers) if "device" in data), None)
    if _DEVICE_SOURCE == "the environment":
        _DEVICE_SOURCE = env_variable(("device",), plugin, environ)
    for loc, value in _non_finite(cfg.model_dump()):
        source = next((name for name, data in reversed(layers) if _has_path(data, loc)), None)
        if source == "the environment":
            source = env_variable(loc, plugin, environ)
        if source is not None:  # a user's inf/nan (a default may be inf on purpose, e.g. no time limit)
            raise TubError(f"invalid config value for {'.'.join(map(str, loc))!r} (from {source}): {value} is not "
                           "a finite number")
    return cfg


def _check_scalar_kinds(model: type[BaseModel], data: dict, where: str | None, plugin: str, environ,
                        prefix: tuple = ()) -> None:
    """What pydantic would silently convert: a YAML/TOML/JSON number where text is expected (``target: 0017``
    is the octal 15, ``2020.10`` the float 2020.1: the text the user typed is gone, so it is refused, with
    the quotes to add) and a boolean where a number is expected (``k: true`` would be 1)."""
    for key, value in data.items():
        info = model.model_fields.get(key)
        if info is None:
            continue
        loc = (*prefix, key)
        sub = field_model(model, key)
        if sub is not None and isinstance(value, dict):
            _check_scalar_kinds(sub, value, where, plugin, environ, loc)
            continue
        items = value if isinstance(value, list) else [value]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_text(info.annotation):
            problem = f"a number where text is expected; quote it ({key}: '...') so that it is read as typed"
        elif any(isinstance(v, bool) for v in items) and (_is_number(info.annotation)
                                                         or _is_number_list(info.annotation)):
            problem = "true/false where a number is expected"
        else:
            continue
        source = where or env_variable(loc, plugin, environ)
        raise TubError(f"invalid config value for {'.'.join(loc)!r} (from {source}): {problem}")


def _is_number_list(annotation) -> bool:
    """list[int], list[float] or Optional of one."""
    lists = [a for a in (annotation, *typing.get_args(annotation)) if typing.get_origin(a) is list]
    return any(_is_number(typing.get_args(a)[0]) for a in lists if typing.get_args(a))


def _refuse_trust_from_afar(model: type[BaseModel], layers: list[tuple[str, dict]], plugin: str, environ) -> None:
    """A setting marked ``json_schema_extra={"flag_only": True}`` (knnlrp's ``allow_pickle``: the model
    file may run code) is switched on by its flag in this command only, never by a shared config file, an
    exported ``TUB_*`` variable or ``--set``."""
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if not (isinstance(extra, dict) and extra.get("flag_only")) or name in layers[-1][1]:
            continue  # not such a setting, or the flag decides (--allow-pickle or --no-allow-pickle)
        source = next((where for where, data in layers[:-1] if _truthy(data.get(name))), None)
        if source == "the environment":
            source = env_variable((name,), plugin, environ)
        if source is not None:
            flag = "--" + name.replace("_", "-")
            raise TubError(f"{name} is on in {source}, but it lets a file run code and is taken only from the "
                           f"command line: add {flag} to this command if you trust the file")


def _truthy(value) -> bool:
    """``value`` as pydantic reads a boolean ("false", "no", "off", "0" are false); other values count as on."""
    from pydantic import TypeAdapter

    try:
        return bool(TypeAdapter(bool).validate_python(value))
    except ValidationError:
        return value is not None


_DEVICE_SOURCE: str | None = None  # where the last resolved config's device came from


def device_source() -> str | None:
    """The layer (a config file, a TUB_* variable, --set) that set the device of the last resolved
    config; None for a flag or the default. Device errors name it: the user may not have typed --device."""
    return None if _DEVICE_SOURCE == "command-line flags" else _DEVICE_SOURCE


def _non_finite(node, loc=()):
    """(path, value) of every inf/nan float in a dumped config."""
    if isinstance(node, float) and not math.isfinite(node):
        yield loc, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _non_finite(value, (*loc, key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _non_finite(value, (*loc, i))


def _has_path(data: dict, loc) -> bool:
    node: Any = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]  # an item of a list-valued field
        else:
            return False
    return True


def config_hash(cfg: BaseModel) -> str:
    """Eight hex digits that identify a resolved config (run directory names)."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def config_yaml(cfg: BaseModel) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)  # é, not \xE9
