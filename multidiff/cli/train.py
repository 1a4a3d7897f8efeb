"""``multidiff train recipe=NAME run_dir=DIR [key=value ...]``."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from multidiff.autoencoders.base import Identity
from multidiff.cli.compose import ConfigError
from multidiff.configuration import check_config, safe_instantiate, trusted_prefixes
from multidiff.multimodal import ModalityError, check_modalities, entry_config, modality_names
from multidiff.multimodal import weights as modality_weights
from multidiff.options import OptionRow, Options
from multidiff.training.options import LoraOptions, OptionError, TrainingOptions

log = logging.getLogger("multidiff.train")

RUN_DIR_ENV = "MULTIDIFF_RUN_DIR"


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (e.g. a non-finite loss under ``training.nonfinite=stop``)."""


@dataclass(frozen=True)
class RunOptions(Options):
    """The top-level keys of ``multidiff train`` (``conf/train.yaml``, which must agree: a test
    compares them); the config groups and ``training.*`` (:class:`TrainingOptions`) come beside them."""

    WHERE = "multidiff train --help lists them"

    run_dir: str | None = None
    """where the run writes checkpoints/, model/, samples/ and logs/ (null: runs/<recipe>-<time>)."""
    task: Literal["diffusion", "autoencoder"] = "diffusion"
    """what the run trains: a diffusion model, or the autoencoder of a latent stage (autoencoder=conv)."""
    seed: int = 0
    """seeds weights, noise, condition dropout and the data order."""
    data_root: str = "data"
    """where embedded datasets are materialized and cached (relative to the working directory)."""
    trusted_targets: list[str] = field(default_factory=list)
    """module prefixes beyond multidiff. whose _target_s the config may build, e.g. [my_package.]."""
    preview_prompts: list[str] = field(default_factory=list)
    """prompts the sample previews draw during training (recipes set them)."""
    init_from: str | None = None
    """a diffusers pipeline directory or an exported model to start from: its model and weights replace the recipe's."""
    resume: str | None = None
    """null (a fresh run), auto (the newest checkpoint in run_dir) or a .ckpt path."""
    verbose: bool = False
    """show every dependency message (Lightning tips, deprecation warnings) for debugging."""

    def rules(self):
        return [("seed", self.seed >= 0, "an integer >= 0")]


# keys of config groups that a run reads before anything is built: (key, type, rule, what it must be, help)
GROUP_KEYS: list[tuple[str, str, object, str, str]] = [
    ("trainer.max_steps", "int", lambda v: isinstance(v, int) and not isinstance(v, bool) and (v > 0 or v == -1),
     "a positive integer (or -1 with max_epochs)", "optimizer steps to train (trainer/ sets it, recipes tune it)."),
    ("data.batch_size", "int", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer",
     "items per batch on each device (the global batch multiplies it by devices and accumulation)."),
    ("conditioning.dropout", "float", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1,
     "a number in [0, 1)", "share of training prompts replaced by the null condition (what guidance needs)."),
    ("optimizer.lr", "float", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0, "a number > 0",
     "learning rate (before training.lr_scaling)."),
]


def group_key_rows(cfg: DictConfig | None = None) -> list[OptionRow]:
    """:data:`GROUP_KEYS` as help rows, with the values of ``cfg`` (a composition) as defaults."""
    return [OptionRow(key, kind, None if cfg is None else OmegaConf.select(cfg, key, default=None), help)
            for key, kind, _, _, help in GROUP_KEYS]


