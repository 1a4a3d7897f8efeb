"""A compact convolutional UNet for data of any rank: 1-D series, 2-D grids, 3-D volumes.

One class serves every rank (the item shape ``(C, *dims)`` picks ``Conv1d``/``Conv2d``/``Conv3d``),
so a new modality whose tensors are ``(B, C, *dims)`` needs no network of its own. The design
follows the usual diffusion UNet (Ho et al. 2020; Dhariwal & Nichol 2021) in a small form:

- residual blocks ``GroupNorm -> SiLU -> conv``, with the noise embedding applied as a
  scale-shift of the second normalization (FiLM / "AdaGN", Dhariwal & Nichol 2021, sec. 3);
- the noise embedding is a sinusoidal encoding of ``c_noise`` followed by a two-layer MLP, plus
  optional projections of ``cond.pooled`` and of ``cond.labels``
  (:mod:`multidiff.backbones.conditioning`);
- cross-attention from the feature map to ``cond.tokens`` (``cond.mask`` respected) only at the
  lowest resolution(s), where it is cheap;
- downsampling by a stride-2 convolution (``ceil(n / 2)`` for any ``n``: the convolution pads) and
  upsampling by nearest-neighbour x2 + conv, cropped to the matching skip, so every size works
  without padding the input to a power of two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multidiff.backbones.base import Backbone, zero_input_channels
from multidiff.backbones.conditioning import LabelEmbedding, NoiseEmbedding, append_tokens, cond_tokens, pooled_vector
from multidiff.core.cond import Cond
from multidiff.core.noise import append_dims

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _groups(channels: int, norm_groups: int) -> int:
    """The largest group count <= ``norm_groups`` that divides ``channels`` (GroupNorm needs one)."""
    g = min(norm_groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """``x + conv(act(norm(x) * (1 + scale) + shift))``-style residual block; ``(B, C_in, *d) -> (B, C_out, *d)``."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, emb_dim: int, *, norm_groups: int,
                 kernel_size: int, dropout: float) -> None:
        super().__init__()
        conv = _CONV[dims]
        pad = kernel_size // 2
        self.norm1 = nn.GroupNorm(_groups(in_channels, norm_groups), in_channels)
        self.conv1 = conv(in_channels, out_channels, kernel_size, padding=pad)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels, norm_groups), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, kernel_size, padding=pad)
        self.skip = nn.Identity() if in_channels == out_channels else conv(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x``: ``(B, C_in, *dims)``, ``emb``: ``(B, emb_dim)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb)).chunk(2, dim=1)
        h = self.norm2(h) * (1 + append_dims(scale, h.ndim)) + append_dims(shift, h.ndim)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class CrossAttention(nn.Module):
    """Every position of a feature map attends to the condition tokens; residual, pre-norm.

    A learned "always there" token is appended to the keys: a fully masked prompt (or no tokens
    at all, e.g. label-only or unconditional batches) then attends to it instead of producing
    NaNs from a softmax over nothing.
    """

    def __init__(self, channels: int, context_dim: int, *, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.context_dim = num_heads, context_dim
        self.norm = nn.GroupNorm(_groups(channels, norm_groups), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)
        self.null_token = nn.Parameter(torch.zeros(1, 1, context_dim))

    def forward(self, x: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
        """``x``: ``(B, C, *dims)``; ``tokens``: ``(B, L, context_dim)`` or None; ``mask``: ``(B, L)`` bool
        (True = real token) or None (all real)."""
        b, c = x.shape[:2]
        q = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        null = self.null_token.to(x.dtype).expand(b, 1, -1)
        context, keep = append_tokens(None if tokens is None else tokens.to(x.dtype), mask, null)
        if keep is None:  # SDPA gets an explicit all-True mask, as it always has
            keep = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        k, v = self.kv(context).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(heads(self.q(q)), heads(k), heads(v), attn_mask=keep[:, None, None, :])
        out = self.out(out.transpose(1, 2).reshape(b, -1, c))
        return x + out.transpose(1, 2).reshape(x.shape)


class ConvUNet(Backbone):
    """A rank-agnostic conditional UNet: ``forward(x (B, C, *dims), c_noise (B,), cond) -> (B, C_out, *dims)``.

    Args:
        shape: ``(C, *dims)`` of one item (from the adapter): ``C`` input channels and the rank
            ``len(dims)`` (1: series ``(B, C, L)``, 2: ``(B, C, H, W)``, 3: ``(B, C, D, H, W)``);
            the sizes themselves are free (any size runs).
        out_channels: output channels (default ``C``).
        channels: width of each resolution level; level ``i`` runs at ``1 / 2^i`` of the input size.
        layers_per_level: residual blocks per level on the way down (and up).
        attention_levels: levels with cross-attention after each block (default: the lowest
            only; the middle block always has it when ``cross_attention_dim`` is set). Negative
            indices count from the lowest level.
        cross_attention_dim: width ``D`` of ``cond.tokens`` (the conditioner's ``dim``); ``None``
            for no cross-attention (label- or pooled-only conditioning).
        num_heads: attention heads (a count; each is ``width / num_heads`` wide).
        pooled_dim: width of ``cond.pooled`` to add to the noise embedding (``None``: ignore pooled).
        num_classes: number of class labels in ``cond.labels`` (index ``num_classes`` is the null
            label, as :class:`~multidiff.conditioning.labels.LabelConditioner` uses); ``None``: none.
        emb_dim: width of the noise embedding (default ``4 * channels[0]``).
        norm_groups: GroupNorm groups (reduced where a width is not divisible).
        kernel_size: odd convolution kernel size.
        concat_channels: extra input channels after ``C`` (mask conditioning: the denoiser adds
            ``cond.concat``), zero-initialised.
        dropout: dropout inside residual blocks.
    """

    ranks = (1, 2, 3)

    def __init__(
        self,
        *,
        shape: Sequence[int],
        out_channels: int | None = None,
        channels: Sequence[int] = (32, 64, 128),
        layers_per_level: int = 1,
        attention_levels: Sequence[int] | None = None,
        cross_attention_dim: int | None = 384,
        num_heads: int = 4,
        pooled_dim: int | None = None,
        num_classes: int | None = None,
        emb_dim: int | None = None,
        norm_groups: int = 8,
        kernel_size: int = 3,
        dropout: float = 0.0,
        concat_channels: int = 0,
    ) -> None:
        super().__init__(shape=shape, concat_channels=concat_channels)
        channels = [int(c) for c in channels]
        if not channels or layers_per_level < 1 or kernel_size % 2 == 0:
            raise ValueError("channels must be non-empty, layers_per_level >= 1 and kernel_size odd")
        n = len(channels)
        levels = {n - 1} if attention_levels is None else {i % n for i in attention_levels}
        if cross_attention_dim is None:
            levels = set()
        self.dims, self.in_channels = len(self.shape) - 1, self.shape[0]
        self.out_channels = out_channels or self.in_channels
        self.cross_attention_dim = cross_attention_dim
        dims, emb_dim = self.dims, emb_dim or 4 * channels[0]
        conv = _CONV[dims]
        block = lambda cin, cout: ResBlock(  # noqa: E731
            dims, cin, cout, emb_dim, norm_groups=norm_groups, kernel_size=kernel_size, dropout=dropout)
        attn = lambda ch: CrossAttention(ch, cross_attention_dim, num_heads=num_heads, norm_groups=norm_groups)  # noqa: E731

        self.time_mlp = NoiseEmbedding(channels[0], emb_dim)
        self.pooled_proj = nn.Linear(pooled_dim, emb_dim) if pooled_dim else None
        self.label_emb = LabelEmbedding(num_classes, emb_dim) if num_classes else None

        self.conv_in = conv(self.input_channels, channels[0], kernel_size, padding=kernel_size // 2)
        zero_input_channels(self.conv_in, self.in_channels, self.concat_channels)
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, ch = [], channels[0]
        for i, width in enumerate(channels):
            for _ in range(layers_per_level):
                self.down.append(block(ch, width))
                self.down_attn.append(attn(width) if i in levels else nn.Identity())
                ch = width
                skips.append(ch)
            if i < n - 1:
                self.downsample.append(conv(ch, ch, 3, stride=2, padding=1))
        self.mid1, self.mid2 = block(ch, ch), block(ch, ch)
        self.mid_attn = attn(ch) if cross_attention_dim is not None else nn.Identity()
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(n)):
            for _ in range(layers_per_level):
                self.up.append(block(ch + skips.pop(), channels[i]))
                self.up_attn.append(attn(channels[i]) if i in levels else nn.Identity())
                ch = channels[i]
            if i > 0:
                self.upsample.append(conv(ch, ch, kernel_size, padding=kernel_size // 2))
        self.norm_out = nn.GroupNorm(_groups(ch, norm_groups), ch)
        self.conv_out = conv(ch, self.out_channels, kernel_size, padding=kernel_size // 2)
        self.layers_per_level, self.num_levels = layers_per_level, n

    def embed(self, c_noise: Tensor, cond: Cond | None, batch: int) -> Tensor:
        """Noise embedding ``(B, emb_dim)``: MLP of the sinusoidal ``c_noise`` plus pooled and label terms."""
        emb = self.time_mlp(c_noise, batch)
        pooled = pooled_vector(cond, like=emb) if self.pooled_proj is not None else None
        if pooled is not None:
            emb = emb + self.pooled_proj(pooled)
        if self.label_emb is not None:
            emb = emb + self.label_emb(cond, batch)
        return emb

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        """``x``: ``(B, C, *dims)`` of any sizes; ``c_noise``: ``(B,)``; returns ``(B, out_channels, *dims)``."""
        self.check_input(x)
        tokens, mask = (None, None) if self.cross_attention_dim is None else cond_tokens(
            cond, dim=self.cross_attention_dim, like=x)
        emb = self.embed(c_noise, cond, x.shape[0])
        attend = lambda layer, h: layer(h, tokens, mask) if isinstance(layer, CrossAttention) else h  # noqa: E731

        h = self.conv_in(x)
        skips, blocks = [], iter(zip(self.down, self.down_attn))
        for i in range(self.num_levels):
            for _ in range(self.layers_per_level):
                res, att = next(blocks)
                h = attend(att, res(h, emb))
                skips.append(h)
            if i < self.num_levels - 1:
                h = self.downsample[i](h)
        h = self.mid2(attend(self.mid_attn, self.mid1(h, emb)), emb)
        blocks, ups = iter(zip(self.up, self.up_attn)), iter(self.upsample)
        for i in reversed(range(self.num_levels)):
            for _ in range(self.layers_per_level):
                res, att = next(blocks)
                h = attend(att, res(torch.cat([h, skips.pop()], dim=1), emb))
            if i > 0:
                # x2 then crop: a level of odd size n was downsampled to ceil(n / 2)
                target = skips[-1].shape[2:]
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = next(ups)(_crop(h, target))
        return self.conv_out(F.silu(self.norm_out(h)))


def _crop(h: Tensor, size: Sequence[int]) -> Tensor:
    """Crop the trailing spatial dims of ``h`` to ``size`` (each at most one larger)."""
    return h[(..., *(slice(0, s) for s in size))]
