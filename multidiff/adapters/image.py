"""Images: PNG/JPEG/WebP files <-> ``(C, H, W)`` in ``[0, 1]`` <-> model tensors in ``[-1, 1]``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from multidiff.adapters.base import Adapter, GenerationOption, mask_plane


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
        return self.fit(x).clamp(0, 1) * 2 - 1

    def fit(self, x: Tensor) -> Tensor:
        """``(C, h, w)`` resized (shorter side) and center-cropped to :attr:`size`: the geometry of
        :meth:`encode`, which an editing mask of the input follows too."""
        th, tw = self.size
        h, w = x.shape[-2:]
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=self.antialias, align_corners=False)[0]
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[:, top : top + th, left : left + tw]
        return x

    # -- editing ---------------------------------------------------------------------------------

    def region_options(self) -> tuple[GenerationOption, ...]:
        h, w = self.size
        return (
            GenerationOption("keep_box", list, None, f"[top, left, bottom, right] pixels of the {h}x{w} output to keep "
                             "from init (the rest is generated)"),
            GenerationOption("fill_box", list, None, f"[top, left, bottom, right] pixels of the {h}x{w} output to "
                             "generate (the rest is kept from init); e.g. the lower half: "
                             f"fill_box=[{h // 2},0,{h},{w}]"),
        )

    def keep_mask(self, shape: tuple[int, ...], *, raw: Tensor | None = None, mask: Tensor | None = None,
                  keep_box: list | None = None, fill_box: list | None = None, **_ignored) -> Tensor | None:
        """``(1, H, W)``: 1 keeps the input. ``mask`` (white: regenerate) is the size of the input
        image and goes through the same resize and crop as the image; boxes are in output pixels."""
        if mask is None and keep_box is None and fill_box is None:
            return None
        h, w = shape[-2:]
        regenerate = torch.zeros(1, h, w)
        if mask is not None:
            m = mask_plane(mask, tuple(raw.shape[-2:]) if raw is not None else (h, w), "the input image")
            regenerate = torch.maximum(regenerate, (self.fit(m) >= 0.5).float())
        if fill_box is not None:
            regenerate[(slice(None), *self._box("fill_box", fill_box, h, w))] = 1
        if keep_box is not None:
            inside = torch.zeros(1, h, w)
            inside[(slice(None), *self._box("keep_box", keep_box, h, w))] = 1
            regenerate = torch.maximum(regenerate, 1 - inside)
        return 1 - regenerate

    @staticmethod
    def _box(name: str, box: list, h: int, w: int) -> tuple[slice, slice]:
        ok = len(box) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
        if not ok or not (0 <= box[0] < box[2] <= h and 0 <= box[1] < box[3] <= w):
            raise ValueError(f"{name}={box!r} is invalid: give [top, left, bottom, right] in pixels of the {h}x{w} "
                             f"output with 0 <= top < bottom <= {h} and 0 <= left < right <= {w} (bottom and right "
                             "are excluded)")
        return slice(box[0], box[2]), slice(box[1], box[3])

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
