import pytest
import torch
from torch import nn

from lightning_quantum.benchmark import serialized_size_bytes
from lightning_quantum.quantization import quantize_dynamic_int8, sqnr_db


def test_sqnr_by_hand():
    ref = torch.tensor([3.0, 4.0])  # norm 5
    assert sqnr_db(ref, torch.tensor([3.0, 4.5])) == pytest.approx(20 * torch.log10(torch.tensor(10.0)).item())
    assert sqnr_db(ref, ref) == float("inf")


def test_int8_dynamic_on_a_linear_stack_reaches_35_db():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    x = torch.randn(64, 256)
    ref = net(x)
    before = serialized_size_bytes(net)
    assert quantize_dynamic_int8(net) == ["0", "2", "4"]
    with torch.no_grad():
        assert sqnr_db(ref, net(x)) >= 35
    # int8 weights: a quarter of the fp32 bytes, plus per-channel scales and the fp32 biases
    assert serialized_size_bytes(net) < 0.3 * before


def test_embeddings_are_quantized_only_when_asked():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(1000, 64), "proj": nn.Linear(64, 64)})
    assert quantize_dynamic_int8(model) == ["proj"]
    assert type(model["emb"].weight) is nn.Parameter
    before = serialized_size_bytes(model["emb"])
    ids = torch.randint(0, 1000, (4, 16))
    ref = model["emb"](ids)
    assert quantize_dynamic_int8(model, embeddings=True, names=["emb"]) == ["emb"]
    assert sqnr_db(ref, model["emb"](ids)) >= 35
    assert serialized_size_bytes(model["emb"]) < 0.3 * before


def test_nothing_to_quantize():
    with pytest.raises(
        ValueError, match=r"Nothing to quantize in Sequential: no module of `module_types`=\['Linear'\]"
    ):
        quantize_dynamic_int8(nn.Sequential(nn.Conv2d(1, 1, 3)))
