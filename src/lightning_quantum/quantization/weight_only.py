"""Weight-only int4 post-training quantization with torchao, for language models.

``quantize_weights_int4`` gives each ``nn.Linear`` int4 weights in groups of ``group_size`` along the
input (torchao ``IntxWeightOnlyConfig(torch.int4, PerGroup(group_size))``, stored as
``IntxUnpackedToInt8Tensor``) and, with ``embeddings``, each ``nn.Embedding`` int8 rows
(``PerAxis(0)``): the same numerics the int4 QAT scheme converts to, applied after training (PTQ).
Activations stay float. ``algorithm="hqq_scale_only"`` picks the scales with HQQ instead of the
plain min/max affine fit. On CPU in eager mode the weights are dequantized at each call, so the model
is smaller but not faster; the deployment gate measures what ships.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    >>> small = quantize_weights_int4(net)  # a copy; ``net`` keeps its float weights
"""

from __future__ import annotations

import copy

from torch import nn

from lightning_quantum._validation import check_choice, check_positive_int
from lightning_quantum.quantization.schemes import embedding_int8_config, int4_weight_only_config

# Imported inside the function that uses them: torchao's quantization API (slow to import).

__all__ = ["INT4_ALGORITHMS", "quantize_weights_int4"]

#: How the int4 scales and zero points are chosen: a min/max affine fit, or HQQ's (scale only).
INT4_ALGORITHMS = ("affine", "hqq_scale_only")


def quantize_weights_int4(
    model: nn.Module, *, group_size: int = 32, embeddings: bool = True, algorithm: str = "affine"
) -> nn.Module:
    """A copy of ``model`` with int4 linear weights in groups of ``group_size`` and, with ``embeddings``,
    int8 embedding rows.

    Raises:
        ValueError: for a ``group_size`` that is not a positive integer or does not divide a linear's
            input features (named), an unknown ``algorithm``, or a model with no ``nn.Linear``.
    """
    check_positive_int("group_size", group_size)
    check_choice("algorithm", algorithm, INT4_ALGORITHMS)
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize to int4.")
    for name, linear in linears.items():
        if linear.in_features % group_size:
            raise ValueError(
                f"`group_size`={group_size} does not divide the {linear.in_features} input features of {name!r}. "
                "Choose a divisor of every linear's input features (32 and 64 are usual)."
            )
    from torchao.quantization import quantize_

    out = copy.deepcopy(model).eval()
    quantize_(out, int4_weight_only_config(group_size, algorithm), filter_fn=lambda m, _: type(m) is nn.Linear)
    if embeddings:
        quantize_(out, embedding_int8_config(), filter_fn=lambda m, _: isinstance(m, nn.Embedding))
    return out
