"""Parameterizations, prediction conversions and the training loss of ``Denoiser``."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from multidiff.core.denoiser import (
    PREDICTIONS,
    Denoiser,
    EDMPrecond,
    EpsPrediction,
    FlowVelocity,
    VPrediction,
    X0Prediction,
    convert_prediction,
    from_x0,
    snr,
    to_x0,
)
from multidiff.core.noise import append_dims
from multidiff.core.schedules import VPSchedule

SIGMA_DATA = 0.5


def _data(dtype=torch.float64, b=4, shape=(3, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g, dtype=dtype) * 0.5 + 0.2
    noise = torch.randn(b, *shape, generator=g, dtype=dtype)
    sigma = torch.tensor([0.05, 0.4, 1.5, 8.0], dtype=dtype)[:b]
    return x0, noise, sigma


def closed_form_target(kind: str, x0, noise, sigma):
    """The ideal network output of each prediction type for ``x = x0 + sigma * noise``."""
    s = append_dims(sigma, x0.ndim)
    if kind == "eps":
        return noise
    if kind == "v":  # alpha * noise - sigma_vp * x0 with alpha = 1/sqrt(1+s^2), sigma_vp = s alpha
        return (noise - s * x0) / (1 + s**2).sqrt()
    if kind == "x0":
        return x0
    if kind == "flow":
        return noise - x0
    if kind == "edm":  # Karras et al. (2022), eq. 8 with Table 1's scalings, simplified
        sd = SIGMA_DATA
        return (s * x0 - sd**2 * noise) / (sd * (s**2 + sd**2).sqrt())
    raise AssertionError(kind)


# --- conversions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_from_x0_closed_forms(kind):
    x0, noise, sigma = _data()
    x = x0 + append_dims(sigma, x0.ndim) * noise
    target = from_x0(x0, kind, x, sigma)
    torch.testing.assert_close(target, closed_form_target(kind, x0, noise, sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(to_x0(target, kind, x, sigma), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("src,dst", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_convert_prediction_round_trip(src, dst):
    x0, noise, sigma = _data()
    x = x0 + append_dims(sigma, x0.ndim) * noise
    pred = closed_form_target(src, x0, noise, sigma)
    out = convert_prediction(pred, src, dst, x, sigma)
    torch.testing.assert_close(out, closed_form_target(dst, x0, noise, sigma), rtol=1e-5, atol=1e-5)
    back = convert_prediction(out, dst, src, x, sigma)
    torch.testing.assert_close(back, pred, rtol=1e-5, atol=1e-5)
    # for a prediction that is not ideal the conversions must still be exact inverses
    other = torch.randn(pred.shape, generator=torch.Generator().manual_seed(1), dtype=pred.dtype)
    torch.testing.assert_close(
        convert_prediction(convert_prediction(other, src, dst, x, sigma), dst, src, x, sigma),
        other,
        rtol=1e-5,
        atol=1e-5,
    )


def test_conversions_float32_and_rank():
    x0, noise, sigma = _data(torch.float32, shape=(2, 7))  # rank 3
    x = x0 + append_dims(sigma, x0.ndim) * noise
    v = convert_prediction(noise, "eps", "v", x, sigma)
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, closed_form_target("v", x0, noise, sigma), rtol=1e-5, atol=1e-5)


def test_unknown_prediction_raises():
    x0, noise, sigma = _data()
    with pytest.raises(ValueError):
        to_x0(x0, "score", x0, sigma)
    with pytest.raises(ValueError):
        from_x0(x0, "score", x0, sigma)


def test_snr():
    sigma = torch.tensor([0.5, 1.0, 4.0])
    torch.testing.assert_close(snr(sigma), torch.tensor([4.0, 1.0, 1 / 16]))


# --- parameterizations ------------------------------------------------------------------------------

VP = VPSchedule()  # cosine; sigmas from ~0.006 to ~2e4 cover the test sigmas


def _params():
    return {
        "eps": EpsPrediction(VP),
        "v": VPrediction(VP),
        "x0": X0Prediction(VP),
        "edm": EDMPrecond(SIGMA_DATA),
        "flow": FlowVelocity(),
    }


PARAM_KINDS = list(_params())


class CheatBackbone(nn.Module):
    """Knows x0 and the noise and returns the ideal target of ``kind``, plus ``offset``."""

    def __init__(self, kind, x0, noise, sigma, offset=None):
        super().__init__()
        self.kind, self.x0, self.noise, self.sigma, self.offset = kind, x0, noise, sigma, offset
        self.seen = []

    def forward(self, x_in, c_noise, cond=None):
        self.seen.append((x_in, c_noise))
        out = closed_form_target(self.kind, self.x0, self.noise, self.sigma)
        return out if self.offset is None else out + self.offset


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_ideal_backbone_recovers_x0(kind):
    param = _params()[kind]
    assert param.prediction == kind
    x0, noise, sigma = _data(torch.float32)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    backbone = CheatBackbone(kind, x0, noise, sigma)
    den = Denoiser(backbone, param)
    out = den(x, sigma)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=2e-5)

    # the backbone's inputs are the documented ones
    x_in, c_noise = backbone.seen[0]
    assert c_noise.shape == sigma.shape and c_noise.dtype == torch.float32
    s = append_dims(sigma, x.ndim)
    if kind in ("eps", "v", "x0"):
        torch.testing.assert_close(x_in, x / (1 + s**2).sqrt())  # the VP-frame sample
        torch.testing.assert_close(VP.t_to_sigma(c_noise), sigma, rtol=1e-4, atol=0)  # a timestep
        assert ((c_noise >= 0) & (c_noise <= 999)).all()
    elif kind == "flow":
        t = s / (1 + s)
        torch.testing.assert_close(x_in, (1 - t) * x0 + t * noise)  # the flow-matching sample x_t
        torch.testing.assert_close(c_noise, 1000 * sigma / (1 + sigma))
    else:
        torch.testing.assert_close(x_in, x / (s**2 + SIGMA_DATA**2).sqrt())
        torch.testing.assert_close(c_noise, sigma.log() / 4)

    # the ideal backbone has zero loss; an offset of 0.1 costs exactly 0.01 per sample
    loss = den.loss(x0, sigma, noise)
    assert loss.shape == sigma.shape and loss.dtype == torch.float32
    assert loss.max().item() < 1e-9
    off = Denoiser(CheatBackbone(kind, x0, noise, sigma, offset=0.1), param).loss(x0, sigma, noise)
    torch.testing.assert_close(off, torch.full_like(off, 0.01), rtol=1e-3, atol=0)


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_scalings_consistency(kind):
    """EDM eq. 8: the ideal network output ``(x0 - c_skip x) / c_out`` is each type's closed form."""
    param = _params()[kind]
    x0, noise, sigma = _data(torch.float64)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in param.scalings(sigma))
    target = (x0 - c_skip * x) / c_out
    torch.testing.assert_close(target, closed_form_target(kind, x0, noise, sigma), rtol=1e-9, atol=1e-9)
    if kind in PREDICTIONS:
        torch.testing.assert_close(target, from_x0(x0, kind, x, sigma), rtol=1e-9, atol=1e-9)
    assert (c_in > 0).all()


