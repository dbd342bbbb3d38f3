"""A two-process torchrun (gloo, CPU) run: same final weights on both ranks, one run directory."""

import subprocess
import sys


def test_torchrun_two_ranks_agree_and_write_once(toy_env, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("\n".join(f"{x},{x % 4},{3 * x - (x % 4)}" for x in range(1, 17)))
    weights = tmp_path / "weights"
    weights.mkdir()
    env = {**toy_env, "TOY_WEIGHTS_DIR": str(weights), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tub_toy.run_cli", "toy", "train", str(data), "--epochs", "4", "--lr", "0.005", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (weights / "rank0.txt").read_text(), (weights / "rank1.txt").read_text()
    assert rank0 == rank1 and rank0.strip()
    runs = list((tmp_path / "runs" / "toy" / "train").iterdir())
    assert len(runs) == 1  # both ranks agreed on one directory, written once
    lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # rank 0 only: one line per epoch
    assert (runs[0] / "DONE").exists() and (runs[0] / "checkpoints" / "model.safetensors").exists()
