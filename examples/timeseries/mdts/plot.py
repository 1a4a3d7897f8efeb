"""Line plots of multichannel series drawn with PIL (no matplotlib): one panel per channel."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from torch import Tensor

# One colour per channel (cycled): distinguishable on white and in grayscale.
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def plot_series(series: Tensor, *, sample_rate: float, y_range: float = 1.2, width: int = 256,
                panel_height: int = 48) -> Image.Image:
    """Draw ``series`` ``(C, L)`` as ``C`` stacked panels of ``width x panel_height`` pixels.

    Every panel shares the fixed vertical range ``[-y_range, y_range]`` (values beyond it are
    clipped), so amplitudes are comparable across channels and samples; a light grid line marks
    each second.
    """
    series = series.detach().float().cpu()
    channels, length = series.shape
    image = Image.new("RGB", (width, channels * panel_height), "white")
    draw = ImageDraw.Draw(image)
    xs = [i * (width - 1) / max(length - 1, 1) for i in range(length)]
    for c in range(channels):
        top = c * panel_height
        mid = top + panel_height / 2
        for second in range(1, int(length / sample_rate) + 1):  # a grid line per second
            x = second * sample_rate * (width - 1) / max(length - 1, 1)
            draw.line([(x, top), (x, top + panel_height - 1)], fill=(225, 225, 225))
        draw.line([(0, mid), (width - 1, mid)], fill=(200, 200, 200))
        if c > 0:
            draw.line([(0, top), (width - 1, top)], fill=(120, 120, 120))
        values = series[c].clamp(-y_range, y_range) / y_range  # in [-1, 1]
        ys = (mid - values * (panel_height / 2 - 2)).tolist()
        draw.line(list(zip(xs, ys)), fill=COLOURS[c % len(COLOURS)], width=1)
        draw.text((3, top + 1), f"ch{c + 1}", fill=(80, 80, 80))
    return image


def image_to_tensor(image: Image.Image) -> Tensor:
    """A PIL RGB image -> ``(3, H, W)`` float32 in ``[0, 1]`` (the adapter's preview format)."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.reshape(image.height, image.width, 3).permute(2, 0, 1).float() / 255
