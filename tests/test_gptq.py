"""GPTQ rounding onto fixed grids: the algorithm, and int4 PTQ with it."""

import pytest
import torch
from torch import nn

from lightning_quantum.quantization import prepare_qat, quantize_weights_int4, set_fake_quant_enabled
from lightning_quantum.quantization.gptq import gptq_round, gptq_round_prepared
from lightning_quantum.quantization.qat import freeze_weight_ranges
from tests.test_causal_lm import _trained_tiny_lm


def _frozen_int4_linear(in_features=128, out_features=16, group_size=32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    prepare_qat(model, "int4_weight_only", group_size=group_size)
    set_fake_quant_enabled(model, True)
    freeze_weight_ranges(model)
    return model, model[0], model[0].weight_fake_quantizer


def _correlated_inputs(rows=2048, features=128):
    torch.manual_seed(1)
    mixing = torch.randn(features, features) / features**0.5
    return torch.randn(rows, features) @ mixing + 0.1 * torch.randn(rows, features)


def test_with_a_diagonal_hessian_gptq_is_torchaos_round_to_nearest():
    """No correlation between inputs, no error to move: every weight lands where torchao's fake quantizer
    puts it, to the bit (ties included). Exact because both run the same float32 operations on the same
    values: ``round(w * (1 / s)) + z``, clamped, then ``(q - z) * s``."""
    _, layer, quantizer = _frozen_int4_linear()
    hessian = torch.diag(torch.rand(128, dtype=torch.float64) + 0.5)
    rounded = gptq_round(layer.weight, hessian, quantizer.scale, quantizer.zero_point, quant_min=-8, quant_max=7)
    assert torch.equal(rounded, quantizer(layer.weight.detach()))


def test_gptq_keeps_a_layers_outputs_closer_than_rounding_to_nearest_on_the_same_grid():
    _, layer, quantizer = _frozen_int4_linear()
    x = _correlated_inputs()
    weight = layer.weight.detach()
    rounded = gptq_round(
        weight, x.T.double() @ x.double(), quantizer.scale, quantizer.zero_point, quant_min=-8, quant_max=7
    )
    assert torch.equal(quantizer(rounded), rounded)  # points of the same grid, which conversion keeps
    nearest = quantizer(weight)
    error = {name: (x @ (weight - w).T).pow(2).sum().item() for name, w in (("gptq", rounded), ("nearest", nearest))}
    assert error["gptq"] < 0.8 * error["nearest"], error
    assert not torch.equal(rounded, nearest)


def test_a_pruned_weight_stays_zero_so_a_2_4_layer_keeps_its_sparsity():
    from lightning_quantum.pruning.masks import nm_masks

    _, layer, quantizer = _frozen_int4_linear()
    with torch.no_grad():
        layer.weight.mul_(nm_masks({"w": layer.weight.detach()}, 2, 4)["w"])
    x = _correlated_inputs()
    rounded = gptq_round(
        layer.weight, x.T.double() @ x.double(), quantizer.scale, quantizer.zero_point, quant_min=-8, quant_max=7
    )
    assert bool(rounded[layer.weight == 0].eq(0).all())  # every pruned weight stays pruned
    assert int((rounded.reshape(-1, 4) != 0).sum(-1).max()) <= 2


def test_gptq_refuses_shapes_that_do_not_fit_and_a_model_without_prepared_layers():
    _, layer, quantizer = _frozen_int4_linear()
    with pytest.raises(ValueError, match=r"GPTQ needs a \(128, 128\) Hessian .* got a Hessian of \(64, 64\)"):
        gptq_round(layer.weight, torch.eye(64), quantizer.scale, quantizer.zero_point, quant_min=-8, quant_max=7)
    with pytest.raises(ValueError, match=r"`damping`=-0.1"):
        gptq_round(
            layer.weight, torch.eye(128), quantizer.scale, quantizer.zero_point, quant_min=-8, quant_max=7, damping=-0.1
        )
    with pytest.raises(ValueError, match="has no fake-quantized linear to round: prepare it for QAT first"):
        gptq_round_prepared(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)])
    model, _, _ = _frozen_int4_linear()
    with pytest.raises(ValueError, match="needs calibration batches, and the loader gave none"):
        gptq_round_prepared(model, [])


def test_gptq_ptq_of_the_lm_follows_the_float_model_more_closely_than_min_max_rounding():
    model, loader = _trained_tiny_lm()
    nearest = quantize_weights_int4(model, group_size=32)
    rounded = quantize_weights_int4(model, group_size=32, algorithm="gptq", calibration=loader, calibration_batches=8)
    assert type(rounded.model.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(rounded.model.model.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(model.model.lm_head.weight) is nn.Parameter  # the original keeps its float weights
    with torch.no_grad():
        errors = {
            name: sum((q(ids) - model(ids)).pow(2).sum().item() for ids in loader)
            for name, q in (("gptq", rounded), ("nearest", nearest))
        }
    assert errors["gptq"] < errors["nearest"], errors
    with pytest.raises(ValueError, match=r"`algorithm`='gptq' with `calibration`=None: GPTQ needs calibration"):
        quantize_weights_int4(model, algorithm="gptq")
    with pytest.raises(ValueError, match=r"`algorithm`='affine' with `calibration`=given"):
        quantize_weights_int4(model, calibration=loader)
