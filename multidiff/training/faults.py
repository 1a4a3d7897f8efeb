"""Training under faults: atomic checkpoints, graceful stop on signals, non-finite loss guard."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient and the policy is ``stop``."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs it, then renames it into place, so a
    crash mid-write never leaves a truncated checkpoint where a good one was."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict:
        # Lightning's own loop/optimizer state is plain tensors and containers: weights_only holds.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def save_full_checkpoint(trainer, path: str | Path) -> None:
    """``trainer.save_checkpoint`` of the whole training state (weights, optimizer, loops, callbacks).

    ``weights_only=False`` is Lightning's default here, but left unset Lightning logs "`weights_only`
    was not set, defaulting to `False`", which reads as if checkpoints were *loaded* unsafely; they
    are always read with ``torch.load(weights_only=True)`` (:class:`AtomicCheckpointIO`).
    """
    trainer.save_checkpoint(path, weights_only=False)


class GracefulStop(L.Callback):
    """SIGTERM and SIGINT end training at the next step boundary with a checkpoint in
    ``checkpoint_path`` (SLURM's SIGUSR1 requeue is handled by Lightning's SLURM environment)."""

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.stopped_at: int | None = None
        self._previous = None

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            connector = trainer._signal_connector

            def request_stop(signum, *_):  # SIGINT like SIGTERM: finish the step, then save
                log.warning("received signal %s: stopping after this step", signum)
                connector.received_sigterm = True

            self._previous = signal.signal(signal.SIGINT, request_stop)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException):
            save_full_checkpoint(trainer, self.checkpoint_path)
            self.stopped_at = trainer.global_step

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class LastCheckpoint(L.Callback):
    """Keeps ``checkpoint_path`` (``last.ckpt``) at the newest state: every ``every_n_steps``
    optimizer steps and at the last batch of the run.

    The final checkpoint is written inside the loop, at the end of the last batch, not after
    ``trainer.fit`` returns: by then Lightning has closed the epoch (its epoch counter has moved on
    while the batch counter still points mid-epoch), and a run extended from that state (a higher
    ``max_steps`` with ``resume=auto``) would restart on the wrong data and noise. Written here,
    the state is the one every periodic checkpoint has, which resumes exactly.
    """

    def __init__(self, checkpoint_path: str | Path, every_n_steps: int = 0) -> None:
        self.checkpoint_path, self.every_n_steps = Path(checkpoint_path), int(every_n_steps or 0)
        self.saved_at: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if step != self.saved_at and (periodic or self.is_final_batch(trainer)):
            save_full_checkpoint(trainer, self.checkpoint_path)
            self.saved_at = step

    @staticmethod
    def is_final_batch(trainer) -> bool:
        """Whether the batch that just ended is the run's last (``max_steps`` reached, or the last
        batch of the last of ``max_epochs``)."""
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        max_epochs = trainer.max_epochs
        return (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
                and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class NonFiniteGuard(L.Callback):
    """Checks every gradient before the optimizer step.

    ``policy="stop"`` raises :class:`NonFiniteLossError` (no checkpoint is written from the bad
    state: the last periodic checkpoint stays the good one); ``policy="skip"`` drops the step
    (all gradients set to None, so the optimizer leaves weights and moments untouched), counts
    it and logs ``train/skipped_steps``.
    """

    def __init__(self, policy: str = "stop") -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"training.nonfinite must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.skipped = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if torch.isfinite(norm):
            return
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite gradient at step {trainer.global_step} (norm {norm.item()}); stopped without saving "
                "this state, the last periodic checkpoint is the last good one. Lower optimizer.lr, check the "
                "data, or set training.nonfinite=skip to skip such steps"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        log.warning("skipped step %d: non-finite gradient (%d skipped so far)", trainer.global_step, self.skipped)
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, batch_size=1)


class SignalAtStep(L.Callback):
    """Fault injection for tests and drills: send ``signum`` to this process when optimizer step
    ``step`` is about to start (after the checkpoints of the previous step were written)."""

    def __init__(self, step: int, signum: str = "SIGTERM") -> None:
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)
