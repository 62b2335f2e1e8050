"""Structured pruning with real channel removal, through Torch-Pruning's DepGraph.

While training, a removed output channel is only masked. DepGraph finds every parameter coupled to
that channel (the layer's bias, the BatchNorm after it, the next layer's input columns), and
:func:`coupled_channel_masks` masks them all, so the masked model computes exactly what the
slimmed one will. At the end, :func:`slim_model` removes those channels for real.

The slimmed architecture is recorded as plain data (:func:`record_architecture`), kept in the
checkpoint, and :func:`rebuild_architecture` reshapes a fresh, unpruned instance of the model to
it, so the checkpoint loads with ``torch.load(weights_only=True)`` and no pickled modules.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

# Imported inside the functions that use them: torch_pruning (only for structured pruning with slimming).

log = logging.getLogger(__name__)

__all__ = [
    "build_dependency_graph",
    "coupled_channel_masks",
    "slim_model",
    "record_architecture",
    "rebuild_architecture",
    "pruned_channels",
    "output_layers",
    "declared_channel_layers",
]

_OUT = "prune_out_channels"
_IN = "prune_in_channels"
_SHAPE_ATTRS = ("in_channels", "out_channels", "in_features", "out_features", "num_features", "normalized_shape")


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("Structured slimming needs torch-pruning: pip install torch-pruning") from err
    return torch_pruning


def build_dependency_graph(model: nn.Module, example_inputs: Any) -> Any:
    """Trace ``model`` on ``example_inputs`` into a DepGraph, in eval mode so BatchNorm stats stay put."""
    tp = _tp()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        model.train(was_training)


def declared_channel_layers(model: nn.Module) -> list[str] | None:
    """The layers whose output channels ``model``'s modules declare safe to remove, as module-name patterns.

    A module may set ``channel_pruning_layers``: ``fnmatch`` patterns, relative to itself, of layers whose
    output channels can be removed whole. DepGraph follows channels through the layers' weights, not
    through a reshape into attention heads: it couples a BERT layer's query, key and value outputs
    channel by channel, and removing one channel there would move the others between heads. So a
    transformer declares its feed-forward hidden units (``SentenceEncoder`` declares
    ``model.encoder.layer.*.intermediate.dense``), each coupled only to the next layer's input column.
    ``None`` when no module declares any.
    """
    patterns = [
        f"{name}.{pattern}" if name else pattern
        for name, module in model.named_modules()
        for pattern in getattr(module, "channel_pruning_layers", ()) or ()
    ]
    return patterns or None


def _out_fn(tp: Any, module: nn.Module) -> Any:
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def pruned_channels(mask: Tensor) -> list[int]:
    """Output channels (rows) of a weight mask that are entirely masked out."""
    return torch.nonzero(~mask.flatten(1).any(dim=1)).flatten().tolist()


def _group_items(graph: Any, module: nn.Module, idxs: list[int]) -> list[tuple[nn.Module, str, list[int]]]:
    tp = _tp()
    group = graph.get_pruning_group(module, _out_fn(tp, module), idxs=idxs)
    items = []
    for dep, dep_idxs in group:
        target = dep.target.module
        handler = getattr(dep.handler, "__name__", "")
        if isinstance(target, nn.Module) and any(True for _ in target.parameters(recurse=False)):
            items.append((target, handler, [int(i) for i in dep_idxs]))
    return items


def coupled_channel_masks(model: nn.Module, graph: Any, channel_masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Parameter masks for every parameter coupled to the masked-out channels.

    Args:
        model: the model the graph was built on.
        graph: its DepGraph.
        channel_masks: weight masks of the pruned layers, by parameter name (``"net.conv.weight"``).

    Returns:
        Boolean masks by parameter name: the weights themselves, their biases, the coupled
        normalization layers and the input columns of the layers that consume them.

    Raises:
        ValueError: when a coupled layer is of a kind this masking does not handle.
    """
    names = {m: n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}
    touched: set[str] = set()
    for weight_name, mask in channel_masks.items():
        module = model.get_submodule(weight_name.rsplit(".", 1)[0])
        idxs = pruned_channels(mask)
        if not idxs:
            continue
        for target, handler, dep_idxs in _group_items(graph, module, idxs):
            prefix = names[target]
            index = torch.tensor(dep_idxs, dtype=torch.long)
            for pname, p in target.named_parameters(recurse=False):
                full = f"{prefix}.{pname}" if prefix else pname
                if handler == _IN and p.dim() == 1:
                    continue  # biases follow the output channels, not the inputs
                if handler == _OUT:
                    masks[full].index_fill_(0, index.to(p.device), False)
                elif handler == _IN and isinstance(target, (nn.Linear, nn.modules.conv._ConvNd)):
                    if getattr(target, "groups", 1) != 1:
                        raise ValueError(f"Structured masking does not handle grouped convolution {prefix!r}.")
                    masks[full].index_fill_(1, index.to(p.device), False)
                else:
                    raise ValueError(
                        f"Structured masking does not handle {type(target).__name__} {prefix!r} ({handler})."
                    )
                touched.add(full)
    return {name: masks[name] for name in sorted(touched)}


