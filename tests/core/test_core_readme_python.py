"""Every ```python block of a plugin's README runs as written (the documented library use), in a fresh
interpreter and an empty folder, for each installed plugin."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = [(readme.parent.name, i, code) for readme in sorted(ROOT.glob("plugins/tub-*/README.md"))
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", readme.read_text(), re.S))]


def test_the_plugins_with_a_python_api_show_it():
    assert {name for name, _, _ in BLOCKS} >= {"tub-atlas", "tub-knnlrp", "tub-pathorob", "tub-xmil"}


@pytest.mark.parametrize("plugin, index, code", BLOCKS, ids=[f"{n}-{i}" for n, i, _ in BLOCKS])
def test_a_readme_python_block_runs(plugin, index, code, tmp_path):
    pytest.importorskip(plugin.replace("-", "_"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
