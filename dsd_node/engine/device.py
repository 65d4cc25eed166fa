"""Where a node computes: device and dtype names resolved to torch objects, and its CPU thread budget.

`resolve_device` turns auto|cpu|cuda|cuda:N|mps into a torch.device and fails with one line when the
device is not there. `resolve_dtype` turns auto|bfloat16|float16|float32 into a torch.dtype: auto is
the checkpoint's dtype on a GPU (CUDA or MPS) and float32 on a CPU, where half-precision matmuls are
slow. `default_threads` shares this process's cores between the processes of one host.
"""

from __future__ import annotations

import os
import re

import torch

DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


class DeviceError(ValueError):
    """A device that is unknown or absent on this machine, with a one-line message for the user."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps -> torch.device; DeviceError if absent."""
    if isinstance(name, torch.device):
        name = str(name)
    spec = (name or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m:
        if not torch.cuda.is_available():
            why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device or driver visible"
            raise DeviceError(f"{spec} requested but this machine has no CUDA device ({why}); use --device cpu or auto")
        count = torch.cuda.device_count()
        index = int(m[1]) if m[1] is not None else torch.cuda.current_device()
        if index >= count:
            raise DeviceError(f"{spec} requested but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if spec == "mps":
        if not _mps_available():
            mps = getattr(torch.backends, "mps", None)
            why = "torch built without MPS" if mps is None or not mps.is_built() else "MPS is not available on this machine"
            raise DeviceError(f"mps requested but this machine has no MPS device ({why}); use --device cpu or auto")
        return torch.device("mps")
    raise DeviceError(f"unknown device {name!r} (choose from {DEVICE_NAMES})")


def _as_dtype(value) -> torch.dtype | None:
    """A checkpoint's dtype as a torch.dtype: a torch.dtype, a name such as "bfloat16" or "torch.float16", or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    return DTYPES.get(name)


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a Hugging Face config says its weights are stored in (None when it does not say)."""
    return _as_dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | str = "cpu",
                  checkpoint_dtype: torch.dtype | str | None = None) -> torch.dtype:
    """auto | bfloat16 | float16 | float32 -> torch.dtype.

    auto: the checkpoint's dtype on CUDA/MPS (float32 when the checkpoint names none), float32 on CPU.
    float16 and bfloat16 on CPU are allowed (they work, slowly: CPU kernels are made for float32).
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name} (choose from auto, {', '.join(DTYPES)})")
        return name
    spec = (name or "auto").strip().lower()
    spec = _DTYPE_ALIASES.get(spec, spec)
    if spec == "auto":
        dev = torch.device(device) if isinstance(device, str) else device
        if dev.type == "cpu":
            return torch.float32
        return _as_dtype(checkpoint_dtype) or torch.float32
    if spec not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[spec]


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A seeded random generator on `device`, or on the CPU where that backend has none."""
    try:
        g = torch.Generator(device=device)
    except RuntimeError:
        g = torch.Generator()
    return g.manual_seed(seed)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(processes_on_host: int = 1, hidden_size: int | None = None) -> int:
    """Torch threads for one of `processes_on_host` node processes sharing this host's cores.

    A model's width caps it: splitting the matmuls of a narrow model across threads costs more in
    synchronisation than it saves (the embedded pair, hidden size 256, ran 3-40x slower on 2 threads than
    on 1 on a 2-core machine), so one thread per 512 of hidden size at most."""
    share = max(1, available_cores() // max(1, processes_on_host))
    return min(share, max(1, hidden_size // 512)) if hidden_size else share


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for a new shard on `device` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing on a GPU measures nothing without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
