import sys
import types

import pytest
import torch
from torch import nn

from lightning_quantum.benchmark import serialized_size_bytes
from lightning_quantum.quantization import quantize_weights_bnb, sqnr_db


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)).eval()


@pytest.mark.parametrize(("fmt", "min_db", "max_ratio"), [("nf4", 18, 0.135), ("fp4", 17, 0.135), ("int8", 40, 0.26)])
def test_bitsandbytes_formats_on_cpu(fmt, min_db, max_ratio):
    net = _net()
    x = torch.randn(16, 1024)
    ref = net(x)
    fp32_bytes = serialized_size_bytes(net[0])
    assert quantize_weights_bnb(net, fmt, ignore=["2"]) == ["0"]
    assert type(net[2]) is nn.Linear  # ignored
    with torch.no_grad():
        assert sqnr_db(ref, net(x)) >= min_db
    # honest size: packed data plus absmax and quant-state entries, as the state_dict holds them
    assert serialized_size_bytes(net[0]) / fp32_bytes <= max_ratio


def test_nf4_bytes_by_hand():
    net = nn.Sequential(nn.Linear(1024, 512, bias=False))
    quantize_weights_bnb(net, "nf4", double_quant=False)
    state = net[0].state_dict()
    # 1024*512 weights at 4 bits = 262144 bytes; one fp32 absmax per 64 weights = 8192 floats
    assert state["weight"].numel() * state["weight"].element_size() == 1024 * 512 // 2
    assert state["weight.absmax"].numel() == 1024 * 512 // 64


def test_double_quantization_shrinks_the_scales():
    a, b = _net(), _net()
    quantize_weights_bnb(a, "nf4", double_quant=False)
    quantize_weights_bnb(b, "nf4", double_quant=True)
    assert serialized_size_bytes(b) < serialized_size_bytes(a)


def test_errors():
    with pytest.raises(ValueError, match=r"`fmt`='int4' is not valid. Choose one of: 'nf4', 'fp4', 'int8'"):
        quantize_weights_bnb(_net(), "int4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"`device`='cuda' asks for CUDA, which this machine does not have"):
            quantize_weights_bnb(_net(), "nf4", device="cuda")
    with pytest.raises(ValueError, match=r"Nothing to quantize in Sequential"):
        quantize_weights_bnb(nn.Sequential(nn.Conv2d(1, 1, 3)), "nf4")


def test_missing_or_old_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"need bitsandbytes: pip install 'bitsandbytes>=0.48'"):
        quantize_weights_bnb(_net(), "nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.42.0"))
    with pytest.raises(ImportError, match=r"bitsandbytes 0.42.0 has no CPU kernels"):
        quantize_weights_bnb(_net(), "nf4")


@pytest.mark.gpu
def test_bitsandbytes_on_cuda():
    net = _net().cuda()
    x = torch.randn(16, 1024, device="cuda")
    ref = net(x)
    quantize_weights_bnb(net, "nf4", compute_dtype=torch.bfloat16)
    assert sqnr_db(ref, net(x)) >= 15


def test_nf4_head_with_ten_outputs_runs_in_inference_mode():
    net = _net()  # the head has 10 outputs, not a multiple of bitsandbytes' CPU block of 32
    x = torch.randn(4, 1024)
    ref = net(x)
    quantize_weights_bnb(net, "nf4")
    with torch.inference_mode():
        out = net(x)
    assert out.shape == (4, 10) and sqnr_db(ref, out) > 10
