import json

import pytest
import torch
import torch.nn.functional as F

import lightning_quantum as lq
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import DigitsCNN, DigitsMLP
from lightning_quantum.onnx_runtime import onnxruntime_available


def _trained(net, layout, epochs=4):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, layout=layout, eval_batch_size=270)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()
    for epoch in range(epochs):
        dm.train_dataloader().sampler.set_epoch(epoch)
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    return net.eval(), dm


@pytest.fixture(scope="module")
def mlp():
    return _trained(DigitsMLP(hidden=(128, 128)), "flat")


@pytest.fixture(scope="module")
def cnn():
    return _trained(DigitsCNN(channels=(8, 16, 16), hidden=32), "image")


def _same_state(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parity
def test_quantum_dynamic_int8_leaves_the_original_and_reloads(mlp, tmp_path):
    net, dm = mlp
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = lq.optimize(net, "quantum", eval_data=dm.test_dataloader(), repeats=3, deploy=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and not net.training
    assert result.applied == ["int8"] and result.steps[0].detail["kind"] == "dynamic"
    assert result.report.compression_ratio > 3.0 and result.report.level == "quantum"
    assert abs(result.report.accuracy_degradation) < 0.02
    paths = lq.save_optimized(result, tmp_path)
    assert {p.name for p in paths.values()} >= {"report.json", "report.md", "model.safetensors", "optimized.json"}
    again = lq.load_optimized(DigitsMLP(hidden=(128, 128)), tmp_path)
    x = next(iter(dm.test_dataloader()))[0]
    assert torch.equal(again(x), result.model(x))


@pytest.mark.parity
def test_quantum_static_int8_with_calibration_saves_a_program(cnn, tmp_path):
    net, dm = cnn
    result = lq.optimize(
        net, "quantum", calibration_data=dm.train_dataloader(), eval_data=dm.test_dataloader(), repeats=3, deploy=False
    )
    assert result.steps[0].detail["kind"] == "static" and result.report.compression_ratio > 3.0
    x = next(iter(dm.test_dataloader()))[0]
    paths = lq.save_optimized(result, tmp_path, example_inputs=x[:4])
    assert paths["model"].suffix == ".pt2"
    program = lq.load_optimized(None, tmp_path)
    assert torch.allclose(program(x), result.model(x), atol=1e-5)


def test_a_step_over_the_accuracy_budget_is_rolled_back_with_its_reason(mlp):
    net, dm = mlp
    result = lq.optimize(
        net, "ultra", eval_data=dm.test_dataloader(), prune_amount=0.98, max_accuracy_drop=0.01, repeats=3, deploy=False
    )
    prune = result.steps[0]
    assert prune.name == "prune" and not prune.kept and prune.accuracy_drop > 0.01
    assert "above `max_accuracy_drop`=0.01: rolled back" in prune.reason
    assert result.report.sparsity < 0.2  # not the 98% pruned (NF4 alone rounds a few small weights to 0)
    assert result.report.extra["steps"][0]["reason"] == prune.reason


@pytest.mark.parity
def test_ultra_slims_channels_quantizes_to_nf4_and_reloads(cnn, tmp_path):
    net, dm = cnn
    result = lq.optimize(
        net,
        "ultra",
        eval_data=dm.test_dataloader(),
        prune_method="l2_structured",
        prune_amount=0.25,
        slim=True,
        repeats=3,
        deploy=False,
    )
    assert result.applied == ["prune", "nf4"]
    assert result.after.num_parameters < result.before.num_parameters
    assert result.report.compression_ratio > 3.0  # channels gone and 4-bit linears (the convs stay fp32)
    lq.save_optimized(result, tmp_path)
    again = lq.load_optimized(DigitsCNN(channels=(8, 16, 16), hidden=32), tmp_path)
    x = next(iter(dm.test_dataloader()))[0]
    assert torch.equal(again(x), result.model(x))


@pytest.mark.parity
def test_advanced_bf16_halves_the_size(mlp, tmp_path):
    net, dm = mlp
    result = lq.optimize(net, "advanced", eval_data=dm.test_dataloader(), repeats=3, deploy=False)
    assert result.report.compression_ratio == pytest.approx(2.0, rel=0.01)
    lq.save_optimized(result, tmp_path)
    again = lq.load_optimized(DigitsMLP(hidden=(128, 128)), tmp_path)
    x = next(iter(dm.test_dataloader()))[0]
    assert again(x).dtype == torch.float32 and torch.equal(again(x), result.model(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"level": "turbo"}, r"`level`='turbo' is not valid.*'basic', 'advanced', 'quantum', 'ultra'"),
        ({"prune_method": "random"}, r"`prune_method`='random' is not valid"),
        ({"prune_amount": 1.0}, r"`prune_amount`=1.0 is not valid"),
        ({"slim": True}, r"`slim`=True removes channels, so it needs a structured `prune_method`"),
        ({"max_accuracy_drop": -0.1}, r"`max_accuracy_drop`=-0.1 is not valid"),
        ({"compile": True}, r"`compile`=True with `deploy`=True: the deployment gate already measures"),
        ({"keep_slower": True, "deploy": False}, r"`keep_slower`=True only matters with `deploy`=True"),
        ({"max_size_ratio": "small"}, r"`max_size_ratio`='small' is not valid. Give a number, 'level' or None"),
        ({"max_size_ratio": 0}, r"`max_size_ratio`=0 is not valid"),
    ],
)
def test_invalid_arguments(mlp, kwargs, match):
    net, dm = mlp
    with pytest.raises(ValueError, match=match):
        lq.optimize(net, **{"level": "quantum", "eval_data": dm.test_dataloader(), **kwargs})


