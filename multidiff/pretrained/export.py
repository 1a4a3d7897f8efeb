"""A multidiff model written as a diffusers pipeline directory that ``DiffusionPipeline.from_pretrained``
loads and runs (the reverse of :mod:`multidiff.pretrained.pipelines`).

Every part must have a diffusers counterpart that computes the same function, or the export is
refused naming the part. Three layouts have one:

* ``StableDiffusionPipeline``: an image model with an ``AutoencoderKL`` stage (global latent scale,
  no shift), a plain conditional diffusers UNet (no coordinate channels, class labels, pooled-prompt
  path or mask channels), a VP schedule with an eps, v or x0 parameterization, and a CLIP text
  encoder used as Stable Diffusion uses it (``padding=keep``, the tokenizer's own length);
* ``StableAudioPipeline``: a windowed waveform model with a raw ``AutoencoderOobleck`` stage, the
  Stable Audio DiT and projection model, an EDM process on an exponential or Karras grid (the
  cosine scheduler where ``c_noise`` is ``atan``), and a T5 encoder with zero null condition;
* ``WanPipeline``: a video model with an ``AutoencoderKLWan`` stage, a ``WanTransformer3DModel``
  backbone, a flow process on one of diffusers' flow grids started from unit noise, and a
  (U)MT5 encoder with its padding zeroed (``padding=mask``).

An imported pipeline, fully fine-tuned or with its LoRA merged, exports; the embedded-data models
(pixel space, MiniLM with masked padding) do not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from multidiff.pretrained.pipelines import PretrainedError

_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_BETAS = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


def _unet(backbone):
    """The diffusers ``UNet2DConditionModel`` inside a multidiff backbone, or why it has no counterpart."""
    from diffusers import UNet2DConditionModel

    unet = getattr(backbone, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        return None, f"the backbone is a {type(backbone).__name__}, not a diffusers UNet2DConditionModel"
    extras = [name for name, value in (("coordinate channels (coord_axes)", getattr(backbone, "coord_axes", ())),
                                       ("class labels (num_classes)", getattr(backbone, "num_classes", None)),
                                       ("a pooled-prompt path (pooled_dim)", getattr(backbone, "pooled_dim", None)),
                                       ("mask channels (concat_channels)", getattr(backbone, "concat_channels", 0)))
              if value]
    if extras:
        return None, f"the backbone's UNet has {', '.join(extras)}, which StableDiffusionPipeline does not feed"
    return unet, None


_TRANSFORMER_FAMILIES = {"WanTransformer3DModel": "WanPipeline", "StableAudioDiTModel": "StableAudioPipeline"}


def diffusers_family(pipe) -> str:
    """The diffusers pipeline class ``pipe`` would be written as: ``WanPipeline`` for a Wan transformer
    backbone, ``StableAudioPipeline`` for a Stable Audio DiT, else ``StableDiffusionPipeline``."""
    name = type(getattr(pipe.denoiser.backbone, "transformer", None)).__name__
    return _TRANSFORMER_FAMILIES.get(name, "StableDiffusionPipeline")


def diffusers_problems(pipe) -> list[str]:
    """What keeps ``pipe`` (a :class:`~multidiff.pipeline.Pipeline`) from being a diffusers pipeline of
    :func:`diffusers_family`'s class; [] if nothing."""
    family = diffusers_family(pipe)
    if family == "WanPipeline":
        return _wan_problems(pipe)
    if family == "StableAudioPipeline":
        return _stable_audio_problems(pipe)
    return _sd_problems(pipe)


def _sd_problems(pipe) -> list[str]:
    from multidiff.core.denoiser import _VPTimestep
    from multidiff.core.schedules import VPSchedule

    problems = []
    if getattr(pipe, "modality", None) is not None:
        problems.append("it is one modality of a model of several")
    if len(pipe.adapter.shape) != 3:
        problems.append(f"its items are {tuple(pipe.adapter.shape)}, not images (C, H, W)")
    model = getattr(pipe.stage, "model", None)
    if type(model).__name__ != "AutoencoderKL" or getattr(pipe.stage, "per_frame", False):
        problems.append("its latent stage is not a diffusers AutoencoderKL (autoencoder=diffusers with a Stable "
                        "Diffusion VAE); a pixel-space model has no VAE for the pipeline")
    elif bool((pipe.stage.latent_shift != 0).any()) or pipe.stage.latent_scale.unique().numel() != 1:
        problems.append("its latent normalization has a shift or per-channel scales, where the pipeline has one "
                        "scaling_factor")
    problems += [p for p in [_unet(pipe.denoiser.backbone)[1]] if p]
    param, schedule = pipe.denoiser.parameterization, pipe.schedule
    if not isinstance(param, _VPTimestep) or not isinstance(schedule, VPSchedule):
        problems.append(f"its process ({type(param).__name__}, {type(schedule).__name__}) is not a VP schedule with "
                        "eps, v or x0 prediction, which diffusers' DDIM scheduler runs")
    elif schedule.shift != 1.0:
        problems.append("its VP schedule is shifted (diffusion.schedule.shift != 1), which no diffusers scheduler has")
    elif schedule.spacing == "karras":
        problems.append("its VP schedule samples a Karras grid, which diffusers' DDIM scheduler does not")
    cond = pipe.conditioner
    text = getattr(cond, "model", None)
    if type(text).__name__ != "CLIPTextModel":
        problems.append(f"its text encoder is a {type(text).__name__}, not the CLIPTextModel the pipeline calls")
    elif getattr(cond, "padding", "mask") != "keep" or cond.max_length != int(cond.tokenizer.model_max_length):
        problems.append("its text encoder masks padding (conditioning.encoder.padding=mask) or keeps another length "
                        "than the tokenizer's, where the pipeline encodes model_max_length tokens unmasked")
    return problems


