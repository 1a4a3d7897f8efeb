"""Generation without Hydra: load an exported model (or a checkpoint) and sample from prompts.

    >>> import multidiff
    >>> pipe = multidiff.load("runs/digits/model")
    >>> images = pipe.generate(["a handwritten digit seven"], num_samples=4, seed=0)
    >>> pipe.save(images, "out/")

An exported model directory holds ``multidiff.json`` (a format marker), ``config.yaml`` (the
resolved config of the run), ``backbone/`` (the EMA weights, as safetensors; diffusers'
``save_pretrained`` layout for diffusers backbones) and, for a latent model, ``autoencoder/`` (the
latent stage with its weights and latent scale, so the export needs nothing outside itself).
Nothing is unpickled and only allow-listed ``_target_``s are built (:mod:`multidiff.configuration`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from multidiff.atomic import replace_directory
from multidiff.autoencoders.base import Identity, LatentStage, load_stage
from multidiff.configuration import safe_instantiate, trusted_prefixes
from multidiff.core.cond import Cond
from multidiff.core.denoiser import Denoiser
from multidiff.core.guidance import CFGDenoiser
from multidiff.core.noise import PerSampleGenerator, with_prior
from multidiff.core.samplers import SAMPLERS, read_grid
from multidiff.performance import apply_performance_options

FORMAT = "multidiff-model"
FORMAT_VERSION = 1
MODEL_KEYS = ("modality", "autoencoder", "backbone", "diffusion", "conditioning", "trusted_targets")


class ModelLoadError(ValueError):
    """A path is not a multidiff model or checkpoint."""


class GenerationError(ValueError):
    """Generation options are invalid."""


@dataclass
class GenerationRecord:
    """How samples were made: what :meth:`Pipeline.generate` attaches to its result as ``.generation``."""

    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class ModelParts:
    adapter: object
    denoiser: Denoiser
    schedule: object
    conditioner: object
    stage: LatentStage | None = None  # the latent stage; None or Identity: the backbone sees the adapter's tensors


def model_config(cfg: DictConfig) -> DictConfig:
    """The part of a run's config needed to rebuild the model, resolved to plain values."""
    keep = {k: cfg[k] for k in MODEL_KEYS if k in cfg}
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.create(keep), resolve=True))


def build_parts(cfg: DictConfig, *, source: str = "config", conditioner=None, trusted=None,
                stage_dir: Path | None = None) -> ModelParts:
    """Instantiate adapter, latent stage, denoiser (random backbone weights), schedule and conditioner.

    The shape flows down: the adapter's item shape builds the latent stage, whose latent shape
    builds the backbone. ``stage_dir``: a saved stage (an export's ``autoencoder/``) to use instead
    of building ``cfg.autoencoder``. ``trusted``: extra ``_target_`` prefixes allowed; ``None``
    takes the config's own ``trusted_targets`` (right for a config the user composed, never for a
    file from elsewhere).
    """
    trusted = trusted_prefixes(cfg) if trusted is None else tuple(trusted)
    make = lambda node, **kw: safe_instantiate(node, trusted=trusted, source=source, **kw)  # noqa: E731
    adapter = make(cfg.modality)
    shape = tuple(adapter.shape)
    if stage_dir is not None:
        stage = load_stage(stage_dir, shape=shape)
    elif cfg.get("autoencoder") is not None:
        stage = make(cfg.autoencoder, shape=shape)
    else:
        stage = Identity(shape=shape)
    stage.requires_grad_(False).eval()
    backbone = make(cfg.backbone, shape=stage.latent_shape())
    schedule = make(cfg.diffusion.schedule)
    param = make(cfg.diffusion.parameterization)
    prior = cfg.diffusion.get("noise_prior")
    denoiser = Denoiser(backbone, param, loss_weighting=cfg.diffusion.get("loss_weighting", "none"),
                        noise_prior=None if prior is None else make(prior))
    if conditioner is None:
        conditioner = make(cfg.conditioning.encoder)
    return ModelParts(adapter, denoiser, schedule, conditioner, stage)


