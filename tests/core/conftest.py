"""Make the toy plugins importable and give each test a clean plugin set with them registered."""

import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

TOY = Path(__file__).parent / "toy"
sys.path.insert(0, str(TOY))


@pytest.fixture
def toy_plugins(monkeypatch, tmp_path):
    """The installed plugins plus ``toy`` and a ``broken`` one, loaded through entry points."""
    from tubcli.plugins import Plugins, reset_plugins

    plugins = Plugins(use_entry_points=False)
    plugins.load_entry_point(EntryPoint(name="toy", value="tub_toy.plugin", group="tub"))
    plugins.load_entry_point(EntryPoint(name="broken", value="tub_broken.plugin", group="tub"))
    previous = reset_plugins(plugins)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUB_NO_PROGRESS", "1")
    for key in ("TUB_DEVICE", "TUB_SEED", "TUB_PRECISION", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(key, raising=False)
    yield plugins
    reset_plugins(previous)


@pytest.fixture
def toy_env():
    """Environment for subprocesses that run the toy plugin through tub_toy/run_cli.py."""
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOY), os.environ.get("PYTHONPATH", "")]),
           "TUB_NO_PROGRESS": "1"}
    return env
