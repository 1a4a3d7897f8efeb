"""Seeded noise and training noise-level densities.

Seeded per-sample noise: sample ``i`` drawn with seed ``s`` is bit-identical whatever the batch it
was drawn in, because every sample owns its own ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class PerSampleGenerator:
    """One CPU ``torch.Generator`` per batch element.

    Args:
        seeds: one integer seed per sample, shape ``(B,)`` as a list.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], *, dtype=torch.float32, device="cpu") -> Tensor:
        """Standard normal noise of shape ``(B, *shape[1:])``; row ``i`` comes from generator ``i``."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} samples but {len(self.generators)} seeds")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)


Generator = torch.Generator | PerSampleGenerator | None


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like ``x`` drawn from ``generator``.

    ``generator`` may be ``None`` (global RNG), a ``torch.Generator`` (on any device) or a
    :class:`PerSampleGenerator` (batch-size independent noise, drawn on the CPU).
    """
    if isinstance(generator, PerSampleGenerator):
        return generator.randn(x.shape, dtype=x.dtype, device=x.device)
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample ``(B,)`` tensor broadcasts against rank ``ndim``."""
    missing = ndim - t.ndim
    if missing < 0:
        raise ValueError(f"tensor of rank {t.ndim} cannot broadcast to rank {ndim}")
    return t.reshape(t.shape + (1,) * missing)


# --- training noise densities: each returns per-sample sigmas of shape (B,), float32 -------------


class LogNormalSigma:
    """EDM's training density: ``ln(sigma) ~ N(p_mean, p_std^2)`` (Karras et al. 2022, Table 1)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.p_mean, self.p_std = p_mean, p_std

    def sample(self, batch: int, *, device="cpu", generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
        return (self.p_mean + self.p_std * z).exp()


class LogitNormalFlowSigma:
    """Flow-matching density (SD3): ``t = sigmoid(N(mean, std^2))``, returned as ``sigma = t / (1 - t)``.

    ``t`` is clipped to ``[t_min, t_max]`` so that ``sigma`` stays finite.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, t_min: float = 1e-4, t_max: float = 0.999) -> None:
        self.mean, self.std, self.t_min, self.t_max = mean, std, t_min, t_max

    def sample(self, batch: int, *, device="cpu", generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
        t = torch.sigmoid(self.mean + self.std * z).clamp(self.t_min, self.t_max)
        return t / (1 - t)


class DiscreteTimestepSigma:
    """DDPM's density: a uniform integer timestep, returned as that timestep's sigma."""

    def __init__(self, schedule) -> None:  # schedule: multidiff.core.schedules.VPSchedule
        self.schedule = schedule

    def sample(self, batch: int, *, device="cpu", generator: torch.Generator | None = None) -> Tensor:
        n = len(self.schedule.sigmas_table)
        t = torch.randint(0, n, (batch,), generator=generator, device=device)
        return self.schedule.sigmas_table.to(device)[t]


def log_uniform(batch: int, sigma_min: float, sigma_max: float, *, device="cpu", generator=None) -> Tensor:
    """Sigmas spread log-uniformly over ``[sigma_min, sigma_max]``, shape ``(B,)``."""
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))
