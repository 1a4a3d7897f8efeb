"""Backbones: one contract test over every conf/backbone config, the shape errors, the shared
conditioning vocabulary, old-config upgrades, and what is particular to the diffusers wrappers
(UNet2DCond's pad-and-crop, pooled path and coordinate channels; UNet3DCond's masking, labels,
temporal layers and inflation from an image model in prepare_training)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from multidiff.backbones.base import Backbone, BackboneShapeError, upgrade_backbone_config
from multidiff.backbones.conditioning import append_tokens, attention_bias, attention_context, class_labels
from multidiff.backbones.convunet import ConvUNet
from multidiff.backbones.diffusers_unet import DiffusersUNet
from multidiff.backbones.dit import DiT
from multidiff.backbones.unet import UNet2DCond
from multidiff.backbones.unet3d import InflationError, UNet3DCond
from multidiff.cli.compose import available, compose, config_root
from multidiff.configuration import safe_instantiate
from multidiff.core.cond import Cond
from multidiff.core.denoiser import Denoiser, VPrediction
from multidiff.core.noise import PerSampleGenerator
from multidiff.core.samplers import SAMPLERS
from multidiff.core.schedules import VPSchedule

BACKBONE_DIR = config_root() / "conf" / "backbone"
BACKBONES = available("backbone")
# one item per rank, with sizes that are neither square nor a multiple of the UNets' downsampling
SHAPES = {1: (2, 21), 2: (1, 12, 10), 3: (1, 3, 10, 6)}


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def build(name: str, shape, conditioning: str = "minilm", *, seed: int = 0) -> tuple[Backbone, dict]:
    """The backbone of ``conf/backbone/<name>.yaml`` (seeded), as the model builder makes it, and its resolved node."""
    cfg = compose("train", [f"backbone={name}", f"conditioning={conditioning}"])
    node = OmegaConf.to_container(cfg.backbone, resolve=True)
    torch.manual_seed(seed)
    net = safe_instantiate(cfg.backbone, shape=shape).eval()
    with torch.no_grad():  # as if trained: no zero-initialized layer (null tokens, temporal outputs) stays zero
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net, node


def target_class(name: str) -> type[Backbone]:
    target = OmegaConf.load(BACKBONE_DIR / f"{name}.yaml")._target_
    return {c.__name__: c for c in (UNet2DCond, UNet3DCond, ConvUNet, DiT)}[target.rsplit(".", 1)[1]]


def ranks_to_check(name: str) -> tuple[int, ...]:
    """The ranks a config's class takes; for an any-rank class (``ranks = ()``) 1, 2 and 3, and only 2
    for its GPU-sized config (the same class as the small one, 71 M parameters to build each time)."""
    return target_class(name).ranks or ((2,) if name.endswith("_base") else (1, 2, 3))


CASES = [(name, rank) for name in BACKBONES for rank in ranks_to_check(name)]


def text_cond(b: int, dim: int, *, seed: int = 1) -> Cond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False  # sample 0 has two padding tokens
    return Cond(tokens=torch.randn(b, 5, dim, generator=g), mask=mask, pooled=torch.randn(b, dim, generator=g))


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max() > 1e-5


# --- the contract, over every config -------------------------------------------------------------


def test_no_backbone_config_sizes_itself_from_the_modality():
    for path in BACKBONE_DIR.glob("*.yaml"):
        text = path.read_text()
        assert "${modality." not in text, path
        for old in ("in_channels", "sample_size", "dims:", "num_class_embeds", "pooled_cond", "norm_num_groups",
                    "attention_head_dim"):
            assert old not in text, f"{path.name} still names {old}"


def test_every_config_is_covered_for_every_rank_its_class_takes():
    assert {n for n, _ in CASES} == {p.stem for p in BACKBONE_DIR.glob("*.yaml")}
    assert UNet2DCond.ranks == (2,) and UNet3DCond.ranks == (3,) and ConvUNet.ranks == (1, 2, 3)


@pytest.mark.parametrize(("name", "rank"), CASES)
def test_backbone_contract_with_text(name, rank, tmp_path):
    """Output shaped like the input; padding tokens ignored, real ones and (with pooled_dim) the
    pooled vector heard; no condition works; save/load_pretrained round-trips exactly."""
    shape = SHAPES[rank]
    net, node = build(name, shape)
    assert isinstance(net, target_class(name)) and net.shape == shape
    dim = node["cross_attention_dim"]
    x, c = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([30.0, 700.0])
    cond = text_cond(2, dim)
    with torch.no_grad():
        y = net(x, c, cond)
        assert y.shape == x.shape and torch.isfinite(y).all()
        loud = cond.tokens.clone()
        loud[0, 3:] = 100.0  # only padding of sample 0 changes
        torch.testing.assert_close(net(x, c, Cond(tokens=loud, mask=cond.mask, pooled=cond.pooled)), y)
        assert differ(net(x, c, Cond(tokens=cond.tokens + 1, mask=cond.mask, pooled=cond.pooled)), y)
        other_pooled = net(x, c, Cond(tokens=cond.tokens, mask=cond.mask, pooled=-cond.pooled))
        assert differ(other_pooled, y) == (node["pooled_dim"] is not None), "pooled_dim decides if cond.pooled is heard"
        assert differ(net(x, c.flip(0), cond), y)
        none = net(x, c, None)
        assert none.shape == x.shape and torch.isfinite(none).all()
        if isinstance(net, DiffusersUNet) and node["pooled_dim"] is not None:
            # a missing pooled vector adds nothing: diffusers' bias-free projection of the zero vector
            torch.testing.assert_close(net(x, c, Cond(tokens=cond.tokens, mask=cond.mask)),
                                       net(x, c, Cond(tokens=cond.tokens, mask=cond.mask, pooled=torch.zeros(2, dim))))
    net.save_pretrained(tmp_path)
    again, _ = build(name, shape, seed=1)
    with torch.no_grad():
        assert differ(again(x, c, cond), y)  # other random weights until loaded
        again.load_pretrained(tmp_path)
        torch.testing.assert_close(again(x, c, cond), y, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "rank"), CASES)
def test_backbone_contract_with_labels(name, rank):
    """conditioning=labels (num_classes set): labels change the output; a condition without
    labels, or none at all, is the null label num_classes."""
    shape = SHAPES[rank]
    net, node = build(name, shape, conditioning="labels")
    n = node["num_classes"]
    assert n == 10
    x, c = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([30.0, 700.0])
    with torch.no_grad():
        y = net(x, c, Cond(labels=torch.tensor([1, 2])))
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert differ(net(x, c, Cond(labels=torch.tensor([3, 2])))[0], y[0])
        torch.testing.assert_close(net(x, c, Cond(labels=torch.tensor([3, 2])))[1], y[1])  # per sample
        null = net(x, c, Cond(labels=torch.full((2,), n)))
        torch.testing.assert_close(net(x, c, None), null)
        torch.testing.assert_close(net(x, c, Cond()), null)
        tokens = text_cond(2, node["cross_attention_dim"])
        torch.testing.assert_close(net(x, c, tokens), net(x, c, Cond(tokens=tokens.tokens, mask=tokens.mask,
                                                                   pooled=tokens.pooled, labels=torch.full((2,), n))))


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_refuses_ranks_it_does_not_take(name):
    cls = target_class(name)
    if not cls.ranks:  # any rank (the DiT): nothing to refuse, rank 4 included
        assert build(name, (1, 2, 3, 4, 5))[0].shape == (1, 2, 3, 4, 5)
        return
    for rank in sorted({1, 2, 3, 4} - set(cls.ranks)):
        shape = (1,) + (8,) * rank
        with pytest.raises(Exception) as err:  # noqa: PT011 -- Hydra wraps what the constructor raises
            build(name, shape)
        error = err.value.__cause__ or err.value
        assert isinstance(error, BackboneShapeError), repr(err.value)
        msg = str(error)
        assert cls.__name__ in msg and str(shape) in msg and f"rank {rank}" in msg, msg
        assert ("backbone=convunet1d" in msg) if rank == 1 else ("backbone=dit_small" in msg if rank == 4 else
                                                               "backbone=" in msg), msg


def test_shape_errors_name_the_class_the_shape_and_the_fix():
    with pytest.raises(BackboneShapeError, match=r"UNet2DCond was given items of shape \(2, 128\) \(rank 1.*"
                                                 r"takes items of rank 2 only; choose backbone=convunet1d"):
        UNet2DCond(shape=(2, 128))
    with pytest.raises(BackboneShapeError, match=r"UNet3DCond .* \(1, 16, 16\) .*rank 3 only; choose "
                                                 r"backbone=unet2d_small or backbone=convunet2d"):
        UNet3DCond(shape=(1, 16, 16))
    with pytest.raises(BackboneShapeError,
                       match=r"ConvUNet .*rank 4.*backbone=dit_small \(a transformer over patches of any rank\) takes rank-4"):
        ConvUNet(shape=(1, 2, 2, 2, 2))
    for bad in [(1,), (0, 8), (1, -2, 4)]:
        with pytest.raises(BackboneShapeError, match=r"ConvUNet was given items of shape .* every size >= 1"):
            ConvUNet(shape=bad)
    with pytest.raises(BackboneShapeError, match="shape=.*list of sizes"):
        ConvUNet(shape=None)
    assert issubclass(BackboneShapeError, ValueError)
    # a batch of another rank or channel count than the shape the backbone was built for
    net = ConvUNet(shape=(3, 16), channels=(8,), cross_attention_dim=None, norm_groups=4)
    with pytest.raises(BackboneShapeError, match=r"built for items of shape \(3, 16\).*\(B, 3, n\).*\(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2), None)
    with pytest.raises(BackboneShapeError, match=r"\(2, 2, 16\)"):
        net(torch.randn(2, 2, 16), torch.zeros(2), None)
    assert net(torch.randn(2, 3, 5), torch.zeros(2), None).shape == (2, 3, 5)  # other sizes are fine


def test_the_base_docstring_example_is_a_working_backbone(tmp_path):
    """The minimal backbone of Backbone's docstring, as written there."""
    import textwrap

    from torch import nn

    from multidiff.backbones.conditioning import NoiseEmbedding

    code = textwrap.dedent(Backbone.__doc__.split("::\n", 1)[1].split("\n\n    :class:")[0])
    scope = {"Backbone": Backbone, "nn": nn, "torch": torch, "NoiseEmbedding": NoiseEmbedding}
    exec(code, scope)  # noqa: S102 -- our own docstring
    net = scope["PointwiseNet"](shape=(2, 16), width=8)
    x = torch.randn(3, 2, 11)
    assert net(x, torch.rand(3), None).shape == x.shape
    net.save_pretrained(tmp_path)
    net.load_pretrained(tmp_path)
    with pytest.raises(BackboneShapeError, match="PointwiseNet .*rank 2.*rank 1 only"):
        scope["PointwiseNet"](shape=(1, 8, 8))


