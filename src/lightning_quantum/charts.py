"""PNG charts for the report and the levels benchmark (matplotlib, headless).

Each function writes one PNG and returns its path. They use matplotlib's ``Agg`` backend, so they
work without a display, and never change the caller's pyplot state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Imported inside the functions that use them: matplotlib (slow to import, and only for the charts).

__all__ = ["curves_chart", "levels_chart", "sparsity_chart"]


def _figure(width: float = 6.4, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")  # no pyplot: no global state


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def sparsity_chart(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Horizontal bars of each layer's sparsity (rows as ``sparsity_report`` gives them)."""
    layers = [r for r in rows if r.get("layer") != "(global)"]
    fig = _figure(6.4, max(2.0, 0.35 * len(layers) + 1.2))
    ax = fig.add_subplot()
    # activation checkpointing wraps blocks; the layer is the same one, so the chart drops the wrapper's name
    names = [str(r["layer"]).replace("._checkpoint_wrapped_module", "") for r in layers]
    ax.barh(names, [float(r["sparsity"]) for r in layers], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (share of exact zeros)")
    total = next((r for r in rows if r.get("layer") == "(global)"), None)
    ax.set_title("Per-layer sparsity" + (f" (global {float(total['sparsity']):.2f})" if total else ""))
    return _save(fig, path)


def curves_chart(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path:
    """One panel per curve of ``(step, value)`` points, e.g. the sparsity and loss-scale histories."""
    items = [(name, points) for name, points in curves.items() if points]
    fig = _figure(6.4, 2.4 * max(1, len(items)))
    for i, (name, points) in enumerate(items, start=1):
        ax = fig.add_subplot(len(items), 1, i)
        steps, values = zip(*points)
        ax.step(steps, values, where="post", color="#dd8452")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if name == "loss scale":
            ax.set_yscale("log", base=2)
    if items:
        fig.axes[-1].set_xlabel("optimizer step")
    return _save(fig, path)


def levels_chart(levels: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Accuracy against size, and against p50 latency, one point per level."""
    fig = _figure(9.6, 3.6)
    for i, (key, label) in enumerate((("size_mb", "size (MB)"), ("latency_p50_ms", "p50 latency (ms)")), start=1):
        ax = fig.add_subplot(1, 2, i)
        for j, (name, figures) in enumerate(levels.items()):
            ax.scatter(figures[key], figures["test_accuracy"], s=40)
            offset = (5, 4 + 11 * (j % 3))  # levels that share a size or latency keep readable labels
            ax.annotate(name, (figures[key], figures["test_accuracy"]), textcoords="offset points", xytext=offset)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("Levels: accuracy against size and latency")
    return _save(fig, path)
