"""The LightningDataModule: any dataset of ``{"x", "text"}`` items, with a resumable order."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from multidiff.datasets.folder import collate


def epoch_order(n: int, generator: torch.Generator, chunks: list[int] | None = None, window: int = 8) -> list[int]:
    """A permutation of ``range(n)`` drawn from ``generator``.

    With ``chunks`` (items per chunk, in index order, summing to ``n``: shards on disk or in an
    object store), the permutation stays local: the chunks are shuffled, taken ``window`` at a
    time, and the items of each group of chunks are shuffled among themselves, so a reader holds
    at most ``window`` chunks at once (litdata's own shuffle does the same) and every item is
    still drawn once.
    """
    if chunks is None:
        return torch.randperm(n, generator=generator).tolist()
    if sum(chunks) != n:
        raise ValueError(f"chunk sizes sum to {sum(chunks)}, not to the {n} items")
    starts = [0]
    for size in chunks[:-1]:
        starts.append(starts[-1] + size)
    order: list[int] = []
    chunk_order = torch.randperm(len(chunks), generator=generator).tolist()
    for g in range(0, len(chunk_order), max(1, window)):
        group = [i for c in chunk_order[g : g + window] for i in range(starts[c], starts[c] + chunks[c])]
        order += [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
    return order


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of a per-epoch permutation seeded by ``(seed, epoch)``, sharded across ranks, that
    can start part-way into an epoch (chunk-local with ``chunks``, see :func:`epoch_order`).

    The epoch and the number of batches already consumed come from ``position()`` (the trainer's
    restored loop counters), so a run resumed mid-epoch sees exactly the batches the uninterrupted
    run would have seen next. Every rank draws the same permutation and takes its own slice of
    each global batch, so ``R`` ranks at per-rank batch ``b`` see the batches one process would
    see at batch ``R * b``.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, drop_last: bool, rank: int = 0, world_size: int = 1,
                 position=None, chunks: list[int] | None = None, window: int = 8) -> None:
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.position = position or (lambda: (0, 0))
        self.chunks, self.window = chunks, window

    def _global_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = epoch_order(self.n, g, self.chunks, self.window)
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
                 prepare=None, shuffle_window: int = 8) -> None:
        super().__init__()
        self.dataset_factory, self.batch_size, self.num_workers, self.seed = dataset_factory, batch_size, num_workers, seed
        self.prepare, self.shuffle_window = prepare, shuffle_window
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
            chunks=getattr(self.dataset, "chunk_sizes", None), window=self.shuffle_window,
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
        )


class MixtureBatchSampler(Sampler[list[int]]):
    """Batches of several datasets laid end to end (a ``ConcatDataset`` of sizes ``sizes``), every
    batch from one of them: for a model of several modalities, whose items differ in shape.

    Each global batch's source is drawn with probabilities ``weights`` (``batch_sizes[i] * world``
    items of source ``i``, from a per-source permutation; a source that runs out starts a new
    permutation). An epoch is ``sum(len_i / global_batch_i)`` batches, so with weights in
    proportion to the sources' batch counts every item is seen about once per epoch. Everything
    is drawn from ``(seed, epoch)``, so resuming part-way into an epoch (``position()``, as
    :class:`ResumableBatchSampler`) gives exactly the batches an uninterrupted run sees, and every
    rank draws the same sequence and keeps its rows ``rank::world``.
    """

    def __init__(self, sizes: list[int], batch_sizes: list[int], weights: list[float], *, seed: int,
                 rank: int = 0, world_size: int = 1, position=None, chunks: list | None = None, window: int = 8) -> None:
        if not (len(sizes) == len(batch_sizes) == len(weights)) or not sizes:
            raise ValueError("sizes, batch_sizes and weights need one entry per source")
        for i, (n, b) in enumerate(zip(sizes, batch_sizes)):
            if weights[i] > 0 and n < b * world_size:
                raise ValueError(f"source {i} has {n} items, fewer than one global batch ({b} x {world_size} processes)")
        self.sizes, self.batch_sizes, self.weights = list(sizes), list(batch_sizes), torch.tensor(weights, dtype=torch.float64)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.chunks, self.window = list(chunks or [None] * len(sizes)), window
        self.position = position or (lambda: (0, 0))
        self.num_batches = max(1, sum(n // (b * world_size) for n, b, w in zip(sizes, batch_sizes, weights) if w > 0))

    def _global_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """``(source, global indices)`` of every batch of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        sources = torch.multinomial(self.weights, self.num_batches, replacement=True, generator=g).tolist()
        orders: list[list[int]] = [[] for _ in self.sizes]
        batches = []
        for s in sources:
            size = self.batch_sizes[s] * self.world_size
            while len(orders[s]) < size:  # this source's next permutation (seeded by the generator's state)
                orders[s] += epoch_order(self.sizes[s], g, self.chunks[s], self.window)
            picked, orders[s] = orders[s][:size], orders[s][size:]
            batches.append((s, [self.offsets[s] + i for i in picked]))
        return batches

    def sources(self, epoch: int) -> list[int]:
        """The source of every batch of ``epoch``, in order."""
        return [s for s, _ in self._global_batches(epoch)]

    def __iter__(self):
        epoch, skip = self.position()
        for _, batch in self._global_batches(epoch)[skip:]:
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.num_batches


class _Tagged(Dataset):
    """A dataset whose items also say which source they come from (``item["modality"]``)."""

    def __init__(self, dataset: Dataset, index: int) -> None:
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "modality": self.index}


class MixtureDataModule(DiffusionDataModule):
    """Several datasets (one per modality of a model of several), each batch from one of them
    (:class:`MixtureBatchSampler`), with ``batch["modality"]`` its index.

    ``dataset_factories``, ``batch_sizes`` (per device) and ``weights``: one per source, in the
    model's modality order; ``prepare``: one function for every source, or a list of one per source.
    """

    def __init__(self, dataset_factories: list, *, batch_sizes: list[int], weights: list[float],
                 num_workers: int = 0, seed: int = 0, prepare=None) -> None:
        super().__init__(None, batch_size=batch_sizes[0], num_workers=num_workers, seed=seed, prepare=prepare)
        self.dataset_factories, self.batch_sizes, self.weights = dataset_factories, list(batch_sizes), list(weights)
        self.datasets: list[Dataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.datasets is None:
            datasets = [factory() for factory in self.dataset_factories]
            if self.prepare is not None:
                device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
                prepares = self.prepare if isinstance(self.prepare, list | tuple) else [self.prepare] * len(datasets)
                datasets = [p(d, device=device) for p, d in zip(prepares, datasets, strict=True)]
            self.datasets = [_Tagged(d, i) for i, d in enumerate(datasets)]
            self.dataset = ConcatDataset(self.datasets)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = MixtureBatchSampler([len(d) for d in self.datasets], self.batch_sizes, self.weights, seed=self.seed,
                                      rank=rank, world_size=world, position=self._position,
                                      chunks=[getattr(d.dataset, "chunk_sizes", None) for d in self.datasets],
                                      window=self.shuffle_window)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), collate_fn=collate)
