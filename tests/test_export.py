"""Every exported artifact reloads in a fresh process and gives the same outputs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_quantum.quantization import (
    convert_qat,
    export_program,
    export_torchscript,
    prepare_qat,
    quantize_dynamic_int8,
    save_safetensors,
)

# Runs in a fresh process: loads each artifact and writes its outputs on the same inputs.
RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from lightning_quantum.quantization import load_program, load_safetensors
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        x = torch.load(job["input"], weights_only=True)
        if job["kind"] == "pt2":
            model = load_program(job["path"])
        elif job["kind"] == "ts":
            model = torch.jit.load(job["path"])
        else:
            torch.manual_seed(123)  # another init: the weights must come from the file
            fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
            model = load_safetensors(fresh, job["path"]).eval()
        with torch.no_grad():
            torch.save(model(x), job["output"])
    """
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _qat(m):
    prepare_qat(m, "int8_dynamic_int8_weight")
    convert_qat(m, "int8_dynamic_int8_weight")


TRANSFORMS = {"float": lambda m: None, "dynamic_int8": quantize_dynamic_int8, "qat_int8": _qat}


@pytest.mark.parity
def test_every_artifact_reloads_in_a_fresh_process(tmp_path):
    x = torch.randn(5, 64)
    torch.save(x, tmp_path / "x.pt")
    jobs, expected = [], {}
    for name, transform in TRANSFORMS.items():
        model = _net()
        transform(model)
        with torch.no_grad():
            reference = model(x)
        artifacts = {
            "pt2": export_program(model, (torch.randn(8, 64),), tmp_path / f"{name}.pt2"),
            "safetensors": save_safetensors(model, tmp_path / f"{name}.safetensors"),
        }
        if name == "float":
            artifacts["ts"] = export_torchscript(model, (x,), tmp_path / f"{name}.ts")
        for kind, path in artifacts.items():
            output = tmp_path / f"{name}.{kind}.out"
            jobs.append({"kind": kind, "path": str(path), "input": str(tmp_path / "x.pt"), "output": str(output)})
            expected[str(output)] = reference
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(expected) == 7
    for output, reference in expected.items():
        torch.testing.assert_close(torch.load(output, weights_only=True), reference, atol=1e-6, rtol=0, msg=output)


def test_torchscript_refuses_quantized_weights(tmp_path):
    model = _net()
    quantize_dynamic_int8(model)
    with pytest.raises(ValueError, match="TorchScript cannot trace quantized tensor weights"):
        export_torchscript(model, (torch.randn(2, 64),), tmp_path / "q.ts")


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_tied_weights_round_trip_through_safetensors(tmp_path):
    from lightning_quantum.quantization.export import load_safetensors, save_safetensors

    torch.manual_seed(0)
    model = _Tied()
    path = save_safetensors(model, tmp_path / "tied.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"a.weight", "a.bias", "b.bias"}  # the shared tensor once
    fresh = load_safetensors(_Tied(), path)  # strict
    x = torch.randn(3, 8)
    assert fresh.b.weight is fresh.a.weight and torch.equal(fresh(x), model(x))


def test_a_truncated_safetensors_file_is_named_in_the_error(tmp_path):
    from lightning_quantum.quantization.export import load_safetensors, save_safetensors

    path = save_safetensors(torch.nn.Linear(4, 4), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"m.safetensors' is not a readable safetensors file \(truncated or corrupt"):
        load_safetensors(torch.nn.Linear(4, 4), path)


@pytest.mark.gpu_stand_in
def test_quantized_weights_load_onto_the_models_device(tmp_path):
    """A stand-in for a CUDA model: `load_state_dict(assign=True)` would put the file's CPU tensors in place
    of a `meta` model's; they go to the model's device first."""
    from lightning_quantum.models import DigitsMLP
    from lightning_quantum.quantization import quantize_dynamic_int8
    from lightning_quantum.quantization.export import load_safetensors, save_safetensors

    torch.manual_seed(0)
    model = DigitsMLP(hidden=(32,), dropout=0.0)
    quantize_dynamic_int8(model)
    path = save_safetensors(model, tmp_path / "int8.safetensors")
    fresh = DigitsMLP(hidden=(32,), dropout=0.0)
    quantize_dynamic_int8(fresh)
    fresh.to("meta")
    load_safetensors(fresh, path)
    assert {p.device.type for p in fresh.parameters()} == {"meta"}


def test_compile_for_inference_compiles_every_model_of_a_class_not_only_the_first_eight():
    """Dynamo keeps at most `recompile_limit` (8) compiled entries per code object; past that, torch.compile
    of another model of the same class ran eagerly, silently. Each compiled model has its own code now."""
    from torch._dynamo.utils import counters

    from lightning_quantum.quantization import compile_for_inference

    x = torch.randn(4, 8)
    for seed in range(10):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 4)).eval()
        before = counters["stats"]["unique_graphs"]
        compiled = compile_for_inference(model)
        with torch.inference_mode():
            out = compiled(x)
            torch.testing.assert_close(out, model(x))
        assert counters["stats"]["unique_graphs"] > before, f"model {seed} was not compiled"


