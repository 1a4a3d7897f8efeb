"""Callbacks: sample previews written to the run directory and the logger."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from multidiff.pipeline import decode_samples, sample_prompts

log = logging.getLogger(__name__)


class PreviewsNotBound(RuntimeError):
    """A :class:`SamplePreviews` was used before :meth:`SamplePreviews.bind` gave it its parts."""


class SamplePreviews(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), sample ``prompts`` with the EMA
    denoiser and write a preview grid to ``run_dir/samples/step_NNNNNN`` and the logger.

    The adapter, schedule, sampler and run directory are handed over by the training entry point
    with :meth:`bind` (``multidiff train`` does it); a callback that was never bound stops
    ``trainer.fit`` at its start with a :class:`PreviewsNotBound` naming what is missing, instead of
    training without previews. The callback itself knows no modality: it decodes through the
    module's latent stage (``pl_module.stage``, when there is one) and calls ``adapter.decode``,
    ``adapter.write_previews`` and, when the adapter has one, ``adapter.log_media``
    (modality-specific media for the logger).
    """

    BOUND = ("adapter", "schedule", "sampler", "run_dir")

    def __init__(
        self,
        prompts: list[str],
        *,
        every_n_steps: int = 250,
        num_per_prompt: int = 2,
        steps: int = 20,
        guidance_scale: float = 2.0,
        seed: int = 0,
        at_end: bool = True,
    ) -> None:
        self.prompts, self.every_n_steps, self.num_per_prompt = list(prompts), every_n_steps, num_per_prompt
        self.steps, self.guidance_scale, self.seed, self.at_end = steps, guidance_scale, seed, at_end
        self.adapter = self.schedule = self.sampler = self.run_dir = None
        self.modality, self.name = None, None
        self._last_step = -1

    def bind(self, *, adapter, schedule, sampler, run_dir: str | Path, modality: int | None = None,
             name: str | None = None) -> SamplePreviews:
        """Give the callback its parts. ``modality``/``name``: the index and name of one modality of a
        model of several (its previews are ``step_NNNNNN_<name>``)."""
        self.adapter, self.schedule, self.sampler, self.run_dir = adapter, schedule, sampler, Path(run_dir)
        self.modality, self.name = modality, name
        self.check_bound()
        return self

    def check_bound(self) -> None:
        """Raise :class:`PreviewsNotBound` unless :meth:`bind` gave every part."""
        missing = [name for name in self.BOUND if getattr(self, name) is None]
        if missing:
            raise PreviewsNotBound(
                f"SamplePreviews has no {', '.join(missing)}: call .bind(adapter=..., schedule=..., sampler=..., "
                "run_dir=...) before Trainer.fit (multidiff train does this; a Trainer built by hand must too)"
            )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # fail before the first step, not silently at the first preview
            self.check_bound()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer, pl_module) -> Path | None:
        self.check_bound()
        self._last_step = trainer.global_step
        if not trainer.is_global_zero or not self.prompts:
            return None
        flat = [p for p in self.prompts for _ in range(self.num_per_prompt)]
        seeds = [self.seed + k for k in range(len(flat))]
        stage = getattr(pl_module, "stage", None)  # a latent model's stage decodes the samples first
        data_shape = tuple(self.adapter.sample_shape())
        z = sample_prompts(
            pl_module.ema, pl_module.conditioner, flat, seeds,
            data_shape if stage is None else stage.latent_shape(data_shape), self.sampler,
            self.schedule.sigmas(self.steps), guidance_scale=self.guidance_scale, device=pl_module.device,
            modality=self.modality, inputs=self.adapter.condition_inputs(),
        )
        raws = [raw.cpu() for raw in decode_samples(stage, self.adapter, z, data_shape)]
        stem = self.run_dir / "samples" / f"step_{trainer.global_step:06d}{'_' + self.name if self.name else ''}"
        out, grid = self.adapter.write_previews(raws, stem, nrow=self.num_per_prompt * 2)
        # a model of several modalities: each one's media in samples/<name>/ and its logger tags under <name>/
        named = {"prefix": f"{self.name}/"} if self.name else {}
        media_dir = self.run_dir / "samples" / (self.name or "")
        for logger in trainer.loggers:
            self.adapter.log_preview(logger, grid, trainer.global_step, **named)
            self.adapter.log_media(logger, raws, flat, trainer.global_step, media_dir, **named)
        return out


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run: optimizer steps out of the run's total (``max_steps``, or what
    ``max_epochs`` implies), continuing from the resumed step.

    Lightning's default bar counts batches within each epoch and titles itself ``Epoch N/M`` with
    ``M = max_epochs - 1``, which reads ``Epoch 1/-2`` for a run that trains by ``max_steps``.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches
        bar = self.train_progress_bar
        bar.reset(total=int(total) if total != float("inf") else None)
        bar.n = trainer.global_step
        bar.set_description("training")
        bar.refresh()

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the run, not one per epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable:
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
        if step == bar.total:
            bar.close()  # the last step: Lightning's closing message goes on a line of its own


class ItemLog(L.Callback):
    """Writes which items every rank trained on (``data.log_items=true``, shards only): one line per
    batch, ``epoch step index index ...`` (``epoch step modality:M index ...`` for a mixture), to
    ``run_dir/logs/items-rank{R}.txt``, appended, so a resumed run continues its file. What a check
    that every item is seen once per epoch, by one rank, reads."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "index" not in batch:
            return
        path = self.run_dir / "logs" / f"items-rank{trainer.global_rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            source = [f"modality:{int(batch['modality'])}"] if "modality" in batch else []  # a mixture's source
            f.write(" ".join(map(str, [trainer.current_epoch, trainer.global_step, *source, *batch["index"].tolist()])) + "\n")
