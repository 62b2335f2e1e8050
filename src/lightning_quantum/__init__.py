"""lightning-quantum: compression and efficient-training callbacks for PyTorch Lightning.

Example:
    >>> import lightning_quantum as lq
    >>> kwargs = lq.recipe("advanced").trainer_kwargs()  # doctest: +SKIP
"""

import importlib.metadata

from lightning_quantum.benchmark import OptimizationPerformanceMetrics, benchmark_model
from lightning_quantum.deployment import DeploymentDecision, choose_deployment, load_deployment, save_deployment
from lightning_quantum.fsdp import FSDP2Strategy  # also registers Trainer(strategy="fsdp2")
from lightning_quantum.gpu import gpu_status
from lightning_quantum.levels import OptimizationLevel, Recipe, recipe
from lightning_quantum.optimize import OptimizationResult, load_optimized, optimize, save_optimized
from lightning_quantum.precision import PrecisionDecision, resolve_precision
from lightning_quantum.report import OptimizationReportData

try:  # the one spelling of the version is the package metadata (pyproject.toml)
    __version__ = importlib.metadata.version("lightning-quantum")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "OptimizationLevel",
    "OptimizationPerformanceMetrics",
    "OptimizationReportData",
    "OptimizationResult",
    "PrecisionDecision",
    "Recipe",
    "DeploymentDecision",
    "FSDP2Strategy",
    "benchmark_model",
    "choose_deployment",
    "gpu_status",
    "load_deployment",
    "load_optimized",
    "optimize",
    "recipe",
    "resolve_precision",
    "save_deployment",
    "save_optimized",
    "__version__",
]
