"""Published diffusers denoisers (an imported pipeline's ``unet/`` or ``transformer/`` folder) behind
the backbone signature, unchanged."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
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
        self.path, self.integer_tolerance = Path(path), float(integer_tolerance)
        self.unet = load_published(self.path, "UNet2DConditionModel", "unet/", self.input_channels)
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


class PretrainedWanTransformer(Backbone):
    """diffusers' ``WanTransformer3DModel`` (Wan 2.1's text-to-video DiT) as saved in ``path``, unchanged.

    Items are latent clips ``(C, T, H, W)``; sizes that are not a multiple of its patch are padded
    (replicate) and cropped back. ``cond.tokens`` feed its cross-attention as they are: Wan was
    trained attending to every position of its fixed-length text, the padding zeroed (the text
    conditioner's ``padding=mask`` makes exactly those tokens), so ``cond.mask`` is not applied.
    ``c_noise`` is its timestep, ``1000 t`` for flow time ``t``; with ``truncate_timesteps`` it is cut
    to an integer as diffusers' multistep schedulers (UniPC, DPM-Solver) hand it over (int64 timesteps,
    so 999.999 becomes 999), which the import sets where the pipeline ships one of those, for parity.
    """

    ranks = (3,)
    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(self, *, shape: Sequence[int], path: str | Path, truncate_timesteps: bool = False,
                 concat_channels: int = 0) -> None:
        super().__init__(shape=shape, concat_channels=concat_channels)
        self.path, self.truncate_timesteps = Path(path), bool(truncate_timesteps)
        self.transformer = load_published(self.path, "WanTransformer3DModel", "transformer/", self.input_channels)
        self.text_dim = int(self.transformer.config.text_dim)
        self.patch = tuple(int(p) for p in self.transformer.config.patch_size)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        self.check_input(x)
        dims = x.shape[2:]
        pad = [-d % p for d, p in zip(dims, self.patch)]
        if any(pad):
            x = F.pad(x, [q for p in reversed(pad) for q in (0, p)], mode="replicate")
        tokens, _ = attention_context(cond, dim=self.text_dim, like=x)
        t = c_noise
        if self.truncate_timesteps:  # float32 lands within ~1e-4 of an integer that diffusers computes exactly
            t = (t.double() + 2e-4).floor()
        out = self.transformer(hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=tokens,
                               return_dict=False)[0]
        return out[(..., *(slice(0, d) for d in dims))]

    def save_pretrained(self, directory: str | Path) -> None:
        """diffusers' layout, loadable by ``WanTransformer3DModel.from_pretrained``."""
        self.transformer.save_pretrained(str(directory), safe_serialization=True)

    def load_pretrained(self, directory: str | Path) -> None:
        self.transformer.load_state_dict(load_file(Path(directory) / self.weights_name))


