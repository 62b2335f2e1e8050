"""QuantizationAwareTraining on torchao: numerics, phases, fit twice, test(ckpt_path), resume, errors."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_quantum.callbacks import Pruning, QuantizationAwareTraining
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsMLP
from lightning_quantum.quantization import (
    QAT_SCHEMES,
    convert_qat,
    dequantize_linears,
    is_converted,
    is_prepared,
    prepare_qat,
    set_fake_quant_enabled,
)
from tests.conftest import trainer_kwargs


def _mlp(seed=0):
    torch.manual_seed(seed)
    return Classifier(DigitsMLP(hidden=(64,), dropout=0.0), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))


def _net_and_inputs():
    torch.manual_seed(0)
    return DigitsMLP(hidden=(64,), dropout=0.0).eval(), torch.randn(16, 64)


@pytest.mark.parametrize("scheme", sorted(QAT_SCHEMES))
@pytest.mark.parity
def test_fake_quantized_output_matches_converted_output(scheme):
    net, x = _net_and_inputs()
    ref = net(x)
    assert prepare_qat(net, scheme) == ["blocks.0.linear", "head"]
    set_fake_quant_enabled(net, False)
    torch.testing.assert_close(net(x), ref)  # off: the plain layer
    set_fake_quant_enabled(net, True)
    fake = net(x)
    assert not torch.equal(fake, ref)
    assert convert_qat(net, scheme) == 2
    assert is_converted(net) and not is_prepared(net)
    _assert_computes(net, x, fake, scheme)


def _assert_computes(converted, x, fake, scheme):
    """``converted(x)`` equals the fake-quantized output ``fake``. The int8 scheme multiplies the same
    integers in int32 where fake quantization multiplies floats: float rounding only (the bound on a
    full-size model is ``test_int8_conversion_runs_int8_kernels_within_float_rounding_of_fake_quantization``)."""
    atol = 1e-4 if scheme == "int8_dynamic_int8_weight" else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(converted(x), fake.detach(), atol=atol, rtol=0)


@pytest.mark.parametrize("scheme", sorted(QAT_SCHEMES))
@pytest.mark.parity
def test_ranges_frozen_then_outgrown_convert_to_what_fake_quantization_computed(scheme):
    """The causal LM's recipe fixes the ranges when QAT starts; the weights then move past them (clamped)."""
    from lightning_quantum.quantization.qat import freeze_weight_ranges

    net, x = _net_and_inputs()
    prepare_qat(net, scheme, group_size=16)
    net(x)
    dynamic = copy.deepcopy(net)  # ranges that follow the weights
    assert freeze_weight_ranges(net) == 2
    with torch.no_grad():
        for model in (net, dynamic):
            for module in (model.blocks[0].linear, model.head):
                module.weight.mul_(1.5)  # past the frozen ranges: fake quantization clamps them
        fake = net(x)
        assert (fake - dynamic(x)).abs().max() > 1e-3  # the frozen ranges are in force
    convert_qat(net, scheme, group_size=16)
    _assert_computes(net, x, fake, scheme)


