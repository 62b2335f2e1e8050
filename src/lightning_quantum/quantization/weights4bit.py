"""4-bit (NF4, FP4) and LLM.int8 weights with bitsandbytes, on CPU (bitsandbytes >= 0.48) and CUDA.

Each chosen ``nn.Linear`` is swapped for ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt`` holding the
same weights; moving it to the device quantizes them. Sizes are what the ``state_dict`` really
holds: the packed 4-bit data plus the absmax scales and the quant-state entries (a 64-weight block
has one fp32 absmax, 4.5 bits a weight; double quantization stores the absmax in 8 bits, about 4.13).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(128, 64))
    >>> quantize_weights_bnb(net, "nf4")  # doctest: +SKIP
    ['0']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quantum._modules import replace_module, select_parameters
from lightning_quantum._validation import check_choice

# Imported inside the functions that use them: bitsandbytes (slow to import, and optional on a CPU).

log = logging.getLogger(__name__)

__all__ = ["BNB_FORMATS", "MIN_BITSANDBYTES", "import_bitsandbytes", "quantize_weights_bnb"]

#: bitsandbytes formats: NormalFloat4, FP4, and LLM.int8 (int8 weights, outliers in 16 bits).
BNB_FORMATS = ("nf4", "fp4", "int8")
#: The first bitsandbytes release whose 4-bit and int8 layers run on CPU.
MIN_BITSANDBYTES = (0, 48, 0)
_CPU_PACK_BLOCK = 32


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def import_bitsandbytes(device: torch.device) -> Any:
    """Import bitsandbytes, or say which package and version are needed.

    Raises:
        ImportError: when bitsandbytes is missing, or too old to run on ``device``.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError("4-bit and LLM.int8 weights need bitsandbytes: pip install 'bitsandbytes>=0.48'") from error
    if device.type == "cpu" and _version_tuple(bnb.__version__) < MIN_BITSANDBYTES:
        raise ImportError(
            f"bitsandbytes {bnb.__version__} has no CPU kernels; 4-bit and int8 on CPU need bitsandbytes >= "
            f"{'.'.join(map(str, MIN_BITSANDBYTES))}. Upgrade it, or run on a CUDA device."
        )
    return bnb


@torch.no_grad()
def quantize_weights_bnb(
    model: nn.Module,
    fmt: str = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    names: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    device: str | torch.device | None = None,
) -> list[str]:
    """Swap the chosen linears of ``model`` for bitsandbytes 4-bit or int8 layers, in place.

    Args:
        model: the model to change.
        fmt: ``"nf4"``, ``"fp4"`` or ``"int8"`` (LLM.int8 with the outlier threshold 6.0).
        double_quant: 4-bit only: quantize the absmax scales too (QLoRA's double quantization).
        compute_dtype: dtype of the matmuls of 4-bit layers; the weights' dtype when ``None``.
        names: ``fnmatch`` patterns of the linears to quantize; all when ``None``.
        ignore: ``fnmatch`` patterns of linears to keep (the classifier head, say).
        device: where the quantized layers live; the model's device when ``None``.

    Returns:
        The names of the layers swapped.

    Raises:
        ValueError: for an unknown format, CUDA asked for without CUDA, or nothing to quantize.
        ImportError: when bitsandbytes is missing or too old for the device.
    """
    check_choice("fmt", fmt, BNB_FORMATS)
    first = next(model.parameters(), None)
    target = (
        torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    )
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device`={str(target)!r} asks for CUDA, which this machine does not have. Use 'cpu'.")
    bnb = import_bitsandbytes(target)
    chosen = select_parameters(model, module_types=["Linear"], names=names, ignore=ignore, purpose="quantize")
    for name, module in chosen.items():
        linear: Any = module
        weight, bias = linear.weight.detach(), linear.bias
        if fmt == "int8":
            new = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=bias is not None, has_fp16_weights=False, threshold=6.0
            )
            new.weight = bnb.nn.Int8Params(weight.cpu().clone(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype or weight.dtype,
                compress_statistics=double_quant,
                quant_type=fmt,
            )
            new.weight = bnb.nn.Params4bit(
                weight.cpu().clone(), requires_grad=False, compress_statistics=double_quant, quant_type=fmt
            )
            if target.type == "cpu" and linear.out_features % _CPU_PACK_BLOCK:
                # bitsandbytes 0.50's packed CPU inference path (AVX512-BF16) asserts that the output
                # features divide into blocks of 32; a 10-class head would fail in eval mode.
                new.support_avx512bf16_for_cpu = False
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().cpu().clone(), requires_grad=False)
        replace_module(model, name, new.to(target))  # the move quantizes the weights
    log.info("bitsandbytes %s: %d linear layers", fmt, len(chosen))
    return sorted(chosen)


def load_prequantized_4bit(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Give each bitsandbytes 4-bit linear of ``model`` its saved packed weight and quantization state.

    ``state`` is a ``state_dict`` of a model quantized the same way (as safetensors holds it); the
    entries used are removed from it, and the rest (biases, float layers) is returned for
    ``load_state_dict``. Uses bitsandbytes' ``Params4bit.from_prequantized``.
    """
    state = dict(state)
    try:
        import bitsandbytes as bnb
    except ImportError:
        return state
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"The saved weights have no {key!r} for the 4-bit layer {name!r}.")
        stats = {k[len(key) + 1 :]: state.pop(k) for k in list(state) if k.startswith(key + ".")}
        module.weight = bnb.nn.Params4bit.from_prequantized(
            data=state.pop(key), quantized_stats=stats, requires_grad=False, device=module.weight.device, module=module
        )
    return state
