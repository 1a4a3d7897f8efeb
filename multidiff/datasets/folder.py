"""A folder of files with captions, in the Hugging Face imagefolder convention.

Captions come from ``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line) or from a
``.txt`` file beside each data file. Works for any modality: the adapter says which suffixes it
reads and how to turn a file into a model tensor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from multidiff.adapters.base import Adapter

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset folder is missing, empty or malformed."""


def read_captions(root: Path, extensions: tuple[str, ...], caption_key: str = "text") -> list[tuple[Path, str]]:
    """``(file, caption)`` pairs of a folder; ``metadata.jsonl`` wins over ``.txt`` files."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; set data.dataset.root to a folder of files with captions")
    meta = root / "metadata.jsonl"
    if meta.is_file():
        return _read_metadata(meta, caption_key)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    if not files:
        raise DatasetError(
            f"dataset folder {root} holds no files ending in {', '.join(extensions)} and no metadata.jsonl; "
            "add data files with captions, or point data.dataset.root at the right folder"
        )
    missing = [p for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        names = ", ".join(str(p.relative_to(root)) for p in missing[:5])
        raise DatasetError(
            f"{len(missing)} file(s) in {root} have no caption (e.g. {names}): add a .txt beside each file "
            "or a metadata.jsonl with file_name and text"
        )
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in files]


def _read_metadata(meta: Path, caption_key: str) -> list[tuple[Path, str]]:
    pairs = []
    with open(meta, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{meta}, line {n}: not valid JSON ({e.msg}); each line must be one object") from e
            if "file_name" not in row or caption_key not in row:
                raise DatasetError(
                    f"{meta}, line {n}: needs keys 'file_name' and '{caption_key}' (caption), found {sorted(row)}"
                )
            pairs.append((meta.parent / row["file_name"], str(row[caption_key])))
    if not pairs:
        raise DatasetError(f"{meta} is empty; add one JSON line per file with file_name and text")
    return pairs


class CaptionFolder(Dataset):
    """Files + captions -> ``{"x": model tensor, "text": caption}``.

    Args:
        root: the folder.
        adapter: the modality adapter (``load`` + ``encode``).
        on_error: ``"fail"`` stops at the first unreadable file; ``"skip"`` drops such files and
            logs how many and which.
        cache: encode every file once at construction and keep the tensors in memory (epochs after
            the first do no decoding); otherwise encode on access.
        caption_key: the caption field of ``metadata.jsonl``.
    """

    def __init__(
        self,
        root: str | Path,
        adapter: Adapter,
        *,
        on_error: str = "fail",
        cache: bool = True,
        caption_key: str = "text",
    ) -> None:
        if on_error not in ("fail", "skip"):
            raise DatasetError(f"data.dataset.on_error must be 'fail' or 'skip', got {on_error!r}")
        self.root, self.adapter, self.on_error = Path(root), adapter, on_error
        self.items = read_captions(self.root, adapter.extensions, caption_key)
        self.skipped: list[str] = []
        self._cache: list[Tensor] | None = None
        if cache:
            self._cache, self.items = self._encode_all()

    @staticmethod
    def check_config(*, root: str | Path, adapter: Adapter, on_error: str = "fail", caption_key: str = "text",
                     **arguments) -> None:
        """What the config alone can tell, before any model is built (see
        :func:`multidiff.configuration.check_config`): the folder exists and holds captioned files of
        the modality's types; with ``on_error=fail``, every file that ``metadata.jsonl`` names exists."""
        if on_error not in ("fail", "skip"):
            raise DatasetError(f"data.dataset.on_error must be 'fail' or 'skip', got {on_error!r}")
        items = read_captions(Path(root), adapter.extensions, caption_key)
        missing = [path for path, _ in items if not path.is_file()]
        if missing and on_error == "fail":
            names = ", ".join(str(p) for p in missing[:5])
            raise DatasetError(
                f"{len(missing)} file(s) named in {Path(root) / 'metadata.jsonl'} do not exist (e.g. {names}): fix the "
                "file_name entries, or set data.dataset.on_error=skip to leave them out"
            )

    def _load(self, path: Path) -> Tensor:
        try:
            return self.adapter.encode(self.adapter.load(path))
        except Exception as e:  # any decoder error means the same thing to the user
            raise DatasetError(
                f"cannot read {path}: {type(e).__name__}: {e}. Fix or remove the file, or set "
                "data.dataset.on_error=skip to leave unreadable files out"
            ) from e

    def _encode_all(self) -> tuple[list[Tensor], list[tuple[Path, str]]]:
        tensors, kept = [], []
        for path, text in self.items:
            try:
                tensors.append(self._load(path))
                kept.append((path, text))
            except DatasetError:
                if self.on_error == "fail":
                    raise
                self.skipped.append(str(path))
        if self.skipped:
            log.warning("skipped %d unreadable file(s): %s", len(self.skipped), ", ".join(self.skipped[:20]))
        if not kept:
            raise DatasetError(f"no readable files in {self.root} ({len(self.skipped)} skipped)")
        return tensors, kept

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, text = self.items[i]
        x = self._cache[i] if self._cache is not None else self._load(path)
        return {"x": x, "text": text}


def collate(batch: list[dict]) -> dict:
    """Stack model tensors (``x`` data, or ``z`` cached latents) and stored caption embeddings
    (``tokens``, ``mask``, ``pooled``: pre-encoded shards); keep captions as a list of strings; the
    source index of a batch of one modality of several (``modality``), when the items have one."""
    key = "z" if "z" in batch[0] else "x"
    out = {key: torch.stack([b[key] for b in batch]), "text": [b["text"] for b in batch]}
    if "index" in batch[0]:
        out["index"] = torch.tensor([b["index"] for b in batch])
    for name in ("tokens", "mask", "pooled"):
        if name in batch[0]:
            out[name] = torch.stack([b[name] for b in batch])
    if "modality" in batch[0]:
        out["modality"] = batch[0]["modality"]
    return out
