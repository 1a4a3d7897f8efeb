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

import inspect
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from multidiff.atomic import replace_directory
from multidiff.autoencoders.base import Identity, LatentStage, load_stage
from multidiff.backbones.lora import FORMAT as LORA_FORMAT
from multidiff.backbones.lora import (
    LoraError,
    adapter_names,
    add_lora,
    has_lora,
    load_lora,
    lora_info,
    merge_lora,
    read_lora,
    save_lora,
)
from multidiff.configuration import safe_instantiate, trusted_prefixes
from multidiff.core.cond import Cond, with_input
from multidiff.core.denoiser import Denoiser
from multidiff.core.editing import InpaintDenoiser, check_strength, variation_sigmas, variation_start
from multidiff.core.guidance import CFGDenoiser
from multidiff.core.noise import PerSampleGenerator, with_prior
from multidiff.core.samplers import SAMPLERS, read_grid
from multidiff.multimodal import ModalityError, check_modalities, entry_config, modality_names, model_entries, select
from multidiff.performance import apply_performance_options
from multidiff.pretrained import PretrainedError, is_pipeline_dir, pipeline_config

FORMAT = "multidiff-model"
FORMAT_VERSION = 1
MODEL_KEYS = ("modality", "autoencoder", "backbone", "diffusion", "conditioning", "editing", "trusted_targets",
              "modalities")


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
    edit: dict = field(default_factory=dict)  # init, mask, strength, harmonize and the region options of an edit


@dataclass
class Edit:
    """A prepared edit: the input and the kept region in the adapter's tensor space, how much of the
    grid runs from the noised input (``strength``) and the harmonizing passes (see :mod:`multidiff.core.editing`)."""

    known: Tensor  # (1, C, *dims) the input, encoded at the sample's size
    keep: Tensor | None  # (1, 1, *dims) 1: keep the input; None: a variation of the whole input
    strength: float
    harmonize: int = 0
    record: dict = field(default_factory=dict)


@dataclass
class ModelParts:
    adapter: object
    denoiser: Denoiser
    schedule: object
    conditioner: object
    stage: LatentStage | None = None  # the latent stage; None or Identity: the backbone sees the adapter's tensors
    modality: int | None = None  # a model of several modalities: this one's index (cond.modality); None: one modality
    name: str | None = None  # ... and its name


def model_config(cfg: DictConfig) -> DictConfig:
    """The part of a run's config needed to rebuild the model, resolved to plain values."""
    keep = {k: cfg[k] for k in MODEL_KEYS if k in cfg}
    if modality_names(cfg):  # each modality's adapter, shift and patch; the data and previews are the run's
        keep["modalities"] = model_entries(cfg)
        keep.pop("modality", None)
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.create(keep), resolve=True))


def build_parts(cfg: DictConfig, *, source: str = "config", conditioner=None, trusted=None,
                stage_dir: Path | None = None, modality: str | None = None) -> ModelParts:
    """Instantiate adapter, latent stage, denoiser (random backbone weights), schedule and conditioner.

    The shape flows down: the adapter's item shape builds the latent stage, whose latent shape
    builds the backbone. ``stage_dir``: a saved stage (an export's ``autoencoder/``) to use instead
    of building ``cfg.autoencoder``. ``trusted``: extra ``_target_`` prefixes allowed; ``None``
    takes the config's own ``trusted_targets`` (right for a config the user composed, never for a
    file from elsewhere). A model of several modalities (``cfg.modalities``) gives the parts of
    ``modality`` (see :func:`build_modality_parts`).
    """
    try:
        name = select(cfg, modality, source)
    except ModalityError as e:
        raise ModelLoadError(str(e)) from None
    if name is not None:
        return build_modality_parts(cfg, source=source, conditioner=conditioner, trusted=trusted)[name]
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
    latent_shape = stage.latent_shape()
    backbone = make(cfg.backbone, shape=latent_shape, **mask_conditioning_arguments(cfg, latent_shape))
    schedule = make(cfg.diffusion.schedule)
    param = make(cfg.diffusion.parameterization)
    prior = cfg.diffusion.get("noise_prior")
    denoiser = Denoiser(backbone, param, loss_weighting=cfg.diffusion.get("loss_weighting", "none"),
                        noise_prior=None if prior is None else make(prior))
    if conditioner is None:
        conditioner = make(cfg.conditioning.encoder)
    return ModelParts(adapter, denoiser, schedule, conditioner, stage)


