"""Run by tests/test_causal_lm.py: the tiny causal LM with int4 QAT under 2-process CPU DDP (gloo); each
rank writes a digest of its weights and the validation perplexity it logged."""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_quantum.callbacks import QuantizationAwareTraining
from lightning_quantum.data import TextLMDataModule
from lightning_quantum.models import CausalLM
from tests.conftest import ddp_trainer_kwargs, finish_distributed

out = Path(sys.argv[1])
pl.seed_everything(0)
data = TextLMDataModule(batch_size=4, context=32, vocab_size=512, sources=["topics"], tokenizer_dir=str(out / "tok"))
data.setup()  # every rank trains (or reads) the tokenizer: the same file, written whole by each
model = CausalLM(**data.tokenizer_config(), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, context=32)
qat = QuantizationAwareTraining(scheme="int4_weight_only", group_size=32, embeddings=True, start_step=2)
kwargs = ddp_trainer_kwargs(out, max_epochs=1, limit_train_batches=6, limit_val_batches=None, callbacks=[qat])
trainer = pl.Trainer(**kwargs)
trainer.fit(model, data)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    plain = tensor.dequantize() if hasattr(tensor, "dequantize") else tensor
    digest.update(name.encode() + plain.detach().float().contiguous().numpy().tobytes())
(out / f"rank{trainer.global_rank}.json").write_text(
    json.dumps(
        {
            "weights": digest.hexdigest(),
            "val_ppl": float(trainer.callback_metrics["val/ppl"]),
            "val_loss": float(trainer.callback_metrics["val/loss"]),
            "converted": qat.phase,
            "steps": int(trainer.global_step),
            "threads": torch.get_num_threads(),
        }
    )
)
finish_distributed()
