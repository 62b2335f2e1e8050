"""Save and reload optimized models: safetensors (weights) and ``torch.export`` programs (``.pt2``).

Quantized torchao weights are tensor subclasses; they are flattened into plain tensors plus JSON
metadata with torchao's own safetensors support, whose loader rebuilds only an allow-list of
classes (no pickle anywhere). bitsandbytes layers keep plain tensors in their ``state_dict`` already.
TorchScript is offered only as a legacy option, for plain float models that trace cleanly;
Lightning is deprecating it.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_quantum._modules import drop_unused_tensors, owner_of
from lightning_quantum._tensors import is_quantized
from lightning_quantum.quantization.weights4bit import load_prequantized_4bit
from lightning_quantum.weights import read_safetensors

# Imported inside the functions that use them: torchao (slow to import).

log = logging.getLogger(__name__)

__all__ = [
    "safetensors_state",
    "save_safetensors",
    "load_safetensors",
    "export_program",
    "load_program",
    "export_torchscript",
]


def _storage_key(tensor: Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors one (tied weights): storage, offset, dtype and shape; ``None`` if unknown."""
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype, tuple(tensor.shape))
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage of its own
        return None


def tied_aliases(state: dict[str, Any]) -> dict[str, str]:
    """The names of ``state`` whose tensor is one already listed under an earlier name (tied weights),
    mapped to that earlier name: ``{"b.weight": "a.weight"}`` after ``b.weight = a.weight``."""
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = _storage_key(tensor) if isinstance(tensor, Tensor) and tensor.numel() else None
        if key is None:
            continue
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def safetensors_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    """The model's weights as plain, contiguous tensors (tied ones once), plus torchao metadata if any."""
    state = model.state_dict()
    metadata = None
    if any(is_quantized(t) for t in state.values()):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        state, metadata = flatten_tensor_state_dict(state)
    aliases = tied_aliases(state)
    tensors = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in state.items()
        if isinstance(tensor, Tensor) and name not in aliases
    }
    return tensors, metadata


def save_safetensors(model: nn.Module, path: str | Path) -> Path:
    """Write the model's weights to ``path`` (a ``.safetensors`` file); return the path."""
    tensors, metadata = safetensors_state(model)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def load_safetensors(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load weights written by :func:`save_safetensors` into ``model`` (quantized weights included).

    ``model`` is a fresh instance of the same architecture; quantized torchao weights replace its
    float parameters (``load_state_dict(assign=True)``). Tied weights were written once: the other
    names of a tied tensor are loaded through it, and stay tied.

    Raises:
        ValueError: for a truncated or corrupt file (named).
        RuntimeError: with ``strict``, for keys the file lacks or the model does not have.
    """
    tensors = read_safetensors(path)
    aliases = tied_aliases(model.state_dict())
    four_bit = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    if four_bit:  # bitsandbytes 4-bit layers take their packed weights and quantization state first
        result = model.load_state_dict(load_prequantized_4bit(model, tensors), strict=False)
        missing = [k for k in result.missing_keys if k.rsplit(".", 1)[0] not in four_bit and k not in aliases]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Loading {path}: missing keys {missing}, unexpected keys {result.unexpected_keys}.")
        return model
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assign = bool(metadata and any(isinstance(v, str) and '"_type"' in v for v in metadata.values()))
    state: dict[str, Any] = dict(tensors)
    if assign:
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
        state.update(leftover)
    if assign:  # assign=True puts the file's tensors in place as they are: on the model's devices first
        current = model.state_dict()
        state = {k: v.to(current[k].device) if k in current and isinstance(v, Tensor) else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not (k in aliases and aliases[k] in state)]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"Loading {path}: missing keys {missing}, unexpected keys {result.unexpected_keys}.")
    if assign:  # assign=True put new tensors in place of the loaded names: tie their aliases to them again
        for alias, name in aliases.items():
            if alias in state:
                continue
            setattr(*owner_of(model, alias), getattr(*owner_of(model, name)))
    return model


def export_program(
    model: nn.Module, example_inputs: tuple[Any, ...] | dict[str, Any], path: str | Path, *, dynamic_batch: bool = True
) -> Path:
    """``torch.export`` the model (eval mode) and save the program to ``path`` (``.pt2``).

    ``example_inputs`` is a tuple of positional inputs (the batch dimension is dynamic), or a dict of
    keyword inputs, as a Hugging Face model takes them (exported at these shapes).
    """
    program = trace_program(model, example_inputs, dynamic_batch=dynamic_batch)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_program(program, out)
    return out


def trace_program(
    model: nn.Module, example_inputs: tuple[Any, ...] | dict[str, Any], *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """The model's ``torch.export`` program, traced in eval mode, as :func:`export_program` saves it."""
    was_training = model.training
    model.eval()
    dynamic: Any = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    if isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
    else:
        args = tuple(example_inputs)
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            dynamic = tuple({0: batch} if isinstance(a, Tensor) and a.dim() > 0 else None for a in args)
            params = list(inspect.signature(model.forward).parameters.values())
            if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(*args): one entry
                dynamic = (dynamic,)
    try:
        return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic)
    finally:
        model.train(was_training)


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> None:
    """Save a program from :func:`trace_program`, noting that it was traced in eval mode (see :func:`load_program`)."""
    torch.export.save(program, path, extra_files={_MODE_FILE: "eval"})


