"""Quantization-aware training with torchao's ``QATConfig``, as pure functions.

``prepare_qat`` swaps each chosen ``nn.Linear`` for torchao's ``FakeQuantizedLinear`` (a module swap,
never a patched ``forward``); its state_dict keys are those of the plain layer, so checkpoints move
freely between plain and prepared models. ``set_fake_quant_enabled`` switches the fake quantizers
on and off (QAT can start late). ``convert_qat`` swaps them back and applies the real torchao
quantization. ``dequantize_linears`` undoes a conversion, so a converted model can be prepared and
trained again.

The int8 scheme fake-quantizes activations to int8 with one symmetric scale per token
(:class:`SymmetricPerTokenInt8`: torchao 0.18's own fake quantizer does only asymmetric per-token) and
converts to torchao's ``Int8Tensor`` with the same numerics (what ``Int8DynamicActivationInt8WeightConfig``
builds), which runs int8 kernels: ``torch._int_mm`` on CUDA, oneDNN int8 GEMMs once compiled with
:func:`~lightning_quantum.quantization.compile_for_inference` on CPU. It quantizes the weights and the
activations to the same integers as fake quantization, but multiplies integers where fake quantization
multiplies floats, so the outputs differ by float rounding: ``tests/test_qat.py`` allows 1e-3 of the
largest logit and the same top-1 class on every image (measured: 9.7e-8 on a DigitsMLP over 256 digits
images; 1.2e-7 of logits up to 0.73 with Gaussian inputs). The int4 schemes convert to torchao's
``IntxUnpackedToInt8Tensor``, which matches fake quantization bit for bit but dequantizes in eager mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_quantum._modules import replace_module, select_parameters
from lightning_quantum._tensors import is_quantized
from lightning_quantum.quantization.schemes import check_group_size, embedding_int8_config, qat_base_config

# Imported inside the functions that use them: torchao (slow to import; on a CPU-only machine it
# prints warnings about its CUDA kernels).

log = logging.getLogger(__name__)

__all__ = [
    "select_linears",
    "prepare_qat",
    "convert_qat",
    "set_fake_quant_enabled",
    "is_prepared",
    "is_converted",
    "dequantize_linears",
    "freeze_ranges_from_state",
    "freeze_weight_ranges",
    "refresh_weight_ranges",
    "unprepare_qat",
    "SymmetricPerTokenInt8",
]


class SymmetricPerTokenInt8(nn.Module):
    """Fake quantization of activations to int8 with one symmetric scale per token (last dimension), with
    the straight-through gradient of torchao's fake quantizers.

    The scale is ``max|x| / 127.5`` per token, as torchao's ``Int8Tensor`` computes it for its activations
    with ``MappingType.SYMMETRIC`` (the layout of ``Int8DynamicActivationInt8WeightConfig``), so the
    converted model multiplies the same integers. Symmetric activations need no zero point in the int8
    GEMM: the MiniLM student compiled with Inductor ran in 25.6 ms at batch 32 against 35.8 ms with
    asymmetric ones (a 2-core Xeon). torchao 0.18's ``IntxFakeQuantizer`` raises ``NotImplementedError``
    for symmetric per-token, so this module takes its place in the int8 scheme's prepared linears.
    It holds no state; ``enabled`` switches it like torchao's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        from torchao.quantization.qat.utils import _fake_quantize_per_token, _get_per_token_block_size
        from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

        scale, zero_point = choose_qparams_affine(
            x,
            mapping_type=MappingType.SYMMETRIC,
            block_size=_get_per_token_block_size(x),
            target_dtype=torch.int8,
            quant_min=-128,
            quant_max=127,
            eps=torch.finfo(torch.float32).eps,  # as Int8Tensor's activations
            scale_dtype=torch.float32,
            zero_point_dtype=torch.int32,
        )
        return _fake_quantize_per_token(x, scale, zero_point, -128, 127)

    def extra_repr(self) -> str:
        return f"int8, per token, symmetric, enabled={self.enabled}"


def _fake_quantized_linear() -> type[nn.Module]:
    from torchao.quantization.qat import FakeQuantizedLinear

    return FakeQuantizedLinear


