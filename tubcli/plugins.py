"""Entry-point discovery (group ``tub``). A plugin that fails to load is recorded, never fatal.

Modelled on simonw/llm's ``plugins.py``: each entry point is loaded on its own inside try/except,
so one broken plugin cannot take the CLI down. ``TUB_STRICT_PLUGINS=1`` turns load failures into
errors (CI uses it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from tubcli import hookspecs
from tubcli.errors import TubError


@dataclass
class PluginRecord:
    """What ``tub plugins`` shows about one plugin."""

    name: str
    distribution: str = ""
    version: str = ""
    error: str | None = None
    app: object | None = None  # the PluginApp, once registered


@dataclass
class Registry:
    """What plugins add through ``tub_register``."""

    apps: dict = field(default_factory=dict)

    def add(self, app) -> None:
        if app.name in self.apps and self.apps[app.name] is not app:
            raise TubError(f"two plugins register the name {app.name!r}; uninstall one of them")
        self.apps[app.name] = app


class Plugins:
    """The plugin manager plus the load record of every plugin."""

    def __init__(self, use_entry_points: bool = True):
        self.pm = pluggy.PluginManager("tub")
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.registry = Registry()
        if use_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in sorted(entry_points(group="tub"), key=lambda e: e.name):
            self.load_entry_point(ep)

    def load_entry_point(self, ep) -> PluginRecord:
        """Load one entry point; an import error is recorded on the plugin, never raised."""
        dist = getattr(ep, "dist", None)
        record = PluginRecord(name=ep.name, distribution=dist.name if dist else "", version=dist.version if dist else "")
        self.records[ep.name] = record
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not break the CLI
            record.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return record
        return self.register(module, ep.name, record)

    def register(self, obj, name: str, record: PluginRecord | None = None) -> PluginRecord:
        """Register a plugin object (a module or any object with ``@hookimpl`` functions)."""
        record = record or self.records.setdefault(name, PluginRecord(name=name))
        self.records[name] = record
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
            impl = getattr(obj, "tub_register", None)
            if impl is not None:
                before = set(self.registry.apps)
                impl(self.registry)
                added = set(self.registry.apps) - before
                if added:
                    record.app = self.registry.apps[sorted(added)[0]]
                    record.app.version = record.app.version or record.version
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
        return record

    def check_strict(self) -> None:
        """Raise when any plugin failed to load and ``TUB_STRICT_PLUGINS`` is set."""
        if os.environ.get("TUB_STRICT_PLUGINS", "") not in ("", "0"):
            bad = [r for r in self.records.values() if r.error]
            if bad:
                detail = "; ".join(f"{r.name}: {r.error}" for r in bad)
                raise TubError(f"plugins failed to load (TUB_STRICT_PLUGINS=1): {detail}", exit_code=1)

    @property
    def apps(self) -> dict:
        return self.registry.apps

    def patch_encoders(self) -> dict:
        """All patch encoders offered through ``tub_patch_encoders``, by name."""
        merged: dict = {}
        for offered in self.pm.hook.tub_patch_encoders():
            merged.update(offered or {})
        return merged


_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, discovered on first use."""
    global _plugins
    if _plugins is None:
        _plugins = Plugins()
    return _plugins


def reset_plugins(plugins: Plugins | None = None) -> Plugins | None:
    """Replace the process-wide plugin set (tests use this); returns the previous one."""
    global _plugins
    previous, _plugins = _plugins, plugins
    return previous


def patch_encoders() -> dict:
    """``{name: EncoderSpec}`` from every loaded plugin."""
    return get_plugins().patch_encoders()


def get_patch_encoder(name: str):
    """One encoder by name, with an error that lists what is available."""
    encoders = patch_encoders()
    if name not in encoders:
        known = ", ".join(sorted(encoders)) or "none (install tub-atlas)"
        raise TubError(f"unknown patch encoder {name!r}; available: {known}")
    return encoders[name]
