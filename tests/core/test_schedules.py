"""Sigma grids: VP tables and timesteps, Karras and flow-matching grids."""

from __future__ import annotations

import math

import pytest
import torch

from multidiff.core.schedules import (
    FlowSchedule,
    KarrasSchedule,
    VPSchedule,
    append_zero,
    flow_t,
    karras_sigmas,
    make_betas,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BETAS = {  # multidiff name -> (diffusers name, beta_start, beta_end)
    "linear": ("linear", 1e-4, 2e-2),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "cosine": ("squaredcos_cap_v2", 1e-4, 2e-2),
}


def _vp(kind, spacing="trailing", n=1000):
    _, b0, b1 = BETAS[kind]
    return VPSchedule(kind, n, beta_start=b0, beta_end=b1, spacing=spacing)


# --- VPSchedule ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BETAS))
def test_vp_t_sigma_round_trip(kind):
    vp = _vp(kind)
    t = torch.cat([torch.arange(1000.0), torch.linspace(0, 999, 777)])  # integers and in-betweens
    torch.testing.assert_close(vp.sigma_to_t(vp.t_to_sigma(t)), t, atol=2e-3, rtol=0)
    # exact on the table: integer t gives the table's sigma, and back
    k = torch.arange(1000)
    assert torch.equal(vp.t_to_sigma(k.float()), vp.sigmas_table)
    torch.testing.assert_close(vp.sigma_to_t(vp.sigmas_table), k.float(), atol=2e-3, rtol=0)
    # and sigma -> t -> sigma inside the table's range
    sigma = torch.logspace(math.log10(vp.sigma_min), math.log10(vp.sigma_max), 301)
    torch.testing.assert_close(vp.t_to_sigma(vp.sigma_to_t(sigma)), sigma, rtol=1e-4, atol=0)


def test_vp_sigma_to_t_monotone_clamped_and_shape_kept():
    vp = _vp("linear")
    sigma = torch.logspace(-4, 4, 500)
    t = vp.sigma_to_t(sigma)
    assert t.shape == sigma.shape and t.dtype == torch.float32
    assert (t[1:] >= t[:-1]).all()
    assert t[0] == 0 and t[-1] == 999  # clamped outside [sigma_min, sigma_max]
    assert vp.sigma_to_t(torch.full((2, 3), 1.0)).shape == (2, 3)
    assert vp.t_to_sigma(torch.tensor([-5.0, 2000.0])).tolist() == pytest.approx([vp.sigma_min, vp.sigma_max])


def test_vp_sigma_to_t_interpolates_in_log_sigma():
    vp = _vp("linear")
    lo, hi = vp.sigmas_table[10].double(), vp.sigmas_table[11].double()
    mid = (lo * hi).sqrt()  # geometric mean: halfway in log sigma
    assert vp.sigma_to_t(mid.float()).item() == pytest.approx(10.5, abs=1e-3)


@pytest.mark.parametrize("kind", list(BETAS))
def test_vp_table_matches_diffusers(kind):
    diffusers = pytest.importorskip("diffusers")
    d_kind, b0, b1 = BETAS[kind]
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=d_kind, beta_start=b0, beta_end=b1)
    vp = _vp(kind)
    a = sched.alphas_cumprod.double()  # diffusers: float32
    torch.testing.assert_close(vp.alphas_cumprod, a, rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(make_betas(kind, 1000, b0, b1), sched.betas.double(), rtol=1e-5, atol=1e-9)
    # sqrt((1 - a) / a): diffusers' float32 1 - a costs up to ~5e-6 absolute at the smallest sigmas
    torch.testing.assert_close(vp.sigmas_table.double(), ((1 - a) / a).sqrt(), rtol=2e-5, atol=5e-6)
    assert vp.sigma_min == pytest.approx(float(((1 - a[0]) / a[0]).sqrt()), rel=3e-4)
    assert vp.sigma_max == pytest.approx(float(((1 - a[-1]) / a[-1]).sqrt()), rel=1e-4)


def test_vp_table_properties():
    for kind in BETAS:
        vp = _vp(kind)
        assert vp.sigmas_table.dtype == torch.float32 and vp.sigmas_table.shape == (1000,)
        assert (vp.sigmas_table[1:] > vp.sigmas_table[:-1]).all()
        a = vp.alphas_cumprod
        torch.testing.assert_close(vp.sigmas_table.double(), ((1 - a) / a).sqrt().float().double())
    # the cosine betas are clipped at 0.999 (Nichol & Dhariwal 2021)
    betas = make_betas("cosine", 1000)
    assert betas.max().item() == pytest.approx(0.999) and (betas > 0).all()


def _diffusers_timesteps(cls_name, spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    return sched.timesteps.long()


# multidiff's spacing names and the diffusers schedulers whose timesteps they reproduce:
# "trailing" all of them; "leading" DDIM's and Euler's (DPM-Solver's "leading" uses T // (steps + 1));
# "linspace" DPM-Solver's (DDIM's and Euler's "linspace" use linspace(0, T - 1, steps), Euler's unrounded).
SPACING_REFERENCES = [
    ("trailing", "DDIMScheduler"),
    ("trailing", "DPMSolverMultistepScheduler"),
    ("trailing", "EulerDiscreteScheduler"),
    ("leading", "DDIMScheduler"),
    ("leading", "EulerDiscreteScheduler"),
    ("linspace", "DPMSolverMultistepScheduler"),
]
STEP_COUNTS = [1, 2, 3, 7, 10, 20, 25, 26, 30, 48, 50, 96, 100, 250, 333, 500, 999, 1000]


@pytest.mark.parametrize("spacing,cls_name", SPACING_REFERENCES)
def test_vp_timesteps_match_diffusers(spacing, cls_name):
    vp = _vp("linear", spacing)
    for steps in STEP_COUNTS:  # 26, 30 (linspace) and 48, 96 (trailing) land on exact .5 ties
        ref = _diffusers_timesteps(cls_name, spacing, steps)
        assert torch.equal(vp.timesteps(steps), ref), (spacing, cls_name, steps)


def test_vp_trailing_never_wraps_to_timestep_minus_one():
    """Regression: a float ``arange(T, 0, -T / steps)`` has ``steps + 1`` entries for some step counts
    (61, 103, 121, ...), the last rounding to timestep -1, which indexes the *noisiest* sigma. diffusers
    0.42 does exactly that; multidiff keeps the ``steps`` valid ones."""
    vp = _vp("linear", "trailing")
    for steps in (61, 103, 121):
        ref = _diffusers_timesteps("DDIMScheduler", "trailing", steps)
        assert len(ref) == steps + 1 and ref[-1] == -1  # the diffusers quirk, for the record
        assert torch.equal(vp.timesteps(steps), ref[:steps])


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "karras"])
def test_vp_grids_are_valid_for_every_step_count(spacing):
    vp = _vp("scaled_linear", spacing)
    # linspace at steps = T rounds T + 1 points onto T integers: a repeated timestep (as in diffusers)
    for steps in range(1, 1000 if spacing == "linspace" else 1001):
        sig = vp.sigmas(steps)
        assert sig.shape == (steps + 1,), steps
        assert sig[-1] == 0 and (sig[1:] < sig[:-1]).all(), steps
        if spacing != "karras":
            ts = vp.timesteps(steps)
            assert ts.dtype == torch.int64 and ts.min() >= 0 and ts.max() <= 999, steps


