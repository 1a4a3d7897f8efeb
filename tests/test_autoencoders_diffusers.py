"""DiffusersAutoencoder: tiny random-weight diffusers autoencoders, saved locally, as the latent stage.

Every number is compared with what diffusers' own model (loaded from the same directory) returns:
posterior modes, decodes, the pipelines' latent scaling, and the shapes that fix the factors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from multidiff.autoencoders import AutoencoderError, load_stage
from multidiff.autoencoders.diffusers_vae import DiffusersAutoencoder
from multidiff.cli.compose import config_root
from multidiff.configuration import check_config, safe_instantiate

pytestmark = pytest.mark.usefixtures("single_thread")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
SCALING, SHIFT = 0.5, 0.1  # non-default, so a dropped shift or scale shows
WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]


def _save(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _kl(**config):
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
        **config,
    )


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models: ``kl`` (scaling 0.5, shift 0.1), ``kl_stats`` (latents_mean/std), ``oobleck``, ``wan``."""
    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    return {
        "kl": _save(_kl(scaling_factor=SCALING, shift_factor=SHIFT), root / "kl"),
        "kl_stats": _save(_kl(scaling_factor=SCALING, latents_mean=WAN_MEAN, latents_std=WAN_STD), root / "kl_stats"),
        "oobleck": _save(diffusers.AutoencoderOobleck(
            encoder_hidden_size=8, downsampling_ratios=[2, 4], channel_multiples=[1, 2], decoder_channels=8,
            decoder_input_channels=4, audio_channels=2), root / "oobleck"),
        "wan": _save(diffusers.AutoencoderKLWan(
            base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            latents_mean=WAN_MEAN, latents_std=WAN_STD), root / "wan"),
        # Wan 2.2 style: patchify folds 2 x 2 pixels into 12 input channels, so 3-channel data and 16x space
        "wan22": _save(diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
            latents_mean=WAN_MEAN, latents_std=WAN_STD), root / "wan22"),
    }


def _reference(dirs, name: str):
    cls = {"kl": diffusers.AutoencoderKL, "kl_stats": diffusers.AutoencoderKL, "oobleck": diffusers.AutoencoderOobleck,
           "wan": diffusers.AutoencoderKLWan, "wan22": diffusers.AutoencoderKLWan}[name]
    return cls.from_pretrained(dirs[name], local_files_only=True, use_safetensors=True).eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL


@torch.no_grad()
def test_kl_matches_diffusers_encode_decode_and_pipeline_scaling(dirs):
    stage, vae = DiffusersAutoencoder(shape=(3, 16, 12), path=dirs["kl"]), _reference(dirs, "kl")
    assert not stage.model.training and not any(p.requires_grad for p in stage.model.parameters())
    assert not stage.needs_fit
    x = torch.randn(2, 3, 16, 12)
    mode = vae.encode(x).latent_dist.mode()
    _close(stage.encode_raw(x), mode)
    _close(stage.encode(x), (mode - SHIFT) * SCALING)  # SD3/Flux pipelines
    z = torch.randn(2, 4, 8, 6)
    _close(stage.decode(z), vae.decode(z / SCALING + SHIFT).sample)


@torch.no_grad()
def test_kl_latents_mean_std_scale_as_the_sdxl_pipeline(dirs):
    stage, vae = DiffusersAutoencoder(shape=(3, 16, 12), path=dirs["kl_stats"]), _reference(dirs, "kl_stats")
    mean, std = torch.tensor(WAN_MEAN).view(1, 4, 1, 1), torch.tensor(WAN_STD).view(1, 4, 1, 1)
    x = torch.randn(2, 3, 16, 12)
    _close(stage.encode(x), (vae.encode(x).latent_dist.mode() - mean) * SCALING / std)
    z = torch.randn(2, 4, 8, 6)
    _close(stage.decode(z), vae.decode(z * std / SCALING + mean).sample)


