"""Video: adapter round trips, MP4/WebM/GIF/frame-folder I/O and joint image-video training (moving_digits:
test_datasets.py; the 3-D backbone: test_backbones.py)."""

from __future__ import annotations

import json

import pytest
import torch

from multidiff.adapters.video import VideoAdapter, VideoIOError, read_video, write_video
from multidiff.backbones.unet3d import UNet3DCond
from multidiff.core.cond import Cond
from multidiff.core.denoiser import Denoiser, VPrediction
from multidiff.core.schedules import VPSchedule
from multidiff.datasets.folder import CaptionFolder, DatasetError

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


# --- joint image-video training on the 3-D backbone (the backbone itself: test_backbones.py) ----


@pytest.fixture(scope="module")
def denoiser3d():
    torch.manual_seed(0)
    backbone = UNet3DCond(shape=(1, 4, 8, 8), block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24,
                          norm_groups=8, down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
                          up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"), head_dim=4, pooled_dim=24).eval()
    with torch.no_grad():  # move the zero-initialized temporal outputs off zero so time matters
        for p in backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Denoiser(backbone, VPrediction(VPSchedule(beta_schedule="cosine", spacing="trailing")))


def _joint_module(denoiser, slice_items: int, slice_sigma_scale: float = 1.0):
    from functools import partial

    from multidiff.core.noise import DiscreteTimestepSigma
    from multidiff.training.module import DiffusionModule
    from multidiff.training.options import TrainingOptions

    schedule = denoiser.parameterization.schedule
    return DiffusionModule(denoiser, DiscreteTimestepSigma(schedule), None, partial(torch.optim.AdamW, lr=1e-4),
                           training=TrainingOptions(slice_items=slice_items, slice_sigma_scale=slice_sigma_scale))


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
    with pytest.raises(ValueError, match=r"training.slice_dim=1 does not name an axis of this model's items \(1,\)"):
        module._sliced_loss(x0[:, :, 0, 0, 0], sigma, noise[:, :, 0, 0, 0], cond, torch.Generator(), 1, 0)
    with pytest.raises(ValueError, match="whole number"):
        _joint_module(denoiser3d, slice_items=-1)
    with pytest.raises(ValueError, match="slice_sigma_scale=0 is invalid: it must be a number > 0"):
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
