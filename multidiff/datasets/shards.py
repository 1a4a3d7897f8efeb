"""A dataset encoded once into litdata shards, and streamed back for training.

``multidiff prepare`` (:func:`prepare_shards`) runs a recipe's dataset through everything a training
step would otherwise do before the backbone: the adapter (decoding files), the latent stage
(``encode_raw``: raw latents, as the on-disk latent cache keeps them) and the frozen text encoder
(each caption's token embeddings, trimmed to its real tokens, and its pooled vector). The items are
written in source order as litdata chunks of ``chunk_items`` source items each, so the shards are a
deterministic function of the dataset and the encoders: chunk ``k`` holds source items
``[k * chunk_items, (k + 1) * chunk_items)`` (fewer where the dataset's ``on_error=skip`` left
unreadable files out). Each chunk is written to a hidden staging folder and renamed into place,
then marked done; an interrupted ``prepare`` skips the chunks marked done and writes the same files
as an uninterrupted one. ``index.json`` (litdata's) and :data:`MANIFEST` (ours: recipe, shapes,
counts, encoder and autoencoder fingerprints, skipped files) are written last, so a folder with a
manifest is complete.

:class:`ShardDataset` reads such a folder (a local path, or an object-store URL litdata reads, such
as ``s3://bucket/prefix``) with random access through litdata's ``StreamingDataset``. The order is
the training loop's (:class:`~multidiff.training.data.ResumableBatchSampler` over the chunks), so
every item is seen once per epoch across all ranks and nodes, and a resumed run sees the batches
the uninterrupted run would have seen, from Lightning's own loop counters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from multidiff.datasets.folder import DatasetError

log = logging.getLogger(__name__)

SHARDS_VERSION = 1
MANIFEST = "multidiff_manifest.json"
NULL_PROMPT = "null_prompt.safetensors"
STATE = ".multidiff_prepare.json"
PARTS = ".multidiff_parts"


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store URL (``s3://``, ``gs://``, ...), which litdata downloads chunk by chunk."""
    return "://" in str(path) and not str(path).startswith("file://")


# -- writing ----------------------------------------------------------------------------------


class _Decoded(Dataset):
    """Items of ``dataset`` as ``(index, item or None, error or None)``: a worker of the decoding loader
    reports an unreadable file instead of stopping, when the dataset's policy is ``on_error=skip``."""

    def __init__(self, dataset: Dataset, indices: range, skip: bool) -> None:
        self.dataset, self.indices, self.skip = dataset, indices, skip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            return index, self.dataset[index], None
        except DatasetError as e:
            if not self.skip:
                raise
            return index, None, str(e)


def _first(batch):
    return batch


def _fsync_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, flushed, renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def source_settings(recipe: str | None, dataset_config: Any, stage, conditioner, *, chunk_items: int) -> dict:
    """What the shards of a ``prepare`` are a function of: an interrupted ``prepare`` resumes only
    into a folder started with the same settings."""
    return {
        "version": SHARDS_VERSION,
        "recipe": recipe,
        "dataset": json.loads(json.dumps(dataset_config, default=str)),
        "chunk_items": int(chunk_items),
        "autoencoder": None if stage is None or stage.is_identity else stage.fingerprint(),
        "text_encoder": _encoder_fingerprint(conditioner),
    }


def _encoder_fingerprint(conditioner) -> str | None:
    return conditioner.fingerprint() if conditioner is not None and hasattr(conditioner, "embedding_table") else None


