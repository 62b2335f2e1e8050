"""ONNX Runtime as a deployment runner: a model exported to ONNX and run by an ``InferenceSession``.

The model is exported by ``torch.onnx.export``'s TorchScript exporter (``dynamo=False``), every
dimension of every input dynamic, and the file is checked: ONNX Runtime runs it on one sample of the
batch, and its outputs must match the model's. Where that fails (a model the tracer cannot follow, or
an exporter a later torch no longer ships), the ``torch.export``-based exporter (``dynamo=True``, every
dimension ``Dim.AUTO``) is used instead. The TorchScript exporter is deprecated, and still chosen first,
on purpose: on this project's 2-core CPU it exports the DigitsMLP in 0.02 s against 1.5 s (most of a
first run's deployment gate, which builds the ONNX Runtime forms), the 3-layer MiniLM student in 0.7 s
against 5.4 s, and ONNX Runtime runs its graph of that student faster (fp32 62 against 73 ms, int8 29
against 33 ms at batch 32, interleaved): ``export_onnx(exporter=...)`` chooses. ``int8`` is ONNX Runtime's own dynamic
quantization (``onnxruntime.quantization.quantize_dynamic``, after its recommended pre-processing):
int8 weights per output channel, because per tensor loses more on a sentence encoder (held-out cosine
to the teacher 0.893 against 0.903 for all-MiniLM's 3-layer student, at about the same speed:
``benchmarks/peers.py``), and uint8 activations quantized per call with one scale for the whole
input. A sample's output then depends a little on the other samples of its batch, so accuracy is
measured at the batch size the form is timed at.

The optional dependencies (``onnx``, ``onnxruntime``, ``onnxscript`` for the exporter) come with the
``onnx`` extra: ``pip install 'lightning-quantum[onnx]'``. Without them the ONNX Runtime forms of the
:mod:`~lightning_quantum.deployment` gate are listed as not installed, and nothing else changes.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    >>> ort_net = to_onnxruntime(net, torch.randn(2, 8))  # doctest: +SKIP
    >>> ort_net(torch.randn(5, 8)).shape  # doctest: +SKIP
    torch.Size([5, 4])
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import Tensor, nn

from lightning_quantum._modules import eval_mode
from lightning_quantum._validation import check_choice
from lightning_quantum.compiled import int8_products_saturate

# Imported inside the functions that use them: onnx and onnxruntime (optional: the `onnx` extra).

__all__ = [
    "EXPORTERS",
    "OnnxRuntimeModule",
    "export_onnx",
    "onnxruntime_available",
    "to_onnxruntime",
    "load_onnxruntime",
]

log = logging.getLogger(__name__)


class _DropOnnxRuntimeInfo(logging.Filter):
    """Drops ONNX Runtime's own records below WARNING (its quantization logs to the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}onnxruntime{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_onnx_logs() -> Iterator[None]:
    """Keep the ONNX tools' progress logs out of the user's log while they run.

    ``torch.onnx`` logs errors only. The dynamo exporter's passes (``onnx_ir``, ``onnxscript``) log each
    rewrite at INFO, hundreds of lines for a small LM: their warnings and errors show, unless the user set
    their level. ONNX Runtime's quantization logs a line per tensor to the root logger: its records below
    WARNING are dropped."""
    levels = {"torch.onnx": logging.ERROR, "onnx_ir": logging.WARNING, "onnxscript": logging.WARNING}
    loggers = {name: logging.getLogger(name) for name in levels}
    previous = {name: logger.level for name, logger in loggers.items()}
    root_filter = _DropOnnxRuntimeInfo()
    logging.getLogger().addFilter(root_filter)
    try:
        for name, logger in loggers.items():
            if name == "torch.onnx" or logger.level == logging.NOTSET:  # a level the user set stays
                logger.setLevel(levels[name])
        yield
    finally:
        logging.getLogger().removeFilter(root_filter)
        for name, logger in loggers.items():
            logger.setLevel(previous[name])


