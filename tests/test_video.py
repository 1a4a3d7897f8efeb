"""Video: adapter round trips, MP4/WebM/GIF/frame-folder I/O, the moving_digits data and the 3-D backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multidiff.adapters.video import VideoAdapter, VideoIOError, read_video, write_video
from multidiff.backbones.unet import UNet2DCond
from multidiff.backbones.unet3d import InflationError, UNet3DCond
from multidiff.core.cond import Cond
from multidiff.core.denoiser import Denoiser, VPrediction
from multidiff.core.noise import PerSampleGenerator
from multidiff.core.samplers import SAMPLERS
from multidiff.core.schedules import VPSchedule
from multidiff.datasets.folder import CaptionFolder, DatasetError
from multidiff.datasets.moving_digits import (
    DIRECTIONS,
    TEMPLATES,
    bounce_path,
    first_half_steps,
    materialize_moving_digits,
    moving_caption,
    moving_digits_dataset,
    read_rows,
)

# --- adapter ----------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    a = VideoAdapter(size=16, channels=1, num_frames=8)
    raw = torch.rand(1, 8, 16, 16)
    x0 = a.encode(raw)
    assert x0.shape == a.shape == (1, 8, 16, 16)
    assert x0.min() >= -1 and x0.max() <= 1
    torch.testing.assert_close(a.decode(x0), raw, atol=1e-6, rtol=0)


def test_frame_stride_takes_the_middle_of_longer_clips():
    a = VideoAdapter(size=4, num_frames=3, frame_stride=2)
    raw = torch.arange(10.0).reshape(1, 10, 1, 1).expand(1, 10, 4, 4) / 10  # frame t has value t/10
    x = a.decode(a.encode(raw))
    # span 5 of 10 frames, centred: frames 2, 4, 6
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([0.2, 0.4, 0.6]))


def test_too_short_clip_is_a_clear_error():
    a = VideoAdapter(size=4, num_frames=8, frame_stride=2)
    with pytest.raises(ValueError, match="has 5 frames but modality.num_frames=8 with modality.frame_stride=2 needs 15"):
        a.encode(torch.rand(1, 5, 4, 4))


def test_resize_center_crop_and_channels():
    a = VideoAdapter(size=(8, 8), channels=1, num_frames=2)
    raw = torch.zeros(3, 2, 20, 40)
    raw[:, :, :, 10:30] = 1.0  # bright centre, dark sides
    x = a.encode(raw)
    assert x.shape == (1, 2, 8, 8)
    assert x[0, :, :, 2:6].mean() > 0.9
    rgb = VideoAdapter(size=8, channels=3, num_frames=2)
    assert rgb.encode(torch.rand(1, 2, 8, 8)).shape == (3, 2, 8, 8)


def test_preview_is_a_frame_strip_and_options_set_shape_and_metadata():
    a = VideoAdapter(size=16, channels=1, num_frames=8, fps=8, preview_columns=4)
    strip = a.preview(torch.rand(1, 8, 16, 16))
    assert strip.shape == (3, 2 * 17 + 1, 4 * 17 + 1)  # 2 rows of 4 frames, 1 px borders
    assert a.sample_shape() == (1, 8, 16, 16)
    assert a.sample_shape(num_frames=16) == (1, 16, 16, 16)
    assert a.sample_shape(duration=1.5, fps=10) == (1, 15, 16, 16)
    assert a.metadata(num_frames=16, fps=12) == {"num_frames": 16, "fps": 12.0, "height": 16, "width": 16}
    assert a.save_options() == {"fps": 8.0}
    for bad in ({"num_frames": 0}, {"num_frames": 2.5}, {"fps": -1}):
        with pytest.raises(ValueError, match="is invalid"):
            a.sample_shape(**bad)


# --- file I/O ---------------------------------------------------------------------------------


def _moving_square(channels: int, frames: int, h: int, w: int) -> torch.Tensor:
    """A smooth test clip (codecs blur noise, not edges this soft): a blob moving right."""
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    clip = torch.stack([torch.exp(-((ys - h / 2) ** 2 + (xs - 2 - t) ** 2) / 8) for t in range(frames)])
    return clip[None].expand(channels, -1, -1, -1).clone() * 0.8 + 0.1


@pytest.mark.parametrize(
    ("suffix", "fps", "channels", "tol"),
    [(".mp4", 8.0, 1, 0.02), (".mp4", 29.97, 3, 0.03), (".webm", 8.0, 1, 0.04), (".gif", 8.0, 1, 0.5 / 255),
     (".gif", 10.0, 3, 0.02)],
)
def test_video_files_round_trip_frames_size_and_fps(tmp_path, suffix, fps, channels, tol):
    clip = _moving_square(channels, 8, 16, 24)
    path = write_video(clip, tmp_path / f"clip{suffix}", fps=fps)
    back, back_fps = read_video(path, channels=channels)
    assert back.shape == (channels, 8, 16, 24)
    assert back_fps == pytest.approx(fps, rel=1e-3)
    assert (back - clip).abs().mean() <= tol


def test_mp4_is_h264_yuv420p_and_odd_sizes_are_padded(tmp_path):
    import subprocess

    import imageio_ffmpeg

    clip = _moving_square(1, 5, 15, 17)
    path = write_video(clip, tmp_path / "odd.mp4", fps=12)
    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    assert "h264" in info and "yuv420p" in info
    back, fps = read_video(path, channels=1)
    assert back.shape == (1, 5, 16, 18) and fps == 12
    assert (back[:, :, :15, :17] - clip).abs().mean() < 0.02  # the original pixels survive


def test_gif_keeps_identical_frames_and_frame_folders_read(tmp_path):
    still = torch.rand(1, 1, 8, 8).expand(1, 6, 8, 8)  # six identical frames: Pillow merges them
    back, fps = read_video(write_video(still, tmp_path / "still.gif", fps=8), channels=1)
    assert back.shape == (1, 6, 8, 8) and fps == 8
    clip = _moving_square(1, 4, 8, 8)
    folder = write_video(clip, tmp_path / "frames", fps=8)
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    back, fps = read_video(folder, channels=1)
    assert back.shape == (1, 4, 8, 8) and fps is None
    assert (back - clip).abs().max() <= 0.5 / 255 + 1e-6


def test_io_errors_name_the_file(tmp_path):
    with pytest.raises(VideoIOError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoIOError, match="unknown video suffix '.xyz'"):
        write_video(torch.rand(1, 2, 4, 4), tmp_path / "a.xyz", fps=8)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(VideoIOError, match="bad.mp4"):
        read_video(bad)


def test_caption_folder_of_videos_and_frame_folders(tmp_path):
    a = VideoAdapter(size=8, num_frames=4)
    write_video(_moving_square(1, 6, 8, 8), tmp_path / "a.mp4", fps=8)
    write_video(_moving_square(1, 4, 12, 12), tmp_path / "b.gif", fps=8)
    write_video(_moving_square(1, 5, 8, 8), tmp_path / "c", fps=8)  # a frame folder
    rows = [{"file_name": "a.mp4", "text": "an mp4"}, {"file_name": "b.gif", "text": "a gif"},
            {"file_name": "c", "text": "frames"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = CaptionFolder(tmp_path, a)
    assert [ds[i]["text"] for i in range(3)] == ["an mp4", "a gif", "frames"]
    assert all(ds[i]["x"].shape == (1, 4, 8, 8) for i in range(3))
    short = VideoAdapter(size=8, num_frames=6)
    with pytest.raises(DatasetError, match="b.gif.*has 4 frames"):
        CaptionFolder(tmp_path, short)
    assert len(CaptionFolder(tmp_path, short, on_error="skip")) == 1


# --- moving digits ----------------------------------------------------------------------------


def test_bounce_path_reflects_at_both_edges():
    assert bounce_path(2, -1, 5, 8) == [2, 1, 0, 1, 2, 3]
    assert bounce_path(7, 2, 3, 8) == [7, 7, 5, 3]  # 9 -> 7 (reflected at 8)
    assert first_half_steps(8) == 4 and first_half_steps(16) == 8


def test_moving_digits_are_deterministic_and_true_to_their_captions(tmp_path):
    kw = dict(num_digits=25, num_frames=8, canvas=16)
    a, b = materialize_moving_digits(tmp_path / "a", **kw), materialize_moving_digits(tmp_path / "b", **kw)
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    assert (a / "clips" / "00007.gif").read_bytes() == (b / "clips" / "00007.gif").read_bytes()
    rows = read_rows(a)
    assert len(rows) == 25 * 4 and {r["direction"] for r in rows} == {"left", "right", "up", "down"}
    assert moving_caption(3, "left") == "the digit 3 moving to the left"
    assert len({r["text"].split(" moving")[0] for r in rows}) > len(TEMPLATES) // 2  # paraphrases are used
    bounced = 0
    for r in rows:
        d, name = r["label"], ("zero one two three four five six seven eight nine").split()[r["label"]]
        assert str(d) in r["text"].split() or name in r["text"].split()
        dy, dx = DIRECTIONS[r["direction"]]
        free = first_half_steps(8)
        # the captioned direction holds for the first half of the clip; bounces may follow
        assert all(r["ys"][t + 1] - r["ys"][t] == dy and r["xs"][t + 1] - r["xs"][t] == dx for t in range(free))
        assert all(0 <= p <= 8 for p in r["ys"] + r["xs"])
        bounced += any(r["xs"][t + 1] - r["xs"][t] == -dx != 0 or r["ys"][t + 1] - r["ys"][t] == -dy != 0
                       for t in range(7))
        assert r["ys"][0] is not None
    assert 0 < bounced < len(rows)
    # the pixels agree with the recorded trajectory: the digit's box is where the row says
    clip, fps = read_video(a / rows[0]["file_name"], channels=1)
    assert clip.shape == (1, 8, 16, 16) and fps == 8
    for t in range(8):
        y, x = rows[0]["ys"][t], rows[0]["xs"][t]
        inside = clip[0, t, y : y + 8, x : x + 8].sum()
        assert inside == pytest.approx(clip[0, t].sum().item(), rel=1e-6) and inside > 3


def test_moving_digits_dataset_and_its_errors(tmp_path):
    ds = moving_digits_dataset(tmp_path, num_digits=5, directions=("left", "up_right"))
    assert len(ds) == 10
    item = ds[1]
    assert item["x"].shape == (1, 8, 16, 16) and item["x"].min() >= -1 and "up and to the right" in item["text"]
    assert float(np.mean(item["x"].numpy() > -1)) > 0.05  # ink, not a blank clip
    with pytest.raises(DatasetError, match="unknown moving_digits direction"):
        moving_digits_dataset(tmp_path, num_digits=2, directions=("sideways",))
    with pytest.raises(DatasetError, match="needs 16 frames but moving_digits clips have 8"):
        moving_digits_dataset(tmp_path, num_digits=2, adapter=VideoAdapter(num_frames=16))
    with pytest.raises(DatasetError, match="enlarge data.dataset.canvas"):
        moving_digits_dataset(tmp_path, num_digits=2, canvas=10)


# --- the 3-D backbone -------------------------------------------------------------------------

TINY = dict(sample_size=8, in_channels=1, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24,
            norm_num_groups=8)
TINY3D = dict(TINY, down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
              up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"), attention_head_dim=4)


def _cond(b: int = 2) -> Cond:
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]][:b]).bool()
    tokens = torch.randn(b, 6, 24, generator=g) * mask[..., None]
    return Cond(tokens=tokens, mask=mask, pooled=tokens.sum(1) / mask.sum(1, keepdim=True))


@pytest.fixture(scope="module")
def denoiser3d():
    torch.manual_seed(0)
    backbone = UNet3DCond(**TINY3D, pooled_cond=True).eval()
    with torch.no_grad():  # move the zero-initialized temporal outputs off zero so time matters
        for p in backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Denoiser(backbone, VPrediction(VPSchedule(beta_schedule="cosine", spacing="trailing")))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_3d_backbone_through_every_sampler(denoiser3d, name):
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


def test_3d_backbone_masks_padding_any_length_and_labels():
    torch.manual_seed(0)
    net = UNet3DCond(**TINY3D, num_class_embeds=10).eval()
    x, c = torch.randn(2, 1, 3, 8, 8), torch.tensor([10.0, 500.0])
    cond = _cond()
    with torch.no_grad():
        y = net(x, c, cond)
        loud = cond.tokens.clone()
        loud[0, 3:] = 100.0  # padding positions of sample 0
        assert torch.equal(net(x, c, Cond(tokens=loud, mask=cond.mask)), y)
        assert net(torch.randn(1, 1, 7, 8, 8), c[:1], cond.index(slice(0, 1))).shape == (1, 1, 7, 8, 8)
        with_labels = net(x, c, Cond(labels=torch.tensor([3, 10])))
        assert with_labels.shape == x.shape and not torch.allclose(with_labels[0], net(x, c, Cond(labels=torch.tensor([4, 10])))[0])
    with pytest.raises(ValueError, match=r"takes clips \(B, C, T, H, W\)"):
        net(torch.randn(2, 1, 8, 8), c, cond)


def test_inflated_video_model_starts_as_the_image_model_on_every_frame(tmp_path):
    torch.manual_seed(0)
    image = UNet2DCond(**TINY, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8)).eval()
    with torch.no_grad():  # a "trained" image model: no zero-initialized layer stays zero
        for p in image.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image.save_pretrained(tmp_path / "backbone")
    video = UNet3DCond(**TINY3D, init_from=str(tmp_path)).eval()  # RUN/model-style directory
    b, t = 2, 5
    x, c, cond = torch.randn(b, 1, t, 8, 8), torch.tensor([30.0, 700.0]), _cond()
    with torch.no_grad():
        y = video(x, c, cond)
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 1, 8, 8)
        per_frame = image(frames, c.repeat_interleave(t), cond.repeat_interleave(t))
    torch.testing.assert_close(y, per_frame.reshape(b, t, 1, 8, 8).permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-4)
    assert y.abs().mean() > 0.1


def test_inflation_refuses_a_different_layout(tmp_path):
    other = UNet2DCond(**dict(TINY, block_out_channels=(16, 16)), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    other.save_pretrained(tmp_path)
    with pytest.raises(InflationError, match="same block_out_channels.*init_from=null"):
        UNet3DCond(**TINY3D, init_from=str(tmp_path))
    with pytest.raises(InflationError, match="holds no image model weights"):
        UNet3DCond(**TINY3D, init_from=str(tmp_path / "missing"))


def test_3d_backbone_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    a = UNet3DCond(**TINY3D, num_class_embeds=3)
    a.save_pretrained(tmp_path)
    b = UNet3DCond(**TINY3D, num_class_embeds=3)
    b.load_pretrained(tmp_path)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


def test_temporal_layers_start_as_identity_only_when_inflating():
    """``zero_init_temporal=None``: random temporal layers from scratch (frames interact at once),
    identity ones when asked (or when inflating, tested above)."""
    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    def temporal_outputs(net):
        mods = list(net.unet.modules())
        convs = [m.conv4[-1].weight for m in mods if isinstance(m, TemporalConvLayer)]
        attns = [m.proj_out.weight for m in mods if isinstance(m, TransformerTemporalModel)]
        assert convs and attns
        return [float(w.detach().abs().max()) for w in convs + attns]

    assert min(temporal_outputs(UNet3DCond(**TINY3D))) > 0
    assert max(temporal_outputs(UNet3DCond(**TINY3D, zero_init_temporal=True))) == 0
    torch.manual_seed(0)
    net = UNet3DCond(**TINY3D).eval()
    clip = torch.randn(1, 1, 4, 16, 16)
    with torch.no_grad():  # with random temporal layers, changing frame 0 changes the output at frame 3
        a = net(clip, torch.tensor([0.5]), None)
        clip[:, :, 0] += 1.0
        b = net(clip, torch.tensor([0.5]), None)
    assert (a[:, :, 3] - b[:, :, 3]).abs().max() > 1e-5


def _joint_module(denoiser, slice_items: int, slice_sigma_scale: float = 1.0):
    from functools import partial

    from multidiff.core.noise import DiscreteTimestepSigma
    from multidiff.training.module import DiffusionModule

    schedule = denoiser.parameterization.schedule
    return DiffusionModule(denoiser, DiscreteTimestepSigma(schedule), None, partial(torch.optim.AdamW, lr=1e-4),
                           slice_items=slice_items, slice_sigma_scale=slice_sigma_scale)


def _joint_inputs(b: int, frames: int = 4):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(b, 1, frames, 8, 8, generator=g) * 2 - 1
    sigma = torch.rand(b, generator=g) * 3 + 0.1
    noise = torch.randn(x0.shape, generator=g)
    tokens = torch.randn(b, 6, 24, generator=g)
    return x0, sigma, noise, Cond(tokens=tokens, mask=torch.ones(b, 6, dtype=torch.bool), pooled=tokens.mean(1))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("scale", [1.0, 1 / 3])
def test_joint_image_video_loss_trains_the_last_items_as_single_frames(denoiser3d, scale):
    """training.slice_items (joint image-video training): the first B - n items are clips, the last n
    are one frame each (T=1), at the drawn sigma x training.slice_sigma_scale."""
    x0, sigma, noise, cond = _joint_inputs(5)
    module = _joint_module(denoiser3d, slice_items=2, slice_sigma_scale=scale)
    with torch.no_grad():
        per_item = module._sliced_loss(x0, sigma, noise, cond, torch.Generator().manual_seed(0), 1, 0)
        assert per_item.shape == (5,)
        clips = denoiser3d.loss(x0[:3], sigma[:3], noise[:3], cond.index(slice(0, 3)))
        torch.testing.assert_close(per_item[:3], clips)
        for i in (3, 4):  # each image loss is the loss of exactly one of its clip's frames, alone
            one = cond.index(slice(i, i + 1))
            frame_losses = torch.cat([denoiser3d.loss(x0[i : i + 1, :, f : f + 1], sigma[i : i + 1] * scale,
                                                      noise[i : i + 1, :, f : f + 1], one) for f in range(4)])
            matches = torch.isclose(frame_losses, per_item[i], rtol=1e-5, atol=1e-7)
            assert matches.sum() == 1, (frame_losses, per_item[i])
    with pytest.raises(ValueError, match=r"training.slice_dim=1 is not an axis of items of shape \(1,\)"):
        module._sliced_loss(x0[:, :, 0, 0, 0], sigma, noise[:, :, 0, 0, 0], cond, torch.Generator(), 1, 0)
    with pytest.raises(ValueError, match="whole number"):
        _joint_module(denoiser3d, slice_items=-1)
    with pytest.raises(ValueError, match="slice_sigma_scale must be a number > 0"):
        _joint_module(denoiser3d, slice_items=1, slice_sigma_scale=0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_joint_image_video_loss_is_the_same_on_two_ranks(denoiser3d):
    """Rank r holds global rows r::2 and per-device slice_items n: together the two ranks compute
    what one process computes on the global batch with slice_items 2n (same frames, same split)."""
    x0, sigma, noise, cond = _joint_inputs(8)
    with torch.no_grad():
        single = _joint_module(denoiser3d, 4)._sliced_loss(x0, sigma, noise, cond, torch.Generator().manual_seed(7), 1, 0)
        ranks = [
            _joint_module(denoiser3d, 2)._sliced_loss(x0[r::2], sigma[r::2], noise[r::2], cond.index(slice(r, None, 2)),
                                                      torch.Generator().manual_seed(7), 2, r)
            for r in (0, 1)
        ]
    torch.testing.assert_close(torch.stack(ranks, 1).flatten(), single)


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
    image = UNet2DCond(**TINY, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8)).eval()
    image.save_pretrained(tmp_path / "image" / "backbone")
    inflated = UNet3DCond(**TINY3D, temporal_conv_depth=1, input_temporal_attention=False,
                          init_from=str(tmp_path / "image")).eval()
    frames = x.permute(0, 2, 1, 3, 4).reshape(6, 1, 8, 8)
    with torch.no_grad():
        per_frame = image(frames, c.repeat_interleave(3), _cond().repeat_interleave(3))
        torch.testing.assert_close(inflated(x, c, _cond()), per_frame.reshape(2, 3, 1, 8, 8).permute(0, 2, 1, 3, 4),
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="temporal_conv_depth must be 1, 2, 3 or 4"):
        UNet3DCond(**TINY3D, temporal_conv_depth=5)
