"""A convolutional autoencoder for data of rank 1, 2 or 3 (or 2-D per frame of a clip).

Sized like a small Stable Diffusion VAE: ResNet blocks with GroupNorm and SiLU, a strided
convolution per downsampling level, nearest-neighbour upsampling then a convolution on the way
back, and a KL (diagonal Gaussian, as ``AutoencoderKL``) or plain bottleneck. The rank comes
from the shape the adapter gives; ``down_axes`` says which data axes each level halves (a clip
``(C, T, H, W)`` with ``down_axes=[1, 2]`` keeps its frames), and ``per_frame=true`` encodes each
frame of a clip with a 2-D network instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multidiff.autoencoders.base import AutoencoderError, LatentStage, from_frames, to_frames

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BOTTLENECKS = ("kl", "plain")


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels) if channels % min(groups, channels) == 0 else 1, channels)


class _ResBlock(nn.Module):
    def __init__(self, rank: int, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        conv = _CONV[rank]
        self.body = nn.Sequential(_norm(cin, groups), nn.SiLU(), conv(cin, cout, 3, padding=1),
                                  _norm(cout, groups), nn.SiLU(), conv(cout, cout, 3, padding=1))
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class _Up(nn.Module):
    def __init__(self, rank: int, channels: int, factor: tuple[int, ...]) -> None:
        super().__init__()
        self.factor = factor
        self.conv = _CONV[rank](channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


class ConvAutoencoder(LatentStage):
    """Trainable rank-agnostic autoencoder (``multidiff train task=autoencoder``).

    Args:
        shape: ``(C, *dims)`` of one data item (from the adapter).
        latent_channels: channels of the latent.
        channels: width of each level; every level after the first halves the ``down_axes``, so the
            downsampling factor is ``2 ** (len(channels) - 1)`` along each of them.
        down_axes: data axes (0-based over ``dims``) that are downsampled; ``None``: all.
        per_frame: encode each index of data axis 0 (a clip's frames) with a 2-D network.
        bottleneck: ``kl`` (diagonal Gaussian posterior; :meth:`encode_raw` gives its mean) or ``plain``.
        num_res_blocks: ResNet blocks per level.
        norm_groups: GroupNorm groups (fewer where a width is not divisible).
        scale_mode: how latents are normalized for diffusion (see :class:`LatentStage`).
    """

    def __init__(self, *, shape: Sequence[int], latent_channels: int = 4, channels: Sequence[int] = (32, 64, 64),
                 down_axes: Sequence[int] | None = None, per_frame: bool = False, bottleneck: str = "kl",
                 num_res_blocks: int = 1, norm_groups: int = 8, scale_mode: str = "global") -> None:
        shape = tuple(int(s) for s in shape)
        data_rank = len(shape) - 1
        if per_frame and data_rank != 3:
            raise AutoencoderError(f"autoencoder.per_frame=true needs clips (C, T, H, W); the modality gives {shape}")
        net_rank = 2 if per_frame else data_rank
        if net_rank not in _CONV:
            raise AutoencoderError(f"ConvAutoencoder takes data of rank 1, 2 or 3; the modality gives {shape}")
        if bottleneck not in BOTTLENECKS:
            raise AutoencoderError(f"autoencoder.bottleneck={bottleneck!r} is invalid: choose one of {', '.join(BOTTLENECKS)}")
        if scale_mode == "pretrained":
            raise AutoencoderError("autoencoder.scale_mode=pretrained is for published autoencoders; a ConvAutoencoder "
                                   "estimates its scale from data: use global, channel or none")
        channels = [int(c) for c in channels]
        if not channels:
            raise AutoencoderError("autoencoder.channels must list at least one width")
        net_axes = list(range(net_rank))
        if down_axes is None:
            down = net_axes
        else:
            down = [int(a) - (1 if per_frame else 0) for a in down_axes]
            if any(a not in net_axes for a in down):
                raise AutoencoderError(f"autoencoder.down_axes={list(down_axes)} names an axis outside the data's "
                                       f"{data_rank} axes (0-based, after the channels; per_frame keeps axis 0)")
        step = tuple(2 if a in down else 1 for a in net_axes)
        levels = len(channels) - 1
        net_factors = [s**levels for s in step]
        factors = ([1] + net_factors) if per_frame else net_factors
        super().__init__(shape=shape, latent_channels=latent_channels, factors=factors, scale_mode=scale_mode)
        self._options = {"latent_channels": int(latent_channels), "channels": channels,
                         "down_axes": None if down_axes is None else [int(a) for a in down_axes],
                         "per_frame": bool(per_frame), "bottleneck": bottleneck, "num_res_blocks": int(num_res_blocks),
                         "norm_groups": int(norm_groups), "scale_mode": scale_mode}
        self.per_frame, self.bottleneck = bool(per_frame), bottleneck
        conv = _CONV[net_rank]
        enc: list[nn.Module] = [conv(shape[0], channels[0], 3, padding=1)]
        prev = channels[0]
        for i, width in enumerate(channels):
            for _ in range(num_res_blocks):
                enc.append(_ResBlock(net_rank, prev, width, norm_groups))
                prev = width
            if i < levels:
                enc.append(conv(prev, prev, 3, stride=step, padding=1))
        enc += [_norm(prev, norm_groups), nn.SiLU(),
                conv(prev, latent_channels * (2 if bottleneck == "kl" else 1), 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [conv(latent_channels, channels[-1], 3, padding=1)]
        prev = channels[-1]
        for i, width in enumerate(reversed(channels)):
            for _ in range(num_res_blocks):
                dec.append(_ResBlock(net_rank, prev, width, norm_groups))
                prev = width
            if i < levels:
                dec.append(_Up(net_rank, prev, step))
        dec += [_norm(prev, norm_groups), nn.SiLU(), conv(prev, shape[0], 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Posterior mean and log-variance (``None`` for a plain bottleneck) of padded data ``x``."""
        h = from_frames(self.encoder(to_frames(x)), x.shape[0]) if self.per_frame else self.encoder(x)
        if self.bottleneck == "plain":
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_raw(self, x: Tensor) -> Tensor:
        return self.encode_moments(x)[0]

    def decode_raw(self, z: Tensor) -> Tensor:
        if self.per_frame:
            return from_frames(self.decoder(to_frames(z)), z.shape[0])
        return self.decoder(z)

    def reconstruction_loss(self, x: Tensor, *, noise: Tensor | None = None, loss: str = "l1",
                            kl_weight: float = 1e-6) -> dict[str, Tensor]:
        """Per-item training losses of data ``x``: ``recon`` (mean absolute or squared error), ``kl``
        (to a unit Gaussian, per latent element; 0 for a plain bottleneck) and their weighted sum ``loss``,
        each ``(B,)``, plus the reconstruction ``x_hat`` (for losses of the caller's own).
        ``noise`` (shaped like the latents, drawn by the training module) samples the posterior; ``None``
        decodes its mean."""
        padded = self.pad(x)
        mean, logvar = self.encode_moments(padded)
        if logvar is None:
            z, kl = mean, torch.zeros(x.shape[0], device=x.device)
        else:
            z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).mean(1)
        x_hat = self.decode_raw(z)[(slice(None), slice(None), *(slice(0, d) for d in x.shape[2:]))]
        err = (x_hat - x).abs() if loss == "l1" else (x_hat - x).square()
        recon = err.flatten(1).mean(1)
        return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl, "x_hat": x_hat}
