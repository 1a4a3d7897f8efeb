"""The one LightningModule. It knows nothing of modalities: tensors, captions and a denoiser."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from multidiff.core.cond import Cond
from multidiff.core.denoiser import Denoiser
from multidiff.performance import apply_performance_options
from multidiff.training.ema import ema_decay, ema_update


class DiffusionModule(L.LightningModule):
    """Trains ``denoiser`` on batches ``{"x": (B, C, *dims), "text": [B strings]}``.

    Args:
        denoiser: a :class:`Denoiser` (backbone + parameterization).
        noise: a training noise density with ``sample(B, device=...) -> sigma (B,)``.
        conditioner: frozen; ``encode(texts) -> Cond`` and ``null(B)``. Not saved in checkpoints.
        optimizer: ``partial(torch.optim.X, lr=...)`` taking the parameters.
        lr_scheduler: optional ``partial`` taking the optimizer (stepped every optimizer step).
        cond_dropout: probability of training a sample with the null condition (for CFG).
        ema_decay: maximum EMA decay (with warm-up); the EMA copy is used for sampling and export.
        config: the run's resolved config, stored in every checkpoint for loading without Hydra.
        seed: seeds the module's own generator for noise levels, noise and condition dropout. It is
            re-seeded every batch from ``(seed, epoch, batch index)``, so a resumed run (on
            every rank) draws exactly what the uninterrupted run would have drawn, with no RNG
            state to carry in checkpoints.
        nonfinite: ``"stop"`` raises on a NaN/inf loss, ``"skip"`` skips that step (counted).
        inject_nan_at_step: fault injection for tests: make the loss NaN at this optimizer step.
        channels_last, compile, compile_options: speed options for the trained backbone
            (:func:`multidiff.performance.apply_performance_options`); the EMA copy, used for
            previews and the export, keeps the default layout and is not compiled.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        noise,
        conditioner,
        optimizer: partial,
        lr_scheduler: partial | None = None,
        *,
        cond_dropout: float = 0.1,
        ema_decay: float = 0.999,
        config: DictConfig | dict | None = None,
        seed: int = 0,
        nonfinite: str = "stop",
        inject_nan_at_step: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
        apply_performance_options(self.denoiser.backbone, channels_last=channels_last, compile=compile,
                                  compile_options=compile_options)
        self.noise, self.conditioner = noise, conditioner
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.cond_dropout, self.max_ema_decay = cond_dropout, ema_decay
        self.config = config
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"training.nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.seed, self.nonfinite, self.inject_nan_at_step = seed, nonfinite, inject_nan_at_step
        self.skipped_steps = 0
        self._rng: torch.Generator | None = None

    def on_fit_start(self) -> None:
        self.conditioner.to(self.device)

    def on_train_start(self) -> None:
        if self.global_step > 0:  # resumed: loggers that keep history drop what the checkpoint does not cover
            for logger in self.loggers:
                if hasattr(logger, "resume_at"):
                    logger.resume_at(self.global_step)

    def _batch_rng(self, batch_idx: int) -> torch.Generator:
        if self._rng is None or self._rng.device != self.device:
            self._rng = torch.Generator(device=self.device)
        # not keyed by rank: every rank draws the global batch's values and keeps its own rows
        key = hash((self.seed, self.current_epoch, batch_idx)) & 0x7FFF_FFFF_FFFF_FFFF
        return self._rng.manual_seed(key)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        x0 = batch["x"]
        rng = self._batch_rng(batch_idx)
        # Draw noise levels, noise and dropout for the whole global batch and keep this rank's
        # rows (the batch sampler gives rank r the rows r::world): R processes then compute
        # exactly what one process computes on the global batch.
        world, rank, b = self.trainer.world_size if self._trainer else 1, self.global_rank, x0.shape[0]
        with torch.no_grad():
            cond = self.conditioner.encode(batch["text"])
            keep = torch.rand(b * world, generator=rng, device=x0.device)[rank::world] >= self.cond_dropout
            cond = Cond.where(keep, cond, self.conditioner.null()) if self.cond_dropout > 0 else cond
        sigma = self.noise.sample(b * world, device=x0.device, generator=rng)[rank::world]  # float32
        shape = (b * world, *x0.shape[1:])
        prior = self.denoiser.noise_prior
        if prior is None:
            noise = torch.randn(shape, generator=rng, device=x0.device)[rank::world]
        else:  # e.g. noise shared in part across a clip's frames
            noise = prior.sample(shape, generator=rng, device=x0.device)[rank::world]
        loss = self.denoiser.loss(x0, sigma, noise.to(x0.dtype), cond).mean()
        if self.inject_nan_at_step is not None and self.global_step == self.inject_nan_at_step:
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            return self._nonfinite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=b, sync_dist=world > 1)
        return loss

    def _nonfinite(self, loss: torch.Tensor):
        from multidiff.training.faults import NonFiniteLossError

        if self.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step}; stopped before updating the weights, "
                "so the last periodic checkpoint is the last good one. Lower optimizer.lr, check the data, or set "
                "training.nonfinite=skip to skip such steps"
            )
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, batch_size=1)
        return None  # Lightning skips backward and the optimizer step

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema_update(self.ema, self.denoiser, ema_decay(self.global_step, self.max_ema_decay))

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.denoiser.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["multidiff_skipped_steps"] = self.skipped_steps
        if self.config is not None:
            cfg = self.config if isinstance(self.config, DictConfig) else OmegaConf.create(self.config)
            checkpoint["multidiff_config"] = OmegaConf.to_container(cfg, resolve=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("multidiff_skipped_steps", 0))