@torch.no_grad()
def prepare_shards(dataset: Dataset, out: str | Path, *, stage=None, conditioner=None, recipe: str | None = None,
                   dataset_config: Any = None, shape: tuple[int, ...] | None = None, chunk_items: int = 256,
                   workers: int = 2, batch_size: int = 64, device: str | torch.device = "cpu",
                   progress: bool = True) -> dict:
    """Encode ``dataset`` into litdata shards in ``out`` and return the manifest (see the module doc).

    Args:
        dataset: items ``{"x": (C, *dims), "text": caption}`` (a recipe's dataset, its adapter applied).
        out: the output folder (local). Created; a complete folder of the same settings is left as
            it is, an interrupted one is resumed, one of other settings is refused.
        stage: the latent stage; shards hold its raw latents ``z`` (none or identity: ``x``).
        conditioner: the frozen text encoder; with an ``embedding_table`` (text prompts) every item
            carries its caption's ``tokens`` (real tokens only) and ``pooled`` embedding.
        chunk_items: source items per chunk (the unit of resuming, shuffling and download).
        workers: processes decoding items (a ``DataLoader``'s workers; 0: in this process).
        batch_size: items encoded together by the stage and the text encoder.
        shape: the item shape the model expects ``(C, *dims)`` (recorded; the stream checks it).
    """
    from tqdm.auto import tqdm

    if chunk_items < 1:
        raise DatasetError(f"prepare.chunk_items={chunk_items} is invalid: it must be a positive number of items")
    out = Path(out)
    stage = None if stage is None or stage.is_identity else stage.to(device)
    text = hasattr(conditioner, "embedding_table")
    settings = source_settings(recipe, dataset_config, stage, conditioner, chunk_items=chunk_items)
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("settings_key") == settings_key:
            log.info("%s already holds these shards (%d items); nothing to do", out, manifest["items"])
            return manifest
        raise DatasetError(
            f"{out} already holds shards prepared with other settings (recipe {manifest.get('recipe')!r}); "
            "choose another out=DIR or remove that folder first")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE
    if state_path.is_file():
        if json.loads(state_path.read_text(encoding="utf-8")).get("settings_key") != settings_key:
            raise DatasetError(
                f"{out} holds an interrupted prepare of other settings ({state_path}); choose another out=DIR "
                "or remove that folder to start over")
    elif any(out.iterdir()):
        raise DatasetError(f"{out} is not empty and holds no prepare of multidiff; choose an empty or new out=DIR")
    else:
        _fsync_write(state_path, json.dumps({"settings_key": settings_key, "settings": settings}, indent=2))
    parts_dir = out / PARTS
    parts_dir.mkdir(exist_ok=True)
    for stale in out.glob(".staging-*"):  # a chunk an interrupted prepare was writing: written again below
        shutil.rmtree(stale, ignore_errors=True)

    n = len(dataset)
    num_parts = (n + chunk_items - 1) // chunk_items
    done = {int(p.stem.split("-")[1]) for p in parts_dir.glob("part-*.json")}
    if done:
        log.info("resuming: %d of %d chunks already written", len(done), num_parts)
    skip = getattr(dataset, "on_error", "fail") == "skip"
    todo = [p for p in range(num_parts) if p not in done]
    # one loader over every chunk still to write, its batches never crossing a chunk's boundary, in order
    spans = {p: range(p * chunk_items, min((p + 1) * chunk_items, n)) for p in todo}
    batches = [(p, list(spans[p][i : i + batch_size])) for p in todo for i in range(0, len(spans[p]), batch_size)]
    loader = DataLoader(_Decoded(dataset, range(n), skip), batch_sampler=[b for _, b in batches], num_workers=workers,
                        collate_fn=_first, persistent_workers=False)
    with tqdm(total=n, initial=n - sum(len(spans[p]) for p in todo), desc="preparing shards", unit="item",
              disable=not progress, dynamic_ncols=True) as bar:
        current = None
        for (part, _), batch in zip(batches, loader, strict=True):
            if current is None or current.part != part:
                current = _Part(out, part, len(spans[part]))
            kept = [item for _, item, err in batch if item is not None]
            current.skipped += [err for _, item, err in batch if item is None]
            for entry in _encode(kept, stage, conditioner, text, device) if kept else []:
                current.add(entry)
            bar.update(len(batch))
            if batch[-1][0] == spans[part][-1]:
                current.finish(parts_dir)
    return _finish(out, parts_dir, num_parts, settings, settings_key, recipe=recipe, shape=shape, stage=stage,
                   conditioner=conditioner if text else None)


