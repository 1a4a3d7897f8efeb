"""A dataset's latents and caption embeddings, encoded once and kept on disk under the data root.

A latent model trains on ``E(x)``, and the frozen text encoder gives the same embeddings every
epoch: both are computed once, in batches on the training device, and stored as
``data_root/cache/latents-{key}/`` and ``data_root/cache/captions-{key}/`` (written atomically by
:func:`~multidiff.datasets.materialize.materialize`, one writer across processes). ``key`` hashes
the dataset's content and the encoder's weights, so a changed dataset, a retrained autoencoder or
another text encoder writes a new cache and an unchanged one is reused across runs. A run from the
cache does no data decoding, no autoencoder encoding and no text encoding.

Raw latents are stored (before the stage's normalization), so the latent scale is estimated
from the cache and a changed ``scale_mode`` reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from multidiff.datasets.materialize import materialize

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class LatentDataset(Dataset):
    """Cached raw latents ``z (N, C', *dims')`` with their captions: items ``{"z", "text"}``."""

    def __init__(self, z: Tensor, texts: list[str]) -> None:
        if len(z) != len(texts):
            raise ValueError(f"{len(z)} latents but {len(texts)} captions")
        self.z, self.texts = z, list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"z": self.z[i], "text": self.texts[i]}


def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-256 over every item's tensor (shape and float32 bytes) and caption, in order."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        x = item["x"].detach().cpu().contiguous().float()
        h.update(repr(tuple(x.shape)).encode())
        h.update(x.numpy().tobytes())
        h.update(str(item.get("text", "")).encode() + b"\0")
    return h.hexdigest()


@torch.no_grad()
def encode_items(dataset: Dataset, stage, *, device="cpu", batch_size: int = 64, limit: int | None = None,
                 progress: bool = True) -> tuple[Tensor, list[str]]:
    """Raw latents of the first ``limit`` (default all) items, encoded in batches on ``device``."""
    from tqdm.auto import tqdm

    n = len(dataset) if limit is None else min(limit, len(dataset))
    stage = stage.to(device)
    chunks, texts = [], []
    with tqdm(total=n, desc="encoding latents", unit="item", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            x = torch.stack([it["x"] for it in items]).to(device)
            chunks.append(stage.encode_raw(stage.pad(x)).float().cpu())
            texts += [str(it.get("text", "")) for it in items]
            bar.update(len(items))
    return torch.cat(chunks), texts


def prepare_dataset(dataset: Dataset, stage, conditioner=None, *, root: str | Path, cache: bool = True,
                    device="cpu", batch_size: int = 64, fit_items: int = 1024) -> Dataset:
    """The dataset a run trains on, given its latent stage.

    Identity stage: the dataset unchanged. Otherwise, with ``cache``: the latents of every item
    from ``root/cache/`` (encoded and written there first if missing), the stage's latent scale
    estimated from them if it has none yet, and the captions' embeddings preloaded into
    ``conditioner`` from their own cache; without ``cache``: the scale is estimated from the
    first ``fit_items`` items and the training step encodes every batch.
    """
    if stage is None or stage.is_identity:
        return dataset
    if not cache:
        if stage.needs_fit:
            z, _ = encode_items(dataset, stage, device=device, batch_size=batch_size, limit=fit_items)
            stage.fit_scale(z)
        return dataset
    settings = {"version": CACHE_VERSION, "dataset": dataset_fingerprint(dataset), "stage": stage.fingerprint()}

    def write(folder: Path) -> None:
        z, texts = encode_items(dataset, stage, device=device, batch_size=batch_size)
        save_file({"z": z.contiguous()}, folder / "latents.safetensors")
        (folder / "captions.json").write_text(json.dumps(texts), encoding="utf-8")

    folder = materialize(Path(root) / "cache", "latents", settings, write)
    z = load_file(folder / "latents.safetensors")["z"]
    texts = json.loads((folder / "captions.json").read_text(encoding="utf-8"))
    log.info("latents of %d items from %s", len(texts), folder)
    if stage.needs_fit:
        stage.fit_scale(z)
    if conditioner is not None:
        cache_captions(conditioner, texts, root=root)
    return LatentDataset(z, texts)


def cache_captions(conditioner, texts: list[str], *, root: str | Path) -> Path | None:
    """Preload ``conditioner`` with the embeddings of ``texts`` (and the empty prompt), from
    ``root/cache/captions-{key}/`` or encoded once and written there. Conditioners without an
    ``embedding_table`` (class labels) need none: ``None``."""
    if not hasattr(conditioner, "embedding_table"):
        return None
    prompts = sorted(set(texts) | {""})
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    settings = {"version": CACHE_VERSION, "encoder": conditioner.fingerprint(), "prompts": digest}

    def write(folder: Path) -> None:
        save_file(conditioner.embedding_table(prompts), folder / "captions.safetensors")
        (folder / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")

    folder = materialize(Path(root) / "cache", "captions", settings, write)
    conditioner.preload(json.loads((folder / "prompts.json").read_text(encoding="utf-8")),
                        load_file(folder / "captions.safetensors"))
    return folder
