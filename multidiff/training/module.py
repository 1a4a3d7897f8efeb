"""The one LightningModule. It knows no media types: tensors, captions, a denoiser (and, for a model of
several modalities, the index of the one a batch holds)."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from multidiff.backbones.lora import has_lora
from multidiff.core.cond import Cond, with_input
from multidiff.core.denoiser import Denoiser
from multidiff.core.editing import mask_channels, with_concat
from multidiff.performance import apply_performance_options
from multidiff.training.ema import ema_decay, ema_update
from multidiff.training.options import TrainingOptions


class DiffusionModule(L.LightningModule):
    """Trains ``denoiser`` on batches ``{"x": (B, C, *dims), "text": [B strings]}`` (data, encoded by
    the latent stage in the step) or ``{"z": raw latents, "text": ...}`` (latents cached on disk,
    only normalized here).

    Args:
        denoiser: a :class:`Denoiser` (backbone + parameterization).
        noise: a training noise density with ``sample(B, device=...) -> sigma (B,)``; for a model of
            several modalities a list of them, one per modality: a batch of modality ``i``
            (``batch["modality"] == i``, see :class:`MixtureDataModule`) draws from ``noise[i]`` and
            tells the backbone which modality it is through ``cond.modality``.
        conditioner: frozen; ``encode(texts) -> Cond`` and ``null(B)``. Not saved in checkpoints.
        optimizer: ``partial(torch.optim.X, lr=...)`` taking the parameters.
        lr_scheduler: optional ``partial`` taking the optimizer (stepped every optimizer step).
        cond_dropout: probability of training a sample with the null condition (for CFG).
        config: the run's resolved config, stored in every checkpoint for loading without Hydra.
        stage: the latent stage (frozen; ``encode``/``normalize`` only), or ``None`` for data the
            backbone sees as it is. It is a submodule, so checkpoints carry its latent scale.
        seed: seeds the module's own generator for noise levels, noise and condition dropout. It is
            re-seeded every batch from ``(seed, epoch, batch index)``, so a resumed run (on
            every rank) draws exactly what the uninterrupted run would have drawn, with no RNG
            state to carry in checkpoints.
        training: the typed ``training.*`` options (:class:`~multidiff.training.options.TrainingOptions`,
            validated there): EMA decay, the non-finite policy, fault drills, slice training, speed
            options. Slice training (``slice_items``): of every per-device batch, the last
            ``slice_items`` items train on one random index along item axis ``slice_dim`` (kept as
            a length-1 axis) beside the whole items, in the same step. With clips ``(C, T, H, W)``
            and ``slice_dim=1`` these are single frames: joint image-video training (Ho et al.
            2022; Make-A-Video; VideoLDM), where a slice costs about ``1/T`` of an item.
            ``slice_sigma_scale`` multiplies the sliced items' noise levels: whole items keep their
            content visible at higher noise than one slice of them, which is why they may train on
            a shifted schedule; ``1 / shift`` trains the slices on the unshifted levels. The speed
            options (:func:`multidiff.performance.apply_performance_options`) apply to the trained
            backbone; the EMA copy, used for previews and the export, is left as is.
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
        training: TrainingOptions | None = None,
        config: DictConfig | dict | None = None,
        seed: int = 0,
        stage=None,
        mask_sampler=None,
        mask_probability: float = 0.5,
    ) -> None:
        super().__init__()
        self.stage = None if stage is None or stage.is_identity else stage.requires_grad_(False).eval()
        self.options = training = training or TrainingOptions()
        self.denoiser = denoiser
        self.ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
        apply_performance_options(self.denoiser.backbone, channels_last=training.channels_last,
                                  compile=training.compile, compile_options=training.compile_options or None)
        self.noise, self.conditioner = noise, conditioner
        # LoRA adapters on the text encoder (lora.text_encoder): the encoder becomes a trained submodule
        # with its own EMA copy; its frozen base weights stay out of checkpoints (see on_save_checkpoint)
        text_model = getattr(conditioner, "model", None)
        self.text_lora = isinstance(text_model, torch.nn.Module) and has_lora(text_model)
        if self.text_lora:
            self.text_encoder = text_model.eval()
            self.text_ema = copy.deepcopy(text_model).requires_grad_(False).eval()
            conditioner.refresh(cache=False)  # encodings change every step
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.cond_dropout, self.config, self.seed = cond_dropout, config, seed
        self.skipped_steps = 0
        self._rng: torch.Generator | None = None
        if mask_sampler is not None and not getattr(denoiser.backbone, "concat_channels", 0):
            raise ValueError("mask_sampler is given but the backbone takes no concat_channels (editing.mask_conditioning)")
        self.mask_sampler, self.mask_probability = mask_sampler, float(mask_probability)

    def on_fit_start(self) -> None:
        self.conditioner.to(self.device)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.stage is not None:  # frozen: never in training mode (dropout, norms)
            self.stage.eval()
        if self.text_lora:  # adapters train, but without the encoder's dropout (as the frozen encoder runs)
            self.text_encoder.eval()
        return self

    @torch.no_grad()
    def latents(self, batch: dict) -> torch.Tensor:
        """The model tensors ``x0`` of a batch: cached raw latents normalized, or data encoded by the stage."""
        if "z" in batch:
            if self.stage is None:
                raise ValueError("a batch of cached latents ('z') reached a model without a latent stage")
            return self.stage.normalize(batch["z"])
        return batch["x"] if self.stage is None else self.stage.encode(batch["x"])

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
        x0 = self.latents(batch)
        rng = self._batch_rng(batch_idx)
        # Draw noise levels, noise and dropout for the whole global batch and keep this rank's
        # rows (the batch sampler gives rank r the rows r::world): R processes then compute
        # exactly what one process computes on the global batch.
        world, rank, b = self.trainer.world_size if self._trainer else 1, self.global_rank, x0.shape[0]
        # the frozen encoder's condition needs no graph; adapters on the encoder (text_lora) train through it
        with torch.set_grad_enabled(self.text_lora):
            cond = self.prompt_cond(batch)
            keep = torch.rand(b * world, generator=rng, device=x0.device)[rank::world] >= self.cond_dropout
            if self.cond_dropout > 0:
                null = (self.conditioner.encode_trainable([""]) if self.text_lora and getattr(self.conditioner, "null_kind", "")
                        != "zeros" else self.conditioner.null())
                cond = Cond.where(keep, cond, null)
        with torch.no_grad():
            if self.mask_sampler is not None:
                cond = with_concat(cond, self._editing_channels(x0, rng, world, rank))
        modality = batch.get("modality")
        if modality is not None:  # one modality of several: its own noise levels, and the backbone is told which
            cond = with_input(cond, modality=torch.full((b,), int(modality), dtype=torch.long, device=x0.device))
        density = self.noise if modality is None else self.noise[int(modality)]
        sigma = density.sample(b * world, device=x0.device, generator=rng)[rank::world]  # float32
        shape = (b * world, *x0.shape[1:])
        prior = self.denoiser.noise_prior
        if prior is None:
            noise = torch.randn(shape, generator=rng, device=x0.device)[rank::world]
        else:  # e.g. noise shared in part across a clip's frames
            noise = prior.sample(shape, generator=rng, device=x0.device)[rank::world]
        noise = noise.to(x0.dtype)
        if self.options.slice_items:
            per_sample = self._sliced_loss(x0, sigma, noise, cond, rng, world, rank)
        else:
            per_sample = self.denoiser.loss(x0, sigma, noise, cond)
        loss = per_sample.mean()
        if self.global_step == self.options.inject_nan_at_step:
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            return self._nonfinite(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=b, sync_dist=world > 1)
        return loss

    def prompt_cond(self, batch: dict) -> Cond:
        """The prompts' condition: stored in the batch (pre-encoded shards: no text encoding) or encoded."""
        if "tokens" in batch:
            return Cond(tokens=batch["tokens"], mask=batch["mask"], pooled=batch["pooled"])
        if self.text_lora:  # the adapters train: through the encoder with autograd, nothing cached
            return self.conditioner.encode_trainable(batch["text"])
        return self.conditioner.encode(batch["text"])

    def _editing_channels(self, x0: torch.Tensor, rng: torch.Generator, world: int, rank: int) -> torch.Tensor:
        """``cat([keep, keep * x0])`` with random regions for ``mask_probability`` of the global batch."""
        n, dims = x0.shape[0] * world, tuple(x0.shape[2:])
        used = torch.rand(n, generator=rng, device=x0.device) < self.mask_probability
        keeps = torch.stack([self.mask_sampler(dims, rng).to(x0.device) for _ in range(n)])
        keep = (keeps * used.reshape(-1, *([1] * (keeps.ndim - 1)))).to(x0.dtype)[rank::world]
        return mask_channels(x0, keep)

    def _sliced_loss(self, x0, sigma, noise, cond: Cond, rng, world: int, rank: int) -> torch.Tensor:
        """Per-item losses: the first ``B - slice_items`` items whole, the rest on one random index
        along ``slice_dim`` each.

        The split is by position in the per-device batch, which is the same split of the global
        batch on every rank (rank r holds global rows r::world), and the indices are drawn for the
        global batch, so R processes still compute what one process computes.
        """
        self.options.check_shape(tuple(x0.shape[1:]))
        axis = self.options.slice_dim + 1  # the tensor axis, after the batch axis
        b, length = x0.shape[0], x0.shape[axis]
        pick = torch.randint(0, length, (b * world,), generator=rng, device=x0.device)[rank::world]
        k = max(b - self.options.slice_items, 1)  # at least one whole item per batch (a short last batch may have fewer)
        whole = self.denoiser.loss(x0[:k], sigma[:k], noise[:k], cond.index(slice(0, k)))
        if k == b:
            return whole
        shape = list(x0[k:].shape)
        shape[axis] = 1
        index = pick[k:].reshape(-1, *([1] * (x0.ndim - 1))).expand(shape)
        part, part_noise = (torch.gather(t[k:], axis, index) for t in (x0, noise))
        sliced = self.denoiser.loss(part, sigma[k:] * self.options.slice_sigma_scale, part_noise, cond.index(slice(k, b)))
        self.log("train/loss_whole", whole.mean(), on_step=True, batch_size=k, sync_dist=world > 1)
        self.log("train/loss_sliced", sliced.mean(), on_step=True, batch_size=b - k, sync_dist=world > 1)
        return torch.cat([whole, sliced])

    def _nonfinite(self, loss: torch.Tensor):
        from multidiff.training.faults import NonFiniteLossError

        if self.options.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.global_step}; stopped before updating the weights, "
                "so the last periodic checkpoint is the last good one. Lower optimizer.lr, check the data, or set "
                "training.nonfinite=skip to skip such steps"
            )
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, batch_size=1)
        return None  # Lightning skips backward and the optimizer step

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        # The EMA follows each optimizer step here rather than in on_train_batch_end: callbacks'
        # on_train_batch_end (periodic and final checkpoints) run before the module's, so a checkpoint
        # written there would miss this step's update and a run resumed from it would drift.
        # Lightning counts the step after this hook returns: this is step global_step + 1.
        ema_update(self.ema, self.denoiser, ema_decay(self.global_step + 1, self.options.ema_decay))
        if self.text_lora:
            ema_update(self.text_ema, self.text_encoder, ema_decay(self.global_step + 1, self.options.ema_decay))

    def configure_optimizers(self):
        # frozen weights (the base model under LoRA adapters) stay out of the optimizer
        trained = [p for p in self.denoiser.parameters() if p.requires_grad]
        if self.text_lora:
            trained += [p for p in self.text_encoder.parameters() if p.requires_grad]
        return optimizers(trained, self.optimizer_factory, self.lr_scheduler_factory)

    def frozen_text_keys(self) -> list[str]:
        """State-dict keys of the text encoder's (and its EMA's) frozen base weights: the published
        ones, which every run rebuilds from its config, so checkpoints leave them out."""
        if not self.text_lora:
            return []
        return [k for k in self.state_dict() if k.startswith(("text_encoder.", "text_ema.")) and ".lora_" not in k]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["multidiff_skipped_steps"] = self.skipped_steps
        store_config(checkpoint, self.config)
        for key in self.frozen_text_keys():
            checkpoint["state_dict"].pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("multidiff_skipped_steps", 0))
        own = self.state_dict()
        for key in self.frozen_text_keys():  # the base weights this run was built with (strict loading)
            checkpoint["state_dict"].setdefault(key, own[key])


def optimizers(parameters, optimizer: partial, lr_scheduler: partial | None = None):
    """What ``configure_optimizers`` returns: the optimizer over ``parameters`` and, when given, its
    learning-rate schedule stepped every optimizer step."""
    opt = optimizer(parameters)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": "step"}}


def store_config(checkpoint: dict, config: DictConfig | dict | None) -> None:
    """Put the run's resolved config into a checkpoint (``multidiff_config``), so it loads without Hydra."""
    if config is not None:
        cfg = config if isinstance(config, DictConfig) else OmegaConf.create(config)
        checkpoint["multidiff_config"] = OmegaConf.to_container(cfg, resolve=True)
