"""A space-time factorized UNet for clips: diffusers' ``UNet3DConditionModel`` behind the backbone signature.

``UNet3DConditionModel`` (ModelScope text-to-video) runs every spatial layer (2-D resnets, 2-D
self/cross-attention transformers, down/upsamplers) frame by frame and interleaves temporal layers
between them: a temporal convolution after every resnet and a temporal self-attention after every
spatial transformer. Its spatial layers carry the same names as ``UNet2DConditionModel``'s, so a
trained 2-D image model can be *inflated* into it (``init_from``): spatial weights are copied and
the temporal layers start as the identity, so the video model starts out as the image model
applied to every frame -- how text-to-video models are trained from image models (Make-A-Video,
ModelScope, AnimateDiff).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from multidiff.backbones.conditioning import LabelEmbedding, attention_bias, attention_context, pooled_vector
from multidiff.backbones.diffusers_unet import DiffusersUNet
from multidiff.core.cond import Cond

log = logging.getLogger(__name__)

TEMPORAL_KEYS = ("temp_convs.", "temp_attentions.", "transformer_in.")
"""Parameter-name fragments of the temporal layers (everything else is spatial)."""
NEW_CONDITION_KEYS = ("time_embedding.cond_proj.",)
"""Weights the video model may have beyond the image model's (``pooled_dim``); inflated as zeros."""


class InflationError(ValueError):
    """An image model's weights do not fit the video backbone; the message says what differs."""