def test_accuracy_budget_needs_eval_data(mlp):
    net, _ = mlp
    with pytest.raises(ValueError, match=r"`max_accuracy_drop` needs `eval_data`"):
        lq.optimize(net, "quantum", example_inputs=torch.randn(4, 64), max_accuracy_drop=0.01)
    with pytest.raises(ValueError, match=r"Give `example_inputs`, `eval_data` or `calibration_data`"):
        lq.optimize(net, "quantum")


def test_the_size_budget_is_the_levels_unless_given():
    from lightning_quantum.optimize import _size_budget

    assert [_size_budget("level", level) for level in ("basic", "advanced", "quantum", "ultra")] == [
        None,
        None,
        0.3,
        0.3,
    ]
    assert _size_budget(None, "quantum") is None and _size_budget(0.5, "basic") == 0.5


def _force_times(monkeypatch, fastest, slow_prefix=None):
    """Make the deployment gate see ``fastest`` as the fastest form (and ``slow_prefix`` forms 10x slower)."""
    import lightning_quantum.deployment as deployment

    def times(modules, *args, **kwargs):
        return {
            f: [0.1 if f == fastest else 10.0 if slow_prefix and f.startswith(slow_prefix) else 1.0] for f in modules
        }

    monkeypatch.setattr(deployment, "_time_interleaved", times)


@pytest.mark.parity
def test_deploy_rolls_back_an_int8_step_that_runs_slower_and_ships_the_float_form(mlp, tmp_path, monkeypatch):
    net, dm = mlp
    _force_times(monkeypatch, "float compiled", slow_prefix="int8")
    result = lq.optimize(net, "quantum", eval_data=dm.test_dataloader(), repeats=3)
    int8, deploy = result.steps
    assert not int8.kept and int8.reason.startswith("slower on this machine: its fastest form (int8 ")
    assert "loses to float compiled" in int8.reason and "`keep_slower`=True keeps it" in int8.reason
    assert deploy.name == "deploy" and deploy.kept and deploy.detail == {"form": "float compiled", "freezing": True}
    assert result.applied == ["deploy"] and result.report.compression_ratio == pytest.approx(1.0, rel=0.01)
    assert result.report.extra["deployment"]["form"] == "float compiled"
    # QUANTUM's size budget (0.3x): no int8 form beat float eager, so the float forms were built after all
    assert result.report.extra["deployment"]["max_size_ratio"] == 0.3
    assert "so it ships regardless of size" in deploy.reason
    lq.save_optimized(result, tmp_path)
    again = lq.load_optimized(DigitsMLP(hidden=(128, 128)), tmp_path)
    assert type(again).__name__ == "FrozenInference"  # compiled again on load
    x = next(iter(dm.test_dataloader()))[0]
    with torch.no_grad():
        # Two compiles: the gate's was specialized at its timed batch (64) and recompiled for these 270
        # samples with a dynamic batch; the reloaded one sees 270 first. Inductor may pick other kernels
        # for each, so the float sums may round differently (same-shape reloads are bitwise equal:
        # tests/test_deployment.py).
        torch.testing.assert_close(again(x), result.model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parity
def test_keep_slower_keeps_the_int8_step_and_ships_an_int8_form(mlp, tmp_path, monkeypatch):
    net, dm = mlp
    _force_times(monkeypatch, "float eager", slow_prefix="int8")
    result = lq.optimize(net, "quantum", eval_data=dm.test_dataloader(), repeats=3, keep_slower=True)
    assert result.applied == ["int8", "deploy"] and result.steps[1].detail["form"].startswith("int8 ")
    assert {c["form"] for c in result.report.extra["deployment"]["candidates"]} == {"int8 eager", "int8 compiled"}
    assert result.report.compression_ratio > 3.0
    lq.save_optimized(result, tmp_path)
    again = lq.load_optimized(DigitsMLP(hidden=(128, 128)), tmp_path)
    x = next(iter(dm.test_dataloader()))[0]
    with torch.no_grad():
        assert torch.equal(again(x), result.model(x))


@pytest.mark.skipif(not onnxruntime_available(), reason="the onnx extra is not installed")
def test_an_onnxruntime_winner_is_saved_as_onnx_and_reloads_without_model_code(mlp, tmp_path, monkeypatch):
    net, dm = mlp
    _force_times(monkeypatch, "int8 onnxruntime")
    result = lq.optimize(net, "quantum", eval_data=dm.test_dataloader(), repeats=3)
    assert result.steps[-1].detail == {"form": "int8 onnxruntime"}
    paths = lq.save_optimized(result, tmp_path)
    assert paths["model"].name == "model.onnx"
    assert json.loads((tmp_path / "optimized.json").read_text())["format"] == "onnx"
    again = lq.load_optimized(None, tmp_path)  # an ONNX file: no model code needed
    x = next(iter(dm.test_dataloader()))[0]
    assert torch.equal(again(x), result.model(x))
