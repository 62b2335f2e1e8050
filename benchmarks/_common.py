"""What the benchmark scripts share."""

from __future__ import annotations

import platform
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_quantum.deployment import _machine
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
    """The machine a result was measured on: what the deployment gate's cache records (the CPU model, cores,
    ATen's kernel set, the GPU, library versions), plus the CPU's matrix flags and the threads. "x86_64" alone
    can't tell a Zen 3 EPYC (AVX2, no VNNI) from a Xeon with AMX, and their ratios differ."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags = set(cpuinfo_field("flags").split())
    return _machine(device) | {
        "cpu_matrix_flags": [flag for flag in _MATRIX_FLAGS if flag in flags],
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "lightning": pl.__version__,
        **extra,
    }
