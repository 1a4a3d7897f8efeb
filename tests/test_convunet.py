"""The rank-agnostic conv UNet: one class for 1-D, 2-D and 3-D data behind the backbone signature."""

from __future__ import annotations

import pytest
import torch

from multidiff.backbones.base import BackboneShapeError
from multidiff.backbones.conditioning import sinusoidal_embedding
from multidiff.backbones.convunet import ConvUNet
from multidiff.core.cond import Cond
from multidiff.core.denoiser import Denoiser, EDMPrecond, FlowVelocity, VPrediction
from multidiff.core.noise import PerSampleGenerator
from multidiff.core.samplers import SAMPLERS
from multidiff.core.schedules import FlowSchedule, KarrasSchedule, VPSchedule

# (B, C, *dims) of every rank, with sizes that are neither even nor powers of two
SHAPES = {1: (2, 3, 37), 2: (2, 1, 9, 14), 3: (2, 2, 5, 6, 7)}
CTX = 8


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def make(dims: int, **kw) -> ConvUNet:
    torch.manual_seed(0)
    opts = dict(shape=SHAPES[dims][1:], channels=(8, 16, 16), cross_attention_dim=CTX, num_heads=2,
                pooled_dim=CTX, norm_groups=4)
    return ConvUNet(**{**opts, **kw}).eval()


def text_cond(b: int = 2, length: int = 5) -> Cond:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return Cond(tokens=torch.randn(b, length, CTX, generator=g), mask=mask, pooled=torch.randn(b, CTX, generator=g))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_output_has_the_input_shape_for_odd_sizes(dims):
    net = make(dims)
    for shape in (SHAPES[dims], (1, SHAPES[dims][1]) + (1,) * dims, (3, SHAPES[dims][1]) + (16,) * dims):
        x = torch.randn(shape)
        cond = text_cond(shape[0])
        out = net(x, torch.full((shape[0],), 300.0), cond)
        assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_output_depends_on_noise_level_tokens_pooled_and_labels(dims):
    net = make(dims, num_classes=3)
    x = torch.randn(SHAPES[dims])
    c = text_cond()
    base = net(x, torch.tensor([10.0, 500.0]), c)
    assert not torch.allclose(base, net(x, torch.tensor([900.0, 20.0]), c))
    assert not torch.allclose(base, net(x, torch.tensor([10.0, 500.0]), Cond(tokens=c.tokens + 1, mask=c.mask, pooled=c.pooled)))
    assert not torch.allclose(base, net(x, torch.tensor([10.0, 500.0]), Cond(tokens=c.tokens, mask=c.mask, pooled=-c.pooled)))
    with_labels = Cond(tokens=c.tokens, mask=c.mask, pooled=c.pooled, labels=torch.tensor([0, 1]))
    assert not torch.allclose(base, net(x, torch.tensor([10.0, 500.0]), with_labels))
    # no labels means the null label, index num_classes
    null = Cond(tokens=c.tokens, mask=c.mask, pooled=c.pooled, labels=torch.tensor([3, 3]))
    torch.testing.assert_close(base, net(x, torch.tensor([10.0, 500.0]), null))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_masked_tokens_are_ignored(dims):
    net = make(dims)
    x = torch.randn(SHAPES[dims])
    c = text_cond()
    tokens = c.tokens.clone()
    tokens[0, 3:] = 1e3 * torch.randn_like(tokens[0, 3:])  # only padding of sample 0 changes
    sigma = torch.tensor([10.0, 500.0])
    changed = net(x, sigma, Cond(tokens=tokens, mask=c.mask, pooled=c.pooled))
    torch.testing.assert_close(net(x, sigma, c), changed)
    # a prompt whose every token is padding, or no condition at all, still gives finite output
    empty = Cond(tokens=c.tokens, mask=torch.zeros_like(c.mask), pooled=c.pooled)
    assert torch.isfinite(net(x, torch.tensor([10.0, 500.0]), empty)).all()
    assert torch.isfinite(net(x, torch.tensor([10.0, 500.0]), None)).all()