@pytest.mark.parity
def test_int8_conversion_runs_int8_kernels_within_float_rounding_of_fake_quantization():
    """The bound the module docstring states: DigitsMLP 64-512-512-10 on 256 digits images."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    net = DigitsMLP(dropout=0.0).eval()
    x = torch.tensor(load_digits().data[:256] / 16.0, dtype=torch.float32)
    prepare_qat(net, "int8_dynamic_int8_weight")
    set_fake_quant_enabled(net, True)
    with torch.no_grad():
        fake = net(x)
        convert_qat(net, "int8_dynamic_int8_weight")
        real = net(x)
    assert type(net.head.weight).__name__ == "Int8Tensor"
    assert not torch.equal(real, fake)  # integer products: not the same float operations
    assert (real - fake).abs().max() <= 1e-3 * fake.abs().max()
    assert torch.equal(real.argmax(-1), fake.argmax(-1))


def test_int8_qat_quantizes_activations_symmetrically_per_token_as_the_int8_kernels_do():
    """torchao's fake quantizer has only asymmetric per-token int8; ours is symmetric (no zero point in the
    int8 GEMM), and the converted layer quantizes its activations the same way."""
    from torchao.quantization import MappingType

    from lightning_quantum.quantization import SymmetricPerTokenInt8

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(8, 64).relu() * 3  # one-signed inputs: asymmetric and symmetric scales differ
    prepare_qat(layer, "int8_dynamic_int8_weight")
    quantizer = layer[0].activation_fake_quantizer
    assert isinstance(quantizer, SymmetricPerTokenInt8)
    fake_x = quantizer(x)
    steps = fake_x / (x.abs().amax(dim=-1, keepdim=True) / 127.5)  # integers in [-128, 127]: one scale a token
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    # zero stays zero (no zero point): 0 / scale * scale is exactly 0 with any kernels
    assert steps.round().max() <= 127 and torch.equal(fake_x[x == 0], x[x == 0])
    x.requires_grad_(True)
    quantizer(x).sum().backward()  # straight through the rounding (each token's largest value also moves its scale)
    largest = x.abs() == x.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(x.grad[~largest], torch.ones_like(x)[~largest], atol=1e-5, rtol=0)
    set_fake_quant_enabled(layer, False)
    assert quantizer(x) is x  # switched off: the input itself
    set_fake_quant_enabled(layer, True)
    with torch.no_grad():
        fake = layer(x)
        convert_qat(layer, "int8_dynamic_int8_weight")
        assert layer[0].weight.act_quant_kwargs.mapping_type == MappingType.SYMMETRIC
        torch.testing.assert_close(layer(x), fake, atol=1e-5 * fake.abs().max().item(), rtol=0)


@pytest.mark.parity
def test_callback_converts_at_fit_end_and_evaluation_is_consistent(tmp_path, digits):
    model = _mlp()
    qat = QuantizationAwareTraining(convert_on_fit_end=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[qat]))
    trainer.fit(model, digits)
    assert qat.phase == "prepared" and is_prepared(model)
    (fake,) = trainer.test(model, digits, verbose=False)
    convert_qat(model, qat.scheme)
    (real,) = trainer.test(model, digits, verbose=False)
    assert real["test/acc"] == fake["test/acc"]
    assert real["test/loss"] == pytest.approx(fake["test/loss"], abs=1e-5)

    model = _mlp()
    qat = QuantizationAwareTraining()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[qat])).fit(model, digits)
    assert qat.phase == "converted" and is_converted(model)
    assert type(model.net.head.weight).__name__ == "Int8Tensor"  # runs int8 kernels


def test_fake_quantization_waits_for_start_step(tmp_path, digits):
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            seen.append(pl_module.net.head.weight_fake_quantizer.enabled)

    qat = QuantizationAwareTraining(start_step=2, convert_on_fit_end=False)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[qat, Spy()])).fit(_mlp(), digits)
    assert seen == [False, False, True, True]


def test_fit_twice_and_test_with_a_qat_checkpoint(tmp_path, digits):
    model = _mlp()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    qat = QuantizationAwareTraining()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[qat, ckpt]))
    trainer.fit(model, digits)
    assert is_converted(model)
    # test(ckpt_path) with a checkpoint written during QAT (float weights, prepared phase)
    (from_ckpt,) = trainer.test(
        model, digits, ckpt_path=str(tmp_path / "ckpts" / "last.ckpt"), verbose=False, weights_only=True
    )
    assert is_prepared(model)
    assert 0 <= from_ckpt["test/acc"] <= 1
    # fit again: the model is prepared again and converted again
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[qat]))
    trainer.fit(model, digits)
    assert is_converted(model) and qat.phase == "converted"


def _fit_for_resume(tmp_path, epochs, ckpt_path=None, **qat_kwargs):
    model = _mlp()
    qat = QuantizationAwareTraining(convert_on_fit_end=False, **qat_kwargs)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1, filename="{epoch}", save_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=epochs,
            limit_train_batches=6,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[qat, ckpt],
        )
    )
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path, weights_only=True)
    return model, qat


@pytest.mark.parity
def test_resume_matches_an_uninterrupted_run(tmp_path):
    full, full_qat = _fit_for_resume(tmp_path / "a", 4, start_step=5)
    mid = tmp_path / "a" / "ckpts" / "epoch=1.ckpt"
    state = torch.load(mid, weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("QuantizationAwareTraining"))
    assert saved["phase"] == "prepared" and saved["fake_quant_enabled"] is True
    resumed, _ = _fit_for_resume(tmp_path / "b", 4, ckpt_path=mid, start_step=5)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_pruned_weights_stay_zero_through_qat(tmp_path, digits):
    model = _mlp()
    pruning = Pruning(final_sparsity=0.5, start_step=1, end_step=1)
    qat = QuantizationAwareTraining()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5, callbacks=[pruning, qat])).fit(model, digits)
    assert is_converted(model)
    mask = pruning.masks["net.blocks.0.linear.weight"]
    dense = model.net.blocks[0].linear.weight.dequantize()
    assert (dense[~mask] == 0).all()


def test_dequantize_gives_float_weights_back():
    net = nn.Sequential(nn.Linear(32, 8))
    prepare_qat(net, "int8_dynamic_int8_weight")
    convert_qat(net, "int8_dynamic_int8_weight")
    assert dequantize_linears(net) == 1 and type(net[0].weight) is nn.Parameter


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "int2"}, r"`scheme`='int2' is not valid. Choose one of: 'int8_dynamic_int8_weight'"),
        ({"group_size": 0}, r"`group_size`=0 is not valid"),
        ({"start_step": -1}, r"`start_step`=-1 is not valid"),
        ({"freeze_ranges_step": 2.5}, r"`freeze_ranges_step`=2.5 is not valid. It must be an integer >= 0"),
        ({"freeze_ranges_step": 0, "refresh_ranges_every": 0}, r"`refresh_ranges_every`=0 is not valid"),
        ({"refresh_ranges_every": 10}, r"`refresh_ranges_every`=10 refreshes fixed ranges; set `freeze_ranges_step`"),
        ({"ignore": "head"}, r"take lists of strings"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        QuantizationAwareTraining(**kwargs)


def test_group_size_that_does_not_divide_is_refused(tmp_path, digits):
    qat = QuantizationAwareTraining(scheme="int8_dynamic_int4_weight", group_size=48)
    with pytest.raises(
        MisconfigurationException,
        match=r"`group_size`=48 does not divide the input features of "
        r"\{'net.blocks.0.linear': 64, 'net.head': 64\}",
    ):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[qat])).fit(_mlp(), digits)


def test_nothing_to_quantize_is_refused(tmp_path, digits):
    class ConvOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 10, 8)

        def forward(self, x):
            return self.conv(x.view(-1, 1, 8, 8)).flatten(1)

    with pytest.raises(
        MisconfigurationException, match=r"Nothing to quantize in Classifier: no module of `module_types`"
    ):
        pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[QuantizationAwareTraining()])).fit(
            Classifier(ConvOnly()), digits
        )


@pytest.mark.parity
def test_frozen_ranges_survive_resume_and_drive_conversion(tmp_path):
    full, qat = _fit_for_resume(tmp_path / "a", 3, start_step=2, freeze_ranges_step=8)
    assert qat.ranges_frozen
    assert "net.head.weight_fake_quantizer.scale" in dict(full.named_buffers())
    # resume from epoch 1 (step 12, after the freeze at step 8): the frozen scales come back from the file
    resumed, _ = _fit_for_resume(
        tmp_path / "b", 3, ckpt_path=tmp_path / "a" / "ckpts" / "epoch=1.ckpt", start_step=2, freeze_ranges_step=8
    )
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # conversion quantizes with the frozen scales: the int8 model computes what the fake-quantized one did
    x = torch.randn(16, 64)
    full.eval()
    with torch.no_grad():
        fake = full(x)
        convert_qat(full, "int8_dynamic_int8_weight")
        torch.testing.assert_close(full(x), fake, atol=1e-5, rtol=0)


class _WeightsAt(Callback):
    """Keeps a copy of the head's weight as it is when the batch of step ``step`` starts (after the QAT hooks)."""

    def __init__(self, step):
        self.step, self.weight = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.weight = pl_module.net.head.weight.detach().clone()


