"""Training a latent stage: the LightningModule of ``multidiff train task=autoencoder``.

It knows of the stage only its trainable contract: ``reconstruction_loss(x, noise=..., loss=...,
kl_weight=...) -> {"loss": (B,), ...}`` and ``latent_shape``. Noise for the posterior sample is
drawn per global batch from a generator keyed by ``(seed, epoch, batch)`` and each rank keeps its
rows, as in :class:`~multidiff.training.module.DiffusionModule`: a resumed run draws exactly what
the uninterrupted run would have drawn, and ``R`` processes compute what one computes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import lightning as L
import torch
from omegaconf import DictConfig

from multidiff.options import Options
from multidiff.training.ema import ema_decay, ema_update
from multidiff.training.module import optimizers, store_config
from multidiff.training.options import TrainingOptions


@dataclass(frozen=True)
class ReconstructionOptions(Options):
    """What ``reconstruction.*`` may hold (the losses and evaluation of ``task=autoencoder``)."""

    PREFIX = "reconstruction."
    WHERE = "conf/train.yaml explains each"

    loss: Literal["l1", "l2"] = "l1"
    """reconstruction error: l1 (mean absolute) or l2 (mean squared)."""
    kl_weight: float = 1.0e-6
    """weight of the KL term of a kl bottleneck (per latent element; 0 = none)."""
    spectral_weight: float = 1.0
    """weight of the modality's own reconstruction terms (its adapter's reconstruction_terms, e.g. a spectral loss)."""
    eval_items: int = 512
    """items whose reconstructions are measured at the end (reconstruction.json; 0 = none)."""

    def rules(self):
        return [("kl_weight", math.isfinite(self.kl_weight) and self.kl_weight >= 0, "a number >= 0"),
                ("spectral_weight", math.isfinite(self.spectral_weight) and self.spectral_weight >= 0, "a number >= 0"),
                ("eval_items", self.eval_items >= 0, "a whole number >= 0")]


class AutoencoderModule(L.LightningModule):
    """Trains a stage with a ``reconstruction_loss`` on batches ``{"x": (B, C, *dims), ...}``; keeps an
    EMA copy (what is exported and measured). ``terms``: the modality's own losses
    (``adapter.reconstruction_terms(x_hat, x) -> {name: (B,)}``), added with ``spectral_weight``."""

    def __init__(self, autoencoder, optimizer: partial, lr_scheduler: partial | None = None, *,
                 reconstruction: ReconstructionOptions | None = None, training: TrainingOptions | None = None,
                 config: DictConfig | dict | None = None, seed: int = 0, terms=None) -> None:
        super().__init__()
        self.terms = terms
        self.autoencoder = autoencoder.requires_grad_(True).train()
        self.ema = copy.deepcopy(autoencoder).requires_grad_(False).eval()
        self.reconstruction = reconstruction or ReconstructionOptions()
        self.options = training or TrainingOptions()
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.config, self.seed = config, seed
        self._rng: torch.Generator | None = None

    def _batch_rng(self, batch_idx: int) -> torch.Generator:
        if self._rng is None or self._rng.device != self.device:
            self._rng = torch.Generator(device=self.device)
        return self._rng.manual_seed(hash((self.seed, self.current_epoch, batch_idx)) & 0x7FFF_FFFF_FFFF_FFFF)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        x = batch["x"]
        world, rank, b = self.trainer.world_size if self._trainer else 1, self.global_rank, x.shape[0]
        shape = (b * world, *self.autoencoder.latent_shape(tuple(x.shape[1:])))
        noise = torch.randn(shape, generator=self._batch_rng(batch_idx), device=x.device)[rank::world].to(x.dtype)
        losses = self.autoencoder.reconstruction_loss(x, noise=noise, loss=self.reconstruction.loss,
                                                      kl_weight=self.reconstruction.kl_weight)
        per_item = losses["loss"]
        extra = self.terms(losses["x_hat"], x) if self.terms is not None and self.reconstruction.spectral_weight else {}
        for term in extra.values():
            per_item = per_item + self.reconstruction.spectral_weight * term
        loss = per_item.mean()
        if not torch.isfinite(loss):
            if self.options.nonfinite == "skip":
                return None  # Lightning skips backward and the optimizer step
            from multidiff.training.faults import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite reconstruction loss ({loss.item()}) at step {self.global_step}; "
                                     "stopped before updating the weights. Lower optimizer.lr, check the data, or set "
                                     "training.nonfinite=skip to skip such steps")
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=b, sync_dist=world > 1)
        for name, value in [*((k, losses[k]) for k in ("recon", "kl") if k in losses), *extra.items()]:
            self.log(f"train/{name}", value.mean(), on_step=True, batch_size=b, sync_dist=world > 1)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        ema_update(self.ema, self.autoencoder, ema_decay(self.global_step + 1, self.options.ema_decay))

    def configure_optimizers(self):
        return optimizers(self.autoencoder.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        store_config(checkpoint, self.config)
