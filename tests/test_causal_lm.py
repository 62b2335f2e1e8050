"""The causal LM workload: CPython's text split by document, its BPE tokenizer, the DataModule and CausalLM."""

import math
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_quantum.data import TextLMDataModule
from lightning_quantum.data.lm import (
    END_OF_TEXT,
    cpython_documents,
    split_documents,
    train_tokenizer,
    unigram_perplexity,
)
from lightning_quantum.models import CausalLM, evaluate_perplexity
from tests.conftest import run_rank_script, trainer_kwargs

TOPICS = ("topics",)  # the help topics alone: the tests' corpus (the docstrings take 10 s to read once)


def tiny_data(tmp_path, **kwargs):
    options = {"batch_size": 4, "context": 32, "vocab_size": 512, "sources": TOPICS, "tokenizer_dir": str(tmp_path)}
    return TextLMDataModule(**{**options, **kwargs})


def tiny_lm(data, **kwargs):
    options = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "context": 32}
    return CausalLM(**{**data.tokenizer_config(), **options, **kwargs})


def test_the_split_is_by_document_disjoint_and_independent_of_order():
    names = list(cpython_documents(TOPICS))
    split = split_documents(names, 0.1, 0.1, seed=3)
    parts = [set(split[s]) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(names) and set().union(*parts) == set(names)
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert split_documents(shuffled, 0.1, 0.1, seed=3) == split
    assert split_documents(names, 0.1, 0.1, seed=4) != split


def test_the_tokenizer_is_trained_once_per_corpus_and_settings_and_is_deterministic(tmp_path):
    texts = [cpython_documents(TOPICS)[n] for n in sorted(cpython_documents(TOPICS))[:20]]
    first = train_tokenizer(texts, vocab_size=400, cache_dir=tmp_path / "a")
    (cached,) = (tmp_path / "a").glob("bpe-*.json")
    stamp = cached.stat().st_mtime_ns
    again = train_tokenizer(texts, vocab_size=400, cache_dir=tmp_path / "a")  # read back, not trained again
    assert cached.stat().st_mtime_ns == stamp and again.get_vocab() == first.get_vocab()
    elsewhere = train_tokenizer(texts, vocab_size=400, cache_dir=tmp_path / "b")  # trained anew: the same
    assert elsewhere.get_vocab() == first.get_vocab()
    assert len(list((tmp_path / "a").glob("bpe-*.json"))) == 1
    train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path / "a")  # other settings: another file
    assert len(list((tmp_path / "a").glob("bpe-*.json"))) == 2
    cached.write_text("{not json")  # a damaged file is trained again and replaced
    assert train_tokenizer(texts, vocab_size=400, cache_dir=tmp_path / "a").get_vocab() == first.get_vocab()
    assert first.eos_token == END_OF_TEXT and first.decode(first(texts[0][:200])["input_ids"]) == texts[0][:200]
    with pytest.raises(ValueError, match=r"`vocab_size`=100 is not valid"):
        train_tokenizer(texts, vocab_size=100)


def test_the_datamodule_cuts_each_split_into_blocks_of_its_own_documents(tmp_path):
    data = tiny_data(tmp_path, val_fraction=0.1, test_fraction=0.1)
    data.setup()
    names = [set(data.documents[s]) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    eos = data.tokenizer.eos_token_id
    for split in ("train", "val", "test"):
        ids = data.token_ids[split]
        assert int((ids == eos).sum()) == len(data.documents[split])  # one end-of-text after each document
        blocks = data.splits[split].blocks
        assert blocks.shape[1] == 32 and torch.equal(blocks.flatten(), ids[: blocks.numel()])
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 32) and batch.dtype == torch.long
    held_out = data.unigram_perplexity("test")
    assert held_out == pytest.approx(unigram_perplexity(data.token_ids["train"], data.token_ids["test"], 512))
    assert 1 < held_out < 512
    with pytest.raises(ValueError, match=r"`sources`=\['lyrics'\] is not valid"):
        TextLMDataModule(sources=["lyrics"])
    with pytest.raises(ValueError, match=r"`context`=0 is not valid"):
        TextLMDataModule(context=0)


