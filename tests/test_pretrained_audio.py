"""Issue 18 (part): diffusers ``StableAudioPipeline`` directories (StableAudioDiTModel, AutoencoderOobleck,
T5 and the projection model) imported as multidiff waveform models, sampled by the multidiff core with
parity against the diffusers pipeline for both of its schedulers, written as WAV, exported back, and
refused in one paragraph when not importable.

The pipelines are tiny random-weight ones built with diffusers' and transformers' own classes and saved
to a local folder by the test (``tests/tiny_pipelines.py``), as diffusers' own Stable Audio tests build them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from helpers import multidiff_cli
from tiny_pipelines import copy_pipeline, edit_json, save_tiny_stable_audio

import multidiff
from multidiff.core.noise import PerSampleGenerator
from multidiff.core.samplers import sample_dpmpp_2m_sde
from multidiff.pipeline import GenerationError, ModelLoadError

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

PROMPTS = ["a dog barks twice", "rain on a tin roof"]
DURATION = 0.08  # seconds: 80 of the tiny model's 128-sample window at 1 kHz
LATENT = (4, 32)  # the tiny DiT's channels and sample_size


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    return save_tiny_stable_audio(tmp_path_factory.mktemp("sa") / "tiny-stable-audio")


def _reference(directory: Path, noise: torch.Tensor, steps: int, guidance: float, *, negative: str | None = None,
               seed: int = 0) -> torch.Tensor:
    """The diffusers StableAudioPipeline's own output, (B, channels, samples), float32."""
    from diffusers import StableAudioPipeline

    pipe = StableAudioPipeline.from_pretrained(str(directory), local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
                    audio_end_in_s=DURATION, negative_prompt=None if negative is None else [negative] * len(PROMPTS),
                    generator=torch.Generator().manual_seed(seed)).audios.float()


def test_a_stable_audio_directory_imports_as_a_multidiff_waveform_model(audio_dir):
    from multidiff.adapters.waveform import WaveformAdapter
    from multidiff.core.denoiser import EDMPrecond
    from multidiff.core.schedules import ExponentialSchedule

    pipe = multidiff.load(audio_dir, device="cpu")
    assert isinstance(pipe.adapter, WaveformAdapter) and pipe.adapter.window
    assert tuple(pipe.adapter.shape) == (2, 128) and pipe.adapter.sample_rate == 1000  # sample_size x hop 4, stereo
    assert tuple(pipe.stage.latent_shape((2, 128))) == LATENT
    param = pipe.denoiser.parameterization
    assert isinstance(param, EDMPrecond) and param.sigma_data == 1.0 and param.sign == -1.0 and param.noise_map == "log"
    assert isinstance(pipe.schedule, ExponentialSchedule) and (pipe.schedule.sigma_min, pipe.schedule.sigma_max) == (0.3, 500.0)
    cond = pipe.encode_prompts(["a cat"])
    assert cond.tokens.shape == (1, 16, 8)  # the tokenizer's model_max_length, T5's width
    null = pipe.conditioner.null()
    assert not null.mask.any() and null.tokens.abs().sum() == 0  # Stable Audio's unconditional branch: zeros
    assert null.tokens.shape == cond.tokens.shape and null.pooled.shape == cond.pooled.shape  # no encoder call, same shapes
    assert null.tokens.dtype == cond.tokens.dtype and null.mask.dtype == cond.mask.dtype
    assert pipe.adapter.condition_inputs(duration=0.1) == {"seconds": [0.0, 0.1]}
    from diffusers import StableAudioDiTModel

    ref = StableAudioDiTModel.from_pretrained(audio_dir / "transformer", use_safetensors=True).state_dict()
    for key, value in pipe.denoiser.backbone.transformer.state_dict().items():
        assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize("guidance,negative", [(7.0, None), (1.0, None), (4.0, "low quality")],
                         ids=["guided", "unguided", "negative-prompt"])
