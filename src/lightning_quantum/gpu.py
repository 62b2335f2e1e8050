"""GPU status through nvidia-ml-py (the ``pynvml`` module), graceful on machines without a GPU.

Example:
    >>> from lightning_quantum.gpu import gpu_status
    >>> status = gpu_status()
    >>> sorted(status)
    ['available', 'devices', 'driver_version', 'reason']
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import psutil
import torch

# Imported inside the functions that use them: pynvml (optional: NVIDIA GPUs only).

log = logging.getLogger(__name__)

__all__ = ["cuda_capability", "gpu_status", "memory_stats", "nvml_index"]

_MB = 1024 * 1024


def _query(fn: Callable[[], Any], nvml: Any) -> Any:
    """Call one NVML query; a query the device does not support gives ``None`` instead of an error."""
    try:
        return fn()
    except nvml.NVMLError:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible(nvml: Any) -> list[str] | None:
    """The UUIDs of the devices CUDA numbers 0, 1, ... in this process, from ``CUDA_VISIBLE_DEVICES``.

    ``None`` when the variable is unset (CUDA then sees every device, in NVML's PCI order when
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``). Entries are NVML indices or UUIDs (``GPU-...``, ``MIG-...``);
    the list stops at the first entry that names no device, as CUDA's does.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    uuids = []
    for entry in (e.strip() for e in value.split(",")):
        try:
            handle = (
                nvml.nvmlDeviceGetHandleByIndex(int(entry))
                if entry.isdigit()
                else nvml.nvmlDeviceGetHandleByUUID(entry)
            )
        except (nvml.NVMLError, ValueError):
            break
        uuids.append(_text(nvml.nvmlDeviceGetUUID(handle)))
    return uuids


def nvml_index(cuda_index: int, nvml: Any = None) -> int:
    """The NVML index of CUDA device ``cuda_index`` of this process (NVML must be initialized).

    NVML numbers every GPU of the machine and ignores ``CUDA_VISIBLE_DEVICES``: with
    ``CUDA_VISIBLE_DEVICES=2,3``, CUDA device 0 is NVML device 2. The device is found by UUID.
    """
    if nvml is None:
        import pynvml

        nvml = pynvml
    visible = _visible(nvml)
    if visible is None:
        return cuda_index
    if not 0 <= cuda_index < len(visible):
        raise ValueError(
            f"CUDA device {cuda_index} is not among CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}."
        )
    return int(nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(visible[cuda_index])))


def cuda_capability(cuda_index: int = 0) -> tuple[int, int] | None:
    """The compute capability of CUDA device ``cuda_index``, read through NVML without initializing CUDA.

    ``None`` without NVML. Reading it through ``torch.cuda`` would initialize CUDA in this process,
    which fork-based DDP then refuses to start its workers from.
    """
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception:  # ImportError or NVMLError: no NVML here  # noqa: BLE001
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index(cuda_index, nvml))
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    except (nvml.NVMLError, ValueError) as err:
        log.debug("NVML could not read the compute capability: %s", err)
        return None
    finally:
        _shutdown(nvml)


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError as err:  # already shut down, or the driver went away: nothing to release
        log.debug("nvmlShutdown: %s", err)


def _device_status(nvml: Any, index: int, visible: list[str] | None) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    uuid = _query(lambda: _text(nvml.nvmlDeviceGetUUID(handle)), nvml)
    name = nvml.nvmlDeviceGetName(handle)
    memory = _query(lambda: nvml.nvmlDeviceGetMemoryInfo(handle), nvml)
    utilization = _query(lambda: nvml.nvmlDeviceGetUtilizationRates(handle), nvml)
    temperature = _query(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU), nvml)
    power_mw = _query(lambda: nvml.nvmlDeviceGetPowerUsage(handle), nvml)
    power_limit_mw = _query(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle), nvml)
    if visible is None:
        cuda_index: int | None = index
    else:
        cuda_index = visible.index(uuid) if uuid in visible else None
    return {
        "index": index,
        "uuid": uuid,
        "cuda_index": cuda_index,
        "name": _text(name),
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
        Each device has ``index`` (NVML's, the machine-wide numbering), ``uuid``, ``cuda_index`` (the
        number ``torch.cuda`` gives it in this process under ``CUDA_VISIBLE_DEVICES``, ``None`` when
        hidden), ``name``, ``memory_used_mb``, ``memory_total_mb``,
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
        visible = _visible(nvml)
        devices = [_device_status(nvml, i, visible) for i in range(count)]
    except nvml.NVMLError as err:
        return {"available": False, "reason": f"NVML query failed: {err}", "driver_version": None, "devices": []}
    finally:
        _shutdown(nvml)
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