def build_modality_parts(cfg: DictConfig, *, source: str = "config", conditioner=None,
                         trusted=None) -> dict[str, ModelParts]:
    """The parts of every modality of a multimodal config (:mod:`multidiff.multimodal`), in order:
    each its own adapter and schedule (with the entry's shift), all one backbone (built with every
    modality's shape and patch size: ``modalities=``), one denoiser and one text encoder."""
    names = check_modalities(cfg)
    trusted = trusted_prefixes(cfg) if trusted is None else tuple(trusted)
    make = lambda node, **kw: safe_instantiate(node, trusted=trusted, source=source, **kw)  # noqa: E731
    stage = cfg.get("autoencoder")
    if stage is not None and not str(stage.get("_target_", "")).endswith(".Identity"):
        raise ModelLoadError("a model of several modalities trains on the adapters' tensors: set autoencoder=identity "
                             f"(latent stages per modality are not supported yet; got {stage.get('_target_')})")
    if (cfg.get("editing") or {}).get("mask_conditioning"):
        raise ModelLoadError("editing=masked is not supported for a model of several modalities yet; set editing=none")
    entries = {n: entry_config(cfg, n) for n in names}
    adapters = {n: make(entries[n].modality) for n in names}
    shifts = {cfg.modalities[n].get("shift") for n in names} - {None}
    if shifts and "schedule" in cfg.diffusion.parameterization:
        raise ModelLoadError(
            f"modalities.*.shift gives the modalities their own noise levels, but {cfg.diffusion.parameterization._target_} "
            "depends on one schedule; use a parameterization without one (diffusion=flow or diffusion=edm) or drop the shifts")
    from hydra.utils import get_object

    if "modalities" not in inspect.signature(get_object(str(cfg.backbone._target_))).parameters:
        raise ModelLoadError(f"backbone {cfg.backbone._target_} serves one modality; a model of several needs one "
                             "that takes modalities= (backbone=dit_small, dit_tiny, dit_base)")
    specs = {n: {"shape": list(adapters[n].shape), "patch_size": cfg.modalities[n].get("patch_size")} for n in names}
    backbone = make(cfg.backbone, shape=tuple(adapters[names[0]].shape), modalities=specs)
    prior = cfg.diffusion.get("noise_prior")
    denoiser = Denoiser(backbone, make(cfg.diffusion.parameterization),
                        loss_weighting=cfg.diffusion.get("loss_weighting", "none"),
                        noise_prior=None if prior is None else make(prior))
    if conditioner is None:
        conditioner = make(cfg.conditioning.encoder)
    return {n: ModelParts(adapters[n], denoiser, make(entries[n].diffusion.schedule), conditioner,
                          Identity(shape=tuple(adapters[n].shape)).requires_grad_(False).eval(), modality=i, name=n)
            for i, n in enumerate(names)}


def mask_conditioning_arguments(cfg: DictConfig, latent_shape: tuple[int, ...]) -> dict:
    """``{"concat_channels": 1 + C}`` for a model trained with mask conditioning (``editing.mask_conditioning``):
    the backbone also takes the editing mask and the masked input; ``{}`` otherwise."""
    editing = cfg.get("editing")
    if editing is None or not editing.get("mask_conditioning", False):
        return {}
    from hydra.utils import get_object

    target = get_object(str(cfg.backbone._target_))
    if "concat_channels" not in inspect.signature(target).parameters:
        raise ModelLoadError(f"editing.mask_conditioning=true needs a backbone that takes concat_channels, but "
                             f"{cfg.backbone._target_} does not; use a built-in backbone or add concat_channels to "
                             "yours (see Backbone in multidiff/backbones/base.py), or set editing=none")
    return {"concat_channels": 1 + int(latent_shape[0])}


# Keys of a model config that name a folder the export holds a copy of: written relative to the
# export (so it can move) and read back as paths inside it.
OWN_FOLDERS = {"backbone.path": "backbone", "backbone.projection_path": "backbone/projection_model",
               "autoencoder.path": "autoencoder/diffusers",
               "conditioning.encoder.encoder": "text_encoder"}


