"""The rank-free diffusion transformer: patches of any rank (padded and cropped), N-D rotary
positions, adaLN-Zero, cross and joint attention to text, every sampler, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from multidiff.backbones.base import BackboneShapeError
from multidiff.backbones.dit import DiT, apply_rope, patchify, rope_angles, rope_split, unpatchify
from multidiff.core.cond import Cond
from multidiff.core.denoiser import Denoiser, VPrediction
from multidiff.core.samplers import SAMPLERS
from multidiff.core.schedules import VPSchedule

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = {"1-D signal": (2, 37), "2-D image": (1, 15, 9), "3-D clip": (3, 5, 7, 6)}
TEXT = 12


def tiny(shape, **kw) -> DiT:
    torch.manual_seed(0)
    kw = {"patch_size": 2, "hidden_size": 48, "depth": 2, "num_heads": 4, "cross_attention_dim": TEXT, **kw}
    net = DiT(shape=shape, **kw)
    with torch.no_grad():  # off the zero init, so outputs depend on every input
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def text_cond(batch: int, length: int = 5) -> Cond:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False  # padding in the first prompt
    return Cond(tokens=torch.randn(batch, length, TEXT, generator=g), mask=mask)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_patchify_round_trip_pads_and_crops_any_size(shape):
    x = torch.randn(2, *shape)
    patch = (2,) * (len(shape) - 1)
    tokens, grid = patchify(x, patch)
    assert grid == tuple(math.ceil(d / 2) for d in shape[1:])
    assert tokens.shape == (2, math.prod(grid), shape[0] * 2 ** (len(shape) - 1))
    assert torch.equal(unpatchify(tokens, grid, patch, shape[0], shape[1:]), x)


def test_patch_tokens_hold_neighbouring_values():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    tokens, grid = patchify(x, (2, 2))
    assert grid == (2, 2)
    assert tokens[0, 0].tolist() == [0, 1, 4, 5] and tokens[0, 1].tolist() == [2, 3, 6, 7]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_any_rank_and_size_and_zero_init(shape):
    net = DiT(shape=shape, hidden_size=32, depth=1, num_heads=2)
    x = torch.randn(2, *shape)
    out = net(x, torch.tensor([3.0, 500.0]), None)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # adaLN-Zero + zero head: starts at zero
    odd = (shape[0], *[d + 3 for d in shape[1:]])  # other sizes, not multiples of the patch
    assert tiny(shape)(torch.randn(1, *odd), torch.tensor([10.0]), text_cond(1)).shape == (1, *odd)


def test_every_output_depends_on_the_padded_edge():
    net = tiny((1, 9, 9))
    x = torch.randn(1, 1, 9, 9, requires_grad=True)
    net(x, torch.tensor([100.0]), None)[0, 0, 8, 8].backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_rope_scores_depend_on_relative_positions_only():
    split = rope_split(16, 2)
    assert split == (8, 8)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope_angles((6, 6), split, theta=100.0, device="cpu")
    rq, rk = (apply_rope(t.expand(1, 1, 36, 16), cos, sin)[0, 0] for t in (q, k))
    grid = torch.arange(36).reshape(6, 6)
    score = lambda a, b: float(rq[grid[a]] @ rk[grid[b]])  # noqa: E731
    assert score((1, 2), (3, 1)) == pytest.approx(score((2, 4), (4, 3)), abs=1e-4)  # same offset (2, -1)
    assert abs(score((1, 2), (3, 1)) - score((1, 2), (1, 3))) > 1e-3  # another offset
    assert rope_split(20, 3) == (6, 6, 6)  # 2 channels left unrotated
    with pytest.raises(BackboneShapeError, match="head width of 2 cannot carry rotary positions for 3 axes"):
        rope_split(2, 3)


@pytest.mark.parametrize("joint", [False, True], ids=["cross-attention", "joint attention"])
def test_text_changes_the_output_and_padding_is_ignored(joint):
    net = tiny((1, 8, 8), joint_attention=joint)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([50.0, 50.0])
    cond = text_cond(2)
    base = net(x, t, cond)
    garbage = cond.tokens.clone()
    garbage[0, 3:] = 100.0  # only padded positions of prompt 0
    assert torch.allclose(net(x, t, Cond(tokens=garbage, mask=cond.mask)), base, atol=1e-5)
    other = cond.tokens.clone()
    other[1, 0] += 1.0  # a real token of prompt 1
    changed = net(x, t, Cond(tokens=other, mask=cond.mask))
    assert torch.allclose(changed[0], base[0], atol=1e-5) and not torch.allclose(changed[1], base[1], atol=1e-4)
    assert net(x, t, None).shape == x.shape  # no prompt at all: the null token is the only key


def test_pooled_labels_and_noise_level_reach_the_output():
    net = tiny((1, 8, 8), pooled_dim=6, num_classes=3, cross_attention_dim=None)
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([50.0, 50.0])
    base = net(x, t, Cond(pooled=torch.zeros(2, 6), labels=torch.tensor([0, 1])))
    assert not torch.allclose(net(x, t, Cond(pooled=torch.ones(2, 6), labels=torch.tensor([0, 1]))), base)
    assert not torch.allclose(net(x, t, Cond(pooled=torch.zeros(2, 6), labels=torch.tensor([2, 2]))), base)
    assert not torch.allclose(net(x, torch.tensor([900.0, 900.0]), Cond(pooled=torch.zeros(2, 6),
                                                                          labels=torch.tensor([0, 1]))), base)


def test_concat_channels_start_switched_off():
    plain = tiny((1, 8, 8))
    widened = DiT(shape=(1, 8, 8), patch_size=2, hidden_size=48, depth=2, num_heads=4, cross_attention_dim=TEXT,
                  concat_channels=2)
    state = plain.state_dict()
    state["embed.weight"] = torch.cat([state["embed.weight"], torch.zeros(48, 8)], dim=1)
    widened.load_state_dict(state)
    x, extra = torch.randn(2, 1, 8, 8), torch.randn(2, 2, 8, 8)
    cond = text_cond(2)
    assert widened.input_channels == 3
    assert torch.allclose(widened.eval()(torch.cat([x, extra], 1), torch.tensor([5.0, 5.0]), cond),
                          plain(x, torch.tensor([5.0, 5.0]), cond), atol=1e-6)
    assert torch.count_nonzero(DiT(shape=(1, 8, 8), hidden_size=32, depth=1, num_heads=2,
                                   concat_channels=2).embed.weight[:, 4:]) == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    net = tiny((1, 8, 8)).train()
    x = torch.randn(2, 1, 8, 8)
    grads = []
    for flag in (False, True):
        net.gradient_checkpointing = flag
        net.zero_grad()
        net(x, torch.tensor([5.0, 700.0]), text_cond(2)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_save_load_round_trip(tmp_path):
    net = tiny((2, 5, 7, 6), patch_size=[1, 2, 2], joint_attention=True)
    net.save_pretrained(tmp_path)
    again = DiT(shape=(2, 5, 7, 6), patch_size=[1, 2, 2], hidden_size=48, depth=2, num_heads=4,
                cross_attention_dim=TEXT, joint_attention=True)
    again.load_pretrained(tmp_path)
    x = torch.randn(1, 2, 5, 7, 6)
    assert torch.equal(again.eval()(x, torch.tensor([9.0]), text_cond(1)), net(x, torch.tensor([9.0]), text_cond(1)))


def test_bad_settings_are_named():
    with pytest.raises(BackboneShapeError, match="patch_size must be a positive int or one per data axis"):
        DiT(shape=(1, 8, 8), patch_size=[2, 2, 2])
    with pytest.raises(BackboneShapeError, match="hidden_size=50 must be a multiple of num_heads=4"):
        DiT(shape=(1, 8, 8), hidden_size=50)
    net = DiT(shape=(1, 8, 8), hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(BackboneShapeError, match="built for items of shape"):
        net(torch.randn(1, 1, 8), torch.tensor([1.0]), None)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_every_sampler_runs_the_dit_on_every_rank(name, shape):
    denoiser = Denoiser(tiny(shape), VPrediction(VPSchedule("cosine", 1000))).eval()
    sigmas = VPSchedule("cosine", 1000).sigmas(3)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    out = SAMPLERS[name](denoiser, x, sigmas, cond=text_cond(2), generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_positions_reach_the_network():
    """Without positions a transformer is permutation-equivariant over its tokens; with RoPE, swapping
    two patches does not just swap their outputs."""
    net = tiny((1, 8, 8), cross_attention_dim=None)
    x = torch.randn(1, 1, 8, 8)
    tokens, grid = patchify(x, (2, 2))
    order = torch.arange(16)
    order[[0, 9]] = order[[9, 0]]

    def swap(t):
        toks, _ = patchify(t, (2, 2))
        return unpatchify(toks[:, order], grid, (2, 2), 1, (8, 8))

    t = torch.tensor([300.0])
    assert not torch.allclose(net(swap(x), t, None), swap(net(x, t, None)), atol=1e-4)
    net.rope_split = (0, 0)  # no rotated channels: the same network without positions is equivariant
    assert torch.allclose(net(swap(x), t, None), swap(net(x, t, None)), atol=1e-5)


def test_a_model_trained_at_one_length_generates_at_twice_that_length():
    """Axial RoPE gives relative positions only, so a DiT trained on 32-sample sines of period 8
    (random phase) generates 64-sample series whose every 32-sample stretch is such a sine: the
    dominant frequency right, the power in it, the amplitude of a unit sine. (The phase need not
    stay coherent across the whole doubled series: that is not what the model was shown.)"""
    from multidiff.core.denoiser import FlowVelocity
    from multidiff.core.noise import LogitNormalFlowSigma
    from multidiff.core.schedules import FlowSchedule

    torch.manual_seed(0)
    length, period = 32, 8
    net = DiT(shape=(1, length), patch_size=2, hidden_size=64, depth=2, num_heads=4)
    denoiser = Denoiser(net, FlowVelocity())
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    density, g = LogitNormalFlowSigma(), torch.Generator().manual_seed(0)
    for _ in range(400):
        phase = torch.rand(64, 1, 1, generator=g) * 2 * math.pi
        x0 = torch.sin(2 * math.pi * torch.arange(length) / period + phase)
        sigma = density.sample(64, generator=g)
        loss = denoiser.loss(x0, sigma, torch.randn(x0.shape, generator=g), None).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    sigmas = FlowSchedule().sigmas(25)
    for n in (length, 2 * length):
        x = torch.randn(64, 1, n, generator=torch.Generator().manual_seed(1)) * sigmas[0]
        with torch.no_grad():
            out = SAMPLERS["euler"](denoiser, x, sigmas)[:, 0]
        windows = out.unfold(-1, length, length // 2).reshape(-1, length)  # every half-overlapping stretch
        power = torch.fft.rfft(windows, dim=-1).abs()[:, 1:] ** 2  # without the mean
        right = power.argmax(-1) + 1 == length // period
        share = power[:, length // period - 1] / power.sum(-1)
        assert right.float().mean() >= 0.9, (n, right.float().mean())
        assert share.median() >= 0.8, (n, share.median())
        assert 0.5 <= out.std().item() <= 0.9, (n, out.std())  # a unit sine: std 0.71


def _frame_dependence(net: DiT, x: torch.Tensor, cond: Cond) -> float:
    """How much the first two frames' output moves when the last frames' input does."""
    with torch.no_grad():
        y = net(x, torch.tensor([0.5, 0.5]), cond)
        x2 = x.clone()
        x2[:, :, -2:] += 1.0
        return (net(x2, torch.tensor([0.5, 0.5]), cond)[:, :, :2] - y[:, :, :2]).abs().max().item()


def test_factorized_time_attends_within_frames_then_across_them():
    shape = (3, 8, 6, 6)
    x, cond = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2)), text_cond(2)
    net = tiny(shape, factorized_time=True)
    assert _frame_dependence(net, x, cond) > 1e-3  # the temporal attention carries information across frames
    for block in net.blocks:  # its adaLN-Zero gate closed: every frame is computed on its own
        with torch.no_grad():
            block.ada[1].weight[8 * 48:].zero_()
            block.ada[1].bias[8 * 48:].zero_()
    assert _frame_dependence(net, x, cond) == 0.0
    assert _frame_dependence(tiny(shape), x, cond) > 1e-3  # full attention mixes frames in every block
    fresh = DiT(shape=shape, patch_size=2, hidden_size=48, depth=2, num_heads=4, factorized_time=True)
    assert all(float(b.ada[1].weight.abs().sum()) == 0 for b in fresh.blocks)  # starts as the identity, as every gate


def test_factorized_time_skips_time_for_single_frames_and_keeps_other_ranks_whole():
    net = tiny((3, 8, 6, 6), factorized_time=True).train()
    out = net(torch.randn(2, 3, 1, 6, 6), torch.tensor([0.3, 0.6]), text_cond(2))  # sliced frames: clips of one
    out.square().mean().backward()
    assert out.shape == (2, 3, 1, 6, 6)
    assert all(b.time_attn.q.weight.grad is None for b in net.blocks)  # no temporal attention ran
    assert net.blocks[0].attn.q.weight.grad is not None
    image = tiny((1, 15, 9), factorized_time=True)  # not a clip: full attention, no error
    assert image(torch.randn(2, 1, 15, 9), torch.tensor([0.3, 0.6]), text_cond(2)).shape == (2, 1, 15, 9)
    with pytest.raises(BackboneShapeError, match="does not combine with joint_attention=true"):
        DiT(shape=(3, 8, 6, 6), factorized_time=True, joint_attention=True)
