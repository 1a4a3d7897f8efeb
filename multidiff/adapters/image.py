"""Images: PNG/JPEG/WebP files <-> ``(C, H, W)`` in ``[0, 1]`` <-> model tensors in ``[-1, 1]``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from multidiff.adapters.base import Adapter


class ImageAdapter(Adapter):
    """Images resized (shorter side) and center-cropped to ``size``, grayscale or RGB.

    Args:
        size: output side length (square) or ``(height, width)``.
        channels: 1 (grayscale) or 3 (RGB).
        antialias: antialias when downscaling.
    """

    extensions = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    suffix = ".png"
    formats = ("png", "jpg", "jpeg", "webp", "bmp")

    def __init__(self, size: int | tuple[int, int] = 16, channels: int = 1, antialias: bool = True) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.channels = channels
        self.antialias = antialias

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, *self.size)

    def load(self, path: str | Path) -> Tensor:
        """Read an image file to ``(channels, h, w)`` float32 in ``[0, 1]`` (its own size)."""
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            h, w = im.height, im.width
        return data.reshape(h, w, self.channels).permute(2, 0, 1).float() / 255

    def encode(self, raw: Tensor) -> Tensor:
        """``(C, h, w)`` in ``[0, 1]`` -> ``self.shape`` in ``[-1, 1]`` (resize shorter side, center crop)."""
        x = raw.float()
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True) if self.channels == 1 else x.expand(3, -1, -1)
        th, tw = self.size
        h, w = x.shape[-2:]
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=self.antialias, align_corners=False)[0]
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[:, top : top + th, left : left + tw]
        return x.clamp(0, 1) * 2 - 1

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0.float() + 1) / 2).clamp(0, 1)

    def save(self, raw: Tensor, path: str | Path) -> None:
        from PIL import Image

        arr = (raw.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        mode = "L" if arr.shape[2] == 1 else "RGB"
        Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode=mode).save(path)

    def preview(self, raw: Tensor) -> Tensor:
        x = raw.float().clamp(0, 1)
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x
