import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_quantum.callbacks import OptimizationReport
from lightning_quantum.distillation import DistillationModule, feature_loss, kd_loss
from lightning_quantum.models import DigitsCNN, DigitsMLP
from tests.conftest import trainer_kwargs


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    temperature = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert float(kd_loss(s, t, temperature)) == pytest.approx(temperature**2 * kl, rel=1e-6)
    assert float(kd_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_errors():
    with pytest.raises(ValueError, match=r"`temperature`=0 is not valid"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match=r"student \(2, 3\), teacher \(2, 4\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_feature_loss_kinds():
    a = torch.tensor([[1.0, 0.0]])
    assert float(feature_loss(a, torch.tensor([[0.0, 1.0]]), "cosine")) == pytest.approx(1.0)
    assert float(feature_loss(a, torch.tensor([[3.0, 0.0]]), "mse")) == pytest.approx(2.0)


def _teacher():
    torch.manual_seed(1)
    return DigitsCNN()


@pytest.mark.parity
def test_teacher_stays_frozen_in_eval_and_out_of_the_checkpoint(tmp_path):
    from lightning_quantum.data import DigitsDataModule

    teacher = _teacher()
    bn_before = teacher.features[0].bn.running_mean.clone()
    model = DistillationModule(DigitsMLP(hidden=(32,), dropout=0.0), teacher, num_classes=10)
    modes = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            modes.append(pl_module.teacher.training)

        def on_validation_batch_start(self, trainer, pl_module, *args):
            modes.append(pl_module.teacher.training)

    dm = DigitsDataModule(batch_size=32, layout="flat")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[Spy()]))
    trainer.fit(model, dm)
    assert modes and not any(modes)
    assert torch.equal(teacher.features[0].bn.running_mean, bn_before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_params & {id(p) for p in teacher.parameters()}
    trainer.save_checkpoint(tmp_path / "d.ckpt")
    state = torch.load(tmp_path / "d.ckpt", weights_only=True)
    assert not any(k.startswith("teacher") for k in state["state_dict"]) and "teacher_state_dict" not in state
    fresh = DistillationModule(DigitsMLP(hidden=(32,), dropout=0.0), _teacher(), num_classes=10)
    fresh.load_state_dict(state["state_dict"])
    x = torch.randn(4, 64)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


def test_feature_pairs_with_projection_and_report(tmp_path):
    from lightning_quantum.data import DigitsDataModule

    torch.manual_seed(0)
    teacher = DigitsMLP(hidden=(256, 256), dropout=0.0)
    model = DistillationModule(
        DigitsMLP(hidden=(32,), dropout=0.0),
        teacher,
        num_classes=10,
        feature_pairs={"blocks.0": "blocks.1"},
        feature_weight=0.5,
        save_teacher=True,
    )
    report = OptimizationReport(output_dir=tmp_path, warmup=0, repeats=2, compare_train_step=False, print_table=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, log_every_n_steps=1, callbacks=[report]))
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert isinstance(model.projections["blocks__0"], nn.Linear)
    assert model.projections["blocks__0"].weight.shape == (256, 32)
    assert "distill/feature_loss" in trainer.callback_metrics
    extra = report.report.extra["distillation"]
    assert extra["teacher_parameters"] > 4 * extra["student_parameters"]
    markdown = (tmp_path / "report.md").read_text()
    assert "## Student vs teacher" in markdown and "| parameters | " in markdown.split("Student vs teacher")[1]
    # the student's top-1 agreement with the teacher on the report's evaluation data, computed by hand
    with torch.no_grad():
        pairs = [(model.student(x).argmax(-1), teacher(x).argmax(-1)) for x, _ in report._eval_loader(trainer)]
    by_hand = float(torch.cat([s == t for s, t in pairs]).float().mean())
    versus = report.report.extra["student_vs_teacher"]
    assert versus["agreement_kind"] == "top-1" and versus["agreement"] == pytest.approx(by_hand, abs=1e-6)
    assert "| agreement with the teacher (top-1) | 1 |" in markdown
    from rich.console import Console

    from lightning_quantum.report import render_rich_table

    console = Console(width=120)
    with console.capture() as captured:
        console.print(render_rich_table(report.report))
    assert "Student vs teacher" in captured.get()
    trainer.save_checkpoint(tmp_path / "f.ckpt")
    state = torch.load(tmp_path / "f.ckpt", weights_only=True)
    assert "teacher_state_dict" in state  # asked for
    fresh = DistillationModule(
        DigitsMLP(hidden=(32,), dropout=0.0),
        DigitsMLP(hidden=(256, 256), dropout=0.0),
        num_classes=10,
        feature_pairs={"blocks.0": "blocks.1"},
    )
    fresh.on_load_checkpoint(state)
    fresh.load_state_dict(state["state_dict"])
    assert torch.equal(fresh.teacher.head.weight, teacher.head.weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, r"`temperature`=0.0 is not valid"),
        ({"alpha": 0.0, "beta": 0.0}, r"All loss weights are zero"),
        ({"alpha": -1.0}, r"`alpha`=-1.0 is not valid"),
        ({"feature_pairs": {"blocks.O": "blocks.0"}}, r"student layer 'blocks.O'.*Close matches: \['blocks.0'"),
        ({"feature_pairs": {"head": "haed"}}, r"teacher layer 'haed'.*Close matches: \['head'\]"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationModule(DigitsMLP(hidden=(16,)), DigitsMLP(hidden=(32,)), **kwargs)


def test_digits_teacher_trains_once_and_reloads(tmp_path):
    from lightning_quantum.distillation import digits_teacher

    path = tmp_path / "teacher.safetensors"
    first = digits_teacher(path, epochs=1)
    assert path.is_file() and not first.training
    again = digits_teacher(path, epochs=1)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def _distill_losses(tmp_path, cache, return_index=True, **kwargs):
    from lightning_quantum.data import DigitsDataModule

    torch.manual_seed(0)
    model = DistillationModule(
        DigitsMLP(hidden=(32,), dropout=0.0), _teacher(), num_classes=10, cache_teacher=cache, **kwargs
    )
    losses = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=1.0, limit_val_batches=0, callbacks=[Spy()])
    )
    trainer.fit(model, DigitsDataModule(batch_size=32, return_index=return_index))
    return losses, model