def resolve_run_dir(cfg: DictConfig) -> Path:
    """The run directory, pinned in the environment so distributed workers (which re-execute this
    command) reuse the launcher's directory instead of creating one each."""
    pinned = os.environ.get(RUN_DIR_ENV)
    if pinned:
        return Path(pinned)
    if cfg.get("run_dir"):
        run_dir = Path(str(cfg.run_dir))
    elif os.environ.get("SLURM_JOB_ID"):  # every task of the job derives the same directory
        recipe = OmegaConf.select(cfg, "recipe_name", default=None) or "train"
        run_dir = Path("runs") / f"{recipe}-slurm{os.environ['SLURM_JOB_ID']}"
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "launched as one of several processes (torchrun or similar) without run_dir=: each process would pick "
            "its own timestamped directory. Pass the same run_dir=DIR to every process"
        )
    else:
        recipe = OmegaConf.select(cfg, "recipe_name", default=None) or "train"
        run_dir = Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = run_dir.resolve()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def read_options(cfg: DictConfig) -> TrainingOptions:
    """The run's typed options (top-level keys, ``training.*`` and the group keys it reads up
    front), checked in one pass; :class:`ConfigError` names the key."""
    for key, _, ok, what, _ in GROUP_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} is invalid: it must be {what}")
    try:
        RunOptions.from_mapping(cfg, only_known=True)
        lora = LoraOptions.from_mapping(cfg.get("lora"))
        options = TrainingOptions.from_config(cfg.get("training"))
    except OptionError as e:
        raise ConfigError(str(e)) from None
    if lora.rank and not cfg.get("init_from"):
        raise ConfigError(f"lora.rank={lora.rank} fine-tunes a trained model with adapters, but there is none to start "
                          "from: set init_from=DIR (a diffusers pipeline directory or an exported model, RUN/model), "
                          "or lora.rank=0 to train every weight")
    if lora.rank and modality_names(cfg):
        raise ConfigError("lora.rank > 0 is not supported for a model of several modalities yet; set lora.rank=0")
    if lora.text_encoder and not lora.rank:
        raise ConfigError("lora.text_encoder=true adds adapters of lora.rank to the text encoder, but lora.rank=0 "
                          "(off): set lora.rank (e.g. lora.rank=8) or lora.text_encoder=false")
    if lora.text_encoder and cfg.data.get("streaming"):
        raise ConfigError("lora.text_encoder=true trains the text encoder, but data=streaming reads prompts already "
                          "encoded into the shards: train from the dataset itself (leave data=streaming out) or set "
                          "lora.text_encoder=false")
    return options


def apply_init_from(cfg: DictConfig) -> None:
    """``init_from=DIR``: the model keys of ``cfg`` (modality, autoencoder, backbone, diffusion, the text
    encoder) become those of the model in DIR (a diffusers pipeline directory, an export or a
    checkpoint); the recipe keeps its data, prompts and training settings. The weights load in
    :func:`build_diffusion`. ``modality.*`` keys given on the command line (``init_from_overrides``,
    recorded by the CLI) apply to the new modality: a video model fine-tuned on clips of
    ``modality.size=[240,416] modality.num_frames=17``. Nothing changes without ``init_from``."""
    source = cfg.get("init_from")
    overrides = list(cfg.pop("init_from_overrides", None) or [])
    if not source:
        return
    from multidiff.pipeline import ModelLoadError, read_model_config

    try:
        model = read_model_config(Path(str(source)).expanduser())
    except ModelLoadError as e:
        raise ConfigError(f"init_from={source}: {e}") from None
    if modality_names(model) or modality_names(cfg):
        raise ConfigError("init_from is not supported for models of several modalities yet")
    with open_dict(cfg):
        for key in ("modality", "autoencoder", "backbone", "diffusion"):
            cfg[key] = model.get(key)
        cfg.conditioning.encoder = model.conditioning.encoder
        cfg.conditioning.dim = model.conditioning.dim
        for item in overrides:  # modality.* from the command line: the training data's geometry on the new modality
            key, _, value = item.lstrip("+").partition("=")
            try:
                OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=False, force_add=True)
            except yaml.YAMLError:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def preflight(cfg: DictConfig) -> TrainingOptions:
    """Everything the composed config alone can tell, checked before any weights load, any trainer
    is built or any data is materialized: option types and ranges, and each part's own
    ``check_config`` (a dataset folder that must exist, a checkpoint to start from). The modality's
    adapter is built for it (cheap: no weights), since the data's checks need its file types."""
    options = read_options(cfg)
    trusted = trusted_prefixes(cfg)
    if modality_names(cfg):
        _preflight_modalities(cfg, options, trusted)
        return options
    adapter = safe_instantiate(cfg.modality, trusted=trusted, source="train config")
    check_config(cfg.data.dataset, trusted=trusted, source="train config", adapter=adapter)
    stage_target = None
    node = cfg.get("autoencoder")
    if node is not None and "_target_" in node:  # e.g. autoencoder.path: an autoencoder export for these items
        check_config(node, trusted=trusted, source="train config", shape=tuple(adapter.shape))  # allow-list first
        from hydra.utils import get_object

        stage_target = get_object(str(node._target_))
    editing = cfg.get("editing") or {}
    if editing.get("mask_conditioning") and cfg.get("task", "diffusion") == "diffusion":
        p = editing.get("mask_probability", 0.5)
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ConfigError(f"editing.mask_probability={p!r} is invalid: it must be a number in [0, 1]")
        if options.slice_items:
            raise ConfigError("editing=masked cannot train with slice training (training.slice_items): the mask "
                              "channels would need slicing too; set training.slice_items=0")
    if editing.get("init_from") and not Path(str(editing.init_from)).exists():
        raise ConfigError(f"editing.init_from={editing.init_from} does not exist; give an exported model (RUN/model)")
    if cfg.get("task", "diffusion") == "diffusion":
        if stage_target is not None and hasattr(stage_target, "reconstruction_loss"):
            raise ConfigError(
                f"autoencoder={OmegaConf.select(cfg, 'autoencoder._target_')} is an untrained network: train it first "
                "(multidiff train task=autoencoder ..., or a recipe autoencoder_*), then train the diffusion model on "
                "its export with autoencoder=trained autoencoder.path=AE/model"
            )
        # a latent model's backbone shape is known only once the stage is built (its weights load)
        latent = stage_target is not None and not (isinstance(stage_target, type) and issubclass(stage_target, Identity))
        check_config(cfg.backbone, trusted=trusted, source="train config",
                     **({} if latent else {"shape": tuple(adapter.shape)}))
    return options