def test_sampling_an_imported_stable_audio_equals_the_diffusers_pipeline(audio_dir, guidance, negative):
    noise = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(3))
    reference = _reference(audio_dir, noise, 8, guidance, negative=negative)
    pipe = multidiff.load(audio_dir, device="cpu")
    ours = pipe.generate(PROMPTS, noise=noise, sampler="dpmpp_2m", steps=8, guidance_scale=guidance,
                         negative_prompt=negative, duration=DURATION, progress=False)
    assert ours.shape == reference.shape == (2, 2, 80)
    assert reference.std() > 0.01
    diff = (ours - reference).abs().max().item()
    # measured 3e-7 (float32 rounding); the issue asks < 1e-4. Seen red: the duration tokens kept in the
    # unconditional branch (6e-3 guided, 1.4e-2 with the negative prompt), the whole window's seconds instead of
    # the requested duration's (1e-4 .. 1e-3, every case)
    assert diff < 1e-5, f"max abs difference {diff:.2e} against the diffusers pipeline"


class _Replay(PerSampleGenerator):
    """Hands the sampler given noise tensors, in order, instead of drawing its own."""

    def __init__(self, noises: list[torch.Tensor]) -> None:
        super().__init__([0])
        self.noises = list(noises)

    def randn(self, shape, *, dtype=torch.float32, device="cpu"):
        noise = self.noises.pop(0)
        assert tuple(noise.shape) == tuple(shape)
        return noise.to(device=device, dtype=dtype)


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_the_published_cosine_sde_scheduler_equals_dpmpp_2m_sde_given_its_brownian_noise(tmp_path, guidance):
    """stable-audio-open ships CosineDPMSolverMultistepScheduler: SDE-DPM-Solver++(2M) whose noise comes
    from torchsde's Brownian tree. multidiff's ``dpmpp_2m_sde`` draws Gaussian noise per step from the
    seeds; handed the tree's increments instead, it reproduces the pipeline."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    directory = save_tiny_stable_audio(tmp_path / "sa", scheduler="CosineDPMSolverMultistepScheduler", seed=1)
    noise = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(3))
    seed = 7
    reference = _reference(directory, noise, 8, guidance, seed=seed)
    pipe = multidiff.load(directory, device="cpu")
    assert pipe.denoiser.parameterization.noise_map == "atan"

    def replayed(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
        tree = BrownianTreeNoiseSampler(x, sigma_min=0.3, sigma_max=500.0, seed=seed)
        noises = [tree(s, s_next) for s, s_next in zip(sigmas[:-1], sigmas[1:]) if s_next > 0]
        return sample_dpmpp_2m_sde(denoiser, x, sigmas, cond=cond, generator=_Replay(noises), callback=callback)

    ours = pipe.generate(PROMPTS, noise=noise, sampler=replayed, steps=8, guidance_scale=guidance, duration=DURATION,
                         progress=False)
    diff = (ours - reference).abs().max().item()
    assert diff < 1e-5, f"max abs difference {diff:.2e} against the diffusers pipeline"
    own = pipe.generate(PROMPTS, noise=noise, sampler="dpmpp_2m_sde", steps=8, guidance_scale=guidance,
                        duration=DURATION, progress=False)
    assert (own - reference).abs().max() > 1e-2  # the noise matters: the parity above is not vacuous


def test_generate_cli_writes_stereo_wavs_of_the_requested_duration(audio_dir, tmp_path):
    out = tmp_path / "out"
    multidiff_cli("generate", f"model={audio_dir}", "prompt=a dog barks", "num_samples=2", "steps=3", f"out={out}",
                  "duration=0.096", "sampler=dpmpp_2m_sde", "seed=0", "guidance_scale=7")
    wavs = sorted(out.glob("*.wav"))
    assert len(wavs) == 2
    data, rate = sf.read(str(wavs[0]), always_2d=True)
    assert rate == 1000 and data.shape == (96, 2)  # 0.096 s at 1 kHz, stereo
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["duration"], r["channels"], r["sample_rate"]) for r in rows] == [(0.096, 2, 1000)] * 2


def test_a_duration_longer_than_the_window_is_refused_with_the_longest(audio_dir):
    pipe = multidiff.load(audio_dir, device="cpu")
    with pytest.raises(GenerationError, match=r"duration=0.2 is longer than this model's 0.128 s window.*duration=0.128"):
        pipe.generate("a dog", steps=2, duration=0.2, progress=False)


def test_the_requested_duration_conditions_the_model(audio_dir):
    """The window is always sampled whole; the duration enters as the seconds tokens and the global
    embedding (Stable Audio was trained with silence after the end), the whole window where none is given."""
    from multidiff.core.cond import with_input

    pipe = multidiff.load(audio_dir, device="cpu")
    backbone, cond = pipe.denoiser.backbone, pipe.encode_prompts(["a dog"])
    x, t = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    with torch.no_grad():
        short, whole = (backbone(x, t, with_input(cond, seconds=torch.tensor([[0.0, s]]))) for s in (0.064, 0.128))
        # the tiny random DiT responds weakly (measured 9e-4 of the output's scale); equal seconds give equal outputs
        assert (short - whole).abs().max() > 1e-4 * whole.abs().max()
        assert torch.equal(backbone(x, t, cond), whole)
        null = pipe.conditioner.null()  # the unconditional branch: text and seconds tokens zero, globals kept
        short_null, whole_null = (backbone(x, t, with_input(null, seconds=torch.tensor([[0.0, s]])))
                                  for s in (0.064, 0.128))
        assert (short_null - whole_null).abs().max() > 1e-4 * whole_null.abs().max()
    samples = pipe.generate("a dog", steps=2, duration=0.064, progress=False)
    assert samples.shape == (1, 2, 64)


def test_an_imported_stable_audio_exports_to_diffusers_and_stands_alone(audio_dir, tmp_path):
    from diffusers import StableAudioPipeline

    source = Path(shutil.copytree(audio_dir, tmp_path / "source"))
    plain, back = tmp_path / "plain", tmp_path / "diffusers"
    multidiff_cli("export", f"model={source}", f"out={plain}")
    multidiff_cli("export", f"model={source}", f"out={back}", "format=diffusers")
    noise = torch.randn(len(PROMPTS), *LATENT, generator=torch.Generator().manual_seed(5))
    expected = multidiff.load(source, device="cpu").generate(PROMPTS, noise=noise, steps=5, guidance_scale=5.0,
                                                             duration=DURATION, progress=False)
    shutil.rmtree(source)  # the exports hold every part themselves
    moved = Path(shutil.move(str(plain), str(tmp_path / "moved")))
    again = multidiff.load(moved, device="cpu").generate(PROMPTS, noise=noise, steps=5, guidance_scale=5.0,
                                                          duration=DURATION, progress=False)
    assert torch.equal(again, expected)
    exported = StableAudioPipeline.from_pretrained(str(back), local_files_only=True, use_safetensors=True)
    exported.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = exported(PROMPTS, latents=noise.clone(), num_inference_steps=5, guidance_scale=5.0,
                          audio_end_in_s=DURATION).audios
    assert (theirs - expected).abs().max() < 1e-5
    imported = multidiff.load(back, device="cpu").generate(PROMPTS, noise=noise, steps=5, guidance_scale=5.0,
                                                           duration=DURATION, progress=False)
    assert (imported - expected).abs().max() < 1e-6


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    """A folder of captioned stereo tones at the tiny model's 1 kHz (0.1 s each, shorter than the window)."""
    import numpy as np

    folder = tmp_path_factory.mktemp("tones")
    rows = []
    for i, freq in enumerate((50, 100, 150, 200)):
        t = np.arange(100) / 1000
        wave = 0.5 * np.sin(2 * np.pi * freq * t)
        sf.write(str(folder / f"tone{i}.wav"), np.stack([wave, 0.5 * wave], 1), 1000)
        rows.append(json.dumps({"file_name": f"tone{i}.wav", "text": f"a tone at {freq} hertz"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_stable_audio_fine_tunes_with_lora_on_a_folder_of_wavs(audio_dir, tones, tmp_path, data_root):
    """LoRA on the DiT's attention and on the T5 encoder, trained on the user's own WAVs through the CLI."""
    run = tmp_path / "run"
    multidiff_cli("train", "recipe=audio_notes", f"init_from={audio_dir}", "lora.rank=4", "lora.text_encoder=true",
                  "data=audio_folder",
                  f"data.dataset.root={tones}", "data.batch_size=4", "trainer.max_steps=6", "optimizer.lr=5e-2",
                  "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false", "+trainer.enable_progress_bar=false",
                  f"run_dir={run}", f"data_root={data_root}")
    model = run / "model"
    assert (model / "lora.safetensors").is_file() and (model / "text_encoder" / "lora.safetensors").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    from diffusers import StableAudioDiTModel

    ref = StableAudioDiTModel.from_pretrained(audio_dir / "transformer", use_safetensors=True).state_dict()
    prefix = "denoiser.backbone.transformer."
    lora_b = [k for k in ckpt if k.startswith(prefix) and ".lora_B." in k]
    assert lora_b and any(ckpt[k].abs().max() > 0 for k in lora_b), "training did not move any LoRA weight"
    for key, value in ckpt.items():  # every base weight is the published one
        if key.startswith(prefix) and ".lora_" not in key:
            assert torch.equal(value, ref[key[len(prefix):].replace(".base_layer.", ".")]), key
    gen = dict(steps=4, guidance_scale=5.0, duration=0.1, progress=False)
    base = multidiff.load(audio_dir, device="cpu").generate(["a tone at 100 hertz"], **gen)
    tuned = multidiff.load(model, device="cpu").generate(["a tone at 100 hertz"], **gen)
    assert tuned.shape == (1, 2, 100) and (tuned - base).abs().max() > 1e-3  # measured 2.4e-3
    zero = multidiff.load(audio_dir, device="cpu", lora=[str(model)], lora_scale=[0.0]).generate(
        ["a tone at 100 hertz"], **gen)
    # lora_scale=0 is the base to float32 rounding, not bit for bit as for SD and Wan: the DiT's proj_in runs on
    # a transposed input, whose matmul rounds differently with the weights' memory alignment (measured 1.2e-7
    # between a Linear and a clone of its own weight; 3e-7 here after the sampler)
    assert (zero - base).abs().max() < 2e-6


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda d: shutil.rmtree(d / "projection_model"), r"the folder projection_model/ is missing"),
        (lambda d: edit_json(d / "model_index.json", projection_model=["my_package", "StableAudioProjectionModel"]),
         r"takes projection_model from 'my_package'.*custom code.*from stable_audio"),
        (lambda d: edit_json(d / "model_index.json", scheduler=["diffusers", "DDIMScheduler"]),
         r"scheduler is a DDIMScheduler, not EDMDPMSolverMultistepScheduler or CosineDPMSolverMultistepScheduler"),
        (lambda d: edit_json(d / "scheduler" / "scheduler_config.json", final_sigmas_type="sigma_min"),
         r"final_sigmas_type='sigma_min', which multidiff's EDM schedule does not implement"),
        (lambda d: edit_json(d / "projection_model" / "config.json", text_encoder_dim=16),
         r"projection_model/ takes 16-wide text but text_encoder/ makes 8-wide tokens"),
        (lambda d: [p.unlink() for p in (d / "transformer").glob("*.safetensors")],
         r"transformer/ has no safetensors weights"),
    ],
    ids=["missing-projection", "custom-projection", "vp-scheduler", "final-sigma-min", "text-width", "no-weights"],
)
def test_unimportable_stable_audio_directories_are_refused_in_one_paragraph(audio_dir, tmp_path, damage, expected):
    directory = copy_pipeline(audio_dir, tmp_path)
    damage(directory)
    with pytest.raises(ModelLoadError, match=expected) as info:
        multidiff.load(directory, device="cpu")
    assert "\n" not in str(info.value)
