"""Lightning callbacks: each decides *when* to call a pure transform from the library."""

from lightning_quantum.callbacks.activation_checkpointing import ActivationCheckpointing
from lightning_quantum.callbacks.deployment import DeploymentGate
from lightning_quantum.callbacks.export import ModelExport
from lightning_quantum.callbacks.grad_scaler_monitor import GradScalerMonitor
from lightning_quantum.callbacks.memory_monitor import MemoryMonitor
from lightning_quantum.callbacks.pruning import Pruning
from lightning_quantum.callbacks.qat import QuantizationAwareTraining
from lightning_quantum.callbacks.random_state import RandomStateCheckpoint
from lightning_quantum.callbacks.report import OptimizationReport
from lightning_quantum.callbacks.static_quantization import StaticQuantization

__all__ = [
    "ActivationCheckpointing",
    "DeploymentGate",
    "GradScalerMonitor",
    "MemoryMonitor",
    "ModelExport",
    "OptimizationReport",
    "Pruning",
    "QuantizationAwareTraining",
    "RandomStateCheckpoint",
    "StaticQuantization",
]