# --- the conditioning vocabulary -----------------------------------------------------------------


def test_conditioning_vocabulary():
    like = torch.zeros(2, 1, 4, dtype=torch.float64)
    torch.testing.assert_close(class_labels(None, batch=2, num_classes=7, device="cpu"), torch.tensor([7, 7]))
    torch.testing.assert_close(class_labels(Cond(labels=torch.tensor([1, 7])), batch=2, num_classes=7, device="cpu"),
                               torch.tensor([1, 7]))
    tokens, mask = attention_context(None, dim=3, like=like)  # nothing: one zero token
    assert tokens.shape == (2, 1, 3) and tokens.dtype == torch.float64 and not tokens.any() and mask is None
    cond = Cond(tokens=torch.ones(2, 2, 3), mask=torch.tensor([[1, 0], [1, 1]]))
    extra = torch.full((2, 1, 3), 5.0)
    tokens, mask = attention_context(cond, dim=3, like=like, extra=extra)
    assert tokens.shape == (2, 3, 3) and tokens.dtype == torch.float64 and tokens[:, 2].eq(5).all()
    assert mask.tolist() == [[True, False, True], [True, True, True]]
    assert append_tokens(None, None, extra) == (extra, None)
    assert append_tokens(torch.ones(2, 2, 3), None, extra)[1] is None
    bias = attention_bias(mask, dtype=torch.float32, repeat=2)
    assert bias.shape == (4, 1, 3) and bias[1, 0, 1] == -10000 and bias[0, 0, 0] == 0
    assert attention_bias(None, dtype=torch.float32) is None
    with pytest.raises(ValueError, match=r"width 4 but the backbone's cross_attention_dim is 3.*backbone.cross_attention_dim"):
        attention_context(Cond(tokens=torch.ones(2, 2, 4)), dim=3, like=like)