# (model, item shape, per_frame, expected factors, expected latent shape): the factors are read from the
# config; the latent shape is what the real network returns (hand-checked), and test_shapes compares both.
SHAPES = [
    ("kl", (3, 16, 12), False, (2, 2), (4, 8, 6)),
    ("kl", (3, 13, 11), False, (2, 2), (4, 7, 6)),  # padded to 14 x 12
    ("kl", (3, 3, 16, 10), True, (1, 2, 2), (4, 3, 8, 5)),
    ("oobleck", (2, 64), False, (8,), (4, 8)),
    ("oobleck", (2, 61), False, (8,), (4, 8)),  # padded to 64
    ("wan", (3, 5, 16, 16), False, (4, 8, 8), (4, 2, 2, 2)),  # causal: 1 + (5 - 1) / 4 frames
    ("wan", (3, 1, 8, 8), False, (4, 8, 8), (4, 1, 1, 1)),
    ("wan", (3, 7, 12, 16), False, (4, 8, 8), (4, 3, 2, 2)),  # padded to 9 x 16 x 16
    ("wan22", (3, 5, 20, 16), False, (4, 16, 16), (4, 2, 2, 1)),  # padded to 5 x 32 x 16
]


@pytest.mark.parametrize(("name", "shape", "per_frame", "factors", "latent"), SHAPES)
@torch.no_grad()
def test_shapes(dirs, name, shape, per_frame, factors, latent):
    stage = DiffusersAutoencoder(shape=shape, path=dirs[name], per_frame=per_frame)
    assert stage.factors == factors and stage.latent_shape() == latent
    x = torch.rand(2, *shape) * 2 - 1
    z = stage.encode(x)
    assert tuple(z.shape) == (2, *stage.latent_shape())
    padded = stage.pad(x)
    assert stage.decode(z).shape == padded.shape  # the decoder inverts every factor exactly
    assert stage.decode(z, shape).shape == x.shape
    tail = (slice(None), slice(None), *(slice(0, d) for d in shape[1:]))
    assert torch.equal(padded[tail], x)  # padding only at the end of each axis


@torch.no_grad()
def test_per_frame_equals_encoding_each_frame(dirs):
    clips = DiffusersAutoencoder(shape=(3, 3, 16, 12), path=dirs["kl"], per_frame=True)
    images = DiffusersAutoencoder(shape=(3, 16, 12), path=dirs["kl"])
    x = torch.randn(2, 3, 3, 16, 12)
    z = clips.encode(x)
    x_hat = clips.decode(z)
    for t in range(3):
        _close(z[:, :, t], images.encode(x[:, :, t]))
        _close(x_hat[:, :, t], images.decode(z[:, :, t]))


@torch.no_grad()
def test_oobleck_matches_diffusers(dirs):
    stage, vae = DiffusersAutoencoder(shape=(2, 61), path=dirs["oobleck"]), _reference(dirs, "oobleck")
    assert torch.equal(stage.latent_shift, torch.zeros(4)) and torch.equal(stage.latent_scale, torch.ones(4))
    x = torch.randn(3, 2, 61)
    padded = torch.cat([x, x[..., -1:].expand(-1, -1, 3)], -1)
    _close(stage.encode(x), vae.encode(padded).latent_dist.mode())
    z = torch.randn(3, 4, 8)
    _close(stage.decode(z, (2, 61)), vae.decode(z).sample[..., :61])


@pytest.mark.parametrize("name", ["wan", "wan22"])
@torch.no_grad()
def test_wan_matches_diffusers(dirs, name):
    stage, vae = DiffusersAutoencoder(shape=(3, 5, 16, 16), path=dirs[name]), _reference(dirs, name)
    time, space = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    assert stage.factors == (time, space, space)  # this config's metadata agrees with its architecture
    mean, std = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1), torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    _close(stage.encode(x), (vae.encode(x).latent_dist.mode() - mean) / std)  # the Wan pipeline's normalization
    z = torch.randn(1, 4, *stage.latent_shape()[1:])
    _close(stage.decode(z), vae.decode(z * std + mean).sample)


