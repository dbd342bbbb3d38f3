"""Start-up time of the CLI: `tub --help` and `tub <plugin> --help`, against the interpreter floor
and against what a CLI that imports torch at start-up would pay.

    python benchmarks/core_cli.py [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time


def timed(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from tubcli.plugins import Plugins

    py = sys.executable
    tub = [py, "-m", "tubcli"]
    cases = {
        "python -c pass (floor)": [py, "-c", "pass"],
        "python -c 'import torch' (a CLI that imports torch)": [py, "-c", "import torch"],
        "tub --help": tub + ["--help"],
        "tub plugins": tub + ["plugins"],
    }
    for name in sorted(Plugins().apps):
        cases[f"tub {name} --help"] = tub + [name, "--help"]
    if shutil.which("tub"):
        cases["tub --help (console script)"] = [shutil.which("tub"), "--help"]
    results = {name: timed(cmd, args.repeats) for name, cmd in cases.items()}
    torch_time = results["python -c 'import torch' (a CLI that imports torch)"]
    width = max(map(len, results))
    print(f"{'command'.ljust(width)}  median s  vs import-torch")
    for name, seconds in results.items():
        ratio = f"{torch_time / seconds:6.1f}x" if name.startswith("tub") else ""  # tub's commands against it only
        print(f"{name.ljust(width)}  {seconds:8.3f}  {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_seconds": results, "repeats": args.repeats}, f, indent=2)


if __name__ == "__main__":
    main()