class _Part:
    """One chunk being written: items go to a litdata writer in a hidden staging folder; ``finish``
    moves the chunk into place and then marks it done (``PARTS/part-NNNNNN.json``)."""

    def __init__(self, out: Path, part: int, size: int) -> None:
        from litdata.streaming.writer import BinaryWriter

        self.out, self.part, self.count, self.skipped, self.hash = out, part, 0, [], hashlib.sha256()
        self.staging = Path(tempfile.mkdtemp(dir=out, prefix=f".staging-{part}-"))
        self.writer = BinaryWriter(str(self.staging), chunk_size=size, chunk_index=part)

    def add(self, entry: dict) -> None:
        self.writer.add_item(self.count, entry)
        _hash_item(self.hash, entry)
        self.count += 1

    def finish(self, parts_dir: Path) -> None:
        chunks, config = [], None
        if self.count:
            self.writer.done()
            index = json.loads((self.staging / f"{self.writer.rank}.index.json").read_text(encoding="utf-8"))
            chunks, config = index["chunks"], index["config"]
            for chunk in chunks:
                os.replace(self.staging / chunk["filename"], self.out / chunk["filename"])
        shutil.rmtree(self.staging, ignore_errors=True)
        _fsync_write(parts_dir / f"part-{self.part:06d}.json",
                     json.dumps({"chunks": chunks, "config": config, "items": self.count,
                                 "sha256": self.hash.hexdigest(), "skipped": self.skipped}))


def _encode(kept: list, stage, conditioner, text: bool, device) -> list[dict]:
    x = torch.stack([item["x"] for item in kept])
    captions = [str(item.get("text", "")) for item in kept]
    entries: list[dict] = []
    if stage is not None:
        data = stage.encode_raw(stage.pad(x.to(device))).float().cpu()
        key = "z"
    else:
        data, key = x.float(), "x"
    cond = conditioner.encode(captions) if text else None
    for j in range(len(kept)):
        entry = {key: data[j].contiguous(), "text": captions[j]}
        if cond is not None:
            length = int(cond.mask[j].sum())
            entry["tokens"] = cond.tokens[j, :length].float().cpu().contiguous()
            entry["pooled"] = cond.pooled[j].float().cpu().contiguous()
        entries.append(entry)
    return entries


def _hash_item(h, entry: dict) -> None:
    for key in sorted(entry):
        value = entry[key]
        h.update(key.encode())
        if isinstance(value, Tensor):
            h.update(repr(tuple(value.shape)).encode())
            h.update(value.numpy().tobytes())
        else:
            h.update(str(value).encode() + b"\0")


def _finish(out: Path, parts_dir: Path, num_parts: int, settings: dict, settings_key: str, *, recipe, shape, stage,
            conditioner) -> dict:
    from safetensors.torch import save_file

    chunks, config, items, skipped, h, chunk_sizes = [], None, 0, [], hashlib.sha256(), []
    for part in range(num_parts):
        info = json.loads((parts_dir / f"part-{part:06d}.json").read_text(encoding="utf-8"))
        chunks += info["chunks"]
        chunk_sizes += [c["chunk_size"] for c in info["chunks"]]
        config = config or info["config"]
        items += info["items"]
        skipped += info["skipped"]
        h.update(info["sha256"].encode())
    if items == 0:
        raise DatasetError(f"no item could be read ({len(skipped)} skipped); nothing was written to {out}")
    # litdata's index first (the chunks are all in place), then ours: a folder with a manifest is complete
    _fsync_write(out / "index.json", json.dumps({"chunks": chunks, "config": config, "updated_at": h.hexdigest()[:16]},
                                                sort_keys=True))
    first = _read_first(out)
    key = "z" if "z" in first else "x"
    manifest = {
        "format": "multidiff-shards",
        "version": SHARDS_VERSION,
        "recipe": recipe,
        "items": items,
        "chunks": len(chunks),
        "chunk_sizes": chunk_sizes,
        "key": key,
        "item_shape": list(first[key].shape),
        "data_shape": None if shape is None else list(shape),
        "autoencoder": settings["autoencoder"],
        "text_encoder": settings["text_encoder"],
        "text": None if conditioner is None else {"max_length": int(conditioner.max_length),
                                                   "dim": int(first["pooled"].shape[-1])},
        "skipped": {"count": len(skipped), "errors": skipped[:1000]},
        "sha256": h.hexdigest(),
        "settings_key": settings_key,
        "settings": settings,
    }
    if conditioner is not None:
        save_file(conditioner.embedding_table([""]), out / NULL_PROMPT)
    _fsync_write(out / MANIFEST, json.dumps(manifest, indent=2))
    shutil.rmtree(parts_dir, ignore_errors=True)
    (out / STATE).unlink(missing_ok=True)
    if skipped:
        log.warning("skipped %d unreadable item(s); their errors are in %s", len(skipped), out / MANIFEST)
    log.info("wrote %d items in %d chunks to %s", items, len(chunks), out)
    return manifest