def assert_same_losses(cached, uncached):
    """Cached and uncached runs of two epochs agree: exactly in the first, within float32 rounding after.

    In the first epoch both runs compute the teacher on the same batches: the same operations on the
    same inputs, so the losses are bitwise equal. In the second, the cached run reads teacher outputs
    computed in epoch 0's batches, the uncached run recomputes them in epoch 1's: the kernels may
    round a sample's logits differently by its place in the batch (seen: one float32 ulp, 6e-8
    relative, on an AMD EPYC; none on an Intel Xeon), and about 40 optimizer steps carry that along
    (8.5e-8 relative at most, measured). rtol 1e-5 leaves a hundredfold margin and still fails for a
    wrong or stale cache entry, which moves a loss in the second or third digit.
    """
    half = len(uncached) // 2
    assert len(cached) == len(uncached) == 2 * half
    assert cached[:half] == uncached[:half]
    assert cached[half:] == pytest.approx(uncached[half:], rel=1e-5, abs=0)


@pytest.mark.parity
def test_cached_and_uncached_runs_give_identical_losses(tmp_path):
    uncached, _ = _distill_losses(tmp_path, "off")
    cached, model = _distill_losses(tmp_path, "memory")
    assert_same_losses(cached, uncached)
    # epoch 0 fills the cache with the 1257 training samples; epoch 1 reads every one of them back
    assert (model.cache_lookups, model.cache_hits) == (2 * 1257, 1257)
    assert model.cache_off_reason is None