def export_model(directory: str | Path, cfg: DictConfig, backbone, stage: LatentStage | None = None) -> Path:
    """Write an exported model (atomically): marker, resolved model config, backbone weights and,
    unless it is the identity, the latent stage (weights and latent scale) under ``autoencoder/``."""

    def fill(tmp: Path) -> None:
        backbone.save_pretrained(tmp / "backbone")
        if stage is not None and not stage.is_identity:
            stage.save_pretrained(tmp / "autoencoder")
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(model_config(cfg)), encoding="utf-8")
        (tmp / "multidiff.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION}), encoding="utf-8")

    return replace_directory(directory, fill)


def _read_model(path: Path) -> tuple[DictConfig, callable, Path | None]:
    """Config, a weight-loading function and the saved latent stage (if any) of an exported
    directory or a ``.ckpt``."""
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass an exported model directory (RUN/model) or a .ckpt")
    if path.is_dir():
        marker = path / "multidiff.json"
        if not marker.is_file():
            hint = " (did you mean its model/ subfolder?)" if (path / "model" / "multidiff.json").is_file() else ""
            raise ModelLoadError(f"{path} is not a multidiff model: it has no multidiff.json{hint}")
        info = json.loads(marker.read_text())
        if info.get("format") == "multidiff-autoencoder":
            raise ModelLoadError(f"{path} is an autoencoder (a task=autoencoder run's export), not a diffusion model: "
                                 f"train a latent model with it (autoencoder=trained autoencoder.path={path}) and load that")
        if info.get("format") != FORMAT:
            raise ModelLoadError(f"{marker} does not describe a multidiff model (format={info.get('format')!r})")
        cfg = _upgrade(OmegaConf.load(path / "config.yaml"))
        stage_dir = path / "autoencoder"
        return (cfg, lambda parts: parts.denoiser.backbone.load_pretrained(path / "backbone"),
                stage_dir if stage_dir.is_dir() else None)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load {path} as a checkpoint with weights_only=True ({type(e).__name__}: {str(e)[:200]}); "
            "multidiff loads only plain tensor checkpoints, never pickled code"
        ) from e
    if not isinstance(ckpt, dict) or "multidiff_config" not in ckpt:
        raise ModelLoadError(f"{path} is not a multidiff checkpoint (no multidiff_config inside)")
    cfg = _upgrade(OmegaConf.create(ckpt["multidiff_config"]))

    def load(parts: ModelParts) -> None:
        parts.denoiser.backbone.load_state_dict(_prefixed(ckpt["state_dict"], "ema.backbone."))
        stage_state = _prefixed(ckpt["state_dict"], "stage.")
        if stage_state:  # the training module's latent stage, with the scale fitted on its data
            parts.stage.load_state_dict(stage_state)

    return cfg, load, None


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def read_model_config(path: str | Path) -> DictConfig:
    """The model config of an exported directory or a ``.ckpt`` (nothing is built)."""
    return _read_model(Path(path))[0]


def _upgrade(cfg: DictConfig) -> DictConfig:
    """A model config written before the shape flowed from the adapter (backbone keys renamed, sizes
    interpolated from the modality) in today's form; today's configs pass unchanged."""
    from multidiff.backbones.base import upgrade_backbone_config

    if "backbone" in cfg:
        cfg.backbone = OmegaConf.create(upgrade_backbone_config(OmegaConf.to_container(cfg.backbone, resolve=True)))
    return cfg


