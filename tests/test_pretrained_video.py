"""Issue 18 (part): diffusers ``WanPipeline`` directories (Wan 2.1 text-to-video: WanTransformer3DModel,
AutoencoderKLWan, UMT5) imported as multidiff video models, sampled by the multidiff core with parity
against the diffusers pipeline, written as MP4/GIF, and refused in one paragraph when not importable.

The pipelines are tiny random-weight ones built with diffusers' and transformers' own classes and saved
to a local folder by the test (``tests/tiny_pipelines.py``), as diffusers' own Wan tests build them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import multidiff_cli
from tiny_pipelines import copy_pipeline, edit_json, save_tiny_wan

import multidiff
from multidiff.pipeline import ModelLoadError

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PROMPTS = ["a red ball rolling", "two  blue cubes &amp; a cone"]  # the second needs Wan's prompt cleaning
CLIP = dict(num_frames=9, height=16, width=16)  # 3 latent frames of 2x2 (4x time, 8x space)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


def _reference(directory: Path, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """The diffusers WanPipeline's own output as (B, C, T, H, W) in [0, 1], float32."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(directory), local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        frames = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
                      output_type="pt", **CLIP).frames
    return frames.float().permute(0, 2, 1, 3, 4)


def test_a_wan_directory_imports_as_a_multidiff_video_model(wan_dir):
    from multidiff.adapters.video import VideoAdapter
    from multidiff.core.denoiser import FlowVelocity

    pipe = multidiff.load(wan_dir, device="cpu")
    assert isinstance(pipe.adapter, VideoAdapter)
    assert tuple(pipe.adapter.shape) == (3, 81, 480, 832)  # WanPipeline's defaults
    assert tuple(pipe.stage.latent_shape((3, 9, 16, 16))) == (16, 3, 2, 2)  # causal 4x in time, 8x in space
    assert isinstance(pipe.denoiser.parameterization, FlowVelocity)
    assert pipe.schedule.spacing == "flow_sigmas" and pipe.schedule.shift == 3.0
    cond = pipe.encode_prompts(["a cat"])
    assert cond.tokens.shape == (1, 512, 32)  # Wan's fixed text length, the encoder's width
    real = int(cond.mask[0].sum())
    assert 2 < real < 512 and cond.tokens[0, real:].abs().sum() == 0  # padding states zeroed, as Wan trains
    assert torch.equal(pipe.encode_prompts([PROMPTS[1]]).tokens, pipe.encode_prompts(["two blue cubes & a cone"]).tokens)
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_pretrained(wan_dir / "transformer", use_safetensors=True).state_dict()
    for key, value in pipe.denoiser.backbone.transformer.state_dict().items():
        assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize(
    "scheduler,sampler,guidance",
    [
        ("UniPCMultistepScheduler", "unipc", 4.0),  # what Wan 2.1 ships
        ("UniPCMultistepScheduler", "unipc", 1.0),  # no guidance: one pass per step
        ("FlowMatchEulerDiscreteScheduler", "flow_euler", 4.0),
        ("DPMSolverMultistepScheduler", "dpmpp_2m", 4.0),
    ],
)
def test_sampling_an_imported_wan_equals_the_diffusers_pipeline(tmp_path, scheduler, sampler, guidance):
    directory = save_tiny_wan(tmp_path / "wan", scheduler=scheduler, shift=3.0, seed=1)
    noise = torch.randn(len(PROMPTS), 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    steps = 8
    reference = _reference(directory, noise, steps, guidance)
    pipe = multidiff.load(directory, device="cpu")
    ours = pipe.generate(PROMPTS, noise=noise, sampler=sampler, steps=steps, guidance_scale=guidance, progress=False,
                         **CLIP)
    assert ours.shape == reference.shape == (2, 3, 9, 16, 16)
    assert reference.std() > 0.01  # not a constant clip: the comparison means something
    diff = (ours - reference).abs().max().item()
    # measured 1e-7 .. 1e-6 (float32 rounding); the issue asks for < 1e-4, the test holds 1e-5, where starting
    # from noise * sigma instead of the pipelines' unit noise (5e-5 for DPM-Solver's grid) already fails
    assert diff < 1e-5, f"max abs difference {diff:.2e} against the diffusers pipeline"


def test_generate_cli_writes_clips_from_a_wan_directory(wan_dir, tmp_path):
    out = tmp_path / "out"
    multidiff_cli("generate", f"model={wan_dir}", "prompt=a red ball", "num_samples=2", "steps=3", f"out={out}",
                  "num_frames=5", "height=24", "width=32", "sampler=unipc", "seed=0")
    from multidiff.adapters.video import read_video

    clips = sorted(out.glob("*.mp4"))
    assert len(clips) == 2
    frames, fps = read_video(clips[0], channels=3)
    assert tuple(frames.shape) == (3, 5, 24, 32) and fps == 16.0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["num_frames"], r["height"], r["width"]) for r in rows] == [(5, 24, 32)] * 2
    gif = tmp_path / "gif"
    multidiff_cli("generate", f"model={wan_dir}", "prompt=a red ball", "steps=2", f"out={gif}", "format=gif",
                  "num_frames=5", "height=16", "width=16")
    assert len(list(gif.glob("*.gif"))) == 1


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda d: edit_json(d / "model_index.json", transformer_2=["diffusers", "WanTransformer3DModel"],
                              boundary_ratio=0.875),
         r"transformer_2=.*Wan 2.2 two-expert .* imports single-transformer Wan 2.1"),
        (lambda d: edit_json(d / "model_index.json", expand_timesteps=True), r"expand_timesteps=True"),
        (lambda d: edit_json(d / "transformer" / "config.json", image_dim=32), r"image-to-video Wan"),
        (lambda d: edit_json(d / "scheduler" / "scheduler_config.json", use_flow_sigmas=False),
         r"use_flow_sigmas=False.*prediction_type=flow_prediction"),
        (lambda d: edit_json(d / "scheduler" / "scheduler_config.json", use_dynamic_shifting=True),
         r"use_dynamic_shifting=True, which multidiff's flow schedule does not implement"),
        (lambda d: edit_json(d / "model_index.json", text_encoder=["transformers", "CLIPTextModel"]),
         r"text_encoder is a CLIPTextModel, not UMT5EncoderModel or T5EncoderModel"),
        (lambda d: shutil.rmtree(d / "transformer"), r"the folder transformer/ is missing"),
    ],
    ids=["wan22-two-experts", "ti2v", "image-to-video", "no-flow-sigmas", "dynamic-shift", "wrong-encoder",
         "missing-transformer"],
)
def test_unimportable_wan_directories_are_refused_in_one_paragraph(wan_dir, tmp_path, damage, expected):
    directory = copy_pipeline(wan_dir, tmp_path)
    damage(directory)
    with pytest.raises(ModelLoadError, match=expected) as info:
        multidiff.load(directory, device="cpu")
    assert "\n" not in str(info.value)