def test_vp_grid_values():
    vp = _vp("cosine", "trailing")
    sig = vp.sigmas(10)
    assert sig.dtype == torch.float32
    assert torch.equal(sig[:-1], vp.sigmas_table[torch.arange(999, 0, -100)])
    assert vp.timesteps(4).tolist() == [999, 749, 499, 249]
    assert _vp("linear", "leading").timesteps(4).tolist() == [750, 500, 250, 0]
    assert _vp("linear", "linspace").timesteps(4).tolist() == [999, 749, 500, 250]
    k = _vp("linear", "karras").sigmas(5)
    assert k[0].item() == pytest.approx(vp_max := _vp("linear").sigma_max, rel=1e-6)
    assert k[-2].item() == pytest.approx(_vp("linear").sigma_min, rel=1e-5) and vp_max > 100


def test_vp_bad_arguments():
    with pytest.raises(ValueError):
        VPSchedule("sigmoid")
    with pytest.raises(ValueError):
        VPSchedule("linear", spacing="uniform")
    with pytest.raises(ValueError):
        make_betas("quadratic", 10)


# --- Karras and flow grids ------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_karras_sigmas(steps):
    sig = karras_sigmas(steps, 0.002, 80.0, 7.0)
    assert sig.shape == (steps + 1,) and sig.dtype == torch.float32
    assert sig[0].item() == pytest.approx(80.0, rel=1e-6)
    assert sig[-1] == 0
    if steps > 1:
        assert sig[-2].item() == pytest.approx(0.002, rel=1e-5)
        assert (sig[1:] < sig[:-1]).all()
        # eq. 5: sigma_i^(1/rho) is evenly spaced
        r = sig[:-1].double() ** (1 / 7)
        torch.testing.assert_close(r.diff(), r.diff()[:1].expand(steps - 1), rtol=1e-4, atol=0)
    torch.testing.assert_close(KarrasSchedule(0.002, 80.0, 7.0).sigmas(steps), sig)


