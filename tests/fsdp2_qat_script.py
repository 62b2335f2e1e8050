"""Run by tests/test_fsdp2.py: QAT under FSDP2 (2 CPU processes, gloo), or the same fit in one process
(`single`: the global batch; `accumulated`: the ranks' batches, see tests/conftest.py); rank zero
writes the fake-quantized outputs, or the converted model's test accuracy."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_quantum.benchmark import evaluate_accuracy
from lightning_quantum.callbacks import QuantizationAwareTraining
from lightning_quantum.models import Classifier, DigitsMLP
from lightning_quantum.quantization import convert_qat, load_safetensors, prepare_qat, set_fake_quant_enabled
from tests.conftest import finish_distributed, fsdp2_digits, fsdp2_script_parser, fsdp2_trainer_kwargs

parser = fsdp2_script_parser()
parser.add_argument("--convert", action="store_true")
parser.add_argument("--refresh", action="store_true", help="ranges fixed at step 0 and computed again every step")
args = parser.parse_args()


def outputs(module, x, fake_quant=True):
    """Logits for ``x`` (every rank must call it: FSDP2 gathers each block's weights in forward)."""
    set_fake_quant_enabled(module, fake_quant)
    with torch.no_grad():
        out = module(x.to(module.device))
    set_fake_quant_enabled(module, True)
    return (out.full_tensor() if hasattr(out, "full_tensor") else out).cpu()


class AtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.outputs = outputs(pl_module, fixed)


torch.manual_seed(0)
data = fsdp2_digits(args)
data.setup("test")
test_set = data.test_dataloader().dataset
fixed = torch.stack([test_set[i][0] for i in range(64)])  # the same inputs on every rank and in one process
start = AtStart()
model = Classifier(DigitsMLP(hidden=(64, 64), dropout=0.0))
ranges = {"freeze_ranges_step": 0, "refresh_ranges_every": 1} if args.refresh else {}
qat = QuantizationAwareTraining(start_step=0 if not args.convert else 10, convert_on_fit_end=args.convert, **ranges)
sharded = args.mode == "fsdp2"
trainer = pl.Trainer(**fsdp2_trainer_kwargs(args, callbacks=[qat, start]))
trainer.fit(model, data)
result = {}
if args.convert:
    if trainer.is_global_zero:
        converted = qat.converted_model if sharded else model.net
        result["accuracy"] = torch.tensor(evaluate_accuracy(converted, data.test_dataloader()))
        if sharded:  # the consolidated file reloads into a fresh, converted model: safetensors, no pickle
            fresh = Classifier(DigitsMLP(hidden=(64, 64), dropout=0.0))
            prepare_qat(fresh, qat.scheme)
            convert_qat(fresh, qat.scheme)
            load_safetensors(fresh, qat.converted_path)
            result["reloaded_accuracy"] = torch.tensor(evaluate_accuracy(fresh.net, data.test_dataloader()))
else:
    result["at_start"] = start.outputs
    result["fake_quantized"] = outputs(model, fixed)
    result["float"] = outputs(model, fixed, fake_quant=False)
    if args.refresh:  # the fixed ranges, whole on every rank (buffers are not sharded)
        result["scale"] = model.net.head.weight_fake_quantizer.scale.detach().cpu()
if trainer.is_global_zero:
    suffix = ("-converted" if args.convert else "") + ("-refreshed" if args.refresh else "")
    torch.save(result, args.out / f"qat-{args.mode}{suffix}.pt")
finish_distributed()