def output_layers(model: nn.Module, graph: Any, layer_names: list[str]) -> list[str]:
    """The layers among ``layer_names`` whose output channels feed no other layer: the model's outputs.

    Removing their channels would remove outputs (classes), so structured pruning must skip them.
    """
    outputs = []
    for name in layer_names:
        items = _group_items(graph, model.get_submodule(name), [0])
        if not any(handler == _IN for _, handler, _ in items):
            outputs.append(name)
    return outputs


def slim_model(model: nn.Module, graph: Any, channel_masks: Mapping[str, Tensor]) -> dict[str, int]:
    """Remove the masked-out output channels of each layer, and everything coupled to them.

    Returns:
        Channels removed, by layer name.
    """
    tp = _tp()
    removed: dict[str, int] = {}
    for weight_name, mask in channel_masks.items():
        layer = weight_name.rsplit(".", 1)[0]
        module = model.get_submodule(layer)
        idxs = pruned_channels(mask)
        if not idxs:
            continue
        group = graph.get_pruning_group(module, _out_fn(tp, module), idxs=idxs)
        if not graph.check_pruning_group(group):
            raise RuntimeError(f"Torch-Pruning refused to remove {len(idxs)} channels of {layer!r}.")
        group.prune()
        removed[layer] = len(idxs)
    return removed


