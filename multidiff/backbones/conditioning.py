"""The conditioning vocabulary every backbone speaks: how a :class:`~multidiff.core.cond.Cond` reaches a network.

- **noise level**: ``c_noise (B,)`` -> sinusoidal features -> MLP (:class:`NoiseEmbedding`; the
  diffusers UNets embed it themselves, the same way);
- **class labels**: ``num_classes`` real classes plus the **null label** ``num_classes`` (what
  :class:`~multidiff.conditioning.labels.LabelConditioner` uses for classifier-free guidance); a
  condition without labels means the null label (:func:`class_labels`, :class:`LabelEmbedding`);
- **pooled vector**: ``cond.pooled (B, pooled_dim)`` is projected and added to the time embedding;
  a condition without one adds nothing (:func:`pooled_vector`; diffusers' bias-free
  ``cond_proj`` makes the zero vector and no vector the same);
- **cross-attention context**: ``cond.tokens (B, L, cross_attention_dim)`` with ``cond.mask (B, L)``
  (True = real token) plus tokens a backbone appends that are always real (a label token, a
  learned null token); with no token at all, one zero token, so attention always has a key
  (:func:`attention_context`, :func:`append_tokens`, :func:`attention_bias`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multidiff.core.cond import Cond


def sinusoidal_embedding(c_noise: Tensor, dim: int, *, max_period: float = 10_000.0) -> Tensor:
    """``(B,)`` -> ``(B, dim)``: ``[cos(c f_k), sin(c f_k)]`` with ``f_k`` geometric from 1 to ``1/max_period``.

    The usual transformer/DDPM encoding; it spans timesteps in ``[0, 1000)`` and EDM's
    ``ln(sigma) / 4`` alike, because the highest frequency is 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = c_noise.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


class NoiseEmbedding(nn.Sequential):
    """``c_noise (B,)`` or a scalar -> ``(B, dim)``: sinusoidal features of width ``freq_dim``, then
    ``Linear -> SiLU -> Linear`` (a ``Sequential``, so its weights are named ``0.*`` and ``2.*``)."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.freq_dim = freq_dim

    def forward(self, c_noise: Tensor, batch: int) -> Tensor:
        c_noise = c_noise.reshape(-1).expand(batch) if c_noise.numel() == 1 else c_noise.reshape(batch)
        return super().forward(sinusoidal_embedding(c_noise, self.freq_dim).to(self[0].weight.dtype))


def class_labels(cond: Cond | None, *, batch: int, num_classes: int, device: torch.device) -> Tensor:
    """``(B,)`` int64: ``cond.labels``, or the null label ``num_classes`` where the condition has none."""
    if cond is not None and cond.labels is not None:
        return cond.labels.long()
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


class LabelEmbedding(nn.Embedding):
    """One learned ``dim``-vector per class and one for the null label (row ``num_classes``)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes

    def forward(self, cond: Cond | None, batch: int) -> Tensor:
        """``(B, dim)``: the embedding of :func:`class_labels`."""
        return super().forward(class_labels(cond, batch=batch, num_classes=self.num_classes, device=self.weight.device))


def pooled_vector(cond: Cond | None, *, like: Tensor) -> Tensor | None:
    """``cond.pooled (B, D)`` in ``like``'s dtype, or ``None`` when the condition has none (adds nothing)."""
    return None if cond is None or cond.pooled is None else cond.pooled.to(like.dtype)


def cond_tokens(cond: Cond | None, *, dim: int, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``cond.tokens (B, L, dim)`` in ``like``'s dtype and ``cond.mask (B, L)`` as bool (``None``: all
    real), or ``(None, None)``; tokens of another width than ``dim`` are refused with the fix."""
    if cond is None or cond.tokens is None:
        return None, None
    if cond.tokens.shape[-1] != dim:
        raise ValueError(
            f"cond.tokens have width {cond.tokens.shape[-1]} but the backbone's cross_attention_dim is {dim}; "
            "set backbone.cross_attention_dim to the conditioner's dim"
        )
    return cond.tokens.to(like.dtype), None if cond.mask is None else cond.mask.bool()


def append_tokens(tokens: Tensor | None, mask: Tensor | None, extra: Tensor) -> tuple[Tensor, Tensor | None]:
    """``tokens (B, L, D)`` followed by ``extra (B, K, D)``, which are always real: the mask (if any)
    grows by ``K`` True columns. With no ``tokens``, ``extra`` alone (mask ``None``)."""
    extra = extra if tokens is None else extra.to(tokens.dtype)
    if tokens is None:
        return extra, None
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra.shape[1])], dim=1)
    return torch.cat([tokens, extra], dim=1), mask


def attention_context(cond: Cond | None, *, dim: int, like: Tensor, extra: Tensor | None = None,
                      ) -> tuple[Tensor, Tensor | None]:
    """What cross-attention attends to: ``(B, L, dim)`` tokens and a ``(B, L)`` bool mask (``None``:
    all real). The condition's tokens, then ``extra`` (always real); with neither, one zero token."""
    tokens, mask = cond_tokens(cond, dim=dim, like=like)
    if extra is not None:
        tokens, mask = append_tokens(tokens, mask, extra.to(like.dtype))
    if tokens is None:  # label-only or unconditional: a key that carries nothing
        return like.new_zeros(like.shape[0], 1, dim), None
    return tokens, mask


def attention_bias(mask: Tensor | None, *, dtype: torch.dtype, repeat: int = 1) -> Tensor | None:
    """``(B, L)`` bool mask -> ``(B * repeat, 1, L)`` additive bias: 0 on real tokens, -10000 on padding
    (``UNet2DConditionModel``'s convention); each row repeated ``repeat`` times (e.g. once per frame)."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, :].repeat_interleave(repeat, dim=0)