def test_causal_lm_trains_reports_perplexity_over_the_split_and_generates(tmp_path):
    torch.manual_seed(0)
    data = tiny_data(tmp_path)
    model = tiny_lm(data, lr=3e-3)
    data.setup()
    before = evaluate_perplexity(model, data.val_dataloader())
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=30, max_epochs=-1, limit_train_batches=None, limit_val_batches=None)
    )
    trainer.fit(model, data)
    (metrics,) = trainer.validate(model, data, verbose=False)
    after = evaluate_perplexity(model, data.val_dataloader())
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(after, rel=1e-4)  # exp of the split's mean token loss
    assert after < 0.75 * before
    prompt = data.tokenizer("The return value", return_tensors="pt")["input_ids"]
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (1, prompt.shape[1] + 8) and torch.equal(out[:, : prompt.shape[1]], prompt)
    assert torch.equal(model.generate(prompt, max_new_tokens=8), out)  # greedy: the same continuation
    with pytest.raises(ValueError, match=r"`hidden_size`=30 must divide by `num_heads`=4"):
        CausalLM(hidden_size=30, num_heads=4)


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def _fit_int4_qat(tmp_path, data, ckpt_path=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_quantum.callbacks import QuantizationAwareTraining

    torch.manual_seed(0)
    model = tiny_lm(data)
    qat = QuantizationAwareTraining(
        scheme="int4_weight_only", group_size=32, embeddings=True, start_step=2, convert_on_fit_end=False
    )
    losses = _Losses()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[qat, losses, checkpoints])
    pl.Trainer(**kwargs).fit(model, data, ckpt_path=ckpt_path, weights_only=True)
    return model, qat, losses.losses