def _preflight_modalities(cfg: DictConfig, options: TrainingOptions, trusted) -> None:
    """:func:`preflight` of a model of several modalities (``modalities``): every entry's keys, adapter
    and dataset; what such a model does not support yet, refused by name."""
    try:
        names = check_modalities(cfg)
    except ModalityError as e:
        raise ConfigError(str(e)) from None
    if cfg.get("task", "diffusion") != "diffusion":
        raise ConfigError("task=autoencoder trains the latent stage of one modality; drop modalities (or train each "
                          "modality's autoencoder with its own recipe)")
    if options.slice_items:
        raise ConfigError("training.slice_items (slice training) is not supported for a model of several modalities; "
                          "set training.slice_items=0")
    if options.lr_scaling != "none":
        raise ConfigError(f"training.lr_scaling={options.lr_scaling} scales the lr by one global batch, but the "
                          "modalities of this model have their own batches; set training.lr_scaling=none and optimizer.lr")
    for name in names:
        entry = entry_config(cfg, name)
        adapter = safe_instantiate(entry.modality, trusted=trusted, source=f"train config (modalities.{name})")
        if entry.get("data") is None or "dataset" not in entry.data:
            raise ConfigError(f"modalities.{name} has no data: give it a dataset (e.g. /data@modalities.{name}.data: "
                              "digits in the recipe's defaults list)")
        batch = entry.data.get("batch_size")
        _, _, ok, what, _ = next(row for row in GROUP_KEYS if row[0] == "data.batch_size")
        if not ok(batch):
            raise ConfigError(f"modalities.{name}.data.batch_size={batch!r} is invalid: it must be {what}")
        check_config(entry.data.dataset, trusted=trusted, source=f"train config (modalities.{name})", adapter=adapter)


def build(cfg: DictConfig, run_dir: Path, options: TrainingOptions | None = None):
    """Everything ``trainer.fit`` needs: model parts, module, data module, trainer (for ``task``)."""
    options = options or read_options(cfg)
    return _BUILDERS[cfg.get("task", "diffusion")](cfg, run_dir, options)