def export_model(directory: str | Path, cfg: DictConfig, backbone, stage: LatentStage | None = None,
                 conditioner=None, text_encoder_changed: bool = False) -> Path:
    """Write an exported model (atomically): marker, resolved model config, backbone weights and,
    unless it is the identity, the latent stage (weights and latent scale) under ``autoencoder/``.

    The export stands alone: where the config names folders outside it (an imported pipeline's
    ``unet/`` or ``transformer/`` and ``vae/``, a local text encoder), it points at its own copies
    instead (:data:`OWN_FOLDERS`): the backbone's diffusers layout in ``backbone/``, the stage's
    network in ``autoencoder/diffusers/`` and, given the ``conditioner`` of a local text encoder, its
    tokenizer and weights in ``text_encoder/``. The packaged default encoder is not copied unless
    ``text_encoder_changed`` (LoRA adapters merged into it)."""
    model_cfg = model_config(cfg)

    def fill(tmp: Path) -> None:
        backbone.save_pretrained(tmp / "backbone")
        if stage is not None and not stage.is_identity:
            stage.save_pretrained(tmp / "autoencoder")
        own = {}
        for key in ("backbone.path", "backbone.projection_path"):
            if OmegaConf.select(model_cfg, key) and (tmp / OWN_FOLDERS[key] / "config.json").is_file():
                own[key] = OWN_FOLDERS[key]
        if OmegaConf.select(model_cfg, "autoencoder.path") and (tmp / "autoencoder" / "diffusers").is_dir():
            own["autoencoder.path"] = "autoencoder/diffusers"
        source = OmegaConf.select(model_cfg, "conditioning.encoder.encoder")
        local = bool(source) and Path(str(source)).expanduser().is_dir()
        if conditioner is not None and (local or text_encoder_changed) and hasattr(conditioner, "tokenizer"):
            conditioner.tokenizer.save_pretrained(str(tmp / "text_encoder"))
            conditioner.model.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
            own["conditioning.encoder.encoder"] = "text_encoder"
            model_cfg.conditioning.encoder.tokenizer_subfolder = None
            model_cfg.conditioning.encoder.encoder_subfolder = None
        for key, folder in own.items():
            OmegaConf.update(model_cfg, key, folder, merge=False)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(model_cfg), encoding="utf-8")
        (tmp / "multidiff.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION}), encoding="utf-8")

    return replace_directory(directory, fill)


def _own_folders(cfg: DictConfig, path: Path) -> DictConfig:
    """An export's config with :data:`OWN_FOLDERS` written relative to it made paths inside ``path``."""
    for key, folder in OWN_FOLDERS.items():
        if OmegaConf.select(cfg, key) == folder:
            OmegaConf.update(cfg, key, str(path.resolve() / folder), merge=False)
    return cfg


def _read_model(path: Path) -> tuple[DictConfig, callable, Path | None]:
    """Config, a weight-loading function and the saved latent stage (if any) of an exported
    directory or a ``.ckpt``."""
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass an exported model directory (RUN/model), a .ckpt "
                             "or a diffusers pipeline directory")
    if path.is_dir():
        marker = path / "multidiff.json"
        if not marker.is_file() and is_pipeline_dir(path):  # a published diffusers pipeline (docs/pretrained.md)
            try:
                cfg = pipeline_config(path)
            except PretrainedError as e:
                raise ModelLoadError(str(e)) from None
            return cfg, lambda parts: None, None  # the parts load their folders themselves
        if not marker.is_file():
            hint = " (did you mean its model/ subfolder?)" if (path / "model" / "multidiff.json").is_file() else ""
            raise ModelLoadError(f"{path} is not a multidiff model: it has no multidiff.json (nor a diffusers "
                                 f"model_index.json){hint}")
        info = json.loads(marker.read_text())
        if info.get("format") == LORA_FORMAT:  # adapters alone: their base model, then them on top
            return _read_lora_model(path)
        if info.get("format") == "multidiff-autoencoder":
            raise ModelLoadError(f"{path} is an autoencoder (a task=autoencoder run's export), not a diffusion model: "
                                 f"train a latent model with it (autoencoder=trained autoencoder.path={path}) and load that")
        if info.get("format") != FORMAT:
            raise ModelLoadError(f"{marker} does not describe a multidiff model (format={info.get('format')!r})")
        cfg = _own_folders(_upgrade(OmegaConf.load(path / "config.yaml")), path)
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
        lora = cfg.get("lora") or {}
        if lora.get("rank"):  # a LoRA run's checkpoint: the adapters' layers first, then the weights
            add_lora(parts.denoiser.backbone, rank=int(lora.rank), alpha=lora.get("alpha"),
                     target_modules=lora.get("target_modules"))
            text_model = getattr(parts.conditioner, "model", None)
            if lora.get("text_encoder") and text_model is not None:  # its averaged adapters (the base is the config's)
                add_lora(text_model, rank=int(lora.rank), alpha=lora.get("alpha"))
                text_model.requires_grad_(False)
                text_model.load_state_dict(_prefixed(ckpt["state_dict"], "text_ema."), strict=False)
                parts.conditioner.refresh()
        parts.denoiser.backbone.load_state_dict(_prefixed(ckpt["state_dict"], "ema.backbone."))
        stage_state = _prefixed(ckpt["state_dict"], "stage.")
        if stage_state:  # the training module's latent stage, with the scale fitted on its data
            parts.stage.load_state_dict(stage_state)

    return cfg, load, None


def _read_lora_model(path: Path) -> tuple[DictConfig, callable, Path | None]:
    try:
        info = read_lora(path)
    except LoraError as e:
        raise ModelLoadError(str(e)) from None
    base = info.get("base")
    if not base or not Path(base).exists():
        raise ModelLoadError(f"{path} holds LoRA adapters trained on {base}, which is not there; generate with "
                             f"model=BASE lora={path}, BASE being the model they were trained from")
    cfg, load_base, stage_dir = _read_model(Path(base))

    def load(parts: ModelParts) -> None:
        load_base(parts)
        _add_loras(parts, [str(path)], [1.0])

    return cfg, load, stage_dir


