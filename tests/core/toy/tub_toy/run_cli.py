"""Run the tub CLI with the toy plugin registered (for subprocess and torchrun tests)."""

import sys
from importlib.metadata import EntryPoint

from tubcli.cli import main
from tubcli.plugins import Plugins, reset_plugins

plugins = Plugins(use_entry_points=False)
plugins.load_entry_point(EntryPoint(name="toy", value="tub_toy.plugin", group="tub"))
reset_plugins(plugins)
main(sys.argv[1:])
