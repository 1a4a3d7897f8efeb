"""The LightningDataModule: any dataset of ``{"x", "text"}`` items, with a resumable order."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from multidiff.datasets.folder import collate


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of a per-epoch permutation seeded by ``(seed, epoch)``, sharded across ranks, that
    can start part-way into an epoch.

    The epoch and the number of batches already consumed come from ``position()`` (the trainer's
    restored loop counters), so a run resumed mid-epoch sees exactly the batches the uninterrupted
    run would have seen next. Every rank draws the same permutation and takes its own slice of
    each global batch, so ``R`` ranks at per-rank batch ``b`` see the batches one process would
    see at batch ``R * b``.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, drop_last: bool, rank: int = 0, world_size: int = 1,
                 position=None) -> None:
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.position = position or (lambda: (0, 0))

    def _global_batches(self, epoch: int) -> list[list[int]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        size = self.batch_size * self.world_size
        batches = [perm[i : i + size] for i in range(0, self.n, size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return batches

    def __iter__(self):
        epoch, skip = self.position()
        for batch in self._global_batches(epoch)[skip:]:
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._global_batches(0))


class DiffusionDataModule(L.LightningDataModule):
    """Wraps a dataset (built lazily by ``dataset_factory``, then passed through ``prepare(dataset,
    device=...)`` when given) in a shuffled, resumable loader.

    ``batch_size`` is per device; the global batch is ``batch_size * world_size`` (times
    gradient accumulation).
    """

    def __init__(self, dataset_factory, *, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 prepare=None) -> None:
        super().__init__()
        self.dataset_factory, self.batch_size, self.num_workers, self.seed = dataset_factory, batch_size, num_workers, seed
        self.prepare = prepare
        self.dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            dataset = self.dataset_factory()
            if self.prepare is not None:  # e.g. latents encoded once on this process's device (or read from disk)
                trainer = self.trainer
                device = trainer.strategy.root_device if trainer is not None else "cpu"
                dataset = self.prepare(dataset, device=device)
            self.dataset = dataset

    def _position(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        # `processed` (not `completed`): a checkpoint written in on_train_batch_end has counted the
        # batch as processed but not yet completed, and the loader may be iterated before the
        # loop's restart logic reconciles the two.
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableBatchSampler(
            len(self.dataset), self.batch_size, seed=self.seed, drop_last=len(self.dataset) >= self.batch_size * world,
            rank=rank, world_size=world, position=self._position,
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
        )
