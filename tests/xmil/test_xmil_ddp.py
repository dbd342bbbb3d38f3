"""`tub xmil train` under a two-process torchrun (gloo, CPU) runs data-parallel to the end and only
rank 0 writes the run directory and prints results. An odd number of training slides checks that
uneven shards are padded: unequal step counts per rank would hang DDP's all-reduce."""

import json
import os
import subprocess
import sys

import numpy as np


def test_torchrun_training_with_uneven_shards_finishes_and_writes_once(tmp_path):
    rng = np.random.default_rng(0)
    bags = tmp_path / "bags"
    bags.mkdir()
    rows = ["slide_id,label,split"]
    for i in range(7):
        label = i % 2
        x = rng.normal(size=(12, 16)).astype(np.float32)
        x[:3, 0] += 3.0 * label  # a planted signal in a few patches
        np.savez(bags / f"s{i}.npz", features=x)
        rows.append(f"s{i},{label},{'train' if i < 5 else 'test'}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUB_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tubcli", "xmil", "train", "--features", str(bags), "--labels", str(labels),
           "--epochs", "3", "--set", "model.features_dim=8", "--device", "cpu", "-o", str(out), "--json"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # written once (rank 0), not twice
    assert (out / "DONE").exists() and (out / "checkpoints" / "model.safetensors").is_file()
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # results printed by rank 0 only