def _masked_cross_attention_processor():
    """diffusers' SDPA processor plus the text padding mask in cross-attention.

    ``UNet3DConditionModel`` takes no ``encoder_attention_mask`` and its blocks ignore
    ``attention_mask``, so padding tokens would be attended to. This processor receives the mask
    as an additive bias through ``cross_attention_kwargs`` (which diffusers hands to every
    processor) and applies it only where keys come from the text (cross-attention).
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MaskedCrossAttnProcessor(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     encoder_bias: Tensor | None = None):
            if encoder_hidden_states is not None and encoder_bias is not None:
                attention_mask = encoder_bias
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    return MaskedCrossAttnProcessor()


class UNet3DCond(DiffusersUNet):
    """diffusers ``UNet3DConditionModel`` with text cross-attention; ``forward(x, c_noise, cond)``.

    Takes items ``shape = (C, T, H, W)``; ``x`` is ``(B, C, T, H, W)`` of any ``T, H, W`` (the
    temporal layers are convolutions and attention, so a model trained on 8 frames can be asked
    for 16). ``cond.tokens`` ``(B, L, cross_attention_dim)`` feed the spatial cross-attention of
    every frame with ``cond.mask`` ``(B, L)`` masking the padding; with ``num_classes``,
    ``cond.labels`` ``(B,)`` (none given: the null label) become one learned token after the text.
    Keep ``CrossAttn*`` blocks at low resolutions: attention is the CPU's bottleneck.

    Args:
        head_dim: channels per attention head: a block of width ``w`` has ``w / head_dim`` heads,
            and the input temporal transformer has 8 heads of this width (diffusers calls it
            ``attention_head_dim``, which here really is the head width, while
            ``UNet2DConditionModel`` reads the same name as a head *count*).
        norm_groups: group-norm groups; must divide every block width.
        init_from: a trained 2-D image model to inflate in :meth:`prepare_training` (an exported
            ``RUN/model`` directory, its ``backbone/`` folder or the ``.safetensors`` file of a
            ``UNet2DCond``) with the same widths, layers and attention placement; ``None`` starts
            from random weights. The constructor never reads it, so a trained model loads without it.
        zero_init_temporal: ``True``: :meth:`prepare_training` sets every temporal layer to the
            identity (the temporal attention output projections and the last temporal convolutions
            at zero), so an inflated model starts out as the image model on every frame.
            ``False``: all temporal layers stay random, so frames interact from the first step
            (from scratch there is no image model to preserve, and identity temporal layers make a
            clip of independent frames that only slowly learns to agree). ``None`` (default):
            ``True`` exactly when ``init_from`` is given.
        pooled_dim: width of ``cond.pooled`` to add to the timestep embedding (through
            ``time_cond_proj_dim``), a global conditioning path beside cross-attention; ``None``: off.
        temporal_conv_depth: convolutions in each of diffusers' ``TemporalConvLayer`` s (it has 4,
            each GroupNorm + SiLU + a 3-tap conv over time; fewer keep the first ``depth - 1`` and
            the last). On small clips these layers are most of the cost (about a third of a
            forward pass at the defaults), so fewer buys more steps for the same time.
        input_temporal_attention: keep ``UNet3DConditionModel``'s temporal attention right after
            the input convolution (at full resolution, the costliest attention of the network);
            ``False`` removes it (the temporal convolutions and deeper temporal attentions remain).
            A model saved with either setting loads only with the same setting (the layers are absent
            from its weights), which multidiff's own loading guarantees.
        **kwargs: passed to ``UNet3DConditionModel``.
    """

    ranks = (3,)

    def __init__(
        self,
        *,
        shape: Sequence[int],
        out_channels: int | None = None,
        block_out_channels: Sequence[int] = (32, 64, 64),
        down_block_types: Sequence[str] = ("DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types: Sequence[str] = ("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"),
        layers_per_block: int = 1,
        cross_attention_dim: int = 384,
        head_dim: int = 4,
        norm_groups: int = 16,
        num_classes: int | None = None,
        pooled_dim: int | None = None,
        init_from: str | None = None,
        zero_init_temporal: bool | None = None,
        temporal_conv_depth: int = 4,
        input_temporal_attention: bool = True,
        concat_channels: int = 0,
        **kwargs,
    ) -> None:
        from diffusers import UNet3DConditionModel

        super().__init__(
            shape=shape, unet_class=UNet3DConditionModel, out_channels=out_channels,
            block_out_channels=block_out_channels, down_block_types=down_block_types, up_block_types=up_block_types,
            layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim, norm_groups=norm_groups,
            pooled_dim=pooled_dim, attention_head_dim=head_dim, concat_channels=concat_channels, **kwargs,
        )
        self.unet.set_attn_processor(_masked_cross_attention_processor())
        prune_temporal_layers(self.unet, temporal_conv_depth, input_temporal_attention)
        # UNet3DConditionModel has no class embedding: a label becomes one learned cross-attention token
        self.label_tokens = None if num_classes is None else LabelEmbedding(num_classes, self.cross_attention_dim)
        self.init_from = None if init_from is None else str(init_from)
        self.zero_init_temporal = init_from is not None if zero_init_temporal is None else bool(zero_init_temporal)
        if not self.zero_init_temporal:
            # diffusers zeroes the last temporal convolutions; from scratch they start random. Not drawn
            # when prepare_training zeroes them anyway, so the global random stream stays as it was.
            randomize_temporal_outputs(self.unet)

    @staticmethod
    def check_config(*, init_from: str | None = None, **arguments) -> None:
        """Before anything is built (see :func:`multidiff.configuration.check_config`): ``init_from``
        must hold image model weights."""
        if init_from is not None:
            _weights_file(Path(str(init_from)))

    def prepare_training(self) -> None:
        """Identity temporal layers (``zero_init_temporal``), then inflation from ``init_from`` if set."""
        if self.zero_init_temporal:
            zero_temporal_outputs(self.unet)
        if self.init_from is not None:
            self.inflate_from(self.init_from)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        """``x`` ``(B, C, T, H, W)``, ``c_noise`` ``(B,)`` -> ``(B, C, T, H, W)``."""
        self.check_input(x)
        label = None if self.label_tokens is None else self.label_tokens(cond, x.shape[0])[:, None]
        tokens, mask = attention_context(cond, dim=self.cross_attention_dim, like=x, extra=label)
        return self.unet(
            x,
            c_noise,
            encoder_hidden_states=tokens,
            timestep_cond=pooled_vector(cond, like=x) if self.pooled_dim is not None else None,
            # the padding mask as an additive bias, repeated for every frame (see the processor)
            cross_attention_kwargs={"encoder_bias": attention_bias(mask, dtype=x.dtype, repeat=x.shape[2])},
            return_dict=False,
        )[0]

    def inflate_from(self, source: str | Path) -> None:
        """Copy the spatial weights of a trained ``UNet2DConditionModel`` (see ``init_from``) and keep the
        temporal layers as they are (the identity, with ``zero_init_temporal``).

        2-D ``1x1`` convolution projections of attention blocks become the linear projections the
        3-D blocks use. Every 2-D weight (except a class embedding) must find its 3-D counterpart and
        every 3-D weight left over must be temporal; otherwise :class:`InflationError` says which.
        """
        path = _weights_file(Path(source))
        from safetensors.torch import load_file

        image = {k: v for k, v in load_file(path).items() if not k.startswith("class_embedding.")}
        own = self.unet.state_dict()
        missing = [k for k in image if k not in own]
        mismatched = [k for k in image if k in own and not _same_but_trailing_ones(image[k].shape, own[k].shape)]
        if missing or mismatched:
            raise InflationError(
                f"cannot inflate {path} into this video backbone: {len(missing)} image weight(s) have no "
                f"counterpart (e.g. {missing[:3]}) and {len(mismatched)} differ in shape (e.g. {mismatched[:3]}). "
                "The image model must have the same block_out_channels, layers_per_block, down/up block "
                "types (CrossAttn where the video model has CrossAttn) and cross_attention_dim; "
                "or set backbone.init_from=null to start from random weights"
            )
        new = TEMPORAL_KEYS + NEW_CONDITION_KEYS
        leftover = [k for k in own if k not in image and not any(t in k for t in new)]
        if leftover:
            raise InflationError(
                f"cannot inflate {path}: spatial weight(s) {leftover[:3]} of the video backbone are not in the "
                "image model; give both the same down/up block types, or set backbone.init_from=null"
            )
        self._check_heads(path)
        own.update({k: v.reshape(own[k].shape).to(own[k].dtype) for k, v in image.items()})
        for k in own:  # a conditioning path the image model lacked starts switched off
            if k not in image and any(t in k for t in NEW_CONDITION_KEYS):
                own[k] = torch.zeros_like(own[k])
        self.unet.load_state_dict(own)
        log.info("inflated %d spatial tensors from %s; %d temporal tensors kept", len(image), path, len(own) - len(image))

    def _check_heads(self, weights: Path) -> None:
        """Warn when the image model splits attention into other heads: the weights still fit, but
        the inflated model then differs from the image model applied frame by frame."""
        import json

        config = weights.parent / "config.json"
        if not config.is_file():
            return
        image_cfg = json.loads(config.read_text())
        widths = tuple(self.unet.config.block_out_channels)
        heads = image_cfg.get("num_attention_heads") or image_cfg.get("attention_head_dim")
        heads = tuple(heads) if isinstance(heads, list | tuple) else (heads,) * len(widths)
        wanted = tuple(w // self.unet.config.attention_head_dim for w in widths)
        if heads != wanted:
            log.warning(
                "%s splits attention into %s heads per block, this video backbone into %s (width / "
                "head_dim); the weights are copied, but train the image model with "
                "backbone.num_heads=%s for an exact frame-by-frame start", weights, list(heads),
                list(wanted), list(wanted),
            )


class _NoTemporalAttention(nn.Module):
    """Stands in for ``UNet3DConditionModel.transformer_in``: returns its input (as ``(x,)``)."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor]:
        return (hidden_states,)


