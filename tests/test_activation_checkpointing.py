import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from lightning_quantum.activation_checkpointing import disable_activation_checkpointing, enable_activation_checkpointing
from lightning_quantum.callbacks import ActivationCheckpointing
from lightning_quantum.models import Classifier, DigitsCNN, DigitsMLP, MLPBlock
from tests.conftest import trainer_kwargs


def _grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parity
def test_declared_blocks_are_wrapped_and_numerics_unchanged():
    torch.manual_seed(0)
    net = DigitsMLP(hidden=(32, 32), dropout=0.0)
    keys = list(net.state_dict())
    x = torch.randn(8, 64)
    ref_out, ref_grads = _grads(net, x)
    wrapped = enable_activation_checkpointing(net)
    assert wrapped == ["blocks.0", "blocks.1"]
    assert all(isinstance(net.blocks[i], CheckpointWrapper) for i in range(2))
    assert list(net.state_dict()) == keys  # checkpoints keep their keys
    out, grads = _grads(net, x)
    assert torch.equal(out, ref_out)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert enable_activation_checkpointing(net) == wrapped  # twice is safe
    assert disable_activation_checkpointing(net) == 2
    assert all(type(b) is MLPBlock for b in net.blocks)


def test_state_dict_round_trips_between_wrapped_and_plain():
    wrapped_net = DigitsCNN()
    enable_activation_checkpointing(wrapped_net)
    plain = DigitsCNN()
    plain.load_state_dict(wrapped_net.state_dict())
    wrapped_net.load_state_dict(plain.state_dict())
    for a, b in zip(plain.state_dict().values(), wrapped_net.state_dict().values()):
        assert torch.equal(a, b)


def test_block_types_by_name_and_class():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4)))
    assert enable_activation_checkpointing(net, ["Linear"]) == ["0", "2.0"]
    disable_activation_checkpointing(net)
    assert enable_activation_checkpointing(net, [nn.Sequential]) == ["2"]  # outermost match only


def test_nothing_to_wrap_is_an_error():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"declares no `activation_checkpoint_blocks`.*\['Linear', 'Sequential'\]"):
        enable_activation_checkpointing(net)
    with pytest.raises(ValueError, match=r"`block_types`=\['Conv2d'\] matches no module of Sequential"):
        enable_activation_checkpointing(net, ["Conv2d"])
    with pytest.raises(ValueError, match=r"`block_types`=\[\] names no block"):
        enable_activation_checkpointing(net, [])


def test_callback_rejects_bad_block_types():
    with pytest.raises(MisconfigurationException, match=r"`block_types`='MLPBlock' is not valid"):
        ActivationCheckpointing(block_types="MLPBlock")


def test_callback_wraps_for_fit_and_restores_after(tmp_path, digits):
    model = Classifier(DigitsMLP(hidden=(32,), dropout=0.0))
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            seen.append(isinstance(pl_module.net.blocks[0], CheckpointWrapper))

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ActivationCheckpointing(), Probe()]))
    trainer.fit(model, digits)
    assert seen and all(seen)
    assert type(model.net.blocks[0]) is MLPBlock
    trainer.test(model, digits, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[ActivationCheckpointing(), Probe()]))
    trainer.fit(model, digits)  # fit twice
    assert type(model.net.blocks[0]) is MLPBlock


def test_callback_error_at_setup_names_what_was_searched(tmp_path, digits):
    model = Classifier(nn.Sequential(nn.Linear(64, 10)))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ActivationCheckpointing()]))
    with pytest.raises(MisconfigurationException, match="declares no `activation_checkpoint_blocks`"):
        trainer.fit(model, digits)


def test_hugging_face_model_uses_its_own_switch():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    bert = BertModel(config)
    holder = nn.ModuleDict({"encoder_model": bert})
    assert enable_activation_checkpointing(holder) == ["encoder_model"]
    assert bert.is_gradient_checkpointing
    bert.train()
    ids = torch.randint(0, 50, (2, 8))
    bert(ids).last_hidden_state.sum().backward()
    assert bert.embeddings.word_embeddings.weight.grad is not None
    assert disable_activation_checkpointing(holder) == 1
    assert not bert.is_gradient_checkpointing


@pytest.mark.slow
def test_checkpointing_cuts_peak_training_memory_on_cpu():
    from benchmarks.checkpointing_probe import run_probe

    # 8 blocks, activations of 16384 x 256 fp32 = 16 MiB each. Without checkpointing each block keeps
    # its linear input, ReLU output and dropout mask for backward; with it only block inputs are kept.
    off, on = run_probe("off")["peak_mb"], run_probe("on")["peak_mb"]
    assert off > 150, off
    assert on < 0.6 * off, (on, off)


def test_the_old_module_name_still_works_with_a_deprecation_warning(monkeypatch):
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, "lightning_quantum.checkpointing", raising=False)
    with pytest.warns(DeprecationWarning, match="renamed `lightning_quantum.activation_checkpointing`"):
        old = importlib.import_module("lightning_quantum.checkpointing")
    assert old.enable_activation_checkpointing is enable_activation_checkpointing
