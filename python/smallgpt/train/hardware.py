"""Hardware facts the trainer needs: the device, the autocast dtype, CPU threads, peak FLOP/s.

Everything here is read from the machine (``/proc/cpuinfo``, ``/proc/stat``, CUDA queries) and
has no side effect except :func:`set_threads`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = [
    "GPU_PEAKS",
    "GpuPeak",
    "HardwareError",
    "auto_threads",
    "cpu_flags",
    "cpu_supports_fast_bf16",
    "describe_gpu",
    "gpu_peak",
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


@dataclass(frozen=True)
class GpuPeak:
    """Datasheet peak of one GPU model: dense tensor-core FLOP/s, no sparsity.

    ``half``: bf16/fp16 with fp32 accumulation (what autocast's matmuls run); ``single``: fp32
    matmuls as the trainer runs them (TF32 tensor cores where the card has them, else plain
    fp32). ``memory_gb`` is the nominal memory in decimal GB, checked against the card's.
    """

    name: str
    memory_gb: float
    half: float
    single: float


# Keyed on the exact name the driver reports (``nvidia-smi``, ``torch.cuda.get_device_name``)
# and the card's memory: "NVIDIA L4" is not "NVIDIA L40", an H100 NVL is not an SXM5 H100,
# and a MIG slice ("... MIG 1g.10gb") or a card missing here is unknown, never guessed.
# Figures: NVIDIA's datasheets (sparse figures halved where only those are printed).
GPU_PEAKS: Tuple[GpuPeak, ...] = (
    GpuPeak("NVIDIA B200", 180, 2250e12, 1125e12),
    GpuPeak("NVIDIA H200", 141, 989.4e12, 494.7e12),  # SXM
    GpuPeak("NVIDIA H200 NVL", 141, 835.5e12, 417.5e12),
    GpuPeak("NVIDIA H100 80GB HBM3", 80, 989.4e12, 494.7e12),  # SXM5
    GpuPeak("NVIDIA H100 PCIe", 80, 756.5e12, 378e12),
    GpuPeak("NVIDIA H100 NVL", 94, 835.5e12, 417.5e12),
    GpuPeak("NVIDIA A100-SXM4-40GB", 40, 312e12, 156e12),
    GpuPeak("NVIDIA A100-SXM4-80GB", 80, 312e12, 156e12),
    GpuPeak("NVIDIA A100-PCIE-40GB", 40, 312e12, 156e12),
    GpuPeak("NVIDIA A100 80GB PCIe", 80, 312e12, 156e12),
    GpuPeak("NVIDIA A10", 24, 125e12, 62.5e12),
    GpuPeak("NVIDIA L4", 24, 121e12, 60e12),
    GpuPeak("NVIDIA L40", 48, 181e12, 90.5e12),
    GpuPeak("NVIDIA L40S", 48, 362e12, 183e12),
    GpuPeak("NVIDIA GeForce RTX 3090", 24, 71e12, 35.6e12),
    GpuPeak("NVIDIA GeForce RTX 4090", 24, 165.2e12, 82.6e12),
    GpuPeak("NVIDIA GeForce RTX 5090", 32, 209.5e12, 104.8e12),
    GpuPeak("Tesla V100-SXM2-16GB", 16, 125e12, 15.7e12),  # no TF32, no bf16: fp16 / fp32
    GpuPeak("Tesla V100-SXM2-32GB", 32, 125e12, 15.7e12),
    GpuPeak("Tesla V100-PCIE-16GB", 16, 112e12, 14e12),
    GpuPeak("Tesla V100-PCIE-32GB", 32, 112e12, 14e12),
    GpuPeak("Tesla T4", 16, 65e12, 8.1e12),
)

# The memory a card reports is its nominal GB within a few percent (GiB vs GB, ECC and
# driver reservations); outside this band it is another card of the same name.
_MEMORY_BAND = (0.9, 1.15)


def _normal_name(name: str) -> str:
    return " ".join(name.split()).casefold()


def gpu_peak(name: str, memory_bytes: int) -> Optional[GpuPeak]:
    """The :data:`GPU_PEAKS` entry of a card: its exact name and its memory must both match
    (``None`` for a card not in the table)."""
    low, high = _MEMORY_BAND
    for entry in GPU_PEAKS:
        if _normal_name(entry.name) == _normal_name(name) and \
                low <= memory_bytes / (entry.memory_gb * 1e9) <= high:
            return entry
    return None


def describe_gpu(device: torch.device) -> Dict[str, Any]:
    """``name``, ``memory_gib`` and the table's ``peak_bf16`` / ``peak_fp32`` (None when the
    card is unknown) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    entry = gpu_peak(props.name, props.total_memory)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "peak_bf16": entry.half if entry else None,
            "peak_fp32": entry.single if entry else None}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense FLOP/s of one device, for MFU; 0.0 when unknown.

    GPUs: :data:`GPU_PEAKS`, by exact name and memory (bf16/fp16 figure for those dtypes,
    TF32 for fp32); a card not in the table is unknown. CPUs: a documented estimate,
    ``threads x clock x FLOPs/cycle`` with the clock from ``/proc/cpuinfo`` and 32 fp32
    FLOPs/cycle/core for AVX2+FMA (two 8-wide FMA units), 64 with AVX-512, and 1024 bf16
    FLOPs/cycle/core with AMX. ``$SMALLGPT_PEAK_FLOPS`` overrides everything.
    """
    env = os.environ.get("SMALLGPT_PEAK_FLOPS")
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            raise HardwareError(f"SMALLGPT_PEAK_FLOPS must be a positive number, got {env!r}")
        return value
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        entry = gpu_peak(props.name, props.total_memory)
        if entry is None:
            return 0.0
        return entry.half if dtype in (torch.bfloat16, torch.float16) else entry.single
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
    bf16 (AMX / AVX512-BF16), fp32 otherwise (AVX2-only CPUs run bf16 slower than fp32).
    ``float16`` (with a GradScaler when training) on CUDA and, on request, on CPUs, where it
    is slow without native fp16 units but takes the same code path as older GPUs."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_supports_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise HardwareError(f"unknown dtype {name!r} (use auto, float32, bfloat16, float16)")
    if name == "float16" and device.type not in ("cuda", "cpu"):
        # fp16 needs a GradScaler, which the trainer runs on CUDA and CPU only
        raise HardwareError(f"float16 is supported on cuda and cpu, not {device.type}; use "
                            "bfloat16 or float32")
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
