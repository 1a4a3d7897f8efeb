"""Editing through the pipeline and the CLI, in every modality: regions mapped to masks, the known
region of a sample equal to the input (exactly in pixel space, latent models included), strength 0
and 1, one-paragraph errors for bad requests, and mask-conditioned training through the real CLI.

The pipelines here have random weights (built from the recipes with tiny backbones and label
conditioning): what is checked does not depend on what a model has learnt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import TINY, multidiff_cli
from PIL import Image

from multidiff.adapters.audio import AudioAdapter
from multidiff.adapters.image import ImageAdapter
from multidiff.adapters.video import VideoAdapter, read_video, write_video
from multidiff.cli.compose import compose
from multidiff.pipeline import GenerationError, Pipeline, build_parts

pytestmark = pytest.mark.usefixtures("single_thread")


def _pipeline(*overrides: str) -> Pipeline:
    torch.manual_seed(0)
    cfg = compose("train", [*overrides, "conditioning=labels"])
    return Pipeline(build_parts(cfg), config=cfg, device="cpu")


@pytest.fixture(scope="module")
def image_pipe():
    return _pipeline("recipe=image_digits", "backbone=unet2d_tiny")


def _png(path, array: np.ndarray):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit_image")
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16))
    lower = np.zeros((16, 16)); lower[8:] = 255  # noqa: E702
    return {"init": _png(d / "init.png", pixels), "pixels": pixels, "lower": _png(d / "lower.png", lower),
            "black": _png(d / "black.png", np.zeros((16, 16))), "white": _png(d / "white.png", np.full((16, 16), 255)),
            "small": _png(d / "small.png", np.zeros((8, 8))), "dir": d}


# -- regions -> masks ------------------------------------------------------------------------------

def test_image_regions_map_through_the_input_geometry():
    adapter = ImageAdapter(size=16)
    raw = torch.rand(1, 32, 48)  # resized to 16x24, then the middle 16 columns cropped
    mask = torch.zeros(1, 32, 48)
    mask[:, 16:, :] = 1  # the lower half of the input
    keep = adapter.keep_mask((1, 16, 16), raw=raw, mask=mask)
    assert keep.shape == (1, 16, 16) and keep[:, :8].eq(1).all() and keep[:, 8:].eq(0).all()
    mask = torch.zeros(1, 32, 48)
    mask[:, :, :8] = 1  # the 8 leftmost input columns are cropped away: nothing of them reaches the output
    assert adapter.keep_mask((1, 16, 16), raw=raw, mask=mask).eq(1).all()
    mask[:, :, :12] = 1  # 4 more input columns: 2 output columns
    assert adapter.keep_mask((1, 16, 16), raw=raw, mask=mask)[0].sum(0).tolist() == [0] * 2 + [16] * 14
    box = adapter.keep_mask((1, 16, 16), raw=raw, fill_box=[2, 3, 5, 9])
    assert box[0, 2:5, 3:9].eq(0).all() and box.sum() == 256 - 18
    assert adapter.keep_mask((1, 16, 16), keep_box=[0, 0, 16, 8])[0, :, 8:].eq(0).all()
    assert adapter.keep_mask((1, 16, 16), raw=raw) is None


def test_audio_spans_map_to_spectrogram_frames():
    adapter = AudioAdapter()  # 16 kHz, hop 1024: a frame is 64 ms
    raw = torch.zeros(1, 16000)  # 1.0 s: 15 whole frames and a partial one
    shape = adapter.sample_shape(duration=1.5)
    assert shape == (1, 128, 24)
    keep = adapter.keep_mask(shape, raw=raw, keep_seconds=[0, 0.5])[0, 0]
    assert keep.tolist() == [1.0] * 7 + [0.0] * 17  # 7 frames (0.448 s) lie wholly inside 0-0.5 s
    keep = adapter.keep_mask(shape, raw=raw, fill_seconds=[0.3, 0.6])[0, 0]
    assert keep.tolist() == [1.0] * 4 + [0.0] * 6 + [1.0] * 5 + [0.0] * 9  # 4..9 touch the gap; 15.. pass the input
    keep = adapter.keep_mask(shape, raw=raw, keep_seconds=[[0, 0.25], [0.5, 1.0]])[0, 0]
    assert keep[:3].eq(1).all() and keep[3:8].eq(0).all() and keep[8:15].eq(1).all() and keep[15:].eq(0).all()
    with pytest.raises(ValueError, match="past the end of the sample"):
        adapter.keep_mask(shape, raw=raw, keep_seconds=[0, 1.2])  # the input is 1.0 s
    with pytest.raises(ValueError, match=r"start < end"):
        adapter.keep_mask(shape, raw=raw, fill_seconds=[0.6, 0.3])


def test_video_frames_and_masks_map_to_the_clip():
    adapter = VideoAdapter(size=16, num_frames=8)
    raw = torch.rand(1, 8, 16, 16)
    keep = adapter.keep_mask((1, 8, 16, 16), raw=raw, keep_frames=[0, -1])
    assert keep[0, :, 0, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 1] and keep.shape == (1, 8, 16, 16)
    keep = adapter.keep_mask((1, 12, 16, 16), raw=raw, fill_frames=[2, 3])  # 4 frames past the input: generated
    assert keep[0, :, 0, 0].tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    mask = torch.zeros(1, 16, 16)
    mask[:, :, 8:] = 1
    keep = adapter.keep_mask((1, 8, 16, 16), raw=raw, mask=mask, fill_frames=[0])
    assert keep[0, 0].eq(0).all() and keep[0, 1:, :, :8].eq(1).all() and keep[0, 1:, :, 8:].eq(0).all()
    with pytest.raises(ValueError, match="past the end of init"):
        adapter.keep_mask((1, 12, 16, 16), raw=raw, keep_frames=[0, 9])
    with pytest.raises(ValueError, match="outside the 8 frames"):
        adapter.keep_mask((1, 8, 16, 16), raw=raw, fill_frames=[8])


@pytest.mark.parametrize("adapter", [ImageAdapter(size=(6, 10)), AudioAdapter(n_mels=8), VideoAdapter(size=6)],
                         ids=["image", "audio", "video"])
def test_training_masks_keep_something_and_generate_something(adapter):
    dims = tuple(adapter.shape[1:])
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(200):
        keep = adapter.random_keep_mask(dims, g)
        assert keep.shape == (1, *dims) and set(keep.unique().tolist()) == {0.0, 1.0}
        kinds.add(keep.mean().item())
    assert len(kinds) > 5  # regions vary
    again = adapter.random_keep_mask(dims, torch.Generator().manual_seed(0))
    assert torch.equal(again, adapter.random_keep_mask(dims, torch.Generator().manual_seed(0)))


# -- the pipeline ----------------------------------------------------------------------------------

def test_inpainting_keeps_the_input_pixels_exactly(image_pipe, image_files, tmp_path):
    for sampler in ("dpmpp_2m", "euler_ancestral"):
        out = image_pipe.generate(["3", "7"], seed=5, steps=3, sampler=sampler, init=image_files["init"],
                                  mask=image_files["lower"], harmonize=1, progress=False)
        paths = image_pipe.save(out, tmp_path / sampler)
        for path in paths:
            saved = np.asarray(Image.open(path))
            assert np.array_equal(saved[:8], image_files["pixels"][:8])  # the kept upper half, bit for bit
            assert not np.array_equal(saved[8:], image_files["pixels"][8:])
        row = json.loads((tmp_path / sampler / "metadata.jsonl").read_text().splitlines()[0])
        assert row["init"] == str(image_files["init"]) and row["mask"] == str(image_files["lower"])
        assert row["strength"] == 1.0 and row["harmonize"] == 1


def test_strength_zero_returns_the_input_and_one_is_plain_generation(image_pipe, image_files):
    same = image_pipe.generate("3", steps=4, init=image_files["init"], strength=0, progress=False)
    assert np.array_equal((same[0, 0] * 255).round().numpy().astype(int), image_files["pixels"])
    full = image_pipe.generate("3", num_samples=2, seed=9, steps=4, init=image_files["init"], strength=1.0, progress=False)
    plain = image_pipe.generate("3", num_samples=2, seed=9, steps=4, progress=False)
    assert torch.equal(full, plain)
    half = image_pipe.generate("3", num_samples=2, seed=9, steps=4, init=image_files["init"], strength=0.5,
                               progress=False)
    assert not torch.equal(half, plain) and half.generation.edit["strength"] == 0.5


def test_a_latent_model_keeps_the_input_exactly_in_pixel_space(image_files, tmp_path):
    from multidiff.autoencoders.conv import ConvAutoencoder
    from multidiff.autoencoders.trained import export_autoencoder

    ae = export_autoencoder(tmp_path / "AE", ConvAutoencoder(shape=(1, 16, 16), channels=[8, 16], norm_groups=4,
                                                             latent_channels=3), "modality: {}\n")
    pipe = _pipeline("recipe=image_digits_latent", f"autoencoder.path={ae}", "modality.size=16",
                     "backbone=unet2d_tiny")
    assert pipe.stage.latent_mask(torch.ones(1, 1, 16, 16)).shape == (1, 1, 8, 8)
    out = pipe.generate("3", steps=2, init=image_files["init"], fill_box=[8, 0, 16, 16], progress=False)
    pixels = (out[0, 0] * 255).round().numpy().astype(int)
    assert np.array_equal(pixels[:8], image_files["pixels"][:8])


@pytest.mark.parametrize("request_, message", [
    ({"mask": "small"}, "8x8 pixels but the input image is 16x16"),
    ({"mask": "black"}, "nothing to generate"),
    ({"mask": "white"}, "keeps nothing of init"),
    ({"fill_box": [0, 0, 20, 4]}, "top, left, bottom, right"),
    ({"strength": 1.5}, "strength=1.5 is invalid"),
    ({"harmonize": -1}, "harmonize=-1 is invalid"),
    ({"keep_seconds": [0, 1]}, "unknown generation option keep_seconds"),
    ({"init": None, "mask": "lower"}, "no init= was given"),
    ({"init": "missing.png"}, "does not exist"),
], ids=["wrong-size", "empty", "all-regenerated", "box", "strength", "harmonize", "other-modality", "no-init",
        "missing"])
def test_bad_edit_requests_are_refused_in_one_paragraph(image_pipe, image_files, request_, message):
    kwargs = {"init": image_files["init"], **request_}
    for key in ("mask", "init"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = image_files.get(kwargs[key], image_files["dir"] / kwargs[key])
    with pytest.raises(GenerationError, match=message) as info:
        image_pipe.generate("3", steps=2, progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_audio_continuation_keeps_the_start_of_the_input(tmp_path):
    pipe = _pipeline("recipe=audio_notes", "backbone=unet2d_tiny")
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    sf.write(tmp_path / "note.wav", wave.astype(np.float32), 16000)
    edit = pipe.prepare_edit(tmp_path / "note.wav", None, None, 0, {"duration": 1.5}, {"keep_seconds": [0, 0.5]})
    assert edit.known.shape == (1, 1, 128, 24) and edit.keep[0, 0, 0].tolist() == [1.0] * 7 + [0.0] * 17
    sigmas = pipe.schedule.sigmas(3)
    from multidiff.core.samplers import sample_dpmpp_2m

    z = pipe.sample_tensors(["3"], [0], (1, 128, 24), sample_dpmpp_2m, sigmas, 2.0, edit=pipe.latent_edit(edit))
    assert torch.equal(z[..., :7], edit.known[..., :7])  # the kept spectrogram frames, exactly
    out = pipe.generate("3", steps=2, init=tmp_path / "note.wav", duration=1.5, keep_seconds=[0, 0.5], progress=False)
    assert out.shape == (1, 1, 24000) and out.generation.edit["keep_seconds"] == [0, 0.5]
    assert out.generation.options["duration"] == 1.5
    with pytest.raises(GenerationError, match=r"keep_seconds=\[0, 2\] reaches 2 seconds of init, past the end") as info:
        pipe.generate("3", steps=2, init=tmp_path / "note.wav", duration=3.0, keep_seconds=[0, 2], progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(GenerationError, match="audio regions are spans of seconds"):
        pipe.generate("3", steps=2, init=tmp_path / "note.wav", mask=tmp_path / "note.wav", progress=False)


def test_video_interpolation_keeps_the_first_and_last_frames(tmp_path):
    pipe = _pipeline("recipe=video_moving_digits", "backbone=unet3d_tiny")
    clip = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 8, 16, 16))).float() / 255
    write_video(clip, tmp_path / "clip.gif", fps=8)
    out = pipe.generate("3", steps=2, init=tmp_path / "clip.gif", keep_frames=[0, -1], progress=False)
    pipe.save(out, tmp_path / "out", format="gif")
    back, _ = read_video(tmp_path / "out" / "0000.gif", channels=1)
    assert torch.equal(back[:, [0, 7]], clip[:, [0, 7]])  # GIF is lossless for grayscale
    assert not torch.equal(back[:, 3], clip[:, 3])
    longer = pipe.generate("3", steps=2, init=tmp_path / "clip.gif", num_frames=12, keep_frames=list(range(8)),
                           progress=False)
    assert longer.shape == (1, 1, 12, 16, 16) and torch.equal((longer[:, :, :8] * 255).round(), clip[None] * 255)
    with pytest.raises(GenerationError, match="frame 9 is past the end of init"):
        pipe.generate("3", steps=2, init=tmp_path / "clip.gif", num_frames=12, keep_frames=[0, 9], progress=False)
    with pytest.raises(GenerationError, match="keeps all of init"):
        pipe.generate("3", steps=2, init=tmp_path / "clip.gif", keep_frames=list(range(8)), progress=False)


# -- the CLI and mask-conditioned training -----------------------------------------------------------

def test_mask_conditioned_training_extends_a_model_and_generate_edits_with_it(tiny_run, data_root, image_files,
                                                                              tmp_path):
    """``editing=masked`` extends the tiny model (input weights widened by zeros), and ``generate``
    edits with the result through the CLI; a bad mask is refused before the model loads."""
    run_dir = tmp_path / "masked"
    proc = multidiff_cli("train", "recipe=image_digits", f"run_dir={run_dir}", f"data_root={data_root}", *TINY,
                         "editing=masked", f"editing.init_from={tiny_run / 'model'}", "editing.mask_probability=1.0")
    assert "input weights widened with zeros: unet.conv_in.weight" in proc.stdout
    pipe = Pipeline.load(run_dir / "model", device="cpu")
    assert pipe.denoiser.backbone.concat_channels == 2 and pipe.denoiser.backbone.unet.conv_in.in_channels == 3
    assert pipe.generate("a handwritten digit two", steps=2, progress=False).shape == (1, 1, 16, 16)  # no input: zeros
    out = tmp_path / "out"
    multidiff_cli("generate", f"model={run_dir / 'model'}", "prompt=a handwritten digit seven", f"out={out}",
                  "steps=2", f"init={image_files['init']}", "fill_box=[8,0,16,16]", "harmonize=1")
    row = json.loads((out / "metadata.jsonl").read_text())
    assert row["fill_box"] == [8, 0, 16, 16] and row["strength"] == 1.0 and row["init"] == str(image_files["init"])
    assert np.array_equal(np.asarray(Image.open(out / "0000.png"))[:8], image_files["pixels"][:8])
    bad = multidiff_cli("generate", f"model={run_dir / 'model'}", "prompt=x", f"out={tmp_path / 'bad'}",
                        f"init={image_files['init']}", f"mask={image_files['small']}", check=False)
    assert bad.returncode != 0 and "8x8 pixels but the input image is 16x16" in bad.stderr
    assert "Traceback" not in bad.stderr and "Loading weights" not in bad.stderr
    bad = multidiff_cli("train", "recipe=image_digits", f"run_dir={tmp_path / 'bad'}", f"data_root={data_root}", *TINY,
                        "editing=masked", "training.slice_items=2", check=False)
    assert bad.returncode != 0 and "slice training" in bad.stderr


@pytest.mark.parametrize("target, options", [
    ("multidiff.backbones.convunet.ConvUNet", {"channels": [8, 16], "norm_groups": 4, "cross_attention_dim": None}),
    ("multidiff.backbones.unet.UNet2DCond", {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D"] * 2,
                                            "up_block_types": ["UpBlock2D"] * 2, "norm_groups": 4, "layers_per_block": 1,
                                            "cross_attention_dim": 8, "coord_axes": [0]}),
], ids=["convunet", "unet2d-with-coordinates"])
def test_widened_backbones_start_as_the_model_they_extend(target, options):
    """Mask conditioning adds input channels after the item's (and a wrapper's own extra channels):
    loaded from a model without them, with zeros there, the network computes what it computed."""
    from hydra.utils import get_object

    from multidiff.backbones.base import BackboneShapeError, WidenError, load_widened

    cls = get_object(target)
    torch.manual_seed(0)
    base = cls(shape=(1, 8, 8), **options).eval()
    for p in base.parameters():  # the zero-initialised output layers of diffusers would hide everything
        torch.nn.init.normal_(p, std=0.2)
    wide = cls(shape=(1, 8, 8), concat_channels=2, **options).eval()
    widened = load_widened(wide, base.state_dict())
    assert len(widened) == 1 and widened[0].endswith("conv_in.weight")
    x, c = torch.randn(2, 1, 8, 8), torch.rand(2)
    concat = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(wide(torch.cat([x, concat], 1), c, None), base(x, c, None))
    with pytest.raises(BackboneShapeError, match=r"\(B, 3 \(1 \+ 2 concatenated\)"):
        wide(x, c, None)
    with pytest.raises(WidenError, match="only input channels may be added"):
        load_widened(base, wide.state_dict())


def test_training_draws_the_modalitys_regions_per_global_batch():
    """The module's mask channels: the adapter's regions for about mask_probability of the items
    (the rest zeros), drawn for the global batch so that two ranks together hold one rank's draw."""
    from functools import partial

    from multidiff.backbones.convunet import ConvUNet
    from multidiff.core.denoiser import Denoiser, EDMPrecond
    from multidiff.training.module import DiffusionModule

    adapter = AudioAdapter(n_mels=8)
    net = ConvUNet(shape=(1, 8, 16), channels=[8], cross_attention_dim=None, norm_groups=4, concat_channels=2)
    module = DiffusionModule(Denoiser(net, EDMPrecond()), None, None, partial(torch.optim.SGD, lr=0.1),
                             mask_sampler=adapter.random_keep_mask, mask_probability=0.5)
    x0 = torch.randn(64, 1, 8, 16)
    channels = module._editing_channels(x0, torch.Generator().manual_seed(3), 1, 0)
    keep = channels[:, :1]
    assert channels.shape == (64, 2, 8, 16) and torch.equal(channels[:, 1:], keep * x0)
    used = keep.flatten(1).amax(1) > 0
    assert 20 < int(used.sum()) < 44  # about half
    spans = keep[used][:, 0, 0]  # regions are spans of time: every mel band alike, some frames generated
    assert torch.equal(keep[used], spans[:, None, None].expand(-1, 1, 8, -1)) and bool((spans.amin(1) == 0).all())
    ranks = [module._editing_channels(x0[r::2], torch.Generator().manual_seed(3), 2, r) for r in (0, 1)]
    assert torch.equal(torch.stack(ranks, 1).flatten(0, 1), channels)
    with pytest.raises(ValueError, match="concat_channels"):
        DiffusionModule(Denoiser(ConvUNet(shape=(1, 8, 16), channels=[8], cross_attention_dim=None, norm_groups=4),
                                 EDMPrecond()), None, None, partial(torch.optim.SGD, lr=0.1),
                        mask_sampler=adapter.random_keep_mask)