# --- configs written before the shape flowed down ------------------------------------------------

OLD_UNET2D = {"_target_": "multidiff.backbones.unet.UNet2DCond", "sample_size": [128, 16], "in_channels": 1,
              "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 32,
              "attention_head_dim": 4, "norm_num_groups": 8, "num_class_embeds": 10, "pooled_cond": True,
              "coord_axes": [0]}
OLD_UNET3D = {"_target_": "multidiff.backbones.unet3d.UNet3DCond", "sample_size": 16, "in_channels": 1,
              "block_out_channels": [16, 32], "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D"],
              "up_block_types": ["CrossAttnUpBlock3D", "UpBlock3D"], "layers_per_block": 1, "cross_attention_dim": 32,
              "attention_head_dim": 8, "norm_num_groups": 8, "num_class_embeds": None, "pooled_cond": False,
              "zero_init_temporal": None, "init_from": "/gone/image/model", "temporal_conv_depth": 2}
OLD_CONVUNET = {"_target_": "multidiff.backbones.convunet.ConvUNet", "dims": 1, "in_channels": 2, "channels": [8, 16],
                "cross_attention_dim": 32, "num_heads": 4, "pooled_dim": 32, "num_classes": None, "norm_groups": 4}


def test_upgrade_maps_old_keys_to_new_ones():
    old = dict(OLD_UNET2D)
    new = upgrade_backbone_config(old)
    assert old == OLD_UNET2D, "the input is not modified"
    assert new == {"_target_": "multidiff.backbones.unet.UNet2DCond", "block_out_channels": [16, 32],
                   "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                   "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
                   "cross_attention_dim": 32, "num_heads": 4, "norm_groups": 8, "num_classes": 10, "pooled_dim": 32,
                   "coord_axes": [0]}
    new3 = upgrade_backbone_config(OLD_UNET3D)
    assert new3["head_dim"] == 8 and new3["pooled_dim"] is None and "num_heads" not in new3
    assert upgrade_backbone_config(OLD_CONVUNET) == {k: v for k, v in OLD_CONVUNET.items() if k not in ("dims", "in_channels")}
    foreign = {"_target_": "my_pkg.Net", "in_channels": 3, "attention_head_dim": 2}
    assert upgrade_backbone_config(foreign) == foreign
    for name in BACKBONES:  # today's configs come back as they are
        node = OmegaConf.to_container(OmegaConf.load(BACKBONE_DIR / f"{name}.yaml"))
        assert upgrade_backbone_config(node) == node


