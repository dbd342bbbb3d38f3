"""`tub atlas train` (distillation) under a two-process torchrun (gloo, CPU): it runs data-parallel to
the end, rank 0 alone writes the run directory and prints results, and a student saved by it loads."""

import json
import os
import subprocess
import sys

from tubcli.testing import invoke


def test_torchrun_distillation_writes_once(tmp_path):
    made = invoke(["atlas", "make-data", tmp_path / "d", "--n-per-class", "4", "--checkpoint", "vit-t8-demo",
                   "-o", tmp_path / "mk"])
    assert made.exit_code == 0, made.stderr
    data = tmp_path / "d"
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUB_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tubcli",
           "atlas", "train", str(data / "tiles"), "--teacher-arch", "vit-t8-demo",
           "--teacher-weights", str(data / "vit-t8-demo-random.safetensors"), "--student-arch", "vit-t8-demo",
           "--student-depth", "1", "--batch-size", "4", "--crop-size", "64", "--steps", "4",
           "--set", "checkpoint_every=2", "--device", "cpu", "-o", str(out), "--json"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["steps"] == 4  # rank 0 only
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one writer: no duplicated lines
    assert (out / "DONE").exists()
    emb = invoke(["atlas", "embed", data / "tiles.npz", "--weights", out / "checkpoints" / "model.safetensors",
                  "-o", tmp_path / "emb"])
    assert emb.exit_code == 0, emb.stderr
