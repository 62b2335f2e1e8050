"""What a weight holds, whatever its kind: plain, or a quantized (torchao) tensor subclass.

A neutral home below the measuring, pruning and quantization modules, which all need it.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["dense_values", "plain_tensors"]


def dense_values(tensor: Tensor) -> Tensor:
    """The values a weight stands for: itself, or a quantized (torchao) weight dequantized."""
    if type(tensor) not in (Tensor, nn.Parameter) and hasattr(tensor, "dequantize"):
        return tensor.dequantize()
    return tensor


def plain_tensors(tensor: Tensor) -> list[Tensor]:
    """The plain tensors holding a tensor's data: itself, or the inner tensors of a tensor subclass.

    Quantized weights (torchao) are tensor subclasses whose bytes live in inner tensors (the packed
    values, scales, zero points), listed by ``__tensor_flatten__``.
    """
    if type(tensor) in (Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in plain_tensors(getattr(tensor, name))]