def _read_first(out: Path) -> dict:
    from litdata import StreamingDataset

    with tempfile.TemporaryDirectory() as cache:
        return StreamingDataset(str(out.resolve()), cache_dir=cache)[0]


# -- reading ----------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike, cache_dir: str | None = None) -> dict:
    """The :data:`MANIFEST` of a shard folder (downloaded first for a URL), or a one-paragraph error."""
    where = str(path)
    try:
        if is_remote(where):
            text = _download_text(where.rstrip("/") + "/" + MANIFEST, cache_dir)
        else:
            text = (Path(where) / MANIFEST).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(
            f"data.path={where} holds no {MANIFEST}, so it is not a complete set of multidiff shards ({type(e).__name__}); "
            "write one with: multidiff prepare recipe=NAME out=DIR (an interrupted prepare resumes when run again)"
        ) from None
    manifest = json.loads(text)
    if manifest.get("format") != "multidiff-shards" or int(manifest.get("version", 0)) > SHARDS_VERSION:
        raise DatasetError(f"{where}/{MANIFEST} is not a manifest this multidiff reads (version {manifest.get('version')})")
    return manifest


def _download_text(url: str, cache_dir: str | None) -> str:
    from litdata.streaming.downloader import get_downloader

    folder = Path(cache_dir or tempfile.mkdtemp(prefix="multidiff-manifest-"))
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / Path(url).name
    get_downloader(url.rsplit("/", 1)[0], str(folder), []).download_file(url, str(local))
    return local.read_text(encoding="utf-8")


class ShardDataset(Dataset):
    """Items of a shard folder: ``{"x" or "z", "text"}`` plus ``"tokens" (max_length, D)``, ``"mask"``
    and ``"pooled"`` when the shards carry caption embeddings (zero-padded to the encoder's
    ``max_length`` as the encoder pads them). ``chunk_sizes`` lists the items per chunk in order, for
    a sampler that keeps reads local to a few chunks at a time."""

    def __init__(self, path: str | os.PathLike, *, cache_dir: str | None = None, max_cache_size: str | int = "50GB",
                 manifest: dict | None = None, adapter=None) -> None:
        del adapter  # the items are already the adapter's (the manifest's data_shape is checked against it)
        self.path = str(path)
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.manifest = manifest or read_manifest(self.path, cache_dir)
        self.chunk_sizes = list(self.manifest["chunk_sizes"])
        self.key = self.manifest["key"]
        text = self.manifest.get("text")
        self.max_length = None if text is None else int(text["max_length"])
        self._stream = None

    @staticmethod
    def check_config(*, path, adapter=None, cache_dir: str | None = None, **arguments) -> None:
        """Before a model is built: the folder is a complete set of shards of this modality's items."""
        manifest = read_manifest(path, cache_dir)
        shape = None if adapter is None else list(adapter.shape)
        if shape is not None and manifest.get("data_shape") is not None and list(manifest["data_shape"]) != shape:
            raise DatasetError(
                f"data.path={path} holds items of shape {manifest['data_shape']} but this model's modality makes "
                f"{shape}: prepare the shards with the same modality settings (size, length, frames) or change them")

    def __len__(self) -> int:
        return int(self.manifest["items"])

    def __getstate__(self):  # DataLoader workers open their own reader
        return {**self.__dict__, "_stream": None}

    def _open(self):
        from litdata import StreamingDataset

        local = not is_remote(self.path)
        options = {} if local else {"max_cache_size": self.max_cache_size}
        if self.cache_dir is not None:
            options["cache_dir"] = self.cache_dir
        # random access by global index: litdata's own split across ranks (its len) plays no part here,
        # the batch sampler gives each rank its rows
        self._stream = StreamingDataset(self.path if not local else str(Path(self.path).resolve()), **options)
        return self._stream

    def __getitem__(self, i: int) -> dict:
        stream = self._stream or self._open()
        item = stream[int(i)]
        out = {self.key: item[self.key], "text": item["text"], "index": int(i)}
        if "tokens" in item:
            tokens = item["tokens"]
            length = tokens.shape[0]
            padded = tokens.new_zeros(self.max_length, tokens.shape[1])
            padded[:length] = tokens
            mask = torch.zeros(self.max_length, dtype=torch.bool)
            mask[:length] = True
            out.update(tokens=padded, mask=mask, pooled=item["pooled"])
        return out


