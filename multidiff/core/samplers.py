"""Stateless samplers in the sigma frame.

All samplers share one signature::

    sample_xxx(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, **options) -> Tensor

- ``denoiser(x, sigma, cond) -> x0_hat`` with ``sigma`` of shape ``(B,)`` (the one contract);
- ``x``: the starting sample ``(B, C, *dims)`` of any rank, already at noise level ``sigmas[0]``
  (for pure noise: ``noise * sigmas[0]``);
- ``sigmas``: a decreasing grid of ``steps + 1`` noise levels, normally ending with 0;
- ``generator``: ``None``, a ``torch.Generator`` or a :class:`~multidiff.core.noise.PerSampleGenerator`
  for the noise of stochastic samplers;
- ``callback``: called after every step with a dict ``{"i", "x", "sigma", "sigma_next", "denoised"}``.

No state survives a call, nothing assumes a tensor rank (scalars broadcast as ``(B,)`` tensors)
and the grid is read to host floats once, so the loop itself makes no device-to-host syncs.
Where a solver has a well-known reference (k-diffusion, diffusers) the update is written in the
same terms and tested for parity against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from multidiff.core.cond import Cond
from multidiff.core.noise import randn_like

Callback = Callable[[dict], None] | None


def read_grid(sigmas: Tensor) -> list[float]:
    """The grid as host floats, once; a ValueError unless it is 1-D, finite, >= 0 and strictly decreasing."""
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    grid = [float(s) for s in sigmas.tolist()]
    # every solver divides by sigma or by a step's log-sigma difference: a repeated or rising level
    # (or a negative one) would end in a division by zero or silently wrong samples
    bad = next((i for i in range(len(grid) - 1) if not grid[i] > grid[i + 1]), None)
    if bad is not None or grid[-1] < 0 or not all(math.isfinite(s) for s in grid):
        where = f" (levels {bad} and {bad + 1} are {grid[bad]:.6g} and {grid[bad + 1]:.6g})" if bad is not None else ""
        raise ValueError(f"the sampling grid (sigmas) must be finite, >= 0 and strictly decreasing{where}")
    return grid


def _call(denoiser, x: Tensor, sigma: float, cond: Cond | None) -> Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma, dtype=torch.float32), cond)


def _report(callback: Callback, i: int, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def ve_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion's ancestral split of a step: ``(sigma_down, sigma_up)`` with
    ``sigma_down^2 + sigma_up^2 = sigma_next^2``."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def vp_ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """DDIM's noise split (Song et al. 2021, eq. 16) translated to the sigma frame.

    With ``a = 1 / (1 + sigma^2)``: ``std = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')``; the step
    lands at ``x0 + sigma_down eps + sigma_up z`` with ``sigma_up = std / sqrt(a')``.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    std = eta * math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(max(1 - a / a_next, 0.0))
    up = std / math.sqrt(a_next)
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, cond=None, generator=None, callback=None) -> Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D) / sigma`` (EDM Alg. 1, first order)."""
    grid = read_grid(sigmas)
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = _call(denoiser, x, s, cond)
        x = denoised + (s_next / s) * (x - denoised)
        _report(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0) -> Tensor:
    """Euler step to ``sigma_down`` then fresh noise of std ``sigma_up`` (k-diffusion's ancestral sampler)."""
    grid = read_grid(sigmas)
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = _call(denoiser, x, s, cond)
        down, up = ve_ancestral_step(s, s_next, eta)
        x = denoised + (down / s) * (x - denoised)
        if up > 0:
            x = x + randn_like(x, generator) * up
        _report(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, cond=None, generator=None, callback=None) -> Tensor:
    """Heun's second-order method (EDM Algorithm 1, deterministic); Euler on the final step to 0."""
    grid = read_grid(sigmas)
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = _call(denoiser, x, s, cond)
        d = (x - denoised) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - _call(denoiser, x_euler, s_next, cond)) / s_next
            x = x + (d + d_next) / 2 * (s_next - s)
        _report(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=0.0) -> Tensor:
    """DDIM (Song et al. 2021). ``eta=0`` is deterministic (and equals Euler in this frame);
    ``eta=1`` is DDPM's ancestral posterior sampling on the same grid."""
    grid = read_grid(sigmas)
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = _call(denoiser, x, s, cond)
        down, up = vp_ancestral_step(s, s_next, eta)
        x = denoised + (down / s) * (x - denoised)
        if up > 0:
            x = x + randn_like(x, generator) * up
        _report(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, cond=None, generator=None, callback=None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) on any grid: the posterior ``q(x_s' | x_s, x0_hat)``."""
    return sample_ddim(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=1.0)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, cond=None, generator=None, callback=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in ``lambda = -log sigma``; first order on the
    first step and on the final step to sigma 0 (as diffusers' ``lower_order_final``)."""
    grid = read_grid(sigmas)
    old_denoised, h_last = None, None
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = _call(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(s_next)
            if old_denoised is None:
                mix = denoised
            else:
                r = h_last / h
                mix = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s_next / s) * x - math.expm1(-h) * mix
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0, solver_type="midpoint"
) -> Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``, Gaussian noise per step)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    grid = read_grid(sigmas)
    old_denoised, h_last = None, None
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = _call(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(s_next)
            eta_h = eta * h
            x = (s_next / s) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                coeff = -math.expm1(-h - eta_h)
                if solver_type == "heun":
                    coeff = coeff / (-h - eta_h) + 1
                    x = x + coeff * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * coeff * (1 / r) * (denoised - old_denoised)
            if eta > 0:
                x = x + randn_like(x, generator) * s_next * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``); ``eta=0`` is the deterministic 3M."""
    grid = read_grid(sigmas)
    d1_, d2_, h1, h2 = None, None, None, None  # previous two denoised and step sizes
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = _call(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(s_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                d1_0 = (denoised - d1_) / r0
                d1_1 = (d1_ - d2_) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h1 is not None:
                x = x + phi_2 * (denoised - d1_) / (h1 / h)
            if eta > 0:
                x = x + randn_like(x, generator) * s_next * math.sqrt(-math.expm1(-2 * h * eta))
            h1, h2 = h, h1
            d1_, d2_ = denoised, d1_
        _report(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m(denoiser, x, sigmas, *, cond=None, generator=None, callback=None) -> Tensor:
    """Deterministic DPM-Solver++(3M): :func:`sample_dpmpp_3m_sde` with ``eta=0``."""
    return sample_dpmpp_3m_sde(denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=0.0)


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, order: int = 2,
                 variant: str = "bh2") -> Tensor:
    """UniPC (Zhao et al. 2023): the multistep predictor UniP and the corrector UniC, which corrects
    each predicted sample with the model evaluation the next step makes anyway (no extra calls).

    Data prediction in ``lambda = -log sigma`` (scale-free, so the same steps serve VP, VE and flow
    models), ``order`` 1..3 with a warm-up of lower orders and lower orders on the final steps, and
    ``variant`` ``bh2`` (``B(h) = e^h - 1``, the paper's choice for guided sampling) or ``bh1``
    (``B(h) = h``): diffusers' ``UniPCMultistepScheduler`` with ``predict_x0``, ``lower_order_final``
    and ``final_sigmas_type="zero"``, written in the sigma frame. The step to sigma 0 returns the
    model's estimate.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    grid = read_grid(sigmas)
    steps = len(grid) - 1
    lambdas: list[float] = []  # -log sigma of the earlier evaluations, newest last
    outputs: list[Tensor] = []  # their denoised estimates
    last_x, last_order = x, 1
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        denoised = _call(denoiser, x, s, cond)
        if outputs:  # UniC on the sample the last step predicted, with this evaluation
            x = _unipc_update(last_x, lambdas, outputs, grid[i - 1], s, last_order, variant, model_t=denoised)
        lambdas, outputs = (lambdas + [-math.log(s)])[-order:], (outputs + [denoised])[-order:]
        this_order = min(order, steps - i, i + 1)  # warm-up, and lower orders on the final steps
        last_x, last_order = x, this_order
        x = denoised if s_next == 0 else _unipc_update(x, lambdas, outputs, s, s_next, this_order, variant)
        _report(callback, i, x, s, s_next, denoised)
    return x


def _unipc_update(x: Tensor, lambdas: list[float], outputs: list[Tensor], sigma_s0: float, sigma_t: float,
                  order: int, variant: str, model_t: Tensor | None = None) -> Tensor:
    """One UniPC update of ``x`` from ``sigma_s0`` (the newest of ``lambdas``/``outputs``) to ``sigma_t``:
    the predictor UniP-``order``, or with ``model_t`` (the estimate at ``sigma_t``) the corrector UniC.
    Eqs. of the paper's Algorithms 1-2 in data prediction, as ``multistep_uni_{p,c}_bh_update`` of diffusers."""
    lam_s0, m0 = lambdas[-1], outputs[-1]
    h = -math.log(sigma_t) - lam_s0
    rks = [(lambdas[-(k + 1)] - lam_s0) / h for k in range(1, order)]
    d1s = [(outputs[-(k + 1)] - m0) / rk for k, rk in enumerate(rks, start=1)]
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * m0
    if model_t is None:
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
        return x_t - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else _solve(rows, b)
    correction = rhos[-1] * (model_t - m0)
    for r, d in zip(rhos[:-1], d1s):
        correction = correction + r * d
    return x_t - b_h * correction


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """``a^-1 b`` for UniPC's small systems, in float64 on the host."""
    return torch.linalg.solve(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def _flow_velocity(x_t: Tensor, denoised: Tensor, t: float) -> Tensor:
    return (x_t - denoised) / t  # v = noise - x0, from x_t = (1 - t) x0 + t noise


@torch.no_grad()
def sample_flow_euler(denoiser, x, sigmas, *, cond=None, generator=None, callback=None) -> Tensor:
    """Euler on the flow ODE ``dx_t/dt = v`` in flow coordinates ``x_t = x / (1 + sigma)``."""
    grid = read_grid(sigmas)
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        t, t_next = s / (1 + s), s_next / (1 + s_next)
        denoised = _call(denoiser, x, s, cond)
        x_t = x / (1 + s)
        x_t = x_t + (t_next - t) * _flow_velocity(x_t, denoised, t)
        x = x_t * (1 + s_next)
        _report(callback, i, x, s, s_next, denoised)
    return x


@torch.no_grad()
def sample_flow_heun(denoiser, x, sigmas, *, cond=None, generator=None, callback=None) -> Tensor:
    """Heun (trapezoidal) on the flow ODE in flow coordinates; Euler on the final step to t=0."""
    grid = read_grid(sigmas)
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        t, t_next = s / (1 + s), s_next / (1 + s_next)
        denoised = _call(denoiser, x, s, cond)
        x_t = x / (1 + s)
        v = _flow_velocity(x_t, denoised, t)
        x_pred = x_t + (t_next - t) * v
        if s_next > 0:
            v_next = _flow_velocity(x_pred, _call(denoiser, x_pred * (1 + s_next), s_next, cond), t_next)
            x_pred = x_t + (t_next - t) * (v + v_next) / 2
        x = x_pred * (1 + s_next)
        _report(callback, i, x, s, s_next, denoised)
    return x


SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "flow_euler": sample_flow_euler,
    "flow_heun": sample_flow_heun,
    "unipc": sample_unipc,
}
"""Name -> sampler, for listing and for tests that run every sampler. Configs use ``_target_``."""

