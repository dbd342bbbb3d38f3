"""Device, precision, seeding and distributed init (DESIGN §6). torch is imported lazily."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.abc
import importlib.util
import logging
import os
import random
import sys
from dataclasses import dataclass

from tubcli.errors import TubError

DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(spec: str = "auto", precision: str = "fp32"):
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error.

    Under torchrun, ``auto`` and ``cuda`` give rank i of a node the GPU of its ``LOCAL_RANK``. Apple MPS
    has no float64: ``auto`` passes it over for ``precision`` fp64, and ``mps`` with fp64 is an error.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return _say_slow_bf16(torch.device("cuda", _local_gpu(torch)), precision)
        if _mps_available() and precision != "fp64" and "LOCAL_RANK" not in os.environ:  # gloo has no MPS
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TubError(f"--device {spec}{_origin()}: CUDA is not available here; use --device cpu or auto")
        if ":" not in spec:  # under torchrun each local rank takes its own GPU, as with auto
            return _say_slow_bf16(torch.device("cuda", _local_gpu(torch)), precision)
        index = int(spec.split(":", 1)[1])
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if ranks_here > 1:
            raise TubError(f"--device {spec} would put all {ranks_here} torchrun ranks of this node on one GPU; "
                           "use --device cuda (each rank takes the GPU of its LOCAL_RANK)")
        if index >= torch.cuda.device_count():
            raise TubError(f"--device {spec}{_origin()}: only {torch.cuda.device_count()} CUDA device(s); pick one "
                           "of them")
        return _say_slow_bf16(torch.device("cuda", index), precision)
    if spec == "mps":
        if not _mps_available():
            raise TubError(f"--device mps{_origin()}: Apple MPS is not available here; use --device cpu or auto")
        if precision == "fp64":
            raise TubError(f"--device mps{_origin()} has no float64; use --precision fp32, or --device cpu for fp64")
        if "LOCAL_RANK" in os.environ:
            raise TubError(f"--device mps{_origin()} under torchrun: no process-group backend reduces MPS tensors; "
                           "use --device cpu (gloo)")
        return torch.device("mps")
    raise TubError(f"unknown device {spec!r}{_origin()}; use auto, cpu, cuda, cuda:N or mps")


def _say_slow_bf16(device, precision: str):
    """``device``; bf16 asked for on a GPU before Ampere (V100, T4: compute capability < 8) is emulated,
    often slower than fp32, which the user would otherwise only see in the job's run time."""
    import torch

    if precision in ("bf16", "bf16-weights"):
        try:
            major, minor = torch.cuda.get_device_capability(device)
        except (RuntimeError, AssertionError):  # a driver that cannot say: the run goes on unwarned
            return device
        if major < 8:
            logging.getLogger("tub").warning(
                "--precision bf16 on %s (compute capability %d.%d) has no bf16 units and is emulated, often slower "
                "than fp32; use --precision fp16 (or fp32)", torch.cuda.get_device_name(device), major, minor)
    return device


def say_device_unused(cfg, run) -> None:
    """A verb that computes on the CPU whatever --device says: the device, recorded in config.yaml, is
    said not to be used (a GPU asked for would otherwise look honoured)."""
    device = getattr(cfg, "device", "auto")
    if device not in ("auto", "cpu"):
        run.log.warning("tub %s %s computes on the CPU: --device %s does not change that", run.plugin, run.verb,
                        device)


def _origin() -> str:
    """`` (from TUB_DEVICE)`` (or a config file, --set) when the device was not asked for by --device."""
    from tubcli.config import device_source

    source = device_source()
    return f" (from {source})" if source else ""