def test_attention_only_at_the_requested_levels():
    from multidiff.backbones.convunet import CrossAttention

    def count(net):
        return sum(isinstance(m, CrossAttention) for m in net.modules())

    # 3 levels x 1 block down + 1 up, the middle block always: lowest only -> 2 + 1
    assert count(make(1)) == 3
    assert count(make(1, attention_levels=[1, 2])) == 5
    assert count(make(1, cross_attention_dim=None)) == 0


def test_wrong_rank_and_width_are_explained():
    net = make(1)
    assert net.dims == 1 and net.in_channels == 3 and net.out_channels == 3  # from the shape (3, 37)
    with pytest.raises(BackboneShapeError, match=r"built for items of shape \(3, 37\).*got a batch of shape \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2), None)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        net(torch.randn(2, 3, 16), torch.zeros(2), Cond(tokens=torch.randn(2, 4, CTX + 1)))
    with pytest.raises(BackboneShapeError, match="takes items of rank 1 or 2 or 3 only"):
        ConvUNet(shape=(1, 4, 4, 4, 4))


def test_sinusoidal_embedding_is_bounded_and_distinct():
    e = sinusoidal_embedding(torch.tensor([0.0, 1.0, 999.0, -0.5]), 33)
    assert e.shape == (4, 33) and e.abs().max() <= 1
    assert (e[:, None] - e[None]).abs().sum(-1).fill_diagonal_(1).min() > 1e-3


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_save_and_load_pretrained_round_trip(dims, tmp_path):
    net = make(dims)
    net.save_pretrained(tmp_path)
    other = make(dims)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    other.load_pretrained(tmp_path)
    x, c = torch.randn(SHAPES[dims]), text_cond()
    torch.testing.assert_close(net(x, torch.tensor([3.0, 4.0]), c), other(x, torch.tensor([3.0, 4.0]), c))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_trains_on_a_fixed_batch(dims):
    """The loss of a denoiser built on it falls when fitting one batch: gradients reach every layer."""
    net = make(dims).train()
    den = Denoiser(net, EDMPrecond(sigma_data=0.5))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPES[dims], generator=g) * 0.5
    sigma = torch.tensor([0.3, 1.0])
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    first = den.loss(x0, sigma, noise, text_cond()).mean()
    first.backward()
    assert all(p.grad is not None for p in den.parameters() if p.requires_grad)
    for _ in range(30):
        opt.zero_grad()
        loss = den.loss(x0, sigma, noise, text_cond()).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()


def _setting(name: str):
    if name.startswith("flow"):
        return FlowSchedule(), FlowVelocity()
    if name in ("ddpm", "ddim"):
        schedule = VPSchedule(beta_schedule="cosine", spacing="trailing")
        return schedule, VPrediction(schedule)
    return KarrasSchedule(sigma_min=0.002, sigma_max=80.0), EDMPrecond(sigma_data=0.5)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_on_every_rank(name, dims):
    """Each sampler of the table drives the UNet on (B, C, L), (B, C, H, W) and (B, C, D, H, W):
    the result has the noise's shape, is finite, and is reproducible from per-sample seeds."""
    schedule, param = _setting(name)
    den = Denoiser(make(dims), param).eval()
    sigmas = schedule.sigmas(4)
    cond = text_cond()

    def run(seeds):
        gen = PerSampleGenerator(seeds)
        x = gen.randn(SHAPES[dims]) * float(sigmas[0])
        return SAMPLERS[name](den, x, sigmas, cond=cond, generator=gen)

    out = run([0, 1])
    assert out.shape == SHAPES[dims] and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.abs().max() < 1e3
    torch.testing.assert_close(out, run([0, 1]))
    assert not torch.allclose(out, run([2, 3]))