#: An extra file in the ``.pt2`` archive that says the graph was traced in eval mode (dropout off, BatchNorm on
#: running statistics), so :func:`load_program` need not rewrite it into eval mode.
_MODE_FILE = "lightning_quantum_mode"


def load_program(path: str | Path) -> nn.Module:
    """Load a ``.pt2`` program written by :func:`export_program` as a callable module, in eval mode, without
    the program's dtype checks (``_assert_tensor_metadata``), which would keep a compiled int8 program off
    oneDNN's int8 kernels, and without computations and weights nothing uses (see :func:`_drop_unused_nodes`).

    ``.train()``/``.eval()`` work on it (torchao's ``allow_exported_model_train_eval``: only dropout
    and BatchNorm change), so code that switches modes around inference can take it.
    """
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops a static int8 graph holds)

    extra = {_MODE_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program_module(program, traced_in_eval=extra[_MODE_FILE] == "eval")


def program_module(program: torch.export.ExportedProgram, *, traced_in_eval: bool) -> nn.Module:
    """The callable module of a program, as :func:`load_program` returns it: the program traced by
    :func:`trace_program` (``traced_in_eval``) gives the module its saved file loads as."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR

    module = program.module()
    _drop_unused_nodes(module)
    if traced_in_eval:
        # Traced in eval mode: the graph already computes as eval() would make it. Saying so spares torchao's
        # pattern rewrite of dropout and BatchNorm, which traces its patterns anew (0.5 s, each time).
        setattr(module, _EXPORTED_TRAINING_ATTR, False)
    allow_exported_model_train_eval(module)
    module.eval()
    nn.Module.train(module, False)
    return module


def _drop_unused_nodes(module: nn.Module) -> None:
    """Remove what the program's graphs compute or fetch for nobody.

    - ``aten._assert_tensor_metadata`` checks (``torch.export`` records one for each ``.to``): they check
      dtypes the export already fixed, Inductor lowers them to nothing after its freezing passes
      (``remove_assert_ops``), and as extra users of the int8 matmuls they kept those passes from turning
      ``_int_mm`` into oneDNN's prepacked ``qlinear``: the MiniLM student's int8 program compiled ran 25.0 ms
      at batch 32 with them and 20.3 ms without them (the module it came from: 21.3 ms).
    - Computations nobody uses, and the weights only they read (a BERT's pooler under a sentence encoder's
      mean pooling), as torchao's rewrite into eval mode removed them: they stay in the file, but the loaded
      module, and so its measured size and time, leaves them out.
    """
    check = torch.ops.aten._assert_tensor_metadata.default
    changed = False
    for sub in module.modules():
        if isinstance(sub, torch.fx.GraphModule):
            unused = [n for n in sub.graph.find_nodes(op="call_function", target=check) if not n.users]
            for node in unused:
                sub.graph.erase_node(node)
            if sub.graph.eliminate_dead_code() or unused:  # dead pure ops go too
                sub.recompile()
                changed = True
    if changed and isinstance(module, torch.fx.GraphModule):
        # once, from the top: a tensor of a nested graph may be read by the graph above it
        drop_unused_tensors(module)


def export_torchscript(model: nn.Module, example_inputs: tuple[Any, ...], path: str | Path) -> Path:
    """Legacy: trace a plain float model to TorchScript.

    Raises:
        ValueError: for a model with quantized (tensor subclass) weights, which do not trace.
    """
    if any(is_quantized(t) for t in model.state_dict().values()):
        raise ValueError("TorchScript cannot trace quantized tensor weights; use export_program (.pt2) instead.")
    was_training = model.training
    model.eval()
    try:
        traced = torch.jit.trace(model, tuple(example_inputs))
    finally:
        model.train(was_training)
    out = Path(path)
    traced.save(str(out))
    return out