def _fake_quantized_embedding() -> type[nn.Module]:
    from torchao.quantization.qat import FakeQuantizedEmbedding

    return FakeQuantizedEmbedding


def _fake_quantized() -> tuple[type[nn.Module], type[nn.Module]]:
    return _fake_quantized_linear(), _fake_quantized_embedding()


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextlib.contextmanager
def _keeping_hooks(model: nn.Module) -> Iterator[None]:
    """Give each module that a swap replaces its predecessor's hooks (the same dicts, so handles stay live).

    torchao swaps ``nn.Linear`` / ``nn.Embedding`` for fake-quantized ones and back; the new module had
    none of the old one's hooks. A Hugging Face model with gradient checkpointing keeps a forward hook
    on its input embeddings (``enable_input_require_grads``): its handle pointed at a dict that died
    with the old table, and the model no longer deep-copied.
    """
    before = dict(model.named_modules())
    yield
    for name, module in model.named_modules():
        old = before.get(name)
        if old is None or old is module:
            continue
        if any(getattr(old, attr, None) for attr in _HOOK_DICTS):
            for attr in _HOOK_DICTS:  # all of them: a handle also holds references to the empty ones
                if hasattr(old, attr):
                    setattr(module, attr, getattr(old, attr))


def select_linears(
    model: nn.Module, names: Sequence[str] | None = None, ignore: Sequence[str] = (), *, embeddings: bool = False
) -> dict[str, nn.Module]:
    """The ``nn.Linear`` layers (and with ``embeddings``, ``nn.Embedding`` tables), prepared or not, to
    quantize, by module name.

    Raises:
        ValueError: when a pattern matches nothing, or no layer is left to quantize.
    """
    types = ("Linear", "FakeQuantizedLinear") + (("Embedding", "FakeQuantizedEmbedding") if embeddings else ())
    return select_parameters(model, module_types=types, names=names, ignore=ignore, purpose="quantize")


def is_prepared(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a torchao ``FakeQuantizedLinear`` (or ``FakeQuantizedEmbedding``)."""
    classes = _fake_quantized()
    return any(isinstance(m, classes) for m in model.modules())


def _quantized(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) and is_quantized(module.weight)


def is_converted(model: nn.Module) -> bool:
    """Whether any ``Linear`` (or ``Embedding``) weight of ``model`` is a torchao quantized tensor."""
    return any(_quantized(m) for m in model.modules())


def prepare_qat(
    model: nn.Module,
    scheme: str,
    *,
    group_size: int = 32,
    names: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    embeddings: bool = False,
) -> list[str]:
    """Swap the chosen linears (and with ``embeddings``, embedding tables) for fake-quantized ones, in
    place; return their names.

    Embedding tables get int8 weights with one scale per row (torchao ``FakeQuantizedEmbedding``; a
    lookup has no activation to quantize), whatever the linears' scheme. Safe to call twice: layers
    already prepared are left alone.

    Raises:
        ValueError: for an unknown scheme, a group size that does not divide a layer, or nothing to quantize.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    base = qat_base_config(scheme, group_size)
    chosen = select_linears(model, names, ignore, embeddings=embeddings)
    linears = {n: m for n, m in chosen.items() if isinstance(m, nn.Linear)}
    check_group_size(scheme, group_size, linears)  # type: ignore[arg-type]
    classes = _fake_quantized()
    todo = {name for name, m in linears.items() if not isinstance(m, classes)}
    tables = {name for name, m in chosen.items() if isinstance(m, nn.Embedding) and not isinstance(m, classes)}
    with _keeping_hooks(model):
        if todo:
            quantize_(model, QATConfig(base, step="prepare"), filter_fn=lambda m, fqn: fqn in todo)
            if scheme == "int8_dynamic_int8_weight":
                for name in todo:
                    model.get_submodule(name).activation_fake_quantizer = SymmetricPerTokenInt8()
        if tables:
            quantize_(
                model,
                QATConfig(embedding_int8_config(), step="prepare"),
                filter_fn=lambda m, fqn: fqn in tables and isinstance(m, nn.Embedding),
            )
    return sorted(chosen)


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> int:
    """Turn the fake quantizers of every prepared layer (and table) on or off; return how many layers."""
    classes = _fake_quantized()
    count = 0
    for module in model.modules():
        if isinstance(module, classes):
            quantizers: tuple[Any, ...] = (
                getattr(module, "activation_fake_quantizer", None),  # embeddings have none
                module.weight_fake_quantizer,
            )
            for quantizer in quantizers:
                if quantizer is not None:
                    quantizer.enabled = enabled
            count += 1
    return count


def _freeze_quantizer(quantizer: Any, scale: Tensor | None = None, zero_point: Tensor | None = None) -> None:
    config = copy.copy(quantizer.config)  # layers may share one config object
    config.is_dynamic = False  # keep the scales instead of computing them from each forward's weights
    config.range_learning = True  # torchao's convert then quantizes with these scales, not fresh ones
    quantizer.config = config
    scale = scale if scale is not None else quantizer.scale.detach().clone()
    if zero_point is None:
        zero_point = quantizer.zero_point.detach().clone()
    # Buffers, not parameters: they belong in the checkpoint, but not in the optimizer (whose
    # parameter groups were built before the freeze, and must match on resume).
    for attr, value in (("scale", scale), ("zero_point", zero_point)):
        if attr in quantizer._buffers:
            quantizer._buffers[attr] = value
        else:
            delattr(quantizer, attr)
            quantizer.register_buffer(attr, value)


def _weight_quantizers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Any]]:
    """Each fake-quantized linear of ``model`` with a weight fake quantizer: its name, itself and that quantizer."""
    cls = _fake_quantized_linear()
    for name, module in model.named_modules():
        if isinstance(module, cls) and module.weight_fake_quantizer is not None:
            yield name, module, module.weight_fake_quantizer


