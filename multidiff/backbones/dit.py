"""A diffusion transformer over patches of any rank: 1-D signals, 2-D images and spectrograms, 3-D clips.

One class serves every rank (DiT, Peebles & Xie 2023, made rank-free):

- **patches**: an item ``(C, *dims)`` is padded at the end of each axis to a multiple of the patch
  size of that axis (``patch_size``: one int or one per axis), cut into patches, and each patch
  (``C * prod(patch)`` values) is one token; the output is cropped back, so any size works;
- **positions**: N-D axial rotary embeddings (RoPE; Su et al. 2021): the head width is split
  between the axes (as Flux, HunyuanVideo and Wan do for their fixed ranks) and each part rotates
  by its axis' patch index. Positions are indices, not a learned table, so lengths and sizes other
  than the training ones need no retraining;
- **noise level** (and ``cond.pooled``, and class labels) -> one vector that modulates every block
  by adaLN-Zero (scale, shift and a zero-initialised gate per sub-layer, so each block starts as
  the identity);
- **text**: cross-attention to ``cond.tokens`` (``cond.mask`` respected; a learned always-real
  token keeps a key for empty prompts), or with ``joint_attention=True`` MMDiT-style joint
  attention (SD3, Esser et al. 2024): the text tokens get their own weights and modulation and
  attend together with the patches in one attention;
- **space-time factorized attention** (``factorized_time=True``, clips only): each block attends
  within every frame (2-D RoPE over height and width) and then across frames at every position
  (1-D RoPE over time, its own adaLN-Zero gate, so it starts switched off), as the video UNet's
  temporal layers and Latte / CogVideo-style factorized DiTs do; a clip of one frame (the single
  frames of slice training, ``training.slice_items``) skips the temporal attention, so frames
  teach shapes without pulling the motion towards still clips;
- **several modalities in one model** (``modalities``): each modality (an image, a spectrogram, a
  clip: any ranks and channel counts) gets its own patch size, patch embedding and output layer,
  and a learned modality embedding joins the noise level's; every block is shared. A batch says
  which modality it is in ``cond.modality``.

Attention is ``scaled_dot_product_attention`` (flash / memory-efficient kernels where available);
``gradient_checkpointing=True`` recomputes each block in the backward pass to save memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multidiff.backbones.base import Backbone, BackboneShapeError
from multidiff.backbones.conditioning import LabelEmbedding, NoiseEmbedding, attention_context, pooled_vector
from multidiff.core.cond import Cond


def patch_sizes(patch_size: int | Sequence[int], rank: int) -> tuple[int, ...]:
    """``patch_size`` for each of ``rank`` axes (one int: the same on every axis)."""
    sizes = (patch_size,) * rank if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if len(sizes) != rank or any(p < 1 for p in sizes):
        raise BackboneShapeError(f"DiT: patch_size must be a positive int or one per data axis ({rank} here), "
                                 f"got {patch_size!r}")
    return sizes


def patchify(x: Tensor, patch: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """``(B, C, *dims)`` -> tokens ``(B, N, C * prod(patch))`` and the token grid ``(n_1, ..., n_r)``.

    Each axis is zero-padded at its end to a multiple of its patch size; tokens are in C order of
    the grid (the first axis outermost), each token's values in ``(C, p_1, ..., p_r)`` order."""
    b, c, *dims = x.shape
    pad = [(-d) % p for d, p in zip(dims, patch)]
    if any(pad):
        x = F.pad(x, [v for q in reversed(pad) for v in (0, q)])
    grid = tuple((d + q) // p for d, q, p in zip(dims, pad, patch))
    r = len(dims)
    x = x.reshape(b, c, *[v for n, p in zip(grid, patch) for v in (n, p)])
    order = [0, *range(2, 2 + 2 * r, 2), 1, *range(3, 3 + 2 * r, 2)]  # B, n_1..n_r, C, p_1..p_r
    return x.permute(order).reshape(b, math.prod(grid), c * math.prod(patch)), grid


def unpatchify(tokens: Tensor, grid: Sequence[int], patch: Sequence[int], channels: int,
               dims: Sequence[int]) -> Tensor:
    """The inverse of :func:`patchify`: ``(B, N, C * prod(patch))`` -> ``(B, C, *dims)`` (cropped)."""
    b, r = tokens.shape[0], len(grid)
    x = tokens.reshape(b, *grid, channels, *patch)
    order = [0, r + 1, *[v for i in range(r) for v in (1 + i, r + 2 + i)]]  # B, C, n_1, p_1, ..., n_r, p_r
    x = x.permute(order).reshape(b, channels, *[n * p for n, p in zip(grid, patch)])
    return x[(slice(None), slice(None), *[slice(0, d) for d in dims])]


def rope_split(head_dim: int, rank: int) -> tuple[int, ...]:
    """Rotated channels of each axis: an even share of ``head_dim`` per axis (the rest are not rotated)."""
    share = 2 * (head_dim // (2 * rank))
    if share == 0:
        raise BackboneShapeError(f"DiT: a head width of {head_dim} cannot carry rotary positions for {rank} axes; "
                                 f"use a head width of at least {2 * rank} (hidden_size / num_heads)")
    return (share,) * rank


def rope_angles(grid: Sequence[int], split: Sequence[int], *, theta: float, device, scale: Sequence[float] = ()
                ) -> tuple[Tensor, Tensor]:
    """``cos``, ``sin`` of shape ``(N, sum(split) / 2)`` for the tokens of ``grid`` (C order): axis
    ``i`` rotates its ``split[i]`` channels by ``position_i * theta^(-2k / split[i])``; ``scale``
    multiplies the positions of each axis (default 1)."""
    axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    parts = []
    for i, (pos, dim) in enumerate(zip(axes, split)):
        freqs = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        s = scale[i] if i < len(scale) else 1.0
        parts.append((pos.reshape(-1, 1) * s) * freqs[None])
    angles = torch.cat(parts, dim=1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(2k, 2k + 1)`` of ``x (B, H, N, D)`` by the angles; channels past
    ``2 * cos.shape[-1]`` are left as they are."""
    rot = 2 * cos.shape[-1]
    head, rest = x[..., :rot], x[..., rot:]
    even, odd = head[..., 0::2], head[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``(B, D)`` vectors."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class Attention(nn.Module):
    """Multi-head attention with q/k RMS-normalisation (stable at any length); in self-attention
    ``rope`` rotates queries and keys by their positions."""

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        self.out = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x (B, N, D)``; ``context (B, L, Dc)`` (``None``: self-attention); ``mask (B, L)`` True = real."""
        q = self.q_norm(self.heads(self.q(x)))
        k, v = self.kv(x if context is None else context).chunk(2, dim=-1)
        k, v = self.k_norm(self.heads(k)), self.heads(v)
        if rope is not None and context is None:  # positions rotate self-attention only
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        bias = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(y.transpose(1, 2).flatten(2))


@dataclass(frozen=True)
class SpaceTimeRope:
    """Rotary tables of a factorized block: within a frame (``space``) and across ``frames``
    (``time``); tokens are in C order, so token ``n`` is frame ``n // (N / frames)``."""

    space: tuple[Tensor, Tensor]
    time: tuple[Tensor, Tensor]
    frames: int


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention (RoPE) -> cross-attention to the text -> MLP; with ``temporal``, the
    self-attention is within each frame, followed by attention across frames (its own adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, temporal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        if temporal:
            self.norm_time = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.time_attn = Attention(dim, num_heads)
        self.temporal = temporal
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, (9 if temporal else 6) * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor, text: Tensor, mask: Tensor | None, rope) -> tuple[Tensor, Tensor]:
        mods = self.ada(c).chunk(9 if self.temporal else 6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:6]
        if isinstance(rope, SpaceTimeRope):
            b, n, d = x.shape
            t = rope.frames
            y = modulate(self.norm1(x), shift1, scale1).reshape(b * t, n // t, d)
            x = x + gate1[:, None] * self.attn(y, rope=rope.space).reshape(b, n, d)
            if t > 1:  # one frame (an image, a sliced frame): nothing to attend to across time
                shift_t, scale_t, gate_t = mods[6:]
                y = modulate(self.norm_time(x), shift_t, scale_t).reshape(b, t, n // t, d).transpose(1, 2)
                y = self.time_attn(y.reshape(b * (n // t), t, d), rope=rope.time)
                x = x + gate_t[:, None] * y.reshape(b, n // t, t, d).transpose(1, 2).reshape(b, n, d)
        else:
            x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
        x = x + self.cross(self.norm2(x), text, mask=mask)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))
        return x, text


class JointBlock(nn.Module):
    """MMDiT block: patches and text each get adaLN-Zero modulation, projections and an MLP, and
    attend together in one attention over ``[patches; text]`` (RoPE on the patches only)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.streams = nn.ModuleList([_Stream(dim, mlp_ratio, self.head_dim) for _ in range(2)])
        self.out = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])

    def forward(self, x: Tensor, c: Tensor, text: Tensor, mask: Tensor | None, rope) -> tuple[Tensor, Tensor]:
        n = x.shape[1]
        mods = [s.ada(c).chunk(6, dim=-1) for s in self.streams]
        qkv = []
        for stream, tokens, (shift1, scale1, *_rest) in zip(self.streams, (x, text), mods):
            q, k, v = stream.qkv(modulate(stream.norm1(tokens), shift1, scale1)).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
            qkv.append((stream.q_norm(q), stream.k_norm(k), v))
        (qx, kx, vx), (qt, kt, vt) = qkv
        if rope is not None:
            qx, kx = apply_rope(qx, *rope), apply_rope(kx, *rope)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qx, qt), (kx, kt), (vx, vt)))
        bias = None
        if mask is not None:
            keys = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
            bias = keys[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
        outs = []
        for stream, out, tokens, y_part, (_s1, _c1, gate1, shift2, scale2, gate2) in zip(
                self.streams, self.out, (x, text), (y[:, :n], y[:, n:]), mods):
            tokens = tokens + gate1[:, None] * out(y_part)
            outs.append(tokens + gate2[:, None] * stream.mlp(modulate(stream.norm2(tokens), shift2, scale2)))
        return outs[0], outs[1]


class _Stream(nn.Module):
    """One stream's own weights in a :class:`JointBlock`."""

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.RMSNorm(head_dim), nn.RMSNorm(head_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)


@dataclass(frozen=True)
class _Modality:
    """One modality of a multimodal :class:`DiT`: its name and index, item shape, patch and rotary split."""

    name: str
    index: int
    shape: tuple[int, ...]
    patch: tuple[int, ...]
    rope_split: tuple[int, ...]

    @property
    def in_features(self) -> int:
        return self.shape[0] * math.prod(self.patch)

    out_features = in_features

    def check_input(self, x: Tensor, owner: str) -> None:
        if x.ndim != len(self.shape) + 1 or x.shape[1] != self.shape[0]:
            raise BackboneShapeError(f"{owner}: modality {self.index} takes batches (B, {self.shape[0]}, "
                                     f"{', '.join('n' * (len(self.shape) - 1))}) of any sizes (items {self.shape}), "
                                     f"but got a batch of shape {tuple(x.shape)}")


class DiT(Backbone):
    """Diffusion transformer over patches of items ``(C, *dims)`` of any rank (see the module docstring).

    Args:
        shape: ``(C, *dims)`` of one item (from the adapter).
        patch_size: one int, or one per data axis (e.g. ``[1, 2, 2]`` for clips: every frame, 2x2 pixels).
        hidden_size, depth, num_heads, mlp_ratio: the transformer's width, blocks, heads and MLP width factor.
        cross_attention_dim: width of ``cond.tokens`` (``None``: no text).
        pooled_dim: width of ``cond.pooled`` added to the noise embedding (``None``: ignore it).
        num_classes: class labels (label ``num_classes`` is the null label; ``None``: no labels).
        joint_attention: MMDiT-style joint attention instead of cross-attention.
        factorized_time: space-time factorized self-attention for clips (rank-3 items, time first):
            within each frame, then across frames; other ranks keep full attention.
        rope_theta: base of the rotary frequencies.
        gradient_checkpointing: recompute blocks in the backward pass (less memory, ~30% more time).
        concat_channels: extra input channels for mask conditioning (zero-initialised).
        out_channels: output channels (default ``C``).
        modalities: one model for several modalities: ``{name: {"shape": (C, *dims), "patch_size": p}}``
            in a fixed order (a batch's ``cond.modality`` is an index into it; ``patch_size`` defaults
            to the one above). Each gets its own patch embedding and output layer, and a learned
            embedding of the modality is added to the noise level's. ``shape`` is the first one's.
    """

    ranks = ()  # any

    def __init__(self, *, shape: Sequence[int], patch_size: int | Sequence[int] = 2, hidden_size: int = 256,
                 depth: int = 6, num_heads: int = 4, mlp_ratio: float = 4.0, cross_attention_dim: int | None = None,
                 pooled_dim: int | None = None, num_classes: int | None = None, joint_attention: bool = False,
                 factorized_time: bool = False, rope_theta: float = 10_000.0, gradient_checkpointing: bool = False,
                 concat_channels: int = 0,
                 out_channels: int | None = None, modalities: Mapping[str, Mapping] | None = None) -> None:
        super().__init__(shape=shape, concat_channels=concat_channels)
        rank = len(self.shape) - 1
        if hidden_size % num_heads:
            raise BackboneShapeError(f"DiT: hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
        self.patch = patch_sizes(patch_size, rank)
        self.out_channels = out_channels or self.shape[0]
        self.hidden_size, self.rope_theta = hidden_size, rope_theta
        self.rope_split = rope_split(hidden_size // num_heads, rank)
        self.gradient_checkpointing = gradient_checkpointing
        self.joint_attention, self.factorized_time = joint_attention, bool(factorized_time)
        if self.factorized_time and joint_attention:
            raise BackboneShapeError("DiT: factorized_time=true factorizes the self-attention of cross-attention "
                                     "blocks; it does not combine with joint_attention=true (choose one)")
        self.modalities = self._modality_specs(modalities, patch_size, hidden_size // num_heads, out_channels)
        if self.modalities:  # one patch embedding and output layer per modality, a learned modality embedding
            self.embed = nn.ModuleDict({n: nn.Linear(m.in_features, hidden_size) for n, m in self.modalities.items()})
            self.final = nn.ModuleDict({n: nn.Linear(hidden_size, m.out_features) for n, m in self.modalities.items()})
            self.modality_embedding = nn.Embedding(len(self.modalities), hidden_size)
            nn.init.normal_(self.modality_embedding.weight, std=0.02)
        else:
            p = math.prod(self.patch)
            self.embed = nn.Linear(self.input_channels * p, hidden_size)
            with torch.no_grad():  # mask-conditioning channels start switched off (see Backbone)
                self.embed.weight[:, self.shape[0] * p:].zero_()
            self.final = nn.Linear(hidden_size, self.out_channels * p)
        self.noise = NoiseEmbedding(256, hidden_size)
        self.pooled = nn.Linear(pooled_dim, hidden_size) if pooled_dim else None
        self.labels = LabelEmbedding(num_classes, hidden_size) if num_classes else None
        self.cross_attention_dim = cross_attention_dim
        self.context = nn.Linear(cross_attention_dim, hidden_size) if cross_attention_dim else None
        self.null_token = nn.Parameter(torch.zeros(1, 1, hidden_size))  # always real: a key for empty prompts
        if joint_attention:
            self.blocks = nn.ModuleList([JointBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        else:
            self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, temporal=self.factorized_time)
                                         for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        finals = list(self.final.values()) if self.modalities else [self.final]
        for layer in (self.final_ada[1], *finals):  # the network starts by predicting zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _modality_specs(self, modalities, patch_size, head_dim: int, out_channels) -> dict[str, _Modality]:
        """The checked ``modalities`` argument (``{}`` for a one-modality model)."""
        if not modalities:
            return {}
        if self.concat_channels or out_channels:
            raise BackboneShapeError("DiT: a model of several modalities takes no concat_channels or out_channels "
                                     "(mask conditioning of a multimodal model is not supported yet)")
        specs = {}
        for name, spec in modalities.items():
            if not str(name).isidentifier():
                raise BackboneShapeError(f"DiT: modality name {name!r} must be a plain name (letters, digits, _)")
            if not isinstance(spec, Mapping) or "shape" not in spec or set(spec) - {"shape", "patch_size"}:
                raise BackboneShapeError(f"DiT: modalities.{name} must be {{shape: [C, ...], patch_size: ...}}, "
                                         f"got {spec!r}")
            shape = self.check_shape(spec["shape"])
            patch = patch_sizes(spec.get("patch_size") or patch_size, len(shape) - 1)
            specs[str(name)] = _Modality(str(name), len(specs), shape, patch, rope_split(head_dim, len(shape) - 1))
        first = next(iter(specs.values()))
        if first.shape != self.shape:
            raise BackboneShapeError(f"DiT: shape={self.shape} must be the first modality's ({first.shape})")
        return specs

    def modality(self, cond: Cond | None) -> _Modality | None:
        """The modality of a batch (``cond.modality``, an index into :attr:`modalities`); ``None`` for a
        one-modality model."""
        if not self.modalities:
            return None
        specs = list(self.modalities.values())
        index = None if cond is None else cond.modality
        if index is None:
            if len(specs) == 1:
                return specs[0]
            raise BackboneShapeError(f"this DiT generates {', '.join(self.modalities)}: a batch must say which "
                                     "(cond.modality, an index into that list)")
        first = int(index.reshape(-1)[0])
        if not 0 <= first < len(specs) or bool((index != first).any()):
            raise BackboneShapeError(f"cond.modality={index.tolist()} is invalid: one index in 0..{len(specs) - 1} "
                                     f"({', '.join(self.modalities)}) for the whole batch")
        return specs[first]

    def conditioning(self, c_noise: Tensor, cond: Cond | None, like: Tensor) -> Tensor:
        """``(B, hidden)``: the noise level's embedding plus the pooled vector and the class label's."""
        c = self.noise(c_noise, like.shape[0]).to(like.dtype)
        pooled = pooled_vector(cond, like=like) if self.pooled is not None else None
        if pooled is not None:
            c = c + self.pooled(pooled)
        if self.labels is not None:
            c = c + self.labels(cond, like.shape[0]).to(like.dtype)
        return c

    def text(self, cond: Cond | None, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(B, L + 1, hidden)`` text tokens (projected) and their mask, the learned null token last."""
        null = self.null_token.to(like.dtype).expand(like.shape[0], 1, -1)
        if self.context is None:
            return null, None
        tokens, mask = attention_context(cond, dim=self.cross_attention_dim, like=like)
        tokens = self.context(tokens)
        mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return torch.cat([tokens, null], dim=1), mask

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        """``(B, C + K, *dims)``, ``(B,)``, ``Cond | None`` -> ``(B, out_channels, *dims)``."""
        modality = self.modality(cond)
        if modality is None:
            self.check_input(x)
            patch, split, channels, embed, final = self.patch, self.rope_split, self.out_channels, self.embed, self.final
        else:
            modality.check_input(x, type(self).__name__)
            patch, split, channels = modality.patch, modality.rope_split, modality.shape[0]
            embed, final = self.embed[modality.name], self.final[modality.name]
        dims = x.shape[2:]
        tokens, grid = patchify(x, patch)
        h = embed(tokens)
        c = self.conditioning(c_noise, cond, h)
        if modality is not None:
            c = c + self.modality_embedding.weight[modality.index].to(c.dtype)
        text, mask = self.text(cond, h)
        if self.factorized_time and len(grid) == 3:  # a clip: (time, height, width)
            rope = SpaceTimeRope(rope_angles(grid[1:], split[1:], theta=self.rope_theta, device=x.device),
                                 rope_angles(grid[:1], split[:1], theta=self.rope_theta, device=x.device), grid[0])
        else:
            rope = rope_angles(grid, split, theta=self.rope_theta, device=x.device)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, text = checkpoint(block, h, c, text, mask, rope, use_reentrant=False)
            else:
                h, text = block(h, c, text, mask, rope)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = final(modulate(self.final_norm(h), shift, scale))
        return unpatchify(out, grid, patch, channels, dims)