@pytest.mark.parametrize(("old", "shape"), [(OLD_UNET2D, (1, 128, 16)), (OLD_UNET3D, (1, 4, 16, 16)),
                                            (OLD_CONVUNET, (2, 24))])
def test_old_config_builds_the_same_network_after_upgrade(old, shape, tmp_path):
    """Weights saved by a network built from the new keys load into one built from an upgraded old
    config (strict) and give the same output; a missing init_from file does not matter to a load."""
    new = upgrade_backbone_config(old)
    torch.manual_seed(0)
    a = safe_instantiate(OmegaConf.create(new), shape=shape).eval()
    a.save_pretrained(tmp_path)
    b = safe_instantiate(OmegaConf.create(upgrade_backbone_config(old)), shape=shape).eval()
    b.load_pretrained(tmp_path)
    x, c = torch.randn(2, *shape), torch.tensor([3.0, 400.0])
    cond = text_cond(2, old["cross_attention_dim"])
    with torch.no_grad():
        torch.testing.assert_close(a(x, c, cond), b(x, c, cond))
    if "attention_head_dim" in old:  # diffusers' own config keeps diffusers' name and value
        assert json.loads((tmp_path / "config.json").read_text())["attention_head_dim"] == old["attention_head_dim"]


# --- UNet2DCond ----------------------------------------------------------------------------------