def check_shards(manifest: dict, path: str, *, stage=None, conditioner=None, data_shape=None) -> None:
    """Refuse shards that do not fit the model: another text encoder or autoencoder, another item shape."""
    stage_fp = None if stage is None or stage.is_identity else stage.fingerprint()
    if manifest.get("autoencoder") != stage_fp:
        have = "no autoencoder" if manifest.get("autoencoder") is None else f"autoencoder {manifest['autoencoder'][:12]}"
        want = "none" if stage_fp is None else f"{stage_fp[:12]}"
        raise DatasetError(
            f"data.path={path} was prepared with {have} but this model's latent stage is {want}: the shards hold "
            "what another autoencoder made. Prepare them again with this recipe and autoencoder "
            "(multidiff prepare recipe=NAME out=DIR autoencoder.path=...) or point data.path at matching shards")
    encoder_fp = _encoder_fingerprint(conditioner)
    if manifest.get("text_encoder") != encoder_fp:
        have = "no caption embeddings" if manifest.get("text_encoder") is None else \
            f"text encoder {manifest['text_encoder'][:12]}"
        want = "none" if encoder_fp is None else encoder_fp[:12]
        raise DatasetError(
            f"data.path={path} was prepared with {have} but this model's text encoder is {want} "
            "(conditioning.encoder): its caption embeddings would not be this encoder's. Prepare the shards "
            "again with this conditioning, or train with the encoder they were prepared with")
    if data_shape is not None and manifest.get("data_shape") is not None and list(manifest["data_shape"]) != list(data_shape):
        raise DatasetError(
            f"data.path={path} holds items of shape {manifest['data_shape']} but this model's modality makes "
            f"{list(data_shape)}: prepare the shards with the same modality settings (size, length, frames) or change them")


def ready_for_training(dataset: ShardDataset, *, device="cpu", stage=None, conditioner=None, data_shape=None,
                       fit_items: int = 1024) -> ShardDataset:
    """The data module's ``prepare`` for shards: refuse shards of another encoder, autoencoder or
    shape; estimate the latent scale from the first ``fit_items`` stored latents if the stage has
    none yet; give the text encoder the stored empty prompt (for condition dropout)."""
    del device
    check_shards(dataset.manifest, dataset.path, stage=stage, conditioner=conditioner, data_shape=data_shape)
    if stage is not None and not stage.is_identity and stage.needs_fit:
        n = min(fit_items, len(dataset))
        stage.fit_scale(torch.stack([dataset[i][dataset.key] for i in range(n)]))
    if conditioner is not None:
        preload_null_prompt(dataset.path, conditioner, dataset.cache_dir)
    return dataset


def preload_null_prompt(path: str, conditioner, cache_dir: str | None = None) -> None:
    """Give ``conditioner`` the empty prompt's embeddings stored beside the shards (no text encoding)."""
    from safetensors.torch import load_file

    if not hasattr(conditioner, "preload"):
        return
    if is_remote(path):
        folder = Path(cache_dir or tempfile.mkdtemp(prefix="multidiff-null-"))
        from litdata.streaming.downloader import get_downloader

        get_downloader(path.rstrip("/"), str(folder), []).download_file(path.rstrip("/") + "/" + NULL_PROMPT,
                                                                         str(folder / NULL_PROMPT))
        file = folder / NULL_PROMPT
    else:
        file = Path(path) / NULL_PROMPT
    if file.is_file():
        conditioner.preload([""], load_file(file))
