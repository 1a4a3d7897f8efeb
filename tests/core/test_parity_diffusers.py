"""Parity of multidiff's sigma-frame samplers with diffusers' schedulers (diffusers 0.42).

One toy epsilon model ``eps_model(x_vp, t)`` (the exact noise prediction of a Gaussian data set plus
a smooth nonlinear term, so that the test is not limited to affine denoisers) drives both sides:

- diffusers: the usual ``scheduler.step`` loop in the VP frame, integer (or float) timesteps;
- multidiff: the same model behind :class:`multidiff.core.denoiser.Denoiser` with
  :class:`EpsPrediction`, i.e. ``x0 = x - sigma * eps(c_in * x, sigma_to_t(sigma))`` where
  ``c_in * x = x / sqrt(1 + sigma^2)`` is exactly the VP sample.

Both runs start from the same initial noise and the final outputs (sigma 0, where the VP and the
sigma frames coincide) must agree to 1e-4 (4e-4 for grids that start at sigma ~ 2e4, see
``ATOL_HUGE_SIGMA``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402

from multidiff.core.denoiser import Denoiser, EpsPrediction  # noqa: E402
from multidiff.core.samplers import (  # noqa: E402
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_unipc,
)
from multidiff.core.schedules import VPSchedule, karras_sigmas  # noqa: E402

# diffusers' own deprecation chatter (numpy 2 ``copy=`` and friends), not ours
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

MU, SD = 0.7, 0.3
ATOL = 1e-4
# diffusers computes ``1 - alphas_cumprod`` in float32: one ulp of ``a ~ 1`` (6e-8) moves
# ``sigma = sqrt((1 - a) / a)`` by ~3e-8 / sigma, i.e. up to ~5e-6 at the smallest sigmas (~0.006).
F32_ATOL = 5e-6
# The cosine ("squaredcos_cap_v2") table ends at alpha_bar ~ 2.4e-9, sigma ~ 2.0e4. A grid that
# starts there (t = 999) costs both float32 implementations ~1e-4 of round-off on the final sample
# (measured against a float64 run of the same solver: multidiff 1.0e-4, diffusers 1.6e-4; at sigma
# 2e4 one float32 ulp of x is 2e-3). Those runs are held to 4e-4; `test_huge_sigma_gap_is_roundoff`
# pins the cause, and the cosine schedule is also checked at 1e-4 on grids starting at t=950.
ATOL_HUGE_SIGMA = 4e-4


SHAPE = (2, 3, 8, 8)


def _atol(sigmas: torch.Tensor) -> float:
    return ATOL if float(sigmas[0]) < 1e3 else ATOL_HUGE_SIGMA


# (multidiff beta schedule, diffusers beta schedule, beta_start, beta_end)
BETAS = {
    "linear": ("linear", "linear", 1e-4, 2e-2),
    "scaled_linear": ("scaled_linear", "scaled_linear", 0.00085, 0.012),  # Stable Diffusion's
    "cosine": ("cosine", "squaredcos_cap_v2", 1e-4, 2e-2),
}


def _common(kind: str) -> dict:
    _, d_kind, b0, b1 = BETAS[kind]
    return dict(num_train_timesteps=1000, beta_schedule=d_kind, beta_start=b0, beta_end=b1)


def _vp(kind: str, spacing: str) -> VPSchedule:
    m_kind, _, b0, b1 = BETAS[kind]
    return VPSchedule(m_kind, 1000, beta_start=b0, beta_end=b1, spacing=spacing)


class EpsModel:
    """Deterministic smooth eps model of the VP sample and a (float) timestep.

    The exact eps of ``x0 ~ N(MU, SD^2)`` at cumulative alpha ``a``:
    ``x0_hat = MU + sqrt(a) SD^2 / (a SD^2 + 1 - a) (x_vp - sqrt(a) MU)``,
    ``eps = (x_vp - sqrt(a) x0_hat) / sqrt(1 - a)``, plus ``0.05 sqrt(a (1 - a)) sin(2 x_vp)`` (which
    moves x0_hat by at most ``0.05 sqrt(1 - a)``, so that the model stays sane at large sigma).
    ``a`` is read from the scheduler's ``alphas_cumprod`` (linear in t between integers).
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.abar = alphas_cumprod.double()
        self.calls = 0

    def alpha_bar(self, t) -> torch.Tensor:
        t = torch.as_tensor(t).double().clamp(0, len(self.abar) - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - lo
        return (1 - w) * self.abar[lo] + w * self.abar[hi]

    def __call__(self, x_vp: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        a = self.alpha_bar(t)
        if a.ndim == 1:  # per-sample timesteps from multidiff, shape (B,)
            a = a.reshape(-1, *([1] * (x_vp.ndim - 1)))
        x = x_vp.double()
        x0 = MU + a.sqrt() * SD**2 / (a * SD**2 + 1 - a) * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return (eps + 0.05 * (a * (1 - a)).sqrt() * torch.sin(2 * x)).float()


class EpsBackbone(nn.Module):
    """Backbone contract ``forward(x_in, c_noise, cond)``; with EpsPrediction ``x_in`` is the VP sample."""

    def __init__(self, eps_model: EpsModel) -> None:
        super().__init__()
        self.eps_model = eps_model
        self.c_noise_seen: list[torch.Tensor] = []

    def forward(self, x_in, c_noise, cond=None):
        assert c_noise.shape == (x_in.shape[0],) and c_noise.dtype == torch.float32
        self.c_noise_seen.append(c_noise)
        return self.eps_model(x_in, c_noise)


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _denoiser(eps_model: EpsModel, vp: VPSchedule) -> Denoiser:
    return Denoiser(EpsBackbone(eps_model), EpsPrediction(vp))


def _diffusers_loop(sched, eps_model: EpsModel, x: torch.Tensor, *, scale_input: bool = False, **step_kw):
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t) if scale_input else x
        x = sched.step(eps_model(x_in, t), t, x, **step_kw).prev_sample
    return x


def _grid_from_timesteps(sched) -> torch.Tensor:
    """Sigma grid of a VP scheduler: sqrt((1 - a) / a) at its timesteps, then 0."""
    a = sched.alphas_cumprod.double()[sched.timesteps.long()]
    return torch.cat([((1 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()


# --- the schedule itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BETAS))
def test_vp_schedule_matches_diffusers_betas(kind):
    sched = DDIMScheduler(**_common(kind))
    vp = _vp(kind, "trailing")
    # diffusers builds betas and their cumprod in float32; multidiff in float64.
    torch.testing.assert_close(vp.alphas_cumprod, sched.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)
    a = sched.alphas_cumprod.double()
    torch.testing.assert_close(vp.sigmas_table.double(), ((1 - a) / a).sqrt(), rtol=2e-5, atol=F32_ATOL)


# --- DDIM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("kind", list(BETAS))
def test_ddim_parity(kind, spacing):
    steps = 20
    sched = DDIMScheduler(**_common(kind), timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(steps)
    vp = _vp(kind, spacing)

    # DDIM steps t -> t - T // steps and, below 0, to final_alpha_cumprod = 1 (sigma 0 with
    # set_alpha_to_one): exactly multidiff's grid of the same timesteps followed by 0.
    ts = sched.timesteps
    assert torch.equal(ts[1:], ts[:-1] - 1000 // steps) and ts[-1] - 1000 // steps < 0
    assert float(sched.final_alpha_cumprod) == 1.0
    assert torch.equal(vp.timesteps(steps), ts)
    sigmas = vp.sigmas(steps)
    torch.testing.assert_close(sigmas, _grid_from_timesteps(sched), rtol=2e-5, atol=F32_ATOL)

    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()
    ref = _diffusers_loop(sched, eps_model, noise.clone(), eta=0.0)
    den = _denoiser(eps_model, vp)
    out = sample_ddim(den, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    assert (out - ref).abs().max().item() < _atol(sigmas)
    # the denoiser saw the integer timesteps diffusers used
    c_noise = torch.stack([c[0] for c in den.backbone.c_noise_seen])
    torch.testing.assert_close(c_noise, ts.float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_eta1_parity_with_shared_noise(kind):
    """The stochastic path (DDIM eta=1 == DDPM posterior) with the same noise on both sides."""
    steps = 20
    sched = DDIMScheduler(**_common(kind), timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(steps)
    vp = _vp(kind, "trailing")
    sigmas = vp.sigmas(steps)
    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()

    g = torch.Generator().manual_seed(123)
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        # multidiff draws one noise tensor per step that adds noise, i.e. all but the last (to 0)
        z = torch.randn(SHAPE, generator=g) if i < steps - 1 else torch.zeros(SHAPE)
        x = sched.step(eps_model(x, t), t, x, eta=1.0, variance_noise=z).prev_sample
    ref = x

    out = sample_ddim(
        _denoiser(eps_model, vp),
        noise * math.sqrt(1 + float(sigmas[0]) ** 2),
        sigmas,
        eta=1.0,
        generator=torch.Generator().manual_seed(123),
    )
    assert (out - ref).abs().max().item() < ATOL
    # and the noise matters: another seed gives another sample
    other = sample_ddim(
        _denoiser(eps_model, vp),
        noise * math.sqrt(1 + float(sigmas[0]) ** 2),
        sigmas,
        eta=1.0,
        generator=torch.Generator().manual_seed(7),
    )
    assert (other - ref).abs().max().item() > 1e-2


# --- Euler ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("kind", list(BETAS))
def test_euler_parity(kind, spacing):
    steps = 20
    sched = EulerDiscreteScheduler(**_common(kind), timestep_spacing=spacing)
    sched.set_timesteps(steps)
    vp = _vp(kind, spacing)
    sigmas = vp.sigmas(steps)
    # integer timesteps for these spacings: diffusers' interpolated sigmas are the table's
    torch.testing.assert_close(sched.sigmas, sigmas, rtol=2e-5, atol=F32_ATOL)
    assert torch.equal(sched.timesteps.long(), vp.timesteps(steps))

    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()
    x_init = noise * sched.init_noise_sigma  # diffusers' Euler samples in the sigma frame already
    ref = _diffusers_loop(sched, eps_model, x_init.clone(), scale_input=True)
    out = sample_euler(_denoiser(eps_model, vp), x_init.clone(), sched.sigmas)
    assert (out - ref).abs().max().item() < _atol(sigmas)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_euler_karras_parity(kind):
    """Karras sigmas: non-integer timesteps, mapped by log-sigma interpolation on both sides."""
    steps = 20
    sched = EulerDiscreteScheduler(**_common(kind), use_karras_sigmas=True)
    sched.set_timesteps(steps)
    vp = _vp(kind, "karras")
    torch.testing.assert_close(sched.sigmas, vp.sigmas(steps), rtol=1e-4, atol=0)
    torch.testing.assert_close(vp.sigma_to_t(sched.sigmas[:-1]), sched.timesteps, atol=2e-3, rtol=0)

    eps_model = EpsModel(sched.alphas_cumprod)
    x_init = _noise() * sched.init_noise_sigma
    ref = _diffusers_loop(sched, eps_model, x_init.clone(), scale_input=True)
    out = sample_euler(_denoiser(eps_model, vp), x_init.clone(), sched.sigmas)
    assert (out - ref).abs().max().item() < ATOL


# --- DPM-Solver++(2M) -------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("kind", list(BETAS))
def test_dpmpp_2m_parity(kind, spacing, steps):
    sched = DPMSolverMultistepScheduler(
        **_common(kind),
        timestep_spacing=spacing,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    sched.set_timesteps(steps)
    vp = _vp(kind, spacing)
    assert torch.equal(vp.timesteps(steps), sched.timesteps)
    sigmas = vp.sigmas(steps)
    # final_sigmas_type="zero": the grid ends in 0 and the step to it is first order (x = x0_hat)
    assert float(sched.sigmas[-1]) == 0.0
    torch.testing.assert_close(sched.sigmas, sigmas, rtol=2e-5, atol=F32_ATOL)
    torch.testing.assert_close(_grid_from_timesteps(sched), sigmas, rtol=2e-5, atol=F32_ATOL)

    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()
    ref = _diffusers_loop(sched, eps_model, noise.clone())
    out = sample_dpmpp_2m(_denoiser(eps_model, vp), noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    assert (out - ref).abs().max().item() < _atol(sigmas)


@pytest.mark.parametrize("steps", [20, 50])
def test_dpmpp_2m_parity_cosine_from_t950(steps):
    """Cosine betas at 1e-4: diffusers' DPM-Solver on custom timesteps (DDIM's leading ones, from t=950).

    DPM-Solver's own ``leading`` is ``arange(steps + 1) * (T // (steps + 1))`` without its last value,
    which differs from DDIM's/Euler's ``leading`` (``arange(steps) * (T // steps)``); multidiff's
    ``leading`` is the latter.
    """
    vp = _vp("cosine", "leading")
    sched = DPMSolverMultistepScheduler(
        **_common("cosine"), algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )
    sched.set_timesteps(timesteps=vp.timesteps(steps).tolist())
    sigmas = vp.sigmas(steps)
    assert float(sigmas[0]) < 1e3
    torch.testing.assert_close(sched.sigmas, sigmas, rtol=2e-5, atol=F32_ATOL)
    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()
    ref = _diffusers_loop(sched, eps_model, noise.clone())
    out = sample_dpmpp_2m(_denoiser(eps_model, vp), noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    assert (out - ref).abs().max().item() < ATOL


def test_huge_sigma_gap_is_roundoff():
    """At sigma ~ 2e4 (cosine, t=999) multidiff's float32 run is within ~1e-4 of a float64 run of the
    very same solver: the larger tolerance there is float32 round-off, not a different algorithm."""
    steps = 20
    vp = _vp("cosine", "linspace")
    sched = DPMSolverMultistepScheduler(
        **_common("cosine"), algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )
    sigmas = vp.sigmas(steps)
    assert float(sigmas[0]) > 1e4
    eps_model = EpsModel(sched.alphas_cumprod)

    def denoiser64(x, sigma, cond=None):  # the same model and wrapper, in float64 throughout
        s = sigma.double().reshape(-1, 1, 1, 1)
        x_vp = x / (1 + s**2).sqrt()
        a = eps_model.alpha_bar(vp.sigma_to_t(sigma)).reshape(-1, 1, 1, 1)
        x0 = MU + a.sqrt() * SD**2 / (a * SD**2 + 1 - a) * (x_vp - a.sqrt() * MU)
        eps = (x_vp - a.sqrt() * x0) / (1 - a).sqrt() + 0.05 * (a * (1 - a)).sqrt() * torch.sin(2 * x_vp)
        return x - s * eps

    noise = _noise()
    scale = math.sqrt(1 + float(sigmas[0]) ** 2)
    out32 = sample_dpmpp_2m(_denoiser(eps_model, vp), noise * scale, sigmas)
    out64 = sample_dpmpp_2m(denoiser64, noise.double() * scale, sigmas)
    gap = (out32.double() - out64).abs().max().item()
    assert 1e-6 < gap < 2e-4


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_dpmpp_2m_sde_parity_with_shared_noise(kind, solver_type):
    """DPM-Solver++(2M) SDE (eta=1) against diffusers' ``sde-dpmsolver++``, the same noise on both sides."""
    steps = 20
    sched = DPMSolverMultistepScheduler(
        **_common(kind),
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        solver_type=solver_type,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(steps)
    vp = _vp(kind, "linspace")
    sigmas = vp.sigmas(steps)
    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()

    g = torch.Generator().manual_seed(5)
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        # multidiff draws noise on every step but the last (to sigma 0, where it is x0_hat)
        z = torch.randn(SHAPE, generator=g) if i < steps - 1 else torch.zeros(SHAPE)
        x = sched.step(eps_model(x, t), t, x, variance_noise=z).prev_sample
    out = sample_dpmpp_2m_sde(
        _denoiser(eps_model, vp),
        noise * math.sqrt(1 + float(sigmas[0]) ** 2),
        sigmas,
        eta=1.0,
        solver_type=solver_type,
        generator=torch.Generator().manual_seed(5),
    )
    assert (out - x).abs().max().item() < ATOL


# --- UniPC -------------------------------------------------------------------------------------------


def _unipc(kind: str, spacing: str, steps: int, final: str = "zero", **kw) -> UniPCMultistepScheduler:
    sched = UniPCMultistepScheduler(**_common(kind), timestep_spacing=spacing, predict_x0=True,
                                    lower_order_final=True, final_sigmas_type=final, **kw)
    sched.set_timesteps(steps)
    return sched


# bh1 on the cosine grid from t=999 (sigma 2e4) is left out: there B(h) = h of the first step (~8)
# multiplies float32 round-off, and both implementations land 5e-4 (multidiff) and 9e-4 (diffusers)
# from a float64 run of the same solver, past ATOL_HUGE_SIGMA; bh2 there is within it.
UNIPC_CASES = [(kind, spacing, variant) for kind, spacing in [("scaled_linear", "linspace"), ("linear", "trailing"),
                                                              ("cosine", "trailing")]
               for variant in ("bh1", "bh2") if not (kind == "cosine" and variant == "bh1")]


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(("kind", "spacing", "variant"), UNIPC_CASES)
def test_unipc_parity(kind, spacing, variant, order, steps):
    """UniPC (predictor UniP + corrector UniC, data prediction) against diffusers' UniPCMultistepScheduler.

    bh2 runs to sigma 0. diffusers' bh1 turns the step to sigma 0 into NaN (``B(h) = h`` is infinite
    there and multiplies a zero correction), so bh1 is compared on the grid ending at the schedule's
    smallest sigma (``final_sigmas_type="sigma_min"``), where both return the sample at that level."""
    final = "zero" if variant == "bh2" else "sigma_min"
    sched = _unipc(kind, spacing, steps, final, solver_order=order, solver_type=variant)
    vp = _vp(kind, spacing)
    assert torch.equal(vp.timesteps(steps), sched.timesteps)
    sigmas = vp.sigmas(steps)
    torch.testing.assert_close(sched.sigmas[:-1], sigmas[:-1], rtol=2e-5, atol=F32_ATOL)
    if final == "sigma_min":
        sigmas = torch.cat([sigmas[:-1], sched.sigmas[-1:]])
        assert 0 < float(sigmas[-1]) < float(sigmas[-2])
    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()
    ref = _diffusers_loop(sched, eps_model, noise.clone())
    out = sample_unipc(_denoiser(eps_model, vp), noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, order=order,
                       variant=variant)
    if final == "sigma_min":  # diffusers' VP sample at sigma_min -> the sigma frame
        ref = ref * math.sqrt(1 + float(sigmas[-1]) ** 2)
    assert torch.isfinite(ref).all() and (out - ref).abs().max().item() < _atol(sigmas)


def _velocity(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth flow-matching velocity ``v = noise - x0``: exact for ``x0 ~ N(MU, SD^2)`` on the path
    ``x_t = (1 - t) x0 + t noise``, plus ``0.05 t sin(2 x)`` so the test is not limited to affine models."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    xd = x.double()
    x0 = MU + (1 - t) * SD**2 / ((1 - t) ** 2 * SD**2 + t**2) * (xd - (1 - t) * MU)
    return ((xd - x0) / t + 0.05 * torch.sin(2 * xd)).float()


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_unipc_flow_parity(shift, order):
    """UniPC on a flow-matching model (Wan's sampler: ``use_flow_sigmas``, ``flow_prediction``, a shift)
    equals multidiff's UniPC in the sigma frame (``sigma = t / (1 - t)``) on the same grid."""
    steps = 20
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction",
                                    flow_shift=shift, solver_order=order, predict_x0=True, lower_order_final=True,
                                    final_sigmas_type="zero")
    sched.set_timesteps(steps)
    ts = sched.sigmas.double()  # flow times, ending in 0
    assert float(ts[-1]) == 0.0 and len(ts) == steps + 1
    noise = _noise()
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(_velocity(x, ts[i]), t, x).prev_sample

    def denoiser(x, sigma, cond=None):  # the same model in the sigma frame: x_t = x / (1 + sigma)
        t = (sigma.double() / (1 + sigma.double())).reshape(-1, *([1] * (x.ndim - 1)))
        x_t = x / (1 + t / (1 - t))
        return (x_t.double() - t * _velocity(x_t, t.flatten()).double()).float()

    sigmas = torch.cat([ts[:-1] / (1 - ts[:-1]), ts[-1:]]).float()
    out = sample_unipc(denoiser, noise * (1 + float(sigmas[0])), sigmas, order=order)
    assert (out - x).abs().max().item() < ATOL


def test_unipc_parity_is_sensitive():
    """The corrector matters at this tolerance: UniPC-2 is far from DPM-Solver++(2M) (UniP alone) on the same grid."""
    steps = 10
    sched = _unipc("scaled_linear", "linspace", steps, solver_order=2, solver_type="bh2")
    vp = _vp("scaled_linear", "linspace")
    sigmas = vp.sigmas(steps)
    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()
    ref = _diffusers_loop(sched, eps_model, noise.clone())
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    dpm = sample_dpmpp_2m(_denoiser(eps_model, vp), x, sigmas)
    assert (dpm - ref).abs().max().item() > 10 * ATOL


def test_parity_is_sensitive():
    """The 1e-4 parity is not vacuous: a first-order solver on the same grid is far from DPM-Solver++(2M)."""
    steps = 20
    sched = DPMSolverMultistepScheduler(
        **_common("linear"), algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )
    sched.set_timesteps(steps)
    vp = _vp("linear", "linspace")
    sigmas = vp.sigmas(steps)
    eps_model = EpsModel(sched.alphas_cumprod)
    noise = _noise()
    ref = _diffusers_loop(sched, eps_model, noise.clone())
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    euler = sample_euler(_denoiser(eps_model, vp), x, sigmas)
    assert (euler - ref).abs().max().item() > 100 * ATOL


def test_karras_grid_helper_matches_diffusers_karras():
    sched = EulerDiscreteScheduler(**_common("scaled_linear"), use_karras_sigmas=True)
    sched.set_timesteps(30)
    vp = _vp("scaled_linear", "karras")
    ref = karras_sigmas(30, vp.sigma_min, vp.sigma_max, 7.0)
    torch.testing.assert_close(sched.sigmas, ref, rtol=1e-4, atol=0)
