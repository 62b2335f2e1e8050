"""The Pruning callback inside Trainer.fit: zeros at every step, resume parity, slimming, errors."""

import copy
import json
import pickle
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quantum.callbacks import OptimizationReport, Pruning
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsCNN, DigitsMLP
from lightning_quantum.pruning import load_slimmed_checkpoint
from tests.conftest import trainer_kwargs


def _mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return Classifier(DigitsMLP(hidden=(32,), dropout=0.0), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), **kw)


class ZeroProbe(pl.Callback):
    """Checks, after each optimizer step and before each, that pruned weights and their grads are zero."""

    def __init__(self, pruning):
        self.pruning = pruning
        self.checked_steps = 0
        self.checked_grads = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not trainer.gradient_clip_val:
            return  # removed weights' gradients are zeroed only when clipping reads them
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            grad = params[name].grad
            if grad is not None and torch.isfinite(grad).all():  # a step with inf grads is skipped by the scaler
                assert (grad[~mask] == 0).all()
            self.checked_grads += 1

    def on_train_batch_end(self, trainer, pl_module, *args):
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            assert (params[name][~mask] == 0).all(), name
        if self.pruning.masks:
            self.checked_steps += 1
            assert not any(m._forward_pre_hooks for m in pl_module.modules())  # the forward does no extra work
            pickle.dumps(pl_module.net)
            copy.deepcopy(pl_module.net)


def test_pruned_weights_stay_zero_under_accumulation_clipping_and_skipped_amp_steps(tmp_path, digits):
    class InfOnce(Classifier):
        calls = 0

        def on_after_backward(self):
            InfGradient = float("inf")
            if InfOnce.calls == 7:
                self.net.head.weight.grad[0, 0] = InfGradient
            InfOnce.calls += 1

    torch.manual_seed(0)
    model = InfOnce(DigitsMLP(hidden=(32,), dropout=0.0))
    pruning = Pruning(final_sparsity=0.8, start_step=1, end_step=6, frequency=1)
    probe = ZeroProbe(pruning)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=2,
            limit_train_batches=12,
            limit_val_batches=0,
            accumulate_grad_batches=2,
            gradient_clip_val=0.5,
            plugins=[plugin],
            callbacks=[pruning, probe],
        )
    )
    trainer.fit(model, digits)
    assert trainer.global_step == 12
    assert probe.checked_steps > 10 and probe.checked_grads > 0
    assert pruning.current_sparsity == pytest.approx(0.8)
    assert [t for t, _ in pruning.history] == [2, 3, 4, 5, 6]  # at step 1 the cubic target is 0
    sparsity = pruning.report_extra(SimpleNamespace(pl_module=model))["pruning"]["sparsity_over_pruned_weights"]
    assert sparsity == pytest.approx(0.8, abs=1e-3)


def _fit(tmp_path, epochs, ckpt_path=None, every_epoch=False):
    model = _mlp()
    pruning = Pruning(final_sparsity=0.75, start_step=5, end_step=45, frequency=5)
    callbacks = [pruning]
    if every_epoch:
        callbacks.append(
            ModelCheckpoint(
                dirpath=tmp_path / "ckpts",
                save_top_k=-1,
                every_n_epochs=1,
                filename="{epoch}",
                save_on_train_epoch_end=True,
            )
        )
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=epochs,
            limit_train_batches=10,
            limit_val_batches=0,
            enable_checkpointing=every_epoch,
            callbacks=callbacks,
        )
    )
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path, weights_only=True)
    return model, pruning


