import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lightning_quantum.compiled as compiled
from lightning_quantum.compiled import _load_marker, _remembering, compile_for_inference, freezing_pays
from lightning_quantum.models import DigitsMLP
from lightning_quantum.quantization.dynamic import quantize_dynamic_int8


class _Probe:
    """Stands in for Inductor's ``VecISA._probe_load``: counts its calls and answers ``loads``."""

    def __init__(self, loads: bool) -> None:
        self.loads = loads
        self.calls = 0

    def __call__(self, isa, library: str) -> bool:
        self.calls += 1
        return self.loads


@pytest.fixture
def library(tmp_path):
    """A file where Inductor's probe library would be."""
    path = tmp_path / "probe.so"
    path.write_bytes(b"\x7fELF")
    return path


def test_a_probe_load_that_passed_is_remembered_beside_its_library(library):
    original = _Probe(loads=True)
    probe = _remembering(original)
    assert probe(None, str(library)) is True
    assert original.calls == 1
    assert _load_marker(str(library)).exists()
    assert probe(None, str(library)) is True
    assert original.calls == 1  # answered from the marker
    # a library built again after the marker is probed again
    os.utime(library, (library.stat().st_atime, _load_marker(str(library)).stat().st_mtime + 10))
    assert probe(None, str(library)) is True
    assert original.calls == 2


def test_a_failed_probe_load_is_not_remembered(library):
    original = _Probe(loads=False)
    probe = _remembering(original)
    assert probe(None, str(library)) is False
    assert probe(None, str(library)) is False
    assert original.calls == 2
    assert not _load_marker(str(library)).exists()


def test_the_marker_names_this_host_python_and_torch(tmp_path, monkeypatch):
    library = str(tmp_path / "probe.so")
    here = _load_marker(library)
    assert here.parent == tmp_path and here.name.startswith("probe.so.loads-")
    monkeypatch.setattr("platform.node", lambda: "another-host")
    assert _load_marker(library) != here


@pytest.mark.slow
def test_a_second_process_checks_the_instruction_sets_without_loading_probes_in_children():
    """Inductor's own probe, twice in fresh processes: the second loads no probe library in a child process and
    picks the same instruction set (fails if torch stops calling ``VecISA._probe_load``, which the markers
    stand in for)."""
    script = textwrap.dedent(
        """
        import subprocess
        from torch._inductor import cpu_vec_isa
        from lightning_quantum.compiled import _check_cpu_isa

        loads = []  # the children that load a probe library (others ask the compiler its version)
        run = subprocess.run
        def counted(command, *args, **kwargs):
            loads.extend("LoadLibrary" in part for part in command)
            return run(command, *args, **kwargs)
        subprocess.run = counted
        _check_cpu_isa()
        subprocess.run = run
        print(sum(loads), cpu_vec_isa.pick_vec_isa())
        """
    )
    command = [sys.executable, "-c", script]
    first, second = (subprocess.run(command, capture_output=True, text=True, check=True).stdout for _ in range(2))
    first, second = first.split(maxsplit=1), second.split(maxsplit=1)
    assert second[0] == "0"
    assert second[1] == first[1]


class _GeluQuantizedPerRow(nn.Module):
    """A feed-forward layer's middle as a compiled int8 transformer computes it: the matmul's rows scaled back from
    their int8 range, GELU, then quantized per row (the GELU is read by the row's absolute maximum and by the
    rounding)."""

    def forward(self, x, low, high, bias):
        scale = torch.maximum(-low.clamp_max(0), high.clamp_min(0)).div(127.5).clamp_min(1e-7)
        h = nn.functional.gelu(x * scale + bias)
        step = h.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6) / 127
        return torch.round(h / step).clamp(-127, 127).to(torch.int8), step