@pytest.mark.parity
def test_disk_cache_gives_the_same_losses_and_removes_its_file(tmp_path):
    uncached, _ = _distill_losses(tmp_path, "off")
    files = []

    class Peek(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            files.append(pl_module.cache_path)

    cached, model = _distill_losses(tmp_path / "run", "disk", cache_dir=str(tmp_path / "cache"))
    assert_same_losses(cached, uncached)
    assert (model.cache_lookups, model.cache_hits) == (2 * 1257, 1257)
    assert model.cache_path is None and not list((tmp_path / "cache" / "teacher_cache").iterdir())
    too_small, model = _distill_losses(tmp_path, "disk", cache_max_mb=0.01)
    assert too_small == uncached and "above `cache_max_mb`=0.01" in model.cache_off_reason


def test_cache_turns_itself_off_with_a_reason(tmp_path):
    _, model = _distill_losses(tmp_path, "memory", return_index=False)
    assert "carry no sample index" in model.cache_off_reason and model.cache_lookups == 0
    with_features = DistillationModule(
        DigitsMLP(hidden=(32,)),
        DigitsMLP(hidden=(64,)),
        num_classes=10,
        cache_teacher="memory",
        feature_pairs={"blocks.0": "blocks.0"},
    )
    from lightning_quantum.data import DigitsDataModule

    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2)).fit(
        with_features, DigitsDataModule(batch_size=32, return_index=True)
    )
    assert "feature or attention pairs" in with_features.cache_off_reason


def _tiny_bert(layers=4):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertModel(config).eval()


def test_student_from_teacher_copies_the_chosen_layers():
    from lightning_quantum.distillation import layer_map, student_from_teacher

    teacher = _tiny_bert(4)
    student = student_from_teacher(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert torch.equal(student.encoder.layer[0].output.dense.weight, teacher.encoder.layer[1].output.dense.weight)
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert (
        student.encoder.layer[0].output.dense.weight.data_ptr()
        != teacher.encoder.layer[1].output.dense.weight.data_ptr()
    )
    assert layer_map(3, 6) == {
        "encoder.layer.0": "encoder.layer.1",
        "encoder.layer.1": "encoder.layer.3",
        "encoder.layer.2": "encoder.layer.5",
    }
    with pytest.raises(ValueError, match=r"`layers`=\[3, 1\] is not valid. Give increasing, distinct"):
        student_from_teacher(teacher, [3, 1])
    with pytest.raises(ValueError, match=r"`dropout`=1.5 is not valid: give a probability in \[0, 1\)"):
        student_from_teacher(teacher, [1, 3], dropout=1.5)
    with pytest.raises(ValueError, match=r"must divide `teacher_layers`=6"):
        layer_map(4, 6)


def test_student_without_dropout_and_with_a_frozen_embedding_table(tmp_path):
    from lightning_quantum.distillation import SentenceEncoder, student_from_teacher

    teacher = _tiny_bert(4)
    teacher.config.hidden_dropout_prob = 0.1
    student = student_from_teacher(teacher, [0, 2], dropout=0.0, freeze_word_embeddings=True)
    dropouts = [m for m in student.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert student.config.hidden_dropout_prob == 0.0 and teacher.config.hidden_dropout_prob == 0.1
    assert any(m.p > 0 for m in teacher.modules() if isinstance(m, torch.nn.Dropout))  # the teacher keeps its own
    # without dropout, training mode computes what eval mode does
    ids = torch.randint(0, 64, (3, 8))
    student.train()
    first = student(input_ids=ids).last_hidden_state
    assert torch.allclose(first, student(input_ids=ids).last_hidden_state)
    table = student.embeddings.word_embeddings.weight
    assert not table.requires_grad and student.embeddings.position_embeddings.weight.requires_grad
    before = table.detach().clone()
    model = DistillationModule(
        SentenceEncoder(student), SentenceEncoder(teacher), alpha=0.0, beta=1.0, output_loss="cosine"
    )
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert id(table) not in optimized and id(student.encoder.layer[0].output.dense.weight) in optimized
    batches = [
        {"x": {"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}}
        for _ in range(4)
    ]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[])).fit(model, loader)
    assert model.global_step == 4 and not torch.equal(
        student.encoder.layer[0].output.dense.weight, teacher.encoder.layer[0].output.dense.weight
    )
    assert torch.equal(table, before)


def test_embedding_distillation_with_hidden_state_pairs(tmp_path):
    from lightning_quantum.distillation import SentenceEncoder, student_from_teacher

    teacher = SentenceEncoder(_tiny_bert(4))
    student = SentenceEncoder(student_from_teacher(teacher.model, [0, 2]))
    model = DistillationModule(
        student,
        teacher,
        alpha=0.0,
        beta=1.0,
        output_loss="cosine",
        feature_pairs={
            "model.encoder.layer.0": "model.encoder.layer.1",
            "model.encoder.layer.1": "model.encoder.layer.3",
        },
    )
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (64, 12))
    batches = [
        {"x": {"input_ids": ids[i : i + 16], "attention_mask": torch.ones(16, 12, dtype=torch.long)}}
        for i in range(0, 64, 16)
    ]

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(batches[:1], batch_size=None)

    def loss():
        with torch.no_grad():
            return float(model._losses(batches[0])[0])

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[]))
    trainer.fit(model, Data())  # sizes the projections (identity here: same widths)
    before = loss()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=8, log_every_n_steps=1, callbacks=[]))
    trainer.fit(model, Data())
    assert "distill/output_loss" in trainer.callback_metrics and "distill/feature_loss" in trainer.callback_metrics
    assert loss() < 0.5 * before


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_teacher_at_lower_precision_is_a_copy_and_trains(tmp_path, precision):
    from lightning_quantum.data import DigitsDataModule

    teacher = DigitsMLP(hidden=(64, 64), dropout=0.0).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = DistillationModule(DigitsMLP(hidden=(32,)), teacher, num_classes=10, teacher_precision=precision)
    assert model.teacher is not teacher
    x = torch.randn(8, 64)
    with torch.no_grad():
        low = model._teacher_forward(x)
        full = teacher(x)
    assert low.dtype == torch.float32
    assert torch.allclose(low, full, atol=0.1, rtol=0.1) and not torch.equal(low, full)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3)).fit(model, DigitsDataModule(batch_size=32))
    for k, v in teacher.state_dict().items():  # the user's teacher is untouched
        assert v.dtype == torch.float32 and torch.equal(v, before[k])
    with pytest.raises(ValueError, match=r"`teacher_precision`='fp16' is not valid.*'bf16'"):
        DistillationModule(DigitsMLP(hidden=(32,)), teacher, teacher_precision="fp16")


