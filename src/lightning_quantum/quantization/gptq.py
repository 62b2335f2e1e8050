"""GPTQ rounding of fake-quantized weights onto their fixed grids, on any device.

Round-to-nearest puts each weight on the nearest point of its grid (its group's scale and zero point),
one weight at a time. GPTQ (Frantar et al., 2022, https://arxiv.org/abs/2210.17323, Algorithm 1)
rounds the input columns of a layer in order and moves the error of each rounded column into the
columns not yet rounded, weighted by the inverse of the Hessian ``X^T X`` of the layer's inputs ``X``
on calibration data, so that the layer's outputs ``X W^T`` stay closer to those of the float weights.

Here the grids are fixed before rounding: they are the fake quantizers' scales and zero points (computed
from the weights, or frozen by QAT), so the rounded weights are points of the grid that conversion
(``convert_qat``) quantizes with, and conversion stores exactly the codes GPTQ chose. Int4 PTQ uses it as
``quantize_weights_int4(algorithm="gptq")``. torchao 0.18 has a GPTQ (``torchao.prototype.gptq``), but it
runs on CUDA only, chooses its own scales and needs the ``mslk`` package for int4; this one runs on the CPU
and rounds onto the grids it is given.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quantum._batches import _call, _to_device, split_batch
from lightning_quantum._modules import eval_mode
from lightning_quantum._validation import check_non_negative, check_positive_int
from lightning_quantum.quantization.qat import _weight_quantizers, freeze_weight_ranges

__all__ = ["gptq_round", "gptq_round_prepared"]


def _on_grid(column: Tensor, scale: Tensor, zero: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """The grid point torchao's fake quantization maps each weight of ``column`` to, computed as it does (in
    the dtype of ``scale``, the weight's), so that ties round the same way."""
    code = torch.clamp(torch.round(column.to(scale.dtype) * (1.0 / scale)) + zero, quant_min, quant_max)
    return ((code - zero) * scale).double()


@torch.no_grad()
def gptq_round(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    *,
    quant_min: int,
    quant_max: int,
    damping: float = 0.01,
    block_size: int = 128,
) -> Tensor:
    """``weight`` ``(out, in)`` rounded onto its grid by GPTQ: a tensor of grid points, same shape and dtype.

    ``hessian`` is ``X^T X`` ``(in, in)`` of the layer's inputs (any positive multiple of it); ``scale`` and
    ``zero_point`` hold one value per row and group of input columns, ``(out, in // group)`` (or ``(out,)``
    for one group per row); the codes run from ``quant_min`` to ``quant_max``. ``damping`` times the
    mean diagonal is added to the diagonal before it is inverted. Inputs that never fired (a zero diagonal)
    are rounded to nearest. With a diagonal Hessian no error moves, and the result is round-to-nearest.
    Weights that are exactly zero (pruned) stay zero, so that a pruned layer keeps its sparsity: the
    error of keeping them at zero moves on like any other.

    Raises:
        ValueError: for shapes that do not fit together, or a negative ``damping``.
    """
    check_non_negative("damping", damping)
    check_positive_int("block_size", block_size)
    rows, columns = weight.shape
    scale = scale.detach().reshape(rows, -1).to(weight.dtype)
    zero = zero_point.detach().reshape(rows, -1).to(weight.dtype)
    if hessian.shape != (columns, columns) or zero.shape != scale.shape or columns % scale.shape[1]:
        raise ValueError(
            f"GPTQ needs a ({columns}, {columns}) Hessian and scales of {rows} rows whose groups divide {columns} "
            f"columns, got a Hessian of {tuple(hessian.shape)}, scales {tuple(scale.shape)}, zero points "
            f"{tuple(zero.shape)}."
        )
    group = columns // scale.shape[1]
    w = weight.detach().double().clone()
    pruned = w == 0
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * h.diagonal().mean())
    # The upper Cholesky factor of the inverse Hessian: row j holds how column j's error moves into the rest.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block, u_block = w[:, start:stop].clone(), u[start:stop, start:stop]
        errors = torch.empty_like(block)
        for j in range(stop - start):
            g = (start + j) // group
            rounded = _on_grid(block[:, j], scale[:, g], zero[:, g], quant_min, quant_max)
            rounded[pruned[:, start + j]] = 0.0
            out[:, start + j] = rounded
            errors[:, j] = (block[:, j] - rounded) / u_block[j, j]
            block[:, j + 1 :] -= errors[:, j : j + 1] * u_block[j, j + 1 :]
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return out.to(weight.dtype)


@torch.no_grad()
def _hessians(
    model: nn.Module, layers: dict[str, Any], batches: Iterable[Any], max_batches: int
) -> tuple[dict[str, Tensor], int]:
    """``X^T X`` of each layer's inputs over up to ``max_batches`` batches (the model in eval mode), and
    how many batches ran."""
    sums = {
        name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
        for name, m in layers.items()
    }

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def add(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name].addmm_(x.T, x)

        return add

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    device = next(model.parameters()).device
    seen = 0
    try:
        with eval_mode(model):
            for batch in itertools.islice(batches, max_batches):
                _call(model, _to_device(split_batch(batch)[0], device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    return sums, seen


def gptq_round_prepared(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int = 16,
    damping: float = 0.01,
) -> int:
    """Round the weights of ``model``'s fake-quantized linears onto their grids with GPTQ, in place; return
    how many layers.

    ``model`` is prepared (:func:`~lightning_quantum.quantization.prepare_qat`) with its fake quantizers on.
    Layers whose ranges are not fixed yet get them fixed from their current weights first
    (:func:`~lightning_quantum.quantization.qat.freeze_weight_ranges`), so that
    :func:`~lightning_quantum.quantization.convert_qat` quantizes onto the same grids: it then stores
    GPTQ's codes, and the fake-quantized model computes what the converted one will. The Hessians come from
    up to ``max_batches`` batches of ``batches`` (loader batches: a tensor, ``(inputs, targets)``, ...), run
    through the model as it is (each layer sees the inputs of the fake-quantized layers before it).

    GPTQ keeps each layer's outputs close to those of its float weights as they are: after QAT that is
    the latent weights, not the fake-quantized model QAT trained, so it helps only where the latent
    weights are themselves the better model (see ``docs/causal_lm.md``).

    Raises:
        ValueError: when ``batches`` yields nothing, or ``model`` has no fake-quantized linear.
    """
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

    check_positive_int("max_batches", max_batches)
    layers: dict[str, Any] = {name: module for name, module, _ in _weight_quantizers(model)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no fake-quantized linear to round: prepare it for QAT first.")
    freeze_weight_ranges(model)
    sums, seen = _hessians(model, layers, batches, max_batches)
    if not seen:
        raise ValueError("GPTQ rounding needs calibration batches, and the loader gave none.")
    for name, layer in layers.items():
        hessian = sums.pop(name)
        quantizer: Any = layer.weight_fake_quantizer
        quant_min, quant_max = _DTYPE_TO_QVALUE_BOUNDS[quantizer.config.dtype]
        rounded = gptq_round(
            layer.weight,
            hessian,
            quantizer.scale,
            quantizer.zero_point,
            quant_min=quant_min,
            quant_max=quant_max,
            damping=damping,
        )
        layer.weight.data.copy_(rounded)
    return len(layers)
