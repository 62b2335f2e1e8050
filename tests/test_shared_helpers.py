"""The shared module and tensor helpers that replaced the per-module copies."""

import pytest
import torch
from torch import nn

from lightning_quantum._modules import owner_of, replace_module
from lightning_quantum._tensors import dense_values, is_quantized, plain_tensors


def test_owner_of_and_replace_module_by_dotted_name():
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 3)), nn.ReLU())
    assert owner_of(net, "0.0.weight") == (net[0][0], "weight")
    assert owner_of(net, "1") == (net, "1")
    new = nn.Linear(2, 3)
    old = replace_module(net, "0.0", new)
    assert isinstance(old, nn.Linear) and old is not new and net[0][0] is new
    with pytest.raises(AttributeError):
        replace_module(net, "2.0", new)


def test_is_quantized_tells_a_torchao_weight_from_a_plain_one():
    from lightning_quantum.quantization.dynamic import quantize_dynamic_int8

    net = nn.Sequential(nn.Linear(16, 8))
    plain = net[0].weight
    assert not is_quantized(plain) and not is_quantized(torch.zeros(2)) and not is_quantized(None)
    assert dense_values(plain) is plain and plain_tensors(plain) == [plain]
    quantize_dynamic_int8(net)
    weight = net[0].weight
    assert is_quantized(weight)
    assert torch.allclose(dense_values(weight), plain.detach(), atol=0.02)
    assert len(plain_tensors(weight)) >= 2 and all(not is_quantized(t) for t in plain_tensors(weight))
