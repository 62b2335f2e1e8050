"""Quantization with torchao, as pure functions the callbacks call."""

from lightning_quantum.compiled import compile_for_inference
from lightning_quantum.quantization.dynamic import quantize_dynamic_int8, sqnr_db
from lightning_quantum.quantization.export import (
    export_program,
    export_torchscript,
    load_program,
    load_safetensors,
    save_safetensors,
)
from lightning_quantum.quantization.int4_kernel import Int4CpuLinear, pack_int4_for_cpu
from lightning_quantum.quantization.qat import (
    SymmetricPerTokenInt8,
    convert_qat,
    dequantize_linears,
    is_converted,
    is_prepared,
    prepare_qat,
    set_fake_quant_enabled,
)
from lightning_quantum.quantization.schemes import QAT_SCHEMES, qat_base_config
from lightning_quantum.quantization.static import quantize_static_int8, unobserved_modules
from lightning_quantum.quantization.weight_only import INT4_ALGORITHMS, quantize_weights_int4
from lightning_quantum.quantization.weights4bit import BNB_FORMATS, quantize_weights_bnb

__all__ = [
    "BNB_FORMATS",
    "INT4_ALGORITHMS",
    "Int4CpuLinear",
    "compile_for_inference",
    "QAT_SCHEMES",
    "convert_qat",
    "dequantize_linears",
    "export_program",
    "export_torchscript",
    "is_converted",
    "is_prepared",
    "load_program",
    "load_safetensors",
    "pack_int4_for_cpu",
    "prepare_qat",
    "SymmetricPerTokenInt8",
    "qat_base_config",
    "quantize_dynamic_int8",
    "set_fake_quant_enabled",
    "quantize_static_int8",
    "quantize_weights_bnb",
    "quantize_weights_int4",
    "save_safetensors",
    "sqnr_db",
    "unobserved_modules",
]
