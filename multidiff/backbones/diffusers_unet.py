"""What the diffusers UNet wrappers share: construction from the item shape and diffusers' save format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from multidiff.backbones.base import Backbone, zero_input_channels


class DiffusersUNet(Backbone):
    """Base of :class:`~multidiff.backbones.unet.UNet2DCond` and :class:`~multidiff.backbones.unet3d.UNet3DCond`.

    Builds ``unet_class`` (a diffusers conditional UNet) as :attr:`unet` from the item shape
    (``in_channels = C``, ``sample_size`` = the last two sizes, an int when square) and multidiff's
    option names: ``norm_groups`` -> ``norm_num_groups``, ``pooled_dim`` -> ``time_cond_proj_dim``
    (diffusers adds a bias-free projection of ``cond.pooled`` to the sinusoidal timestep features).
    ``extra_in_channels`` widens the input (e.g. coordinate channels) and ``concat_channels`` (mask
    conditioning) widens it after those, zero-initialised: input channels are ordered ``[x,
    extras, concat]`` so that adding concat channels to a trained model only appends input weights
    (:func:`~multidiff.backbones.base.load_widened`); every other keyword goes to ``unet_class``.
    Weights are saved with diffusers' ``save_pretrained`` (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, loadable by ``from_pretrained``); any other child
    module with weights (e.g. label tokens) is saved beside it as ``<name>.safetensors``.
    """

    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(
        self,
        *,
        shape: Sequence[int],
        unet_class: type[nn.Module],
        out_channels: int | None,
        block_out_channels: Sequence[int],
        down_block_types: Sequence[str],
        up_block_types: Sequence[str],
        layers_per_block: int,
        cross_attention_dim: int,
        norm_groups: int,
        pooled_dim: int | None,
        extra_in_channels: int = 0,
        concat_channels: int = 0,
        **unet_kwargs,
    ) -> None:
        super().__init__(shape=shape, concat_channels=concat_channels)
        channels, (h, w) = self.shape[0], self.shape[-2:]
        self.cross_attention_dim, self.pooled_dim = int(cross_attention_dim), pooled_dim
        self.unet = unet_class(
            sample_size=h if h == w else (h, w),  # plain ints: diffusers saves its config as JSON
            in_channels=channels + extra_in_channels + self.concat_channels,
            out_channels=out_channels or channels,
            block_out_channels=tuple(int(c) for c in block_out_channels),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            layers_per_block=layers_per_block,
            cross_attention_dim=self.cross_attention_dim,
            norm_num_groups=norm_groups,
            time_cond_proj_dim=None if pooled_dim is None else int(pooled_dim),
            **unet_kwargs,
        )
        # channel order: the item's C, the wrapper's own extras, then cond.concat (see forward)
        zero_input_channels(self.unet.conv_in, channels + extra_in_channels, self.concat_channels)

    def _extras(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.named_children() if name != "unet" and m.state_dict()}

    def save_pretrained(self, directory: str | Path) -> None:
        """diffusers' layout (``config.json`` + safetensors), extra modules as ``<name>.safetensors`` beside it."""
        self.unet.save_pretrained(str(directory), safe_serialization=True)
        for name, module in self._extras().items():
            save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                      Path(directory) / f"{name}.safetensors")

    def load_pretrained(self, directory: str | Path) -> None:
        """Load what :meth:`save_pretrained` wrote (strict: every key must match)."""
        self.unet.load_state_dict(load_file(Path(directory) / self.weights_name))
        for name, module in self._extras().items():
            module.load_state_dict(load_file(Path(directory) / f"{name}.safetensors"))
