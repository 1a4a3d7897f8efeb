"""A diffusers pipeline directory (``model_index.json``) as a multidiff model config.

:func:`pipeline_config` reads only JSON (the pipeline's index and each component's config), checks
that the directory is one family multidiff imports and that every part it needs is present with
safetensors weights, and returns an ordinary multidiff model config whose parts load those folders:
the adapter sized from the UNet and the autoencoder, :class:`~multidiff.autoencoders.diffusers_vae.DiffusersAutoencoder`
on ``vae/``, a backbone wrapping the published network unchanged, the scheduler's betas and
prediction type as a :class:`~multidiff.core.schedules.VPSchedule` and parameterization in the
sigma frame, and a :class:`~multidiff.conditioning.text.TextConditioner` on the pipeline's own
``tokenizer/`` and ``text_encoder/``. Nothing in the directory is executed: no custom pipeline
code (an index that names any is refused), no pickled weights (``.bin`` / ``.ckpt`` are refused,
weights load with ``use_safetensors=True``), only ``multidiff.`` classes are built.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
LIBRARIES = ("diffusers", "transformers")


class PretrainedError(ValueError):
    """A directory is not a diffusers pipeline multidiff can import, or parts of it are missing."""


@dataclass(frozen=True)
class Component:
    """One folder of a pipeline: the classes it may hold and what must be in it."""

    library: str
    classes: tuple[str, ...]
    files: tuple[str, ...]  # one of these must exist (a config)
    weights: bool = False  # a model: safetensors weights required


@dataclass(frozen=True)
class Family:
    components: dict[str, Component]
    config: Callable[[Path, dict[str, dict], dict], DictConfig]  # (directory, component configs, index)
    modality: str


# -- Stable Diffusion ---------------------------------------------------------------------------

_VP_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                  "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                  "LMSDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
                  "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler")
_BETAS = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "multidiff.core.denoiser.EpsPrediction", "v_prediction": "multidiff.core.denoiser.VPrediction",
                "sample": "multidiff.core.denoiser.X0Prediction"}


def vp_diffusion(scheduler: dict, where: Path) -> dict:
    """A VP scheduler's config (betas, spacing, prediction type) as multidiff's ``diffusion`` node."""

    def refuse(what: str) -> PretrainedError:
        return PretrainedError(f"{where} asks for {what}, which multidiff's VP schedule does not implement; "
                               "supported: beta_schedule linear, scaled_linear or squaredcos_cap_v2, no trained_betas, "
                               "no rescale_betas_zero_snr, prediction_type epsilon, v_prediction or sample")

    kind = scheduler.get("beta_schedule", "linear")
    if kind not in _BETAS:
        raise refuse(f"beta_schedule={kind!r}")
    if scheduler.get("trained_betas") is not None:
        raise refuse("a trained_betas table")
    if scheduler.get("rescale_betas_zero_snr"):
        raise refuse("rescale_betas_zero_snr=true")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise refuse(f"prediction_type={prediction!r}")
    spacing = "karras" if scheduler.get("use_karras_sigmas") else scheduler.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace", "karras"):
        raise refuse(f"timestep_spacing={spacing!r}")
    schedule = {
        "_target_": "multidiff.core.schedules.VPSchedule", "beta_schedule": _BETAS[kind],
        "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "beta_start": float(scheduler.get("beta_start", 0.0001)), "beta_end": float(scheduler.get("beta_end", 0.02)),
        "spacing": spacing, "steps_offset": int(scheduler.get("steps_offset", 0) or 0),
    }
    return {"schedule": schedule,
            "parameterization": {"_target_": _PREDICTIONS[prediction], "schedule": "${..schedule}"},
            "noise": {"_target_": "multidiff.core.noise.DiscreteTimestepSigma", "schedule": "${..schedule}"},
            "loss_weighting": "none", "noise_prior": None}


def _stable_diffusion(path: Path, configs: dict[str, dict], index: dict) -> DictConfig:
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    size = unet.get("sample_size", 64)
    size = [int(size) * factor] * 2 if isinstance(size, int) else [int(s) * factor for s in size]
    if int(unet["in_channels"]) != int(vae["latent_channels"]):
        raise PretrainedError(f"{path}: unet/ takes {unet['in_channels']} channels but vae/ makes "
                              f"{vae['latent_channels']}-channel latents (an inpainting or other variant UNet?); "
                              "multidiff imports text-to-image Stable Diffusion pipelines")
    if int(unet["cross_attention_dim"]) != int(text["hidden_size"]):
        raise PretrainedError(f"{path}: unet/ cross-attends to {unet['cross_attention_dim']}-wide tokens but "
                              f"text_encoder/ makes {text['hidden_size']}-wide ones")
    cfg = {
        "modality": {"_target_": "multidiff.adapters.image.ImageAdapter", "size": size,
                     "channels": int(vae.get("in_channels", 3))},
        "autoencoder": {"_target_": "multidiff.autoencoders.diffusers_vae.DiffusersAutoencoder",
                        "path": str(path / "vae"), "scale_mode": "pretrained"},
        "backbone": {"_target_": "multidiff.backbones.pretrained.PretrainedUNet2D", "path": str(path / "unet")},
        "diffusion": vp_diffusion(configs["scheduler"], path / "scheduler"),
        "conditioning": {
            "encoder": {"_target_": "multidiff.conditioning.text.TextConditioner", "encoder": str(path),
                        "tokenizer_subfolder": "tokenizer", "encoder_subfolder": "text_encoder",
                        "max_length": None, "padding": "keep", "sha256": None},
            "dim": int(text["hidden_size"]), "dropout": 0.1},
        "pretrained": {"family": "StableDiffusionPipeline", "path": str(path)},
    }
    return OmegaConf.create(cfg)


_SD_COMPONENTS = {
    "unet": Component("diffusers", ("UNet2DConditionModel",), ("config.json",), weights=True),
    "vae": Component("diffusers", ("AutoencoderKL",), ("config.json",), weights=True),
    "text_encoder": Component("transformers", ("CLIPTextModel",), ("config.json",), weights=True),
    "tokenizer": Component("transformers", ("CLIPTokenizer", "CLIPTokenizerFast"),
                           ("tokenizer.json", "vocab.json", "tokenizer_config.json")),
    "scheduler": Component("diffusers", _VP_SCHEDULERS, ("scheduler_config.json",)),
}

# -- Wan 2.1 (text to video) ---------------------------------------------------------------------

_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


def flow_diffusion(scheduler: dict, where: Path) -> dict:
    """A flow-matching scheduler's config (shift, grid) as multidiff's ``diffusion`` node: diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (``shift``) or a multistep scheduler with ``use_flow_sigmas``
    and ``prediction_type=flow_prediction`` (``flow_shift``)."""
    name = scheduler.get("_class_name")

    def refuse(what: str) -> PretrainedError:
        return PretrainedError(f"{where} ({name}) asks for {what}, which multidiff's flow schedule does not implement; "
                               "supported: a fixed shift, no dynamic shifting, no shift_terminal, no karras, exponential "
                               "or beta sigmas, no inverted sigmas or stochastic sampling")

    for key in ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"):
        if scheduler.get(key):
            raise refuse(f"{key}={scheduler[key]!r}")
    if name == "FlowMatchEulerDiscreteScheduler":
        shift, spacing = scheduler.get("shift", 1.0), "flow_match_euler"
    else:
        if not scheduler.get("use_flow_sigmas") or scheduler.get("prediction_type") != "flow_prediction":
            raise refuse(f"use_flow_sigmas={scheduler.get('use_flow_sigmas')!r} with "
                         f"prediction_type={scheduler.get('prediction_type')!r} (a flow model's {name} has "
                         "use_flow_sigmas=true and prediction_type=flow_prediction)")
        if scheduler.get("final_sigmas_type", "zero") != "zero":
            raise refuse(f"final_sigmas_type={scheduler.get('final_sigmas_type')!r}")
        # UniPC's flow grid starts at t = 1; DPM-Solver's is uniform from 1 - 1/T (diffusers' two flow grids)
        shift, spacing = scheduler.get("flow_shift", 1.0), "flow_sigmas" if name == "UniPCMultistepScheduler" else "uniform"
    shift, steps = float(shift or 1.0), int(scheduler.get("num_train_timesteps", 1000))
    return {"schedule": {"_target_": "multidiff.core.schedules.FlowSchedule", "shift": shift, "spacing": spacing,
                         "num_train_timesteps": steps, "t_max": 1.0 - 1.0 / steps},
            "parameterization": {"_target_": "multidiff.core.denoiser.FlowVelocity", "time_scale": float(steps),
                                 "unit_start": True},  # the pipelines start from latents = noise
            "noise": {"_target_": "multidiff.core.noise.LogitNormalFlowSigma", "mean": 0.0, "std": 1.0, "shift": shift},
            "loss_weighting": "none", "noise_prior": None}


WAN_DEFAULTS = {"height": 480, "width": 832, "num_frames": 81, "fps": 16.0, "max_length": 512}
"""What ``WanPipeline.__call__`` defaults to (and Wan's 16 fps); generate takes ``height``, ``width``,
``num_frames`` per call."""


def _wan(path: Path, configs: dict[str, dict], index: dict) -> DictConfig:
    transformer, vae, text = configs["transformer"], configs["vae"], configs["text_encoder"]
    for key, fine in (("transformer_2", lambda v: v in (None, [None, None])), ("boundary_ratio", lambda v: v is None),
                      ("expand_timesteps", lambda v: not v)):
        if not fine(index.get(key)):
            raise PretrainedError(
                f"{path}/model_index.json sets {key}={index.get(key)!r}: a Wan 2.2 two-expert or TI2V pipeline, which "
                "multidiff does not import; it imports single-transformer Wan 2.1 text-to-video pipelines")
    if int(transformer["in_channels"]) != int(vae["z_dim"]):
        raise PretrainedError(f"{path}: transformer/ takes {transformer['in_channels']} channels but vae/ makes "
                              f"{vae['z_dim']}-channel latents (an image-to-video or other variant?); multidiff imports "
                              "text-to-video Wan pipelines")
    if transformer.get("image_dim") is not None:
        raise PretrainedError(f"{path}: transformer/ has an image embedding (image_dim={transformer['image_dim']}): an "
                              "image-to-video Wan, which multidiff does not import; it imports text-to-video ones")
    if int(transformer["text_dim"]) != int(text["d_model"]):
        raise PretrainedError(f"{path}: transformer/ cross-attends to {transformer['text_dim']}-wide text but "
                              f"text_encoder/ makes {text['d_model']}-wide tokens")
    patch = int(vae.get("patch_size") or 1)
    cfg = {
        "modality": {"_target_": "multidiff.adapters.video.VideoAdapter",
                     "size": [WAN_DEFAULTS["height"], WAN_DEFAULTS["width"]], "num_frames": WAN_DEFAULTS["num_frames"],
                     "fps": WAN_DEFAULTS["fps"], "channels": int(vae.get("in_channels", 3)) // patch**2},
        "autoencoder": {"_target_": "multidiff.autoencoders.diffusers_vae.DiffusersAutoencoder",
                        "path": str(path / "vae"), "scale_mode": "pretrained"},
        "backbone": {"_target_": "multidiff.backbones.pretrained.PretrainedWanTransformer",
                     "path": str(path / "transformer"),
                     # diffusers' multistep schedulers pass int64 timesteps; FlowMatchEuler passes floats
                     "truncate_timesteps": configs["scheduler"].get("_class_name") != "FlowMatchEulerDiscreteScheduler"},
        "diffusion": flow_diffusion(configs["scheduler"], path / "scheduler"),
        "conditioning": {
            "encoder": {"_target_": "multidiff.conditioning.text.TextConditioner", "encoder": str(path),
                        "tokenizer_subfolder": "tokenizer", "encoder_subfolder": "text_encoder",
                        "encoder_class": index["text_encoder"][1], "max_length": WAN_DEFAULTS["max_length"],
                        "padding": "mask", "clean": True, "sha256": None},
            "dim": int(text["d_model"]), "dropout": 0.1},
        "pretrained": {"family": "WanPipeline", "path": str(path)},
    }
    return OmegaConf.create(cfg)


_WAN_COMPONENTS = {
    "transformer": Component("diffusers", ("WanTransformer3DModel",), ("config.json",), weights=True),
    "vae": Component("diffusers", ("AutoencoderKLWan",), ("config.json",), weights=True),
    "text_encoder": Component("transformers", ("UMT5EncoderModel", "T5EncoderModel"), ("config.json",), weights=True),
    "tokenizer": Component("transformers", ("T5Tokenizer", "T5TokenizerFast", "AutoTokenizer"),
                           ("tokenizer.json", "spiece.model", "tokenizer_config.json")),
    "scheduler": Component("diffusers", _FLOW_SCHEDULERS, ("scheduler_config.json",)),
}

# -- Stable Audio (text to audio) ------------------------------------------------------------------

_EDM_SCHEDULERS = ("EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler", "EDMEulerScheduler")


def _scheduler_settings(scheduler: dict) -> dict:
    """``scheduler`` over its diffusers class's defaults (a saved config may leave defaults out)."""
    import inspect

    import diffusers

    params = inspect.signature(getattr(diffusers, scheduler["_class_name"]).__init__).parameters.values()
    return {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **scheduler}


def edm_diffusion(scheduler: dict, where: Path) -> dict:
    """An EDM scheduler's config (diffusers' ``EDMDPMSolverMultistepScheduler``, ``EDMEulerScheduler``
    or Stable Audio's ``CosineDPMSolverMultistepScheduler``) as multidiff's ``diffusion`` node: EDM
    preconditioning with the scheduler's ``sigma_data``, prediction type and noise map (``ln(sigma)/4``;
    ``atan(sigma) 2/pi`` for the cosine one), its Karras or exponential grid."""
    name = scheduler["_class_name"]
    cfg = _scheduler_settings(scheduler)

    def refuse(what: str) -> PretrainedError:
        return PretrainedError(f"{where} ({name}) asks for {what}, which multidiff's EDM schedule does not implement; "
                               "supported: prediction_type epsilon or v_prediction, sigma_schedule karras or "
                               "exponential, final_sigmas_type zero")

    prediction = cfg.get("prediction_type")
    if prediction not in ("epsilon", "v_prediction"):
        raise refuse(f"prediction_type={prediction!r}")
    if cfg.get("final_sigmas_type", "zero") != "zero":
        raise refuse(f"final_sigmas_type={cfg.get('final_sigmas_type')!r}")
    lo, hi = float(cfg["sigma_min"]), float(cfg["sigma_max"])
    if cfg.get("sigma_schedule") == "exponential":
        schedule = {"_target_": "multidiff.core.schedules.ExponentialSchedule", "sigma_min": lo, "sigma_max": hi}
    elif cfg.get("sigma_schedule") == "karras":
        schedule = {"_target_": "multidiff.core.schedules.KarrasSchedule", "sigma_min": lo, "sigma_max": hi,
                    "rho": float(cfg.get("rho", 7.0))}
    else:
        raise refuse(f"sigma_schedule={cfg.get('sigma_schedule')!r}")
    cosine = name == "CosineDPMSolverMultistepScheduler"
    return {"schedule": schedule,
            "parameterization": {"_target_": "multidiff.core.denoiser.EDMPrecond",
                                 "sigma_data": float(cfg["sigma_data"]), "c_noise": "atan" if cosine else "log",
                                 "negate_output": prediction == "v_prediction",
                                 "marginal_start": True},  # diffusers' init_noise_sigma = sqrt(sigma_max^2 + 1)
            # training density: the cosine model's v-diffusion time is uniform, ln(tan(pi t / 2)) has std pi/2
            "noise": {"_target_": "multidiff.core.noise.LogNormalSigma", "p_mean": 0.0 if cosine else -1.2,
                      "p_std": 1.57 if cosine else 1.2},
            "loss_weighting": "none", "noise_prior": None}


def _stable_audio(path: Path, configs: dict[str, dict], index: dict) -> DictConfig:
    transformer, vae, text, projection = (configs[k] for k in ("transformer", "vae", "text_encoder", "projection_model"))
    vae = {"downsampling_ratios": [2, 4, 4, 8, 8], "audio_channels": 2, "sampling_rate": 44100,
           "encoder_hidden_size": 128, "decoder_input_channels": 64, **vae}
    width = int(projection["conditioning_dim"])
    for ok, what in (
        (int(transformer["in_channels"]) == int(vae["decoder_input_channels"]),
         f"transformer/ takes {transformer['in_channels']} channels but vae/ makes {vae['decoder_input_channels']}-channel "
         "latents"),
        (int(projection["text_encoder_dim"]) == int(text["d_model"]),
         f"projection_model/ takes {projection['text_encoder_dim']}-wide text but text_encoder/ makes "
         f"{text['d_model']}-wide tokens"),
        (int(transformer["cross_attention_input_dim"]) == width and int(transformer["global_states_input_dim"]) == 2 * width,
         f"projection_model/ makes {width}-wide conditioning but transformer/ takes {transformer['cross_attention_input_dim']}"
         f"-wide tokens and a {transformer['global_states_input_dim']}-wide global state (twice the tokens' width)"),
        (int(vae["encoder_hidden_size"]) == 2 * int(vae["decoder_input_channels"]),
         f"vae/ encodes to {int(vae['encoder_hidden_size']) // 2}-channel latents (encoder_hidden_size / 2) but decodes "
         f"{vae['decoder_input_channels']}-channel ones"),
    ):
        if not ok:
            raise PretrainedError(f"{path}: {what}; the pipeline's parts do not belong together")
    hop = math.prod(int(r) for r in vae["downsampling_ratios"])
    rate, positions = int(vae["sampling_rate"]), int(transformer["sample_size"])
    cfg = {
        "modality": {"_target_": "multidiff.adapters.waveform.WaveformAdapter", "sample_rate": rate,
                     "channels": int(vae["audio_channels"]), "duration": positions * hop / rate, "window": True},
        "autoencoder": {"_target_": "multidiff.autoencoders.diffusers_vae.DiffusersAutoencoder",
                        "path": str(path / "vae"), "scale_mode": "pretrained"},
        "backbone": {"_target_": "multidiff.backbones.pretrained.PretrainedStableAudioDiT",
                     "path": str(path / "transformer"), "projection_path": str(path / "projection_model"),
                     "seconds_per_position": hop / rate},
        "diffusion": edm_diffusion(configs["scheduler"], path / "scheduler"),
        "conditioning": {
            "encoder": {"_target_": "multidiff.conditioning.text.TextConditioner", "encoder": str(path),
                        "tokenizer_subfolder": "tokenizer", "encoder_subfolder": "text_encoder",
                        "encoder_class": index["text_encoder"][1], "max_length": None, "padding": "mask",
                        "null": "zeros", "sha256": None},
            "dim": int(text["d_model"]), "dropout": 0.1},
        "pretrained": {"family": "StableAudioPipeline", "path": str(path)},
    }
    return OmegaConf.create(cfg)


_STABLE_AUDIO_COMPONENTS = {
    "transformer": Component("diffusers", ("StableAudioDiTModel",), ("config.json",), weights=True),
    "vae": Component("diffusers", ("AutoencoderOobleck",), ("config.json",), weights=True),
    "text_encoder": Component("transformers", ("T5EncoderModel",), ("config.json",), weights=True),
    "tokenizer": Component("transformers", ("T5Tokenizer", "T5TokenizerFast", "AutoTokenizer"),
                           ("tokenizer.json", "spiece.model", "tokenizer_config.json")),
    # diffusers defines it beside the pipeline and names that module as its library
    "projection_model": Component("stable_audio", ("StableAudioProjectionModel",), ("config.json",), weights=True),
    "scheduler": Component("diffusers", _EDM_SCHEDULERS, ("scheduler_config.json",)),
}

FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": Family(_SD_COMPONENTS, _stable_diffusion, "image"),
    "StableAudioPipeline": Family(_STABLE_AUDIO_COMPONENTS, _stable_audio, "audio"),
    "WanPipeline": Family(_WAN_COMPONENTS, _wan, "video"),
}
"""The pipeline classes multidiff imports, by ``model_index.json``'s ``_class_name``."""