@torch.no_grad()
def _compute_ranges(quantizer: Any, weight: Any) -> None:
    """Set ``quantizer.scale`` and ``zero_point`` to the ranges torchao computes from ``weight`` as it is now
    (the quantizer run once with a copy of its config whose ranges follow the weights, on even when it is
    off); a sharded (FSDP2) weight is gathered whole first, since the ranges are held whole on every rank."""
    weight = weight.detach()
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    config, enabled = quantizer.config, quantizer.enabled
    live = copy.copy(config)
    live.is_dynamic, live.range_learning = True, False
    quantizer.config, quantizer.enabled = live, True
    try:
        quantizer(weight)
    finally:
        quantizer.config, quantizer.enabled = config, enabled


def freeze_weight_ranges(model: nn.Module) -> int:
    """Fix each prepared layer's weight scales (and zero points) at their current values; return how many.

    The weights keep training, but are fake-quantized with the frozen ranges from now on, and
    :func:`convert_qat` quantizes them with those same ranges. The scales and zero points become
    buffers (``weight_fake_quantizer.scale`` in the ``state_dict``). The ranges are those of the last
    forward pass; a layer that has not run one since it was prepared gets those of its current weights.
    """
    count = 0
    for _, module, quantizer in _weight_quantizers(model):
        if quantizer.config.range_learning:
            continue
        if quantizer.scale is None:
            _compute_ranges(quantizer, module.weight)
        _freeze_quantizer(quantizer)
        count += 1
    return count


def refresh_weight_ranges(model: nn.Module) -> int:
    """Recompute each frozen layer's weight ranges from its current weights, and keep them fixed again.

    The ranges are those a fake quantizer with ranges that follow the weights computes (torchao's), so
    the weights snap onto grids that fit them as they are now; the weights keep training under these
    ranges until the next refresh, and :func:`convert_qat` uses the last ones. A sharded (FSDP2) weight is
    gathered whole first: the ranges are buffers every rank holds whole. Layers whose ranges are not
    frozen are left alone; return how many were refreshed.
    """
    count = 0
    for _, module, quantizer in _weight_quantizers(model):
        if not quantizer.config.range_learning or "scale" not in quantizer._buffers:
            continue
        _compute_ranges(quantizer, module.weight)
        _freeze_quantizer(quantizer)
        count += 1
    return count


