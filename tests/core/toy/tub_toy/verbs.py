"""The toy plugin's verbs: small, but each exercises one part of the core for real."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import Field

from tubcli.config import Section, TubConfig
from tubcli.errors import TubError
from tubcli.io import atomic_path


class Optim(Section):
    lr: float = Field(0.1, description="learning rate")


class TrainConfig(TubConfig):
    data: Path | None = Field(None, description="CSV of x1,x2,y rows")
    epochs: int = Field(5, description="epochs [one pass over the data each]")
    optim: Optim = Optim()
    note: str = "default"


class SquareConfig(TubConfig):
    inputs: list[Path] = Field(default_factory=list, description="text files holding one number")


class ExplainConfig(TubConfig):
    weights: Path | None = None


def _load(path: Path):
    import torch

    if path is None or not Path(path).is_file():
        raise TubError(f"data file {path} does not exist; give a CSV of x1,x2,y rows")
    rows = [[float(v) for v in line.split(",")] for line in Path(path).read_text().split()]
    t = torch.tensor(rows, dtype=torch.float64)
    return t[:, :-1], t[:, -1]


def train(cfg: TrainConfig, run):
    import torch

    x, y = _load(cfg.data)
    model = torch.nn.Linear(x.shape[1], 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    start = 0
    state = run.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["epoch"] + 1
    ddp = run.ddp(model)
    dataset = torch.utils.data.TensorDataset(x, y)
    sampler = run.sampler(dataset, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), sampler=sampler)
    crash_at = int(os.environ.get("TOY_CRASH_AT_EPOCH", -1))
    loss = torch.tensor(0.0)
    for epoch in range(start, cfg.epochs):
        if epoch == crash_at:
            os._exit(3)  # a killed job: no cleanup at all
        for xb, yb in loader:
            opt.zero_grad()
            loss = ((ddp(xb).squeeze(-1) - yb) ** 2).mean()
            loss.backward()
            opt.step()
        run.log_metrics({"epoch": epoch, "loss": loss.item()})
        if epoch == int(os.environ.get("TOY_CRASH_AFTER_LOG", -1)):
            os._exit(3)  # killed between logging an epoch and checkpointing it
        run.save_checkpoint({"model": model.state_dict(), "optim": opt.state_dict(), "epoch": epoch})
    debug = os.environ.get("TOY_WEIGHTS_DIR")
    if debug:
        Path(debug, f"rank{run.rank}.txt").write_text(" ".join(repr(float(v)) for v in model.weight.flatten()))
    run.save_weights({"weight": model.weight}, {"in_features": x.shape[1]})
    return {"loss": loss.item(), "weights": model.weight.detach().flatten().tolist(), "epochs": cfg.epochs}


def evaluate(cfg: SquareConfig, run):
    missing = [p for p in cfg.inputs if not Path(p).is_file()]
    if missing:
        raise TubError(f"input {missing[0]} does not exist")
    log = os.environ.get("TOY_PROCESSED_LOG")
    slow = float(os.environ.get("TOY_SLOW", 0))
    for item, out in run.batch(cfg.inputs, output_for=lambda p: run.outputs_dir / (Path(p).stem + ".txt")):
        with run.item(item):
            text = Path(item).read_text().strip()
            value = float(text)  # a bad file raises here and is recorded
            if log:
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, f"{Path(item).name}\n".encode())
                os.close(fd)
            with atomic_path(out) as tmp:
                with open(tmp, "w") as f:
                    for _ in range(4):  # written in pieces, as a large output would be
                        f.write(f"{value * value}\n")
                        f.flush()
                        _sleep(slow)
                    f.write("end\n")
    return {"squared": run.batch_stats.get("processed", 0)}


def _sleep(seconds: float) -> None:
    """time.sleep; with TOY_REWORD_SIGNALS=1 a signal's exception comes out as another, as h5py's or
    torch.save's C code turn it into SystemError/RuntimeError."""
    if os.environ.get("TOY_REWORD_SIGNALS") != "1":
        time.sleep(seconds)
        return
    try:
        time.sleep(seconds)
    except KeyboardInterrupt as exc:
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from exc


def explain(cfg: ExplainConfig, run):
    from tubcli.io import load_safetensors

    tensors, _ = load_safetensors(cfg.weights)
    return {"relevance": [float(v) for v in tensors["weight"].flatten()]}


def demo(run):
    if os.environ.get("TOY_DEMO_FAILS"):  # a demo that fails, for tub demo's summary
        raise RuntimeError("the toy demo failed on purpose, with a reason longer than sixty characters to show")
    if os.environ.get("TOY_DEMO_WAITS"):  # a demo still running when a batch system's time limit comes
        (run.dir / "started").write_text("")
        time.sleep(60)
    data = run.dir / "data.csv"
    data.write_text("\n".join(f"{x},{2 * x},{5 * x}" for x in range(1, 6)))
    metrics = train(TrainConfig(data=data, epochs=50, optim=Optim(lr=0.01)), run)
    from tubcli.io import pyplot, save_figure

    fig, ax = pyplot().subplots()
    ax.plot([1, 2, 3], [3, 2, 1])
    ax.set_xlabel("epoch")
    save_figure(fig, run.outputs_dir / "loss.png")  # a plot, as plugins draw them
    return {"loss": metrics["loss"]}


def mean_encoder(weights, device, dtype):
    import torch

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    return Mean()