@pytest.mark.parametrize("saturates", [False, True])
def test_an_int8_program_compiles_to_the_int8_kernel_of_the_module_it_came_from(tmp_path, monkeypatch, saturates):
    """``torch.export`` records an ``_assert_tensor_metadata`` check for each ``.to``; as extra users of the
    int8 matmuls they kept Inductor's freezing passes from prepacking them for oneDNN, so the shipped int8
    program of a transformer ran ``aten._int_mm`` (1.15x slower than the module it came from, compiled).
    ``load_program`` drops them; the compiled program calls the int8 kernel the module compiles to, and gives
    the same outputs: oneDNN's ``qlinear`` where torchao multiplies int8 by int8 (a CPU with AMX); ``_int_mm``
    where torchao shifts the activations to uint8 for VNNI (a CPU with VNNI but no AMX, such as a Zen 4 EPYC),
    which Inductor's qlinear patterns do not match; ``_int_mm`` also where oneDNN's kernel saturates (a CPU
    without VNNI, or told so here), which compiles without freezing."""
    from torch._inductor.utils import run_and_get_code

    import lightning_quantum.compiled as compiled
    from lightning_quantum.quantization import compile_for_inference, load_program

    if not saturates and compiled.int8_products_saturate():
        pytest.skip("oneDNN's int8 linear saturates on this CPU (no VNNI): nothing compiles to it here")
    monkeypatch.setattr(compiled, "int8_products_saturate", lambda: saturates)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    quantize_dynamic_int8(model)
    x = torch.randn(4, 8, 32)  # (batch, tokens, features): the linears of a transformer
    program = load_program(export_program(model, (x,), tmp_path / "int8.pt2"))
    asserts = [n for m in program.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]
    assert not [n for n in asserts if n.target is torch.ops.aten._assert_tensor_metadata.default]
    compiled_program = compile_for_inference(program)
    assert compiled_program.freezing is not saturates
    with torch.inference_mode():
        out, code = run_and_get_code(compiled_program, x)
        expected = model(x)
        _, module_code = run_and_get_code(compile_for_inference(model), x)
    code, module_code = "".join(code), "".join(module_code)
    kernels = {name: (name in code, name in module_code) for name in ("qlinear", "_int_mm")}
    assert all(program == module for program, module in kernels.values()), kernels  # as the module it came from
    s8s8 = torch.cpu._is_amx_tile_supported() or not torch.cpu._is_vnni_supported()  # torchao's int8 x int8 path
    assert kernels["qlinear"][0] is (s8s8 and not saturates) and kernels["_int_mm"][0] is not kernels["qlinear"][0]
    # 1.2e-7 apart on the Xeon; on another CPU the last bits may flip one rounding where the hidden layer is
    # re-quantized, which moves an output by about a step times a weight (~2e-3 for these layers). Compiled to
    # the saturating kernel on a 2-core AMD EPYC without VNNI they were 0.17 apart.
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=0)


def test_a_program_exported_in_eval_mode_loads_without_torchaos_train_eval_rewrite(tmp_path, monkeypatch):
    """``export_program`` traces in eval mode and says so in the archive; ``load_program`` then skips torchao's
    dropout/BatchNorm rewrite into eval mode (it traces its patterns anew: 0.5 s of the gate's first run) but
    still drops weights the graph never uses, as that rewrite did. A program saved without the note is still
    rewritten, and ``.train()``/``.eval()`` keep working on both."""
    import torchao.quantization.pt2e.export_utils as export_utils

    from lightning_quantum.quantization import load_program

    class WithUnusedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
            self.pooler = nn.Linear(16, 16)  # never called, as a BERT's pooler under mean pooling

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    model = WithUnusedHead()
    model.train()(torch.randn(32, 8))  # running statistics that differ from a batch's
    x = torch.randn(6, 8)
    ours = export_program(model, (x,), tmp_path / "ours.pt2")
    assert model.training  # the caller's mode is restored
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(model.eval(), (x,)), str(plain))

    rewrites = []
    original = export_utils._replace_dropout
    monkeypatch.setattr(export_utils, "_replace_dropout", lambda *a, **k: rewrites.append(1) or original(*a, **k))
    with torch.no_grad():
        expected = model.eval()(x)
        program = load_program(ours)
        assert not rewrites and not program.training
        assert not [k for k in program.state_dict() if k.startswith("pooler")]  # unused weights are not loaded
        torch.testing.assert_close(program(x), expected)
        torch.testing.assert_close(program(x), program(x))  # dropout off
        older = load_program(plain)
        assert rewrites  # no note: rewritten into eval mode as before
        torch.testing.assert_close(older(x), expected)
        program.train()
        program.eval()
        torch.testing.assert_close(program(x), expected)
        program.train()  # (a call in train mode would also move BatchNorm's running statistics)
        assert not torch.equal(program(x), program(x))  # dropout on again


def test_a_loaded_program_keeps_the_weights_of_both_branches_of_a_cond_and_drops_unused_ones(tmp_path):
    """``load_program`` removes weights nothing reads; those a ``torch.cond`` branch reads stay, and the program
    gives the module's outputs on either branch."""
    from lightning_quantum.quantization import load_program

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,))

    torch.manual_seed(0)
    model = Branches().eval()
    x = torch.randn(3, 4).abs()
    program = load_program(export_program(model, (x,), tmp_path / "cond.pt2", dynamic_batch=False))
    assert sorted(program.state_dict()) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    with torch.no_grad():
        for inputs in (x, -x):
            torch.testing.assert_close(program(inputs), model(inputs))