def test_a_compiled_gelu_read_by_two_kernels_computes_its_erf_once():
    """With Inductor's default ``realize_opcount_threshold`` (30) the generated code computes ``erf`` twice, once
    for the maximum and once for the rounding; compile_for_inference keeps the GELU's result instead."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    x, low, high, bias = torch.randn(64, 256), -torch.rand(64, 1), torch.rand(64, 1), torch.randn(256)
    compiled = compile_for_inference(_GeluQuantizedPerRow())
    with torch.inference_mode():
        (values, step), code = run_and_get_code(compiled, x, low, high, bias)
        expected, expected_step = _GeluQuantizedPerRow()(x, low, high, bias)
    assert sum(c.count(".erf()") + c.count("std::erf(") for c in code) == 1
    torch.testing.assert_close(step, expected_step)
    assert (values.int() - expected.int()).abs().max() <= 1  # rounding of a value on a .5 boundary may differ


def _int8_mlp():
    torch.manual_seed(0)
    net = DigitsMLP(hidden=(64, 32), dropout=0.0).eval()
    quantize_dynamic_int8(net)
    return net


def test_freezing_is_measured_on_the_shapes_of_the_models_int8_linears(monkeypatch):
    monkeypatch.setattr(compiled, "int8_products_saturate", lambda: False)  # else nothing is timed
    net = _int8_mlp()
    assert compiled._int8_linear_shapes(net, torch.rand(8, 64)) == {(8, 64, 64): 1, (8, 64, 32): 1, (8, 32, 10): 1}
    tokens = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    quantize_dynamic_int8(tokens)
    shapes = compiled._int8_linear_shapes(tokens, (torch.rand(3, 5, 64),))
    assert shapes == {(15, 64, 16): 1, (15, 16, 16): 1}  # every leading dimension counts as rows
    freezing, reason = freezing_pays(net, torch.rand(8, 64), repeats=2)  # both kernels really run
    assert isinstance(freezing, bool) and "us in oneDNN's prepacked kernels" in reason
    for prepacked, unpacked, frozen in [(200.0, 120.0, False), (120.0, 200.0, True)]:
        monkeypatch.setattr(compiled, "_int8_kernel_times", lambda *a, t=(prepacked, unpacked): t)
        freezing, reason = freezing_pays(net, torch.rand(8, 64))
        assert freezing is frozen and reason.startswith("compiled with" if frozen else "compiled without freezing")
        assert f"{prepacked:.0f} us in oneDNN's prepacked kernels, {unpacked:.0f} us in `_int_mm`" in reason


def test_a_model_without_int8_linears_keeps_freezing():
    assert freezing_pays(nn.Sequential(nn.Linear(4, 4)), torch.rand(2, 4)) == (True, "freezing: no int8 linears")


def test_the_saturation_probe_answers_no_where_the_cpu_has_vnni():
    """oneDNN's u8 x s8 products saturate only without VNNI; where torch reports VNNI the probe must say so."""
    saturates = compiled.int8_products_saturate()
    assert isinstance(saturates, bool)
    if getattr(torch.cpu, "_is_vnni_supported", lambda: False)():
        assert not saturates


def test_int8_activations_compile_without_freezing_where_onednns_kernel_saturates(monkeypatch):
    """Where oneDNN's int8 linear saturates, a model with int8 activations is compiled without freezing (to the
    exact ``torch._int_mm``), and ``freezing_pays`` says why without timing anything; float models keep it."""
    monkeypatch.setattr(compiled, "int8_products_saturate", lambda: True)
    monkeypatch.setattr(compiled, "_int8_kernel_times", lambda *a: pytest.fail("timed a kernel it cannot use"))
    net = _int8_mlp()
    freezing, reason = freezing_pays(net, torch.rand(8, 64))
    assert not freezing and reason == f"compiled without freezing: {compiled._SATURATES}"
    assert compile_for_inference(net).freezing is False
    plain = nn.Sequential(nn.Linear(4, 4))
    assert compile_for_inference(plain).freezing is True
    assert freezing_pays(plain, torch.rand(2, 4)) == (True, "freezing: no int8 linears")
    monkeypatch.setattr(compiled, "int8_products_saturate", lambda: False)
    assert compile_for_inference(net).freezing is True
