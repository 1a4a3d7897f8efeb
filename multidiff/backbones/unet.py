"""diffusers' ``UNet2DConditionModel`` behind the backbone signature, for rank-2 items (images, spectrograms)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from multidiff.backbones.conditioning import attention_context, class_labels, pooled_vector
from multidiff.backbones.diffusers_unet import DiffusersUNet
from multidiff.core.cond import Cond


def padded_call(fn, x: Tensor, multiple: int) -> Tensor:
    """``fn(x)`` for ``x (B, C, H, W)`` of any ``H, W``: padded at the end to a multiple of ``multiple``
    (reflecting, so the strip looks like the noisy input the network expects; constant where the
    input is too small to reflect) and the output cropped back."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return fn(x)
    mode = "reflect" if pad_h < h and pad_w < w else "constant"
    return fn(F.pad(x, (0, pad_w, 0, pad_h), mode=mode))[..., :h, :w]


class UNet2DCond(DiffusersUNet):
    """diffusers ``UNet2DConditionModel`` with text cross-attention (and optional class labels).

    Takes items ``shape = (C, H, W)`` (any ``H, W`` at run time: see :meth:`forward`).
    ``cond.tokens`` ``(B, L, cross_attention_dim)`` feed cross-attention, ``cond.mask`` masks the
    padding, ``cond.labels`` (with ``num_classes``; none given means the null label) add a class
    embedding to the timestep embedding, and with ``pooled_dim`` ``cond.pooled`` ``(B, pooled_dim)``
    joins the timestep embedding (diffusers' ``time_cond_proj_dim``): a global path that reaches every
    resnet block, beside the cross-attention that only the ``CrossAttn*`` resolutions see.
    ``coord_axes`` appends a fixed coordinate channel (``linspace(-1, 1)``) along the listed spatial
    axes (0: height, 1: width) to the input: convolutions and attention are blind to absolute
    position (they only sense it through boundary effects), and on a spectrogram the row *is* the
    pitch. Use it only on axes whose size is fixed (the mel axis, not time: a coordinate would tie
    content to the length). Keep attention blocks (``CrossAttn*``) at the low resolutions: at full
    resolution a CPU step is ~8x slower.

    Args:
        num_heads: attention heads per block (an int or one per block); diffusers calls this
            ``attention_head_dim`` but ``UNet2DConditionModel`` reads it as a head *count*.
        norm_groups: GroupNorm groups; must divide every ``block_out_channels`` entry.
        **kwargs: passed to ``UNet2DConditionModel``.
    """

    ranks = (2,)

    def __init__(
        self,
        *,
        shape: Sequence[int],
        out_channels: int | None = None,
        block_out_channels: Sequence[int] = (64, 128, 128),
        down_block_types: Sequence[str] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: Sequence[str] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block: int = 2,
        cross_attention_dim: int = 384,
        num_heads: int | Sequence[int] = 8,
        norm_groups: int = 32,
        num_classes: int | None = None,
        pooled_dim: int | None = None,
        coord_axes: Sequence[int] = (),
        concat_channels: int = 0,
        **kwargs,
    ) -> None:
        from diffusers import UNet2DConditionModel

        axes = tuple(int(a) for a in coord_axes)
        if any(a not in (0, 1) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"backbone.coord_axes={list(coord_axes)} is invalid: list distinct spatial axes, "
                             "0 (height, e.g. the mel axis) and/or 1 (width)")
        super().__init__(
            shape=shape, unet_class=UNet2DConditionModel, out_channels=out_channels,
            block_out_channels=block_out_channels, down_block_types=down_block_types, up_block_types=up_block_types,
            layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim, norm_groups=norm_groups,
            pooled_dim=pooled_dim, extra_in_channels=len(axes), concat_channels=concat_channels,
            attention_head_dim=num_heads if isinstance(num_heads, int) else tuple(int(n) for n in num_heads),
            num_class_embeds=None if num_classes is None else num_classes + 1,  # + the null label
            **kwargs,
        )
        self.num_classes, self.coord_axes = num_classes, axes

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the UNet takes without resampling: each down block but the last halves them."""
        return 2 ** (len(self.unet.config.down_block_types) - 1)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        """``x``: ``(B, C, H, W)`` of any ``H, W``; sizes that are not a multiple of
        :attr:`size_multiple` (e.g. spectrograms of an arbitrary duration) are padded at the end
        and the output cropped back, so every size gets the same aligned grid as training."""
        self.check_input(x)
        if self.coord_axes:  # [x, coordinates, concat]: the order of the input weights
            c = self.shape[0]
            x = torch.cat([x[:, :c], *self._coordinates(x), x[:, c:]], 1)
        return padded_call(lambda padded: self._forward(padded, c_noise, cond), x, self.size_multiple)

    def _forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        tokens, mask = attention_context(cond, dim=self.cross_attention_dim, like=x)
        labels = None if self.num_classes is None else class_labels(
            cond, batch=x.shape[0], num_classes=self.num_classes, device=x.device)
        return self.unet(
            x,
            c_noise,
            encoder_hidden_states=tokens,
            encoder_attention_mask=None if mask is None else mask.to(x.dtype),
            class_labels=labels,
            timestep_cond=pooled_vector(cond, like=x) if self.pooled_dim is not None else None,
            return_dict=False,
        )[0]

    def _coordinates(self, x: Tensor) -> list[Tensor]:
        """One ``(B, 1, H, W)`` channel per ``coord_axes`` entry, ``-1 .. 1`` along that axis."""
        b, _, h, w = x.shape
        out = []
        for axis in self.coord_axes:
            n = (h, w)[axis]
            ramp = torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) if n > 1 else x.new_zeros(1)
            out.append((ramp.view(1, 1, n, 1) if axis == 0 else ramp.view(1, 1, 1, n)).expand(b, 1, h, w))
        return out
