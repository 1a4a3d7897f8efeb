"""Guidance: wrappers that turn one denoiser into another. Never a sampler flag."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from multidiff.core.cond import INPUT_FIELDS, Cond
from multidiff.core.noise import append_dims

DenoiserFn = Callable[..., Tensor]


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser.

    ``D_cfg = D(x, sigma, uncond) + scale * (D(x, sigma, cond) - D(x, sigma, uncond))``, computed
    in one batched call of size ``2B``. ``uncond`` is the null condition or a negative prompt.

    Args:
        denoiser: ``D(x, sigma, cond) -> x0_hat``.
        uncond: condition for the unconditional branch, batch ``B`` or 1 (broadcast).
        scale: guidance scale; 1 disables guidance (one call of size ``B``), 0 is unconditional.
        interval: optional ``(sigma_lo, sigma_hi)``; guidance applies only for sigmas inside it
            (Kynkäänniemi et al. 2024), elsewhere the conditional prediction is used.
        rescale: guidance rescale ``phi`` (Lin et al. 2024, eq. 15-16) against over-exposure.
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        uncond: Cond,
        scale: float,
        *,
        interval: tuple[float, float] | None = None,
        rescale: float = 0.0,
    ) -> None:
        if scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {scale}")
        self.denoiser, self.uncond, self.scale = denoiser, uncond, float(scale)
        self.interval, self.rescale = interval, rescale
        self._paired: tuple[Cond | None, int, Cond] | None = None

    def _pair(self, cond: Cond | None, b: int) -> Cond:
        """``cat([cond, uncond])`` of batch ``2b``, built once per ``cond`` (a sampler passes the
        same one every step), so the loop copies no conditioning tensors per step."""
        if self._paired is not None and self._paired[0] is cond and self._paired[1] == b:
            return self._paired[2]
        uncond = self.uncond if len(self.uncond) == b else self.uncond.map(lambda t: t.expand(b, *t.shape[1:]))
        if cond is not None:  # the input's description (mask channels, modality), not the prompt: both branches get it
            given = {k: getattr(cond, k) for k in INPUT_FIELDS if getattr(cond, k) is not None and getattr(uncond, k) is None}
            if given:
                uncond = replace(uncond, **given)
        paired = Cond.cat([cond, uncond])
        self._paired = (cond, b, paired)
        return paired

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        b = x.shape[0]
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), self._pair(cond, b))
        d_cond, d_uncond = both.chunk(2)
        guided = torch.lerp(d_uncond, d_cond, self.scale)  # d_uncond + scale (d_cond - d_uncond), one kernel
        if self.rescale > 0:
            dims = tuple(range(1, x.ndim))
            ratio = d_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
            guided = self.rescale * guided * ratio + (1 - self.rescale) * guided
        if self.interval is not None:
            lo, hi = self.interval
            inside = append_dims((sigma >= lo) & (sigma <= hi), x.ndim)
            guided = torch.where(inside, guided, d_cond)
        return guided
