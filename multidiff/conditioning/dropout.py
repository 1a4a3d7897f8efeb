"""Condition dropout for classifier-free guidance training."""

from __future__ import annotations

import torch

from multidiff.core.cond import Cond


def drop_condition(cond: Cond, null: Cond, p: float, *, generator: torch.Generator | None = None) -> Cond:
    """Replace each sample's condition by ``null`` with probability ``p`` (Ho & Salimans 2022)."""
    if p <= 0:
        return cond
    b = len(cond)
    device = next(iter(cond._tensors().values())).device
    keep = torch.rand(b, generator=generator, device=device) >= p
    return Cond.where(keep, cond, null)
