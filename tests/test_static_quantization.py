import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_quantum.callbacks import StaticQuantization
from lightning_quantum.models import Classifier, DigitsCNN, DigitsMLP
from lightning_quantum.quantization import quantize_static_int8, sqnr_db, unobserved_modules
from tests.conftest import trainer_kwargs


def _gaussian_batches(shape, n=8):
    torch.manual_seed(1)
    return [(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long)) for _ in range(n)]


@pytest.mark.parametrize(("net", "shape"), [(DigitsMLP(dropout=0.0), (32, 64)), (DigitsCNN(), (32, 1, 8, 8))])
def test_static_int8_reaches_30_db_and_keeps_the_original(net, shape):
    torch.manual_seed(0)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    quantized = quantize_static_int8(net, _gaussian_batches(shape))
    x = torch.randn(*shape)
    with torch.no_grad():
        assert sqnr_db(net(x), quantized(x)) >= 30
        assert quantized(x[:5]).shape[0] == 5  # batch size is dynamic
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def _quant_maxima(program):
    return {n.args[4] for n in program.graph.nodes if "quantize_per_tensor" in str(n.target) and len(n.args) > 4}


@pytest.mark.parametrize("saturates", [False, True])
def test_activations_are_7_bit_where_the_cpus_int8_products_saturate(monkeypatch, saturates):
    """torchao's X86InductorQuantizer takes ``reduce_range`` for CPUs without VNNI, where oneDNN's u8 x s8
    products saturate at 16 bits; the activations then use 0-127, so a product pair stays below 2**15."""
    import lightning_quantum.quantization.static as static

    monkeypatch.setattr(static, "int8_products_saturate", lambda: saturates)
    quantized = quantize_static_int8(DigitsMLP(dropout=0.0), _gaussian_batches((32, 64), n=2))
    assert _quant_maxima(quantized) == ({127} if saturates else {255})


def test_static_int8_compiled_with_freezing_computes_what_it_computes_eagerly():
    """Compiled with freezing, the program runs oneDNN's int8 linears; on a 2-core AMD EPYC without VNNI their
    saturation put the compiled DigitsMLP 19 dB from its eager outputs on digits-scale inputs (0-16), 47 dB with
    7-bit activations."""
    from lightning_quantum.quantization import compile_for_inference

    torch.manual_seed(0)
    net = DigitsMLP(dropout=0.0).eval()
    batches = [(torch.rand(64, 64) * 16, torch.zeros(64, dtype=torch.long)) for _ in range(4)]
    quantized = quantize_static_int8(net, batches)
    x = torch.rand(128, 64) * 16
    with torch.inference_mode():
        assert sqnr_db(quantized(x), compile_for_inference(quantized)(x)) > 35


def test_empty_calibration_data_is_an_error():
    with pytest.raises(ValueError, match=r"`calibration_data` is empty"):
        quantize_static_int8(DigitsMLP(), [])


def test_unobserved_modules_are_named():
    class Obs(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("min_val", torch.tensor(float("inf")))
            self.register_buffer("max_val", torch.tensor(float("-inf")))

    model = nn.ModuleDict({"seen": nn.Linear(2, 2), "activation_post_process_3": Obs()})
    assert unobserved_modules(model) == ["activation_post_process_3"]


@pytest.mark.slow
def test_static_int8_runs_under_torch_compile():
    net = DigitsCNN().eval()
    quantized = quantize_static_int8(net, _gaussian_batches((16, 1, 8, 8)))
    x = torch.randn(16, 1, 8, 8)
    compiled = torch.compile(quantized)
    with torch.no_grad():
        assert sqnr_db(quantized(x), compiled(x)) > 40


def test_callback_calibrates_at_fit_end_and_fits_again(tmp_path, digits):
    torch.manual_seed(0)
    model = Classifier(DigitsMLP(hidden=(64,), dropout=0.0))
    callback = StaticQuantization(num_batches=4)
    # trained to about 80% (8 steps left it near 25%, where 7-bit activations flipped 4% of its near-ties)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=20, callbacks=[callback]))
    trainer.fit(model, digits)
    assert isinstance(model.net, torch.fx.GraphModule)
    (int8,) = trainer.test(model, digits, verbose=False)
    float_net = callback.float_module
    model_float = Classifier(float_net)
    (fp32,) = pl.Trainer(**trainer_kwargs(tmp_path)).test(model_float, digits, verbose=False)
    assert abs(int8["test/acc"] - fp32["test/acc"]) <= 0.02
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[callback]))
    trainer.fit(model, digits)  # the float network is trained again, then calibrated again
    assert isinstance(model.net, torch.fx.GraphModule)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_batches": 0}, r"`num_batches`=0 is not valid"),
        ({"split": "test"}, r"`split`='test' is not valid. Choose one of: 'train', 'val'"),
        ({"submodule": ""}, r"`submodule`='' is not valid"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        StaticQuantization(**kwargs)


def test_missing_submodule(tmp_path, digits):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[StaticQuantization(submodule="backbone")]))
    with pytest.raises(MisconfigurationException, match=r"`submodule`='backbone' is not a submodule of Classifier"):
        trainer.fit(Classifier(DigitsMLP(hidden=(16,))), digits)


@pytest.mark.gpu_stand_in
def test_a_bf16_model_is_calibrated_as_a_float32_cpu_copy():
    """A stand-in for a CUDA model: one in another dtype. The X86 quantizer calibrates a float32 CPU copy
    (the batches are float32 CPU tensors), and the model itself is left as it was."""
    from lightning_quantum.quantization.static import CPUOnly

    torch.manual_seed(0)
    net = DigitsMLP(hidden=(32,), dropout=0.0).eval()
    reference = net(torch.randn(2, 64)).shape
    low = net.to(torch.bfloat16)
    batches = [(torch.randn(16, 64), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    graph = quantize_static_int8(low, batches, max_batches=2)
    assert low.head.weight.dtype == torch.bfloat16  # untouched
    assert graph(torch.randn(4, 64)).shape == (4, *reference[1:])
    wrapped = torch.nn.Sequential(CPUOnly(graph))
    wrapped.to(torch.float64)  # a move or cast of the model around it leaves the CPU graph alone
    out = wrapped(torch.randn(3, 64))
    assert out.dtype == torch.float32 and out.shape[0] == 3
