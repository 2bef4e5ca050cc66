"""Describe the machine a server runs on: CPU, memory and, when present, NVIDIA GPUs."""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from typing import Any

__all__ = ["describe_hardware", "describe_gpus"]


def describe_hardware() -> dict[str, Any]:
    """CPU model, core counts, memory bytes and GPUs of this machine (``gpus`` is ``[]`` without one)."""
    import psutil

    return {
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "memory_total_bytes": psutil.virtual_memory().total,
        "gpus": describe_gpus(),
    }


def describe_gpus() -> list[dict[str, Any]]:
    """Name and memory of each NVIDIA GPU via NVML; an empty list when NVML or a GPU is absent."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: absence is not an error here
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memory_total_bytes": int(memory.total),
                }
            )
        return gpus
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