@pytest.mark.parity
def test_resume_mid_schedule_matches_an_uninterrupted_run(tmp_path):
    full_model, full = _fit(tmp_path / "a", epochs=6, every_epoch=True)
    mid = tmp_path / "a" / "ckpts" / "epoch=1.ckpt"  # 20 steps in: the schedule runs from 5 to 45
    state = torch.load(mid, weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("Pruning"))
    assert 0 < saved["current_sparsity"] < 0.75 and saved["masks"]
    resumed_model, resumed = _fit(tmp_path / "b", epochs=6, ckpt_path=mid)
    assert resumed.current_sparsity == full.current_sparsity == pytest.approx(0.75)
    assert resumed.history == full.history
    for name in full.masks:
        assert torch.equal(full.masks[name], resumed.masks[name]), name
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parity
def test_structured_slimming_in_fit_then_test_save_and_reload(tmp_path):
    dm = DigitsDataModule(batch_size=64, layout="image")
    torch.manual_seed(0)
    model = Classifier(DigitsCNN())
    before = sum(p.numel() for p in model.parameters())
    pruning = Pruning(
        method="l2_structured",
        final_sparsity=0.5,
        start_step=2,
        end_step=10,
        frequency=2,
        slim=True,
        ignore=["net.classifier.4"],
    )
    report = OptimizationReport(output_dir=tmp_path, warmup=0, repeats=2, train_step_repeats=2, print_table=False)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=1, limit_train_batches=12, limit_val_batches=2, callbacks=[pruning, report]
        )
    )
    trainer.fit(model, dm)
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.35 * before
    assert pruning.removed_channels["net.features.1.conv"] == 32
    assert model.net.features[1].conv.out_channels == 32 and model.net.features[1].bn.num_features == 32
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["compression_ratio"] > 2.5 and data["extra"]["pruning"]["slimmed"] is True
    trainer.validate(model, dm, verbose=False)
    (result,) = trainer.test(model, dm, verbose=False)
    trainer.save_checkpoint(tmp_path / "slim.ckpt")
    fresh = load_slimmed_checkpoint(Classifier(DigitsCNN()), tmp_path / "slim.ckpt")
    x = next(iter(dm.test_dataloader()))[0]
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    (again,) = pl.Trainer(**trainer_kwargs(tmp_path)).test(fresh, dm, verbose=False)
    assert again["test/acc"] == pytest.approx(result["test/acc"])


def test_load_slimmed_checkpoint_needs_a_slimmed_one(tmp_path, tiny_classifier):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(tiny_classifier, DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds no slimmed architecture"):
        load_slimmed_checkpoint(tiny_classifier, tmp_path / "plain.ckpt")


def test_structured_pruning_leaves_output_layers_whole_unless_named(tmp_path, digits):
    pruning = Pruning(method="l1_structured", final_sparsity=0.5, start_step=1, end_step=1)
    model = _mlp()
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[pruning])).fit(model, digits)
    hidden = model.net.blocks[0].linear.weight
    assert (hidden.abs().sum(dim=1) == 0).sum() == 16  # half the hidden units pruned
    head = model.net.head.weight
    assert (head.abs().sum(dim=1) > 0).all()  # every output kept; only the pruned units' columns are zero
    assert (head.abs().sum(dim=0) == 0).sum() == 16
    named = Pruning(method="l1_structured", final_sparsity=0.5, start_step=1, end_step=1, names=["net.head"])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[named]))
    with pytest.raises(MisconfigurationException, match=r"would remove model outputs.*\['net.head'\]"):
        trainer.fit(_mlp(), digits)


def test_two_four_in_fit(tmp_path, digits):
    pruning = Pruning(method="nm", nm="2:4", start_step=2)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[pruning, ZeroProbe(pruning)]))
    model = _mlp()
    trainer.fit(model, digits)
    w = model.net.blocks[0].linear.weight
    assert ((w != 0).view(32, -1, 4).sum(-1) <= 2).all()
    assert pruning.current_sparsity == 0.5


class _MovesTheModel(pl.Callback):
    """Lightning's teardown before ``on_fit_end``: after a GPU fit it moves the model to the CPU."""

    def __init__(self, device):
        self.device = device

    def on_fit_end(self, trainer, pl_module):
        pl_module.to(self.device)


@pytest.mark.gpu_stand_in
def test_the_masks_follow_the_weights_when_the_model_moves_after_fit(tmp_path, digits):
    """A stand-in for a GPU fit, moved to `meta` as Lightning moves a CUDA model to the CPU at teardown.
    On the GPU (H200) the masks stayed on CUDA, and `weight[~mask]` on the CPU weights raised."""
    pruning = Pruning(final_sparsity=0.5, start_step=1, end_step=2)
    callbacks = [_MovesTheModel("meta"), pruning]
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=callbacks)).fit(_mlp(), digits)
    assert pruning.masks and all(mask.device.type == "meta" for mask in pruning.masks.values())