@pytest.mark.parity
def test_ranges_fixed_at_the_start_are_those_of_the_weights_when_fake_quantization_begins(tmp_path):
    model = _mlp()
    # start_step=None: half of 2 x 6 steps; freeze_ranges_step=0 fixes the ranges when fake quantization begins
    qat = QuantizationAwareTraining(
        scheme="int4_weight_only", group_size=16, start_step=None, freeze_ranges_step=0, convert_on_fit_end=False
    )
    at_start = _WeightsAt(6)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=6, limit_val_batches=0, callbacks=[qat, at_start])
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert qat.ranges_frozen and qat.state_dict()["ranges_frozen"] is True
    quantizer = model.net.head.weight_fake_quantizer
    assert torch.equal(quantizer.scale, _ranges_of(quantizer, at_start.weight))
    assert not torch.equal(model.net.head.weight, at_start.weight)  # the weights trained on under fixed ranges


def _ranges_of(quantizer, weight):
    """The ranges a fake quantizer with ranges that follow the weights computes from ``weight``."""
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    dynamic = copy.copy(quantizer.config)
    dynamic.is_dynamic, dynamic.range_learning = True, False
    fresh = IntxFakeQuantizer(dynamic)
    fresh(weight)
    return fresh.scale


def test_refreshed_ranges_are_those_of_the_weights_at_each_refresh(tmp_path):
    # fixed at step 2, refreshed at steps 5, 8 and 11 of 12
    model = _mlp()
    qat = QuantizationAwareTraining(
        scheme="int4_weight_only",
        group_size=16,
        start_step=2,
        freeze_ranges_step=0,
        refresh_ranges_every=3,
        convert_on_fit_end=False,
    )
    at_freeze, at_refresh, after = _WeightsAt(2), _WeightsAt(11), _WeightsAt(10)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=2,
            limit_train_batches=6,
            limit_val_batches=0,
            callbacks=[qat, at_freeze, at_refresh, after],
        )
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    quantizer = model.net.head.weight_fake_quantizer
    assert qat.state_dict()["ranges_frozen_step"] == 2 and "scale" in quantizer._buffers
    assert torch.equal(quantizer.scale, _ranges_of(quantizer, at_refresh.weight))
    assert not torch.equal(quantizer.scale, _ranges_of(quantizer, at_freeze.weight))
    assert not torch.equal(quantizer.scale, _ranges_of(quantizer, after.weight))  # step 10 was not a refresh
    assert not torch.equal(model.net.head.weight, at_refresh.weight)  # trained on under the refreshed ranges


