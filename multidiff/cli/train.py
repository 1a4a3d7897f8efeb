"""``multidiff train recipe=NAME run_dir=DIR [key=value ...]``."""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from multidiff.cli.compose import ConfigError
from multidiff.configuration import safe_instantiate, trusted_prefixes

log = logging.getLogger("multidiff.train")

RUN_DIR_ENV = "MULTIDIFF_RUN_DIR"


def resolve_run_dir(cfg: DictConfig) -> Path:
    """The run directory, pinned in the environment so distributed workers (which re-execute this
    command) reuse the launcher's directory instead of creating one each."""
    pinned = os.environ.get(RUN_DIR_ENV)
    if pinned:
        return Path(pinned)
    if cfg.get("run_dir"):
        run_dir = Path(str(cfg.run_dir))
    else:
        recipe = OmegaConf.select(cfg, "recipe_name", default=None) or "train"
        run_dir = Path("runs") / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = run_dir.resolve()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def _validate(cfg: DictConfig) -> None:
    checks = [
        ("trainer.max_steps", lambda v: isinstance(v, int) and (v > 0 or v == -1), "a positive integer"),
        ("data.batch_size", lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        ("conditioning.dropout", lambda v: isinstance(v, int | float) and 0 <= v < 1, "a number in [0, 1)"),
        ("training.ema_decay", lambda v: isinstance(v, int | float) and 0 <= v < 1, "a number in [0, 1)"),
    ]
    for key, ok, what in checks:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} is invalid: it must be {what}")


def build(cfg: DictConfig, run_dir: Path):
    """Everything ``trainer.fit`` needs, built from the config."""
    import lightning as L

    from multidiff.pipeline import build_parts
    from multidiff.training.data import DiffusionDataModule
    from multidiff.training.module import DiffusionModule

    trusted = trusted_prefixes(cfg)
    make = partial(safe_instantiate, trusted=trusted, source="train config")
    parts = build_parts(cfg, source="train config")
    datamodule = DiffusionDataModule(
        partial(make, cfg.data.dataset, adapter=parts.adapter),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.get("num_workers", 0),
        seed=cfg.seed,
    )
    module = DiffusionModule(
        parts.denoiser,
        make(cfg.diffusion.noise),
        parts.conditioner,
        make(cfg.optimizer),
        make(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        cond_dropout=cfg.conditioning.get("dropout", 0.1),
        ema_decay=cfg.training.ema_decay,
        config=model_and_run_config(cfg),
    )
    callbacks = []
    samples_cfg = cfg.callbacks.get("samples")
    if samples_cfg is not None:
        cb = make(samples_cfg)
        sampler = make(cfg.sampler.fn)
        callbacks.append(cb.bind(adapter=parts.adapter, schedule=parts.schedule, sampler=sampler, run_dir=run_dir))
    ckpt = cfg.callbacks.get("checkpoint", {})
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks.append(
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step_{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=ckpt.get("every_n_steps", 0) or None,
            save_top_k=ckpt.get("keep_last", 1),
            monitor="step",
            mode="max",
            save_last=True,
        )
    )
    logger = make(cfg.logger, save_dir=str(run_dir)) if cfg.get("logger") else False
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(**trainer_kwargs, default_root_dir=str(run_dir), callbacks=callbacks, logger=logger)
    return parts, module, datamodule, trainer


def model_and_run_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def run(cfg: DictConfig) -> Path:
    """Train and export; returns the run directory."""
    import lightning as L

    from multidiff.pipeline import export_model

    _validate(cfg)
    run_dir = resolve_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    parts, module, datamodule, trainer = build(cfg, run_dir)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        out = export_model(run_dir / "model", cfg, module.ema.backbone)
        log.info("exported model to %s", out)
        print(f"run directory: {run_dir}\nexported model: {out}")
    return run_dir
