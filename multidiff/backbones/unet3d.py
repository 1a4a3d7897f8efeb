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
from pathlib import Path

import torch
from torch import Tensor, nn

from multidiff.backbones.base import Backbone
from multidiff.core.cond import Cond

log = logging.getLogger(__name__)

TEMPORAL_KEYS = ("temp_convs.", "temp_attentions.", "transformer_in.")
"""Parameter-name fragments of the temporal layers (everything else is spatial)."""
NEW_CONDITION_KEYS = ("time_embedding.cond_proj.",)
"""Weights the video model may have beyond the image model's (``pooled_cond``); inflated as zeros."""


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


class UNet3DCond(Backbone):
    """diffusers ``UNet3DConditionModel`` with text cross-attention; ``forward(x, c_noise, cond)``.

    ``x`` is ``(B, C, T, H, W)``; ``cond.tokens`` ``(B, L, cross_attention_dim)`` feed the spatial
    cross-attention of every frame with ``cond.mask`` ``(B, L)`` masking the padding; with
    ``num_class_embeds``, ``cond.labels`` ``(B,)`` become one learned token. Any ``T`` works (the
    temporal layers are convolutions and attention), so a model trained on 8 frames can be asked
    for 16. Keep ``CrossAttn*`` blocks at low resolutions: attention is the CPU's bottleneck.

    Args:
        attention_head_dim: channels per attention head: a block of width ``w`` has
            ``w / attention_head_dim`` heads (in ``UNet3DConditionModel`` this really is the head
            width, while ``UNet2DConditionModel`` reads the same name as a head *count*).
        norm_num_groups: group-norm groups; must divide every block width.
        init_from: a trained 2-D image model to inflate (an exported ``RUN/model`` directory, its
            ``backbone/`` folder or the ``.safetensors`` file of a ``UNet2DCond``) with the same
            widths, layers and attention placement; ``None`` starts from random weights.
        zero_init_temporal: ``True``: every temporal layer starts as the identity (the temporal
            attention output projections and the last temporal convolutions at zero), so an
            inflated model starts out as the image model on every frame. ``False``: all temporal
            layers start random, so frames interact from the first step (from scratch there is no
            image model to preserve, and identity temporal layers make a clip of independent
            frames that only slowly learns to agree). ``None`` (default): ``True`` exactly when
            ``init_from`` is given.
        pooled_cond: also add ``cond.pooled`` to the timestep embedding (through
            ``time_cond_proj_dim``), a global conditioning path beside cross-attention.
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

    weights_name = "diffusion_pytorch_model.safetensors"

    def __init__(
        self,
        *,
        sample_size: int = 16,
        in_channels: int = 1,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        down_block_types: tuple[str, ...] = ("DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"),
        layers_per_block: int = 1,
        cross_attention_dim: int = 384,
        attention_head_dim: int = 4,
        norm_num_groups: int = 16,
        num_class_embeds: int | None = None,
        init_from: str | None = None,
        zero_init_temporal: bool | None = None,
        pooled_cond: bool = False,
        temporal_conv_depth: int = 4,
        input_temporal_attention: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        from diffusers import UNet3DConditionModel

        self.unet = UNet3DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels or in_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            time_cond_proj_dim=cross_attention_dim if pooled_cond else None,
            **kwargs,
        )
        self.unet.set_attn_processor(_masked_cross_attention_processor())
        prune_temporal_layers(self.unet, temporal_conv_depth, input_temporal_attention)
        self.cross_attention_dim, self.pooled_cond = cross_attention_dim, pooled_cond
        # one learned token per class (+ the null label) for label conditioning
        self.label_tokens = None if num_class_embeds is None else nn.Embedding(num_class_embeds + 1, cross_attention_dim)
        if zero_init_temporal is None:
            zero_init_temporal = init_from is not None
        if zero_init_temporal:
            zero_temporal_outputs(self.unet)
        else:
            randomize_temporal_outputs(self.unet)
        if init_from is not None:
            self.inflate_from(init_from)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:
        """``x`` ``(B, C, T, H, W)``, ``c_noise`` ``(B,)`` -> ``(B, C, T, H, W)``."""
        if x.ndim != 5:
            raise ValueError(f"UNet3DCond takes clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        tokens, mask, pooled = self._tokens(x, cond)
        frames = x.shape[2]
        bias = None
        if mask is not None:  # additive bias as UNet2DConditionModel builds it, repeated for every frame
            bias = ((1 - mask.to(x.dtype)) * -10000.0)[:, None, :].repeat_interleave(frames, dim=0)
        return self.unet(
            x,
            c_noise,
            encoder_hidden_states=tokens.to(x.dtype),
            timestep_cond=pooled,
            cross_attention_kwargs={"encoder_bias": bias},
            return_dict=False,
        )[0]

    def _tokens(self, x: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        b = x.shape[0]
        tokens = mask = pooled = None
        if cond is not None:
            tokens, mask, pooled = cond.tokens, cond.mask, cond.pooled
            if cond.labels is not None and self.label_tokens is not None:
                label = self.label_tokens(cond.labels)[:, None]
                label_mask = torch.ones(b, 1, dtype=torch.bool, device=x.device)
                if tokens is None:
                    tokens, mask = label, None
                else:
                    tokens = torch.cat([tokens.to(label.dtype), label], 1)
                    mask = None if mask is None else torch.cat([mask.bool(), label_mask], 1)
        if tokens is None:  # unconditional: one zero token to attend to
            tokens, mask = x.new_zeros(b, 1, self.cross_attention_dim), None
        if self.pooled_cond:
            pooled = x.new_zeros(b, self.cross_attention_dim) if pooled is None else pooled.to(x.dtype)
        else:
            pooled = None
        return tokens, mask, pooled

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
                "attention_head_dim); the weights are copied, but train the image model with "
                "backbone.attention_head_dim=%s for an exact frame-by-frame start", weights, list(heads),
                list(wanted), list(wanted),
            )

    def save_pretrained(self, directory: str | Path) -> None:
        """diffusers' layout (``config.json`` + safetensors); the label tokens, if any, beside it."""
        from safetensors.torch import save_file

        self.unet.save_pretrained(str(directory), safe_serialization=True)
        if self.label_tokens is not None:
            weight = self.label_tokens.weight.detach().contiguous().cpu()
            save_file({"weight": weight}, Path(directory) / "label_tokens.safetensors")

    def load_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        self.unet.load_state_dict(load_file(Path(directory) / self.weights_name))
        if self.label_tokens is not None:
            self.label_tokens.load_state_dict(load_file(Path(directory) / "label_tokens.safetensors"))


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
    """Zero the output projection of every temporal transformer so it adds nothing at first.

    ``TransformerTemporalModel`` returns ``proj_out(...) + residual``; with ``proj_out = 0`` it is the
    identity, as diffusers' ``TemporalConvLayer`` already is (its last convolution starts at zero).
    Gradients still reach ``proj_out``, so the temporal layers learn from the first step.
    """
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    for module in unet.modules():
        if isinstance(module, TransformerTemporalModel):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)


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
