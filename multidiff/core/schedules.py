"""Noise schedules as sigma grids.

Everything in multidiff's core lives in the variance-exploding ("sigma") frame of Karras et al.
(2022): ``x = x0 + sigma * noise``. A variance-preserving model with cumulative alpha ``a`` sits
at ``sigma = sqrt((1 - a) / a)``; a flow-matching model at time ``t`` at ``sigma = t / (1 - t)``.
A sampling grid is a float32 tensor of ``steps + 1`` decreasing sigmas that ends with ``0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    # Nichol & Dhariwal (2021), eq. 17, with the usual clip of beta at 0.999.
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(kind: str, n: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """Discrete betas (float64) of the named kind: ``linear``, ``scaled_linear`` or ``cosine``."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "cosine":
        return _cosine_betas(n)
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of: linear, scaled_linear, cosine")


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class VPSchedule:
    """A discrete variance-preserving schedule (DDPM, Stable Diffusion) seen as sigmas.

    Args:
        beta_schedule: ``linear``, ``scaled_linear`` or ``cosine``.
        num_train_timesteps: number of discrete training timesteps ``T``.
        spacing: how sampling timesteps are picked: ``trailing``, ``leading`` or ``linspace``
            (the names diffusers uses), or ``karras`` (Karras' rho-spacing between the table's ends).
        shift: multiplies every sigma of the table (log-SNR lowered by ``2 ln shift``), for training
            and sampling alike: the resolution-dependent shift of Hoogeboom et al. (2023) and
            Esser et al. (2024; SD3's flow ``shift`` is the same map). Inputs with more redundant
            values than the schedule was made for (larger images, spectrograms, many frames of one
            scene) keep their content visible at higher noise, so their coarse decisions (layout,
            pitch, identity across frames) are made at sigmas the unshifted table rarely trains;
            a shift of about ``sqrt(values / reference values)`` moves them back. 1 = off.
        steps_offset: added to every ``leading`` timestep, as diffusers' schedulers do (Stable
            Diffusion's configs use 1); other spacings ignore it, as diffusers' do.
    """

    def __init__(
        self,
        beta_schedule: str = "cosine",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        spacing: str = "trailing",
        rho: float = 7.0,
        shift: float = 1.0,
        steps_offset: int = 0,
    ) -> None:
        if not shift > 0:
            raise ValueError(f"schedule shift must be > 0 (1 = no shift), got {shift!r}")
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.beta_schedule, self.beta_start, self.beta_end = beta_schedule, float(beta_start), float(beta_end)
        abar = torch.cumprod(1 - betas, dim=0)
        sig = ((1 - abar) / abar).sqrt() * float(shift)
        self.alphas_cumprod = 1 / (1 + sig**2)  # of the shifted table (unchanged at shift 1)
        self.shift = float(shift)
        self.sigmas_table = sig.float()  # (T,), increasing in t
        self._log_sigmas = sig.log()  # float64 for an exact sigma -> t map
        self.num_train_timesteps = num_train_timesteps
        self.spacing, self.rho, self.steps_offset = spacing, rho, int(steps_offset)
        if not 0 <= self.steps_offset < num_train_timesteps:
            raise ValueError(f"steps_offset must be in [0, {num_train_timesteps}), got {steps_offset!r}")
        if spacing not in ("trailing", "leading", "linspace", "karras"):
            raise ValueError(f"unknown spacing {spacing!r}; choose trailing, leading, linspace or karras")

    @property
    def max_steps(self) -> int | None:
        """The most sampling steps with distinct noise levels: the table has ``T`` timesteps
        (``T - 1`` with linspace spacing, whose grid includes both ends); none for karras spacing."""
        if self.spacing == "karras":
            return None
        return self.num_train_timesteps - (1 if self.spacing == "linspace" else 0)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas_table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas_table[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for each sigma, interpolating linearly in log-sigma. Shape kept."""
        log_sigma = sigma.detach().double().clamp_min(1e-30).log()
        table = self._log_sigmas.to(sigma.device)
        idx = torch.searchsorted(table, log_sigma).clamp(1, len(table) - 1)
        lo, hi = table[idx - 1], table[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + w).float()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = t.double().clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        table = self._log_sigmas.to(t.device)
        return ((1 - w) * table[lo] + w * table[hi]).exp().float()

    def timesteps(self, steps: int) -> Tensor:
        """The integer sampling timesteps diffusers would use for ``steps`` (decreasing)."""
        n = self.num_train_timesteps
        i = torch.arange(steps + 1, dtype=torch.float64)
        if self.spacing == "trailing":
            # numpy's arange(n, 0, -n / steps) as diffusers computes it (start + i * delta with
            # delta = (start + step) - start), but exactly ``steps`` values: a float arange can add a
            # spurious last one that rounds to timestep -1 (the *noisiest* sigma), e.g. steps=61.
            ts = (n + i[:steps] * ((n - n / steps) - n)).round() - 1
        elif self.spacing == "leading":
            ts = (i[:steps] * (n // steps)).flip(0) + self.steps_offset
            ts = ts.clamp(max=n - 1)
        else:  # linspace: numpy's linspace(0, n - 1, steps + 1) (i * step, exact endpoint)
            ts = i * ((n - 1) / steps)
            ts[-1] = n - 1
            ts = ts.round().flip(0)[:-1]
        return ts.long()

    def sigmas(self, steps: int) -> Tensor:
        """Sampling grid of ``steps + 1`` sigmas ending in 0, float32."""
        _check_steps(steps, self.max_steps, f"{self.num_train_timesteps} training timesteps, {self.spacing} spacing")
        if self.spacing == "karras":
            return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)
        return append_zero(self.sigmas_table[self.timesteps(steps)])


class KarrasSchedule:
    """EDM's continuous schedule: sampling grid from Karras et al. (2022), eq. 5."""

    max_steps = None  # continuous: any number of steps (float32 resolution permitting)

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def sigmas(self, steps: int) -> Tensor:
        _check_steps(steps)
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)


