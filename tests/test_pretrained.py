"""Issue 18 (part): diffusers pipeline directories imported as multidiff models, sampled by the multidiff
core with parity, and refused with one-paragraph errors when they are not importable.

Every pipeline here is a tiny random-weight one that the test builds with diffusers' and transformers'
own classes and saves to a local folder (``tests/tiny_pipelines.py``); a user points the same code at a
real downloaded directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import multidiff_cli
from tiny_pipelines import copy_pipeline, edit_json, save_tiny_stable_diffusion

import multidiff
from multidiff.pipeline import GenerationError, ModelLoadError

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PROMPTS = ["a red square on a blue field", "three green dots"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd")


def _reference(directory: Path, noise: torch.Tensor, steps: int, guidance: float, scheduler=None) -> torch.Tensor:
    """The diffusers pipeline's own output (float32, images in [0, 1])."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(directory), local_files_only=True, use_safetensors=True)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
                    output_type="pt").images.float()


def test_a_stable_diffusion_directory_imports_as_a_multidiff_model(sd_dir):
    from multidiff.core.denoiser import EpsPrediction

    pipe = multidiff.load(sd_dir, device="cpu")
    assert tuple(pipe.adapter.shape) == (3, 16, 16)  # the UNet's 8x8 latents times the autoencoder's factor 2
    assert tuple(pipe.stage.latent_shape()) == (4, 8, 8)
    assert isinstance(pipe.denoiser.parameterization, EpsPrediction)
    assert pipe.schedule.spacing == "trailing"
    cond = pipe.encode_prompts(["a cat"])
    assert cond.tokens.shape == (1, 16, 32)  # the tokenizer's model_max_length, the encoder's width
    # padding kept as Stable Diffusion uses it: the encoder's states at padding positions are not zeroed
    assert cond.tokens[0, -1].abs().sum() > 0
    # the published UNet itself, weights unchanged
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(sd_dir / "unet", use_safetensors=True).state_dict()
    for key, value in pipe.denoiser.backbone.unet.state_dict().items():
        assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize(
    "prediction,scheduler,spacing,offset,sampler",
    [
        ("epsilon", "DDIMScheduler", "trailing", 0, "ddim"),
        ("epsilon", "DDIMScheduler", "leading", 1, "ddim"),  # Stable Diffusion 1.x's own grid
        ("v_prediction", "DDIMScheduler", "trailing", 0, "ddim"),
        ("epsilon", "DPMSolverMultistepScheduler", "trailing", 0, "dpmpp_2m"),
        ("v_prediction", "DPMSolverMultistepScheduler", "linspace", 0, "dpmpp_2m"),
    ],
)
def test_sampling_an_imported_stable_diffusion_equals_the_diffusers_pipeline(tmp_path, prediction, scheduler, spacing,
                                                                             offset, sampler):
    directory = save_tiny_stable_diffusion(tmp_path / "sd", prediction_type=prediction, scheduler=scheduler,
                                           spacing=spacing, steps_offset=offset, seed=1)
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    steps, guidance = 20, 4.0
    reference = _reference(directory, noise, steps, guidance)
    pipe = multidiff.load(directory, device="cpu")
    ours = pipe.generate(PROMPTS, noise=noise, sampler=sampler, steps=steps, guidance_scale=guidance, progress=False)
    assert ours.shape == reference.shape == (2, 3, 16, 16)
    assert reference.std() > 0.01  # not a constant image: the comparison means something
    diff = (ours - reference).abs().max().item()
    assert diff < 1e-4, f"max abs difference {diff:.2e} against the diffusers pipeline"


def test_given_noise_is_the_seeds_noise_when_it_is_the_same_draw(sd_dir):
    from multidiff.core.noise import PerSampleGenerator

    pipe = multidiff.load(sd_dir, device="cpu")
    kw = dict(num_samples=2, seed=5, sampler="dpmpp_2m", steps=6, guidance_scale=3.0, progress=False)
    by_seed = pipe.generate(PROMPTS[:1], **kw)
    noise = PerSampleGenerator([5, 6]).randn((2, 4, 8, 8))
    assert torch.equal(pipe.generate(PROMPTS[:1], noise=noise, **kw), by_seed)
    assert not torch.equal(pipe.generate(PROMPTS[:1], noise=-noise, **kw), by_seed)
    with pytest.raises(GenerationError, match=r"noise has shape \(1, 4, 8, 8\).*\(2, 4, 8, 8\)"):
        pipe.generate(PROMPTS[:1], noise=noise[:1], **kw)


def test_generate_cli_writes_images_from_a_pipeline_directory(sd_dir, tmp_path):
    out = tmp_path / "out"
    multidiff_cli("generate", f"model={sd_dir}", "prompt=a red square", "num_samples=2", "steps=4", f"out={out}",
                  "seed=0")
    from PIL import Image

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (16, 16)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red square"] * 2


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda d: edit_json(d / "model_index.json", _class_name="KandinskyPipeline"),
         r"diffusers KandinskyPipeline, which multidiff does not import; it imports StableDiffusionPipeline"),
        (lambda d: edit_json(d / "model_index.json", _class_name=["my_pipeline", "MyPipeline"]),
         r"custom pipeline.*never runs code"),
        (lambda d: edit_json(d / "model_index.json", unet=["my_unets", "FancyUNet"]), r"takes unet from 'my_unets'.*custom code"),
        (lambda d: shutil.rmtree(d / "unet"), r"cannot be imported: the folder unet/ is missing"),
        (lambda d: (d / "text_encoder" / "model.safetensors").rename(d / "text_encoder" / "pytorch_model.bin"),
         r"text_encoder/ has no safetensors weights \(only pytorch_model.bin: pickled"),
        (lambda d: (d / "scheduler" / "scheduler_config.json").unlink(), r"scheduler/ has no scheduler_config.json"),
        (lambda d: (d / "model_index.json").write_text("{not json"), r"cannot read .*model_index.json as JSON"),
    ],
    ids=["unknown-family", "custom-pipeline", "custom-component", "missing-unet", "pickled-weights",
         "no-scheduler-config", "damaged-index"],
)
def test_unimportable_directories_are_refused_in_one_paragraph(sd_dir, tmp_path, damage, expected):
    directory = copy_pipeline(sd_dir, tmp_path)
    damage(directory)
    with pytest.raises(ModelLoadError, match=expected):
        multidiff.load(directory, device="cpu")


def test_the_cli_refuses_a_half_present_directory_without_a_traceback(sd_dir, tmp_path):
    directory = copy_pipeline(sd_dir, tmp_path)
    shutil.rmtree(directory / "vae")
    proc = multidiff_cli("generate", f"model={directory}", "prompt=x", f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "the folder vae/ is missing" in proc.stderr and "safe_serialization=True" in proc.stderr
    proc = multidiff_cli("generate", f"model={tmp_path}", "prompt=x", f"out={tmp_path / 'o'}", check=False)
    assert "nor a diffusers model_index.json" in proc.stderr and "Traceback" not in proc.stderr
