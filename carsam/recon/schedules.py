"""Schedules of one reconstruction: the AdaRound beta / regulariser weight, and the cosine LR factor.

Conventions (AdaRound, BRECQ, QDrop): for a run of `total` steps, the regulariser is off during the
first `warmup * total` steps; afterwards beta falls linearly from `beta_start` (20) to `beta_end` (2)
and the regulariser counts with weight `weight` (0.01). The activation-step learning rate follows a
cosine from its base value to 0 over the run.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class RoundingSchedule:
    """Beta annealing and weight of the AdaRound regulariser over `total` steps (0-based `step`)."""

    total: int
    weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"total must be >= 1, got {self.total}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")

    @property
    def warmup_steps(self) -> int:
        """Steps without the regulariser: `int(warmup * total)`."""
        return int(self.warmup * self.total)

    def active(self, step: int) -> bool:
        """Whether the regulariser counts at `step`."""
        return step >= self.warmup_steps

    def beta(self, step: int) -> float:
        """`beta_start` until the warm-up ends, then linear in `step`, reaching `beta_end` at `step == total`."""
        start = self.warmup_steps
        if step <= start:
            return self.beta_start
        progress = min(1.0, (step - start) / max(1, self.total - start))
        return self.beta_end + (self.beta_start - self.beta_end) * (1.0 - progress)

    def weight_at(self, step: int) -> float:
        """The regulariser's weight at `step`: 0 during the warm-up, `weight` after."""
        return self.weight if self.active(step) else 0.0


def cosine_factor(step: int, total: int, final: float = 0.0) -> float:
    """LR multiplier at `step` of `total`: `final + (1 - final) * (1 + cos(pi * step / total)) / 2`."""
    progress = min(max(step, 0), total) / max(1, total)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["RoundingSchedule", "cosine_factor"]