TINY2D = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24, norm_groups=8,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def test_unet2d_pads_sizes_that_do_not_divide_and_keeps_others_identical():
    torch.manual_seed(0)
    net = UNet2DCond(shape=(1, 16, 16), block_out_channels=(8, 16, 16),
                     down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                     norm_groups=8).eval()
    assert net.size_multiple == 4
    cond = Cond(tokens=torch.randn(2, 3, 8), mask=torch.ones(2, 3, dtype=torch.bool))
    c = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        x = torch.randn(2, 1, 16, 16)
        raw = net.unet(x, c, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask.float(),
                       return_dict=False)[0]
        torch.testing.assert_close(net(x, c, cond), raw)  # divisible: exactly the plain UNet
        for h, w in [(16, 13), (15, 1), (5, 7)]:
            assert net(torch.randn(2, 1, h, w), c, cond).shape == (2, 1, h, w)
        # an odd size runs the UNet on the padded input and crops: the same as padding by hand
        odd = torch.randn(2, 1, 16, 13)
        padded = torch.nn.functional.pad(odd, (0, 3, 0, 0), mode="reflect")
        torch.testing.assert_close(net(odd, c, cond), net(padded, c, cond)[..., :13])


def test_unet2d_config_follows_the_shape_and_the_names():
    net = UNet2DCond(shape=(3, 128, 16), **TINY2D, num_heads=(2, 4), num_classes=5, pooled_dim=12)
    cfg = net.unet.config
    assert (cfg.in_channels, cfg.out_channels, tuple(cfg.sample_size)) == (3, 3, (128, 16))
    assert tuple(cfg.attention_head_dim) == (2, 4) and cfg.norm_num_groups == 8  # diffusers' names, our values
    assert cfg.num_class_embeds == 6 and cfg.time_cond_proj_dim == 12  # + the null label; pooled width
    square = UNet2DCond(shape=(1, 16, 16), **TINY2D, out_channels=2)
    assert square.unet.config.sample_size == 16  # an int when square, as configs before the shape flowed wrote it
    assert square(torch.randn(1, 1, 8, 8), torch.zeros(1), None).shape == (1, 2, 8, 8)  # any size runs


def test_unet2d_coord_axes_give_absolute_position():
    """``coord_axes=[0]``: the inner UNet receives a row-coordinate channel (-1 at the top row,
    1 at the bottom; the mel bin on a spectrogram), beside the input; bad axes are refused."""
    torch.manual_seed(0)
    kw = dict(shape=(1, 16, 16), block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_groups=8)
    net = UNet2DCond(**kw, coord_axes=[0]).eval()
    assert net.unet.config.in_channels == 2 and net.unet.config.out_channels == 1
    seen = []
    net.unet.conv_in.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x = torch.randn(3, 1, 16, 12)
    with torch.no_grad():
        assert net(x, torch.full((3,), 0.5), None).shape == (3, 1, 16, 12)
        torch.testing.assert_close(seen[0][:, :1], x)
        torch.testing.assert_close(seen[0][:, 1], torch.linspace(-1, 1, 16)[:, None].expand(3, 16, 12))
        assert net(torch.zeros(1, 1, 13, 7), torch.tensor([0.5]), None).shape == (1, 1, 13, 7)  # odd sizes pad
    for bad in ([2], [0, 0]):
        with pytest.raises(ValueError, match="coord_axes"):
            UNet2DCond(**kw, coord_axes=bad)


# --- UNet3DCond ----------------------------------------------------------------------------------

TINY3D = dict(shape=(1, 4, 8, 8), block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24,
              norm_groups=8, down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
              up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"), head_dim=4)


def _image_model(**kw) -> UNet2DCond:
    """A "trained" image model with TINY3D's layout: no zero-initialized layer stays zero."""
    torch.manual_seed(0)
    image = UNet2DCond(**dict(TINY2D, shape=(1, 8, 8), num_heads=(4, 8), **kw)).eval()
    with torch.no_grad():
        for p in image.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return image


def _cond(b: int = 2) -> Cond:
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]][:b]).bool()
    tokens = torch.randn(b, 6, 24, generator=g) * mask[..., None]
    return Cond(tokens=tokens, mask=mask, pooled=tokens.sum(1) / mask.sum(1, keepdim=True))


