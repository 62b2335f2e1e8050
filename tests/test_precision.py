import pytest

from lightning_quantum.precision import HardwareInfo, resolve_precision


@pytest.mark.parametrize(
    ("hardware", "accelerator", "expected"),
    [
        (HardwareInfo(cuda_available=True, cuda_capability=(9, 0), cuda_name="H100"), "auto", "bf16-mixed"),
        (HardwareInfo(cuda_available=True, cuda_capability=(8, 0), cuda_name="A100"), "gpu", "bf16-mixed"),
        (HardwareInfo(cuda_available=True, cuda_capability=(7, 5), cuda_name="T4"), "auto", "16-mixed"),
        (HardwareInfo(cuda_available=True, cuda_capability=(7, 0), cuda_name="V100"), "cuda", "16-mixed"),
        (HardwareInfo(cpu_flags=frozenset({"avx512f", "avx512_bf16"})), "auto", "bf16-mixed"),
        (HardwareInfo(cpu_flags=frozenset({"amx_bf16", "amx_tile"})), "cpu", "bf16-mixed"),
        (HardwareInfo(cpu_flags=frozenset({"avx2", "avx512f"})), "auto", "32-true"),
        (HardwareInfo(), "auto", "32-true"),
        # accelerator="cpu" applies the CPU rules even next to a GPU
        (HardwareInfo(cuda_available=True, cuda_capability=(7, 0), cpu_flags=frozenset()), "cpu", "32-true"),
    ],
)
def test_auto_precision_rules(hardware, accelerator, expected):
    decision = resolve_precision("auto", accelerator=accelerator, hardware=hardware)
    assert decision.precision == expected
    assert decision.reason


def test_reason_names_the_hardware():
    decision = resolve_precision(
        "auto", hardware=HardwareInfo(cuda_available=True, cuda_capability=(7, 5), cuda_name="T4")
    )
    assert "T4" in decision.reason and "7.5" in decision.reason and "GradScaler" in decision.reason
    decision = resolve_precision("auto", hardware=HardwareInfo(cpu_flags=frozenset({"avx512_bf16"})))
    assert "avx512_bf16" in decision.reason


@pytest.mark.parametrize(
    ("given", "expected"), [("32", "32-true"), (16, "16-mixed"), ("bf16", "bf16-mixed"), ("bf16-true", "bf16-true")]
)
def test_explicit_precision_and_aliases(given, expected):
    assert resolve_precision(given).precision == expected


def test_unknown_precision_names_argument_and_choices():
    with pytest.raises(ValueError, match=r"`precision`='fp8' is not valid\. Choose one of: 'auto', '32-true'"):
        resolve_precision("fp8")


def test_unknown_accelerator():
    with pytest.raises(ValueError, match=r"`accelerator`='tpu' is not valid.*'cpu'"):
        resolve_precision("auto", accelerator="tpu")


def test_this_machine_detection_runs():
    decision = resolve_precision("auto")
    assert decision.precision in {"bf16-mixed", "16-mixed", "32-true"}