@pytest.mark.parametrize(("name", "shape", "scale_mode"), [
    ("kl", (3, 16, 12), "pretrained"), ("kl", (3, 2, 16, 12), "channel"), ("oobleck", (2, 64), "global"),
])
@torch.no_grad()
def test_save_and_load_stage_round_trip(dirs, tmp_path, name, shape, scale_mode):
    per_frame = len(shape) == 4
    stage = DiffusersAutoencoder(shape=shape, path=dirs[name], per_frame=per_frame, scale_mode=scale_mode)
    x = torch.randn(3, *shape)
    if scale_mode != "pretrained":
        assert stage.needs_fit
        stage.fit_scale(stage.encode_raw(x))
        assert not stage.needs_fit and not torch.equal(stage.latent_shift, torch.zeros(4))
    stage.save_pretrained(tmp_path / "stage")
    info = json.loads((tmp_path / "stage" / "stage.json").read_text())
    assert info == {"target": "multidiff.autoencoders.diffusers_vae.DiffusersAutoencoder", "shape": list(shape),
                    "options": {"per_frame": per_frame, "scale_mode": scale_mode}}
    assert set(load_file(tmp_path / "stage" / "model.safetensors")) == {"latent_shift", "latent_scale", "scale_fitted"}
    loaded = load_stage(tmp_path / "stage")
    assert type(loaded) is DiffusersAutoencoder and loaded.path == tmp_path / "stage" / "diffusers"
    for key, value in stage.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.fingerprint() == stage.fingerprint()
    z = stage.encode(x)
    assert torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z, shape), stage.decode(z, shape))


def test_config_file_builds_the_stage(dirs):
    node = OmegaConf.load(config_root() / "conf" / "autoencoder" / "diffusers.yaml")
    assert OmegaConf.is_missing(node, "path") and not node.per_frame and node.scale_mode == "pretrained"
    node.path = str(dirs["kl"])
    check_config(node, shape=(3, 16, 12))
    stage = safe_instantiate(node, shape=(3, 16, 12))
    assert isinstance(stage, DiffusersAutoencoder)
    assert stage.options() == {"per_frame": False, "scale_mode": "pretrained"}
    with pytest.raises(AutoencoderError, match="per_frame=true"):
        check_config(node, shape=(3, 2, 16, 12))  # checked before any weight is read


def test_errors_name_the_setting(dirs, tmp_path):
    def fails(match: str, **kwargs) -> str:
        with pytest.raises(AutoencoderError, match=match) as info:
            DiffusersAutoencoder(**{"shape": (3, 16, 16), **kwargs})
        return str(info.value)

    fails(r"autoencoder\.path=.*missing is not a directory", path=tmp_path / "missing")
    fails(r"autoencoder\.path=.* holds no config\.json", path=tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    message = fails(r"'UNet2DModel'", path=tmp_path / "unet")
    assert "AutoencoderKL, AutoencoderOobleck, AutoencoderKLWan" in message and "autoencoder.path" in message
    fails(r"autoencoder\.path=.*AutoencoderKL.*rank 1.*rank-1 data", path=dirs["kl"], shape=(3, 64))
    fails(r"AutoencoderKL.*\(3, 4, 16, 16\).*set autoencoder\.per_frame=true", path=dirs["kl"], shape=(3, 4, 16, 16))
    fails(r"AutoencoderOobleck.*signals", path=dirs["oobleck"], shape=(2, 16, 16))
    fails(r"per_frame=true.*AutoencoderKLWan.*per_frame=false", path=dirs["wan"], shape=(3, 5, 16, 16), per_frame=True)
    fails(r"autoencoder\.path=.*3-channel data.*gives 1 channels", path=dirs["kl"], shape=(1, 16, 16))
    fails(r"autoencoder\.path=.*2-channel data.*gives 1 channels", path=dirs["oobleck"], shape=(1, 64))
    fails(r"scale_mode='bogus'", path=dirs["kl"], scale_mode="bogus")
    (tmp_path / "wan_odd").mkdir()  # encoder halves time once, decoder doubles it twice: nothing to crop by
    (tmp_path / "wan_odd" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKLWan", "dim_mult": [1, 1, 1], "temperal_downsample": [False, True, True]}))
    fails(r"compresses time by 2 on encode but 4 on decode.*autoencoder\.path", path=tmp_path / "wan_odd",
          shape=(3, 5, 16, 16))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((dirs["kl"] / "config.json").read_text())
    fails(r"autoencoder\.path=.*no_weights.*weights cannot be loaded.*safe_serialization", path=tmp_path / "no_weights")
