"""Static int8 quantization with PT2E: ``torch.export``, torchao's ``prepare_pt2e`` with the
``X86InductorQuantizer``, calibration on real batches, ``convert_pt2e``.

The result is a ``torch.fx.GraphModule`` that runs eagerly and under ``torch.compile`` (where
Inductor lowers it to int8 kernels). The X86 quantizer targets CPU inference: a model on another
device, or in another dtype (bf16-true training), is calibrated and converted as a float32 CPU copy,
and the int8 graph comes back on the CPU. On Hugging Face BERT-style encoders the quantizer's annotation
fails in torchao 0.18 (``IndexError`` in ``_annotate_linear_unary``); the error says to use
:func:`~lightning_quantum.quantization.quantize_dynamic_int8` there instead.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_quantum._batches import split_batch
from lightning_quantum._modules import drop_unused_tensors
from lightning_quantum.compiled import int8_products_saturate

# Imported inside the functions that use them: torchao (slow to import; on a CPU-only machine it
# prints warnings about its CUDA kernels).

log = logging.getLogger(__name__)

__all__ = ["CPUOnly", "quantize_static_int8", "unobserved_modules"]


def _as_args(inputs: Any) -> tuple[Any, ...]:
    """Positional inputs on the CPU in float32, where the X86 quantizer's graph runs."""
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(_cpu_float(a) for a in args)


def _cpu_float(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to("cpu", torch.float32) if value.is_floating_point() else value.cpu()
    return value


def _cpu_float32_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is a float32 CPU model, else a float32 CPU copy of it (the original stays)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32) for t in tensors):
        return model
    where = sorted({f"{t.device.type} {str(t.dtype).removeprefix('torch.')}" for t in tensors})
    log.info(
        "Static int8 targets CPU inference (X86 quantizer): calibrating a float32 CPU copy of a model on %s", where
    )
    return copy.deepcopy(model).to("cpu", torch.float32)


class CPUOnly(nn.Module):
    """Runs a CPU-only module (the X86 int8 graph) for callers on any device.

    Inputs are copied to the CPU and the outputs back to the device of the first input tensor; moves
    and casts of the model around it (``.to("cuda")``, ``.half()``) leave the module where it is.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        out = self.module(*move_data_to_device(args, "cpu"), **move_data_to_device(kwargs, "cpu"))
        return out if first is None else move_data_to_device(out, first.device)

    def _apply(self, fn: Any, recurse: bool = True) -> CPUOnly:
        return self  # the int8 graph stays on the CPU, in float32 activations


def _batch_dynamic_shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return tuple({0: batch} if isinstance(a, Tensor) and a.dim() > 0 else None for a in args)


def unobserved_modules(prepared: nn.Module) -> list[str]:
    """Observers of a prepared model that have seen no data (their range is still empty)."""
    unseen = []
    for name, module in prepared.named_modules():
        low, high = getattr(module, "min_val", None), getattr(module, "max_val", None)
        if isinstance(low, Tensor) and isinstance(high, Tensor) and (low.numel() == 0 or bool((low > high).any())):
            unseen.append(name)
    return unseen


def quantize_static_int8(
    model: nn.Module, calibration_data: Iterable[Any], *, max_batches: int | None = 8
) -> torch.fx.GraphModule:
    """Calibrate and convert ``model`` to static int8; the original model is not modified.

    The X86 quantizer targets CPU inference: a model on a GPU, or in bf16 or fp16, is calibrated as
    a float32 CPU copy, and the returned graph runs on the CPU.

    Args:
        model: the float model (put in eval mode for export).
        calibration_data: batches as a ``DataLoader`` yields them; inputs are split from targets.
        max_batches: calibration batches to use; all when ``None``.

    Raises:
        ValueError: when the calibration data is empty, an observer saw no data (naming it), or the
            quantizer cannot annotate the model.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    batches = iter(calibration_data)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("`calibration_data` is empty: static quantization needs at least one batch.") from None
    example = _as_args(split_batch(first)[0])
    model = _cpu_float32_copy(model)
    was_training = model.training
    model.eval()
    try:
        exported = torch.export.export(model, example, dynamic_shapes=_batch_dynamic_shapes(example)).module()
    finally:
        model.train(was_training)
    quantizer = x86.X86InductorQuantizer()
    # 7-bit activations where oneDNN's int8 kernel saturates (CPUs without VNNI), as torchao advises for them
    reduce_range = int8_products_saturate()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    try:
        prepared = prepare_pt2e(exported, quantizer)
    except IndexError as error:
        raise ValueError(
            f"The X86InductorQuantizer could not annotate {type(model).__name__} ({error!r}); this happens on "
            "Hugging Face transformer encoders with torchao 0.18. Use dynamic int8 (quantize_dynamic_int8) for them."
        ) from error
    seen = 0
    with torch.no_grad():
        for batch in [first, *batches]:
            if max_batches is not None and seen >= max_batches:
                break
            prepared(*_as_args(split_batch(batch)[0]))
            seen += 1
    unseen = unobserved_modules(prepared)
    if unseen:
        raise ValueError(f"Observers saw no data during calibration: {unseen}. Calibrate on batches that reach them.")
    log.info("Static int8: calibrated on %d batches%s", seen, ", 7-bit activations" if reduce_range else "")
    converted = convert_pt2e(prepared)
    drop_unused_tensors(converted)  # the float weights, once folded to int8
    # Lightning calls .train()/.eval() around validation and test; an exported graph refuses both
    # unless told to map them onto its (inference-only) ops.
    allow_exported_model_train_eval(converted)
    # The graph computes in inference mode; say so, or the next .train(was_training) (export_program,
    # benchmarks) would switch its BatchNorm to batch statistics.
    # Its .train()/.eval() set no `training` flags; set them, so code that saves and restores the mode
    # (export_program, benchmarks) does not switch the graph's BatchNorm to batch statistics.
    converted.eval()
    nn.Module.train(converted, False)
    return converted