def test_refresh_leaves_layers_without_fixed_ranges_alone():
    from lightning_quantum.quantization.qat import freeze_weight_ranges, refresh_weight_ranges

    net = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    prepare_qat(net, "int4_weight_only", group_size=8)
    assert refresh_weight_ranges(net) == 0  # nothing fixed yet
    net(torch.randn(2, 32))
    assert freeze_weight_ranges(net) == 2
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    set_fake_quant_enabled(net, False)  # refreshing works with fake quantization off, and leaves it off
    assert refresh_weight_ranges(net) == 2
    quantizer = net[0].weight_fake_quantizer
    assert torch.equal(quantizer.scale, _ranges_of(quantizer, net[0].weight)) and not quantizer.enabled
    assert quantizer.config.range_learning and not quantizer.config.is_dynamic  # fixed again


@pytest.mark.parity
def test_refreshed_ranges_survive_resume(tmp_path):
    # fixed at step 8, refreshed at 13 and 18; resumed from step 12, the refresh schedule comes back from the file
    kwargs = {"start_step": 2, "freeze_ranges_step": 8, "refresh_ranges_every": 5}
    full, qat = _fit_for_resume(tmp_path / "a", 3, **kwargs)
    resumed, again = _fit_for_resume(tmp_path / "b", 3, ckpt_path=tmp_path / "a" / "ckpts" / "epoch=1.ckpt", **kwargs)
    assert again.ranges_frozen_step == qat.ranges_frozen_step == 8
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.gpu_stand_in
def test_frozen_ranges_from_a_cpu_checkpoint_land_on_the_layers_device():
    """A stand-in for a CUDA model resumed from a checkpoint read onto the CPU: the model is on `meta`."""
    from lightning_quantum.quantization.qat import freeze_ranges_from_state, freeze_weight_ranges, prepare_qat

    torch.manual_seed(0)
    trained = DigitsMLP(hidden=(32,), dropout=0.0)
    prepare_qat(trained, "int8_dynamic_int8_weight")
    trained(torch.randn(4, 64))
    freeze_weight_ranges(trained)
    state = {k: v.cpu() for k, v in trained.state_dict().items()}
    fresh = DigitsMLP(hidden=(32,), dropout=0.0)
    prepare_qat(fresh, "int8_dynamic_int8_weight")
    fresh.to("meta")
    assert freeze_ranges_from_state(fresh, state) == 2
    quantizer = fresh.head.weight_fake_quantizer
    assert quantizer.scale.device.type == "meta" and quantizer.zero_point.device.type == "meta"


class _Tokens(pl.LightningModule):
    """A bag-of-tokens classifier: an embedding table (most of its weights), mean over tokens, a linear head."""

    def __init__(self, vocab=200, dim=32, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1))

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 200, (96, 12), generator=generator)
        labels = tokens.sum(dim=1) % 4
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, labels), batch_size=16)


