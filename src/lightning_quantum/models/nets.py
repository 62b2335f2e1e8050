"""Small reference nets for the bundled digits data (8x8 images, 10 classes)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_quantum._validation import check_fraction, check_positive

__all__ = [
    "ARCHITECTURES",
    "MLPBlock",
    "ConvBlock",
    "DigitsMLP",
    "DigitsCNN",
    "build_architecture",
    "digits_architecture_of",
]


class MLPBlock(nn.Module):
    """Linear, ReLU, dropout: the unit that activation checkpointing wraps in :class:`DigitsMLP`."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.act(self.linear(x)))


class ConvBlock(nn.Module):
    """3x3 convolution, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DigitsMLP(nn.Module):
    """An MLP over the 64 flattened pixels: 64-512-512-10 by default.

    Args:
        in_features: input pixels.
        hidden: widths of the hidden layers.
        num_classes: output classes.
        dropout: dropout after each hidden layer, in [0, 1).
    """

    activation_checkpoint_blocks = (MLPBlock,)

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] | list[int] = (512, 512),
        num_classes: int = 10,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        check_positive("num_classes", num_classes)
        check_fraction("dropout", dropout)
        if not hidden or not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ValueError(f"`hidden`={hidden!r} is not valid. Give one or more positive layer widths.")
        widths = [in_features, *hidden]
        self.blocks = nn.Sequential(*(MLPBlock(a, b, dropout) for a, b in zip(widths[:-1], widths[1:])))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x.flatten(1)))


class DigitsCNN(nn.Module):
    """A small convnet with BatchNorm for 1x8x8 images.

    Two conv blocks at 8x8, a 2x2 max-pool, a third conv block at 4x4, then a linear classifier.

    Args:
        channels: output channels of the three conv blocks.
        hidden: width of the hidden linear layer.
        num_classes: output classes.
        dropout: dropout before the classifier, in [0, 1).
    """

    activation_checkpoint_blocks = (ConvBlock,)

    def __init__(
        self,
        channels: tuple[int, int, int] | list[int] = (32, 64, 64),
        hidden: int = 128,
        num_classes: int = 10,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(channels) != 3 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"`channels`={channels!r} is not valid. Give three positive channel counts.")
        check_positive("hidden", hidden)
        check_positive("num_classes", num_classes)
        check_fraction("dropout", dropout)
        c1, c2, c3 = channels
        self.features = nn.Sequential(ConvBlock(1, c1), ConvBlock(c1, c2), nn.MaxPool2d(2), ConvBlock(c2, c3))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 4 * 4, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.view(-1, 1, 8, 8)
        return self.classifier(self.features(x))


def digits_architecture_of(state: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Which bundled digits net a state dict holds, with the arguments that build it, or ``None``.

    ``("digits_mlp", {"hidden": [128]})`` or ``("digits_cnn", {"channels": [8, 16, 32], "hidden": 64})``.
    Keys may sit under a prefix (a Classifier's ``net.``, a DistillationModule's ``student.``) and
    inside the activation-checkpointing wrapper. It lets an error say what a file is when it does not
    fit the model asked for.
    """
    keys = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}
    for prefix in ("", "net.", "student."):
        blocks = {
            int(m.group(1)): v
            for k, v in keys.items()
            if (m := re.fullmatch(rf"{re.escape(prefix)}blocks\.(\d+)\.linear\.weight", k))
        }
        head = keys.get(f"{prefix}head.weight")
        if blocks and head is not None and sorted(blocks) == list(range(len(blocks))):
            hidden = [int(blocks[i].shape[0]) for i in range(len(blocks))]
            return "digits_mlp", {"hidden": hidden, "num_classes": int(head.shape[0])}
        convs = [keys.get(f"{prefix}features.{i}.conv.weight") for i in (0, 1, 3)]
        linear, out = keys.get(f"{prefix}classifier.1.weight"), keys.get(f"{prefix}classifier.4.weight")
        if all(c is not None for c in convs) and linear is not None and out is not None:
            channels = [int(c.shape[0]) for c in convs]  # type: ignore[union-attr]
            return "digits_cnn", {
                "channels": channels,
                "hidden": int(linear.shape[0]),
                "num_classes": int(out.shape[0]),
            }
    return None


def _digits_mlp(options: Mapping[str, Any]) -> nn.Module:
    return DigitsMLP(hidden=tuple(options.get("hidden") or (512, 512)), dropout=0.0)


def _digits_cnn(options: Mapping[str, Any]) -> nn.Module:
    return DigitsCNN(channels=tuple(options.get("channels") or (32, 64, 64)), hidden=int(options.get("width") or 128))


#: The bundled architectures by name (the service's and ``lq-optimize``'s names; ``conf/model/<name>.yaml``):
#: a fixed list, so a model is never built from a Python target that came with a request.
ARCHITECTURES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "digits_mlp": _digits_mlp,
    "digits_cnn": _digits_cnn,
}


def build_architecture(architecture: str, options: Mapping[str, Any]) -> nn.Module:
    """A fresh model of a bundled architecture (:data:`ARCHITECTURES`) with the given options, for inference
    (no dropout): ``hidden`` for ``digits_mlp``; ``channels`` and ``width`` for ``digits_cnn``."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"`architecture`={architecture!r} is not valid. Choose one of: {', '.join(map(repr, ARCHITECTURES))}."
        )
    return ARCHITECTURES[architecture](options)
