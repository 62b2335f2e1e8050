"""Weight-only int4 post-training quantization with torchao, for language models.

``quantize_weights_int4`` gives each ``nn.Linear`` int4 weights in groups of ``group_size`` along the
input (torchao ``IntxWeightOnlyConfig(torch.int4, PerGroup(group_size))``, stored as
``IntxUnpackedToInt8Tensor``) and, with ``embeddings``, each ``nn.Embedding`` int8 rows
(``PerAxis(0)``): the same numerics the int4 QAT scheme converts to, applied after training (PTQ).
Activations stay float. ``algorithm="hqq_scale_only"`` picks the scales with HQQ instead of the
plain min/max affine fit; ``algorithm="gptq"`` keeps the min/max grids but chooses each weight's code by
GPTQ on calibration batches (:mod:`lightning_quantum.quantization.gptq`), which rounds so that each
layer's outputs on those batches stay close to the float layer's. On CPU in eager mode the weights are
dequantized at each call, so the model is smaller but not faster; the deployment gate measures what ships.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    >>> small = quantize_weights_int4(net)  # a copy; ``net`` keeps its float weights
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn

from lightning_quantum._validation import check_choice, check_positive_int
from lightning_quantum.quantization.gptq import gptq_round_prepared
from lightning_quantum.quantization.qat import convert_qat, prepare_qat, set_fake_quant_enabled
from lightning_quantum.quantization.schemes import embedding_int8_config, int4_weight_only_config

# Imported inside the function that uses them: torchao's quantization API (slow to import).

__all__ = ["INT4_ALGORITHMS", "quantize_weights_int4"]

#: How the int4 weights are chosen: a min/max affine fit, HQQ's scales, or min/max grids with GPTQ's rounding.
INT4_ALGORITHMS = ("affine", "hqq_scale_only", "gptq")


def quantize_weights_int4(
    model: nn.Module,
    *,
    group_size: int = 32,
    embeddings: bool = True,
    algorithm: str = "affine",
    calibration: Iterable[Any] | None = None,
    calibration_batches: int = 16,
) -> nn.Module:
    """A copy of ``model`` with int4 linear weights in groups of ``group_size`` and, with ``embeddings``,
    int8 embedding rows.

    ``calibration`` (loader batches; up to ``calibration_batches`` of them) is what GPTQ measures the
    layers' inputs on, and is given with ``algorithm="gptq"`` only.

    Raises:
        ValueError: for a ``group_size`` that is not a positive integer or does not divide a linear's
            input features (named), an unknown ``algorithm``, ``"gptq"`` without ``calibration`` (or
            ``calibration`` with another algorithm), or a model with no ``nn.Linear``.
    """
    check_positive_int("group_size", group_size)
    check_choice("algorithm", algorithm, INT4_ALGORITHMS)
    check_positive_int("calibration_batches", calibration_batches)
    if (algorithm == "gptq") != (calibration is not None):
        raise ValueError(
            f"`algorithm`={algorithm!r} with `calibration`={'given' if calibration is not None else None}: GPTQ "
            "needs calibration batches (a loader), and the other algorithms take none."
        )
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize to int4.")
    for name, linear in linears.items():
        if linear.in_features % group_size:
            raise ValueError(
                f"`group_size`={group_size} does not divide the {linear.in_features} input features of {name!r}. "
                "Choose a divisor of every linear's input features (32 and 64 are usual)."
            )
    out = copy.deepcopy(model).eval()
    if calibration is not None:
        prepare_qat(out, "int4_weight_only", group_size=group_size, embeddings=embeddings)
        set_fake_quant_enabled(out, True)
        gptq_round_prepared(out, calibration, max_batches=calibration_batches)
        convert_qat(out, "int4_weight_only", group_size=group_size)
        return out
    from torchao.quantization import quantize_

    quantize_(out, int4_weight_only_config(group_size, algorithm), filter_fn=lambda m, _: type(m) is nn.Linear)
    if embeddings:
        quantize_(out, embedding_int8_config(), filter_fn=lambda m, _: isinstance(m, nn.Embedding))
    return out