def _add_loras(parts: ModelParts, paths, scales) -> None:
    """Load saved LoRA adapters on top of the backbone (and, where an adapter has ``text_encoder/``,
    of the text encoder), stacked, each at its scale."""
    backbone = parts.denoiser.backbone
    for path, scale in zip(paths, scales, strict=True):
        name = f"lora{len(adapter_names(backbone))}"
        try:
            load_lora(backbone, path, name=name, scale=scale)
            text_dir = Path(path).expanduser() / TEXT_LORA_DIR
            if text_dir.is_dir() and parts.conditioner is not _NO_CONDITIONER:
                text_model = getattr(parts.conditioner, "model", None)
                if text_model is None:
                    raise LoraError(f"the LoRA in {path} adapts a text encoder, which this model's conditioner "
                                    f"({type(parts.conditioner).__name__}) does not have")
                load_lora(text_model, text_dir, name=name, scale=scale)
                text_model.requires_grad_(False)
                parts.conditioner.refresh()  # cached encodings came from the encoder without it
        except LoraError as e:
            raise ModelLoadError(str(e)) from None


def build_from(cfg: DictConfig, source: str | Path) -> ModelParts:
    """The parts of ``cfg`` (whose model keys came from ``source``, see ``init_from``) with the weights
    of the model at ``source``: a diffusers pipeline directory, an export (its latent stage too), a
    checkpoint, or LoRA adapters on their base (merged: the run starts from a plain model)."""
    _, load_weights, stage_dir = _read_model(Path(str(source)).expanduser())
    parts = build_parts(cfg, source="train config", stage_dir=stage_dir)
    load_weights(parts)
    merge_all_loras(parts)
    return parts


def merge_all_loras(parts) -> set[str]:
    """Fold every LoRA adapter of the backbone and of the text encoder of ``parts`` (a :class:`ModelParts`
    or a :class:`Pipeline`) into their weights (the text encoder stays frozen); which parts had any
    (``backbone``, ``text_encoder``)."""
    merged = set()
    if has_lora(parts.denoiser.backbone):
        merge_lora(parts.denoiser.backbone)
        merged.add("backbone")
    text_model = getattr(parts.conditioner, "model", None)
    if isinstance(text_model, torch.nn.Module) and has_lora(text_model):
        merge_lora(text_model).requires_grad_(False)
        parts.conditioner.refresh()
        merged.add("text_encoder")
    return merged


TEXT_LORA_DIR = "text_encoder"  # a LoRA export's text-encoder adapters (lora.text_encoder=true)


def export_lora(directory: str | Path, backbone, *, base: str, text_encoder=None) -> Path:
    """Write a LoRA run's adapters alone (atomically): ``lora.safetensors``, ``lora.json`` (rank, alpha,
    targets, ``base``: the model they were trained on, resolved) and the ``multidiff.json`` marker;
    with ``text_encoder`` (an encoder carrying adapters) its adapters in ``text_encoder/`` likewise."""
    info = lora_info(backbone)
    base = str(Path(base).expanduser().resolve())

    def fill(tmp: Path) -> None:
        save_lora(tmp, backbone, base=base, **info)
        if text_encoder is not None:
            save_lora(tmp / TEXT_LORA_DIR, text_encoder, base=base, **lora_info(text_encoder))

    return replace_directory(directory, fill)


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_backbone_state(path: str | Path) -> dict[str, Tensor]:
    """The backbone weights of an exported model or checkpoint (its text encoder is not loaded)."""
    path = Path(path)
    cfg, load_weights, stage_dir = _read_model(path)
    names = modality_names(cfg)  # a model of several modalities: they share the one backbone
    parts = build_parts(cfg, source=str(path), trusted=(), stage_dir=stage_dir, conditioner=_NO_CONDITIONER,
                        modality=names[0] if names else None)
    load_weights(parts)
    return parts.denoiser.backbone.state_dict()


