"""Samplers: any rank, exact recovery of a Gaussian data set, seeded noise, statelessness, guidance."""

from __future__ import annotations

import math

import pytest
import torch

from multidiff.core.cond import Cond
from multidiff.core.guidance import CFGDenoiser
from multidiff.core.noise import PerSampleGenerator, append_dims, randn_like
from multidiff.core.samplers import SAMPLERS, sample_ddim, sample_euler, sample_flow_euler
from multidiff.core.schedules import FlowSchedule, KarrasSchedule

MU, SD = 0.7, 0.3
STOCHASTIC = {"ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
DETERMINISTIC = sorted(set(SAMPLERS) - STOCHASTIC)


def gaussian_denoiser(x, sigma, cond=None):
    """Exact posterior mean E[x0 | x] for x0 ~ N(MU, SD^2) per element and x = x0 + sigma * n."""
    assert sigma.shape == (x.shape[0],), "the denoiser contract is sigma of shape (B,)"
    s2 = append_dims(sigma, x.ndim) ** 2
    return MU + SD**2 / (SD**2 + s2) * (x - MU)


def _generator(name: str, seed: int = 0):
    return torch.Generator().manual_seed(seed) if name in STOCHASTIC else None


def _start(noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """A sample of the noised data distribution N(MU, SD^2 + sigma_max^2) from standard noise."""
    return MU + noise * math.sqrt(sigma_max**2 + SD**2)


# --- shapes ---------------------------------------------------------------------------------------

SHAPES = {3: (2, 3, 10), 4: (2, 3, 4, 5), 5: (2, 3, 2, 3, 4)}


@pytest.mark.parametrize("rank", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_any_rank(name, rank):
    sampler = SAMPLERS[name]
    sigmas = KarrasSchedule(0.02, 20.0).sigmas(8)
    shape = SHAPES[rank]
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x = _start(noise, float(sigmas[0]))
    out = sampler(gaussian_denoiser, x, sigmas, generator=_generator(name))
    assert out.shape == shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out - MU).abs().max() < 3  # a denoised sample, not the input (|x - MU| reaches ~40)
    # the denoiser is elementwise, so the rank is only a view: the flattened run gives the same numbers
    # (for stochastic samplers too, since the noise is drawn in the same order from the same seed)
    flat = sampler(gaussian_denoiser, x.reshape(shape[0], shape[1], -1), sigmas, generator=_generator(name))
    torch.testing.assert_close(out.reshape(flat.shape), flat, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bad_grid_raises(name):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError):
        SAMPLERS[name](gaussian_denoiser, x, torch.tensor([1.0]))
    with pytest.raises(ValueError):
        SAMPLERS[name](gaussian_denoiser, x, torch.ones(2, 3))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("grid", [[2.0, 1.0, 1.0, 0.0], [2.0, 3.0, 0.0], [1.0, 0.5, -0.1], [float("nan"), 1.0, 0.0]],
                         ids=["repeated", "rising", "negative", "nan"])
def test_a_grid_that_does_not_strictly_decrease_is_refused_before_any_step(name, grid):
    # a repeated level used to end in ZeroDivisionError (log-sigma steps of length 0) after a step
    calls = []

    def denoiser(x, sigma, cond=None):
        calls.append(sigma)
        return gaussian_denoiser(x, sigma, cond)

    with pytest.raises(ValueError, match="strictly decreasing"):
        SAMPLERS[name](denoiser, torch.randn(2, 3, 4), torch.tensor(grid), generator=_generator(name))
    assert not calls


# --- closed-form Gaussian data set --------------------------------------------------------------
# Per sampler: (steps on the Karras grid, relative std tolerance). Measured relative std errors on
# KarrasSchedule(0.002, 80): first order (euler, ddim, flow_euler) -1.0% at 300 steps (-6% at 50);
# second order (heun, dpmpp_2m, flow_heun) +0.3..0.8% at 50; dpmpp_3m +0.1% and unipc (order 2,
# with its corrector) +0.23% at 50 (dpmpp_2m +0.75%; at 20 steps unipc +4.3%, dpmpp_2m +5.7%); ancestral
# (euler_ancestral, ddpm) about -2% at 300 and the SDE solvers +0.2% at 300, plus ~0.8% of
# sampling noise on 8000 samples.
CONVERGENCE = {
    "euler": (300, 0.02),
    "ddim": (300, 0.02),
    "flow_euler": (300, 0.02),
    "heun": (50, 0.015),
    "dpmpp_2m": (50, 0.015),
    "flow_heun": (50, 0.015),
    "dpmpp_3m": (50, 0.005),
    "unipc": (50, 0.005),
    "euler_ancestral": (300, 0.05),
    "ddpm": (300, 0.05),
    "dpmpp_2m_sde": (300, 0.04),
    "dpmpp_3m_sde": (300, 0.04),
}


def test_convergence_table_covers_every_sampler():
    assert set(CONVERGENCE) == set(SAMPLERS)


def _standard_noise(n: int, seed: int = 0) -> torch.Tensor:
    """Standard noise with exactly zero mean and unit std: for a deterministic sampler (an affine map
    here, the denoiser being affine) the output moments are then free of sampling error."""
    z = torch.randn(4, 1, n // 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((z - z.mean()) / z.std()).float()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_gaussian_recovery_karras(name):
    steps, std_tol = CONVERGENCE[name]
    sigmas = KarrasSchedule(0.002, 80.0).sigmas(steps)
    stochastic = name in STOCHASTIC
    noise = _standard_noise(8000 if stochastic else 2000)
    x = _start(noise, float(sigmas[0]))
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=_generator(name, 1))
    assert abs(out.mean().item() - MU) < (0.02 if stochastic else 1e-3)
    assert abs(out.std().item() / SD - 1) < std_tol
    if not stochastic:
        # the exact probability-flow map of this data set is affine: x0 = MU + SD / sqrt(SD^2 + s^2) (x - MU)
        # and the sampler's error at a sample is ~ (relative std error) * SD * |z| with |z| < ~3.6 here
        exact = MU + SD / math.sqrt(SD**2 + float(sigmas[0]) ** 2) * (x - MU)
        assert (out - exact).abs().max().item() < 4 * SD * std_tol


def test_stochastic_samplers_converge_with_steps():
    """Ancestral sampling is biased at few steps (the measured std at 30 steps is ~19% low) and the
    bias shrinks with steps: the recovery test above is a real convergence check."""
    noise = _standard_noise(8000)
    errs = []
    for steps in (30, 300):
        sigmas = KarrasSchedule(0.002, 80.0).sigmas(steps)
        out = SAMPLERS["euler_ancestral"](
            gaussian_denoiser, _start(noise, 80.0), sigmas, generator=torch.Generator().manual_seed(1)
        )
        errs.append(abs(out.std().item() / SD - 1))
    assert errs[0] > 0.1 and errs[1] < errs[0] / 4


@pytest.mark.parametrize("name,steps,std_tol", [("flow_euler", 300, 0.015), ("flow_heun", 50, 0.01)])
def test_gaussian_recovery_flow_matching(name, steps, std_tol):
    """The same exact denoiser on a flow-matching grid (uniform in t, sigma = t / (1 - t), 999 -> 0).
    Measured: flow_euler -0.64% at 300 steps, flow_heun -0.17% at 50."""
    sigmas = FlowSchedule().sigmas(steps)
    noise = _standard_noise(2000)
    x = _start(noise, float(sigmas[0]))
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas)
    assert abs(out.mean().item() - MU) < 1e-3
    assert abs(out.std().item() / SD - 1) < std_tol


def test_first_order_solvers_coincide():
    """In the sigma frame with an x0 denoiser, DDIM (eta=0), Euler and flow Euler are one update:
    ``x' = D + (sigma' / sigma) (x - D)``."""
    sigmas = KarrasSchedule(0.01, 50.0).sigmas(12)
    x = _start(torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3)), 50.0)

    def den(x, sigma, cond=None):  # nonlinear, to make the identity non-trivial
        return torch.tanh(gaussian_denoiser(x, sigma))

    euler = sample_euler(den, x, sigmas)
    torch.testing.assert_close(sample_ddim(den, x, sigmas), euler, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample_flow_euler(den, x, sigmas), euler, rtol=1e-4, atol=1e-4)