def test_embedding_qat_round_trip(tmp_path):
    """Tables get int8 fake quantization per row, convert to int8 tables with the same rows, and reload."""
    from lightning_quantum.quantization import load_safetensors, save_safetensors

    torch.manual_seed(0)
    model = _Tokens().eval()
    tokens = torch.randint(0, 200, (8, 12))
    assert prepare_qat(model, "int8_dynamic_int8_weight", embeddings=True) == ["embed", "head"]
    assert type(model.embed).__name__ == "FakeQuantizedEmbedding"
    set_fake_quant_enabled(model, True)
    with torch.no_grad():
        rows = model.embed(tokens)
        fake = model(tokens)
        weight = model.embed.weight
        scale = (weight.abs().amax(dim=1, keepdim=True) / 127.5)[tokens]  # symmetric int8, one scale per row
        levels = rows / scale
        assert (
            levels - levels.round()
        ).abs().max() < 1e-3 and -128 <= levels.round().min() <= levels.round().max() <= 127
        assert ((rows - weight[tokens]).abs() <= scale / 2 * (1 + 1e-4)).all()  # the nearest level
        assert convert_qat(model, "int8_dynamic_int8_weight") == 2
        assert type(model.embed.weight).__name__ == "IntxUnpackedToInt8Tensor"
        assert torch.equal(model.embed(tokens), rows)  # a lookup returns exactly the fake-quantized rows
        torch.testing.assert_close(model(tokens), fake, atol=1e-4, rtol=0)  # the int8 head: float rounding
    save_safetensors(model, tmp_path / "tokens.safetensors")
    float_bytes = 200 * 32 * 4
    assert (tmp_path / "tokens.safetensors").stat().st_size < 0.45 * (float_bytes + 33 * 4 * 4)
    fresh = load_safetensors(_Tokens().eval(), tmp_path / "tokens.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))
    assert dequantize_linears(model) == 2 and type(model.embed.weight) is nn.Parameter


def test_embeddings_can_be_left_out(tmp_path):
    model = _Tokens()
    qat = QuantizationAwareTraining(start_step=0, embeddings=False)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[qat])).fit(model)
    assert qat.layers == ["head"] and type(model.embed) is nn.Embedding and type(model.embed.weight) is nn.Parameter
    assert type(model.head.weight).__name__ == "Int8Tensor"
    with pytest.raises(MisconfigurationException, match=r"`embeddings`='yes' is not valid. It must be True or False"):
        QuantizationAwareTraining(embeddings="yes")


def _fit_tokens(tmp_path, epochs, ckpt_path=None):
    torch.manual_seed(0)
    model = _Tokens()
    qat = QuantizationAwareTraining(start_step=3, convert_on_fit_end=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, filename="{epoch}", save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=epochs, limit_train_batches=None, enable_checkpointing=True, callbacks=[qat, ckpt]
        )
    )
    trainer.fit(model, ckpt_path=ckpt_path, weights_only=True)
    return model, qat


@pytest.mark.parity
def test_qat_with_embeddings_resumes_exactly(tmp_path):
    full, qat = _fit_tokens(tmp_path / "a", 3)
    assert qat.layers == ["embed", "head"] and type(full.embed).__name__ == "FakeQuantizedEmbedding"
    resumed, _ = _fit_tokens(tmp_path / "b", 3, ckpt_path=tmp_path / "a" / "ckpts" / "epoch=0.ckpt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_with_the_other_embeddings_setting_is_refused():
    with pytest.raises(
        MisconfigurationException, match=r"trained with `embeddings`=True; this callback has `embeddings`=False"
    ):
        QuantizationAwareTraining(embeddings=False).load_state_dict({"embeddings": True})


def test_hooks_on_swapped_layers_survive_prepare_and_convert():
    """A Hugging Face model with gradient checkpointing keeps a forward hook on its input embeddings
    (`enable_input_require_grads`); the swaps must keep it, and the model must still deep-copy."""
    import copy

    model = _Tokens().eval()
    calls = []
    model.handles = [model.embed.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))]
    prepare_qat(model, "int8_dynamic_int8_weight", embeddings=True)
    model(torch.randint(0, 200, (2, 12)))
    assert calls == ["FakeQuantizedEmbedding"]
    copy.deepcopy(model)
    convert_qat(model, "int8_dynamic_int8_weight")
    model(torch.randint(0, 200, (2, 12)))
    assert calls[-1] == "Embedding"
    copy.deepcopy(model)
    model.handles[0].remove()
    model(torch.randint(0, 200, (2, 12)))
    assert len(calls) == 2
