"""Add lightning-quantum callbacks to a plain Lightning Trainer, without Hydra.

python examples/train_with_callbacks.py
"""

import lightning as L

import lightning_quantum as lq
from lightning_quantum.callbacks import ActivationCheckpointing, GradScalerMonitor, MemoryMonitor, OptimizationReport
from lightning_quantum.data import DigitsDataModule
from lightning_quantum.models import Classifier, DigitsCNN

# 1. Seed everything, so the run can be repeated.
L.seed_everything(0, workers=True)

# 2. Real data: sklearn's 8x8 digits, as 1x8x8 images for the convnet.
datamodule = DigitsDataModule(batch_size=64, layout="image")

# 3. Any LightningModule works; this one wraps the small convnet with BatchNorm.
model = Classifier(DigitsCNN(), num_classes=10)

# 4. Pick a precision: "auto" gives bf16-mixed on CUDA >= 8.0 or a CPU with AVX512-BF16/AMX,
#    16-mixed with a GradScaler on older GPUs, and 32-true otherwise.
decision = lq.resolve_precision("auto")
print(f"precision: {decision.precision} ({decision.reason})")

# 5. Our callbacks, on a plain Trainer. The report goes last, so it measures the final model.
trainer = L.Trainer(
    max_epochs=5,
    precision=decision.precision,
    gradient_clip_val=1.0,
    logger=False,
    enable_checkpointing=False,
    default_root_dir="outputs/example",
    callbacks=[
        MemoryMonitor(log_every_n_steps=20),
        GradScalerMonitor(),
        ActivationCheckpointing(),  # wraps the ConvBlocks that DigitsCNN declares
        OptimizationReport(output_dir="outputs/example", batch_size=256),
    ],
)

# 6. Fit; the report (report.json, report.md and a table) is written when fit ends.
trainer.fit(model, datamodule=datamodule)
trainer.test(model, datamodule=datamodule)

# 7. The same recipe in one line: lq.recipe("advanced").trainer_kwargs() gives these callbacks and settings.
print(sorted(lq.recipe("advanced").callbacks))
