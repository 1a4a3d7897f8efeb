"""How well a latent stage reconstructs its data: errors over a set of items, and a preview grid."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


@torch.no_grad()
def reconstruction_metrics(stage, dataset: Dataset, *, items: int = 512, device="cpu", batch_size: int = 64
                           ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``(metrics, x, x_hat)`` over the first ``items`` items: mean absolute error (``l1``), mean
    squared error (``mse``) and PSNR in dB against the items' own peak-to-peak range (``psnr``),
    through the stage's normalized round trip ``decode(encode(x))``."""
    n = min(items, len(dataset))
    stage = stage.to(device).eval()
    xs, outs = [], []
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i]["x"] for i in range(start, min(start + batch_size, n))]).to(device)
        xs.append(x.cpu())
        outs.append(stage.decode(stage.encode(x), shape=tuple(x.shape[1:])).float().cpu())
    x, x_hat = torch.cat(xs).float(), torch.cat(outs)
    mse = float((x_hat - x).square().mean())
    peak = float(x.max() - x.min()) or 1.0
    metrics = {"items": n, "l1": float((x_hat - x).abs().mean()), "mse": mse,
               "psnr": 10 * math.log10(peak**2 / mse) if mse > 0 else float("inf"),
               "latent_shape": list(stage.latent_shape(tuple(x.shape[1:]))), "data_shape": list(x.shape[1:])}
    return metrics, x, x_hat