_NO_CONDITIONER = object()  # build_parts without loading a text encoder (only the weights are wanted)


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
        self.modality, self.modality_name = parts.modality, parts.name  # of a model of several modalities
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.denoiser.to(self.device)
        self.stage.to(self.device)
        apply_performance_options(self.denoiser.backbone, channels_last=channels_last, compile=compile,
                                  compile_options=compile_options)
        self.conditioner.to(self.device)

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None, trusted_targets=(), modality: str | None = None,
             lora: str | list | None = None, lora_scale: float | list | None = None, **performance) -> Pipeline:
        """Load an export or checkpoint. Only ``multidiff.`` targets (and the caller's explicit
        ``trusted_targets`` prefixes, never a list written inside the file) are instantiated.
        ``modality``: which modality of a model of several to generate (required there, refused with
        the list of them when missing or unknown). ``lora``: saved LoRA adapters (a RUN/model of a
        ``lora.rank`` run, or a list of them, stacked) loaded on top, each at its ``lora_scale`` (one
        number for all, or one each; 0 gives the base model exactly). ``performance``: ``channels_last``,
        ``compile``, ``compile_options`` (see :func:`multidiff.performance.apply_performance_options`)."""
        path = Path(path).expanduser()
        loras, scales = lora_arguments(lora, lora_scale)
        cfg, load_weights, stage_dir = _read_model(path)
        parts = build_parts(cfg, source=str(path), trusted=trusted_targets, stage_dir=stage_dir, modality=modality)
        load_weights(parts)
        _add_loras(parts, loras, scales)
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
        progress: bool | Callable[[int, int], None] = True,
        init: str | Path | Tensor | None = None,
        mask: str | Path | Tensor | None = None,
        strength: float | None = None,
        harmonize: int = 0,
        noise: Tensor | None = None,
        **options,
    ) -> Tensor:
        """Sample ``num_samples`` per prompt; returns decoded raw samples ``(N, *raw_shape)``.

        Sample ``k`` (prompt-major order) uses seed ``seed + k`` and is identical whatever
        ``batch_size`` it is drawn in. ``options`` are the modality's generation options (the
        adapter's :meth:`~multidiff.adapters.base.Adapter.generation_options`, e.g. a length) and
        its region options (:meth:`~multidiff.adapters.base.Adapter.region_options`, e.g.
        ``keep_seconds``). The returned tensor carries a :class:`GenerationRecord` as
        ``.generation`` (prompts, seeds, settings), which :meth:`save` writes to ``metadata.jsonl``.
        ``progress``: a terminal progress bar (``True``), none, or a function called as
        ``progress(steps_done, steps_total)`` after every sampler step (a web page's bar).

        Editing (``docs/editing.md``): ``init`` is an input file (or a raw tensor, as the adapter's
        ``load`` gives it) that every sample edits. With a region (``mask``: a mask file, white to
        regenerate, or a tensor; or the modality's region options) the samples keep the input there
        and generate the rest (inpainting, continuation, interpolation), exactly in the adapter's
        tensor space; ``harmonize`` adds resampling passes per step for better agreement across the
        seam. ``strength`` in ``[0, 1]`` (default 1 with a region, 0.6 without: a variation) is the
        share of the steps run from the input noised to that level: 0 returns the input, 1 starts
        from pure noise (without a region that equals plain generation with the same seed).

        ``noise``: the initial noise ``(N, *model_shape)`` (``N = len(prompts) * num_samples``, the
        latent shape of a latent model) instead of the seeds' draws, unit variance, as a diffusers
        pipeline takes its ``latents``: the same tensor given to both gives the same samples
        (``docs/pretrained.md``). Noise injected by stochastic samplers still comes from the seeds.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        fn, default_name = self._sampler(sampler)
        sampler_name = sampler_name or default_name
        _check_options(prompts, num_samples, steps, guidance_scale, batch_size)
        sigmas = self._grid(steps, sigmas)
        try:
            options = self.adapter.read_options(options)
            region = {o.name: options.pop(o.name) for o in self.adapter.region_options()}
            edit = self.prepare_edit(init, mask, strength, harmonize, options, region)
            data_shape = tuple(self.adapter.sample_shape(**options))
            inputs = self.adapter.condition_inputs(**options)
        except ValueError as e:  # the adapter rejects an option (unknown name, bad value), a bad region
            raise GenerationError(str(e)) from None
        flat = [p for p in prompts for _ in range(num_samples)]
        seeds = [seed + k for k in range(len(flat))]
        latent_shape = tuple(self.stage.latent_shape(data_shape))
        if noise is not None and tuple(noise.shape) != (len(flat), *latent_shape):
            space = "shape" if self.stage.is_identity else "latent shape"
            raise GenerationError(
                f"noise has shape {tuple(noise.shape)} but {len(flat)} samples of this model start from "
                f"{(len(flat), *latent_shape)} (prompts x num_samples, then the model's {space} for these options)")
        steps_run = len(sigmas if edit is None else variation_sigmas(sigmas, edit.strength)) - 1
        bar = _progress(progress, total=math.ceil(len(flat) / batch_size) * steps_run)
        outputs = []
        latent_edit = None if edit is None else self.latent_edit(edit)
        for start in range(0, len(flat), batch_size):
            chunk, chunk_seeds = flat[start : start + batch_size], seeds[start : start + batch_size]
            z = self.sample_tensors(
                chunk, chunk_seeds, latent_shape, fn, sigmas, guidance_scale, negative_prompt,
                callback=bar, edit=latent_edit, noise=None if noise is None else noise[start : start + batch_size],
                inputs=inputs,
            )
            paste = None if edit is None or edit.keep is None else (edit.known, edit.keep)
            outputs.extend(self.adapter.fit_length(raw, **options).cpu()
                           for raw in decode_samples(self.stage, self.adapter, z, data_shape, paste=paste))
        if bar is not None:
            bar.close()
        samples = torch.stack(outputs)
        samples.generation = GenerationRecord(flat, seeds, sampler_name, steps, guidance_scale, negative_prompt,
                                              {k: v for k, v in options.items() if v is not None},
                                              {} if edit is None else edit.record)
        return samples

    def prepare_edit(self, init, mask, strength, harmonize, options: dict, region: dict) -> Edit | None:
        """:func:`prepare_edit` with this pipeline's adapter."""
        return prepare_edit(self.adapter, init, mask, strength, harmonize, options, region)

    def latent_edit(self, edit: Edit) -> Edit:
        """``edit`` in the latent stage's space: the input encoded, the region min-pooled to latent cells."""
        known = self.stage.encode(edit.known.to(self.device))
        keep = None if edit.keep is None else self.stage.latent_mask(edit.keep.to(self.device))
        return Edit(known, keep, edit.strength, edit.harmonize, edit.record)

    def sample_tensors(self, prompts, seeds, shape, fn, sigmas, guidance_scale, negative_prompt=None, callback=None,
                       edit: Edit | None = None, noise: Tensor | None = None, inputs: dict | None = None):
        """Model tensors ``(B, *shape)`` (latents of a latent model) for prompts and per-sample seeds (no decoding);
        ``edit``: an edit in this space (see :meth:`prepare_edit`); ``noise``: the initial noise instead of the seeds';
        ``inputs``: the adapter's :meth:`~multidiff.adapters.base.Adapter.condition_inputs` for the request."""
        return sample_prompts(
            self.denoiser, self.conditioner, prompts, seeds, shape, fn, sigmas,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, device=self.device, callback=callback,
            edit=edit, modality=self.modality, noise=noise, inputs=inputs,
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
             append: bool = False, **extra) -> list[Path]:
        """Write each sample with the adapter's writer (``0000.png``, ...) and ``metadata.jsonl``.

        Prompts, seeds, sampler settings and generation options come from ``samples.generation``
        (set by :meth:`generate`) unless given. ``format`` picks one of the adapter's
        :attr:`~multidiff.adapters.base.Adapter.formats` (e.g. ``"gif"``). Refuses an ``out``
        directory that already holds results unless ``overwrite``; ``append=True`` adds to it
        instead, numbering on after the highest ``NNNN`` file there and adding rows to its
        ``metadata.jsonl`` (nothing is replaced; callers that append from several threads hold a
        lock around this call). Returns the paths written.
        """
        out = Path(out)
        meta_path = out / "metadata.jsonl"
        if meta_path.exists() and not (overwrite or append):
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
        first = next_index(out) if append else 0
        extra_meta = self.adapter.metadata(**record.options)
        writer_kwargs = self.adapter.save_options(**record.options)
        paths, rows = [], []
        for k, (raw, prompt, s) in enumerate(zip(samples, prompts, seeds), start=first):
            path = out / f"{k:04d}{suffix}"
            self.adapter.save(raw, path, **writer_kwargs)
            paths.append(path)
            rows.append({
                "file": path.name, "prompt": prompt, "seed": s, "sampler": record.sampler, "steps": record.steps,
                "guidance_scale": record.guidance_scale, "negative_prompt": record.negative_prompt,
                "model": model or self.source, **({"modality": self.modality_name} if self.modality_name else {}),
                **extra_meta, **record.edit, **extra,
            })
        earlier = meta_path.read_text(encoding="utf-8") if append and meta_path.exists() else ""
        tmp = meta_path.with_suffix(".jsonl.tmp")
        tmp.write_text(earlier + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, meta_path)
        return paths