def test_ddpm_is_ddim_eta_one():
    sigmas = KarrasSchedule(0.01, 50.0).sigmas(12)
    x = _start(torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3)), 50.0)
    ddpm = SAMPLERS["ddpm"](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
    ddim = sample_ddim(gaussian_denoiser, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(4))
    half = sample_ddim(gaussian_denoiser, x, sigmas, eta=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ddpm, ddim) and not torch.allclose(ddpm, half)


def test_dpmpp_sde_at_eta_zero_is_the_ode_solver():
    sigmas = KarrasSchedule(0.01, 50.0).sigmas(12)
    x = _start(torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3)), 50.0)

    def den(x, sigma, cond=None):
        return torch.tanh(gaussian_denoiser(x, sigma))

    ode = SAMPLERS["dpmpp_2m"](den, x, sigmas)
    sde = SAMPLERS["dpmpp_2m_sde"](den, x, sigmas, eta=0.0, solver_type="midpoint")
    torch.testing.assert_close(sde, ode, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        SAMPLERS["dpmpp_2m_sde"](den, x, sigmas, solver_type="euler")


# --- seeded per-sample noise ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "ddpm", "dpmpp_3m_sde"])
def test_per_sample_seeds_are_batch_independent(name):
    sampler = SAMPLERS[name]
    sigmas = KarrasSchedule(0.02, 20.0).sigmas(10)
    x = _start(torch.randn(8, 2, 3, 5, generator=torch.Generator().manual_seed(0)), 20.0)
    batch = sampler(gaussian_denoiser, x, sigmas, generator=PerSampleGenerator(range(8)))
    for i in (0, 3, 7):
        alone = sampler(gaussian_denoiser, x[i : i + 1], sigmas, generator=PerSampleGenerator([i]))
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-6)
    # a sub-batch in another order with the same seeds gives the same rows
    sub = sampler(gaussian_denoiser, x[[5, 2]], sigmas, generator=PerSampleGenerator([5, 2]))
    torch.testing.assert_close(sub, batch[[5, 2]], rtol=0, atol=1e-6)
    # the seed matters: row 3 with another seed differs
    other = sampler(gaussian_denoiser, x[3:4], sigmas, generator=PerSampleGenerator([100]))
    assert (other - batch[3:4]).abs().max() > 1e-2


