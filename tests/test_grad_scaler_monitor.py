from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quantum.callbacks import GradScalerMonitor
from lightning_quantum.models import Classifier, DigitsMLP
from tests.conftest import trainer_kwargs


class InfGradientClassifier(Classifier):
    """Poisons one gradient with inf on chosen optimizer steps."""

    def __init__(self, poison_steps):
        super().__init__(
            DigitsMLP(hidden=(16,), dropout=0.0), num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.01)
        )
        self.poison_steps = set(poison_steps)
        self._calls = 0

    def on_after_backward(self):
        if self._calls in self.poison_steps:
            self.net.head.weight.grad[0, 0] = float("inf")
        self._calls += 1


def _fp16_scaler_plugin():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))


def _fp16_trainer(tmp_path, steps, monitor):
    """A CPU Trainer of ``steps`` optimizer steps under fp16 with a GradScaler, and ``monitor``."""
    return pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_steps=steps,
            limit_train_batches=steps,
            limit_val_batches=0,
            plugins=[_fp16_scaler_plugin()],
            callbacks=[monitor],
        )
    )


def test_scaler_counts_skipped_steps_after_injected_inf(tmp_path, digits):
    torch.manual_seed(0)
    monitor = GradScalerMonitor(min_steps=1, max_skip_rate=0.5, log_every_n_steps=1)
    model = InfGradientClassifier(poison_steps={1, 3})
    before = model.net.head.weight.detach().clone()
    trainer = _fp16_trainer(tmp_path, 6, monitor)
    trainer.fit(model, digits)
    assert monitor.optimizer_steps == 6
    assert monitor.skipped_steps == 2
    assert monitor.nonfinite_steps == 0
    # two backoffs (x0.5 each) and no growth within 2000 steps: 2**10 * 0.25
    assert monitor.last_scale == 2.0**8
    assert monitor.skip_rate == pytest.approx(2 / 6)
    assert torch.isfinite(model.net.head.weight).all() and not torch.equal(before, model.net.head.weight)
    assert trainer.callback_metrics["grad_scaler/skipped_steps"] == 2


def test_without_scaler_counts_nonfinite_steps_and_warns_once(tmp_path, digits):
    monitor = GradScalerMonitor(min_steps=2, max_skip_rate=0.1)
    # Without a scaler nothing skips the step: the inf reaches the weights (step 3, the last one).
    model = InfGradientClassifier(poison_steps={3})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[monitor]))
    with pytest.warns(UserWarning, match=r"0 skipped and 1 non-finite optimizer steps out of 4 .*`max_skip_rate`=0.1"):
        trainer.fit(model, digits)
    assert monitor.nonfinite_steps == 1 and monitor.skipped_steps == 0 and monitor.warned
    assert monitor.last_scale is None


@pytest.mark.parity
def test_counters_survive_resume(tmp_path, digits):
    ckpt = tmp_path / "mid.ckpt"
    first = GradScalerMonitor(min_steps=100)
    model = InfGradientClassifier(poison_steps={1})
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_steps=3,
            limit_train_batches=10,
            limit_val_batches=0,
            plugins=[_fp16_scaler_plugin()],
            callbacks=[first],
        )
    )
    trainer.fit(model, digits)
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("GradScalerMonitor"))
    assert saved["skipped_steps"] == 1 and saved["optimizer_steps"] == 3

    second = GradScalerMonitor(min_steps=100)
    model = InfGradientClassifier(poison_steps={0})  # poisons the first step after resume
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_steps=6,
            max_epochs=5,
            limit_train_batches=10,
            limit_val_batches=0,
            plugins=[_fp16_scaler_plugin()],
            callbacks=[second],
        )
    )
    trainer.fit(model, digits, ckpt_path=ckpt, weights_only=True)
    assert second.optimizer_steps == 6
    assert second.skipped_steps == 2
    assert second.last_scale == 2.0**8  # the scaler's own state resumed too


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, r"`log_every_n_steps`=0 is not valid"),
        ({"log_every_n_steps": 1.5}, r"`log_every_n_steps`=1.5 must be an integer"),
        ({"max_skip_rate": 1.0}, r"`max_skip_rate`=1.0 is not valid. It must lie in \[0, 1\)"),
        ({"min_steps": -1}, r"`min_steps`=-1 is not valid"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        GradScalerMonitor(**kwargs)


@pytest.mark.gpu_stand_in
def test_the_scalers_calibration_skips_are_left_out_of_the_warning_rate(tmp_path, digits):
    """A GradScaler starts high and skips until a step passes: three overflowing first steps, then none."""
    import warnings

    monitor = GradScalerMonitor(min_steps=5, max_skip_rate=0.05)
    model = InfGradientClassifier(poison_steps={0, 1, 2})
    trainer = _fp16_trainer(tmp_path, 12, monitor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, digits)
    assert monitor.skipped_steps == 3 and monitor.calibration_skips == 3
    assert monitor.skip_rate == 0.0 and not monitor.warned
    assert not [w for w in caught if "max_skip_rate" in str(w.message)]
    assert monitor.report_extra(SimpleNamespace(pl_module=model))["grad_scaler"]["calibration_skips"] == 3


def test_it_logs_as_often_as_the_trainer_unless_told(tmp_path, digits):
    """Logging every step cost 1.5 ms a step (29% of a small model's): by default it logs as often as the
    trainer does; the counting is done every step either way."""
    for every, steps, logged in ((None, 2, False), (None, 3, True), (1, 2, True)):
        monitor = GradScalerMonitor(log_every_n_steps=every)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=steps, log_every_n_steps=3, callbacks=[monitor]))
        trainer.fit(Classifier(DigitsMLP(hidden=(16,))), digits)
        assert monitor.optimizer_steps == steps
        assert ("grad_scaler/skip_rate" in trainer.callback_metrics) is logged, (every, steps)
