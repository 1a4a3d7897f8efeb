"""The adapter contract: the only place that knows what a tensor means."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


class Adapter:
    """Base class of modality adapters.

    A modality implements ``load``, ``encode``, ``decode``, ``save`` and ``shape``; ``preview``
    (an image ``(3, H, W)`` in ``[0, 1]`` for logging), ``extensions`` and ``suffix`` have defaults.

    - ``load(path) -> raw``: one file to a raw tensor (modality units, e.g. pixels in ``[0, 1]``).
    - ``encode(raw) -> x0``: raw to a model tensor of shape ``self.shape`` (``(C, *dims)``).
    - ``decode(x0) -> raw``: the inverse, for one sample (no batch dimension).
    - ``save(raw, path)``: write one raw sample to ``path`` (its suffix picks the format).
    """

    extensions: tuple[str, ...] = ()
    """File suffixes ``load`` reads (lower case, with the dot)."""
    suffix: str = ".bin"
    """Default file suffix ``save`` writes for generated samples."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def load(self, path: str | Path) -> Tensor:
        raise NotImplementedError

    def encode(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, x0: Tensor) -> Tensor:
        raise NotImplementedError

    def save(self, raw: Tensor, path: str | Path) -> None:
        raise NotImplementedError

    def preview(self, raw: Tensor) -> Tensor:
        """A ``(3, H, W)`` image in ``[0, 1]`` showing one raw sample; default: the first 2-D slice."""
        x = raw.float()
        while x.ndim > 3:
            x = x[:, 0]
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 1:
            x = x[None, None]
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
        return x[:1].expand(3, *x.shape[1:]) if x.shape[0] != 3 else x

    def sample_shape(self, **options) -> tuple[int, ...]:
        """Model-tensor shape for generation; modalities with a length (audio, video) use options."""
        return self.shape

    def metadata(self, **options) -> dict:
        """Extra per-sample fields for ``metadata.jsonl`` (e.g. ``sample_rate``)."""
        return {}


def preview_grid(images: list[Tensor], nrow: int = 8, padding: int = 1) -> Tensor:
    """Tile ``(3, H, W)`` previews into one grid image."""
    from torchvision.utils import make_grid

    return make_grid(torch.stack(images), nrow=nrow, padding=padding, pad_value=1.0)