def prune_temporal_layers(unet: nn.Module, conv_depth: int = 4, input_attention: bool = True) -> None:
    """Keep ``conv_depth`` of the 4 convolutions of every ``TemporalConvLayer`` (the first
    ``conv_depth - 1`` and the last) and, with ``input_attention=False``, drop the input temporal
    transformer. The defaults leave diffusers' network as it is."""
    from diffusers.models.resnet import TemporalConvLayer

    if not (isinstance(conv_depth, int) and 1 <= conv_depth <= 4):
        raise ValueError(f"backbone.temporal_conv_depth must be 1, 2, 3 or 4 (diffusers' full layer), got {conv_depth!r}")
    if conv_depth < 4:
        for module in unet.modules():
            if isinstance(module, TemporalConvLayer):
                for name in ("conv1", "conv2", "conv3")[conv_depth - 1 :]:
                    setattr(module, name, nn.Identity())
    if not input_attention:
        unet.transformer_in = _NoTemporalAttention()


def zero_temporal_outputs(unet: nn.Module) -> None:
    """Make every temporal layer the identity: zero the output projection of each temporal
    transformer and the last convolution of each ``TemporalConvLayer``.

    ``TransformerTemporalModel`` returns ``proj_out(...) + residual`` and ``TemporalConvLayer``
    returns ``identity + conv4(...)``; with those at zero both add nothing at first (diffusers
    itself starts ``conv4`` at zero; zeroing it again keeps this true after any re-initialisation).
    Gradients still reach them, so the temporal layers learn from the first step.
    """
    from diffusers.models.resnet import TemporalConvLayer
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    for module in unet.modules():
        out = (module.proj_out if isinstance(module, TransformerTemporalModel)
               else module.conv4[-1] if isinstance(module, TemporalConvLayer) else None)
        if out is not None:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)


def randomize_temporal_outputs(unet: nn.Module) -> None:
    """Give the last convolution of every ``TemporalConvLayer`` (which diffusers zeroes) PyTorch's
    default random initialization, so the temporal convolutions mix frames from the first step."""
    from diffusers.models.resnet import TemporalConvLayer

    for module in unet.modules():
        if isinstance(module, TemporalConvLayer):
            module.conv4[-1].reset_parameters()


def _same_but_trailing_ones(a: torch.Size, b: torch.Size) -> bool:
    """Equal shapes, or a ``1x1`` convolution ``(o, i, 1, 1)`` against a linear ``(o, i)``."""
    strip = lambda s: tuple(s[:2]) if len(s) > 2 and all(d == 1 for d in s[2:]) else tuple(s)  # noqa: E731
    return tuple(a) == tuple(b) or strip(a) == strip(b)


def _weights_file(source: Path) -> Path:
    """The safetensors file of an image model given as RUN/model, RUN/model/backbone or the file."""
    for candidate in (source, source / "diffusion_pytorch_model.safetensors",
                      source / "backbone" / "diffusion_pytorch_model.safetensors"):
        if candidate.is_file():
            return candidate
    raise InflationError(
        f"backbone.init_from={source} holds no image model weights (looked for the file itself, "
        "diffusion_pytorch_model.safetensors and backbone/diffusion_pytorch_model.safetensors); point it "
        "at an exported image model (RUN/model) or set backbone.init_from=null"
    )
