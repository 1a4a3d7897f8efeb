"""The one LightningModule. It knows nothing of modalities: tensors, captions and a denoiser."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from multidiff.conditioning.dropout import drop_condition
from multidiff.core.denoiser import Denoiser
from multidiff.core.noise import randn_like
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
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
        self.noise, self.conditioner = noise, conditioner
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.cond_dropout, self.max_ema_decay = cond_dropout, ema_decay
        self.config = config

    def on_fit_start(self) -> None:
        self.conditioner.to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["x"]
        with torch.no_grad():
            cond = self.conditioner.encode(batch["text"])
            cond = drop_condition(cond, self.conditioner.null(), self.cond_dropout)
        sigma = self.noise.sample(x0.shape[0], device=x0.device)  # float32, outside autocast's reach
        loss = self.denoiser.loss(x0, sigma, randn_like(x0), cond).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=x0.shape[0], sync_dist=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema_update(self.ema, self.denoiser, ema_decay(self.global_step, self.max_ema_decay))

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.denoiser.parameters())
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.config is not None:
            cfg = self.config if isinstance(self.config, DictConfig) else OmegaConf.create(self.config)
            checkpoint["multidiff_config"] = OmegaConf.to_container(cfg, resolve=True)
