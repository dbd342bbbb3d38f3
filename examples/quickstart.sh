#!/usr/bin/env bash
# The quick start: every installed plugin end to end on small generated or bundled data.
set -euo pipefail
tub plugins
tub demo -o runs/quickstart