def _local_gpu(torch) -> int:
    """This torchrun rank's GPU: its LOCAL_RANK; more ranks on a node than GPUs is an error (NCCL would
    refuse two ranks on one GPU later, with a less clear message)."""
    ranks_here, count = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
    if ranks_here > count:
        raise TubError(f"{ranks_here} torchrun ranks on this node but {count} GPU(s); start at most {count} "
                       "per node (--nproc-per-node) or use --device cpu")
    return int(os.environ.get("LOCAL_RANK", 0)) % count


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_dtype(precision: str = "fp32"):
    import torch

    if precision not in DTYPES:
        raise TubError(f"unknown precision {precision!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[precision])


def as_torch_dtype(dtype):
    """A torch dtype from the CLI's spellings ("fp64"), torch's names ("float64"), numpy's types (np.float64) or a
    torch dtype, for Python APIs that take what the CLI takes; None stays None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if isinstance(dtype, str) else str(getattr(dtype, "__name__", dtype)).removeprefix("torch.")
    name = DTYPES.get(name, name)
    if name not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or a torch dtype)")
    return getattr(torch, name)


def autocast(device, dtype):
    """bf16/fp16 autocast for inference (weights stay fp32, also for encoders whose loader ignores the
    dtype); a no-op context for fp32/fp64."""
    import torch

    device = torch.device(device)
    if dtype in (torch.bfloat16, torch.float16) and device.type in ("cuda", "mps", "cpu"):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all of them, so a run repeats); torch when it is imported."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    when_torch_imported("seed", lambda torch: torch.manual_seed(seed))


def when_torch_imported(key: str, action) -> None:
    """Call ``action(torch)`` now if torch is imported, else right after its import.

    Importing torch takes 2-4 s on a small CPU box: a verb that never uses it (knnlrp, pathorob's metrics,
    tiling) should not pay that to seed it. A later ``action`` of the same ``key`` replaces an earlier one
    (the last run's seed is the one that counts)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        action(torch)
        return
    _AFTER_TORCH_IMPORT[key] = action
    if not any(isinstance(finder, _TorchImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchImportHook())


_AFTER_TORCH_IMPORT: dict = {}


class _TorchImportHook(importlib.abc.MetaPathFinder):
    """Finds torch as the other finders do and runs the waiting actions once its module has executed.
    It stays in place until then: a bare ``importlib.util.find_spec("torch")`` (is it installed?) imports
    nothing."""

    finding = False

    def find_spec(self, name, path=None, target=None):
        if name != "torch" or self.finding:
            return None
        self.finding = True
        try:
            spec = importlib.util.find_spec(name)  # the finders below give the real spec
        finally:
            self.finding = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                actions = list(_AFTER_TORCH_IMPORT.values())
                _AFTER_TORCH_IMPORT.clear()
                for action in actions:
                    action(module)

            spec.loader.exec_module = exec_module
        return spec


def exact_fp32() -> None:
    """fp32 means fp32 on GPUs too: cuDNN convolutions default to TF32 (10-bit mantissa), which put the
    atlas demo's LRP conservation error at 1.5e-3 on an H100 (7.5e-7 on CPU). bf16/fp16 runs ask for
    low precision explicitly (autocast), so nothing is lost there."""

    def no_tf32(torch):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    when_torch_imported("exact_fp32", no_tf32)


@contextlib.contextmanager
def denormals_flushed(on: bool = True):
    """Flush subnormal floats to zero (x86 FTZ/DAZ, ARM FZ) on the calling thread inside the block, and put
    back the thread's previous mode after it.

    Why: products of small filter values and their gradients fall below the smallest normal float, and a CPU
    computes with such numbers 10x slower (an fp32 multiply of two [5848, 64] tensors: 0.26 ms normal, 2.9 ms
    subnormal). Flushing changes results by less than 1e-38 (fp32) or 1e-308 (fp64). Scoped rather than
    global because other C code may not expect it: scipy's cKDTree build crashes (SIGSEGV) with DAZ set, so
    ``on=False`` also guards such code against a caller who flushes. GPUs are not affected."""
    if not on and "torch" not in sys.modules:  # nothing has flushed through torch: no need to import it
        yield
        return
    import torch

    before = _flushing(torch)
    if before != on:
        torch.set_flush_denormal(on)
    try:
        yield
    finally:
        if before != on:
            torch.set_flush_denormal(before)


def _flushing(torch) -> bool:
    """Whether this thread flushes subnormals: a subnormal fp32 input multiplied by one comes out zero."""
    return torch.tensor([1e-40], dtype=torch.float32).mul_(1.0).item() == 0.0


def item_seed(seed: int, item_id: str) -> int:
    """A per-item seed derived from (seed, item id): the same on every shard and rerun."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torchrun launch (world_size 1 otherwise)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info(environ=None) -> DistInfo:
    env = os.environ if environ is None else environ
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
    )


def init_distributed(device) -> DistInfo:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    info = dist_info()
    if not info.enabled:
        return info
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if getattr(device, "type", "cpu") == "cuda" else "gloo"
        if backend == "nccl":
            import torch

            torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, device_id=device)  # the rank's GPU, not a best guess
        else:
            dist.init_process_group(backend=backend)
        import atexit

        atexit.register(_destroy_process_group)
    return info


def _destroy_process_group() -> None:
    """Tear the process group down before the interpreter exits: a gloo group left alive can abort
    a rank at exit ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model, device):
    """Wrap ``model`` in DistributedDataParallel when running distributed; else return it."""
    info = dist_info()
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if getattr(device, "type", "cpu") == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def distributed_sampler(dataset, shuffle: bool = True, seed: int = 0):
    """A DistributedSampler that shards ``dataset`` over ranks, or None when not distributed."""
    info = dist_info()
    if not info.enabled:
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed)


def barrier() -> None:
    if dist_info().enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
