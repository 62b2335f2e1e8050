import json
import struct

import pytest
import torch
from torch import nn

from lightning_quantum.benchmark import (
    benchmark_model,
    evaluate_accuracy,
    global_sparsity,
    percentile,
    serialized_size_bytes,
)
from lightning_quantum.report import REPORT_FIELDS, build_report


def _header_length(blob: bytes) -> int:
    return struct.unpack("<Q", blob[:8])[0]


def test_size_of_known_net_matches_hand_count(tmp_path):
    net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    # 64*512 + 512 + 512*10 + 10 = 38410 fp32 numbers = 153640 bytes of tensor data
    tensor_bytes = (64 * 512 + 512 + 512 * 10 + 10) * 4
    assert tensor_bytes == 153_640
    size = serialized_size_bytes(net)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    blob = (tmp_path / "w.safetensors").read_bytes()
    # safetensors = 8-byte header length + JSON header + the raw tensor bytes, nothing else
    assert size == len(blob) == 8 + _header_length(blob) + tensor_bytes
    header = json.loads(blob[8 : 8 + _header_length(blob)])
    assert {k for k in header if k != "__metadata__"} == set(net.state_dict())


def test_tied_weights_are_counted_once():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    tied = nn.ModuleDict({"emb": emb, "head": head})
    untied = nn.ModuleDict({"emb": nn.Embedding(100, 16), "head": nn.Linear(16, 100, bias=False)})
    assert serialized_size_bytes(untied) - serialized_size_bytes(tied) >= 100 * 16 * 4


def test_half_precision_halves_the_tensor_bytes():
    net = nn.Linear(256, 256)
    full = serialized_size_bytes(net)
    half = serialized_size_bytes(net.half())
    data = (256 * 256 + 256) * 4
    assert full - half == pytest.approx(data / 2, abs=64)  # headers differ only in dtype strings


def test_compression_ratio_and_degradation_by_hand():
    big = nn.Linear(100, 100)  # 10100 fp32 numbers
    small = nn.Linear(100, 100).half()
    x = torch.randn(8, 100)
    data = [(x, torch.zeros(8, dtype=torch.long))]
    a = benchmark_model(big, eval_data=data, batch_size=8, warmup=1, repeats=3)
    b = benchmark_model(small, x.half(), eval_data=[(x.half(), torch.zeros(8, dtype=torch.long))], warmup=1, repeats=3)
    report = build_report(a, b, optimization_duration_seconds=1.5, reference_accuracy=0.9)
    assert report.compression_ratio == pytest.approx(a.model_size_bytes / b.model_size_bytes)
    assert 1.9 < report.compression_ratio < 2.0  # the JSON header does not halve
    assert report.accuracy_degradation == pytest.approx(0.9 - b.accuracy)
    assert report.optimization_duration_seconds == 1.5
    assert report.speedup == pytest.approx(a.inference_latency_ms / b.inference_latency_ms)
    for name in REPORT_FIELDS:
        assert getattr(report, name) is not None, name


def test_benchmark_fields_are_measured():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    xs = torch.randn(100, 64)
    ys = net(xs).argmax(-1)  # labels the net gets right by construction
    loader = [(xs[i : i + 25], ys[i : i + 25]) for i in range(0, 100, 25)]
    m = benchmark_model(net, eval_data=loader, batch_size=40, num_threads=1, warmup=2, repeats=7)
    assert m.accuracy == 1.0
    assert m.batch_size == 40 and m.num_threads == 1 and m.repeats == 7
    assert 0 < m.inference_latency_ms <= m.inference_latency_p95_ms
    assert m.requests_per_second > 0
    assert m.memory_consumption_mb >= (64 * 32 + 32 + 32 * 10 + 10) * 4 / 2**20
    assert m.device == "cpu" and m.precision == "32-true"
    assert net.training  # restored
    assert torch.get_num_threads() >= 1


def test_accuracy_with_half_wrong_labels():
    net = nn.Linear(4, 2)
    x = torch.randn(10, 4)
    pred = net(x).argmax(-1)
    y = pred.clone()
    y[:5] = 1 - y[:5]
    assert evaluate_accuracy(net, [(x, y)]) == pytest.approx(0.5)


def test_regrouped_batches_do_not_recompile_a_compiled_model():
    from torch._dynamo.utils import counters

    from lightning_quantum.compiled import compile_for_inference

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4))
    data = [(torch.randn(10, 8), torch.randint(0, 4, (10,))) for _ in range(3)]
    data.append((torch.randn(5, 8), torch.randint(0, 4, (5,))))  # 35 samples: 16 + 16 + 3
    compiled = compile_for_inference(net)
    evaluate_accuracy(compiled, data[:2], batch_size=16)  # compiled once, at 16 samples
    graphs = counters["stats"]["unique_graphs"]
    # the same figure as eager: the 13 filled-up rows of the last batch are not counted
    expected = evaluate_accuracy(net, data)
    assert evaluate_accuracy(compiled, data, batch_size=16) == pytest.approx(expected, abs=1e-9)
    assert counters["stats"]["unique_graphs"] == graphs  # no compile for 10, 5 or 3 samples
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_accuracy(net, data, batch_size=0)


def test_sparsity_by_hand():
    net = nn.Linear(10, 10)
    with torch.no_grad():
        net.weight[:3] = 0  # 30 of 100 weights; the bias (1-D) does not count
        net.bias.zero_()
    assert global_sparsity(net) == pytest.approx(0.3)


def test_percentile_matches_numpy_definition():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(4.8)
    assert percentile([7.0], 95) == 7.0


@pytest.mark.parametrize("bad", [-8, 0, 2.5 * 0])
def test_negative_batch_size_is_rejected(bad):
    with pytest.raises(ValueError, match=r"`batch_size`=.* must be a finite number greater than 0"):
        benchmark_model(nn.Linear(2, 2), eval_data=[(torch.randn(2, 2), torch.zeros(2))], batch_size=bad)


def test_nothing_to_time_is_an_error():
    with pytest.raises(ValueError, match="`example_inputs` or `eval_data`"):
        benchmark_model(nn.Linear(2, 2))


def test_bad_batch_layout_is_an_error():
    with pytest.raises(ValueError, match="Valid layouts"):
        evaluate_accuracy(nn.Linear(2, 2), [(torch.randn(2, 2), torch.zeros(2), "extra")])


@pytest.mark.gpu_stand_in
def test_cuda_working_memory_leaves_out_what_was_allocated_before(monkeypatch):
    """A stand-in for a GPU: the allocator figures of a device already holding 900 MiB (model, optimizer, a
    baseline copy) that peaks at 930 MiB in the call; the working memory is the 30 MiB increase."""
    from lightning_quantum.benchmark import peak_increase_bytes

    mib = 2**20
    state = {"allocated": 900 * mib, "peak": 900 * mib}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"])
    )
    assert peak_increase_bytes(lambda: state.update(peak=930 * mib), torch.device("cuda", 0)) == 30 * mib
