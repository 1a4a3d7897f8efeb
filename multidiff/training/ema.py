"""Exponential moving average of weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    # trained parameters only: a frozen one (the base under LoRA adapters) equals its average already
    pairs = [(e, m.detach()) for e, m in zip(ema.parameters(), model.parameters()) if m.requires_grad]
    if pairs:  # torch's public EMA step: one fused (foreach) lerp over all parameters
        get_ema_multi_avg_fn(decay)([e for e, _ in pairs], [m for _, m in pairs], None)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def ema_decay(step: int, max_decay: float, warmup: bool = True) -> float:
    """Decay at optimizer step ``step``: ramps as ``(1 + step) / (10 + step)`` up to ``max_decay``,
    so short runs are not dominated by their random initialization."""
    return min(max_decay, (1 + step) / (10 + step)) if warmup else max_decay
