"""A two-process torchrun (gloo, CPU) run: same final weights on both ranks, one run directory."""

import json
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
    env_record = json.loads((runs[0] / "env.json").read_text())  # resolved before the run directory existed
    assert (env_record["device"], env_record["world_size"]) == ("cpu", 2)


def test_torchrun_ranks_take_their_own_gpu(monkeypatch):
    """`--device cuda` under torchrun: rank i of a node gets cuda:LOCAL_RANK (as auto does), and a
    fixed `cuda:N` that would stack every local rank on one GPU is refused (NCCL would fail later)."""
    import pytest
    import torch

    from tubcli.device import resolve_device
    from tubcli.errors import TubError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("auto") == torch.device("cuda", 2)
    with pytest.raises(TubError, match="would put all 4 torchrun ranks of this node on one GPU"):
        resolve_device("cuda:1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # more ranks than GPUs: two would share one
    with pytest.raises(TubError, match="8 torchrun ranks on this node but 4 GPU"):
        resolve_device("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one rank per node (or no torchrun): cuda:N as asked
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_mps_has_no_float64(monkeypatch):
    """Apple MPS cannot hold float64: auto passes it over for fp64, an explicit mps with fp64 is one line."""
    import pytest
    import torch

    from tubcli import device
    from tubcli.errors import TubError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_mps_available", lambda: True)
    assert device.resolve_device("auto") == torch.device("mps")
    assert device.resolve_device("auto", "fp64") == torch.device("cpu")
    with pytest.raises(TubError, match="--device mps has no float64; use --precision fp32"):
        device.resolve_device("mps", "fp64")


def test_torchrun_on_a_mac_computes_on_the_cpu(monkeypatch):
    """gloo cannot all-reduce MPS tensors: under torchrun auto takes the CPU and an explicit mps is refused."""
    import pytest
    import torch

    from tubcli import device
    from tubcli.errors import TubError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "_mps_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert device.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TubError, match="--device mps under torchrun: no process-group backend"):
        device.resolve_device("mps")


def test_bf16_on_a_gpu_before_ampere_is_said_to_be_emulated(monkeypatch, caplog):
    import torch

    from tubcli import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    capability = {"now": (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability["now"])
    with caplog.at_level("WARNING", logger="tub"):
        assert device.resolve_device("cuda", "bf16") == torch.device("cuda", 0)
        assert "bf16 on Tesla V100 (compute capability 7.0) has no bf16 units" in caplog.text
        caplog.clear()
        device.resolve_device("auto", "fp16")
        capability["now"] = (8, 0)
        device.resolve_device("cuda:0", "bf16")
    assert not caplog.records