class Pipeline:
    """Prompts -> decoded samples for any modality. Build with :func:`multidiff.load`."""

    def __init__(self, parts: ModelParts, *, config: DictConfig, source: str = "", device: str | None = None,
                 channels_last: bool = False, compile: bool = False, compile_options: dict | None = None) -> None:
        self.adapter, self.denoiser = parts.adapter, parts.denoiser.eval()
        self.schedule, self.conditioner = parts.schedule, parts.conditioner
        self.stage = (parts.stage or Identity(shape=tuple(parts.adapter.shape))).eval()
        self.config, self.source = config, source
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.denoiser.to(self.device)
        self.stage.to(self.device)
        apply_performance_options(self.denoiser.backbone, channels_last=channels_last, compile=compile,
                                  compile_options=compile_options)
        self.conditioner.to(self.device)

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None, trusted_targets=(), **performance) -> Pipeline:
        """Load an export or checkpoint. Only ``multidiff.`` targets (and the caller's explicit
        ``trusted_targets`` prefixes, never a list written inside the file) are instantiated.
        ``performance``: ``channels_last``, ``compile``, ``compile_options`` (see
        :func:`multidiff.performance.apply_performance_options`)."""
        path = Path(path)
        cfg, load_weights, stage_dir = _read_model(path)
        parts = build_parts(cfg, source=str(path), trusted=trusted_targets, stage_dir=stage_dir)
        load_weights(parts)
        return cls(parts, config=cfg, source=str(path), device=device, **performance)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        return self.conditioner.encode(prompts)

    @torch.inference_mode()
    def generate(
        self,
        prompts: str | list[str],
        *,
        num_samples: int = 1,
        seed: int = 0,
        sampler: str | callable = "dpmpp_2m",
        sampler_name: str | None = None,
        steps: int = 20,
        guidance_scale: float = 2.0,
        negative_prompt: str | None = None,
        batch_size: int = 16,
        sigmas: Tensor | None = None,
        progress: bool = True,
        **options,
    ) -> Tensor:
        """Sample ``num_samples`` per prompt; returns decoded raw samples ``(N, *raw_shape)``.

        Sample ``k`` (prompt-major order) uses seed ``seed + k`` and is identical whatever
        ``batch_size`` it is drawn in. ``options`` are the modality's generation options (the
        adapter's :meth:`~multidiff.adapters.base.Adapter.generation_options`, e.g. a length).
        The returned tensor carries a :class:`GenerationRecord` as ``.generation`` (prompts, seeds,
        settings), which :meth:`save` writes to ``metadata.jsonl``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        fn, default_name = self._sampler(sampler)
        sampler_name = sampler_name or default_name
        _check_options(prompts, num_samples, steps, guidance_scale, batch_size)
        sigmas = self._grid(steps, sigmas)
        try:
            options = self.adapter.read_options(options)
            data_shape = tuple(self.adapter.sample_shape(**options))
        except ValueError as e:  # the adapter rejects an option (unknown name, bad value)
            raise GenerationError(str(e)) from None
        flat = [p for p in prompts for _ in range(num_samples)]
        seeds = [seed + k for k in range(len(flat))]
        bar = _progress(progress, total=math.ceil(len(flat) / batch_size) * (len(sigmas) - 1))
        outputs = []
        for start in range(0, len(flat), batch_size):
            chunk, chunk_seeds = flat[start : start + batch_size], seeds[start : start + batch_size]
            z = self.sample_tensors(
                chunk, chunk_seeds, self.stage.latent_shape(data_shape), fn, sigmas, guidance_scale, negative_prompt,
                callback=bar,
            )
            outputs.extend(self.adapter.fit_length(raw, **options).cpu()
                           for raw in decode_samples(self.stage, self.adapter, z, data_shape))
        if bar is not None:
            bar.close()
        samples = torch.stack(outputs)
        samples.generation = GenerationRecord(flat, seeds, sampler_name, steps, guidance_scale, negative_prompt,
                                              {k: v for k, v in options.items() if v is not None})
        return samples

    def sample_tensors(self, prompts, seeds, shape, fn, sigmas, guidance_scale, negative_prompt=None, callback=None):
        """Model tensors ``(B, *shape)`` (latents of a latent model) for prompts and per-sample seeds (no decoding)."""
        return sample_prompts(
            self.denoiser, self.conditioner, prompts, seeds, shape, fn, sigmas,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, device=self.device, callback=callback,
        )

    def _grid(self, steps: int, sigmas: Tensor | None) -> Tensor:
        """The schedule's grid for ``steps`` (or the caller's ``sigmas``), checked before any sampling."""
        given = sigmas is not None
        try:
            sigmas = sigmas if given else self.schedule.sigmas(steps)  # refuses more steps than noise levels
            read_grid(sigmas)  # a repeated level: a custom grid, or float32 merging a huge continuous one
        except ValueError as e:
            raise GenerationError(str(e) if given else f"steps={steps}: {e}") from None
        return sigmas

    @staticmethod
    def _sampler(sampler):
        if callable(sampler):
            return sampler, getattr(sampler, "__name__", "custom").removeprefix("sample_")
        if sampler not in SAMPLERS:
            raise GenerationError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        return SAMPLERS[sampler], sampler

    def save(self, samples: Tensor, out: str | Path, *, overwrite: bool = False, model: str | None = None,
             prompts: list[str] | None = None, seeds: list[int] | None = None, format: str | None = None,
             **extra) -> list[Path]:
        """Write each sample with the adapter's writer (``0000.png``, ...) and ``metadata.jsonl``.

        Prompts, seeds, sampler settings and generation options come from ``samples.generation``
        (set by :meth:`generate`) unless given. ``format`` picks one of the adapter's
        :attr:`~multidiff.adapters.base.Adapter.formats` (e.g. ``"gif"``). Refuses an ``out``
        directory that already holds results unless ``overwrite``.
        """
        out = Path(out)
        meta_path = out / "metadata.jsonl"
        if meta_path.exists() and not overwrite:
            raise GenerationError(
                f"output directory {out} already holds results (metadata.jsonl); choose another out= "
                "or pass overwrite=true to replace them"
            )
        record = getattr(samples, "generation", None) or GenerationRecord()
        prompts = prompts or record.prompts or [""] * len(samples)
        seeds = seeds or record.seeds or [None] * len(samples)
        if len(prompts) != len(samples) or len(seeds) != len(samples):
            raise GenerationError(f"{len(samples)} samples but {len(prompts)} prompts and {len(seeds)} seeds")
        try:
            suffix = self.adapter.check_format(format) if format else self.adapter.suffix
        except ValueError as e:
            raise GenerationError(str(e)) from None
        out.mkdir(parents=True, exist_ok=True)
        extra_meta = self.adapter.metadata(**record.options)
        writer_kwargs = self.adapter.save_options(**record.options)
        paths, rows = [], []
        for k, (raw, prompt, s) in enumerate(zip(samples, prompts, seeds)):
            path = out / f"{k:04d}{suffix}"
            self.adapter.save(raw, path, **writer_kwargs)
            paths.append(path)
            rows.append({
                "file": path.name, "prompt": prompt, "seed": s, "sampler": record.sampler, "steps": record.steps,
                "guidance_scale": record.guidance_scale, "negative_prompt": record.negative_prompt,
                "model": model or self.source, **extra_meta, **extra,
            })
        tmp = meta_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, meta_path)
        return paths


@torch.inference_mode()
def sample_prompts(denoiser, conditioner, prompts, seeds, shape, fn, sigmas, *, guidance_scale, negative_prompt=None,
                   device="cpu", callback=None) -> Tensor:
    """Sample model tensors ``(B, *shape)``: seeded noise, prompts encoded, CFG, then ``fn``.

    ``callback`` (e.g. a tqdm bar) gets ``update(1)`` after every sampler step.
    """
    gen = with_prior(PerSampleGenerator(seeds), getattr(denoiser, "noise_prior", None))
    sigmas = sigmas.to(torch.float32)
    x = gen.randn((len(prompts), *shape), device=device) * float(sigmas[0])
    cond = conditioner.encode(prompts)
    uncond = conditioner.encode([negative_prompt]) if negative_prompt else conditioner.null()
    guided = CFGDenoiser(denoiser, uncond, guidance_scale)
    step = None if callback is None else (lambda info: callback.update(1))
    return fn(guided, x, sigmas, cond=cond, generator=gen, callback=step)


def decode_samples(stage: LatentStage | None, adapter, z: Tensor, data_shape) -> list[Tensor]:
    """Sampled model tensors ``(B, *latent_shape)`` (on the stage's device) -> raw samples: through the
    latent stage as one batch (cropped to ``data_shape``), then the adapter, one sample at a time."""
    x = z if stage is None else stage.decode(z, shape=data_shape)
    return [adapter.decode(item) for item in x]


def _check_options(prompts, num_samples, steps, guidance_scale, batch_size) -> None:
    if not prompts:
        raise GenerationError("no prompts given: pass prompt=... or prompts_file=FILE")
    for name, value in (("num_samples", num_samples), ("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GenerationError(f"{name} must be a positive integer, got {value!r}")
    if guidance_scale < 0:
        raise GenerationError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", dynamic_ncols=True)


def load(path: str | Path, *, device: str | None = None, trusted_targets=(), channels_last: bool = False,
         compile: bool = False, compile_options: dict | None = None) -> Pipeline:
    """Load an exported model directory or a ``.ckpt`` as a :class:`Pipeline`.

    ``trusted_targets``: module prefixes (e.g. ``["my_package."]``) whose ``_target_``s the model's
    config may instantiate besides ``multidiff.``; for models of modalities from your own package.
    ``channels_last`` / ``compile`` (+ ``compile_options`` for ``torch.compile``): speed options for
    the backbone, off by default (:mod:`multidiff.performance`).
    """
    return Pipeline.load(path, device=device, trusted_targets=trusted_targets, channels_last=channels_last,
                         compile=compile, compile_options=compile_options)