def test_unet3d_any_length_and_labels_as_a_token():
    torch.manual_seed(0)
    net = UNet3DCond(**TINY3D, num_classes=10).eval()
    assert net.unet.config.attention_head_dim == 4  # the head width, under diffusers' name
    x, c = torch.randn(2, 1, 3, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        assert net(torch.randn(1, 1, 7, 8, 8), c[:1], _cond().index(slice(0, 1))).shape == (1, 1, 7, 8, 8)
        label_only = net(x, c, Cond(labels=torch.tensor([3, 10])))
        torch.testing.assert_close(label_only[0], net(x, c, Cond(labels=torch.tensor([3, 4])))[0])
        assert differ(label_only[0], net(x, c, Cond(labels=torch.tensor([4, 10])))[0])
    with pytest.raises(BackboneShapeError, match=r"UNet3DCond was built for items of shape \(1, 4, 8, 8\)"):
        net(torch.randn(2, 1, 8, 8), c, None)


@pytest.fixture(scope="module")
def denoiser3d():
    torch.manual_seed(0)
    backbone = UNet3DCond(**TINY3D, pooled_dim=24).eval()
    with torch.no_grad():  # move the zero-initialized temporal outputs off zero so time matters
        for p in backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Denoiser(backbone, VPrediction(VPSchedule(beta_schedule="cosine", spacing="trailing")))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_unet3d_through_every_sampler(denoiser3d, name):
    sched = denoiser3d.parameterization.schedule
    sigmas = sched.sigmas(3)
    gen = PerSampleGenerator([5, 6])
    x = gen.randn((2, 1, 5, 8, 8)) * float(sigmas[0])
    steps = []
    out = SAMPLERS[name](denoiser3d, x, sigmas, cond=_cond(), generator=gen, callback=steps.append)
    assert out.shape == (2, 1, 5, 8, 8) and torch.isfinite(out).all()
    assert len(steps) == 3
    # per-sample seeds: sample 1 alone equals sample 1 of the batch
    gen1 = PerSampleGenerator([6])
    alone = SAMPLERS[name](denoiser3d, gen1.randn((1, 1, 5, 8, 8)) * float(sigmas[0]), sigmas,
                           cond=_cond().index(slice(1, 2)), generator=gen1)
    torch.testing.assert_close(alone, out[1:], atol=2e-3, rtol=2e-3)  # batch of 1 vs 2: other BLAS paths


def _temporal_outputs(net: UNet3DCond) -> list[float]:
    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    mods = list(net.unet.modules())
    convs = [m.conv4[-1].weight for m in mods if isinstance(m, TemporalConvLayer)]
    attns = [m.proj_out.weight for m in mods if isinstance(m, TransformerTemporalModel)]
    assert convs and attns
    return [float(w.detach().abs().max()) for w in convs + attns]


def test_temporal_layers_start_as_identity_only_when_inflating():
    """``zero_init_temporal=None``: random temporal layers from scratch (frames interact at once),
    identity ones when asked or when inflating; both set up by prepare_training, not before."""
    scratch = UNet3DCond(**TINY3D)
    scratch.prepare_training()
    assert min(_temporal_outputs(scratch)) > 0
    asked = UNet3DCond(**TINY3D, zero_init_temporal=True)
    asked.prepare_training()
    assert max(_temporal_outputs(asked)) == 0
    torch.manual_seed(0)
    net = UNet3DCond(**TINY3D).eval()
    clip = torch.randn(1, 1, 4, 16, 16)
    with torch.no_grad():  # with random temporal layers, changing frame 0 changes the output at frame 3
        a = net(clip, torch.tensor([0.5]), None)
        clip[:, :, 0] += 1.0
        b = net(clip, torch.tensor([0.5]), None)
    assert (a[:, :, 3] - b[:, :, 3]).abs().max() > 1e-5


def test_constructor_never_reads_init_from(tmp_path):
    """A trained model loads although the image model it was inflated from is gone; only
    prepare_training (training) reads it."""
    net = UNet3DCond(**TINY3D, init_from=str(tmp_path / "gone"))
    with pytest.raises(InflationError, match="holds no image model weights"):
        net.prepare_training()
    Backbone.prepare_training(net)  # the base hook does nothing
    ConvUNet(shape=(1, 8), channels=(8,), cross_attention_dim=None, norm_groups=4).prepare_training()


def test_inflated_video_model_starts_as_the_image_model_on_every_frame(tmp_path):
    image = _image_model()
    image.save_pretrained(tmp_path / "backbone")
    video = UNet3DCond(**TINY3D, init_from=str(tmp_path))  # RUN/model-style directory
    video.prepare_training()
    video.eval()
    b, t = 2, 5
    x, c, cond = torch.randn(b, 1, t, 8, 8), torch.tensor([30.0, 700.0]), _cond()
    with torch.no_grad():
        y = video(x, c, cond)
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 1, 8, 8)
        per_frame = image(frames, c.repeat_interleave(t), cond.repeat_interleave(t))
    torch.testing.assert_close(y, per_frame.reshape(b, t, 1, 8, 8).permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-4)
    assert y.abs().mean() > 0.1


