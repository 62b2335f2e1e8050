"""Quantization schemes by name, each a torchao config built on demand.

torchao is imported lazily, so importing lightning_quantum stays light; torchao 0.18 prints
"Failed to load ... .so" lines on CPU-only machines, which are harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_quantum._validation import check_positive_int

# Imported inside the functions that use them: torchao (slow to import; on a CPU-only machine it
# prints warnings about its CUDA kernels).

__all__ = ["QAT_SCHEMES", "qat_base_config", "check_group_size", "embedding_int8_config", "int4_weight_only_config"]


def _int8_dynamic_int8_weight(group_size: int) -> Any:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def _int8_dynamic_int4_weight(group_size: int) -> Any:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    int4: Any = torch.int4  # type: ignore[attr-defined]
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=PerGroup(group_size))


def int4_weight_only_config(group_size: int, algorithm: str = "affine") -> Any:
    """torchao's int4 weight-only config, in groups of ``group_size`` input features: what the
    ``int4_weight_only`` QAT scheme converts to, and post-training ``quantize_weights_int4``
    (``algorithm``: how scales are chosen, ``"affine"`` min/max or ``"hqq_scale_only"``)."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    int4: Any = torch.int4  # type: ignore[attr-defined]
    return IntxWeightOnlyConfig(
        weight_dtype=int4,
        granularity=PerGroup(group_size),
        intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm(algorithm),
    )


def embedding_int8_config() -> Any:
    """int8 weights, one scale per row, for ``nn.Embedding`` tables: QAT's embedding scheme, dynamic
    int8's ``embeddings=True`` and the int4 post-training path's tables."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis

    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


#: QAT schemes: name -> (builder of the torchao base config, whether weights are grouped).
QAT_SCHEMES: dict[str, tuple[Callable[[int], Any], bool]] = {
    "int8_dynamic_int8_weight": (_int8_dynamic_int8_weight, False),  # the CPU default
    "int8_dynamic_int4_weight": (_int8_dynamic_int4_weight, True),
    "int4_weight_only": (int4_weight_only_config, True),
}


def qat_base_config(scheme: str, group_size: int = 32) -> Any:
    """The torchao post-training config that QAT prepares for and converts to.

    Raises:
        ValueError: for an unknown scheme.
    """
    if scheme not in QAT_SCHEMES:
        raise ValueError(f"`scheme`={scheme!r} is not valid. Choose one of: {', '.join(map(repr, QAT_SCHEMES))}.")
    return QAT_SCHEMES[scheme][0](group_size)


def check_group_size(scheme: str, group_size: int, linears: dict[str, nn.Linear]) -> None:
    """Raise when a grouped scheme's ``group_size`` does not divide a layer's input features."""
    check_positive_int("group_size", group_size)
    if not QAT_SCHEMES[scheme][1]:
        return
    bad = {name: m.in_features for name, m in linears.items() if m.in_features % group_size}
    if bad:
        raise ValueError(
            f"`group_size`={group_size} does not divide the input features of {bad}. Choose a group size that "
            "divides them (32 and 64 are common), or add those layers to `ignore`."
        )