def build_diffusion(cfg: DictConfig, run_dir: Path, options: TrainingOptions):
    """``task=diffusion``: the model parts (adapter, latent stage, denoiser, ...), :class:`DiffusionModule`,
    the data module (latents cached under ``data_root`` for a latent model) and the trainer."""
    from multidiff.datasets.cache import prepare_dataset
    from multidiff.pipeline import build_parts
    from multidiff.training.data import DiffusionDataModule
    from multidiff.training.module import DiffusionModule

    if modality_names(cfg):
        return build_modalities(cfg, run_dir, options)
    make = partial(safe_instantiate, trusted=trusted_prefixes(cfg), source="train config")
    if cfg.get("init_from"):  # the source's weights (and its saved latent stage) on the model it describes
        from multidiff.pipeline import ModelLoadError, build_from

        try:
            parts = build_from(cfg, cfg.init_from)
        except ModelLoadError as e:
            raise ConfigError(f"init_from={cfg.init_from}: {e}") from None
    else:
        parts = build_parts(cfg, source="train config")
    try:
        options.check_batch(cfg.data.batch_size, tuple(parts.adapter.shape))
    except OptionError as e:
        raise ConfigError(f"{e} ({type(parts.adapter).__name__})") from None
    parts.denoiser.backbone.prepare_training()  # e.g. inflate from an image model (backbone.init_from)
    editing = cfg.get("editing") or {}
    if editing.get("init_from"):
        extend_model(parts.denoiser.backbone, editing.init_from)
    lora = LoraOptions.from_mapping(cfg.get("lora"))
    if lora.rank:  # after the weights: the adapters start at zero on top of them
        from multidiff.backbones.lora import LoraError, add_lora

        try:
            add_lora(parts.denoiser.backbone, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                     target_modules=lora.target_modules)
            if lora.text_encoder:  # the encoder's own attention projections (CLIP q/k/v/out, T5 q/k/v/o, ...)
                text_model = getattr(parts.conditioner, "model", None)
                if text_model is None:
                    raise LoraError(f"lora.text_encoder=true, but this model's conditioner "
                                    f"({type(parts.conditioner).__name__}) has no text encoder to adapt; set "
                                    "lora.text_encoder=false")
                add_lora(text_model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)
        except LoraError as e:
            raise ConfigError(str(e)) from None
    masked = bool(getattr(parts.denoiser.backbone, "concat_channels", 0))
    if cfg.data.get("streaming"):  # pre-encoded shards (multidiff prepare): checked against this model first
        from multidiff.datasets.shards import ready_for_training

        prepare = partial(ready_for_training, stage=parts.stage, conditioner=parts.conditioner,
                          data_shape=tuple(parts.adapter.shape))
    else:
        prepare = partial(prepare_dataset, stage=parts.stage, conditioner=parts.conditioner, root=cfg.data_root,
                          cache=bool(cfg.data.get("cache_latents", True)))
    datamodule = DiffusionDataModule(partial(make, cfg.data.dataset, adapter=parts.adapter),
                                     batch_size=cfg.data.batch_size, num_workers=cfg.data.get("num_workers", 0), seed=cfg.seed,
                                     prepare=prepare, shuffle_window=int(cfg.data.get("shuffle_window", 8)))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    module = DiffusionModule(
        parts.denoiser, make(cfg.diffusion.noise), parts.conditioner,
        make(cfg.optimizer, lr=batch_plan(cfg, trainer_kwargs)["lr"]),
        make(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        cond_dropout=cfg.conditioning.dropout, training=options, config=OmegaConf.to_container(cfg, resolve=True),
        seed=cfg.seed, stage=parts.stage, mask_sampler=parts.adapter.random_keep_mask if masked else None,
        mask_probability=float(editing.get("mask_probability", 0.5)),
    )
    callbacks = build_callbacks(cfg, parts, options, run_dir, make, progress=trainer_kwargs.get("enable_progress_bar", True))
    logger = make(cfg.logger, save_dir=str(run_dir)) if cfg.get("logger") else False
    return parts, module, datamodule, build_trainer(trainer_kwargs, run_dir, callbacks, logger)


def build_modalities(cfg: DictConfig, run_dir: Path, options: TrainingOptions):
    """``task=diffusion`` of a model of several modalities (:mod:`multidiff.multimodal`): one
    backbone and text encoder, each modality's adapter, schedule, training noise density, dataset
    and batch, batches drawn per modality by weight (:class:`MixtureDataModule`), previews per
    modality. Returns the parts of the first modality (the one holding the shared denoiser) first."""
    from multidiff.pipeline import ModelLoadError, build_modality_parts
    from multidiff.training.data import MixtureDataModule
    from multidiff.training.module import DiffusionModule

    make = partial(safe_instantiate, trusted=trusted_prefixes(cfg), source="train config")
    try:
        parts = build_modality_parts(cfg, source="train config")
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    names = list(parts)
    entries = {n: entry_config(cfg, n) for n in names}
    first = parts[names[0]]
    first.denoiser.backbone.prepare_training()
    streaming = bool(cfg.get("data") and cfg.data.get("streaming"))
    if streaming:  # DIR/<modality> for each modality, written by multidiff prepare of this recipe
        from multidiff.datasets.shards import ShardDataset, ready_for_training

        data = cfg.data.dataset
        factories = [partial(ShardDataset, stream_path(cfg.data.path, n), cache_dir=data.get("cache_dir"),
                             max_cache_size=data.get("max_cache_size", "50GB")) for n in names]
        ready = {n: partial(ready_for_training, stage=parts[n].stage, conditioner=first.conditioner,
                            data_shape=tuple(parts[n].adapter.shape)) for n in names}
        prepare = [ready[n] for n in names]
    else:
        factories = [partial(make, entries[n].data.dataset, adapter=parts[n].adapter) for n in names]
        prepare = None
    datamodule = MixtureDataModule(
        factories, batch_sizes=[int(entries[n].data.batch_size) for n in names], weights=modality_weights(cfg),
        num_workers=int(entries[names[0]].data.get("num_workers", 0)), seed=cfg.seed, prepare=prepare,
    )
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kwargs.get("strategy") in ("ddp", "ddp_spawn"):
        # a step trains one modality: the other modalities' patch layers get no gradient, which DDP
        # must be told to expect (it then finds them each step)
        trainer_kwargs["strategy"] += "_find_unused_parameters_true"
    module = DiffusionModule(
        first.denoiser, [make(entries[n].diffusion.noise) for n in names], first.conditioner,
        make(cfg.optimizer, lr=float(cfg.optimizer.lr)),
        make(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        cond_dropout=cfg.conditioning.dropout, training=options, config=OmegaConf.to_container(cfg, resolve=True),
        seed=cfg.seed,
    )
    callbacks = build_callbacks(cfg, parts, options, run_dir, make, progress=trainer_kwargs.get("enable_progress_bar", True))
    logger = make(cfg.logger, save_dir=str(run_dir)) if cfg.get("logger") else False
    return first, module, datamodule, build_trainer(trainer_kwargs, run_dir, callbacks, logger)


def stream_path(path, name: str) -> str:
    """Where a model of several modalities streams modality ``name``: ``path/name`` (a folder or URL)."""
    return f"{str(path).rstrip('/')}/{name}"


def extend_model(backbone, source: str) -> None:
    """Start ``backbone`` from the exported model ``source`` (``editing.init_from``): same weights,
    input layer widened by zeros for the mask-conditioning channels (:func:`load_widened`)."""
    from multidiff.backbones.base import WidenError, load_widened
    from multidiff.pipeline import ModelLoadError, load_backbone_state

    try:
        widened = load_widened(backbone, load_backbone_state(source), source=f"editing.init_from={source}")
    except (ModelLoadError, WidenError) as e:
        raise ConfigError(str(e)) from None
    print(f"started from {source} (input weights widened with zeros: {', '.join(widened) or 'none'})")


def build_autoencoder(cfg: DictConfig, run_dir: Path, options: TrainingOptions):
    """``task=autoencoder``: the adapter, the trainable stage of ``autoencoder=``, an
    :class:`AutoencoderModule`, the data module and the trainer (no conditioner, no backbone)."""
    from multidiff.pipeline import ModelParts
    from multidiff.training.autoencoder import AutoencoderModule, ReconstructionOptions
    from multidiff.training.data import DiffusionDataModule

    make = partial(safe_instantiate, trusted=trusted_prefixes(cfg), source="train config")
    adapter = make(cfg.modality)
    node = cfg.get("autoencoder")
    stage = None if node is None else make(node, shape=tuple(adapter.shape))
    if stage is None or not hasattr(stage, "reconstruction_loss"):
        raise ConfigError(
            f"task=autoencoder trains the autoencoder that autoencoder= names, but {type(stage).__name__} is not "
            "trainable (it has no reconstruction_loss); choose autoencoder=conv (or perframe for clips), or "
            "task=diffusion to use this one as a latent stage"
        )
    try:
        reconstruction = ReconstructionOptions.from_mapping(cfg.get("reconstruction"))
    except OptionError as e:
        raise ConfigError(str(e)) from None
    datamodule = DiffusionDataModule(partial(make, cfg.data.dataset, adapter=adapter), batch_size=cfg.data.batch_size,
                                     num_workers=cfg.data.get("num_workers", 0), seed=cfg.seed)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    module = AutoencoderModule(
        stage, make(cfg.optimizer, lr=batch_plan(cfg, trainer_kwargs)["lr"]),
        make(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None, reconstruction=reconstruction,
        training=options, config=OmegaConf.to_container(cfg, resolve=True), seed=cfg.seed,
        terms=adapter.reconstruction_terms,
    )
    callbacks = build_callbacks(cfg, None, options, run_dir, make, progress=trainer_kwargs.get("enable_progress_bar", True))
    logger = make(cfg.logger, save_dir=str(run_dir)) if cfg.get("logger") else False
    parts = ModelParts(adapter=adapter, denoiser=None, schedule=None, conditioner=None, stage=stage)
    return parts, module, datamodule, build_trainer(trainer_kwargs, run_dir, callbacks, logger)


_BUILDERS = {"diffusion": build_diffusion, "autoencoder": build_autoencoder}


def build_callbacks(cfg: DictConfig, parts, options: TrainingOptions, run_dir: Path, make, *, progress: bool) -> list:
    """Fault handling, checkpoints (``last.ckpt`` + periodic), sample previews and the progress bar."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from multidiff.training.callbacks import StepProgressBar
    from multidiff.training.faults import GracefulStop, LastCheckpoint, NonFiniteGuard, SignalAtStep

    every = cfg.callbacks.checkpoint.every_n_steps if "checkpoint" in cfg.callbacks else 0
    last = run_dir / "checkpoints" / "last.ckpt"
    callbacks = [GracefulStop(last), LastCheckpoint(last, every), NonFiniteGuard(options.nonfinite)]
    if cfg.get("data") is not None and cfg.data.get("log_items"):
        from multidiff.training.callbacks import ItemLog

        callbacks.append(ItemLog(run_dir))
    if options.inject_signal_at_step is not None:
        callbacks.append(SignalAtStep(options.inject_signal_at_step, options.inject_signal))
    samples_cfg = cfg.callbacks.get("samples") if parts is not None else None  # an autoencoder run draws no samples
    # A recipe may tune previews (callbacks.samples.every_n_steps) that callbacks=none switched off:
    # without a _target_ there is no callback to tune, so there are no previews.
    if samples_cfg is not None and samples_cfg.get("_target_"):
        # a model of several modalities ({name: parts}): previews of each, with its own prompts
        each = parts if isinstance(parts, dict) else {None: parts}
        for name, part in each.items():
            prompts = {} if name is None else {"prompts": list(entry_config(cfg, name).get("preview_prompts") or [])}
            cb = make(samples_cfg, **prompts)
            try:  # a preview grid the schedule cannot give would only fail at the first preview, mid-training
                part.schedule.sigmas(cb.steps)
            except ValueError as e:
                raise ConfigError(f"callbacks.samples.steps={cb.steps!r} is invalid: {e}") from None
            callbacks.append(cb.bind(adapter=part.adapter, schedule=part.schedule, sampler=make(cfg.sampler.fn),
                                     run_dir=run_dir, modality=part.modality, name=name))
    keep = cfg.callbacks.checkpoint.get("keep_last", 1) if "checkpoint" in cfg.callbacks else 1
    callbacks.append(ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="step_{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=every or None, save_top_k=keep, monitor="step", mode="max",
        save_last=False,  # LastCheckpoint keeps last.ckpt, written inside the loop (see there)
    ))
    if progress:
        callbacks.append(StepProgressBar())
    return callbacks


def build_trainer(trainer_kwargs: dict, run_dir: Path, callbacks: list, logger):
    """The Lightning Trainer of ``trainer.*``, with one paragraph for settings it refuses."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from multidiff.training.faults import AtomicCheckpointIO

    try:
        return L.Trainer(
            **trainer_kwargs, default_root_dir=str(run_dir), callbacks=callbacks, logger=logger,
            plugins=[AtomicCheckpointIO()],
            use_distributed_sampler=False,  # our batch sampler shards itself and resumes mid-epoch
        )
    except (ValueError, TypeError, MisconfigurationException) as e:
        raise ConfigError(f"invalid trainer settings ({', '.join(f'{k}={v}' for k, v in trainer_kwargs.items())}): "
                          f"{str(e).splitlines()[0]}") from None


def batch_plan(cfg: DictConfig, trainer_kwargs: dict) -> dict:
    """Global batch and the learning rate it implies, made explicit.

    ``global = data.batch_size x devices x num_nodes x accumulate_grad_batches``; with
    ``training.lr_scaling=linear`` (or ``sqrt``) the optimizer's lr is scaled by
    ``global / training.base_batch_size`` (or its square root).
    """
    devices = trainer_kwargs.get("devices", 1)
    n_dev = devices if isinstance(devices, int) and devices > 0 else len(devices) if isinstance(devices, list) else 1
    if devices in (-1, "auto"):
        import torch

        n_dev = max(1, torch.cuda.device_count())
    world = n_dev * int(trainer_kwargs.get("num_nodes", 1))
    batch = cfg.data.batch_size if "data" in cfg else None
    if batch is None:  # a model of several modalities: each its own batch (lr_scaling is refused there)
        return {"world_size": world, "global_batch": None, "lr": float(cfg.optimizer.lr)}
    global_batch = batch * world * int(trainer_kwargs.get("accumulate_grad_batches", 1))
    options = read_options(cfg)
    base = options.base_batch_size or global_batch
    factor = {"none": 1.0, "linear": global_batch / base, "sqrt": (global_batch / base) ** 0.5}[options.lr_scaling]
    return {"world_size": world, "global_batch": global_batch, "lr": float(cfg.optimizer.lr) * factor}


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=auto``: the newest checkpoint of the run directory (None if there is none);
    ``resume=PATH``: that file, which must exist."""
    resume = cfg.get("resume")
    if resume in (None, False, "none", "null"):
        return None
    if str(resume) != "auto":
        path = Path(str(resume))
        if not path.is_file():
            raise ConfigError(f"resume={resume}: no such checkpoint file; use resume=auto or an existing .ckpt")
        return str(path)
    candidates = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if not p.name.startswith(".")]
    candidates += list(run_dir.glob("hpc_ckpt_*.ckpt"))  # written by Lightning on SLURM requeue
    if not candidates:
        return None
    import torch

    def step_of(p: Path) -> tuple[int, float]:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            return int(ckpt.get("global_step", -1)), p.stat().st_mtime
        except Exception:  # a broken file is never the one to resume from
            return -2, p.stat().st_mtime

    best = max(candidates, key=step_of)
    return str(best) if step_of(best)[0] >= 0 else None


RESUME_HINT = "pass resume=auto, or a last.ckpt or step_*.ckpt that multidiff train wrote for a run with these settings"


def read_resume_checkpoint(path: str | Path) -> dict:
    """The model state of a checkpoint to resume from, read (memory-mapped) before anything heavy is
    built; one paragraph for a file that is empty, truncated or not a torch checkpoint, holds pickled
    code (never run: weights_only) or was not written by ``multidiff train``."""
    import zipfile

    import torch

    path = Path(path)
    if path.stat().st_size == 0:
        raise ConfigError(f"resume={path}: the file is empty (an interrupted copy?); {RESUME_HINT}")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"resume={path} is not a checkpoint written by torch.save (not a zip archive: truncated, "
                          f"another format, or a plain pickle, which multidiff never unpickles); {RESUME_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any reason means the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"resume={path} cannot be read as a checkpoint of plain tensors (weights_only=True: {reason}); "
                          f"it is damaged or holds pickled code, which multidiff never runs; {RESUME_HINT}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "multidiff_config" not in ckpt:
        raise ConfigError(f"resume={path} is not a multidiff training checkpoint (no state_dict and multidiff_config "
                          f"inside; an exported model/ cannot be resumed); {RESUME_HINT}")
    return ckpt["state_dict"]


def check_resume_matches(path: str | Path, state: dict, module) -> None:
    """One paragraph, naming the first differing key, when the checkpoint's model is not this run's."""
    frozen = set(getattr(module, "frozen_text_keys", list)())  # left out of checkpoints on purpose
    expected = {k: v for k, v in module.state_dict().items() if k not in frozen}
    for key, value in expected.items():
        if key not in state:
            problem = f"has no {key}"
        elif tuple(state[key].shape) != tuple(value.shape):
            problem = f"has {key} of shape {tuple(state[key].shape)} where this run's model has {tuple(value.shape)}"
        else:
            continue
        break
    else:
        extra = next((k for k in state if k not in expected), None)
        if extra is None:
            return
        problem = f"has {extra}, which this run's model does not"
    raise ConfigError(f"resume={path} was written for another model: it {problem}. Resume with the settings it was "
                      "trained with (its run directory's config.yaml) or start a new run_dir without resume")


def run(cfg: DictConfig) -> Path:
    """Train and export; returns the run directory."""
    apply_init_from(cfg)
    options = preflight(cfg)
    previous = os.environ.get(RUN_DIR_ENV)  # set by a launcher when this is a distributed worker
    run_dir = resolve_run_dir(cfg)
    try:
        return _train(cfg, run_dir, options)
    finally:  # the pin is for this run's workers only: a later run in this process chooses its own
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def _train(cfg: DictConfig, run_dir: Path, options: TrainingOptions) -> Path:
    cfg.run_dir = str(run_dir)
    ckpt_path = find_resume_checkpoint(cfg, run_dir)
    resume_state = read_resume_checkpoint(ckpt_path) if ckpt_path else None  # a bad file costs no model load
    # Lightning (and what it pulls in) takes seconds to import: only after the checks above
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from multidiff.pipeline import export_lora, export_model
    from multidiff.training.faults import LastCheckpoint, NonFiniteLossError, save_full_checkpoint

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    parts, module, datamodule, trainer = build(cfg, run_dir, options)
    if ckpt_path:  # before config.yaml is rewritten: a refused checkpoint's run keeps its config
        check_resume_matches(ckpt_path, resume_state, module)
    del resume_state
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    if trainer.is_global_zero:
        plan = batch_plan(cfg, OmegaConf.to_container(cfg.trainer, resolve=True))
        if plan["global_batch"] is None:
            log.info("modalities %s, batches of one at a time, lr %.3g%s", ", ".join(modality_names(cfg)), plan["lr"],
                     f"; resuming from {ckpt_path}" if ckpt_path else "")
        else:
            log.info("global batch %d (%d per device x %d processes x %d accumulation), lr %.3g%s",
                     plan["global_batch"], cfg.data.batch_size, plan["world_size"],
                     cfg.trainer.get("accumulate_grad_batches", 1), plan["lr"],
                     f"; resuming from {ckpt_path}" if ckpt_path else "")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        if trainer.is_global_zero:
            print(f"stopped by signal at step {trainer.global_step}; checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}"
                  f"\nresume with: multidiff train ... run_dir={run_dir} resume=auto")
        return run_dir
    except NonFiniteLossError as e:
        raise TrainingStopped(str(e)) from None
    final = next(cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint))
    if final.saved_at != trainer.global_step:
        # stopped before its last batch (max_time, a callback's stop): keep the final state anyway.
        # Resuming it continues training, but not on exactly the batches an uninterrupted run would see.
        save_full_checkpoint(trainer, final.checkpoint_path)
    if trainer.is_global_zero:
        if cfg.get("task", "diffusion") == "autoencoder":
            out = _export_autoencoder(cfg, run_dir, parts, module, datamodule, trainer)
        elif LoraOptions.from_mapping(cfg.get("lora")).rank:  # the adapters alone, on top of init_from
            out = export_lora(run_dir / "model", module.ema.backbone, base=str(cfg.init_from),
                              text_encoder=module.text_ema if module.text_lora else None)
        else:
            out = export_model(run_dir / "model", cfg, module.ema.backbone, stage=module.stage,
                               conditioner=module.conditioner)
        log.info("exported model to %s", out)
        print(f"run directory: {run_dir}\nexported model: {out}")
    return run_dir


def _export_autoencoder(cfg: DictConfig, run_dir: Path, parts, module, datamodule, trainer) -> Path:
    """Measure the EMA autoencoder's reconstructions (``RUN/reconstruction.json``, a preview grid of
    inputs over reconstructions in ``RUN/samples/``) and export it to ``RUN/model``."""
    import json

    from multidiff.autoencoders.trained import export_autoencoder
    from multidiff.evaluation.reconstruction import reconstruction_metrics

    stage = module.ema
    metrics = None
    if module.reconstruction.eval_items > 0:
        metrics, x, x_hat = reconstruction_metrics(stage, datamodule.dataset, items=module.reconstruction.eval_items,
                                                   device=module.device)
        (run_dir / "reconstruction.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        for logger in trainer.loggers:
            logger.log_metrics({f"reconstruction/{k}": metrics[k] for k in ("l1", "mse", "psnr")}, step=trainer.global_step)
            logger.save()
        log.info("reconstruction of %d items: l1 %.4f, mse %.5f, psnr %.2f dB", metrics["items"], metrics["l1"],
                 metrics["mse"], metrics["psnr"])
        k = min(8, len(x))
        raws = [parts.adapter.decode(t) for t in (*x[:k], *x_hat[:k])]
        parts.adapter.write_previews(raws, run_dir / "samples" / "reconstruction", nrow=k)
    node = {key: cfg[key] for key in ("modality", "autoencoder", "trusted_targets") if key in cfg}
    text = OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(OmegaConf.create(node), resolve=True)))
    return export_autoencoder(run_dir / "model", stage.cpu(), text, metrics=metrics)