def record_architecture(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain-data shapes of every parameter and buffer, and the size attributes of each module."""
    record: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        tensors = {n: list(t.shape) for n, t in module.named_parameters(recurse=False)}
        tensors.update({n: list(t.shape) for n, t in module.named_buffers(recurse=False) if t is not None})
        if not tensors:
            continue
        attrs = {a: getattr(module, a) for a in _SHAPE_ATTRS if isinstance(getattr(module, a, None), (int, tuple))}
        record[name] = {
            "tensors": tensors,
            "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()},
        }
    return record


def _invalid_record(detail: str) -> ValueError:
    return ValueError(f"The recorded (slimmed) architecture is not valid: {detail}")


def _checked_dims(label: str, value: Any, current: tuple[int, ...] | list[int]) -> list[int]:
    """``value`` as a list of ints of ``current``'s length, each in [0, the current size]: slimming only removes."""
    if not isinstance(value, (list, tuple)) or len(value) != len(current):
        raise _invalid_record(f"{label}={value!r} must be {len(current)} sizes (the model has {list(current)}).")
    for v, c in zip(value, current):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= c:
            raise _invalid_record(f"{label}={list(value)!r} must be sizes no larger than the model's {list(current)}.")
    return list(value)


@torch.no_grad()
def rebuild_architecture(
    model: nn.Module, record: Mapping[str, Mapping[str, Any]], state_dict: Mapping[str, Tensor] | None = None
) -> nn.Module:
    """Reshape a fresh instance of the model to a recorded (slimmed) architecture, in place.

    Parameters and buffers get new, uninitialized storage of the recorded shapes, so load the
    slimmed ``state_dict`` right after. The record comes from a file, so it is held to what
    slimming can produce: it names only modules, parameters and buffers the model has, and size
    attributes from a fixed list (``in_features``, ``out_channels``, ...); every size is at most the
    model's own (channels are only ever removed). With ``state_dict``, each recorded shape must also
    be the shape of the tensor the file holds for it, so nothing is allocated that the file does not
    fill.

    Raises:
        ValueError: when the record names a module the model lacks, an attribute or tensor outside
            that list, a size larger than the model's, or a shape the ``state_dict`` disagrees with.
    """
    if not isinstance(record, Mapping):
        raise _invalid_record(f"expected a mapping of module names, got {type(record).__name__}.")
    changes: list[tuple[nn.Module, str, list[int] | None, str, Any]] = []
    for name, entry in record.items():
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError as err:
            raise ValueError(f"The recorded architecture has a module {name!r} that this model lacks.") from err
        if not isinstance(entry, Mapping) or not isinstance(entry.get("tensors", {}), Mapping):
            raise _invalid_record(f"the entry of {name!r} is not a mapping with `tensors`.")
        for attr, value in (entry.get("attrs") or {}).items():
            if attr not in _SHAPE_ATTRS or not hasattr(module, attr):
                raise _invalid_record(
                    f"{name!r} sets attribute {attr!r}; only size attributes are restored: {', '.join(_SHAPE_ATTRS)}."
                )
            current = getattr(module, attr)
            if isinstance(current, int) and not isinstance(current, bool):
                dims = _checked_dims(f"{name}.{attr}", [value], [current])
                changes.append((module, attr, None, "attr", dims[0]))
            elif isinstance(current, tuple):
                changes.append((module, attr, None, "attr", tuple(_checked_dims(f"{name}.{attr}", value, current))))
            else:
                raise _invalid_record(f"{name}.{attr} is not a size on this model.")
        for tname, shape in entry["tensors"].items():
            if tname not in module._parameters and tname not in module._buffers:
                raise _invalid_record(f"{name!r} has no parameter or buffer {tname!r}.")
            old = getattr(module, tname)
            if old is None:
                raise _invalid_record(f"{name}.{tname} is empty on this model.")
            key = f"{name}.{tname}" if name else tname
            dims = _checked_dims(key, shape, list(old.shape))
            if state_dict is not None and tname not in module._non_persistent_buffers_set:
                held = state_dict.get(key)
                if held is None or list(held.shape) != dims:
                    found = "no such tensor" if held is None else f"a tensor of shape {list(held.shape)}"
                    raise _invalid_record(f"{key} is recorded as {dims}, but the weights hold {found}.")
            changes.append((module, tname, dims, "tensor", old))
    for module, attr, shape, kind, value in changes:  # nothing changes unless the whole record is valid
        if kind == "attr":
            setattr(module, attr, value)
        elif shape is not None and list(value.shape) != shape:
            new = torch.empty(shape, dtype=value.dtype, device=value.device)
            if isinstance(value, nn.Parameter):
                setattr(module, attr, nn.Parameter(new, requires_grad=value.requires_grad))
            else:
                module.register_buffer(attr, new)
    return model


def slimmed_architecture(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The architecture a ``Pruning(slim=True)`` callback recorded in a Lightning checkpoint, or ``None``."""
    records = [
        state["slimmed_architecture"]
        for key, state in (checkpoint.get("callbacks") or {}).items()
        if str(key).startswith("Pruning") and isinstance(state, dict) and state.get("slimmed_architecture")
    ]
    return records[-1] if records else None


def load_slimmed_checkpoint(model: nn.Module, checkpoint_path: str | Any, *, strict: bool = True) -> nn.Module:
    """Load a Lightning checkpoint of a slimmed model into a fresh, unpruned instance of it.

    The checkpoint is read with ``torch.load(weights_only=True)``; the architecture comes from the
    ``Pruning`` callback's state in it (``slimmed_architecture``).

    Example:
        >>> model = Classifier(DigitsCNN())  # doctest: +SKIP
        >>> load_slimmed_checkpoint(model, "slim.ckpt")  # doctest: +SKIP

    Raises:
        ValueError: when the checkpoint holds no slimmed architecture.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    record = slimmed_architecture(checkpoint)
    if record is None:
        raise ValueError(
            f"{checkpoint_path!s} holds no slimmed architecture: it was not saved after a Pruning callback "
            "with `slim=True` removed channels. Load it with `load_state_dict` instead."
        )
    rebuild_architecture(model, record, checkpoint["state_dict"])
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model
