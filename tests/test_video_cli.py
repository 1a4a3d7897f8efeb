"""Video end to end through the real CLI: train the video recipe tiny (inflated from the tiny image
model), log sample clips, export, generate MP4 and GIF with num_frames/fps, and the recipe's config."""

from __future__ import annotations

import json
import re

import pytest
from helpers import multidiff_cli

from multidiff.adapters.video import read_video
from multidiff.cli.compose import compose


def test_recipe_composes_a_video_run():
    cfg = compose("train", ["recipe=video_moving_digits"])
    assert cfg.modality._target_ == "multidiff.adapters.video.VideoAdapter"
    assert cfg.backbone._target_ == "multidiff.backbones.unet3d.UNet3DCond"
    assert cfg.data.dataset._target_ == "multidiff.datasets.moving_digits.moving_digits_dataset"
    assert not {"canvas", "num_frames", "fps"} & set(cfg.data.dataset)  # the clips follow the adapter (tests/test_datasets.py)
    assert all("moving" in p for p in cfg.preview_prompts)


def test_train_exports_and_logs_sample_videos(video_run):
    run_dir, proc = video_run
    assert "inflated" in proc.stderr  # the spatial weights came from the image model
    assert (run_dir / "model" / "backbone" / "config.json").is_file()
    assert json.loads((run_dir / "model" / "backbone" / "config.json").read_text())["_class_name"] == "UNet3DConditionModel"
    assert sorted(p.name for p in (run_dir / "samples").glob("step_*.png")) == ["step_000002.png", "step_000003.png"]
    clips = sorted((run_dir / "samples" / "step_000003").glob("*.gif"))
    assert len(clips) == 4  # one per preview prompt
    clip, fps = read_video(clips[0], channels=1)
    assert clip.shape == (1, 8, 16, 16) and fps == 8
    rows = [json.loads(x) for x in (run_dir / "samples" / "step_000003" / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "the digit 3 moving to the left"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()["images"]
    assert "samples" in tags and "videos/00" in tags
    gif = events.Images("videos/00")[-1].encoded_image_string
    assert gif[:6] == b"GIF89a"
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/loss_whole", "train/loss_sliced"} <= set(scalars)


@pytest.mark.parametrize(("overrides", "message"), [
    (["recipe=video_moving_digits", "data.batch_size=4", "training.slice_items=4"],
     r"training.slice_items=4 is invalid: it must be a whole number from 0 \(off\) to data.batch_size - 1 \(3\)"),
    (["recipe=image_digits", "training.slice_items=2", "training.slice_dim=3"],
     r"training.slice_dim=3 does not name an axis of this model's items \(1, 16, 16\) \(axes 1..2 follow the "
     r"channels\).* \(ImageAdapter\)"),
    (["recipe=video_moving_digits", "training.slice_sigma_scale=0"],
     r"training.slice_sigma_scale=0 is invalid: it must be a number > 0"),
    (["recipe=video_moving_digits", "training.slice_dim=4", "data.dataset.num_digits=20"],
     r"training.slice_dim=4 does not name an axis of this model's items \(1, 8, 16, 16\)"),
    (["recipe=video_moving_digits", "+training.slice_itmes=2"], r"unknown key training.slice_itmes: the options "
     r"here are training.ema_decay, .*training.slice_items"),
    (["recipe=video_moving_digits", "training.slice_items=true"], r"training.slice_items=True is invalid: it must be "
     r"an integer"),
])
def test_slice_items_errors_name_the_key(overrides, message, tmp_path):
    proc = multidiff_cli("train", *overrides, f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr + proc.stdout), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("fmt", "suffix"), [(None, ".mp4"), ("gif", ".gif")])
def test_generate_writes_clips_with_frames_and_fps(video_run, tmp_path, fmt, suffix):
    run_dir, _ = video_run
    out = tmp_path / "out"
    args = ["generate", f"model={run_dir / 'model'}", "prompt=the digit 3 moving to the left", "num_frames=16",
            "fps=8", "num_samples=2", "seed=3", "steps=2", f"out={out}"] + ([f"format={fmt}"] if fmt else [])
    multidiff_cli(*args)
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"0000{suffix}", f"0001{suffix}"]
    assert [r["seed"] for r in rows] == [3, 4]
    for r in rows:
        assert (r["num_frames"], r["fps"], r["prompt"]) == (16, 8, "the digit 3 moving to the left")
        clip, fps = read_video(out / r["file"], channels=1)
        assert clip.shape == (1, 16, 16, 16) and fps == pytest.approx(8)


def test_noise_prior_travels_with_the_model(video_run):
    import multidiff
    from multidiff.core.noise import SharedNoise

    run_dir, _ = video_run
    prior = multidiff.load(run_dir / "model").denoiser.noise_prior
    assert isinstance(prior, SharedNoise) and prior.correlation == 0.5 and prior.axes == (1,)


def test_generate_same_seed_same_clip_and_bad_options(video_run, tmp_path):
    run_dir, _ = video_run
    base = ["generate", f"model={run_dir / 'model'}", "prompt=the digit 7 moving up", "steps=2", "format=gif"]
    multidiff_cli(*base, "seed=5", "num_samples=2", "batch_size=1", f"out={tmp_path / 'a'}")
    multidiff_cli(*base, "seed=6", f"out={tmp_path / 'b'}")
    assert (tmp_path / "a" / "0001.gif").read_bytes() == (tmp_path / "b" / "0000.gif").read_bytes()
    proc = multidiff_cli(*base, "num_frames=0", f"out={tmp_path / 'c'}", check=False)
    assert proc.returncode != 0 and "num_frames=0 is invalid" in proc.stderr and "Traceback" not in proc.stderr
