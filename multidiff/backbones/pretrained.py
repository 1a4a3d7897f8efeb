"""A published diffusers UNet (an imported pipeline's ``unet/`` folder) behind the backbone signature."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from multidiff.backbones.base import Backbone, BackboneShapeError
from multidiff.backbones.conditioning import attention_context
from multidiff.backbones.unet import padded_call
from multidiff.core.cond import Cond


class PretrainedUNet2D(Backbone):
    """diffusers' ``UNet2DConditionModel`` as saved in ``path`` (config and safetensors weights), unchanged.

    Where :class:`~multidiff.backbones.unet.UNet2DCond` builds a new UNet from multidiff's options,
    this one keeps a published network as it is (Stable Diffusion's ``unet/``): its input channels
    must be the latent channels, ``cond.tokens`` feed its cross-attention (``cond.mask`` only where
    the text conditioner masks padding) and ``c_noise`` is its timestep. A discrete-time network was
    trained on integer timesteps only, so a ``c_noise`` within ``integer_tolerance`` of an integer is
    rounded to it (the sigma -> t map of a float32 grid lands within ~1e-3 of the integer timestep
    diffusers passes); other values (a Karras grid's) pass through. Sizes that are not a multiple
    of the UNet's downsampling are padded and cropped back.
    """

    ranks = (2,)
    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(self, *, shape: Sequence[int], path: str | Path, integer_tolerance: float = 1e-2,
                 concat_channels: int = 0) -> None:
        super().__init__(shape=shape, concat_channels=concat_channels)
        from diffusers import UNet2DConditionModel
        from diffusers.utils import is_accelerate_available

        path = Path(path)
        config = read_unet_config(path)
        if int(config["in_channels"]) != self.input_channels:
            raise BackboneShapeError(
                f"the UNet in {path} takes {config['in_channels']} input channels but this model's latents have "
                f"{self.input_channels}: the pipeline's unet/ and vae/ do not belong together")
        self.path, self.integer_tolerance = path, float(integer_tolerance)
        # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints advice
        self.unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                         low_cpu_mem_usage=is_accelerate_available())
        self.cross_attention_dim = int(self.unet.config.cross_attention_dim)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.unet.config.down_block_types) - 1)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        self.check_input(x)
        t = c_noise
        if self.integer_tolerance > 0:
            near = (t - t.round()).abs() <= self.integer_tolerance
            t = torch.where(near, t.round(), t)
        return padded_call(lambda padded: self._forward(padded, t, cond), x, self.size_multiple)

    def _forward(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        tokens, mask = attention_context(cond, dim=self.cross_attention_dim, like=x)
        if mask is not None and bool(mask.all()):
            mask = None  # every token real (Stable Diffusion's padding=keep): no mask, as diffusers runs it
        return self.unet(x, t, encoder_hidden_states=tokens,
                         encoder_attention_mask=None if mask is None else mask.to(x.dtype), return_dict=False)[0]

    def save_pretrained(self, directory: str | Path) -> None:
        """diffusers' layout (``config.json`` + safetensors), loadable by ``UNet2DConditionModel.from_pretrained``."""
        self.unet.save_pretrained(str(directory), safe_serialization=True)

    def load_pretrained(self, directory: str | Path) -> None:
        self.unet.load_state_dict(load_file(Path(directory) / self.weights_name))


def read_unet_config(path: Path) -> dict:
    """``path/config.json`` of a ``UNet2DConditionModel``, or a one-paragraph error."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BackboneShapeError(f"cannot read the UNet config {file} ({e}); it must be the config.json that "
                                 "diffusers' UNet2DConditionModel.save_pretrained writes") from None
    if config.get("_class_name") != "UNet2DConditionModel":
        raise BackboneShapeError(f"{file} describes a {config.get('_class_name')!r}, not a UNet2DConditionModel")
    return config