_INSTALL = "pip install 'lightning-quantum[onnx]'"


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime``, ``onnx`` and ``onnxscript`` (for the exporter) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def _require() -> None:
    if not onnxruntime_available():
        raise ImportError(f"ONNX Runtime forms need onnxruntime, onnx and onnxscript: {_INSTALL}")


class OnnxRuntimeModule(nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU, called like the module it was exported from.

    Positional inputs go to the graph's inputs in order, keyword inputs by name; tensors in, tensors
    out (one output as a tensor, several as a tuple). The ONNX bytes are held as a ``uint8`` buffer, so
    the module's size is its file's, and a copy (``copy.deepcopy``) opens a session of its own.

    Args:
        model_bytes: the serialized ONNX model.
        num_threads: ONNX Runtime's intra-op threads; torch's current setting when ``None``.
        num_parameters: the parameter count of the model it was exported from (for the report); when
            0, the values stored in the file's initializers.
    """

    onnx_model: Tensor
    _session: Any  # onnxruntime.InferenceSession
    _input_names: list[str]

    def __init__(self, model_bytes: bytes, num_threads: int | None = None, num_parameters: int = 0) -> None:
        _require()
        super().__init__()
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8))
        self.num_threads = num_threads or torch.get_num_threads()
        self.num_parameters = num_parameters or _initializer_count(model_bytes)
        self._open()

    def _open(self) -> None:
        import onnxruntime  # optional: the onnx extra

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.log_severity_level = 3  # errors only
        # No busy-waiting between calls: ONNX Runtime's spinning threads would otherwise keep the cores
        # busy after a call, slowing whatever torch runs next (measured: an eager int8 model timed after
        # it went from 1.3 to 5.1 ms on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(self.model_bytes(), options, providers=["CPUExecutionProvider"])
        object.__setattr__(self, "_session", session)  # not state: rebuilt from the bytes
        object.__setattr__(self, "_input_names", [i.name for i in session.get_inputs()])

    def model_bytes(self) -> bytes:
        """The ONNX model, as its file holds it."""
        return self.onnx_model.numpy().tobytes()

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self._input_names):
            raise ValueError(
                f"The ONNX model takes {len(self._input_names)} inputs {self._input_names}, not {len(args)}."
            )
        feeds = dict(zip(self._input_names, args))
        unknown = set(kwargs) - set(self._input_names)
        if unknown:
            raise ValueError(f"Unknown inputs {sorted(unknown)}: the ONNX model takes {self._input_names}.")
        feeds.update(kwargs)
        arrays = {name: _to_numpy(value) for name, value in feeds.items()}
        outputs = [torch.from_numpy(np.asarray(out)) for out in self._session.run(None, arrays)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_session", None)
        state.pop("_input_names", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._open()


def _initializer_count(model_bytes: bytes) -> int:
    """Values stored in the ONNX model's initializers (weights, and the scales of an int8 model)."""
    import onnx  # optional: the onnx extra

    graph = onnx.load_from_string(model_bytes).graph
    return sum(int(np.prod(t.dims)) if t.dims else 1 for t in graph.initializer)


def _to_numpy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().contiguous().numpy()
    return value


def _dynamic_shapes(example: Any) -> Any:
    """``Dim.AUTO`` for every dimension of every tensor input: the exporter keeps dynamic what it can."""
    auto = torch.export.Dim.AUTO
    if isinstance(example, Tensor):
        return {i: auto for i in range(example.dim())}
    if isinstance(example, dict):
        return {k: _dynamic_shapes(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_dynamic_shapes(v) for v in example)
    return None


class _Keywords(nn.Module):
    """``model`` called with keyword inputs, taken in a fixed order as positional ones: torch 2.13's
    ``torch.export`` cannot give a ``forward(**kwargs)`` dynamic shapes ("Must provide a tree_name")."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: Any) -> Any:
        return self.model(**dict(zip(self.names, inputs)))


def _dynamic_shapes_by_name(model: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    """``torch.export``'s ``dynamic_shapes`` keyed by the names of ``forward``'s parameters: a positional
    spec would not match a ``forward(*args)`` (a LightningModule's, which takes its inputs as a tuple)."""
    signature = inspect.signature(model.forward)
    bound = signature.bind(*args)
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(_dynamic_shapes(v) for v in value)
        else:
            shapes[name] = _dynamic_shapes(value)
    return shapes


EXPORTERS = ("auto", "torchscript", "dynamo")


def export_onnx(model: nn.Module, example_inputs: Any, *, exporter: str = "auto") -> bytes:
    """``model`` (on the CPU, in eval mode) as ONNX bytes, every input dimension dynamic where it can be.

    ``example_inputs`` is one batch: a tensor, a tuple of positional inputs, or a dict of keywords.
    ``exporter``: ``"torchscript"`` (``dynamo=False``), ``"dynamo"`` (``torch.export``-based), or
    ``"auto"``: TorchScript when every input is a tensor and the file it writes runs in ONNX Runtime
    with the model's outputs on one sample of the batch, else dynamo (see the module's notes).

    Raises:
        ValueError: for an unknown ``exporter``.
    """
    check_choice("exporter", exporter, EXPORTERS)
    _require()
    names: list[str] | None = None
    if isinstance(example_inputs, dict):  # keyword inputs (a Hugging Face encoder's), named in the graph
        names = list(example_inputs)
        model, args = _Keywords(model, names), tuple(example_inputs.values())
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with eval_mode(model):
        if exporter != "dynamo" and all(isinstance(a, Tensor) for a in args):
            try:
                data = _export_torchscript(model, args, names)
                if exporter == "torchscript" or _runs_as_traced(model, args, data):
                    return data
            except Exception as error:  # noqa: BLE001 - the other exporter is tried
                if exporter == "torchscript":
                    raise
                log.info("ONNX: the TorchScript exporter failed (%s); using the dynamo exporter", _first_line(error))
        elif exporter == "torchscript":
            raise ValueError("`exporter`='torchscript' takes tensor inputs only; use 'dynamo' or 'auto'.")
        return _export_dynamo(model, args, names)


def _export_torchscript(model: nn.Module, args: tuple[Tensor, ...], names: list[str] | None) -> bytes:
    names = names or _positional_names(model, len(args))
    axes = {name: {d: f"{name}_{d}" for d in range(arg.dim())} for name, arg in zip(names, args)}
    # torch 2.13's TorchScript exporter turns its own log on for every export (`setup_onnx_logging` tests
    # the function `_jit_is_onnx_log_enabled` for truth, not its result), so a model it cannot export
    # prints its whole traced graph before the error: the fallback handles the error, without the dump.
    with (
        tempfile.TemporaryDirectory() as tmp,
        warnings.catch_warnings(),
        mock.patch.object(torch._C, "_jit_onnx_log", lambda *args: None),
    ):
        warnings.simplefilter("ignore")  # its deprecation notice and tracer warnings: the file is checked next
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, args, path, dynamo=False, input_names=names, dynamic_axes=axes, opset_version=17)
        return path.read_bytes()


def _positional_names(model: nn.Module, count: int) -> list[str]:
    """The names of ``forward``'s first ``count`` parameters (``x``), ``input_<i>`` past a ``*args``."""
    names: list[str] = []
    for parameter in inspect.signature(model.forward).parameters.values():
        if parameter.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    names = names[:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _runs_as_traced(model: nn.Module, args: tuple[Tensor, ...], data: bytes) -> bool:
    """Whether ONNX Runtime runs ``data`` on one sample of the batch with ``model``'s outputs, and token
    inputs (integer tensors of two or more dimensions: ids, masks) also on half their length: a tracer
    that baked the batch size, a sequence length or a branch into the graph fails this."""
    one = tuple(_one_sample(a) for a in args)
    with torch.inference_mode():
        expected = _flat_tensors(model(*one))
    try:
        got = _flat_tensors(OnnxRuntimeModule(data, num_threads=1)(*one))
    except Exception as error:  # noqa: BLE001 - not runnable: the caller exports again
        log.info("ONNX: the TorchScript export does not run in ONNX Runtime (%s)", _first_line(error))
        return False
    same = len(got) == len(expected) and all(
        g.shape == e.shape and torch.allclose(g.float(), e.float(), rtol=1e-3, atol=1e-4) for g, e in zip(got, expected)
    )
    if not same:
        log.info("ONNX: the TorchScript export's outputs differ from the model's")
    return same


def _one_sample(arg: Tensor) -> Tensor:
    if not arg.is_floating_point() and arg.dim() >= 2 and arg.shape[1] > 1:
        return arg[:1, : arg.shape[1] // 2]  # a shorter sequence too: the graph must not hold the length
    return arg[:1]


def _first_line(error: Exception) -> str:
    """An error's type and first line (a TorchScript error carries the whole traced graph)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _flat_tensors(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for o in outputs for t in _flat_tensors(o)]
    return []


def _export_dynamo(model: nn.Module, args: tuple[Any, ...], names: list[str] | None) -> bytes:
    shapes = _dynamic_shapes_by_name(model, args)
    with _quiet_onnx_logs():
        program = torch.onnx.export(
            model, args, input_names=names, dynamo=True, dynamic_shapes=shapes, verbose=False, report=False
        )
    assert program is not None  # the dynamo exporter always returns its program
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        program.save(str(path), external_data=False)
        return path.read_bytes()


def quantize_onnx_int8(model_bytes: bytes, *, per_channel: bool = True) -> bytes:
    """ONNX Runtime's dynamic int8 quantization of an ONNX model (pre-processed as its docs advise); with 7-bit
    weights on a CPU whose int8 products saturate (:func:`~lightning_quantum.compiled.int8_products_saturate`)."""
    _require()
    from onnxruntime.quantization import QuantType, quantize_dynamic  # optional: the onnx extra
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, quantized = (Path(tmp) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(model_bytes)
        # 7-bit weights where the CPU's u8 x s8 products saturate (no VNNI), as ONNX Runtime's docs advise: on a
        # 2-core AMD EPYC (Zen 3) the DigitsMLP's int8 outputs were 19.2 dB from the float ones, 37.9 dB with them
        reduce_range = int8_products_saturate()
        # symbolic shape inference cannot follow the exporter's dynamic sequence length (Min(512, s)):
        # the ONNX shape inference and graph optimization steps still run
        with _quiet_onnx_logs():
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(
                str(prepared),
                str(quantized),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=reduce_range,
            )
        return quantized.read_bytes()


def to_onnxruntime(
    model: nn.Module,
    example_inputs: Any,
    *,
    int8: bool = False,
    num_threads: int | None = None,
    exports: dict[str, bytes] | None = None,
) -> OnnxRuntimeModule:
    """Export ``model`` (float weights, on the CPU) to ONNX, optionally quantize it to int8 with ONNX
    Runtime, and open it in a session. ``model`` is left as it is.

    ``exports``, when given, keeps the float export under the key ``"float"``, and a later call with
    the same dict uses it instead of exporting again: pass it only for the same model and inputs.

    Raises:
        ImportError: when the ``onnx`` extra is not installed.
        ValueError: when the model is not on the CPU.
    """
    _require()
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices - {"cpu"}:
        raise ValueError(f"ONNX Runtime forms run on the CPU here; the model is on {sorted(devices)}.")
    data = exports.get("float") if exports is not None else None
    if data is None:
        data = export_onnx(model, example_inputs)
        if exports is not None:
            exports["float"] = data
    if int8:
        data = quantize_onnx_int8(data)
    return OnnxRuntimeModule(data, num_threads, num_parameters=sum(p.numel() for p in model.parameters()))


def load_onnxruntime(path: str | Path, num_threads: int | None = None) -> OnnxRuntimeModule:
    """Open an ONNX file in ONNX Runtime (an ONNX file is data, not code: nothing is unpickled)."""
    _require()
    return OnnxRuntimeModule(Path(path).read_bytes(), num_threads)
