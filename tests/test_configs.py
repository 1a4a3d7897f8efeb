"""Every config group file and every recipe composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from multidiff.cli.compose import ConfigError, available, compose, config_root
from multidiff.configuration import UnsafeConfigError, check_targets, safe_instantiate

ROOT = config_root()
GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
TINY = ["backbone=unet2d_tiny", "data.batch_size=4"]


def options():
    for group in GROUPS:
        for name in available(group):
            yield group, name


def test_every_group_has_options_and_every_file_is_covered():
    files = {(p.parent.name, p.stem) for p in (ROOT / "conf").glob("*/*.yaml")}
    assert files == set(options())
    assert {"modality", "backbone", "diffusion", "sampler", "conditioning", "data", "trainer", "callbacks", "logger"} <= set(GROUPS)


# Embedded data options: (their modality, small settings for a quick build, items then)
EMBEDDED_DATA = {
    "digits": ("image", {}, 1797),
    "notes": ("audio", {"low": "A4", "high": "A4", "variants": 1}, 5),
    "moving_digits": ("video", {"num_digits": 2}, 8),
}


def _build_model(cfg):
    from multidiff.pipeline import build_parts

    parts = build_parts(cfg)
    return parts


@pytest.mark.parametrize(("group", "name"), sorted(options()))
def test_group_option_composes_and_instantiates(group, name, tmp_path):
    config = "generate" if group == "sampler" else "train"
    # Hydra keeps the last override of a group: TINY's backbone=unet2d_tiny must not replace the one under test
    overrides = [f"{group}={name}"] + ([] if config == "generate" else [o for o in TINY if not o.startswith(f"{group}=")])
    if group == "data" and name == "folder":
        overrides.append(f"data.dataset.root={tmp_path}")
    if config == "generate":
        cfg = compose("generate", overrides + ["model=x", "out=y"])
        fn = safe_instantiate(cfg.sampler.fn)
        assert callable(fn) and cfg.sampler.name == name
        return
    cfg = compose("train", overrides)
    OmegaConf.resolve(cfg)
    node = cfg[group]
    if group in ("modality", "logger"):
        obj = safe_instantiate(node, **({"save_dir": str(tmp_path)} if group == "logger" else {}))
        assert obj is not None
    elif group == "backbone":  # the named file's class, built for each rank it takes as the model builder builds it
        import torch
        from hydra.utils import get_class

        file = OmegaConf.load(ROOT / "conf" / "backbone" / f"{name}.yaml")
        assert node._target_ == file._target_ and set(node) == set(file)
        cls = get_class(node._target_)
        for shape in [{1: (2, 24), 2: (1, 16, 12), 3: (1, 3, 8, 8)}[rank] for rank in cls.ranks or (1, 2, 3)]:  # () = any
            net = safe_instantiate(node, shape=shape)
            assert type(net) is cls and net.shape == shape
            x = torch.randn(2, *shape)
            with torch.no_grad():
                assert net(x, torch.tensor([1.0, 500.0]), None).shape == x.shape
    elif group == "autoencoder":
        _check_autoencoder_option(name, node, tmp_path)
    elif group == "diffusion":
        for key in ("schedule", "parameterization", "noise"):
            assert safe_instantiate(node[key]) is not None
        assert len(safe_instantiate(node.schedule).sigmas(4)) == 5
    elif group == "conditioning":
        enc = safe_instantiate(node.encoder)
        assert len(enc.null(2)) == 2
    elif group == "data" and name in EMBEDDED_DATA:
        # the dataset takes its shape from the adapter of its modality, as the training builder passes it
        modality, small, count = EMBEDDED_DATA[name]
        adapter = safe_instantiate(compose("train", [f"modality={modality}"]).modality)
        ds = safe_instantiate(node.dataset, root=str(tmp_path), adapter=adapter, **small)
        assert len(ds) == count and ds[0]["x"].shape == tuple(adapter.shape)
    elif group == "data":
        assert node.dataset._target_.startswith("multidiff.")
    elif group == "trainer":
        import lightning as L
        import torch

        kwargs = OmegaConf.to_container(node)
        if kwargs["accelerator"] == "gpu" and not torch.cuda.is_available():
            kwargs["accelerator"] = "cpu"  # what can be checked here: every other argument is accepted
            if kwargs["strategy"] == "fsdp":
                kwargs["strategy"] = "ddp"
        trainer = L.Trainer(**kwargs, default_root_dir=str(tmp_path), logger=False)
        assert trainer.max_steps == node.max_steps
    elif group == "editing":  # the model builder gives a mask-conditioned backbone its extra input channels
        from multidiff.pipeline import build_parts

        cfg.conditioning = compose("train", ["conditioning=labels"]).conditioning
        backbone = build_parts(cfg).denoiser.backbone
        assert backbone.concat_channels == (2 if node.mask_conditioning else 0)  # [keep, keep * x] of 1-channel digits
    elif group == "callbacks":
        if "samples" in node:
            assert safe_instantiate(node.samples) is not None


def _tiny_autoencoder_export(directory: Path, shape) -> Path:
    """A tiny untrained ConvAutoencoder exported as a task=autoencoder run exports it."""
    from multidiff.autoencoders.conv import ConvAutoencoder
    from multidiff.autoencoders.trained import export_autoencoder

    stage = ConvAutoencoder(shape=shape, channels=[8, 16], norm_groups=4)
    return export_autoencoder(directory, stage, "modality: {}\n")


def _check_autoencoder_option(name, node, tmp_path):
    """Every autoencoder option builds for every data rank it takes and keeps the stage's shape contract."""
    import torch

    shapes = {1: (1, 24), 2: (1, 16, 12), 3: (1, 3, 8, 8)}
    ranks = {"identity": (1, 2, 3), "conv": (1, 2, 3), "perframe": (3,), "trained": (2,), "diffusers": (2,)}[name]
    for rank in ranks:
        shape = shapes[rank]
        if name == "trained":
            node.path = str(_tiny_autoencoder_export(tmp_path / f"ae{rank}", shape))
        if name == "diffusers":
            from diffusers import AutoencoderKL

            AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          latent_channels=4).save_pretrained(tmp_path / "vae")
            node.path = str(tmp_path / "vae")
        stage = safe_instantiate(node, shape=shape)
        x = torch.randn(2, *shape)
        with torch.no_grad():
            z = stage.encode(x)
            assert tuple(z.shape) == (2, *stage.latent_shape()) and stage.decode(z, shape=shape).shape == x.shape


