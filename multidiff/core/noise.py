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

    ``generator`` may be ``None`` (global RNG), a ``torch.Generator`` (on any device), a
    :class:`PerSampleGenerator` (batch-size independent noise, drawn on the CPU) or a
    :class:`PriorGenerator` (noise from a correlated prior).
    """
    if generator is None:
        return torch.randn_like(x)
    return _randn(generator, tuple(x.shape), x)


class SharedNoise:
    """A Gaussian noise prior correlated along some axes of each sample (the "mixed" prior of
    Ge et al. 2023, PYoCo): ``noise = sqrt(rho) * shared + sqrt(1 - rho) * independent``, where
    ``shared`` is drawn once per sample and broadcast along ``axes`` (e.g. the frame axis of
    ``(C, T, H, W)`` video: every frame starts from partly the same noise). Each value keeps unit
    variance; values along ``axes`` have correlation ``rho``. Training and sampling must use the
    same prior, which is why it belongs to the :class:`~multidiff.core.denoiser.Denoiser`:
    the probability-flow ODE in denoiser form is unchanged by a noise covariance, so every
    deterministic sampler works as is, and the stochastic ones draw their fresh noise from it too.

    Args:
        correlation: ``rho`` in ``[0, 1)``; 0 is the plain isotropic prior.
        axes: sample axes (after the batch axis; 1 = frames of ``(C, T, H, W)``) the shared part is
            constant along.
    """

    def __init__(self, correlation: float = 0.5, axes: Sequence[int] = (1,)) -> None:
        if not 0.0 <= float(correlation) < 1.0:
            raise ValueError(f"noise prior correlation must be in [0, 1), got {correlation!r}")
        self.correlation = float(correlation)
        self.axes = tuple(int(a) for a in axes)
        if not self.axes or any(a < 0 for a in self.axes):
            raise ValueError(f"noise prior axes must be sample axes >= 0 (0 = channels), got {list(axes)}")

    def shared_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """``shape`` (batch first) with the shared axes set to 1."""
        shape = list(shape)
        for a in self.axes:
            if a + 1 >= len(shape):
                raise ValueError(f"noise prior axis {a} does not exist in samples of shape {tuple(shape[1:])}")
            shape[a + 1] = 1
        return tuple(shape)

    def mix(self, independent: Tensor, shared: Tensor) -> Tensor:
        """Combine two standard-normal draws (``shared`` of :meth:`shared_shape`) into the prior."""
        rho = self.correlation
        return independent * math.sqrt(1.0 - rho) + shared * math.sqrt(rho)

    def sample(self, shape: Sequence[int], *, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        """A draw of shape ``shape`` (batch first) from a ``torch.Generator`` (or the global RNG)."""
        return PriorGenerator(generator, self).randn(shape, device=device)

    def __repr__(self) -> str:
        return f"SharedNoise(correlation={self.correlation}, axes={list(self.axes)})"


class PriorGenerator:
    """Wraps a generator (``torch.Generator``, :class:`PerSampleGenerator` or ``None``) so that its
    noise comes from a prior such as :class:`SharedNoise`; samplers take it wherever they take a
    generator (per-sample seeding keeps working: both parts come from sample ``i``'s generator)."""

    def __init__(self, base: Generator, prior: SharedNoise) -> None:
        self.base, self.prior = base, prior

    def randn(self, shape: Sequence[int], *, dtype=torch.float32, device="cpu") -> Tensor:
        ref = torch.empty(0, dtype=torch.float32, device=device)
        independent = _randn(self.base, tuple(shape), ref)
        shared = _randn(self.base, self.prior.shared_shape(shape), ref)
        return self.prior.mix(independent, shared).to(dtype)


def with_prior(generator: Generator, prior: SharedNoise | None):
    """``generator`` drawing from ``prior`` (unchanged when ``prior`` is None)."""
    return generator if prior is None else PriorGenerator(generator, prior)


def _randn(generator: Generator, shape: tuple[int, ...], ref: Tensor) -> Tensor:
    if isinstance(generator, (PerSampleGenerator, PriorGenerator)):
        return generator.randn(shape, dtype=ref.dtype, device=ref.device)
    if generator is None:
        return torch.randn(shape, dtype=ref.dtype, device=ref.device)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=ref.device, dtype=ref.dtype)


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

    ``shift`` moves the times towards high noise as :class:`~multidiff.core.schedules.FlowSchedule`'s
    sampling grid does (``t' = shift t / (1 + (shift - 1) t)``; SD3 trains and samples with the same
    shift), so that items whose content stays visible far into the noise (a long clip, a large image)
    train where they are generated. ``t`` is clipped to ``[t_min, t_max]`` after the shift, so
    ``sigma`` stays finite.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, t_min: float = 1e-4, t_max: float = 0.999,
                 shift: float = 1.0) -> None:
        if not shift > 0:
            raise ValueError(f"shift={shift!r} is invalid: it must be a positive number (1: no shift)")
        self.mean, self.std, self.t_min, self.t_max, self.shift = mean, std, t_min, t_max, float(shift)

    def sample(self, batch: int, *, device="cpu", generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
        t = torch.sigmoid(self.mean + self.std * z)
        if self.shift != 1.0:
            t = self.shift * t / (1 + (self.shift - 1) * t)
        t = t.clamp(self.t_min, self.t_max)
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