class PretrainedStableAudioDiT(Backbone):
    """diffusers' ``StableAudioDiTModel`` with its pipeline's ``StableAudioProjectionModel``
    (``projection_path``), both unchanged: Stable Audio's denoiser and duration conditioning.

    Items are latent sequences ``(C, L)``, any length. The projection maps the text tokens
    (``cond.tokens``, padding zeroed by ``cond.mask``) to the DiT's width and turns the condition's
    ``seconds`` (start, end; the whole item, ``L * seconds_per_position``, where the condition has
    none) into two more cross-attention tokens and the global embedding, as ``StableAudioPipeline``
    does. A condition with no real token (the text conditioner's ``null=zeros``) is Stable Audio's
    unconditional branch: every cross-attention token zero, the seconds' global embedding kept.
    ``c_noise`` is its timestep (the EDM parameterization's ``atan`` map for the published model).
    """

    ranks = (1,)
    weights_name = "diffusion_pytorch_model.safetensors"
    projection_folder = "projection_model"

    def __init__(self, *, shape: Sequence[int], path: str | Path, projection_path: str | Path,
                 seconds_per_position: float, concat_channels: int = 0) -> None:
        super().__init__(shape=shape, concat_channels=concat_channels)
        from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel

        self.path, self.projection_path = Path(path), Path(projection_path)
        self.seconds_per_position = float(seconds_per_position)
        self.transformer = load_published(self.path, "StableAudioDiTModel", "transformer/", self.input_channels)
        read_model_config(self.projection_path, "StableAudioProjectionModel")
        self.projection = StableAudioProjectionModel.from_pretrained(self.projection_path, local_files_only=True,
                                                                     use_safetensors=True)
        self.text_dim = int(self.projection.config.text_encoder_dim)
        self.head_dim = int(self.transformer.config.attention_head_dim)
        self._rotary: dict[int, tuple[Tensor, Tensor]] = {}

    def rotary(self, length: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The rotary table over the global token and ``length`` positions, as the pipeline builds it."""
        if length not in self._rotary:
            from diffusers.models.embeddings import get_1d_rotary_pos_embed

            self._rotary[length] = get_1d_rotary_pos_embed(self.head_dim // 2, length + 1, use_real=True,
                                                           repeat_interleave_real=False)
        return tuple(t.to(like.device) for t in self._rotary[length])

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        self.check_input(x)
        b, length = x.shape[0], x.shape[-1]
        dtype = self.projection.dtype
        if cond is not None and cond.seconds is not None:
            seconds = cond.seconds.to(device=x.device, dtype=torch.float32)
        else:
            seconds = x.new_tensor([[0.0, length * self.seconds_per_position]], dtype=torch.float32).expand(b, 2)
        start = self.projection.start_number_conditioner(seconds[:, 0])
        end = self.projection.end_number_conditioner(seconds[:, 1])
        if cond is not None and cond.tokens is not None:
            tokens = cond.tokens.to(device=x.device, dtype=dtype)
            if tokens.shape[-1] != self.text_dim:
                raise BackboneShapeError(f"the text tokens are {tokens.shape[-1]} wide but the projection model in "
                                         f"{self.projection_path} takes {self.text_dim}-wide ones: the pipeline's "
                                         "text_encoder/ and projection_model/ do not belong together")
            mask = cond.mask.to(x.device) if cond.mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool,
                                                                                   device=x.device)
            text = self.projection.text_projection(tokens) * mask[..., None].to(dtype)
            real = mask.any(1)
        else:  # no prompt: the unconditional branch
            text, real = start.new_zeros(b, 0, start.shape[-1]), torch.zeros(b, dtype=torch.bool, device=x.device)
        context = torch.cat([text, start, end], dim=1) * real[:, None, None].to(dtype)
        out = self.transformer(x, c_noise.to(x.dtype), encoder_hidden_states=context.to(x.dtype),
                               global_hidden_states=torch.cat([start, end], dim=2).to(x.dtype),
                               rotary_embedding=self.rotary(length, x), return_dict=False)[0]
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        """diffusers' layout: the DiT in ``directory``, the projection model in ``directory/projection_model``."""
        self.transformer.save_pretrained(str(directory), safe_serialization=True)
        self.projection.save_pretrained(str(Path(directory) / self.projection_folder), safe_serialization=True)

    def load_pretrained(self, directory: str | Path) -> None:
        self.transformer.load_state_dict(load_file(Path(directory) / self.weights_name))
        self.projection.load_state_dict(load_file(Path(directory) / self.projection_folder / self.weights_name))


def load_published(path: Path, class_name: str, folder: str, input_channels: int):
    """The diffusers ``class_name`` saved in ``path`` (safetensors only, nothing downloaded), after
    checking that it takes ``input_channels`` channels (the latents of the pipeline's ``vae/``)."""
    import diffusers
    from diffusers.utils import is_accelerate_available

    config = read_model_config(path, class_name)
    if int(config["in_channels"]) != input_channels:
        raise BackboneShapeError(
            f"the {class_name} in {path} takes {config['in_channels']} input channels but this model's latents have "
            f"{input_channels}: the pipeline's {folder} and vae/ do not belong together")
    # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints advice
    return getattr(diffusers, class_name).from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                          low_cpu_mem_usage=is_accelerate_available())


def read_model_config(path: Path, class_name: str) -> dict:
    """``path/config.json`` of a saved diffusers ``class_name``, or a one-paragraph error."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BackboneShapeError(f"cannot read the model config {file} ({e}); it must be the config.json that "
                                 f"diffusers' {class_name}.save_pretrained writes") from None
    if config.get("_class_name") != class_name:
        raise BackboneShapeError(f"{file} describes a {config.get('_class_name')!r}, not a {class_name}")
    return config


def read_unet_config(path: Path) -> dict:
    """``path/config.json`` of a ``UNet2DConditionModel``, or a one-paragraph error."""
    return read_model_config(path, "UNet2DConditionModel")
