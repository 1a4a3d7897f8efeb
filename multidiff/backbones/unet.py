"""Wrappers over diffusers' conditional UNets behind the backbone signature."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from multidiff.backbones.base import Backbone
from multidiff.core.cond import Cond


class UNet2DCond(Backbone):
    """diffusers ``UNet2DConditionModel`` with text cross-attention (and optional class labels).

    ``cond.tokens`` ``(B, L, cross_attention_dim)`` feed cross-attention, ``cond.mask`` masks the
    padding, ``cond.labels`` (with ``num_class_embeds``) add a class embedding, and with
    ``pooled_cond=True`` ``cond.pooled`` ``(B, cross_attention_dim)`` joins the timestep embedding
    (diffusers' ``time_cond_proj_dim``): a global path that reaches every resnet block, beside the
    cross-attention that only the ``CrossAttn*`` resolutions see. ``coord_axes`` appends a fixed
    coordinate channel (``linspace(-1, 1)``) along the listed spatial axes (0: height, 1: width)
    to the input: convolutions and attention are blind to absolute position (they only sense it
    through boundary effects), and on a spectrogram the row *is* the pitch. Use it only on axes
    whose size is fixed (the mel axis, not time: a coordinate would tie content to the length). Keep attention
    blocks (``CrossAttn*``) at the low resolutions: at full resolution a CPU step is ~8x slower.
    All other keyword arguments go to ``UNet2DConditionModel``.
    """

    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(
        self,
        *,
        sample_size: int | tuple[int, int] = 16,
        in_channels: int = 1,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block: int = 2,
        cross_attention_dim: int = 384,
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        num_class_embeds: int | None = None,
        pooled_cond: bool = False,
        coord_axes: tuple[int, ...] = (),
        **kwargs,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(
            # plain ints: the config is saved as JSON (a spectrogram's [n_mels, frames] arrives as a ListConfig)
            sample_size=sample_size if isinstance(sample_size, int) else tuple(int(s) for s in sample_size),
            in_channels=in_channels + len(coord_axes),
            out_channels=out_channels or in_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            num_class_embeds=None if num_class_embeds is None else num_class_embeds + 1,  # + null label
            time_cond_proj_dim=cross_attention_dim if pooled_cond else None,
            **kwargs,
        )
        self.cross_attention_dim, self.pooled_cond = cross_attention_dim, pooled_cond
        self.coord_axes = tuple(int(a) for a in coord_axes)
        if any(a not in (0, 1) for a in self.coord_axes) or len(set(self.coord_axes)) != len(self.coord_axes):
            raise ValueError(f"backbone.coord_axes={list(coord_axes)} is invalid: list distinct spatial axes, "
                             "0 (height, e.g. the mel axis) and/or 1 (width)")

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the UNet takes without resampling: each down block but the last halves them."""
        return 2 ** (len(self.unet.config.down_block_types) - 1)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        """``x``: ``(B, C, H, W)`` of any ``H, W``; sizes that are not a multiple of
        :attr:`size_multiple` (e.g. spectrograms of an arbitrary duration) are padded at the end
        and the output cropped back, so every size gets the same aligned grid as training."""
        h, w = x.shape[-2:]
        if self.coord_axes:
            x = torch.cat([x, *self._coordinates(x)], 1)
        m = self.size_multiple
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            # reflect keeps the padded strip noise-like, as the network expects; tiny inputs cannot reflect
            mode = "reflect" if pad_h < h and pad_w < w else "constant"
            out = self._forward(F.pad(x, (0, pad_w, 0, pad_h), mode=mode), c_noise, cond)
            return out[..., :h, :w]
        return self._forward(x, c_noise, cond)

    def _forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        tokens = mask = labels = pooled = None
        if cond is not None:
            tokens, mask, labels, pooled = cond.tokens, cond.mask, cond.labels, cond.pooled
        if tokens is None:  # label-only or unconditional: one zero token to attend to
            tokens = x.new_zeros(x.shape[0], 1, self.cross_attention_dim)
            mask = None
        out = self.unet(
            x,
            c_noise,
            encoder_hidden_states=tokens.to(x.dtype),
            encoder_attention_mask=None if mask is None else mask.to(x.dtype),
            class_labels=labels,
            timestep_cond=self._pooled(x, pooled),
            return_dict=False,
        )[0]
        return out

    def _coordinates(self, x: Tensor) -> list[Tensor]:
        """One ``(B, 1, H, W)`` channel per ``coord_axes`` entry, ``-1 .. 1`` along that axis."""
        b, _, h, w = x.shape
        out = []
        for axis in self.coord_axes:
            n = (h, w)[axis]
            ramp = torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) if n > 1 else x.new_zeros(1)
            out.append((ramp.view(1, 1, n, 1) if axis == 0 else ramp.view(1, 1, 1, n)).expand(b, 1, h, w))
        return out

    def _pooled(self, x: Tensor, pooled: Tensor | None) -> Tensor | None:
        if not self.pooled_cond:
            return None
        if pooled is None:  # label-only or unconditional: the null vector
            return x.new_zeros(x.shape[0], self.cross_attention_dim)
        return pooled.to(x.dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        self.unet.save_pretrained(str(directory), safe_serialization=True)

    def load_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        self.unet.load_state_dict(load_file(Path(directory) / self.weights_name))