_NUMBERED = re.compile(r"^(\d{4,})(\.|$)")


def next_index(out: Path) -> int:
    """One past the highest ``NNNN`` file or folder name in ``out`` (0 when there is none)."""
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := _NUMBERED.match(p.name))] if out.is_dir() else []
    return max(numbers, default=-1) + 1


def prepare_edit(adapter, init, mask, strength, harmonize, options: dict, region: dict) -> Edit | None:
    """The input, its kept region and the edit settings in ``adapter``'s tensor space (``None``:
    no edit); it needs no model, so the CLI checks a request with it before loading one. Fills
    ``options`` the input implies (e.g. its duration) where the caller gave none.
    :class:`GenerationError` (a ``ValueError``) says what is wrong with a request."""
    given = {k: v for k, v in region.items() if v is not None}
    if init is None:
        if mask is not None or given or strength is not None:
            what = ", ".join([*(["mask"] if mask is not None else []), *given,
                              *(["strength"] if strength is not None else [])])
            raise GenerationError(f"{what} describe(s) an edit of an input, but no init= was given: pass "
                                  "init=FILE (the image, audio or clip to edit)")
        return None
    if isinstance(harmonize, bool) or not isinstance(harmonize, int) or harmonize < 0:
        raise GenerationError(f"harmonize={harmonize!r} is invalid: it must be an integer >= 0 (resampling passes per step)")
    raw = _read_input(init, adapter.load, "init")
    for name, value in adapter.input_options(raw).items():
        if options.get(name) is None:
            options[name] = value
    data_shape = tuple(adapter.sample_shape(**options))
    known = adapter.encode_input(raw, **options).float()
    mask_raw = None if mask is None else _read_input(mask, adapter.load_mask, "mask")
    keep = adapter.keep_mask(data_shape, raw=raw, mask=mask_raw, **region)
    described = ", ".join(f"{k}={v}" for k, v in (({"mask": mask} if mask is not None else {}) | given).items())
    if keep is not None:
        if tuple(keep.shape) != (1, *data_shape[1:]):  # the adapter contract: (1, *dims)
            raise GenerationError(f"{type(adapter).__name__}.keep_mask gave shape {tuple(keep.shape)}, "
                                  f"not {(1, *data_shape[1:])}")
        keep = keep.float()[None]
        if bool((keep >= 1).all()):
            raise GenerationError(f"the region ({described}) keeps all of init: there is nothing to generate. "
                                  "Mark what to regenerate (white in a mask, a fill_* option), or drop the region "
                                  "for a variation (strength=)")
        if bool((keep <= 0).all()):
            raise GenerationError(f"the region ({described}) keeps nothing of init: everything would be generated. "
                                  "Mark what to keep (black in a mask, a keep_* option), or drop the region for a "
                                  "variation (strength=) or plain generation")
    strength = check_strength((1.0 if keep is not None else 0.6) if strength is None else strength)
    record = {"init": init if isinstance(init, str | Path) else "tensor", "strength": strength, "harmonize": harmonize}
    if mask is not None:
        record["mask"] = mask if isinstance(mask, str | Path) else "tensor"
    record = {k: str(v) if isinstance(v, Path) else v for k, v in (record | given).items()}
    return Edit(known[None], keep, strength, harmonize, record)


