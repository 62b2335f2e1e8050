"""Sparsity schedules as pure functions of the step (or epoch).

``t`` counts optimizer steps (or epochs, when a schedule is given per epoch). Pruning begins at
``start``; the target is updated every ``frequency`` units until ``end``, then holds at the final
sparsity. Between updates the target holds, so masks change only on update steps.

* ``one_shot``: the final sparsity at ``start``.
* ``constant``: ``initial_sparsity`` from ``start`` to ``end``, then the final sparsity.
* ``linear``: straight from the initial to the final sparsity between ``start`` and ``end``.
* ``cubic``: Zhu & Gupta (2017), ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3``: prunes fast
  while many redundant weights remain and slowly near the end.

Example:
    >>> s = SparsitySchedule("cubic", final_sparsity=0.9, start=0, end=100, frequency=10)
    >>> [round(s.sparsity_at(t), 3) for t in (0, 10, 50, 100, 500)]
    [0.0, 0.244, 0.787, 0.9, 0.9]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lightning_quantum._validation import check_choice, check_fraction

__all__ = [
    "SparsitySchedule",
    "SCHEDULES",
    "cubic_sparsity",
    "linear_sparsity",
    "constant_sparsity",
    "one_shot_sparsity",
]

ScheduleKind = Literal["one_shot", "constant", "linear", "cubic"]


def one_shot_sparsity(progress: float, initial: float, final: float) -> float:
    """The final sparsity as soon as pruning starts."""
    return final


def constant_sparsity(progress: float, initial: float, final: float) -> float:
    """``initial`` until the end of the schedule, then ``final``."""
    return final if progress >= 1.0 else initial


def linear_sparsity(progress: float, initial: float, final: float) -> float:
    """Straight from ``initial`` to ``final``."""
    return initial + (final - initial) * progress


def cubic_sparsity(progress: float, initial: float, final: float) -> float:
    """Zhu & Gupta: ``final + (initial - final) * (1 - progress) ** 3``."""
    return final + (initial - final) * (1.0 - progress) ** 3


#: Schedule functions by name: ``f(progress in [0, 1], initial, final) -> sparsity``.
SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "one_shot": one_shot_sparsity,
    "constant": constant_sparsity,
    "linear": linear_sparsity,
    "cubic": cubic_sparsity,
}


@dataclass(frozen=True)
class SparsitySchedule:
    """When to prune and how much.

    Args:
        kind: ``"one_shot"``, ``"constant"``, ``"linear"`` or ``"cubic"``.
        final_sparsity: the target at ``end``, in [0, 1).
        initial_sparsity: the target at ``start``, in [0, 1), at most ``final_sparsity``.
        start: first update, in steps (or epochs).
        end: last update; equal to ``start`` for one-shot.
        frequency: units between updates.

    Raises:
        ValueError: for an unknown kind, a sparsity outside [0, 1), ``end`` before ``start``, or a
            frequency below 1.
    """

    kind: ScheduleKind
    final_sparsity: float
    initial_sparsity: float = 0.0
    start: int = 0
    end: int = 0
    frequency: int = 1

    def __post_init__(self) -> None:
        check_choice("schedule", self.kind, SCHEDULES)
        check_fraction("final_sparsity", self.final_sparsity)
        check_fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"`initial_sparsity`={self.initial_sparsity} is above `final_sparsity`={self.final_sparsity}: "
                "masks only grow, so the schedule must not fall."
            )
        if not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"`start_step`={self.start!r} is not valid. It must be an integer >= 0.")
        if not isinstance(self.end, int) or self.end < self.start:
            raise ValueError(f"`end_step`={self.end!r} is before `start_step`={self.start}. It must be >= start_step.")
        if not isinstance(self.frequency, int) or self.frequency < 1:
            raise ValueError(f"`frequency`={self.frequency!r} is not valid. It must be an integer >= 1.")

    @property
    def num_updates(self) -> int:
        """How many times the masks are recomputed: at start, every ``frequency``, and at end."""
        if self.kind == "one_shot" or self.end == self.start:
            return 1
        return math.ceil((self.end - self.start) / self.frequency) + 1

    def is_update_step(self, t: int) -> bool:
        """Whether masks are recomputed at ``t``."""
        if t < self.start or t > self.end:
            return False
        if self.kind == "one_shot":
            return t == self.start
        return t == self.end or (t - self.start) % self.frequency == 0

    def progress(self, t: int) -> float:
        """Position in the schedule, in [0, 1], at the last update at or before ``t``."""
        if self.end == self.start:
            return 1.0
        if t >= self.end:
            return 1.0
        last = self.start + ((t - self.start) // self.frequency) * self.frequency
        return (last - self.start) / (self.end - self.start)

    def sparsity_at(self, t: int) -> float:
        """The target sparsity in force at ``t``: 0 before ``start``."""
        if t < self.start:
            return 0.0
        if self.kind == "one_shot":
            return self.final_sparsity
        return SCHEDULES[self.kind](self.progress(t), self.initial_sparsity, self.final_sparsity)