@pytest.mark.parity
def test_int4_qat_of_the_lm_with_int8_embeddings_resumes_exactly(tmp_path):
    """Int4 weight-only QAT of every linear and int8 rows of the embedding table (QUANTUM on the LM),
    resumed from the checkpoint of epoch 1 of 2: the same losses (within 1e-6) and the same weights."""
    data = tiny_data(tmp_path)
    full, qat, losses = _fit_int4_qat(tmp_path / "a", data)
    assert {"model.model.embed_tokens", "model.lm_head", "model.model.layers.0.mlp.down_proj"} <= set(qat.layers)
    resumed, _, resumed_losses = _fit_int4_qat(tmp_path / "b", data, tmp_path / "a" / "ckpts" / "epoch=0-step=4.ckpt")
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    assert all(abs(resumed_losses[s] - losses[s]) <= 1e-6 for s in resumed_losses)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_causal_lm_distils_into_fewer_layers_and_reports_as_an_lm(tmp_path):
    """ULTRA's distillation on the LM: a 2-layer teacher into a 1-layer student with the next-token
    loss, soft targets per token and a hidden-state pair; the report has the student's LM sections
    and the teacher beside it; val/lm_loss is the student's perplexity's log."""
    from lightning_quantum.callbacks import OptimizationReport
    from lightning_quantum.distillation import DistillationModule

    data = tiny_data(tmp_path)
    torch.manual_seed(0)
    teacher = tiny_lm(data, lr=3e-3)
    fit = trainer_kwargs(tmp_path / "teacher", max_steps=20, max_epochs=-1, limit_train_batches=None)
    pl.Trainer(**fit).fit(teacher, data)
    student = tiny_lm(data, num_layers=1, lr=3e-3)
    module = DistillationModule(
        student=student,
        teacher=teacher.eval(),
        alpha=0.5,
        beta=0.5,
        temperature=2.0,
        feature_pairs={"model.model.layers.0": "model.model.layers.1"},
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    report = OptimizationReport(print_table=False, repeats=2, max_eval_batches=2, compare_train_step=False)
    kwargs = trainer_kwargs(tmp_path, max_steps=20, max_epochs=-1, limit_train_batches=None, limit_val_batches=None)
    trainer = pl.Trainer(**{**kwargs, "callbacks": [report]})
    trainer.fit(module, data)
    (metrics,) = trainer.validate(module, data, verbose=False)
    assert math.exp(metrics["val/lm_loss"]) == pytest.approx(
        evaluate_perplexity(student, data.val_dataloader()), rel=1e-4
    )
    extra = report.report.extra
    assert {"teacher", "student_vs_teacher", "language_model", "samples"} <= set(extra)
    assert extra["student_vs_teacher"]["size_ratio"] < 0.9  # one layer of two; the embeddings stay
    figures = {row["figure"]: row["value"] for row in extra["language_model"]}
    assert figures["held-out perplexity"] < figures["held-out perplexity at fit start"]  # before and after
    assert figures["held-out perplexity"] == pytest.approx(evaluate_perplexity(student, data.test_dataloader()))


def test_a_student_from_the_teachers_layers_starts_where_the_teacher_is(tmp_path):
    from lightning_quantum.distillation import causal_lm_student

    data = tiny_data(tmp_path)
    torch.manual_seed(0)
    teacher = tiny_lm(data).eval()
    ids = torch.randint(1, 300, (2, 16))
    whole = causal_lm_student(teacher, [0, 1]).eval()  # every layer: the same model
    with torch.no_grad():
        assert torch.equal(whole(ids), teacher(ids))
    one = causal_lm_student(teacher, [1])
    assert one.hparams["num_layers"] == 1 and one.model.model.layers[0].self_attn.layer_idx == 0
    assert torch.equal(one.model.model.layers[0].mlp.up_proj.weight, teacher.model.model.layers[1].mlp.up_proj.weight)
    assert one.generate(ids[:1], max_new_tokens=4).shape == (1, 20)  # its KV cache has one layer
    with pytest.raises(ValueError, match=r"`layers`=\[1, 0\] is not valid"):
        causal_lm_student(teacher, [1, 0])


@pytest.mark.slow  # 13 s: two processes start; the default run is at its 7-minute budget
@pytest.mark.parity
def test_the_lm_with_int4_qat_trains_under_ddp_with_one_model_and_one_perplexity(tmp_path):
    """2 CPU processes (gloo): each rank trains the tokenizer (or reads it) without tearing the cached file,
    the ranks end with the same converted weights, and val/ppl is synced across ranks (exp of val/loss)."""
    ranks = run_rank_script(Path(__file__).with_name("ddp_lm_script.py"), tmp_path)
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["val_ppl"] == ranks[1]["val_ppl"]
    assert ranks[0]["val_ppl"] == pytest.approx(math.exp(ranks[0]["val_loss"]), rel=1e-5)
    assert all(r["converted"] == "converted" and r["steps"] == 6 for r in ranks)


@pytest.mark.gpu
def test_the_lm_quantum_run_on_a_gpu(tmp_path):
    """QUANTUM on the LM on one GPU, small: bf16-mixed training with int4 weight-only QAT (groups of 32)
    and int8 embedding rows, converted at fit end on the GPU; the converted model computes what the
    fake-quantized one did, and the report's LM section is written."""
    from lightning_quantum.callbacks import OptimizationReport, QuantizationAwareTraining

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    data = tiny_data(tmp_path)
    torch.manual_seed(0)
    model = tiny_lm(data)
    qat = QuantizationAwareTraining(scheme="int4_weight_only", group_size=32, embeddings=True, start_step=2)
    report = OptimizationReport(print_table=False, repeats=2, max_eval_batches=2, compare_train_step=False)
    kwargs = trainer_kwargs(tmp_path, accelerator="cuda", precision="bf16-mixed", max_steps=8, max_epochs=-1)
    trainer = pl.Trainer(**{**kwargs, "limit_train_batches": None, "callbacks": [qat, report]})
    trainer.fit(model, data)
    # trained on the GPU; Lightning moves the model to the CPU before on_fit_end, where QAT converts it
    assert qat.phase == "converted" and trainer.strategy.root_device.type == "cuda"
    assert report.report.extra["training_device"].startswith("cuda")
    converted = evaluate_perplexity(model, data.val_dataloader())
    assert converted == pytest.approx(evaluate_perplexity(qat.float_model, data.val_dataloader()), rel=0.05)
    figures = {row["figure"] for row in report.report.extra["language_model"]}
    assert "held-out perplexity before int conversion (float weights)" in figures


def test_structured_pruning_of_the_lm_removes_mlp_units_and_leaves_attention_whole(tmp_path):
    """ULTRA's pruning on the LM: the MLP hidden units the model declares go (gate and up rows, down
    columns), the attention projections stay whole, and the slimmed model computes what the masked one did."""
    import copy

    from lightning.pytorch.callbacks import Callback

    from lightning_quantum.callbacks import Pruning

    torch.manual_seed(0)
    model = CausalLM(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context=16)

    class KeepMasked(Callback):
        def on_train_end(self, trainer, pl_module):
            self.masked = copy.deepcopy(pl_module).eval()

    keep = KeepMasked()
    pruning = Pruning(method="l2_structured", final_sparsity=0.5, start_step=1, end_step=3, frequency=1, slim=True)
    loader = torch.utils.data.DataLoader([torch.randint(0, 64, (4, 16)) for _ in range(6)], batch_size=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[pruning, keep]))
    trainer.fit(model, loader)
    assert pruning.removed_channels == {f"model.model.layers.{i}.mlp.gate_proj": 32 for i in (0, 1)}
    mlp, attention = model.model.model.layers[0].mlp, model.model.model.layers[0].self_attn
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (32, 32, 32)
    assert attention.q_proj.out_features == 32 and attention.o_proj.in_features == 32
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), keep.masked(ids), rtol=1e-5, atol=1e-5)