class ExponentialSchedule:
    """A grid uniform in ``log sigma`` from ``sigma_max`` down to ``sigma_min``, then 0 (k-diffusion's
    ``get_sigmas_exponential``; diffusers' EDM schedulers' ``sigma_schedule=exponential``, Stable Audio's)."""

    max_steps = None

    def __init__(self, sigma_min: float = 0.3, sigma_max: float = 500.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"ExponentialSchedule needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigmas(self, steps: int) -> Tensor:
        _check_steps(steps)
        # float32 throughout, as diffusers computes it, so imported models sample on the same grid
        grid = torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), steps).exp().flip(0)
        return append_zero(grid.float())


class FlowSchedule:
    """The linear flow-matching path ``x_t = (1 - t) x0 + t noise`` (rectified flow, SD3).

    The grid is uniform in ``t`` from ``t_max`` to 0, optionally shifted towards high noise with
    SD3's ``t' = shift t / (1 + (shift - 1) t)``, and returned as ``sigma = t / (1 - t)``.
    ``t_max`` stays below 1 so that the first sigma is finite in the sigma frame.

    ``spacing`` picks where the ``steps`` levels sit before the shift (the final level is always 0):

    * ``uniform``: ``linspace(t_max, 0, steps + 1)`` (multidiff's own recipes; with ``t_max = 1 - 1 / T`` the
      ``use_flow_sigmas`` grid of diffusers' ``DPMSolverMultistepScheduler``);
    * ``flow_match_euler``: diffusers' ``FlowMatchEulerDiscreteScheduler``: ``steps`` times from 1 to
      the shifted ``1 / num_train_timesteps``, evenly spaced, then shifted (again), then 0;
    * ``flow_sigmas``: the ``use_flow_sigmas`` grid of diffusers' ``UniPCMultistepScheduler``:
      ``linspace(1, 1 / num_train_timesteps, steps + 1)`` without its last value, shifted, then 0.

    The two diffusers spacings start at ``t = 1``, where ``sigma`` is infinite; it is taken as
    ``1 - 1e-6`` (as diffusers' multistep schedulers do), which the pure-noise start and every
    sampler carry to within 1e-6 of the exact ``t = 1`` step. The published models that use them
    (Wan, SD3) are imported with them, so their samples match the diffusers pipeline's.
    """

    max_steps = None  # continuous: any number of steps (float32 resolution permitting)
    SPACINGS = ("uniform", "flow_match_euler", "flow_sigmas")
    T_ONE = 1.0 - 1e-6

    def __init__(self, shift: float = 1.0, t_max: float = 0.999, spacing: str = "uniform",
                 num_train_timesteps: int = 1000) -> None:
        if not shift > 0:
            raise ValueError(f"flow schedule shift must be > 0 (1 = no shift), got {shift!r}")
        if spacing not in self.SPACINGS:
            raise ValueError(f"unknown flow spacing {spacing!r}; choose one of {', '.join(self.SPACINGS)}")
        self.shift, self.t_max, self.spacing = float(shift), t_max, spacing
        self.num_train_timesteps = int(num_train_timesteps)

    def _shift(self, t):
        return self.shift * t / (1 + (self.shift - 1) * t)

    @property
    def sigma_min(self) -> float:
        return 1e-4

    @property
    def sigma_max(self) -> float:
        t = min(self._shift(self.t_max if self.spacing == "uniform" else 1.0), self.T_ONE)
        return t / (1 - t)

    def times(self, steps: int) -> Tensor:
        """The ``steps + 1`` flow times of the grid (float64, decreasing, ending with 0)."""
        _check_steps(steps)
        n = self.num_train_timesteps
        if self.spacing == "uniform":
            return self._shift(torch.linspace(self.t_max, 0, steps + 1, dtype=torch.float64))
        if self.spacing == "flow_match_euler":
            t = self._shift(torch.linspace(1.0, self._shift(1.0 / n), steps, dtype=torch.float64))
        else:
            t = self._shift(torch.linspace(1.0, 1.0 / n, steps + 1, dtype=torch.float64)[:-1])
        return append_zero(t.clamp(max=self.T_ONE))

    def sigmas(self, steps: int) -> Tensor:
        t = self.times(steps)
        if self.spacing != "uniform":  # diffusers holds these times in float32: sigma of the same rounded t
            t = t.float().double()
        return (t / (1 - t)).float()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: ``steps`` sigmas from ``sigma_max`` to ``sigma_min``, then 0."""
    _check_steps(steps)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero(((hi + ramp * (lo - hi)) ** rho).float())


def flow_t(sigma: Tensor) -> Tensor:
    """Flow time ``t = sigma / (1 + sigma)`` of a sigma (inverse of ``sigma = t / (1 - t)``)."""
    return sigma / (1 + sigma)


def _check_steps(steps: int, max_steps: int | None = None, table: str = "") -> None:
    if isinstance(steps, bool) or int(steps) != steps or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if max_steps is not None and steps > max_steps:
        raise ValueError(
            f"this model's schedule has {max_steps} distinct noise levels ({table}): "
            f"use steps <= {max_steps}; more steps would repeat noise levels and gain nothing"
        )
