"""FSDP2 (Lightning's ModelParallelStrategy with fully_shard): pruning on sharded DTensor weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_quantum.callbacks import Pruning
from lightning_quantum.pruning import structured_masks, unstructured_masks
from lightning_quantum.pruning.masks import nm_masks
from lightning_quantum.pruning.sharded import sharded_keep_mask
from tests.conftest import trainer_kwargs

SCRIPT = Path(__file__).with_name("fsdp2_pruning_script.py")
QAT_SCRIPT = Path(__file__).with_name("fsdp2_qat_script.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(script, tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def mesh(tmp_path):
    """A one-rank gloo process group and mesh: DTensors in this process, as FSDP2 makes them."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _weights(sharded_on=None):
    torch.manual_seed(0)
    plain = {"a.weight": torch.randn(12, 8), "b.weight": torch.randn(6, 12)}
    if sharded_on is None:
        return plain
    return {n: distribute_tensor(w, sharded_on, [Shard(0)]) for n, w in plain.items()}


def test_sharded_masks_are_the_single_process_masks(mesh):
    plain, sharded = _weights(), _weights(mesh)
    for scope in ("global", "layer"):
        first = unstructured_masks(sharded, 0.4, scope=scope)
        assert all(isinstance(m, DTensor) for m in first.values())
        expected = unstructured_masks(plain, 0.4, scope=scope)
        assert all(torch.equal(first[n].full_tensor(), expected[n]) for n in plain)
        grown = unstructured_masks(sharded, 0.7, scope=scope, previous=first)  # masks only grow
        expected = unstructured_masks(plain, 0.7, scope=scope, previous=expected)
        assert all(torch.equal(grown[n].full_tensor(), expected[n]) for n in plain)
    rows = structured_masks(sharded, 0.5, norm=2)
    assert all(torch.equal(rows[n].full_tensor(), structured_masks(plain, 0.5, norm=2)[n]) for n in plain)
    nm = nm_masks(sharded)
    assert all(torch.equal(nm[n].full_tensor(), nm_masks(plain)[n]) for n in plain)


def test_the_threshold_search_removes_exactly_n_even_with_ties(mesh):
    scores = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.9, 0.0, 2.0])
    keep = sharded_keep_mask(scores, 3, None, dist.group.WORLD)
    assert int((~keep).sum()) == 3 and not keep[5] and keep[[0, 4, 6]].all()  # 0.0, then two of the 0.1s
    again = sharded_keep_mask(scores, 3, keep, dist.group.WORLD)
    assert torch.equal(again, keep)  # already at the target: nothing more


def test_structured_pruning_under_fsdp2_names_the_alternatives(mesh):
    from lightning_quantum.models import Classifier, DigitsMLP

    model = Classifier(DigitsMLP(hidden=(16,), dropout=0.0))
    for module in (model.net.blocks[0].linear,):
        module.weight = torch.nn.Parameter(distribute_tensor(module.weight.detach(), mesh, [Shard(0)]))
    pruning = Pruning(method="l2_structured")
    pruning._targets = ["net.blocks.0.linear.weight"]
    with pytest.raises(MisconfigurationException, match=r"`method`='l2_structured'.*FSDP2.*'l1_unstructured'"):
        pruning._check_sharding(model)


