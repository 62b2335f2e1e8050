"""Resolve ``precision="auto"`` to a real Lightning precision, with the reason.

The rules, first match wins:

* CUDA with compute capability 8.0 or higher: ``bf16-mixed``;
* older CUDA: ``16-mixed`` (Lightning adds a ``GradScaler``);
* a CPU with AVX512-BF16 or AMX: ``bf16-mixed``;
* otherwise ``32-true``.

Example:
    >>> from lightning_quantum.precision import HardwareInfo, resolve_precision
    >>> resolve_precision("auto", hardware=HardwareInfo(cpu_flags=frozenset())).precision
    '32-true'
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.accelerators.cuda import num_cuda_devices
from lightning.pytorch.plugins import BitsandbytesPrecision as _LightningBitsandbytesPrecision

from lightning_quantum._validation import check_choice
from lightning_quantum.gpu import cuda_capability

log = logging.getLogger(__name__)

__all__ = [
    "BitsandbytesPrecision",
    "HardwareInfo",
    "PrecisionDecision",
    "resolve_precision",
    "torch_dtype",
    "VALID_PRECISIONS",
    "AUTOCAST_DTYPES",
]

#: Every value ``resolve_precision`` accepts, Lightning's short aliases included.
VALID_PRECISIONS = (
    "auto",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "32",
    "16",
    "bf16",
    "64",
)
_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
#: The dtype ``torch.autocast`` runs under for each mixed precision.
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
#: CPU flags (as in /proc/cpuinfo) that give native bf16 matrix math.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_VALID_ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


@functools.cache
def cpuinfo_field(name: str) -> str:
    """The first ``name`` line of ``/proc/cpuinfo`` (``flags``, ``model name``), or ``""`` elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return ""


def _read_cpu_flags() -> frozenset[str]:
    return frozenset(cpuinfo_field("flags").split())


@dataclass(frozen=True)
class HardwareInfo:
    """What the precision rules look at. Build it by hand to test the rules on other hardware."""

    cuda_available: bool = False
    cuda_capability: tuple[int, int] | None = None
    cuda_name: str | None = None
    cpu_flags: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def detect(cls, cuda_index: int = 0) -> HardwareInfo:
        """Read the hardware of this process: CUDA device ``cuda_index`` and the CPU flags.

        CUDA is not initialized: the device count and the compute capability come from NVML (as
        Lightning counts devices), because a process that has initialized CUDA cannot fork the
        workers of ``strategy="ddp_fork"`` or ``ddp_notebook``. Only without NVML is the capability
        read through ``torch.cuda``.
        """
        if num_cuda_devices() > cuda_index:
            capability = cuda_capability(cuda_index)
            if capability is None:  # no NVML: torch.cuda it is (this initializes CUDA)
                capability = torch.cuda.get_device_capability(cuda_index)
            return cls(
                cuda_available=True,
                cuda_capability=capability,
                cuda_name=f"CUDA device {cuda_index}",
                cpu_flags=_read_cpu_flags(),
            )
        return cls(cpu_flags=_read_cpu_flags())


@dataclass(frozen=True)
class PrecisionDecision:
    """The precision to hand to ``Trainer(precision=...)`` and why it was chosen."""

    precision: str
    reason: str


def first_device_index(devices: Any) -> int:
    """The first device a ``Trainer(devices=...)`` value selects: ``[2, 3]`` and ``"2,3"`` give 2, a count 0."""
    if isinstance(devices, (list, tuple)) and devices:
        return int(devices[0])
    if isinstance(devices, str) and "," in devices:
        return int(devices.split(",")[0].strip())
    return 0


def resolve_precision(
    precision: str | int = "auto",
    *,
    accelerator: str = "auto",
    hardware: HardwareInfo | None = None,
    devices: Any = None,
) -> PrecisionDecision:
    """Turn ``precision`` into a concrete Lightning precision string.

    Args:
        precision: ``"auto"``, a Lightning precision such as ``"bf16-mixed"``, or an alias
            (``"32"``, ``16``, ``"bf16"``).
        accelerator: the ``Trainer`` accelerator; ``"cpu"`` applies the CPU rules even when CUDA is there.
        hardware: the hardware to decide for; detected when not given (without initializing CUDA).
        devices: the ``Trainer``'s ``devices``: the GPU rules look at the first device it selects.

    Raises:
        ValueError: for an unknown precision or accelerator.
    """
    precision = str(precision)
    check_choice("precision", precision, VALID_PRECISIONS)
    check_choice("accelerator", accelerator, _VALID_ACCELERATORS)
    if precision != "auto":
        resolved = _ALIASES.get(precision, precision)
        return PrecisionDecision(resolved, f"asked for {precision!r}")
    hw = hardware if hardware is not None else HardwareInfo.detect(first_device_index(devices))
    if hw.cuda_available and accelerator != "cpu":
        major, minor = hw.cuda_capability or (0, 0)
        name = hw.cuda_name or "CUDA device"
        if major >= 8:
            return PrecisionDecision(
                "bf16-mixed", f"{name} has compute capability {major}.{minor} >= 8.0 (native bf16)"
            )
        return PrecisionDecision(
            "16-mixed",
            f"{name} has compute capability {major}.{minor} < 8.0: fp16 autocast with a GradScaler",
        )
    bf16_flags = sorted(hw.cpu_flags & CPU_BF16_FLAGS)
    if bf16_flags:
        return PrecisionDecision("bf16-mixed", f"the CPU has {', '.join(bf16_flags)} (native bf16 matrix math)")
    return PrecisionDecision("32-true", "no CUDA device and no CPU bf16 support (avx512_bf16 or amx_bf16)")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` named ``name``, from an allow-list (for configs, which hold strings).

    Raises:
        ValueError: for a name outside ``float32``, ``float16`` and ``bfloat16``.
    """
    check_choice("dtype", name, _DTYPES)
    return _DTYPES[name]


class BitsandbytesPrecision(_LightningBitsandbytesPrecision):
    """Lightning's ``BitsandbytesPrecision``, usable with ``ignore_modules`` on a model that defines
    ``configure_model``.

    Lightning enters the plugin's ``module_init_context`` around ``configure_model`` whenever a
    LightningModule overrides that hook, and its plugin refuses that context when ``ignore_modules`` is
    set (it would patch every ``Linear`` built there, the ignored ones too). This suite's modules define
    ``configure_model`` to shard under FSDP2 and build nothing there, so on the first GPU run
    ``lq-train experiment=qlora_gpu`` stopped with that ``RuntimeError`` before training. With
    ``ignore_modules`` this plugin enters only the dtype context there; the layers are converted, the
    ignored ones left out, by ``convert_module`` after ``configure_model`` as before, so a ``Linear``
    built inside ``configure_model`` is converted too.
    """

    def module_init_context(self) -> Any:
        if self.ignore_modules:
            return self.tensor_init_context()
        return super().module_init_context()
