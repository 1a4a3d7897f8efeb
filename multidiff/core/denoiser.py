"""Parameterizations: each turns a backbone into the one denoiser contract ``D(x, sigma, cond)``.

Every parameterization is a preconditioning in the form of EDM (Karras et al. 2022, eq. 7):

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma), cond)

with ``x = x0 + sigma * noise`` (the sigma frame). eps-, v-, x0-prediction and flow velocity are
just different ``(c_skip, c_out, c_in, c_noise)``. Training regresses ``F`` onto its ideal target
``F* = (x0 - c_skip x) / c_out`` (EDM eq. 8), which is the noise for eps, ``alpha n - sigma_vp x0``
for v, ``noise - x0`` for flow, and so on: one loss serves all of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from multidiff.core.cond import Cond
from multidiff.core.noise import append_dims
from multidiff.core.schedules import VPSchedule, flow_t


class Parameterization:
    """Base: scalings ``(c_skip, c_out, c_in)`` and ``c_noise``, each of shape ``(B,)`` float32."""

    prediction: str = "x0"

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def c_noise(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def start_scale(self, sigma: float) -> float:
        """The factor that turns unit noise into the process's pure-noise start at level ``sigma``:
        ``sigma`` in the variance-exploding frame (EDM, flow)."""
        return float(sigma)


class _VPTimestep(Parameterization):
    """Shared by discrete-time VP models: input scaled to unit variance, ``c_noise`` = timestep."""

    def __init__(self, schedule: VPSchedule | None = None) -> None:
        self.schedule = schedule or VPSchedule()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return self.schedule.sigma_to_t(sigma)

    @staticmethod
    def _c_in(sigma: Tensor) -> Tensor:
        return (sigma**2 + 1).rsqrt()

    def start_scale(self, sigma: float) -> float:
        """A VP process starts from unit noise *in the VP frame* (DDPM, DDIM, diffusers' pipelines with
        ``init_noise_sigma = 1``), i.e. ``noise * sqrt(1 + sigma^2)`` in the sigma frame: the prior of
        unit-variance data at that level (1.003x ``sigma`` at Stable Diffusion's first leading step)."""
        return float((float(sigma) ** 2 + 1) ** 0.5)


class EpsPrediction(_VPTimestep):
    """The network predicts the noise (DDPM): ``x0 = x - sigma * eps``."""

    prediction = "eps"

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, self._c_in(sigma)


class VPrediction(_VPTimestep):
    """The network predicts ``v = alpha * noise - sigma_vp * x0`` (Salimans & Ho 2022)."""

    prediction = "v"

    def scalings(self, sigma):
        c_in = self._c_in(sigma)
        return c_in**2, -sigma * c_in, c_in


class X0Prediction(_VPTimestep):
    """The network predicts the clean sample directly."""

    prediction = "x0"

    def scalings(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), self._c_in(sigma)


class EDMPrecond(Parameterization):
    """EDM preconditioning (Karras et al. 2022, Table 1), ``c_noise = ln(sigma) / 4``.

    Options for models trained otherwise in the same frame (diffusers' EDM schedulers):
    ``c_noise="atan"``: ``c_noise = atan(sigma) * 2 / pi``, the cosine (v-diffusion) time of the
    sigma (Stable Audio); ``negate_output``: the network predicts ``-F`` (diffusers'
    ``prediction_type=v_prediction`` for these schedulers, ``c_out`` negated); ``marginal_start``:
    sampling starts from ``noise * sqrt(sigma^2 + 1)`` (diffusers' ``init_noise_sigma``) instead of
    ``noise * sigma``.
    """

    prediction = "edm"
    C_NOISE = ("log", "atan")

    def __init__(self, sigma_data: float = 0.5, c_noise: str = "log", negate_output: bool = False,
                 marginal_start: bool = False) -> None:
        if c_noise not in self.C_NOISE:
            raise ValueError(f"diffusion.parameterization.c_noise={c_noise!r} is not one of {', '.join(self.C_NOISE)}")
        self.sigma_data, self.noise_map = sigma_data, c_noise
        self.sign = -1.0 if negate_output else 1.0
        self.marginal_start = bool(marginal_start)

    def start_scale(self, sigma: float) -> float:
        return math.sqrt(sigma * sigma + 1.0) if self.marginal_start else float(sigma)

    def scalings(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = self.sign * sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = (sigma**2 + sd2).rsqrt()
        return c_skip, c_out, c_in

    def c_noise(self, sigma):
        if self.noise_map == "atan":
            return sigma.atan() * (2 / math.pi)
        return sigma.clamp_min(1e-20).log() / 4


class FlowVelocity(Parameterization):
    """Flow matching: ``x_t = (1 - t) x0 + t noise`` and the network predicts ``v = noise - x0``.

    In the sigma frame ``x_t = x / (1 + sigma)`` and ``x0 = x_t - t v``. ``c_noise = t * time_scale``
    (1000 keeps diffusers' sinusoidal timestep embeddings in their trained range).

    ``unit_start``: sampling starts from ``x_t = noise`` at the grid's first time ``t`` (diffusers'
    flow pipelines: Wan, SD3, Flux), i.e. ``noise * (1 + sigma)`` in the sigma frame, instead of
    ``x_t = t * noise`` (``noise * sigma``, the VE start, closer to the true marginal of data with
    less than unit variance); the two differ by a factor ``1 / t``, 1.0003 at ``t = 0.9997``.
    """

    prediction = "flow"

    def __init__(self, time_scale: float = 1000.0, unit_start: bool = False) -> None:
        self.time_scale = time_scale
        self.unit_start = bool(unit_start)

    def start_scale(self, sigma: float) -> float:
        return float(sigma) + 1.0 if self.unit_start else float(sigma)

    def scalings(self, sigma):
        c_in = 1 / (1 + sigma)
        return c_in, -sigma * c_in, c_in

    def c_noise(self, sigma):
        return flow_t(sigma) * self.time_scale


class Denoiser(nn.Module):
    """A backbone behind the denoiser contract ``D(x, sigma, cond) -> x0_hat``.

    Args:
        backbone: module with ``forward(x, c_noise, cond) -> Tensor`` (same shape as ``x``).
        parameterization: one of the classes above.
        loss_weighting: ``"none"`` (plain MSE on the network output, the usual choice for each
            prediction type) or ``"min_snr"`` (Hang et al. 2023: x0-space weight ``min(SNR, gamma)``).
        min_snr_gamma: ``gamma`` for ``min_snr``.
        noise_prior: ``None`` (isotropic Gaussian noise) or a prior such as
            :class:`~multidiff.core.noise.SharedNoise` (noise correlated across frames) that
            training draws its noise from and sampling its initial and injected noise.
    """

    def __init__(
        self,
        backbone: nn.Module,
        parameterization: Parameterization,
        *,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        noise_prior=None,
    ) -> None:
        super().__init__()
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; choose none or min_snr")
        self.backbone = backbone
        self.parameterization = parameterization
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.noise_prior = noise_prior

    def _network(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> tuple[Tensor, ...]:
        sigma = sigma.float()
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.parameterization.scalings(sigma))
        c_noise = self.parameterization.c_noise(sigma)
        x_in = (x.float() * c_in).to(x.dtype)
        extra = getattr(self.backbone, "concat_channels", 0)
        if extra:  # a mask-conditioned backbone: the known input and its mask as extra channels (zeros: none)
            concat = None if cond is None else cond.concat
            if concat is None:
                concat = x_in.new_zeros((x.shape[0], extra, *x.shape[2:]))
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        out = self.backbone(x_in, c_noise, cond)
        return out.float(), c_skip, c_out

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        """x: ``(B, C, *dims)``; sigma: ``(B,)``. Returns x0_hat, float32, same shape as ``x``."""
        out, c_skip, c_out = self._network(x, sigma, cond)
        return torch.addcmul(c_skip * x.float(), c_out, out)  # c_skip x + c_out F

    def loss(self, x0: Tensor, sigma: Tensor, noise: Tensor, cond: Cond | None = None) -> Tensor:
        """Per-sample training loss, shape ``(B,)``, float32 (reduced in float32 under autocast)."""
        sigma = sigma.float()
        x = x0.float() + append_dims(sigma, x0.ndim) * noise.float()
        out, c_skip, c_out = self._network(x.to(x0.dtype), sigma, cond)
        target = (x0.float() - c_skip * x) / c_out
        per_sample = (out - target).pow(2).flatten(1).mean(1)
        if self.loss_weighting == "min_snr":
            snr = sigma.pow(-2)
            per_sample = per_sample * snr.clamp(max=self.min_snr_gamma) * c_out.flatten() ** 2
        return per_sample


# --- prediction conversions in the sigma frame ---------------------------------------------------

PREDICTIONS = ("eps", "v", "x0", "flow")


def to_x0(pred: Tensor, kind: str, x: Tensor, sigma: Tensor) -> Tensor:
    """Convert a prediction of ``kind`` (eps, v, x0, flow) at ``(x, sigma)`` into x0."""
    s = append_dims(sigma.to(pred.dtype), x.ndim)
    if kind == "eps":
        return x - s * pred
    if kind == "v":
        return (x - s * (1 + s**2).sqrt() * pred) / (1 + s**2)
    if kind == "x0":
        return pred
    if kind == "flow":
        return (x - s * pred) / (1 + s)
    raise ValueError(f"unknown prediction {kind!r}; choose one of {', '.join(PREDICTIONS)}")


def from_x0(x0: Tensor, kind: str, x: Tensor, sigma: Tensor) -> Tensor:
    """Express x0 at ``(x, sigma)`` as a prediction of ``kind``; inverse of :func:`to_x0`."""
    s = append_dims(sigma.to(x0.dtype), x.ndim)
    if kind == "eps":
        return (x - x0) / s
    if kind == "v":
        return (x - x0 * (1 + s**2)) / (s * (1 + s**2).sqrt())
    if kind == "x0":
        return x0
    if kind == "flow":
        return (x - (1 + s) * x0) / s
    raise ValueError(f"unknown prediction {kind!r}; choose one of {', '.join(PREDICTIONS)}")


def convert_prediction(pred: Tensor, src: str, dst: str, x: Tensor, sigma: Tensor) -> Tensor:
    """Convert between prediction types, e.g. ``convert_prediction(eps, "eps", "v", x, sigma)``."""
    return from_x0(to_x0(pred, src, x, sigma), dst, x, sigma)


def snr(sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio ``1 / sigma^2`` in the sigma frame."""
    return sigma.pow(-2)


