import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quantum.callbacks import MemoryMonitor
from tests.conftest import trainer_kwargs


def test_logs_rss_every_n_steps_and_keeps_peaks(tmp_path, tiny_classifier, digits):
    monitor = MemoryMonitor(log_every_n_steps=2)
    logged = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.append("memory/rss_mb" in trainer.callback_metrics)

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[monitor, Spy()]))
    trainer.fit(tiny_classifier, digits)
    assert logged[0] is True
    assert monitor.peak_mb["memory/rss_mb"] > 10
    state = monitor.state_dict()
    restored = MemoryMonitor()
    restored.load_state_dict(state)
    assert restored.peak_mb == monitor.peak_mb


def test_invalid_interval():
    with pytest.raises(MisconfigurationException, match=r"`log_every_n_steps`=0 is not valid"):
        MemoryMonitor(log_every_n_steps=0)


@pytest.mark.gpu
def test_logs_cuda_figures_on_gpu(tmp_path, tiny_classifier, digits):
    monitor = MemoryMonitor(log_every_n_steps=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, accelerator="gpu", callbacks=[monitor]))
    trainer.fit(tiny_classifier, digits)
    assert monitor.peak_mb["memory/cuda_peak_allocated_mb"] > 0
    assert "memory/gpu_used_mb" in monitor.peak_mb
    assert torch.cuda.is_available()
