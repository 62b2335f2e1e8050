"""Dynamic int8 quantization through torchao ``quantize_``, and the SQNR to check it by.

Linear layers get int8 weights (per channel) and int8 activations quantized on the fly per token
(``Int8DynamicActivationInt8WeightConfig``). Embedding tables can get int8 weights too
(``IntxWeightOnlyConfig``, per row): in a model like all-MiniLM-L6-v2 about 53% of the parameters
are the word embeddings, so quantizing only the linears cannot shrink it much.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64))
    >>> quantize_dynamic_int8(net)
    ['0']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_quantum._modules import select_parameters
from lightning_quantum.quantization.schemes import embedding_int8_config

# Imported inside the functions that use them: torchao (slow to import; on a CPU-only machine it
# prints warnings about its CUDA kernels).

log = logging.getLogger(__name__)

__all__ = ["quantize_dynamic_int8", "sqnr_db"]


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio, ``20 log10(||ref|| / ||ref - approx||)``, in dB."""
    reference = reference.detach().float()
    noise = (reference - approximation.detach().float()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(reference.norm() / noise))


def quantize_dynamic_int8(
    model: nn.Module,
    *,
    embeddings: bool = False,
    names: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> list[str]:
    """Quantize linears (and optionally embeddings) of ``model`` to int8 in place; return their names.

    Args:
        model: the model to change.
        embeddings: also give ``nn.Embedding`` tables int8 weights (per row).
        names: ``fnmatch`` patterns of the modules to quantize; all when ``None``.
        ignore: ``fnmatch`` patterns of modules to keep in full precision.

    Raises:
        ValueError: when nothing matches, with what was searched.
    """
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    types = ["Linear", "Embedding"] if embeddings else ["Linear"]
    chosen = select_parameters(model, module_types=types, names=names, ignore=ignore, purpose="quantize")
    linears = {n for n, m in chosen.items() if isinstance(m, nn.Linear)}
    tables = {n for n, m in chosen.items() if isinstance(m, nn.Embedding)}
    if linears:
        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in linears)
    if tables:
        quantize_(
            model,
            embedding_int8_config(),
            filter_fn=lambda m, fqn: fqn in tables,
        )
    return sorted(chosen)
