"""What the benchmark scripts share."""

from __future__ import annotations

import os
import platform
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_quantum.precision import cpuinfo_field

#: The CPU flags that decide which matrix kernels run (int8 dot products, bf16, AMX tiles).
_MATRIX_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def quiet_trainer(max_epochs: int, **overrides: Any) -> pl.Trainer:
    """A CPU ``Trainer`` that prints, logs and checkpoints nothing, and skips the sanity check."""
    kwargs: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def machine_info(**extra: Any) -> dict[str, Any]:
    """The machine a result was measured on, by CPU model and matrix flags: "x86_64" alone can't tell a
    Zen 3 EPYC (AVX2, no VNNI) from a Xeon with AMX, and their ratios differ."""
    flags = set(cpuinfo_field("flags").split())
    info: dict[str, Any] = {
        "cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "cpu_matrix_flags": [flag for flag in _MATRIX_FLAGS if flag in flags],
        "kernel_set": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info | extra
