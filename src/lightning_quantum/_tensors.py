"""What a weight holds, whatever its kind: plain, or a quantized (torchao) tensor subclass.

A neutral home below the measuring, pruning and quantization modules, which all need it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["dense_values", "int8_activation_weights", "int8_linears", "is_quantized", "plain_tensors"]


def is_quantized(tensor: Any) -> bool:
    """Whether ``tensor`` is a tensor subclass that keeps its data in inner tensors: a quantized
    (torchao) weight, such as ``Int8Tensor`` or ``IntxUnpackedToInt8Tensor``."""
    return (
        isinstance(tensor, Tensor)
        and type(tensor) not in (Tensor, nn.Parameter)
        and not isinstance(tensor, DTensor)  # a sharded (FSDP2) weight is a subclass too, but not quantized
        and hasattr(tensor, "__tensor_flatten__")
    )


def int8_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears of ``model`` with torchao ``Int8Tensor`` weights (int8 QAT's, or dynamic int8's)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and type(m.weight).__name__ == "Int8Tensor"]


def int8_activation_weights(model: nn.Module) -> list[str]:
    """The names of ``model``'s torchao ``Int8Tensor`` weights that quantize their inputs to int8 as well (dynamic
    int8's, int8 QAT's converted form), in a module or in an exported program's graph module."""
    return [
        name
        for name, weight in model.named_parameters()
        if type(weight).__name__ == "Int8Tensor" and getattr(weight, "act_quant_kwargs", None) is not None
    ]


def dense_values(tensor: Tensor) -> Tensor:
    """The values a weight stands for: itself, or a quantized (torchao) weight dequantized."""
    return tensor.dequantize() if is_quantized(tensor) else tensor


def plain_tensors(tensor: Tensor) -> list[Tensor]:
    """The plain tensors holding a tensor's data: itself, or the inner tensors of a tensor subclass.

    Quantized weights (torchao) are tensor subclasses whose bytes live in inner tensors (the packed
    values, scales, zero points), listed by ``__tensor_flatten__``.
    """
    if not is_quantized(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]  # a subclass (checked above)
    return [inner for name in names for inner in plain_tensors(getattr(tensor, name))]
