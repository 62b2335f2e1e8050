"""Int4 weights for ATen's CPU int4 kernel: the same grid, packed for ``aten._weight_int4pack_mm_for_cpu``.

:func:`quantize_weights_int4` and int4 QAT leave each linear with a torchao ``IntxUnpackedToInt8Tensor``
weight: int4 values kept one per byte, dequantized at each call (eagerly) or by the code Inductor
generates (compiled). On a 2-core AMD EPYC without AVX-512 (Zen 3, session 37) that made the causal LM's
int4 decoder 0.52x the fp32 one compiled. ATen has a CPU kernel for int4 weights in groups along the input
(``_weight_int4pack_mm_for_cpu``, the one torchao's prototype ``Int4OpaqueTensor`` calls), which reads two
values per byte and multiplies bf16 activations: on that EPYC the LM's 43 products at batch 1 took 0.74 ms
per token in it, against 3.15 ms for fp32 ``F.linear`` (8.47 ms with fp32 activations, its slow path).

:func:`pack_int4_for_cpu` moves each such weight into that kernel's layout without choosing its values
again: the tinygemm format stores ``q + 8`` (0 to 15) with a float zero of ``-zero_point * scale``, which
dequantizes to torchao's ``(q - zero_point) * scale`` (checked with fp32 activations: the same logits to
1e-6). What changes is the arithmetic around the grid: with bf16 activations (the kernel's fast path) the
activations and the group scales are rounded to bf16, so the decode gate judges the packed weights by
their own perplexity.

Example:
    >>> small = quantize_weights_int4(lm, group_size=64)  # or a model converted by int4 QAT
    >>> fast = pack_int4_for_cpu(small)                    # a copy; ``small`` is unchanged
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quantum._validation import check_choice

__all__ = ["INT4_KERNEL_GROUP_SIZES", "Int4CpuLinear", "int4_weight_linears", "pack_int4_for_cpu"]

#: The group sizes ATen's CPU int4 kernel takes (groups along the input features).
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
_ACTIVATION_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _int4_groups(weight: Any) -> int | None:
    """The group size of a torchao int4 weight-only weight (groups of one row along the input), else None."""
    if type(weight).__name__ != "IntxUnpackedToInt8Tensor" or getattr(weight, "activation_quantization", None):
        return None
    if getattr(weight, "target_dtype", None) != torch.int4 or weight.dim() != 2:  # type: ignore[attr-defined]
        return None
    block = tuple(weight.block_size)
    return int(block[1]) if block[0] == 1 else None


def int4_weight_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears of ``model`` with torchao int4 weight-only weights in groups along the input, by name."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and _int4_groups(m.weight) is not None
    }


class Int4CpuLinear(nn.Module):
    """A linear whose int4 weights run in ATen's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``).

    Built from an ``nn.Linear`` with a torchao int4 weight-only weight (:func:`pack_int4_for_cpu`); the input
    is cast to ``activation_dtype`` for the product and the output back to the input's dtype.
    """

    def __init__(self, linear: nn.Linear, activation_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        weight = linear.weight
        group_size = _int4_groups(weight)
        if group_size is None:
            raise TypeError(f"`linear` must have a torchao int4 weight-only weight, got {type(weight).__name__}.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        self.activation_dtype = activation_dtype
        qdata, scale, zero_point = weight.qdata, weight.scale, weight.zero_point  # type: ignore[attr-defined]
        rows = self.out_features
        scale = scale.reshape(rows, -1).float()
        zero = -zero_point.reshape(rows, -1).float() * scale  # tinygemm: (q' - 8) * scale + zero, q' = q + 8
        padding = -rows % 16  # the kernel packs rows in sixteens: rows of zeros, cut off the output
        qdata = nn.functional.pad(qdata, (0, 0, 0, padding))
        scale, zero = nn.functional.pad(scale, (0, 0, 0, padding)), nn.functional.pad(zero, (0, 0, 0, padding))
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros  # [groups, rows, (scale, zero)]

        scale_and_zero = pack_tinygemm_scales_and_zeros(
            scale.to(activation_dtype), zero.to(activation_dtype), activation_dtype
        )
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(qdata.int() + 8, 1))
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).to(self.activation_dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scale_and_zero)
        y = y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"activations={str(self.activation_dtype).removeprefix('torch.')}"
        )


def pack_int4_for_cpu(model: nn.Module, *, activation_dtype: str = "bfloat16") -> nn.Module:
    """A copy of ``model`` whose int4 weight-only linears run in ATen's CPU int4 kernel (:class:`Int4CpuLinear`).

    The int4 values, scales and zero points are those of the model (from :func:`quantize_weights_int4` or int4
    QAT's conversion); other layers (an int8 embedding, norms) are kept as they are.

    Args:
        model: a CPU model with torchao int4 weight-only linears (``IntxUnpackedToInt8Tensor``, groups of
            32, 64, 128 or 256 along the input).
        activation_dtype: ``"bfloat16"`` (the kernel's fast path; activations and group scales rounded to bf16)
            or ``"float32"`` (the model's numbers to the last bits, and far slower).

    Raises:
        ValueError: for an unknown ``activation_dtype``, a model with no int4 weight-only linear, one on
            another device than the CPU, or a group size the kernel does not take (named).
    """
    check_choice("activation_dtype", activation_dtype, tuple(_ACTIVATION_DTYPES))
    linears = int4_weight_linears(model)
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no int4 weight-only linear to pack: quantize it first "
            "(quantize_weights_int4, or int4 QAT's conversion)."
        )
    for name, linear in linears.items():
        if linear.weight.device.type != "cpu":
            raise ValueError(f"{name!r} is on {linear.weight.device}: ATen's int4 kernel packed here is the CPU's.")
        group_size = _int4_groups(linear.weight)
        if group_size not in INT4_KERNEL_GROUP_SIZES:
            raise ValueError(
                f"{name!r} has int4 groups of {group_size}: ATen's CPU int4 kernel takes groups of "
                f"{', '.join(map(str, INT4_KERNEL_GROUP_SIZES))}."
            )
    out = copy.deepcopy(model)
    dtype = _ACTIVATION_DTYPES[activation_dtype]
    for name in linears:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name)
        setattr(parent, child, Int4CpuLinear(getattr(parent, child), dtype))
    return out