def test_sparsity_is_logged_when_masks_change(tmp_path, digits):
    pruning = Pruning(final_sparsity=0.5, start_step=1, end_step=3, frequency=1)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(**{**trainer_kwargs(tmp_path, max_steps=4, callbacks=[pruning]), "logger": logger})
    trainer.fit(_mlp(), digits)
    text = next(tmp_path.glob("csv/**/metrics.csv")).read_text()
    assert "pruning/target_sparsity" in text and "pruning/sparsity/net.blocks.0.linear" in text


def test_make_permanent_loads_into_an_unpruned_copy(tmp_path, digits):
    pruning = Pruning(final_sparsity=0.6, start_step=1, end_step=1)
    model = _mlp()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[pruning])).fit(model, digits)
    state = pruning.make_permanent(model)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    fresh = _mlp(seed=1)
    fresh.load_state_dict(state)
    figures = pruning.report_extra(SimpleNamespace(pl_module=fresh))["pruning"]
    assert figures["sparsity_over_pruned_weights"] == pytest.approx(0.6, abs=1e-4)


def test_schedule_longer_than_the_fit_warns_with_numbers(tmp_path, digits):
    pruning = Pruning(final_sparsity=0.5, start_step=1, end_step=100)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5, limit_train_batches=10, callbacks=[pruning]))
    with pytest.warns(
        UserWarning,
        match=r"ends at step 100 \(`end_step`\), but this fit runs 5 steps: it will stop at "
        r"sparsity 0.\d+ instead of `final_sparsity`=0.5",
    ):
        trainer.fit(_mlp(), digits)


def test_pattern_matching_nothing_fails_at_setup(tmp_path, digits):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Pruning(names=["encoder.*"])]))
    with pytest.raises(MisconfigurationException, match=r"`names` pattern 'encoder.\*' matches no module"):
        trainer.fit(_mlp(), digits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"final_sparsity": 1.0}, r"`final_sparsity`=1.0 is not valid. It must lie in \[0, 1\)"),
        ({"final_sparsity": -0.2}, r"`final_sparsity`=-0.2 is not valid"),
        ({"method": "random"}, r"`method`='random' is not valid. Choose one of: 'l1_unstructured', 'l1_structured'"),
        ({"method": "nm", "nm": "4:4"}, r"`nm`='4:4' is not valid. It needs 0 < N < M"),
        ({"nm": "2-4"}, r"`nm`='2-4' is not valid. Write it as 'N:M'"),
        ({"start_step": 50, "end_step": 10}, r"`end_step`=10 is before `start_step`=50"),
        ({"schedule": "exp"}, r"`schedule`='exp' is not valid"),
        ({"slim": True}, r"`slim`=True needs a structured method"),
        ({"frequency": 0}, r"`frequency`=0 is not valid"),
        ({"ignore": "head"}, r"take lists of strings"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        Pruning(**kwargs)


def test_per_epoch_schedule_updates_at_epoch_starts(tmp_path, digits):
    pruning = Pruning(final_sparsity=0.6, schedule="linear", unit="epoch", start_step=1, end_step=3, frequency=1)
    seen = []

    class Spy(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(round(pruning.current_sparsity, 3))

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[pruning, Spy()]))
    trainer.fit(_mlp(), digits)
    # linear: 0 at epoch 1 (the start), 0.3 at epoch 2, 0.6 at epoch 3 (the end); the spy runs after the update
    assert seen == [0.0, 0.0, 0.3, 0.6]
    assert pruning.history == [(2, pytest.approx(0.3)), (3, pytest.approx(0.6))]


def test_report_carries_the_sparsity_table(tmp_path, digits):
    pruning = Pruning(final_sparsity=0.5, start_step=1, end_step=2, frequency=1)
    report = OptimizationReport(output_dir=tmp_path, warmup=0, repeats=2, compare_train_step=False, print_table=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[pruning, report]))
    trainer.fit(_mlp(), digits)
    data = json.loads((tmp_path / "report.json").read_text())
    table = data["extra"]["sparsity_table"]
    assert [row["layer"] for row in table] == ["net.blocks.0.linear", "net.head", "(global)"]
    assert table[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert data["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "## sparsity_table" in (tmp_path / "report.md").read_text()