def freeze_ranges_from_state(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> int:
    """Freeze the layers whose frozen weight scales a checkpoint holds, so the checkpoint loads into them."""
    count = 0
    for name, module, quantizer in _weight_quantizers(model):
        key = f"{prefix}{name}.weight_fake_quantizer."
        if key + "scale" in state_dict and not quantizer.config.range_learning:
            device: torch.device = module.weight.device  # type: ignore[assignment]  # a checkpoint is read onto the CPU; the layer may be on a GPU
            scale = state_dict[key + "scale"].detach().to(device, copy=True)
            zero = state_dict.get(key + "zero_point")  # absent for symmetric schemes: zeros
            zero = (
                zero.detach().to(device, copy=True)
                if isinstance(zero, Tensor)
                else torch.zeros(scale.shape, dtype=quantizer.config.zero_point_precision, device=device)
            )
            _freeze_quantizer(quantizer, scale, zero)
            count += 1
    return count


def convert_qat(model: nn.Module, scheme: str, *, group_size: int = 32) -> int:
    """Replace the fake-quantized layers with really quantized ones, in place; return how many.

    ``"int8_dynamic_int8_weight"`` layers get ``Int8Tensor`` weights, which run int8 kernels (see the
    module's docstring for how closely they follow fake quantization); frozen weight ranges are kept.
    The other schemes go through torchao's ``QATConfig(step="convert")``. Fake-quantized embedding
    tables become int8 tables (``IntxUnpackedToInt8Tensor``, one scale per row), whose lookups return
    exactly the fake-quantized rows.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    linear_cls, embedding_cls = _fake_quantized()
    tables = sum(isinstance(m, embedding_cls) for m in model.modules())
    count = sum(isinstance(m, linear_cls) for m in model.modules())
    with _keeping_hooks(model):
        if tables:
            quantize_(
                model,
                QATConfig(embedding_int8_config(), step="convert"),
                filter_fn=lambda m, fqn: isinstance(m, embedding_cls),
            )
        if count and scheme == "int8_dynamic_int8_weight":
            _convert_to_int8_kernels(model)
        elif count:
            quantize_(model, QATConfig(qat_base_config(scheme, group_size), step="convert"))
    return count + tables


@torch.no_grad()
def _convert_to_int8_kernels(model: nn.Module) -> None:
    from torchao.quantization import MappingType
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs

    cls = _fake_quantized_linear()
    targets = [name for name, m in model.named_modules() if isinstance(m, cls)]
    for name in targets:
        prepared: Any = model.get_submodule(name)
        quantizer: Any = prepared.weight_fake_quantizer
        linear = prepared.to_linear()
        frozen = quantizer is not None and quantizer.config.range_learning
        # A frozen range is the fake quantizer's scale, one per output row, shaped as the weight is.
        scale = quantizer.scale.detach().reshape(-1, 1).to(torch.float32) if frozen else None
        weight = Int8Tensor.from_hp(
            linear.weight.detach(),
            PerRow(),
            scale=scale,
            act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=MappingType.SYMMETRIC),
        )
        linear.weight = nn.Parameter(weight, requires_grad=False)
        replace_module(model, name, linear)


def unprepare_qat(model: nn.Module) -> int:
    """Swap fake-quantized layers back to plain ``nn.Linear`` / ``nn.Embedding`` (same weights), in place;
    return how many."""
    linear_cls, embedding_cls = _fake_quantized()
    targets = [name for name, m in model.named_modules() if isinstance(m, (linear_cls, embedding_cls))]
    with _keeping_hooks(model):
        _swap_back(model, targets, linear_cls)
    return len(targets)


def _swap_back(model: nn.Module, targets: list[str], linear_cls: type[nn.Module]) -> None:
    for name in targets:
        prepared: Any = model.get_submodule(name)
        is_linear = isinstance(prepared, linear_cls)  # (a separate test: it would narrow `prepared` for mypy)
        replace_module(model, name, prepared.to_linear() if is_linear else prepared.to_embedding())


@torch.no_grad()
def dequantize_linears(model: nn.Module) -> int:
    """Give converted linears (and embedding tables) plain float weights again (their dequantized
    values); return how many."""
    count = 0
    for module in model.modules():
        if _quantized(module):
            weight: Any = module.weight
            module.weight = nn.Parameter(weight.dequantize().to(torch.float32).contiguous())
            count += 1
    return count
