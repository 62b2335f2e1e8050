"""Deprecated name of :mod:`lightning_quantum.activation_checkpointing` (in Lightning, "checkpoint" means
``ModelCheckpoint``); kept for one release."""

import warnings

from lightning_quantum.activation_checkpointing import (  # noqa: F401
    BlockTypes,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)

warnings.warn(
    "`lightning_quantum.checkpointing` is renamed `lightning_quantum.activation_checkpointing`; "
    "the old name goes in the next release.",
    DeprecationWarning,
    stacklevel=2,
)
