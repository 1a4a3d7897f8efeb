"""Learning-rate schedules as small picklable callables for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations


class LinearWarmup:
    """Factor ramping linearly from ``1 / warmup_steps`` to 1, then constant."""

    def __init__(self, warmup_steps: int = 100) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.warmup_steps))
