"""GPU status through nvidia-ml-py (the ``pynvml`` module), graceful on machines without a GPU.

Example:
    >>> from lightning_quantum.gpu import gpu_status
    >>> status = gpu_status()
    >>> sorted(status)
    ['available', 'devices', 'driver_version', 'reason']
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["gpu_status", "memory_stats"]

_MB = 1024 * 1024


def _query(fn: Callable[[], Any], nvml: Any) -> Any:
    """Call one NVML query; a query the device does not support gives ``None`` instead of an error."""
    try:
        return fn()
    except nvml.NVMLError:
        return None


def _device_status(nvml: Any, index: int) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    memory = _query(lambda: nvml.nvmlDeviceGetMemoryInfo(handle), nvml)
    utilization = _query(lambda: nvml.nvmlDeviceGetUtilizationRates(handle), nvml)
    temperature = _query(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU), nvml)
    power_mw = _query(lambda: nvml.nvmlDeviceGetPowerUsage(handle), nvml)
    power_limit_mw = _query(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle), nvml)
    return {
        "index": index,
        "name": name.decode() if isinstance(name, bytes) else name,
        "memory_used_mb": None if memory is None else memory.used / _MB,
        "memory_total_mb": None if memory is None else memory.total / _MB,
        "utilization_percent": None if utilization is None else utilization.gpu,
        "temperature_c": temperature,
        "power_w": None if power_mw is None else power_mw / 1000.0,
        "power_limit_w": None if power_limit_mw is None else power_limit_mw / 1000.0,
    }


def gpu_status() -> dict[str, Any]:
    """Status of every NVIDIA GPU, read through NVML.

    Returns:
        ``{"available": bool, "reason": str | None, "driver_version": str | None, "devices": [...]}``.
        Each device has ``index``, ``name``, ``memory_used_mb``, ``memory_total_mb``,
        ``utilization_percent``, ``temperature_c``, ``power_w`` and ``power_limit_w``; a figure the
        device does not report is ``None``. Without a driver, ``available`` is ``False`` and
        ``reason`` says why; nothing is raised.
    """
    try:
        import pynvml as nvml
    except ImportError as err:
        return {
            "available": False,
            "reason": f"nvidia-ml-py is not installed ({err})",
            "driver_version": None,
            "devices": [],
        }
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        return {"available": False, "reason": f"NVML could not start: {err}", "driver_version": None, "devices": []}
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        count = nvml.nvmlDeviceGetCount()
        devices = [_device_status(nvml, i) for i in range(count)]
    except nvml.NVMLError as err:
        return {"available": False, "reason": f"NVML query failed: {err}", "driver_version": None, "devices": []}
    finally:
        nvml.nvmlShutdown()
    return {
        "available": count > 0,
        "reason": None if count else "the NVIDIA driver reports no devices",
        "driver_version": driver.decode() if isinstance(driver, bytes) else driver,
        "devices": devices,
    }


def memory_stats(device: Any = "cpu", *, nvml_device_index: int | None = None) -> dict[str, float]:
    """Memory in use now, in MiB: process RSS always, and the CUDA allocator figures on a GPU.

    Args:
        device: the ``torch.device`` the model lives on.
        nvml_device_index: also read ``memory/gpu_used_mb`` and ``memory/gpu_total_mb`` from NVML for
            this device; NVML must already be initialized (``pynvml.nvmlInit``) by the caller.
    """
    import psutil
    import torch

    dev = torch.device(device)
    stats = {"memory/rss_mb": psutil.Process().memory_info().rss / _MB}
    if dev.type == "cuda":
        stats["memory/cuda_allocated_mb"] = torch.cuda.memory_allocated(dev) / _MB
        stats["memory/cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / _MB
        stats["memory/cuda_reserved_mb"] = torch.cuda.memory_reserved(dev) / _MB
    if nvml_device_index is not None:
        import pynvml as nvml

        try:
            info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(nvml_device_index))
            stats["memory/gpu_used_mb"] = info.used / _MB
            stats["memory/gpu_total_mb"] = info.total / _MB
        except nvml.NVMLError as err:
            log.debug("NVML memory query failed: %s", err)
    return stats
