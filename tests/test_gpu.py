import sys
import types

import pytest
import torch

from lightning_quantum.gpu import gpu_status, memory_stats


def test_gpu_status_without_a_gpu_reports_unavailable():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status = gpu_status()
    assert status["available"] is False
    assert status["devices"] == []
    assert isinstance(status["reason"], str) and status["reason"]


def _fake_pynvml(fail_init=False):
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nvml.NVMLError = NVMLError
    nvml.NVML_TEMPERATURE_GPU = 0
    calls = {"shutdown": 0}

    def init():
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    def unsupported(*_):
        raise NVMLError("Not Supported")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)
    nvml.nvmlSystemGetDriverVersion = lambda: "575.51"
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-{h.removeprefix('handle')}".encode()
    nvml.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2 * 2**30, total=80 * 2**30)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37)
    nvml.nvmlDeviceGetTemperature = lambda h, kind: 41
    nvml.nvmlDeviceGetPowerUsage = lambda h: 123_400
    nvml.nvmlDeviceGetEnforcedPowerLimit = unsupported
    return nvml, calls


@pytest.mark.gpu_stand_in
def test_gpu_status_reads_every_field(monkeypatch):
    nvml, calls = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    status = gpu_status()
    assert status["available"] is True and status["driver_version"] == "575.51"
    (device,) = status["devices"]
    assert device == {
        "index": 0,
        "uuid": "GPU-0",
        "cuda_index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_used_mb": 2048.0,
        "memory_total_mb": 81920.0,
        "utilization_percent": 37,
        "temperature_c": 41,
        "power_w": 123.4,
        "power_limit_w": None,
    }
    assert calls["shutdown"] == 1