def test_attention_distillation_matches_attention_maps(tmp_path):
    from lightning_quantum.distillation import SentenceEncoder, student_from_teacher
    from lightning_quantum.distillation.losses import attention_kl

    p = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    q = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    by_hand = (p * (p / q).log()).sum(-1).mean()
    assert float(attention_kl(q, p)) == pytest.approx(float(by_hand), rel=1e-4)
    assert float(attention_kl(p, p)) == pytest.approx(0.0, abs=1e-6)

    bert = _tiny_bert(4)
    bert.set_attn_implementation("eager")
    teacher = SentenceEncoder(bert)
    student = SentenceEncoder(student_from_teacher(bert, [0, 2]))
    pairs = {
        "model.encoder.layer.0.attention.self": "model.encoder.layer.1.attention.self",
        "model.encoder.layer.1.attention.self": "model.encoder.layer.3.attention.self",
    }
    model = DistillationModule(student, teacher, alpha=0.0, beta=0.0, attention_pairs=pairs, attention_weight=1.0)
    torch.manual_seed(1)
    batch = {"x": {"input_ids": torch.randint(0, 64, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss, parts, _, _ = model._losses(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(parts["attention_loss"]))
    assert losses[-1] < 0.5 * losses[0]

    sdpa = _tiny_bert(4)
    sdpa.set_attn_implementation("sdpa")
    model = DistillationModule(
        SentenceEncoder(student_from_teacher(sdpa, [0, 2])),
        SentenceEncoder(sdpa),
        alpha=0.0,
        beta=0.0,
        attention_pairs=pairs,
    )
    with pytest.raises(ValueError, match=r"attn_implementation='eager'"):
        model._losses(batch)
    with pytest.raises(ValueError, match=r"`attention_pairs` names student layer 'model.encoder.layer.9"):
        DistillationModule(student, teacher, attention_pairs={"model.encoder.layer.9.attention.self": "x"})


def test_a_student_with_another_class_count_is_refused_at_setup(tmp_path):
    from lightning_quantum.data import DigitsDataModule

    model = DistillationModule(DigitsMLP(hidden=(16,), num_classes=5), _teacher(), num_classes=10)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    with pytest.raises(
        ValueError, match=r"`num_classes`=10, but the student outputs 5 values per sample \(the teacher 10\)"
    ):
        trainer.fit(model, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0  # refused before the first step
    only_kd = DistillationModule(DigitsMLP(hidden=(16,), num_classes=5), _teacher(), alpha=0.0, beta=1.0)
    batches = [(torch.randn(8, 64), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.raises(ValueError, match=r"The student outputs \(5,\) per sample and the teacher \(10,\)"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1)).fit(
            only_kd, torch.utils.data.DataLoader(batches, batch_size=None)
        )


@pytest.mark.gpu_stand_in
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_teacher_follows_every_move_of_its_module(precision):
    """A stand-in for `.to("cuda")`: a dtype cast through `Module._apply`. The report's baseline is a
    deep copy moved with `.to(device)`: its teacher must move with it."""
    from lightning_quantum.callbacks._common import detached_copy

    model = DistillationModule(DigitsMLP(hidden=(8,)), DigitsMLP(hidden=(16,)), teacher_precision=precision)
    copy = detached_copy(model).to(torch.float64)
    assert copy.student.head.weight.dtype == torch.float64
    expected = torch.float64 if precision == "fp32" else torch.bfloat16  # a bf16 teacher keeps its precision
    assert copy.teacher.head.weight.dtype == expected
    assert model.teacher.head.weight.dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
    assert copy.teacher is not model.teacher and not copy.teacher.training
    model.to("meta")  # a device move: followed whatever the teacher's precision
    assert model.teacher.head.weight.device.type == "meta"


@pytest.mark.gpu_stand_in
def test_a_copy_of_the_module_reads_its_pending_cuda_timings():
    """A stand-in for CUDA events (which cannot be pickled, like a lock): the fit-end callbacks deep-copy
    the module, and on the first GPU run that copy failed with "cannot pickle 'Event' object"."""
    import threading

    from lightning_quantum.distillation.module import _Stopwatch

    class Event:
        def __init__(self, ms):
            self.ms, self.lock = ms, threading.Lock()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.ms - self.ms

    model = DistillationModule(DigitsMLP(hidden=(8,)), DigitsMLP(hidden=(16,)))
    stopwatch = _Stopwatch()
    stopwatch._done = 1.0
    stopwatch._pending.append((Event(0.0), Event(250.0)))
    model._teacher_time = stopwatch
    copied = copy.deepcopy(model)
    assert copied._teacher_time.seconds == pytest.approx(1.25) and not copied._teacher_time._pending
    assert model._teacher_time.seconds == pytest.approx(1.25)  # read, not lost


class _DictNet(nn.Module):
    """Takes keyword inputs, as a Hugging Face model does."""

    def __init__(self, width):
        super().__init__()
        self.body = nn.Linear(4, width)
        self.head = nn.Linear(width, 3)

    def forward(self, a, b):
        return self.head(torch.relu(self.body(a + b)))


@pytest.mark.gpu_stand_in
def test_setup_gives_each_model_the_batch_where_it_lives():
    """A stand-in for a CUDA run: at `setup` Lightning has moved the teacher to the target device (here
    `meta`) but not the student; dict inputs and the feature-pair probe must reach each where it is."""
    from types import SimpleNamespace

    batches = [{"x": {"a": torch.randn(6, 4), "b": torch.randn(6, 4)}, "index": torch.arange(6)}]

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None)

    def set_up(**kwargs):
        model = DistillationModule(_DictNet(8), _DictNet(16), alpha=0.0, beta=1.0, **kwargs)
        model._device = torch.device("meta")  # what Lightning sets before `setup` on a GPU run
        model.trainer = SimpleNamespace(datamodule=Data(), global_rank=0, default_root_dir=".")
        model.setup("fit")
        assert model.teacher.head.weight.device.type == "meta" and model.student.head.weight.device.type == "cpu"
        return model

    cached = set_up(cache_teacher="memory")  # the cache sizes itself from one teacher forward
    assert cached._cache is not None and cached._cache.device.type == "meta"  # on the target device
    projected = set_up(feature_pairs={"body": "body"})  # the feature probe runs both models
    assert projected.projections["body"].weight.device.type == "cpu"  # with the student, which it extends


def test_teacher_time_share_is_measured_in_training_steps(tmp_path):
    _, model = _distill_losses(tmp_path, "off")
    assert 0 < model.teacher_seconds < model.step_seconds
    assert 0 < model.distillation_figures()["teacher_time_share"] < 1


def test_ultra_structured_pruning_of_a_bert_student_removes_its_feed_forward_units(tmp_path):
    """A BERT student declares its feed-forward hidden units (``channel_pruning_layers``): structured
    pruning with slimming removes half of them, leaves the attention projections whole (their channels
    are split into heads), and the slimmed student computes what the masked one did."""
    import copy

    from lightning.pytorch.callbacks import Callback

    from lightning_quantum.callbacks import Pruning
    from lightning_quantum.distillation import SentenceEncoder, student_from_teacher
    from lightning_quantum.pruning.slimming import declared_channel_layers

    teacher = SentenceEncoder(_tiny_bert(4))
    student = SentenceEncoder(student_from_teacher(teacher.model, [0, 2], dropout=0.0))
    model = DistillationModule(student, teacher, alpha=0.0, beta=1.0, output_loss="cosine")
    assert declared_channel_layers(model) == ["student.model.encoder.layer.*.intermediate.dense"]

    class KeepMasked(Callback):  # the model as masked, before Pruning's on_fit_end slims it
        def on_train_end(self, trainer, pl_module):
            self.masked = copy.deepcopy(pl_module.student).eval()

    keep = KeepMasked()
    pruning = Pruning(method="l2_structured", final_sparsity=0.5, start_step=1, end_step=3, frequency=1, slim=True)
    torch.manual_seed(1)
    batches = [
        {"x": {"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}}
        for _ in range(6)
    ]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[pruning, keep]))
    trainer.fit(model, loader)
    assert pruning.removed_channels == {
        "student.model.encoder.layer.0.intermediate.dense": 16,
        "student.model.encoder.layer.1.intermediate.dense": 16,
    }
    layer = student.model.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 16 and layer.output.dense.in_features == 16
    assert layer.attention.self.query.out_features == 16 and layer.attention.output.dense.out_features == 16
    ids = torch.randint(0, 64, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(ids, mask), keep.masked(ids, mask), rtol=1e-5, atol=1e-6)
    # named layers still win over the declared ones
    named = Pruning(method="l2_structured", names=["student.model.encoder.layer.0.intermediate.dense"])
    named.setup(trainer, DistillationModule(copy.deepcopy(student), teacher, alpha=0.0, beta=1.0), "fit")
    assert named._targets == ["student.model.encoder.layer.0.intermediate.dense.weight"]


def test_optimize_slims_the_feed_forward_units_a_bert_encoder_declares():
    from lightning_quantum.distillation import SentenceEncoder
    from lightning_quantum.optimize import _prune

    encoder = SentenceEncoder(_tiny_bert(2))
    inputs = {"input_ids": torch.randint(0, 64, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    detail = _prune(encoder, 0.5, "l2_structured", True, inputs)
    assert detail["removed_channels"] == {f"model.encoder.layer.{i}.intermediate.dense": 16 for i in (0, 1)}
    assert encoder.model.encoder.layer[1].attention.self.value.out_features == 16
    assert encoder(**inputs).shape == (3, 16)