#: Each two-process test runs on CPU processes (gloo), and on two GPUs (NCCL) where a machine has them.
ACCELERATORS = [
    pytest.param("cpu", marks=pytest.mark.parity),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_two_process_fsdp2_pruning_matches_one_process(tmp_path, accelerator):
    """Same initial weights and data (2 ranks x 32 samples against one process x 64): after the mask
    update at step 2 and two more steps, masks equal, weights within 1e-5, pruned weights zero on
    every shard after every optimizer step."""
    for mode in ("fsdp2", "single"):
        _run(SCRIPT, tmp_path, mode, "4", "--accelerator", accelerator)
    ranks = [torch.load(tmp_path / f"fsdp2-rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = torch.load(tmp_path / "single-rank0.pt", weights_only=True)
    assert all(bool(rank["sharded"]) for rank in ranks) and not bool(single["sharded"])
    for key, value in single.items():
        if key.startswith("mask/"):
            assert torch.equal(ranks[0][key], value) and torch.equal(ranks[1][key], value), key
        elif key.startswith("weight/"):
            # gradients summed over 2 shards in another order than over one batch: within 1e-5
            assert torch.allclose(ranks[0][key], value, atol=1e-5, rtol=0), key
    assert [int(rank["bad_zeros"]) for rank in ranks] == [0, 0]
    masks = [v for k, v in single.items() if k.startswith("mask/")]
    assert sum(int((~m).sum()) for m in masks) == round(0.5 * sum(m.numel() for m in masks))


@pytest.mark.slow
@pytest.mark.parity
def test_fsdp2_pruning_resumes_from_a_sharded_mid_schedule_checkpoint(tmp_path):
    """Masks are saved shard by shard in the distributed checkpoint; a run resumed at step 4 of a
    schedule that ends at step 8 ends where the uninterrupted run ends."""
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    _run(SCRIPT, tmp_path, "fsdp2", "8", "--schedule", "cubic", "--save-at", "4", "--tag=-full")
    _run(SCRIPT, tmp_path, "fsdp2", "8", "--schedule", "cubic", "--resume", str(checkpoint), "--tag=-resumed")
    assert (tmp_path / "ckpt" / "epoch=0-step=4.ckpt" / "meta.pt").is_file()  # a sharded (distributed) checkpoint
    for rank in (0, 1):
        full = torch.load(tmp_path / f"fsdp2-full-rank{rank}.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"fsdp2-resumed-rank{rank}.pt", weights_only=True)
        assert torch.equal(full["history"], resumed["history"])
        for key, value in full.items():
            if key.startswith(("mask/", "weight/")):
                assert torch.equal(resumed[key], value), key  # the same operations on the same inputs: bitwise
        assert int(resumed["bad_zeros"]) == 0


@pytest.mark.slow  # two processes, 35 s on a 2-core Zen 3: `make test-slow`
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_two_process_fsdp2_qat_matches_one_process(tmp_path, accelerator):
    """QAT prepared before FSDP2 shards the model (torchao's order): before any step the fake-quantized
    outputs are equal, and after 2 optimizer steps they are within 1e-5 of one process's that
    accumulates the gradients of the batches the 2 ranks saw (measured: equal, and the float outputs
    1.5e-8 apart on one logit). Against one process with the global batch of 64 the gradients are
    summed in another order, a weight 1e-8 apart can round to the next int8 value, and the
    fake-quantized logits differ by up to 1.0e-3 (120 of 640): that comparison is the slow test's
    accuracy after a whole fit."""
    for mode in ("fsdp2", "accumulated"):
        _run(QAT_SCRIPT, tmp_path, mode, "2", "--accelerator", accelerator)
    sharded, single = (torch.load(tmp_path / f"qat-{m}.pt", weights_only=True) for m in ("fsdp2", "accumulated"))
    assert torch.equal(sharded["at_start"], single["at_start"])
    assert not torch.equal(sharded["at_start"], sharded["fake_quantized"])  # the 2 steps changed the model
    assert torch.allclose(sharded["float"], single["float"], atol=1e-5, rtol=0)
    assert torch.allclose(sharded["fake_quantized"], single["fake_quantized"], atol=1e-5, rtol=0)


@pytest.mark.slow  # two processes, 36 s on a 2-core Zen 3: `make test-slow` and `make test-parity`
@pytest.mark.parity
def test_two_process_fsdp2_qat_refreshes_fixed_ranges_as_one_process(tmp_path):
    """Ranges fixed at step 0 and computed again at step 1 from the sharded weights, gathered whole: the
    same scales and outputs as one process's."""
    for mode in ("fsdp2", "accumulated"):
        _run(QAT_SCRIPT, tmp_path, mode, "2", "--refresh")
    sharded, single = (
        torch.load(tmp_path / f"qat-{m}-refreshed.pt", weights_only=True) for m in ("fsdp2", "accumulated")
    )
    assert torch.allclose(sharded["scale"], single["scale"], atol=1e-7, rtol=0)
    assert torch.allclose(sharded["fake_quantized"], single["fake_quantized"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parity
def test_fsdp2_qat_converts_whole_on_rank_zero(tmp_path):
    """After a full fit, rank zero gathers the sharded weights, converts them and writes one safetensors
    file; its accuracy is within one test image of the one-process run's, and it reloads as it was."""
    for mode in ("fsdp2", "single"):
        _run(QAT_SCRIPT, tmp_path, mode, "60", "--convert")
    sharded, single = (torch.load(tmp_path / f"qat-{m}-converted.pt", weights_only=True) for m in ("fsdp2", "single"))
    assert abs(float(sharded["accuracy"]) - float(single["accuracy"])) <= 1 / 270 + 1e-9  # one of 270 test images
    assert float(sharded["reloaded_accuracy"]) == float(sharded["accuracy"])
    assert (tmp_path / "qat_converted.safetensors").is_file()


def test_fsdp2_is_a_strategy_name_and_another_model_parallel_strategy_stops_the_whole_model_callbacks():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    import lightning_quantum as lq
    from lightning_quantum.callbacks import DeploymentGate, OptimizationReport
    from lightning_quantum.callbacks._common import check_whole_model_available

    kwargs = lq.recipe("quantum", strategy="fsdp2", devices=2, accelerator="cpu").trainer_kwargs()
    trainer = pl.Trainer(**{**kwargs, "logger": False, "enable_checkpointing": False})
    assert isinstance(trainer.strategy, lq.FSDP2Strategy)
    assert {type(c).__name__ for c in trainer.callbacks} >= {"DeploymentGate", "OptimizationReport", "ModelExport"}
    check_whole_model_available(trainer)  # FSDP2Strategy gathers the model whole on rank zero
    other = pl.Trainer(
        **{**kwargs, "strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "logger": False}
    )
    names = r"DeploymentGate, ModelExport, OptimizationReport need .*fsdp2"
    with pytest.raises(MisconfigurationException, match=names):
        check_whole_model_available(other)
    plain = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[DeploymentGate(), OptimizationReport()])
    check_whole_model_available(plain)  # not FSDP2: nothing to gather


@pytest.fixture
def restored_environ():
    """Lightning sets MASTER_PORT and the rank variables of an in-process distributed fit in
    ``os.environ``; the later tests' processes must not inherit them (the port is taken)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_the_gate_report_and_export_get_the_model_gathered_whole_under_fsdp2(tmp_path, restored_environ):
    """strategy="fsdp2" on one rank (DTensor weights, the same gathering as on two): at fit end the
    callbacks that need the whole model share one copy gathered on rank zero; QAT converts it, the
    gate measures it, the export writes it and the report measures what the gate shipped. The trained
    module stays sharded, and the gathered float weights compute what the sharded ones do."""
    import lightning.pytorch as pl
    from safetensors.torch import load_file

    from lightning_quantum.callbacks import DeploymentGate, ModelExport, OptimizationReport, QuantizationAwareTraining
    from lightning_quantum.data import DigitsDataModule
    from lightning_quantum.models import Classifier, DigitsMLP
    from lightning_quantum.quantization import set_fake_quant_enabled

    torch.manual_seed(0)
    model = Classifier(DigitsMLP(hidden=(32,), dropout=0.0))
    qat = QuantizationAwareTraining(start_step=0)
    gate = DeploymentGate(numerics=("float", "int8"), runners=("eager",), repeats=2, rounds=1, max_eval_batches=1)
    export = ModelExport(formats=["safetensors"])
    report = OptimizationReport(print_table=False, repeats=2, max_eval_batches=1, compare_train_step=False)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, strategy="fsdp2", max_steps=3, callbacks=[qat, gate, export, report])
    )
    try:
        trainer.fit(model, DigitsDataModule(batch_size=32))
        assert isinstance(model.net.head.weight, DTensor)  # the trained module stays sharded
        x = torch.randn(8, 64)
        set_fake_quant_enabled(model, False)
        with torch.no_grad():
            assert torch.equal(qat.float_model(x), model(x))
    finally:
        dist.destroy_process_group()
    assert qat.converted_model is not None and not any(isinstance(p, DTensor) for p in qat.converted_model.parameters())
    written, converted = load_file(export.paths["safetensors"]), load_file(qat.converted_path)
    assert written.keys() == converted.keys() and all(torch.equal(written[k], converted[k]) for k in written)
    assert gate.decision is not None and report.report is not None
    assert report.report.precision.startswith(gate.decision.form)
    assert report.report.accuracy_reference == "the float model before int8 conversion"
    assert report.paths["json"].is_file()


def test_lq_train_composes_the_fsdp2_trainer():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_quantum.apps._config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp2", "level=quantum"])
    assert cfg.trainer.strategy == "fsdp2" and cfg.trainer.devices == 2


DISTILL_SCRIPT = Path(__file__).with_name("fsdp2_distill_script.py")


@pytest.mark.parametrize(
    "teacher_sharding",
    [
        pytest.param("shard", marks=[pytest.mark.slow, pytest.mark.parity]),
        pytest.param("replicate", marks=pytest.mark.slow),
    ],
)
def test_two_process_fsdp2_distillation_matches_one_process(tmp_path, teacher_sharding):
    """The teacher (sharded, or whole on each rank) is bit-identical after the fit, frozen and in eval
    mode; the student matches the one-process student within 1e-5 after 2 steps."""
    _run(DISTILL_SCRIPT, tmp_path, "fsdp2", "2", "--teacher-sharding", teacher_sharding)
    _run(DISTILL_SCRIPT, tmp_path, "single", "2")
    sharded = torch.load(tmp_path / f"distill-fsdp2-{teacher_sharding}.pt", weights_only=True)
    single = torch.load(tmp_path / "distill-single-replicate.pt", weights_only=True)
    assert bool(sharded["teacher_sharded"]) == (teacher_sharding == "shard")
    assert not bool(sharded["teacher_training"])
    assert all(bool(v) for k, v in sharded.items() if k.startswith("teacher_unchanged/"))
    for key, value in single.items():
        if key.startswith("student/"):
            assert torch.allclose(sharded[key], value, atol=1e-5, rtol=0), key


@pytest.mark.slow
@pytest.mark.parity
def test_ultra_under_fsdp2_resumes_from_a_sharded_mid_schedule_checkpoint(tmp_path):
    """lq-train level=ultra under FSDP2 (distillation, unstructured pruning, QAT), resumed from the
    distributed checkpoint of epoch 2 of 4, writes the same converted model as the uninterrupted run;
    the report, the gate and the export measure and write the model gathered on rank zero."""
    from safetensors.torch import load_file

    common = [
        "trainer=fsdp2",
        "level=ultra",
        "trainer.max_epochs=4",
        "logger=none",
        "callbacks.rich_progress_bar=null",
        "callbacks.pruning.method=l1_unstructured",
        "callbacks.pruning.slim=false",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    middle = tmp_path / "full" / "checkpoints" / "epoch_001.ckpt"
    for out, extra in ((tmp_path / "full", []), (tmp_path / "resumed", [f"ckpt_path='{middle}'"])):
        command = [sys.executable, "-m", "lightning_quantum.apps.train", *common, f"paths.output_dir={out}", *extra]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (middle / "meta.pt").is_file()
    full = load_file(tmp_path / "full" / "qat_converted.safetensors")  # safetensors: nothing is unpickled
    resumed = load_file(tmp_path / "resumed" / "qat_converted.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    report = json.loads((tmp_path / "resumed" / "report.json").read_text())  # measured on the gathered model
    assert report["accuracy_reference"] == "the teacher" and report["extra"]["teacher"]["accuracy"] > 0.9
    # sizes of the whole model, not of rank zero's shard (about half): the student at fit start holds 4 bytes per
    # weight and bias, and every form the gate may ship (float, bf16 or int8: its choice on this machine) at least
    # the bytes of the converted int8 tensors
    weights = sum(t.numel() for k, t in resumed.items() if k.endswith(("_weight_qdata", ".bias")))
    assert report["original_model_size_mb"] * 2**20 >= 4 * weights
    assert report["optimized_model_size_mb"] * 2**20 >= sum(t.numel() * t.element_size() for t in resumed.values())
    assert (tmp_path / "resumed" / "model.safetensors").is_file() and report["extra"]["deployment"]["form"]


@pytest.mark.slow
@pytest.mark.parity
def test_a_full_fsdp2_pruning_fit_ends_as_one_process_does(tmp_path):
    """A whole cubic schedule (steps 2 to 8 of 60): the same global sparsity within one weight per layer,
    and test accuracy within one test image of the one-process run."""
    from lightning_quantum.benchmark import evaluate_accuracy
    from lightning_quantum.data import DigitsDataModule
    from lightning_quantum.models import DigitsMLP

    for mode in ("fsdp2", "single"):
        _run(SCRIPT, tmp_path, mode, "60", "--schedule", "cubic", "--tag=-fit")
    data = DigitsDataModule(batch_size=64)
    data.setup("test")
    accuracy, zeros = {}, {}
    for mode in ("fsdp2", "single"):
        state = torch.load(tmp_path / f"{mode}-fit-rank0.pt", weights_only=True)
        net = DigitsMLP(hidden=(64, 64), dropout=0.0)
        net.load_state_dict({k.removeprefix("weight/net."): v for k, v in state.items() if k.startswith("weight/")})
        accuracy[mode] = evaluate_accuracy(net, data.test_dataloader())
        zeros[mode] = {k: int((~v).sum()) for k, v in state.items() if k.startswith("mask/")}
        assert int(state["bad_zeros"]) == 0
    assert all(abs(zeros["fsdp2"][k] - zeros["single"][k]) <= 1 for k in zeros["single"]), zeros
    assert sum(zeros["fsdp2"].values()) == sum(zeros["single"].values())
    assert abs(accuracy["fsdp2"] - accuracy["single"]) <= 1 / 270 + 1e-9, accuracy
