"""The LightningDataModule: any dataset of ``{"x", "text"}`` items."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from multidiff.datasets.folder import collate


class DiffusionDataModule(L.LightningDataModule):
    """Wraps a dataset (built lazily by ``dataset_factory``) in a shuffled training loader."""

    def __init__(self, dataset_factory, *, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.dataset_factory, self.batch_size, self.num_workers, self.seed = dataset_factory, batch_size, num_workers, seed
        self.dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.dataset_factory()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed),
        )