PLANNED: tuple[str, ...] = ()  # named in the refusal, so users know they are coming


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PretrainedError(f"cannot read {file} as JSON ({e}); the pipeline directory is damaged") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{file} is not a JSON object; the pipeline directory is damaged")
    return data


def _has_safetensors(folder: Path) -> bool:
    return any(p.name.endswith((".safetensors", ".safetensors.index.json")) for p in folder.iterdir())


def pipeline_config(path: str | Path) -> DictConfig:
    """The multidiff model config of the diffusers pipeline in ``path`` (only JSON is read), or a
    :class:`PretrainedError` that names what is unsupported or missing and what would fix it."""
    path = Path(path).expanduser().resolve()
    index = _json(path / "model_index.json")
    name = index.get("_class_name")
    supported = ", ".join(FAMILIES)
    if not isinstance(name, str):
        raise PretrainedError(
            f"{path}/model_index.json names a custom pipeline ({name!r}); multidiff never runs code from a model "
            f"directory and imports the diffusers pipelines {supported}")
    if name not in FAMILIES:
        planned = f" ({', '.join(PLANNED)} {'is' if len(PLANNED) == 1 else 'are'} planned)" if PLANNED else ""
        raise PretrainedError(
            f"{path} holds a diffusers {name}, which multidiff does not import; it imports {supported}{planned}. "
            "Convert the model to one of those, or train a multidiff model (multidiff train recipe=...)")
    family = FAMILIES[name]
    problems, configs = [], {}
    for key, part in family.components.items():
        entry = index.get(key)
        folder = path / key
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] is not None):
            problems.append(f"model_index.json has no {key} entry")
            continue
        library, cls = entry
        if library not in LIBRARIES and library != part.library:
            raise PretrainedError(
                f"{path}/model_index.json takes {key} from {library!r} ({cls}): custom code, which multidiff never "
                f"runs; a {name} takes {key} from {part.library} ({' or '.join(part.classes)})")
        if cls not in part.classes:
            problems.append(f"{key} is a {cls}, not {' or '.join(part.classes)}")
            continue
        if not folder.is_dir():
            problems.append(f"the folder {key}/ is missing")
            continue
        config_file = next((folder / f for f in part.files if (folder / f).is_file()), None)
        if config_file is None:
            problems.append(f"{key}/ has no {' or '.join(part.files)}")
            continue
        if part.weights and not _has_safetensors(folder):
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            problems.append(f"{key}/ has no safetensors weights" + (
                f" (only {', '.join(pickled)}: pickled files, which multidiff never loads; convert them with "
                "save_pretrained(..., safe_serialization=True))" if pickled else ""))
            continue
        if config_file.name.endswith("config.json") and key != "tokenizer":
            configs[key] = _json(config_file)
            if configs[key].get("auto_map"):
                raise PretrainedError(f"{config_file} maps its classes to custom code (auto_map); multidiff never "
                                      "runs code from a model directory")
    if problems:
        raise PretrainedError(
            f"{path} is a {name} directory but cannot be imported: {'; '.join(problems)}. A complete one holds "
            f"{', '.join(f'{k}/' for k in family.components)} as diffusers' save_pretrained(..., safe_serialization=True) "
            "writes them")
    return family.config(path, configs, index)