def test_karras_rho_shapes_the_grid():
    lin = karras_sigmas(10, 0.1, 10.0, rho=1.0)
    torch.testing.assert_close(lin[:-1], torch.linspace(10.0, 0.1, 10))
    assert karras_sigmas(10, 0.1, 10.0, rho=7.0)[5] < lin[5]  # rho > 1 spends steps at low noise


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_grid(shift):
    steps = 28
    fs = FlowSchedule(shift=shift)
    sig = fs.sigmas(steps)
    assert sig.shape == (steps + 1,) and sig.dtype == torch.float32
    assert sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    t = flow_t(sig.double())
    u = torch.linspace(0.999, 0, steps + 1, dtype=torch.float64)
    torch.testing.assert_close(t, shift * u / (1 + (shift - 1) * u), rtol=1e-5, atol=1e-7)
    if shift == 1.0:
        assert sig[0].item() == pytest.approx(fs.sigma_max, rel=1e-5)
        torch.testing.assert_close(t.diff(), torch.full((steps,), -0.999 / steps, dtype=torch.float64))


def test_flow_t_inverts_sigma():
    t = torch.linspace(0, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(flow_t(t / (1 - t)), t)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: VPSchedule().sigmas(n),
        lambda n: VPSchedule(spacing="karras").sigmas(n),
        lambda n: KarrasSchedule().sigmas(n),
        lambda n: FlowSchedule().sigmas(n),
        lambda n: karras_sigmas(n, 0.002, 80.0),
    ],
)
@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_bad_steps_raise(make, steps):
    with pytest.raises(ValueError):
        make(steps)


def test_append_zero():
    out = append_zero(torch.tensor([3.0, 1.0]))
    assert out.tolist() == [3.0, 1.0, 0.0] and out.dtype == torch.float32


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_vp_shift_scales_every_sigma(spacing):
    base, shifted = VPSchedule(spacing=spacing), VPSchedule(spacing=spacing, shift=3.0)
    torch.testing.assert_close(shifted.sigmas_table, 3.0 * base.sigmas_table)
    torch.testing.assert_close(shifted.sigmas(12), 3.0 * base.sigmas(12), rtol=1e-5, atol=0)
    # alphas_cumprod stays the VP view of the (shifted) table: sigma^2 = (1 - a) / a
    a = shifted.alphas_cumprod
    torch.testing.assert_close(((1 - a) / a).sqrt().float(), shifted.sigmas_table, rtol=1e-5, atol=0)
    # the timestep map follows the table: the same timestep index at 3x the sigma
    sig = base.sigmas_table[[0, 10, 500, 998]]
    torch.testing.assert_close(shifted.sigma_to_t(3.0 * sig), base.sigma_to_t(sig), rtol=0, atol=1e-3)
    torch.testing.assert_close(VPSchedule(shift=1.0).sigmas_table, base.sigmas_table)


def test_vp_shift_moves_training_noise_up():
    from multidiff.core.noise import DiscreteTimestepSigma

    g = torch.Generator().manual_seed(0)
    lo = DiscreteTimestepSigma(VPSchedule()).sample(4000, generator=g)
    g = torch.Generator().manual_seed(0)
    hi = DiscreteTimestepSigma(VPSchedule(shift=2.0)).sample(4000, generator=g)
    assert (hi > 1).float().mean() > (lo > 1).float().mean() + 0.05  # more training at high noise
    torch.testing.assert_close(hi, 2.0 * lo)


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_vp_shift_must_be_positive(shift):
    with pytest.raises(ValueError, match="shift"):
        VPSchedule(shift=shift)