@pytest.mark.parametrize("recipe", available("recipes"))
def test_recipe_composes_and_builds(recipe, tmp_path):
    from multidiff.cli.train import build

    overrides = [f"recipe={recipe}", f"data_root={tmp_path}"]
    names = list(compose("train", overrides).get("modalities") or {})
    if names:  # one model of several modalities: each batch is one modality's
        _check_modalities_recipe(overrides, names, tmp_path)
        return
    if "num_digits" in compose("train", overrides).data.dataset:  # 80 clips, not 7,188: the build is the point here
        overrides.append("data.dataset.num_digits=20")
    if OmegaConf.is_missing(compose("train", overrides).autoencoder, "path"):  # a latent recipe: its autoencoder run first
        shape = tuple(safe_instantiate(compose("train", overrides).modality).shape)
        overrides.append(f"autoencoder.path={_tiny_autoencoder_export(tmp_path / 'AE', shape)}")
    cfg = compose("train", overrides)
    parts, module, datamodule, trainer = build(cfg, Path(tmp_path) / "run")
    assert trainer.max_steps == cfg.trainer.max_steps > 0
    assert tuple(parts.adapter.shape)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert len(batch["text"]) == cfg.data.batch_size
    if parts.stage is None or parts.stage.is_identity or cfg.task == "autoencoder":
        assert batch["x"].shape[1:] == tuple(parts.adapter.shape)
    else:  # latents from the cache
        assert batch["z"].shape[1:] == parts.stage.latent_shape() == module.denoiser.backbone.shape