def test_ultra_on_the_lm_removes_half_the_mlp_units_of_the_student_and_converts_the_slimmed_layers(tmp_path):
    """The ULTRA of benchmarks/causal_lm.py (and of level=ultra on the LM) in small: a student of the teacher's
    layers, distilled, with half its MLP hidden units pruned (L2) and removed at fit end, and int4 QAT from the
    final sparsity on; the slimmed layers are the ones converted, and the converted model keeps the float
    model's perplexity."""
    from lightning_quantum.callbacks import Pruning, QuantizationAwareTraining
    from lightning_quantum.distillation import DistillationModule, causal_lm_student

    data = tiny_data(tmp_path)
    torch.manual_seed(0)
    teacher = tiny_lm(data).eval()
    student = causal_lm_student(teacher, [1])
    module = DistillationModule(
        student=student,
        teacher=teacher,
        alpha=0.5,
        beta=0.5,
        temperature=2.0,
        feature_pairs={"model.model.layers.0": "model.model.layers.1"},
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    pruning = Pruning(method="l2_structured", final_sparsity=0.5, start_step=0, end_step=4, frequency=2, slim=True)
    qat = QuantizationAwareTraining(
        scheme="int4_weight_only", group_size=32, embeddings=True, start_step=None, start_after_pruning=True
    )
    kwargs = trainer_kwargs(tmp_path, max_steps=8, max_epochs=-1, limit_train_batches=None, limit_val_batches=0)
    pl.Trainer(**kwargs, callbacks=[pruning, qat]).fit(module, data)
    assert pruning.removed_channels == {"student.model.model.layers.0.mlp.gate_proj": 32}
    for model in (student, qat.float_model.student):
        mlp = model.model.model.layers[0].mlp
        assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (32, 32, 32)
    assert qat.phase == "converted"
    assert type(student.model.model.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    test = data.test_dataloader()
    assert evaluate_perplexity(student, test) == pytest.approx(
        evaluate_perplexity(qat.float_model.student, test), rel=0.05
    )


def _trained_tiny_lm(steps=30):
    """A tiny LM trained a little on a repeated pattern, so that its perplexity is well below chance."""
    torch.manual_seed(0)
    model = CausalLM(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, context=16)
    pattern = torch.arange(16) % 8
    blocks = [(pattern.roll(int(torch.randint(0, 8, ()))) + 8 * (i % 3)).repeat(4, 1) for i in range(12)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids = blocks[step % len(blocks)]
        loss = model.model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), torch.utils.data.DataLoader(blocks, batch_size=None)


def test_int4_weight_only_ptq_makes_the_lm_smaller_and_keeps_its_perplexity():
    from lightning_quantum.benchmark import serialized_size_bytes
    from lightning_quantum.quantization import quantize_weights_int4

    model, loader = _trained_tiny_lm()
    small = quantize_weights_int4(model, group_size=32)
    assert type(model.model.lm_head.weight) is torch.nn.Parameter  # the original keeps float weights
    assert type(small.model.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(small.model.model.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert serialized_size_bytes(small) < 0.35 * serialized_size_bytes(model)
    before, after = evaluate_perplexity(model, loader), evaluate_perplexity(small, loader)
    assert before < 8 and abs(after - before) < 0.1 * before
    with pytest.raises(ValueError, match=r"`group_size`=48 does not divide the 64 input features of 'model.model"):
        quantize_weights_int4(model, group_size=48)
    with pytest.raises(ValueError, match=r"`algorithm`='optq' is not valid. Choose one of: 'affine', 'hqq_scale_only'"):
        quantize_weights_int4(model, algorithm="optq")


def test_optimize_quantizes_an_lm_to_int4_and_rolls_back_on_perplexity():
    """``lq.optimize(weights="int4")`` measures each step by the mean token log-likelihood (``exp`` of
    minus it is the perplexity) and rolls the int4 step back when it costs more than the budget."""
    import lightning_quantum as lq
    from lightning_quantum.models import LabelledBlocks, token_log_likelihood

    model, loader = _trained_tiny_lm()
    data = LabelledBlocks(loader)
    measure = dict(level="quantum", eval_data=data, metric=token_log_likelihood, weights="int4", deploy=False)
    result = lq.optimize(model, **measure, repeats=2)
    (step,) = result.steps
    assert step.name == "int4" and step.kept
    assert step.detail == {"weights": "int4", "group_size": 32, "algorithm": "affine"}
    assert math.isclose(math.exp(-result.before.accuracy), evaluate_perplexity(model, loader), rel_tol=1e-5)
    assert math.isclose(math.exp(-step.accuracy), evaluate_perplexity(result.model, loader), rel_tol=1e-5)
    assert result.after.model_size_bytes < 0.35 * result.before.model_size_bytes
    if step.accuracy_drop > 0:  # int4 raised the perplexity: a budget below that rolls it back
        tight = lq.optimize(model, **measure, repeats=2, max_accuracy_drop=step.accuracy_drop / 2)
        assert not tight.steps[0].kept and "rolled back" in tight.steps[0].reason
        assert tight.after.model_size_bytes == result.before.model_size_bytes
    else:  # it did not: any budget keeps it
        assert lq.optimize(model, **measure, repeats=2, max_accuracy_drop=0.0).steps[0].kept
    with pytest.raises(ValueError, match=r"`weights`='int2' is not valid. Choose one of: 'int8', 'int4'"):
        lq.optimize(model, **{**measure, "weights": "int2"})
    gptq = lq.optimize(model, **measure, repeats=2, calibration_data=loader, int4_algorithm="gptq")
    assert gptq.steps[0].detail["algorithm"] == "gptq"
    assert gptq.steps[0].accuracy >= step.accuracy  # GPTQ's rounding keeps the log-likelihood at least as high
    with pytest.raises(ValueError, match=r"`int4_algorithm`='gptq' measures the layers' inputs on `calibration_data`"):
        lq.optimize(model, **measure, int4_algorithm="gptq")
    with pytest.raises(ValueError, match=r"`int4_algorithm`='rtn' is not valid. Choose one of: 'affine'"):
        lq.optimize(model, **measure, int4_algorithm="rtn")


def test_hyperparameters_from_a_hydra_config_are_saved_as_plain_values(tmp_path):
    """Hydra hands list options over as ``ListConfig``; kept as they are, the checkpoint would hold a
    class that ``torch.load(weights_only=True)`` refuses, and could not be resumed or optimized."""
    import io

    from omegaconf import DictConfig, ListConfig

    from lightning_quantum._hparams import plain_hyperparameters

    data = tiny_data(tmp_path, sources=ListConfig(["topics"]))
    assert type(data.hparams["sources"]) is list and data.hparams["sources"] == ["topics"]
    buffer = io.BytesIO()
    torch.save({"datamodule_hyper_parameters": dict(data.hparams)}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["datamodule_hyper_parameters"]["sources"] == ["topics"]

    class Owner:
        _hparams = {"pairs": DictConfig({"a": ListConfig([1, 2]), "b": "x"}), "t": (ListConfig([3]),), "s": "ab"}

    owner = Owner()
    plain_hyperparameters(owner)
    assert owner._hparams == {"pairs": {"a": [1, 2], "b": "x"}, "t": ([3],), "s": "ab"}
    assert type(owner._hparams["pairs"]) is dict and type(owner._hparams["pairs"]["a"]) is list


def _random_lm(**kwargs):
    torch.manual_seed(0)
    options = {"vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
    return CausalLM(**{**options, "context": 48, **kwargs}).eval()


def test_the_gates_int8_form_of_an_int4_lm_keeps_its_int8_embedding_rows():
    """After int4 QAT with int8 embedding rows, the gate's int8 forms are dynamic int8 of the float weights
    with the tables kept int8: no bigger than they need be (the table is a large share of a small LM)."""
    from lightning_quantum._tensors import is_quantized
    from lightning_quantum.benchmark import serialized_size_bytes
    from lightning_quantum.deployment import build_form
    from lightning_quantum.quantization import quantize_weights_int4

    lm = _random_lm(vocab_size=2000)
    tokens = torch.randint(1, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    for tables in (True, False):
        int4 = quantize_weights_int4(lm, group_size=32, embeddings=tables)
        int8 = build_form("int8 eager", int4, lm)
        assert is_quantized(int8.model.model.embed_tokens.weight) is tables  # as the trained model holds it
        assert type(int8.model.lm_head.weight).__name__ == "Int8Tensor"
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(int8(tokens).flatten(1), lm(tokens).flatten(1))
        assert float(cosine.min()) > 0.99
        if tables:
            assert serialized_size_bytes(int8) < 0.4 * serialized_size_bytes(lm)


def _assert_same_greedy_tokens(model, tokens, expected, prompt_length=10, tie=1e-4):
    """``tokens`` continue as ``expected`` (both greedy decodes of ``model``, by different loops), or
    part from it only at a tie: where the two tokens' logits lie within ``tie`` under ``model``. The
    two loops compute the same logits by different kernels (a cache of fixed size, masked, against one
    that grows), so they agree to the last bits, which may order a tie either way on another CPU."""
    if torch.equal(tokens, expected):
        return
    assert tokens.shape[0] == expected.shape[0]
    for row, (ours, theirs) in enumerate(zip(tokens, expected)):
        length = min(len(ours), len(theirs))
        differ = (ours[:length] != theirs[:length]).nonzero()
        if len(differ) == 0:
            assert len(ours) == len(theirs), row
            continue
        i = int(differ[0])
        assert i >= prompt_length, row
        with torch.no_grad():
            logits = model(ours[None, :i])[0, -1].float()
        assert abs(float(logits[ours[i]] - logits[theirs[i]])) <= tie, (row, i)


def test_the_static_cache_decoder_gives_the_tokens_of_generate():
    """The deployable decode loop (a KV cache of fixed size, eager here) continues as Hugging Face's
    generate does: greedy, min_new_tokens, and rows that reach the end-of-text token."""
    from lightning_quantum.models import StaticCacheDecoder

    lm = _random_lm()
    prompts = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    decoder = StaticCacheDecoder(lm, compile=False)
    assert decoder.max_length == 48 and len(decoder.state_dict()) == len(lm.state_dict())
    expected = lm.generate(prompts, max_new_tokens=20)
    _assert_same_greedy_tokens(lm, decoder.generate(prompts, max_new_tokens=20), expected)
    _assert_same_greedy_tokens(lm, decoder.generate(prompts[1:], max_new_tokens=5), expected[1:, :15])  # cache reset
    # end of text: the token row 0 chooses third ends it, and the row continues with it
    eos = int(expected[0, 12])
    stopping = _random_lm(eos_token_id=eos)
    stopping.load_state_dict(lm.state_dict())
    expected = stopping.generate(prompts, max_new_tokens=20)
    assert (expected[0, 12:] == eos).all()
    _assert_same_greedy_tokens(
        stopping, StaticCacheDecoder(stopping, compile=False).generate(prompts, max_new_tokens=20), expected
    )
    forced = stopping.generate(prompts[:1], max_new_tokens=20, min_new_tokens=20)
    ours = StaticCacheDecoder(stopping, compile=False).generate(prompts[:1], max_new_tokens=20, min_new_tokens=20)
    _assert_same_greedy_tokens(stopping, ours, forced)
    assert forced.shape == (1, 30) and (forced[0, 10:13] != eos).all()
    with pytest.raises(ValueError, match=r"exceeds `max_length`=48"):
        decoder.generate(prompts, max_new_tokens=39)
    with pytest.raises(ValueError, match=r"`min_new_tokens`=-1 is not valid"):
        decoder.generate(prompts, min_new_tokens=-1)
    with pytest.raises(ValueError, match=r"`input_ids` must be a \(batch, length\) tensor"):
        decoder.generate(prompts[0])
    with pytest.raises(TypeError, match="`model` must be a CausalLM"):
        StaticCacheDecoder(lm.model)


@pytest.mark.slow
def test_the_compiled_static_cache_decoder_gives_the_tokens_of_generate_in_float_and_int4():
    """The compiled decode step (the LM's deployed decode form) on the float model and on its int4 copy."""
    from lightning_quantum.models import StaticCacheDecoder
    from lightning_quantum.quantization import quantize_weights_int4

    lm = _random_lm()
    prompts = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    for model in (lm, quantize_weights_int4(lm, group_size=32)):
        decoder = StaticCacheDecoder(model)
        for batch, new in ((prompts, 16), (prompts[:1], 8)):
            expected = model.generate(batch, max_new_tokens=new)
            _assert_same_greedy_tokens(model, decoder.generate(batch, max_new_tokens=new), expected)


def test_the_decode_gate_keeps_the_perplexity_budget_and_ships_a_decoder_that_reloads(tmp_path):
    """The decode gate (here the generate loop alone: nothing to compile) judges each set of weights by
    held-out log-likelihood; its winner is written with the weights, int4 included, and reloads."""
    from lightning_quantum.models.decoding import choose_decoder, decode_table, load_decoder, save_decoder
    from lightning_quantum.quantization import quantize_weights_int4

    lm = _random_lm()
    blocks = [torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    worse = _random_lm()
    with torch.no_grad():
        for p in worse.parameters():
            p.mul_(4.0)  # far from the model as trained: over any budget
    int4 = quantize_weights_int4(lm, group_size=32)
    decoder, decision = choose_decoder(
        int4, blocks, float_model=worse, forms=["generate"], prompt_tokens=8, new_tokens=8, repeats=1, rounds=1
    )
    # the int4 weights as trained, or the same packed for ATen's CPU int4 kernel (tests/test_int4_kernel.py)
    trained, floating, packed = decision.candidates
    assert decision.form == "generate" and decision.weights in (trained.weights, packed.weights)
    assert (decoder is int4) is (decision.weights == "as trained")
    assert trained.eligible and not floating.eligible and "over budget" in floating.note
    assert floating.perplexity > trained.perplexity and trained.tokens_per_second > 0
    assert trained.size_bytes < floating.size_bytes / 2  # int4 linears, int8 embedding rows
    rows = decode_table(decision)
    assert [r["verdict"].startswith("SHIPPED") for r in rows] == [
        c is not floating and c.weights == decision.weights for c in decision.candidates
    ]
    paths = save_decoder(decoder, decision, tmp_path)
    assert {p.name for p in paths.values()} == {"decoder.pt", "decoder.json"}
    back = load_decoder(tmp_path)
    prompt = blocks[0][:1, :8]
    assert torch.equal(back(blocks[0]), decoder(blocks[0]))
    assert torch.equal(back.generate(prompt, max_new_tokens=8), decoder.generate(prompt, max_new_tokens=8))
    with pytest.raises(ValueError, match=r"`prompt_tokens`=40 plus `new_tokens`=64 exceeds the model's context of 48"):
        choose_decoder(lm, blocks, prompt_tokens=40)
    with pytest.raises(ValueError, match=r"`forms`=\['beam'\] is not valid"):
        choose_decoder(lm, blocks, forms=["beam"])
    with pytest.raises(TypeError, match="`float_model` must be a CausalLM"):
        choose_decoder(lm, blocks, float_model=lm.model)
    (tmp_path / "decoder.json").write_text('{"form": "static compiled", "weights_file": "../elsewhere.pt"}')
    with pytest.raises(ValueError, match="must name a .pt file in"):
        load_decoder(tmp_path)


@pytest.mark.slow
def test_the_deployment_gate_of_an_int4_lm_runs_the_decode_gate(tmp_path):
    """QUANTUM on the LM: after int4 QAT's conversion, the DeploymentGate also chooses the decode form
    among generate and the compiled static-cache loop, with the int4 and the float weights."""
    from lightning_quantum.callbacks import DeploymentGate, QuantizationAwareTraining
    from lightning_quantum.models.decoding import INT4_KERNEL_WEIGHTS, load_decoder

    data = tiny_data(tmp_path)
    torch.manual_seed(0)
    model = tiny_lm(data)
    qat = QuantizationAwareTraining(scheme="int4_weight_only", group_size=32, embeddings=True, start_step=2)
    gate = DeploymentGate(numerics=["float"], runners=["eager"], decode_prompt_tokens=8, decode_new_tokens=8)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, max_epochs=-1, callbacks=[qat, gate])).fit(model, data)
    decision = gate.decode_decision
    assert decision is not None and decision.new_tokens == 8
    forms = ["generate", "static compiled", "static compiled 1 thread"]
    assert [(c.weights, c.form) for c in decision.candidates] == [
        (w, f) for w in ("as trained", "float", INT4_KERNEL_WEIGHTS) for f in forms
    ]
    assert all(c.tokens_per_second > 0 for c in decision.candidates)
    assert gate.paths["decoder"].is_file() and gate.paths["decoder_record"].is_file()
    assert type(load_decoder(gate.paths["decoder_record"].parent)).__name__ in ("CausalLM", "StaticCacheDecoder")
