"""The correlated noise prior (SharedNoise): its statistics, per-sample seeding through it, exact
Gaussian recovery by the samplers under it, and training/sampling through the real video CLI path."""

from __future__ import annotations

import pytest
import torch

from multidiff.core.noise import PerSampleGenerator, PriorGenerator, SharedNoise, randn_like, with_prior
from multidiff.core.samplers import SAMPLERS
from multidiff.core.schedules import KarrasSchedule

SD, RHO, T = 0.5, 0.6, 4


def frame_corr(x: torch.Tensor) -> torch.Tensor:
    """Correlation matrix (T, T) of the values along axis 2 of (N, C, T, ...)."""
    v = x.movedim(2, -1).reshape(-1, x.shape[2]).double()
    return torch.corrcoef(v.T)


def test_shared_noise_statistics():
    prior = SharedNoise(RHO, axes=[1])
    z = prior.sample((4000, 1, T, 3, 3), generator=torch.Generator().manual_seed(0))
    assert z.shape == (4000, 1, T, 3, 3)
    assert abs(z.std().item() - 1) < 0.01 and abs(z.mean().item()) < 0.01
    c = frame_corr(z)
    off = c[~torch.eye(T, dtype=torch.bool)]
    assert (off - RHO).abs().max() < 0.02  # frames share rho of their variance
    # across pixels (the other axes) the prior stays independent
    pix = z[:, 0, 0].reshape(4000, 9).double()
    assert torch.corrcoef(pix.T)[0, 1:].abs().max() < 0.05


def test_prior_generator_keeps_per_sample_seeding():
    prior = SharedNoise(0.5, axes=[1])
    batch = PriorGenerator(PerSampleGenerator([3, 7, 11]), prior).randn((3, 1, T, 2, 2))
    alone = PriorGenerator(PerSampleGenerator([7]), prior).randn((1, 1, T, 2, 2))
    torch.testing.assert_close(batch[1:2], alone)
    x = torch.empty(3, 1, T, 2, 2, dtype=torch.float64)
    assert randn_like(x, PriorGenerator(PerSampleGenerator([3, 7, 11]), prior)).dtype == torch.float64
    assert with_prior(None, None) is None


@pytest.mark.parametrize("bad", [{"correlation": 1.0}, {"correlation": -0.1}, {"axes": []}])
def test_shared_noise_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="noise prior"):
        SharedNoise(**{"correlation": 0.5, "axes": [1], **bad})


def test_shared_noise_names_a_missing_axis():
    with pytest.raises(ValueError, match="axis 3"):
        SharedNoise(0.5, axes=[3]).sample((2, 1, 4))


def correlated_gaussian_denoiser(x, sigma, cond=None):
    """Exact E[x0 | x] for x0 ~ N(0, SD^2 I) and x = x0 + sigma * n with n from SharedNoise(RHO) along
    frames: along the all-frames direction the noise variance is 1 - RHO + RHO T, across it 1 - RHO."""
    s2 = sigma.view(-1, 1, 1, 1, 1) ** 2
    mean = x.mean(2, keepdim=True)
    lam_mean, lam_rest = 1 - RHO + RHO * T, 1 - RHO
    return SD**2 / (SD**2 + s2 * lam_mean) * mean + SD**2 / (SD**2 + s2 * lam_rest) * (x - mean)


@pytest.mark.parametrize("name,steps", [("dpmpp_2m", 40), ("euler", 200), ("euler_ancestral", 300)])
def test_samplers_recover_the_data_under_the_prior(name, steps):
    """Start from the prior's noise at sigma_max and solve with the prior's denoiser: the samples are
    the data (std SD, frames uncorrelated), for deterministic and, with the prior's generator,
    stochastic samplers. The prior's correlation must not survive into the samples."""
    sigmas = KarrasSchedule(0.002, 80.0).sigmas(steps)
    prior = SharedNoise(RHO, axes=[1])
    gen = PriorGenerator(torch.Generator().manual_seed(1), prior)
    shape = (3000, 1, T, 2, 2)
    x = gen.randn(shape) * float(sigmas[0])  # the data's contribution is negligible at sigma 80
    out = SAMPLERS[name](correlated_gaussian_denoiser, x, sigmas, generator=gen)
    assert abs(out.std().item() / SD - 1) < 0.03
    off = frame_corr(out)[~torch.eye(T, dtype=torch.bool)]
    assert off.abs().max() < 0.05
    # the same noise read as isotropic (the mistake a sampler ignoring the prior would make) is wrong:
    # the frames of every sample come out correlated
    iso = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    plain = SAMPLERS[name](correlated_gaussian_denoiser, iso, sigmas, generator=torch.Generator().manual_seed(2))
    assert frame_corr(plain)[0, 1] < -0.1 and plain.std().item() / SD > 1.2  # measured: -0.26, 1.4