def test_gpu_status_when_driver_fails(monkeypatch):
    nvml, _ = _fake_pynvml(fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    status = gpu_status()
    assert status == {
        "available": False,
        "reason": "NVML could not start: Driver Not Loaded",
        "driver_version": None,
        "devices": [],
    }


def test_gpu_status_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    status = gpu_status()
    assert status["available"] is False and "nvidia-ml-py" in status["reason"]


def test_memory_stats_on_cpu():
    stats = memory_stats("cpu")
    assert set(stats) == {"memory/rss_mb"} and stats["memory/rss_mb"] > 10


@pytest.mark.gpu
def test_gpu_status_on_a_real_gpu():
    status = gpu_status()
    assert status["available"] and status["devices"][0]["memory_total_mb"] > 0
    stats = memory_stats("cuda:0")
    assert "memory/cuda_allocated_mb" in stats


def _cpu_4bit(monkeypatch):
    """Let Lightning's 4-bit layers quantize on the CPU (bitsandbytes >= 0.48 can; Lightning allows CUDA only)."""
    import bitsandbytes as bnb
    import lightning.fabric.plugins.precision.bitsandbytes as fabric_bnb

    def quantize(params4bit, weight, device):
        w = weight.contiguous().to(device="cpu", dtype=torch.half)
        packed, state = bnb.functional.quantize_4bit(
            w,
            blocksize=params4bit.blocksize,
            compress_statistics=params4bit.compress_statistics,
            quant_type=params4bit.quant_type,
            quant_storage=params4bit.quant_storage,
        )
        return fabric_bnb._replace_param(params4bit, packed, state)

    monkeypatch.setattr(fabric_bnb._Linear4bit, "quantize", staticmethod(quantize))
    return fabric_bnb


@pytest.mark.gpu_stand_in
def test_qlora_experiment_has_trainable_weights_and_the_right_dtypes(tmp_path, monkeypatch):
    """A stand-in for CUDA: the experiment's plugin converts the model as on a GPU, quantizing on the CPU."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from lightning_quantum.apps.train import match_bitsandbytes_dtype
    from lightning_quantum.callbacks.report import precision_of
    from tests.test_train_app import _cfg

    cfg = _cfg(tmp_path, "experiment=qlora_gpu", "model.net.dropout=0.0")
    plugin = instantiate(cfg.trainer.plugins[0])
    fabric_bnb = _cpu_4bit(monkeypatch)
    model = instantiate(cfg.model)
    with plugin.module_init_context():  # Lightning enters it around configure_model (ours shards under FSDP2)
        model.configure_model()
    match_bitsandbytes_dtype(model, [plugin])
    model = plugin.convert_module(model)
    for layer in model.modules():
        if isinstance(layer, fabric_bnb._Linear4bit):
            layer.quantize_(device=torch.device("cpu"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["net.head.weight", "net.head.bias"]  # the 4-bit layers are frozen, the head learns
    x, y = plugin.convert_input(torch.randn(8, 64)), torch.randint(0, 10, (8,))
    with plugin.forward_context():
        loss = model.training_step((x, y), 0)
    loss.backward()
    assert torch.isfinite(loss) and model.net.head.weight.grad.abs().sum() > 0
    trainer = SimpleNamespace(precision_plugin=plugin, precision="32-true")
    assert precision_of(trainer) == ("nf4-dq (bitsandbytes, bfloat16 compute)", "bf16-true")


def _fake_machine(monkeypatch, capabilities=((8, 0), (7, 5), (9, 0), (8, 6)), visible=None):
    """A fake NVML of four GPUs (NVML indices 0-3, UUIDs GPU-0 ... GPU-3) and ``CUDA_VISIBLE_DEVICES``."""
    nvml, calls = _fake_pynvml()
    nvml.nvmlDeviceGetCount = lambda: len(capabilities)
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-{h.removeprefix('handle')}".encode()
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: f"handle{uuid.removeprefix('GPU-')}"
    nvml.nvmlDeviceGetIndex = lambda h: int(h.removeprefix("handle"))
    nvml.nvmlDeviceGetCudaComputeCapability = lambda h: capabilities[int(h.removeprefix("handle"))]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return nvml, calls


@pytest.mark.gpu_stand_in
def test_cuda_devices_map_to_nvml_by_uuid_under_cuda_visible_devices(monkeypatch):
    from lightning_quantum.gpu import nvml_index

    nvml, calls = _fake_machine(monkeypatch, visible="2,GPU-3")
    assert [nvml_index(i, nvml) for i in (0, 1)] == [2, 3]  # CUDA 0 is NVML 2: NVML ignores the variable
    with pytest.raises(ValueError, match="CUDA device 2 is not among CUDA_VISIBLE_DEVICES='2,GPU-3'"):
        nvml_index(2, nvml)
    devices = gpu_status()["devices"]
    assert [(d["index"], d["uuid"], d["cuda_index"]) for d in devices] == [
        (0, "GPU-0", None),
        (1, "GPU-1", None),
        (2, "GPU-2", 0),
        (3, "GPU-3", 1),
    ]


@pytest.mark.gpu_stand_in
def test_nvml_shutdown_errors_are_not_raised_and_monitor_shuts_nvml_down_when_fit_raises(monkeypatch):
    from lightning_quantum.callbacks import MemoryMonitor

    nvml, calls = _fake_machine(monkeypatch)

    def failing_shutdown():
        calls["shutdown"] += 1
        raise nvml.NVMLError("Uninitialized")

    nvml.nvmlShutdown = failing_shutdown
    assert gpu_status()["available"] and calls["shutdown"] == 1
    monitor = MemoryMonitor()
    monitor._nvml_index = 2  # as `setup` leaves it on a GPU run
    monitor.on_exception(None, None, RuntimeError("fit failed"))
    assert monitor._nvml_index is None and calls["shutdown"] == 2


@pytest.mark.gpu_stand_in
def test_precision_auto_reads_the_chosen_device_without_initializing_cuda(monkeypatch):
    """`precision=auto` must not initialize CUDA in the launching process (fork-based DDP then fails),
    and must look at the device the Trainer will use."""
    import lightning_quantum.precision as precision

    _fake_machine(monkeypatch)
    monkeypatch.setattr(precision, "num_cuda_devices", lambda: 4)

    def initializes_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda was asked, which initializes CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_capability", initializes_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", initializes_cuda)
    assert precision.resolve_precision("auto").precision == "bf16-mixed"  # device 0: 8.0
    assert precision.resolve_precision("auto", devices=[1]).precision == "16-mixed"  # device 1: 7.5
    assert precision.resolve_precision("auto", devices="1,2").precision == "16-mixed"