def test_randn_like_per_sample_generator_is_batch_independent():
    x = torch.empty(8, 3, 4, 4)
    gen = PerSampleGenerator(range(8))
    first, second = randn_like(x, gen), randn_like(x, gen)
    assert first.shape == x.shape
    assert not torch.equal(first, second)  # generators advance
    for i in (0, 5):
        g1 = PerSampleGenerator([i])
        assert torch.equal(randn_like(x[:1], g1), first[i : i + 1])
        assert torch.equal(randn_like(x[:1], g1), second[i : i + 1])
    # dtype follows x
    assert randn_like(x.double(), PerSampleGenerator(range(8))).dtype == torch.float64
    with pytest.raises(ValueError):
        randn_like(torch.empty(3, 2), PerSampleGenerator([0, 1]))


def test_plain_generator_noise_depends_on_batch():
    """Contrast: a single torch.Generator's noise for row 3 depends on the batch it is drawn in."""
    x = torch.empty(8, 3, 4)
    batch = randn_like(x, torch.Generator().manual_seed(0))
    alone = randn_like(x[3:4], torch.Generator().manual_seed(0))
    assert not torch.allclose(batch[3:4], alone)


# --- statelessness and the callback -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_stateless_and_callback(name):
    sampler = SAMPLERS[name]
    steps = 7
    sigmas = KarrasSchedule(0.02, 20.0).sigmas(steps)
    x = _start(torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0)), 20.0)
    x_before = x.clone()
    other = _start(torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(9)), 20.0)

    def den(x, sigma, cond=None):  # nonlinear so that multistep history matters
        return torch.tanh(gaussian_denoiser(x, sigma))

    events = []
    first = sampler(den, x, sigmas, generator=_generator(name), callback=events.append)
    sampler(den, other, sigmas[:4], generator=_generator(name, 5))  # an unrelated call in between
    second = sampler(den, x, sigmas, generator=_generator(name))
    assert torch.equal(first, second)
    assert torch.equal(x, x_before), "the input must not be modified in place"

    grid = sigmas.tolist()
    assert len(events) == steps
    for i, ev in enumerate(events):
        assert set(ev) == {"i", "x", "sigma", "sigma_next", "denoised"}
        assert ev["i"] == i
        assert ev["sigma"] == pytest.approx(grid[i]) and ev["sigma_next"] == pytest.approx(grid[i + 1])
        assert ev["x"].shape == x.shape and ev["denoised"].shape == x.shape
    assert torch.equal(events[-1]["x"], first)
    # ``denoised`` is D at the step's starting point: for the first step D(x, sigma_0)
    s0 = torch.full((2,), grid[0])
    torch.testing.assert_close(events[0]["denoised"], den(x, s0))


# --- guidance ---------------------------------------------------------------------------------------


