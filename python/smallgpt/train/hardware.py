"""Hardware facts the trainer needs: the device, the autocast dtype, CPU threads, peak FLOP/s.

Everything here is read from the machine (``/proc/cpuinfo``, ``/proc/stat``, CUDA queries) and
has no side effect except :func:`set_threads`.
"""

from __future__ import annotations

import os
import time
from typing import List, Optional, Tuple

import torch

__all__ = [
    "HardwareError",
    "auto_threads",
    "cpu_flags",
    "cpu_supports_fast_bf16",
    "peak_flops",
    "resolve_device",
    "resolve_dtype",
    "resolve_head_dtype",
]


class HardwareError(RuntimeError):
    """The requested device or dtype is not available on this machine."""


def cpu_flags() -> set:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return 2.5


def cpu_supports_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul units (AMX-BF16 or AVX512-BF16)."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


# Dense peak FLOP/s per GPU: (bf16/fp16 tensor cores, tf32/fp32). Matched by name substring,
# first match wins (so "H100 PCIe" precedes "H100").
_GPU_PEAKS: List[Tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A10G", 125e12, 62.5e12),
    ("A10", 125e12, 62.5e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense FLOP/s of one device, for MFU.

    GPUs: a datasheet table by device name (dense, no sparsity). CPUs: a documented estimate,
    ``threads x clock x FLOPs/cycle`` with the clock from ``/proc/cpuinfo`` and 32 fp32
    FLOPs/cycle/core for AVX2+FMA (two 8-wide FMA units), 64 with AVX-512, and 1024 bf16
    FLOPs/cycle/core with AMX. ``$SMALLGPT_PEAK_FLOPS`` overrides everything. Returns 0 when
    unknown (MFU is then reported as 0).
    """
    env = os.environ.get("SMALLGPT_PEAK_FLOPS")
    if env:
        try:
            return float(env)
        except ValueError:
            raise HardwareError(f"SMALLGPT_PEAK_FLOPS must be a number, got {env!r}") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        low_precision = dtype in (torch.bfloat16, torch.float16)
        for key, half, single in _GPU_PEAKS:
            if key.lower() in name.lower():
                return half if low_precision else single
        return 0.0
    if device.type == "cpu":
        flags = cpu_flags()
        if dtype == torch.bfloat16 and "amx_bf16" in flags:
            per_cycle = 1024.0
        elif "avx512f" in flags:
            per_cycle = 64.0
        elif "avx2" in flags and "fma" in flags:
            per_cycle = 32.0
        else:
            per_cycle = 8.0
        return torch.get_num_threads() * _cpu_ghz() * 1e9 * per_cycle
    return 0.0


def _cpu_times() -> Tuple[int, int]:
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields)


def auto_threads(sample_s: float = 0.25) -> int:
    """Intra-op threads for a CPU run: the cores that are idle right now.

    OpenMP threads wait for each other at every operation, so one thread sharing a core with
    another busy process stalls all of them: on a 2-core machine with one core busy, 2 threads
    ran the quickstart 3x slower than 1 thread, while on an idle machine 2 threads were 1.6x
    faster than 1. Samples ``/proc/stat`` for ``sample_s`` seconds; keeps torch's default when
    ``OMP_NUM_THREADS`` is set or ``/proc/stat`` is unavailable.
    """
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return default
    try:
        idle0, total0 = _cpu_times()
        time.sleep(sample_s)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return default
    if total1 <= total0:
        return default
    idle_cores = (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or default)
    return max(1, min(default, int(idle_cores + 0.5)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA (this rank's GPU) if available, else CPU.

    Raises:
        HardwareError: an unknown device name, or a device this machine does not have.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise HardwareError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HardwareError(f"device {name} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise HardwareError(f"device {dev} requested but this machine has "
                                f"{torch.cuda.device_count()} GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise HardwareError(f"device {name} requested but MPS is not available")
    elif dev.type != "cpu":
        raise HardwareError(f"device {name!r} is not supported (use auto, cpu, cuda[:N] or mps)")
    return dev


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype; ``auto`` → bf16 on CUDA with bf16 (else fp16) and on CPUs with native
    bf16 (AMX / AVX512-BF16), fp32 otherwise (AVX2-only CPUs run bf16 slower than fp32)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_supports_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise HardwareError(f"unknown dtype {name!r} (use auto, float32, bfloat16, float16)")
    if name == "float16" and device.type == "cpu":
        raise HardwareError("float16 autocast needs a GPU; use bfloat16 or float32 on CPU")
    return _DTYPES[name]


def resolve_head_dtype(name: str, device: torch.device,
                       run_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype of the training head and loss (``TrainConfig.head_dtype``), or None for the
    run's own (``"same"``, and ``"auto"`` where it would not differ).

    ``"auto"``: bf16 where the device has native bf16 (CUDA with bf16, CPUs with AMX or
    AVX512-BF16), else the run's. ``"float32"`` / ``"bfloat16"``: that dtype.
    """
    if name == "same":
        return None
    if name == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else (
            device.type == "cpu" and cpu_supports_fast_bf16())
        return torch.bfloat16 if native and run_dtype != torch.bfloat16 else None
    if name not in ("float32", "bfloat16"):
        raise HardwareError(f"unknown head dtype {name!r} (use same, auto, float32, bfloat16)")
    wanted = _DTYPES[name]
    return None if wanted == run_dtype else wanted