def _flow_scheduler(pipe):
    """The diffusers flow scheduler whose grid is the model's (see FlowSchedule's spacings), or None."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    s = pipe.schedule
    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=s.shift,
                num_train_timesteps=s.num_train_timesteps)
    if s.spacing == "flow_match_euler":
        return FlowMatchEulerDiscreteScheduler(shift=s.shift, num_train_timesteps=s.num_train_timesteps)
    if s.spacing == "flow_sigmas":
        return UniPCMultistepScheduler(**flow)
    if abs(s.t_max - (1 - 1 / s.num_train_timesteps)) < 1e-9:
        return DPMSolverMultistepScheduler(**flow)
    return None


def _wan_problems(pipe) -> list[str]:
    from multidiff.core.denoiser import FlowVelocity
    from multidiff.core.schedules import FlowSchedule

    problems = []
    if getattr(pipe, "modality", None) is not None:
        problems.append("it is one modality of a model of several")
    if len(pipe.adapter.shape) != 4:
        problems.append(f"its items are {tuple(pipe.adapter.shape)}, not clips (C, T, H, W)")
    if type(getattr(pipe.stage, "model", None)).__name__ != "AutoencoderKLWan":
        problems.append("its latent stage is not a diffusers AutoencoderKLWan")
    if getattr(pipe.denoiser.backbone, "concat_channels", 0):
        problems.append("its transformer takes mask channels (concat_channels), which WanPipeline does not feed")
    param, schedule = pipe.denoiser.parameterization, pipe.schedule
    if not (isinstance(param, FlowVelocity) and isinstance(schedule, FlowSchedule)):
        problems.append(f"its process ({type(param).__name__}, {type(schedule).__name__}) is not flow matching")
    else:
        if not param.unit_start or param.time_scale != schedule.num_train_timesteps:
            problems.append("its flow process starts from noise * sigma or scales time by another factor than "
                            "num_train_timesteps, where WanPipeline starts from unit noise at t * num_train_timesteps")
        if _flow_scheduler(pipe) is None:
            problems.append(f"its flow grid (spacing {schedule.spacing}, t_max {schedule.t_max}) is none of diffusers' "
                            "flow schedulers' grids")
        elif schedule.spacing == "flow_match_euler" and getattr(pipe.denoiser.backbone, "truncate_timesteps", False):
            problems.append("its transformer truncates timesteps, which FlowMatchEulerDiscreteScheduler does not")
    cond = pipe.conditioner
    text = type(getattr(cond, "model", None)).__name__
    if text not in ("UMT5EncoderModel", "T5EncoderModel"):
        problems.append(f"its text encoder is a {text}, not the (U)MT5 encoder WanPipeline calls")
    elif getattr(cond, "padding", None) != "mask":
        problems.append("its text encoder keeps padding states (padding=keep), where WanPipeline zeroes them")
    return problems


def _stable_audio_problems(pipe) -> list[str]:
    from multidiff.core.denoiser import EDMPrecond
    from multidiff.core.schedules import ExponentialSchedule, KarrasSchedule

    problems = []
    if getattr(pipe, "modality", None) is not None:
        problems.append("it is one modality of a model of several")
    adapter, backbone = pipe.adapter, pipe.denoiser.backbone
    waveform = type(adapter).__name__ == "WaveformAdapter"  # (adapters sit above this layer: by name)
    if not (waveform and adapter.window):
        problems.append("its adapter is not a windowed waveform (modality.window=true), which StableAudioPipeline "
                        "generates")
    model = getattr(pipe.stage, "model", None)
    if type(model).__name__ != "AutoencoderOobleck":
        problems.append("its latent stage is not a diffusers AutoencoderOobleck")
    elif bool((pipe.stage.latent_shift != 0).any()) or bool((pipe.stage.latent_scale != 1).any()):
        problems.append("its latents are normalized (shift or scale), where StableAudioPipeline uses them raw")
    elif waveform and \
            tuple(pipe.stage.latent_shape(adapter.shape))[-1] != int(backbone.transformer.config.sample_size):
        problems.append("its window is not the transformer's sample_size, which the pipeline always generates")
    if getattr(backbone, "concat_channels", 0):
        problems.append("its transformer takes mask channels (concat_channels), which StableAudioPipeline does not feed")
    param, schedule = pipe.denoiser.parameterization, pipe.schedule
    if not (isinstance(param, EDMPrecond) and param.marginal_start
            and isinstance(schedule, ExponentialSchedule | KarrasSchedule)):
        problems.append(f"its process ({type(param).__name__}, {type(schedule).__name__}) is not EDM with diffusers' "
                        "start (marginal_start) on an exponential or Karras grid")
    cond = pipe.conditioner
    text = type(getattr(cond, "model", None)).__name__
    if text != "T5EncoderModel":
        problems.append(f"its text encoder is a {text}, not the T5EncoderModel StableAudioPipeline calls")
    elif getattr(cond, "padding", None) != "mask" or getattr(cond, "null_kind", None) != "zeros" or \
            cond.max_length != int(cond.tokenizer.model_max_length):
        problems.append("its text conditioner is not the pipeline's (padding=mask, null=zeros, the tokenizer's "
                        "model_max_length)")
    return problems


def _edm_scheduler(pipe):
    from diffusers import CosineDPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

    from multidiff.core.schedules import KarrasSchedule

    param, schedule = pipe.denoiser.parameterization, pipe.schedule
    grid = dict(sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max, sigma_data=param.sigma_data,
                prediction_type="v_prediction" if param.sign < 0 else "epsilon", final_sigmas_type="zero")
    if isinstance(schedule, KarrasSchedule):
        grid.update(sigma_schedule="karras", rho=schedule.rho)
    else:
        grid.update(sigma_schedule="exponential")
    if param.noise_map == "atan":
        return CosineDPMSolverMultistepScheduler(**grid)
    return EDMDPMSolverMultistepScheduler(**grid, algorithm_type="dpmsolver++")


def _stable_audio_pipeline(pipe):
    from diffusers import StableAudioPipeline

    backbone = pipe.denoiser.backbone
    return StableAudioPipeline(vae=pipe.stage.model, text_encoder=pipe.conditioner.model,
                               projection_model=backbone.projection, tokenizer=pipe.conditioner.tokenizer,
                               transformer=backbone.transformer, scheduler=_edm_scheduler(pipe))


def export_diffusers(pipe, out: str | Path) -> Path:
    """Write ``pipe`` as a diffusers pipeline directory in ``out`` (atomically): a StableDiffusionPipeline
    (a scheduler config for DDIM with the model's betas, spacing and prediction type) or a WanPipeline
    (the flow scheduler of the model's grid), or raise :class:`PretrainedError` naming every part
    without a diffusers counterpart."""
    from multidiff.atomic import replace_directory

    family = diffusers_family(pipe)
    problems = diffusers_problems(pipe)
    if problems:
        raise PretrainedError(f"this model cannot be written as a diffusers {family}: "
                              + "; ".join(problems) + ". Export it as a multidiff model instead (format=multidiff)")
    built = {"WanPipeline": _wan_pipeline, "StableAudioPipeline": _stable_audio_pipeline}.get(family, _sd_pipeline)(pipe)

    def fill(tmp: Path) -> None:
        with torch.no_grad():
            built.save_pretrained(str(tmp), safe_serialization=True)

    return replace_directory(Path(out), fill)


def _wan_pipeline(pipe):
    from diffusers import WanPipeline

    vae = pipe.stage.model
    scale = pipe.stage.latent_scale.detach().double()  # the stage's (z - shift) * scale as latents_mean / latents_std
    vae.register_to_config(latents_mean=[float(v) for v in pipe.stage.latent_shift],
                           latents_std=[float(v) for v in 1.0 / scale])
    return WanPipeline(tokenizer=pipe.conditioner.tokenizer, text_encoder=pipe.conditioner.model, vae=vae,
                       transformer=pipe.denoiser.backbone.transformer, scheduler=_flow_scheduler(pipe))


def _sd_pipeline(pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    schedule, param = pipe.schedule, pipe.denoiser.parameterization
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_train_timesteps, beta_schedule=_BETAS[schedule.beta_schedule],
        beta_start=schedule.beta_start, beta_end=schedule.beta_end, prediction_type=_PREDICTION[param.prediction],
        timestep_spacing=schedule.spacing, steps_offset=schedule.steps_offset,
        clip_sample=False, set_alpha_to_one=True)
    vae = pipe.stage.model
    vae.register_to_config(scaling_factor=float(pipe.stage.latent_scale[0]))
    unet, _ = _unet(pipe.denoiser.backbone)
    return StableDiffusionPipeline(vae=vae, text_encoder=pipe.conditioner.model, tokenizer=pipe.conditioner.tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