def test_inflation_refuses_a_different_layout(tmp_path):
    UNet2DCond(**dict(TINY2D, shape=(1, 8, 8), block_out_channels=(16, 16))).save_pretrained(tmp_path)
    with pytest.raises(InflationError, match="same block_out_channels.*init_from=null"):
        UNet3DCond(**TINY3D, init_from=str(tmp_path)).prepare_training()


def test_unet3d_save_load_round_trip_with_label_tokens(tmp_path):
    torch.manual_seed(0)
    a = UNet3DCond(**TINY3D, num_classes=3)
    a.save_pretrained(tmp_path)
    assert (tmp_path / "label_tokens.safetensors").is_file() and (tmp_path / "config.json").is_file()
    b = UNet3DCond(**TINY3D, num_classes=3)
    b.load_pretrained(tmp_path)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


def test_lighter_temporal_layers_run_save_load_and_inflate(tmp_path):
    """temporal_conv_depth < 4 and input_temporal_attention=False remove temporal layers only: the
    backbone still runs any T, loads its own weights, and inflates an image model exactly."""
    from diffusers.models.resnet import TemporalConvLayer

    torch.manual_seed(0)
    full = UNet3DCond(**TINY3D)
    light = UNet3DCond(**TINY3D, temporal_conv_depth=2, input_temporal_attention=False)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(light) < count(full)
    assert not any(k.startswith("transformer_in.") for k in light.unet.state_dict())
    convs = [m for m in light.unet.modules() if isinstance(m, TemporalConvLayer)]
    assert convs and all(isinstance(m.conv2, torch.nn.Identity) and isinstance(m.conv3, torch.nn.Identity)
                         and not isinstance(m.conv1, torch.nn.Identity) for m in convs)
    x, c = torch.randn(2, 1, 3, 8, 8), torch.tensor([30.0, 700.0])
    with torch.no_grad():
        y = light.eval()(x, c, _cond())
    assert y.shape == x.shape
    light.save_pretrained(tmp_path / "light")
    again = UNet3DCond(**TINY3D, temporal_conv_depth=2, input_temporal_attention=False).eval()
    again.load_pretrained(tmp_path / "light")
    with torch.no_grad():
        torch.testing.assert_close(again(x, c, _cond()), y)
    image = _image_model()
    image.save_pretrained(tmp_path / "image" / "backbone")
    inflated = UNet3DCond(**TINY3D, temporal_conv_depth=1, input_temporal_attention=False,
                          init_from=str(tmp_path / "image"))
    inflated.prepare_training()
    frames = x.permute(0, 2, 1, 3, 4).reshape(6, 1, 8, 8)
    with torch.no_grad():
        per_frame = image(frames, c.repeat_interleave(3), _cond().repeat_interleave(3))
        torch.testing.assert_close(inflated.eval()(x, c, _cond()),
                                   per_frame.reshape(2, 3, 1, 8, 8).permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="temporal_conv_depth must be 1, 2, 3 or 4"):
        UNet3DCond(**TINY3D, temporal_conv_depth=5)