def _check_modalities_recipe(overrides: list[str], names: list[str], tmp_path) -> None:
    from multidiff.cli.train import build

    cfg = compose("train", overrides)
    overrides += [f"modalities.{n}.data.dataset.num_digits=20" for n in names
                  if "num_digits" in cfg.modalities[n].data.dataset]
    cfg = compose("train", overrides)
    parts, module, datamodule, trainer = build(cfg, Path(tmp_path) / "run")
    assert trainer.max_steps == cfg.trainer.max_steps > 0 and parts.name == names[0]
    backbone = module.denoiser.backbone
    assert list(backbone.modalities) == names
    datamodule.setup()
    seen = set()
    for batch, _ in zip(datamodule.train_dataloader(), range(60)):  # weights may make one modality rare
        name = names[batch["modality"]]
        seen.add(name)
        assert len(batch["text"]) == cfg.modalities[name].data.batch_size
        assert batch["x"].shape[1:] == backbone.modalities[name].shape
        if seen == set(names):
            break
    assert seen == set(names)


def test_command_line_overrides_win_over_recipe():
    cfg = compose("train", ["recipe=image_digits", "trainer.max_steps=3", "optimizer.lr=0.01"])
    assert cfg.trainer.max_steps == 3 and cfg.optimizer.lr == 0.01


def test_unknown_key_and_option_errors():
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lrr'"):
        compose("train", ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown backbone 'huge'; valid choices: .*unet2d_small, unet2d_tiny"):
        compose("train", ["backbone=huge"])


def test_allow_list_refuses_foreign_targets():
    check_targets(OmegaConf.create({"a": {"_target_": "multidiff.core.schedules.KarrasSchedule"}}))
    bad = OmegaConf.create({"a": {"b": [{"_target_": "os.system", "_args_": ["echo hi"]}]}})
    with pytest.raises(UnsafeConfigError, match=r"a\.b\[0\]\._target_: os.system"):
        safe_instantiate(bad)
    check_targets(bad, trusted=["os."])  # explicit opt-in


@pytest.mark.parametrize(("recipe", "shift"), [("image_digits", 1.0), ("audio_notes", 3.0), ("video_moving_digits", 3.0)])
def test_recipes_set_the_schedule_shift_their_benchmarks_measured(recipe, shift):
    """The audio and video recipes train and sample on sigmas x3 (docs/audio.md, docs/video.md); the
    shift reaches the training density and the exported model's sampling grid through one schedule."""
    from multidiff.pipeline import build_parts

    cfg = compose("train", [f"recipe={recipe}"])
    assert cfg.diffusion.schedule.shift == shift
    parts = build_parts(cfg)
    assert parts.schedule.shift == shift and parts.denoiser.parameterization.schedule.shift == shift
    noise = safe_instantiate(cfg.diffusion.noise)
    assert noise.schedule.shift == shift


def test_callbacks_none_switches_off_the_previews_a_recipe_tunes(tmp_path):
    """The video recipe sets callbacks.samples.every_n_steps; callbacks=none leaves that key without
    a _target_, which must mean "no previews", not a crash when the run is built."""
    from multidiff.cli.train import build
    from multidiff.training.callbacks import SamplePreviews

    overrides = ["recipe=video_moving_digits", "callbacks=none", f"data_root={tmp_path}",
                 "backbone=unet3d_tiny", "data.dataset.num_digits=20"]
    cfg = compose("train", overrides)
    assert "_target_" not in cfg.callbacks.samples  # the recipe's tweak survives, alone
    _, _, _, trainer = build(cfg, Path(tmp_path) / "run")
    assert not any(isinstance(cb, SamplePreviews) for cb in trainer.callbacks)
    cfg = compose("train", overrides[:1] + overrides[2:])
    _, _, _, trainer = build(cfg, Path(tmp_path) / "run2")
    assert any(isinstance(cb, SamplePreviews) for cb in trainer.callbacks)