def _read_input(value, load, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().float().cpu()
    path = Path(value)
    if not path.exists():
        raise GenerationError(f"{name}={value} does not exist; give the file to edit" if name == "init" else
                              f"{name}={value} does not exist; give a mask file (white: regenerate)")
    try:
        return load(path)
    except (OSError, ValueError) as e:
        raise GenerationError(f"{name}={value} cannot be read: {e}") from None


@torch.inference_mode()
def sample_prompts(denoiser, conditioner, prompts, seeds, shape, fn, sigmas, *, guidance_scale, negative_prompt=None,
                   device="cpu", callback=None, edit: Edit | None = None, modality: int | None = None,
                   noise: Tensor | None = None, inputs: dict | None = None) -> Tensor:
    """Sample model tensors ``(B, *shape)``: seeded noise, prompts encoded, CFG, then ``fn``.

    ``callback`` (e.g. a tqdm bar) gets ``update(1)`` after every sampler step. ``edit`` (in the
    space of ``shape``): start from the noised input (its ``strength``) and keep its region with
    :class:`~multidiff.core.editing.InpaintDenoiser` around the guided denoiser; a mask-conditioned
    backbone (``concat_channels``) also sees the region and the input as extra channels.
    ``modality``: the index of the modality to generate with a model of several (``cond.modality``).
    The start is ``noise * parameterization.start_scale(sigmas[0])`` (unit noise in the process's own
    frame); ``noise`` given replaces the seeds' draw of it. ``inputs``: input fields of the condition
    (one item's values, e.g. ``seconds``), given to every sample and both guidance branches.
    """
    gen = with_prior(PerSampleGenerator(seeds), getattr(denoiser, "noise_prior", None))
    sigmas = sigmas.to(torch.float32)
    if noise is None:
        noise = gen.randn((len(prompts), *shape), device=device)
    else:
        noise = noise.to(device=device, dtype=torch.float32)
    parameterization = getattr(denoiser, "parameterization", None)
    scale = float(sigmas[0]) if parameterization is None else parameterization.start_scale(float(sigmas[0]))
    x = noise * scale
    cond = conditioner.encode(prompts)
    if modality is not None:  # an input field: guidance hands it to the unconditional branch too
        cond = with_input(cond, modality=torch.full((len(prompts),), modality, dtype=torch.long, device=device))
    if inputs:
        cond = with_input(cond, **{k: torch.tensor([list(v)] * len(prompts), dtype=torch.float32, device=device)
                                   for k, v in inputs.items()})
    uncond = conditioner.encode([negative_prompt]) if negative_prompt else conditioner.null()
    guided = CFGDenoiser(denoiser, uncond, guidance_scale)
    if edit is not None:
        known = edit.known.to(device)
        x, sigmas = variation_start(known, noise, sigmas, edit.strength, start_scale=scale)
        if edit.keep is not None:
            # the harmonizing noise has its own per-sample streams: the sampler's stay as in plain generation
            harmonize_gen = PerSampleGenerator([s + HARMONIZE_SEED_OFFSET for s in seeds])
            concat = getattr(getattr(denoiser, "backbone", None), "concat_channels", 0) > 0
            guided = InpaintDenoiser(guided, known, edit.keep.to(device), harmonize=edit.harmonize, concat=concat,
                                     generator=harmonize_gen)
        if len(sigmas) == 1:  # strength 0: the input itself
            return x
    step = None if callback is None else (lambda info: callback.update(1))
    return fn(guided, x, sigmas, cond=cond, generator=gen, callback=step)


HARMONIZE_SEED_OFFSET = 1 << 40
"""Sample ``k``'s harmonizing passes draw from seed ``seed + k + 2**40``."""


def decode_samples(stage: LatentStage | None, adapter, z: Tensor, data_shape, *,
                   paste: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    """Sampled model tensors ``(B, *latent_shape)`` (on the stage's device) -> raw samples: through the
    latent stage as one batch (cropped to ``data_shape``), then the adapter, one sample at a time.
    ``paste``: ``(known, keep)`` in the adapter's tensor space, pasted over the decoded batch so
    that the kept region is the input exactly (a latent stage's reconstruction only approximates it)."""
    x = z if stage is None else stage.decode(z, shape=data_shape)
    if paste is not None:
        known, keep = (t.to(device=x.device, dtype=x.dtype) for t in paste)
        x = torch.lerp(x, known, keep)
    return [adapter.decode(item) for item in x]


def lora_arguments(lora, lora_scale) -> tuple[list[str], list[float]]:
    """``lora`` (a path, a list or none) and ``lora_scale`` (one number for all, a list, or none = 1) as
    two lists of one length, or a :class:`ModelLoadError` that says how they must pair up."""
    paths = [] if lora is None else [str(lora)] if isinstance(lora, str | Path) else [str(p) for p in lora]
    if lora_scale is None:
        scales = [1.0] * len(paths)
    elif isinstance(lora_scale, int | float):
        scales = [float(lora_scale)] * len(paths)
    else:
        scales = [float(s) for s in lora_scale]
    if len(scales) != len(paths):
        raise ModelLoadError(f"lora_scale={list(scales)} gives {len(scales)} scale(s) for {len(paths)} LoRA(s): give one "
                             "number for all or one per lora= entry")
    return paths, scales


def _check_options(prompts, num_samples, steps, guidance_scale, batch_size) -> None:
    if not prompts:
        raise GenerationError("no prompts given: pass prompt=... or prompts_file=FILE")
    for name, value in (("num_samples", num_samples), ("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GenerationError(f"{name} must be a positive integer, got {value!r}")
    if guidance_scale < 0:
        raise GenerationError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")


def _progress(progress, total: int):
    """A tqdm bar (``progress=True``), ``None`` (``False``), or a :class:`_StepReporter` around the
    caller's function; all take ``update(1)`` per step and ``close()``."""
    if callable(progress):
        return _StepReporter(progress, total)
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", dynamic_ncols=True)


class _StepReporter:
    """``update(n)`` -> ``report(done, total)``: the bar protocol for a caller's own display."""

    def __init__(self, report: Callable[[int, int], None], total: int) -> None:
        self.report, self.total, self.done = report, total, 0
        report(0, total)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.report(self.done, self.total)

    def close(self) -> None:
        pass


def load(path: str | Path, *, device: str | None = None, trusted_targets=(), modality: str | None = None,
         lora: str | list | None = None, lora_scale: float | list | None = None,
         channels_last: bool = False, compile: bool = False, compile_options: dict | None = None) -> Pipeline:
    """Load an exported model directory, a ``.ckpt`` or a diffusers pipeline directory as a :class:`Pipeline`.

    ``modality``: for a model of several modalities (``multidiff.load(DIR, modality="audio")``),
    the one to generate; :func:`modalities` lists them.

    ``trusted_targets``: module prefixes (e.g. ``["my_package."]``) whose ``_target_``s the model's
    config may instantiate besides ``multidiff.``; for models of modalities from your own package.
    ``channels_last`` / ``compile`` (+ ``compile_options`` for ``torch.compile``): speed options for
    the backbone, off by default (:mod:`multidiff.performance`). ``lora`` / ``lora_scale``: LoRA
    adapters loaded on top, stacked, each at its scale (see :meth:`Pipeline.load`).
    """
    return Pipeline.load(path, device=device, trusted_targets=trusted_targets, modality=modality, lora=lora,
                         lora_scale=lora_scale, channels_last=channels_last, compile=compile,
                         compile_options=compile_options)


def modalities(path: str | Path) -> list[str]:
    """The modalities a model generates, in order: several for a multimodal model, ``[]`` for one of
    a single modality (nothing is built)."""
    return modality_names(read_model_config(path))