class CondDenoiser:
    """Toy denoiser whose output depends on ``cond.tokens``; counts calls and batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond):
        self.batches.append(x.shape[0])
        shift = cond.tokens.mean(dim=(1, 2))  # (B,)
        gain = cond.tokens[:, 0, 0]
        s = append_dims(sigma, x.ndim)
        return gaussian_denoiser(x, sigma) * (1 + 0.1 * append_dims(gain, x.ndim)) + append_dims(shift, x.ndim) / (
            1 + s
        )


def _guidance_case(b=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, 5, 6, generator=g) * 3
    sigma = torch.tensor([0.5, 2.0, 5.0, 10.0])[:b]
    cond = Cond(tokens=torch.randn(b, 7, 16, generator=g))
    uncond = Cond(tokens=torch.randn(1, 7, 16, generator=g))
    return x, sigma, cond, uncond


def test_cfg_scale_one_is_conditional():
    x, sigma, cond, uncond = _guidance_case()
    inner = CondDenoiser()
    out = CFGDenoiser(inner, uncond, 1.0)(x, sigma, cond)
    assert torch.equal(out, CondDenoiser()(x, sigma, cond))
    assert inner.batches == [4]  # no unconditional pass at scale 1


def test_cfg_scale_zero_is_unconditional():
    x, sigma, cond, uncond = _guidance_case()
    inner = CondDenoiser()
    out = CFGDenoiser(inner, uncond, 0.0)(x, sigma, cond)
    ref = CondDenoiser()(x, sigma, Cond(tokens=uncond.tokens.expand(4, -1, -1)))
    torch.testing.assert_close(out, ref)
    assert inner.batches == [8]  # one batched call of size 2B


@pytest.mark.parametrize("per_sample_uncond", [False, True])
def test_cfg_scale_three_is_linear_combination(per_sample_uncond):
    x, sigma, cond, uncond = _guidance_case()
    if per_sample_uncond:
        uncond = Cond(tokens=torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(5)))
    d_c = CondDenoiser()(x, sigma, cond)
    d_u = CondDenoiser()(x, sigma, Cond(tokens=uncond.tokens.expand(4, -1, -1)))
    assert (d_c - d_u).abs().max() > 1e-2  # the condition matters
    out = CFGDenoiser(CondDenoiser(), uncond, 3.0)(x, sigma, cond)
    torch.testing.assert_close(out, 3 * d_c - 2 * d_u)
    torch.testing.assert_close(out, d_u + 3 * (d_c - d_u))


def test_cfg_interval_falls_back_to_conditional():
    x, sigma, cond, uncond = _guidance_case()  # sigma = [0.5, 2, 5, 10]
    d_c = CondDenoiser()(x, sigma, cond)
    d_u = CondDenoiser()(x, sigma, Cond(tokens=uncond.tokens.expand(4, -1, -1)))
    out = CFGDenoiser(CondDenoiser(), uncond, 3.0, interval=(1.0, 6.0))(x, sigma, cond)
    guided = d_u + 3 * (d_c - d_u)
    torch.testing.assert_close(out[[1, 2]], guided[[1, 2]])  # inside [1, 6]
    torch.testing.assert_close(out[[0, 3]], d_c[[0, 3]])  # outside
    # the interval is inclusive
    out_edge = CFGDenoiser(CondDenoiser(), uncond, 3.0, interval=(2.0, 5.0))(x, sigma, cond)
    torch.testing.assert_close(out_edge[[1, 2]], guided[[1, 2]])


def test_cfg_rescale():
    x, sigma, cond, uncond = _guidance_case()
    d_c = CondDenoiser()(x, sigma, cond)
    d_u = CondDenoiser()(x, sigma, Cond(tokens=uncond.tokens.expand(4, -1, -1)))
    guided = d_u + 5 * (d_c - d_u)
    full = CFGDenoiser(CondDenoiser(), uncond, 5.0, rescale=1.0)(x, sigma, cond)
    dims = (1, 2, 3)
    # phi = 1: the guided prediction rescaled to the conditional one's per-sample std
    torch.testing.assert_close(full.std(dim=dims), d_c.std(dim=dims))
    torch.testing.assert_close(full, guided * d_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    half = CFGDenoiser(CondDenoiser(), uncond, 5.0, rescale=0.5)(x, sigma, cond)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * guided)


def test_cfg_negative_scale_raises():
    _, _, _, uncond = _guidance_case()
    with pytest.raises(ValueError):
        CFGDenoiser(CondDenoiser(), uncond, -1.0)


def test_cfg_inside_a_sampler():
    """Guidance is just a denoiser: a sampler runs it unchanged, and scale 1 reproduces the plain run."""
    x, _, cond, uncond = _guidance_case()
    sigmas = KarrasSchedule(0.02, 10.0).sigmas(6)
    plain = SAMPLERS["dpmpp_2m"](CondDenoiser(), x, sigmas, cond=cond)
    same = SAMPLERS["dpmpp_2m"](CFGDenoiser(CondDenoiser(), uncond, 1.0), x, sigmas, cond=cond)
    guided = SAMPLERS["dpmpp_2m"](CFGDenoiser(CondDenoiser(), uncond, 4.0), x, sigmas, cond=cond)
    assert torch.equal(plain, same)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-2