@pytest.mark.parametrize("kind", PARAM_KINDS)
def test_denoiser_any_rank(kind):
    param = _params()[kind]
    for shape in [(6,), (3, 4), (2, 3, 4, 5)]:  # ranks 2..5 incl. batch
        x0, noise, sigma = _data(torch.float32, shape=shape)
        x = x0 + append_dims(sigma, x0.ndim) * noise
        out = Denoiser(CheatBackbone(kind, x0, noise, sigma), param)(x, sigma)
        torch.testing.assert_close(out, x0, rtol=1e-4, atol=2e-5)


# --- mixed precision --------------------------------------------------------------------------------


class ConvBackbone(nn.Module):
    """A 1x1 conv (autocast runs it in bfloat16) with a timestep-dependent bias."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.seen = []

    def forward(self, x_in, c_noise, cond=None):
        h = self.conv(x_in)
        out = h + append_dims(c_noise / 1000, x_in.ndim).to(h.dtype)  # stays bf16 under autocast
        self.seen.append((x_in.dtype, c_noise.dtype, out.dtype))
        return out


@pytest.mark.parametrize("kind", ["eps", "v", "edm", "flow"])
def test_loss_float32_under_bf16_autocast(kind):
    torch.manual_seed(0)
    backbone = ConvBackbone()
    den = Denoiser(backbone, _params()[kind], loss_weighting="min_snr")
    x0, noise, sigma = _data(torch.float32)
    ref = den.loss(x0, sigma, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = den.loss(x0, sigma, noise)
        out = den(x0 + append_dims(sigma, x0.ndim) * noise, sigma)
    assert backbone.seen[-1][2] == torch.bfloat16, "autocast was not active in the backbone"
    assert all(c_dtype == torch.float32 for _, c_dtype, _ in backbone.seen[1:]), "sigma / c_noise left float32"
    assert loss.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=5e-2, atol=1e-4)
    loss.mean().backward()
    assert backbone.conv.weight.grad is not None and backbone.conv.weight.grad.dtype == torch.float32


def test_loss_accepts_bf16_data():
    """bf16 data: the loss is still reduced in float32."""
    torch.manual_seed(0)
    den = Denoiser(ConvBackbone().to(torch.bfloat16), _params()["eps"])
    x0, noise, sigma = _data(torch.float32)
    loss = den.loss(x0.bfloat16(), sigma, noise.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


# --- loss weighting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,weight",
    [
        ("eps", lambda snr, g: snr.clamp(max=g) / snr),  # Hang et al. (2023), eps-prediction
        ("v", lambda snr, g: snr.clamp(max=g) / (snr + 1)),  # v-prediction
        ("x0", lambda snr, g: snr.clamp(max=g)),  # x0-prediction
    ],
)
def test_min_snr_weight(kind, weight):
    gamma = 5.0
    x0, noise, _ = _data(torch.float32)
    sigma = torch.tensor([0.1, 0.3, 0.5, 2.0])  # snr 100, 11.1, 4, 0.25: both sides of gamma
    err = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    plain = Denoiser(CheatBackbone(kind, x0, noise, sigma, offset=err), _params()[kind]).loss(x0, sigma, noise)
    weighted = Denoiser(
        CheatBackbone(kind, x0, noise, sigma, offset=err),
        _params()[kind],
        loss_weighting="min_snr",
        min_snr_gamma=gamma,
    ).loss(x0, sigma, noise)
    torch.testing.assert_close(plain, err.pow(2).flatten(1).mean(1), rtol=1e-3, atol=0)
    torch.testing.assert_close(weighted / plain, weight(sigma.pow(-2), gamma), rtol=1e-4, atol=0)


def test_unknown_loss_weighting_raises():
    with pytest.raises(ValueError):
        Denoiser(nn.Identity(), EpsPrediction(VP), loss_weighting="p2")


def test_edm_options_match_diffusers_edm_schedulers():
    """c_noise atan (the cosine scheduler's), v_prediction's negated output, and diffusers' start."""
    import math

    from diffusers import CosineDPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

    from multidiff.core.denoiser import EDMPrecond

    sigma = torch.tensor([0.3, 1.0, 40.0, 500.0])
    x, out = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3)
    for cls, c_noise in ((CosineDPMSolverMultistepScheduler, "atan"), (EDMDPMSolverMultistepScheduler, "log")):
        ref = cls(sigma_min=0.3, sigma_max=500.0, sigma_data=1.0, prediction_type="v_prediction")
        param = EDMPrecond(sigma_data=1.0, c_noise=c_noise, negate_output=True, marginal_start=True)
        assert torch.allclose(param.c_noise(sigma), ref.precondition_noise(sigma), atol=1e-6)
        c_skip, c_out, c_in = (s[:, None] for s in param.scalings(sigma))
        assert torch.allclose(c_skip * x + c_out * out, ref.precondition_outputs(x, out, sigma[:, None]), atol=1e-6)
        assert torch.allclose(c_in * x, ref.precondition_inputs(x, sigma[:, None]), atol=1e-7)
        assert param.start_scale(500.0) == pytest.approx(ref.init_noise_sigma, rel=1e-12)
    assert EDMPrecond().start_scale(80.0) == 80.0 and EDMPrecond().c_noise(torch.tensor([math.e ** 4])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="c_noise='cos' is not one of log, atan"):
        EDMPrecond(c_noise="cos")
