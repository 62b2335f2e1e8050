"""Batches as loaders yield them: split into inputs and targets, moved, measured, regrouped.

A neutral home below the measuring, training and serving modules, which all take batches apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["split_batch", "batch_indices"]


def _is_index(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dim() == 1 and not value.is_floating_point()


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """Split a batch into ``(inputs, targets)``.

    Layouts: a tensor, an ``(x, y)`` pair, an ``(x, y, index)`` triple (``index`` a 1-D integer tensor
    of sample indices, see :func:`batch_indices`), or a dict with ``x``, ``y`` (and ``index``).

    Raises:
        ValueError: for any other batch layout.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and (len(batch) == 2 or (len(batch) == 3 and _is_index(batch[2]))):
        return batch[0], batch[1]
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"], batch.get("y")
    raise ValueError(
        f"Cannot split a batch of type {type(batch).__name__} into inputs and targets. Valid layouts: a Tensor, "
        "an (inputs, targets) pair, an (inputs, targets, sample index) triple, or a dict with keys 'x' and 'y'."
    )


def batch_indices(batch: Any) -> Tensor | None:
    """The sample indices a batch carries (third element, or ``index`` key), or ``None``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3 and _is_index(batch[2]):
        return batch[2]
    if isinstance(batch, dict) and _is_index(batch.get("index")):
        return batch["index"]
    return None


def _to_device(inputs: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    if isinstance(inputs, Tensor):
        moved = inputs.to(device)
        return moved.to(dtype) if dtype is not None and moved.is_floating_point() else moved
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(x, device, dtype) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _to_device(v, device, dtype) for k, v in inputs.items()}
    return inputs


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _leading_dim(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, (tuple, list)) and inputs:
        return _leading_dim(inputs[0])
    if isinstance(inputs, dict) and inputs:
        return _leading_dim(next(iter(inputs.values())))
    raise ValueError(f"Cannot find the batch dimension of inputs of type {type(inputs).__name__}.")


def _concat(parts: list[Any], size: int) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)[:size]
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts], size) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts], size) for k in first}
    raise ValueError(f"Cannot batch inputs of type {type(first).__name__}.")


def _fill(inputs: Any, size: int) -> Any:
    """``inputs`` filled up to ``size`` samples with repeats of its own (the extra outputs are dropped):
    a compiled model then sees one input shape, and does not compile again for a short last batch."""
    count = _leading_dim(inputs)
    if count >= size:
        return inputs
    with torch.inference_mode(False):  # a plain tensor like the loader's: an inference tensor fails Dynamo's guards
        return _concat([inputs] * (size // count + 1), size)


def _rebatch(batches: list[tuple[Any, ...]], size: int) -> list[tuple[Any, Tensor | None, int]]:
    """The samples of ``(inputs, targets, ...)`` batches regrouped in batches of ``size``, as ``(inputs,
    targets, count)``, the last one filled up with repeats of its samples (``count`` says how many are
    real; the outputs of the others are dropped): a compiled model then sees one input shape, and
    compiles once."""
    if not batches:
        return []
    inputs = _concat([b[0] for b in batches], sum(_leading_dim(b[0]) for b in batches))
    labelled = all(b[1] is not None for b in batches)
    targets = torch.cat([b[1] for b in batches]) if labelled else None  # type: ignore[misc]
    total = _leading_dim(inputs)
    out: list[tuple[Any, Tensor | None, int]] = []
    for start in range(0, total, size):
        chunk = _fill(_slice(inputs, start, min(start + size, total)), size)
        count = min(size, total - start)
        out.append((chunk, None if targets is None else targets[start : start + count], count))
    return out


def _slice(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_slice(x, start, stop) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _slice(v, start, stop) for k, v in inputs.items()}
    return inputs


def _gather_inputs(eval_data: Iterable[Any], batch_size: int) -> Any:
    parts: list[Any] = []
    count = 0
    for batch in eval_data:
        inputs, _ = split_batch(batch)
        parts.append(inputs)
        count += _leading_dim(inputs)
        if count >= batch_size:
            break
    if not parts:
        raise ValueError("`eval_data` yielded no batches, so there are no inputs to time.")
    if count < batch_size:
        # Fewer samples than asked: repeat them, timing still runs at the stated batch size.
        parts = parts * (batch_size // count + 1)
    return _concat(parts, batch_size)
