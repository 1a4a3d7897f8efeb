"""The latent stage: its contract for every built-in option, the latent cache, and a latent model
trained and sampled through the real CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, multidiff_cli
from torch import nn

from multidiff.autoencoders import AutoencoderError, Identity, load_stage
from multidiff.autoencoders.conv import ConvAutoencoder
from multidiff.datasets.cache import LatentDataset, prepare_dataset

TINY_AE = {"channels": [8, 16], "norm_groups": 4, "latent_channels": 3}

# (data shape of one item, ConvAutoencoder options, expected latent shape)
CASES = [
    ((1, 32, 32), {}, (3, 16, 16)),
    ((2, 30, 17), {}, (3, 15, 9)),                         # sizes that are not multiples: padded
    ((2, 100), {}, (3, 50)),                               # 1-D signals
    ((1, 8, 16, 16), {}, (3, 4, 8, 8)),                    # 3-D clips, time downsampled too
    ((1, 8, 16, 16), {"down_axes": [1, 2]}, (3, 8, 8, 8)),  # 3-D, frames kept
    ((1, 5, 16, 18), {"per_frame": True}, (3, 5, 8, 9)),   # 2-D per frame
    ((1, 32, 32), {"bottleneck": "plain"}, (3, 16, 16)),
]


@pytest.mark.parametrize(("shape", "options", "latent"), CASES)
def test_conv_autoencoder_shapes_for_every_rank(shape, options, latent):
    torch.manual_seed(0)
    stage = ConvAutoencoder(shape=shape, **TINY_AE, **options)
    x = torch.randn(2, *shape)
    z = stage.encode(x)
    assert stage.latent_shape() == latent
    assert tuple(z.shape) == (2, *latent)
    assert tuple(stage.decode(z, shape=shape).shape) == (2, *shape)
    losses = stage.reconstruction_loss(x, noise=torch.randn_like(z))
    assert {k: tuple(v.shape) for k, v in losses.items()} == {"loss": (2,), "recon": (2,), "kl": (2,), "x_hat": (2, *shape)}


def test_per_frame_encodes_each_frame_alone():
    torch.manual_seed(0)
    stage = ConvAutoencoder(shape=(1, 4, 16, 16), per_frame=True, **TINY_AE)
    x = torch.randn(2, 1, 4, 16, 16)
    alone = torch.stack([stage.encode(x[:, :, t : t + 1]) for t in range(4)], 2).squeeze(3)
    assert torch.allclose(stage.encode(x), alone, atol=1e-6)


def test_identity_is_exact_and_free():
    stage = Identity(shape=(1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    assert stage.is_identity and stage.latent_shape() == (1, 8, 8)
    assert stage.encode(x) is x and stage.decode(x) is x
    assert not list(stage.parameters())


@pytest.mark.parametrize("mode", ["global", "channel"])
def test_scale_estimated_from_data_normalizes_latents(mode):
    torch.manual_seed(0)
    stage = ConvAutoencoder(shape=(1, 16, 16), scale_mode=mode, **TINY_AE)
    data = torch.randn(64, 1, 16, 16) * 3 + 1
    stage.requires_grad_(False)
    raw = stage.encode_raw(data)
    assert stage.needs_fit
    stage.fit_scale(raw)
    assert not stage.needs_fit
    z = stage.encode(data)
    if mode == "global":
        assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    else:
        per = z.transpose(0, 1).flatten(1)
        assert per.mean(1).abs().max() < 1e-4 and (per.std(1) - 1).abs().max() < 1e-3
    # decode undoes the normalization exactly
    assert torch.allclose(stage.decode(z), stage.decode_raw(raw), atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    stage = ConvAutoencoder(shape=(1, 8, 12, 12), per_frame=True, scale_mode="channel", **TINY_AE)
    x = torch.randn(2, 1, 8, 12, 12)
    stage.fit_scale(stage.encode_raw(x))
    stage.save_pretrained(tmp_path / "ae")
    again = load_stage(tmp_path / "ae")
    assert type(again) is ConvAutoencoder and again.options() == stage.options()
    assert torch.equal(again.encode(x), stage.encode(x))
    assert torch.equal(again.latent_scale, stage.latent_scale) and not again.needs_fit
    assert again.fingerprint() == stage.fingerprint()
    # other sizes with the same channels and rank: the shape given wins
    assert load_stage(tmp_path / "ae", shape=(1, 4, 8, 8)).latent_shape() == (3, 4, 4, 4)


def test_load_stage_builds_nothing_outside_the_package(tmp_path):
    (tmp_path / "stage.json").write_text(json.dumps({"target": "os.system", "shape": [1, 8], "options": {}}))
    with pytest.raises(AutoencoderError, match="outside multidiff.autoencoders"):
        load_stage(tmp_path)


def test_bad_options_are_one_paragraph_errors():
    with pytest.raises(AutoencoderError, match="per_frame=true needs clips"):
        ConvAutoencoder(shape=(1, 16, 16), per_frame=True)
    with pytest.raises(AutoencoderError, match="bottleneck='vq'"):
        ConvAutoencoder(shape=(1, 16, 16), bottleneck="vq")
    with pytest.raises(AutoencoderError, match="down_axes"):
        ConvAutoencoder(shape=(1, 16, 16), down_axes=[2])
    with pytest.raises(AutoencoderError, match="scale_mode='unit'"):
        ConvAutoencoder(shape=(1, 16, 16), scale_mode="unit")


class _Items(torch.utils.data.Dataset):
    def __init__(self, x, texts):
        self.x, self.texts = x, texts

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "text": self.texts[i]}


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_latent_cache_is_written_once_reused_and_keyed_by_both_encoders(tmp_path):
    from multidiff.conditioning.text import TextConditioner

    torch.manual_seed(0)
    data = _Items(torch.randn(20, 1, 16, 16), [f"caption {i % 3}" for i in range(20)])
    stage = ConvAutoencoder(shape=(1, 16, 16), **TINY_AE)
    encoder_calls = _count_calls(stage.encoder)
    text = TextConditioner()
    text_calls = _count_calls(text.model)

    first = prepare_dataset(data, stage, text, root=tmp_path, batch_size=8)
    assert isinstance(first, LatentDataset) and len(first) == 20 and encoder_calls[0] == 3 and text_calls[0] == 1
    assert torch.allclose(first.z, stage.encode_raw(data.x), atol=1e-6)
    assert not stage.needs_fit  # the scale was estimated from the cached latents
    assert len(list((tmp_path / "cache").glob("latents-*"))) == 1

    # a second run (fresh objects, same weights): everything from disk, nothing encoded
    again, text2 = ConvAutoencoder(shape=(1, 16, 16), **TINY_AE), TextConditioner()
    again.load_state_dict(stage.state_dict())
    again.scale_fitted.fill_(False)
    calls2, text_calls2 = _count_calls(again.encoder), _count_calls(text2.model)
    second = prepare_dataset(data, again, text2, root=tmp_path, batch_size=8)
    text2.encode(["caption 1", "caption 2"]), text2.null(2)
    assert calls2[0] == 0 and text_calls2[0] == 0
    assert torch.equal(second.z, first.z) and torch.equal(again.latent_scale, stage.latent_scale)

    # a changed autoencoder (one weight) or changed data: a new cache
    with torch.no_grad():
        again.decoder[0].weight.zero_()  # the decoder does not change the latents, but the key covers all weights
    prepare_dataset(data, again, None, root=tmp_path, batch_size=8)
    assert len(list((tmp_path / "cache").glob("latents-*"))) == 2
    changed = _Items(data.x.clone(), list(data.texts))
    changed.x[0, 0, 0, 0] += 1
    prepare_dataset(changed, again, None, root=tmp_path, batch_size=8)
    assert len(list((tmp_path / "cache").glob("latents-*"))) == 3


def test_identity_stage_leaves_the_dataset_alone(tmp_path):
    data = _Items(torch.randn(4, 1, 8, 8), ["a"] * 4)
    assert prepare_dataset(data, Identity(shape=(1, 8, 8)), None, root=tmp_path) is data
    assert not (tmp_path / "cache").exists()


def test_without_the_cache_the_scale_is_fitted_and_the_step_encodes(tmp_path):
    from multidiff.training.module import DiffusionModule

    torch.manual_seed(0)
    data = _Items(torch.randn(12, 1, 16, 16), ["a"] * 12)
    stage = ConvAutoencoder(shape=(1, 16, 16), **TINY_AE)
    assert prepare_dataset(data, stage, None, root=tmp_path, cache=False) is data and not stage.needs_fit
    module = SimpleNamespace(stage=stage)  # DiffusionModule.latents reads only the stage
    batch = {"x": data.x[:4], "text": ["a"] * 4}
    cached = {"z": stage.encode_raw(data.x[:4]), "text": ["a"] * 4}
    assert torch.allclose(DiffusionModule.latents(module, batch), DiffusionModule.latents(module, cached), atol=1e-6)
    assert torch.allclose(DiffusionModule.latents(module, batch), stage.encode(data.x[:4]))


# -- the CLI, end to end: autoencoder run -> latent diffusion run -> generate -------------------
AE_TINY = ["reconstruction.eval_items=16", "autoencoder.channels=[8,16]", "autoencoder.norm_groups=4",
           "data.batch_size=8", "trainer.max_steps=3", "+trainer.enable_progress_bar=false",
           "callbacks.checkpoint.every_n_steps=2"]


@pytest.fixture(scope="module")
def latent_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    data = f"data_root={root / 'data'}"
    multidiff_cli("train", "recipe=autoencoder_digits", f"run_dir={root / 'AE'}", data, *AE_TINY, "modality.size=16")
    ae = root / "AE" / "model"
    run = lambda name: multidiff_cli(  # noqa: E731
        "train", "recipe=image_digits_latent", f"autoencoder.path={ae}", f"run_dir={root / name}", data, *TINY,
        "modality.size=16")
    first, second = run("RUN"), run("RUN2")
    return root, first, second


def test_autoencoder_run_exports_and_measures(latent_runs):
    root, *_ = latent_runs
    info = json.loads((root / "AE" / "model" / "multidiff.json").read_text())
    assert info["format"] == "multidiff-autoencoder" and info["latent_shape"] == [4, 8, 8]
    metrics = json.loads((root / "AE" / "reconstruction.json").read_text())
    assert metrics["items"] == 16 and metrics["mse"] > 0 and metrics["data_shape"] == [1, 16, 16]
    assert (root / "AE" / "samples" / "reconstruction.png").is_file()
    assert "reconstruction/psnr" in (root / "AE" / "logs" / "metrics.csv").read_text()


def test_latent_model_trains_from_the_cache_and_generates(latent_runs, tmp_path):
    import numpy as np
    from PIL import Image

    root, first, second = latent_runs
    assert "encoding latents" in first.stderr and "encoding latents" not in second.stderr  # the cache was hit
    assert len(list((root / "data" / "cache").glob("latents-*"))) == 1
    model = root / "RUN" / "model"
    assert (model / "autoencoder" / "stage.json").is_file()
    multidiff_cli("generate", f"model={model}", "prompt=a handwritten digit seven", "num_samples=2", "steps=2",
                  f"out={tmp_path / 'out'}")
    image = np.asarray(Image.open(tmp_path / "out" / "0000.png"))
    assert image.shape[:2] == (16, 16)  # decoded through the stage to the modality's size, not the latent's 8x8


def test_export_is_self_contained_and_matches_the_checkpoint(latent_runs, tmp_path):
    import shutil

    import multidiff

    root, *_ = latent_runs
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "RUN" / "model", moved)
    shutil.rmtree(root / "AE.hidden", ignore_errors=True)
    (root / "AE").rename(root / "AE.hidden")  # the export must not need the autoencoder run any more
    try:
        exported = multidiff.load(moved, device="cpu")
        images = exported.generate("a handwritten digit one", steps=2, progress=False)
    finally:
        (root / "AE.hidden").rename(root / "AE")
    checkpoint = multidiff.load(root / "RUN" / "checkpoints" / "last.ckpt", device="cpu")
    assert torch.equal(exported.stage.latent_scale, checkpoint.stage.latent_scale)
    assert not exported.stage.needs_fit
    again = checkpoint.generate("a handwritten digit one", steps=2, progress=False)
    assert images.shape == (1, 1, 16, 16) and torch.allclose(images, again, atol=1e-5)


@pytest.mark.parametrize(("args", "expected"), [
    (["recipe=image_digits_latent", "autoencoder.path=/nonexistent/AE"], "autoencoder.path=/nonexistent/AE does not exist"),
    (["recipe=image_digits_latent"], "autoencoder.path"),
    (["task=autoencoder"], "is not trainable"),
    (["autoencoder=conv"], "is an untrained network: train it first"),
])
def test_latent_config_errors_are_one_paragraph(args, expected, tmp_path):
    proc = multidiff_cli("train", *args, f"run_dir={tmp_path / 'r'}", f"data_root={tmp_path / 'd'}", check=False)
    assert proc.returncode != 0 and expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_autoencoder_export_is_not_a_diffusion_model(latent_runs):
    import multidiff
    from multidiff.pipeline import ModelLoadError

    root, *_ = latent_runs
    with pytest.raises(ModelLoadError, match="is an autoencoder"):
        multidiff.load(root / "AE" / "model")
    with pytest.raises(AutoencoderError, match="is a diffusion model"):
        from multidiff.autoencoders.trained import trained

        trained(root / "RUN" / "model", shape=(1, 16, 16))


def test_reconstruction_options_agree_with_conf_train_yaml_and_check_values():
    import dataclasses

    from omegaconf import OmegaConf

    from multidiff.cli.compose import config_root
    from multidiff.options import OptionError
    from multidiff.training.autoencoder import ReconstructionOptions

    documented = OmegaConf.to_container(OmegaConf.load(config_root() / "conf" / "train.yaml").reconstruction)
    assert documented == {f.name: getattr(ReconstructionOptions(), f.name) for f in dataclasses.fields(ReconstructionOptions)}
    with pytest.raises(OptionError, match=r"reconstruction.kl_weight=-1 is invalid: it must be a number >= 0"):
        ReconstructionOptions.from_mapping({"kl_weight": -1})
    with pytest.raises(OptionError, match="reconstruction.loss"):
        ReconstructionOptions.from_mapping({"loss": "l3"})


# -- resume and DDP for both tasks -----------------------------------------------------------------
def _state(run, prefix):
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return state["global_step"], {k: v for k, v in state["state_dict"].items() if k.startswith(prefix)}


def _assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys() and a
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max difference {worst}"


def _ae_train(run, root, *extra, check=True):
    base = [o for o in AE_TINY if not o.startswith(("trainer.max_steps", "callbacks.checkpoint"))]
    return multidiff_cli("train", "recipe=autoencoder_digits", f"run_dir={run}", f"data_root={root / 'data'}", *base,
                         "modality.size=16", "reconstruction.eval_items=0", *extra, check=check)


def _latent_train(run, root, *extra, check=True):
    fast = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.checkpoint"))]
    return multidiff_cli("train", "recipe=image_digits_latent", f"autoencoder.path={root / 'AE' / 'model'}",
                         f"run_dir={run}", f"data_root={root / 'data'}", *fast, "modality.size=16",
                         "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false", *extra, check=check)


@pytest.mark.parametrize("task", ["autoencoder", "diffusion"])
def test_resume_after_a_signal_is_exact(latent_runs, tmp_path, task):
    root, *_ = latent_runs
    if task == "autoencoder":
        run_fn, prefixes = _ae_train, ("autoencoder.", "ema.")
    else:
        run_fn, prefixes = _latent_train, ("denoiser.", "ema.", "stage.")
    steps = ["trainer.max_steps=6", "callbacks.checkpoint.every_n_steps=3"]
    run_fn(tmp_path / "straight", root, *steps)
    proc = run_fn(tmp_path / "cut", root, *steps, "training.inject_signal_at_step=3")
    assert "stopped by signal at step 4" in proc.stdout
    run_fn(tmp_path / "cut", root, *steps, "resume=auto")
    for prefix in prefixes:
        step, resumed = _state(tmp_path / "cut", prefix)
        assert step == 6
        _assert_same(resumed, _state(tmp_path / "straight", prefix)[1])


@pytest.mark.parametrize("task", ["autoencoder", "diffusion"])
def test_ddp_two_processes_match_one(latent_runs, tmp_path, task):
    """Two processes at batch 4 train what one process trains at batch 8; for the latent model both
    processes read the one latent cache (written once, under the lock)."""
    root, *_ = latent_runs
    run_fn, prefix = (_ae_train, "autoencoder.") if task == "autoencoder" else (_latent_train, "denoiser.")
    run_fn(tmp_path / "single", root, "trainer.max_steps=3", "data.batch_size=8")
    proc = run_fn(tmp_path / "ddp", root, "trainer.max_steps=3", "trainer=ddp", "trainer.devices=2",
                  "trainer.accelerator=cpu", "data.batch_size=4")
    assert proc.stdout.count("run directory:") == 1
    _assert_same(_state(tmp_path / "single", prefix)[1], _state(tmp_path / "ddp", prefix)[1], atol=1e-5)
    if task == "diffusion":
        assert len(list((root / "data" / "cache").glob("latents-*"))) == 1


def test_previews_decode_through_the_stage(tmp_path):
    """The training previews sample latents and decode them with the module's stage before the adapter."""
    from multidiff.autoencoders.trained import export_autoencoder
    from multidiff.cli.compose import compose
    from multidiff.configuration import safe_instantiate
    from multidiff.pipeline import build_parts
    from multidiff.training.callbacks import SamplePreviews

    torch.manual_seed(0)
    ae = export_autoencoder(tmp_path / "AE", ConvAutoencoder(shape=(1, 16, 16), **TINY_AE), "modality: {}\n")
    cfg = compose("train", ["recipe=image_digits_latent", f"autoencoder.path={ae}", "modality.size=16",
                            "backbone=unet2d_tiny", "conditioning=labels"])
    parts = build_parts(cfg)
    seen = []
    decode = parts.adapter.decode
    parts.adapter.decode = lambda x: seen.append(tuple(x.shape)) or decode(x)  # record what the adapter is given
    callback = SamplePreviews(["3", "7"], num_per_prompt=1, steps=2).bind(
        adapter=parts.adapter, schedule=parts.schedule, sampler=safe_instantiate(cfg.sampler.fn), run_dir=tmp_path)
    module = SimpleNamespace(ema=parts.denoiser, conditioner=parts.conditioner, device=torch.device("cpu"),
                             stage=parts.stage)
    trainer = SimpleNamespace(global_step=5, is_global_zero=True, loggers=[])
    out = callback.write(trainer, module)
    assert out.is_file() and seen == [(1, 16, 16), (1, 16, 16)]  # data, not the (3, 8, 8) latents


def test_autoencoder_trains_in_bf16_mixed_precision(latent_runs, tmp_path):
    root, *_ = latent_runs
    _ae_train(tmp_path / "bf16", root, "trainer.max_steps=2", "trainer.precision=bf16-mixed",
              "callbacks.checkpoint.every_n_steps=0")
    step, state = _state(tmp_path / "bf16", "autoencoder.")
    assert step == 2 and all(torch.isfinite(v.float()).all() for v in state.values())
    assert (tmp_path / "bf16" / "model" / "autoencoder" / "model.safetensors").is_file()