@pytest.mark.parametrize(
    "schedule,limit",
    [(VPSchedule(spacing="trailing"), 1000), (VPSchedule(spacing="leading"), 1000),
     (VPSchedule(spacing="linspace"), 999), (VPSchedule(num_train_timesteps=50), 50),
     (VPSchedule(spacing="karras"), None), (KarrasSchedule(), None), (FlowSchedule(shift=3.0), None)],
    ids=["trailing", "leading", "linspace", "T50", "vp-karras", "karras", "flow"],
)
def test_every_schedule_states_its_step_limit_and_refuses_more(schedule, limit):
    assert schedule.max_steps == limit
    top = limit or 20_000  # continuous grids: far more steps than anyone samples with
    grid = schedule.sigmas(top)
    assert grid.shape == (top + 1,) and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    if limit is not None:
        for steps in (limit + 1, 100_000):
            with pytest.raises(ValueError, match=f"use steps <= {limit}"):
                schedule.sigmas(steps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_logit_normal_flow_density_is_shifted_like_the_sampling_grid(shift):
    """The training times get the grid's shift: the median time t = 1/2 moves to shift / (1 + shift),
    i.e. a median sigma of ``shift``; and the grid's own midpoint maps the same way."""
    from multidiff.core.noise import LogitNormalFlowSigma
    from multidiff.core.schedules import FlowSchedule

    sigma = LogitNormalFlowSigma(shift=shift).sample(40_000, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sigma).all() and sigma.min() > 0
    assert abs(sigma.median().item() / shift - 1) < 0.03
    grid = FlowSchedule(shift=shift, t_max=1.0 - 1e-9).sigmas(2)  # t = 1, 1/2, 0 before the shift
    assert grid[1].item() == pytest.approx(shift, rel=1e-5)
    with pytest.raises(ValueError, match="shift=0"):
        LogitNormalFlowSigma(shift=0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_flow_spacings_match_diffusers_flow_schedulers(shift, steps):
    """The imported-model spacings give the times of diffusers' FlowMatchEulerDiscreteScheduler and of
    UniPCMultistepScheduler(use_flow_sigmas=True) (t = 1 taken as 1 - 1e-6), ending at 0; the uniform
    spacing from 1 - 1/T gives DPMSolverMultistepScheduler(use_flow_sigmas=True)'s."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from multidiff.core.schedules import FlowSchedule

    euler = FlowMatchEulerDiscreteScheduler(shift=shift)
    euler.set_timesteps(steps)
    ours = FlowSchedule(shift=shift, spacing="flow_match_euler").times(steps)
    expected = euler.sigmas.double().clamp(max=FlowSchedule.T_ONE)
    assert len(ours) == steps + 1 and ours[-1] == 0
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    unipc.set_timesteps(steps)
    ours = FlowSchedule(shift=shift, spacing="flow_sigmas").times(steps)
    torch.testing.assert_close(ours, unipc.sigmas.double(), rtol=0, atol=1e-6)
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    dpm.set_timesteps(steps)
    ours = FlowSchedule(shift=shift, t_max=1 - 1 / 1000).times(steps)
    torch.testing.assert_close(ours, dpm.sigmas.double(), rtol=0, atol=1e-6)
    sigmas = FlowSchedule(shift=shift, spacing="flow_sigmas").sigmas(steps)
    assert torch.isfinite(sigmas).all() and (sigmas[:-1] > sigmas[1:]).all()
    with pytest.raises(ValueError, match="flow spacing"):
        FlowSchedule(spacing="leading")


@pytest.mark.parametrize("steps", [1, 4, 25])
@pytest.mark.parametrize("cls_name", ["EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler"])
def test_exponential_and_karras_grids_equal_diffusers_edm_schedulers(steps, cls_name):
    import diffusers

    from multidiff.core.schedules import ExponentialSchedule, KarrasSchedule

    # the exponential grid is computed in float32 as diffusers does; multidiff's Karras grid in float64 (1.2e-6 apart)
    for ours, kind, rtol in ((ExponentialSchedule(0.3, 500.0), "exponential", 1e-7),
                             (KarrasSchedule(0.3, 500.0, 7.0), "karras", 1e-5)):
        ref = getattr(diffusers, cls_name)(sigma_min=0.3, sigma_max=500.0, sigma_schedule=kind)
        ref.set_timesteps(steps)
        assert torch.allclose(ours.sigmas(steps), ref.sigmas.float(), rtol=rtol, atol=0), kind
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        ExponentialSchedule(5.0, 1.0)
