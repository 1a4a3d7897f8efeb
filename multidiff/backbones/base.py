"""The backbone contract, its shape check, its weight I/O and the upgrade of old backbone configs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from multidiff.core.cond import Cond

# Built-in backbone configs per item rank: what a shape error suggests instead.
_CONFIGS_FOR_RANK = {1: "backbone=convunet1d or backbone=dit_small", 2: "backbone=unet2d_small or backbone=convunet2d",
                     3: "backbone=unet3d_small or backbone=convunet3d"}


class BackboneShapeError(ValueError):
    """A backbone cannot take items (or a batch) of the shape it was given; the message says what fits."""


class Backbone(nn.Module):
    """Base class of every backbone: the network inside a :class:`~multidiff.core.denoiser.Denoiser`.

    **Constructor**: keyword-only, ``__init__(self, *, shape, **options)``. ``shape`` is
    ``(C, *dims)`` of one model tensor, as the adapter produces it (an image ``(1, 16, 16)``, a
    log-mel ``(1, 128, 16)``, a clip ``(1, 8, 16, 16)``, a series ``(2, 128)``): the model
    builder passes it, so a config never sizes a network. Call ``super().__init__(shape=shape)``
    first; it checks the rank against :attr:`ranks` (raising :class:`BackboneShapeError`) and
    keeps the shape as :attr:`shape` (``shape[0]`` is the channel count). The other options come
    from the ``backbone`` config (``_target_`` + keyword arguments), so keep them plain. Spell
    shared concepts as every built-in backbone does: ``cross_attention_dim`` (width of
    ``cond.tokens``), ``pooled_dim`` (width of ``cond.pooled``, ``None``: ignore it),
    ``num_classes`` (label ``num_classes`` is the null label), ``norm_groups``, ``num_heads``
    (a head count) or ``head_dim`` (a head width), ``out_channels`` (default ``shape[0]``).
    :mod:`multidiff.backbones.conditioning` implements these conventions.

    **Mask conditioning** (``editing=masked``): the builder passes ``concat_channels=K``; the
    denoiser then hands ``forward`` batches of ``C + K`` channels (the noisy sample, then
    ``cond.concat``: an editing mask and the known values). Pass it to ``super().__init__``,
    widen the input layer by :attr:`concat_channels` and zero those weights (so the model starts
    as the one without them and a trained model can be extended, see :func:`load_widened`). A
    backbone whose constructor has no ``concat_channels`` cannot be mask-conditioned.

    **Class attribute** :attr:`ranks`: the item ranks ``len(dims)`` the class accepts, e.g.
    ``(2,)`` for images and spectrograms, ``(1, 2, 3)`` for a rank-agnostic network. Anything else
    the network truly needs of the shape (a size it cannot pad to, say) is refused in the
    constructor with a :class:`BackboneShapeError` that names the shape and the config key to
    change; :meth:`check_input` refuses a batch of another rank or channel count in ``forward``.

    **Required**: ``forward(x, c_noise, cond) -> Tensor``

    - ``x``: ``(B, C, *dims)``, the noisy sample already scaled by the parameterization's ``c_in``;
    - ``c_noise``: ``(B,)`` float32, what the parameterization says the network should see of the
      noise level (a timestep in ``[0, 1000)`` for VP models, ``ln(sigma) / 4`` for EDM,
      ``1000 t`` for flow matching): embed it, e.g. sinusoidally;
    - ``cond``: a :class:`~multidiff.core.cond.Cond` (``tokens (B, L, D)`` + ``mask (B, L)``,
      ``pooled (B, D)``, ``labels (B,)``; any may be ``None``) or ``None`` (unconditional);
    - returns a tensor shaped like ``x`` (the parameterization decides what it predicts).

    **Optional**:

    - ``prepare_training()``: training-only initialisation, called once by the training builder
      after construction and before the first step, never when a trained model is loaded (its
      weights replace whatever it would set). Read files there (e.g. an image model to inflate
      from), not in the constructor, so a trained model loads without them. Default: nothing.
    - ``save_pretrained(directory)`` / ``load_pretrained(directory)`` write and read the weights
      as ``model.safetensors`` (no pickle); the diffusers wrappers use diffusers' own format.

    A minimal backbone (tests/test_backbones.py builds it)::

        class PointwiseNet(Backbone):
            ranks = (1,)  # items (C, L)

            def __init__(self, *, shape, width: int = 64) -> None:
                super().__init__(shape=shape)
                self.inp, self.out = nn.Conv1d(self.shape[0], width, 1), nn.Conv1d(width, self.shape[0], 1)
                self.noise = NoiseEmbedding(width, width)  # from multidiff.backbones.conditioning

            def forward(self, x, c_noise, cond):
                self.check_input(x)
                return self.out(torch.relu(self.inp(x) + self.noise(c_noise, x.shape[0])[..., None]))

    :class:`~multidiff.backbones.convunet.ConvUNet` serves data of rank 1, 2 or 3 without a
    network of your own.
    """

    weights_name = "model.safetensors"
    ranks: ClassVar[tuple[int, ...]] = ()
    """Item ranks ``len(shape) - 1`` this backbone accepts (empty: any)."""

    def __init__(self, *, shape: Sequence[int], concat_channels: int = 0) -> None:
        super().__init__()
        self.shape = self.check_shape(shape)
        if isinstance(concat_channels, bool) or not isinstance(concat_channels, int) or concat_channels < 0:
            raise BackboneShapeError(f"{type(self).__name__}: concat_channels must be an integer >= 0, got {concat_channels!r}")
        self.concat_channels = concat_channels

    @property
    def input_channels(self) -> int:
        """Channels of the batches ``forward`` takes: the item's ``C`` plus :attr:`concat_channels`."""
        return self.shape[0] + self.concat_channels

    @classmethod
    def check_shape(cls, shape: Sequence[int]) -> tuple[int, ...]:
        """``shape`` as a tuple of ints, or :class:`BackboneShapeError` naming the fix."""
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise BackboneShapeError(f"{cls.__name__} needs shape=(C, *dims) of one item, a list of sizes; got {shape!r}") from None
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise BackboneShapeError(
                f"{cls.__name__} was given items of shape {shape}, but an item is (C, *dims) with at least one "
                "spatial axis and every size >= 1; the adapter's shape sets it (check the modality's options)"
            )
        rank = len(shape) - 1
        if cls.ranks and rank not in cls.ranks:
            wanted = " or ".join(str(r) for r in cls.ranks)
            fix = (f"choose {_CONFIGS_FOR_RANK[rank]} for rank-{rank} items" if rank in _CONFIGS_FOR_RANK
                   else f"backbone=dit_small (a transformer over patches of any rank) takes rank-{rank} items")
            raise BackboneShapeError(
                f"{cls.__name__} was given items of shape {shape} (rank {rank}: C={shape[0]} and {rank} data "
                f"axes), but it takes items of rank {wanted} only; {fix} (docs/new_modality.md lists the backbones)"
            )
        return shape

    def check_input(self, x: Tensor) -> None:
        """Refuse a batch whose rank or channel count differs from :attr:`shape` (plus
        :attr:`concat_channels`); sizes may differ."""
        if x.ndim != len(self.shape) + 1 or x.shape[1] != self.input_channels:
            extra = f" ({self.shape[0]} + {self.concat_channels} concatenated)" if self.concat_channels else ""
            raise BackboneShapeError(
                f"{type(self).__name__} was built for items of shape {self.shape}, i.e. batches (B, {self.input_channels}"
                f"{extra}, {', '.join('n' * (len(self.shape) - 1))}) of any sizes, but got a batch of shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:  # pragma: no cover
        """``(B, C, *dims)``, ``(B,)``, ``Cond | None`` -> ``(B, C_out, *dims)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, c_noise, cond)")

    def prepare_training(self) -> None:
        """Training-only initialisation before the first step (see the class docstring); none by default."""

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/model.safetensors`` (the state dict, on CPU, contiguous)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, directory / self.weights_name)

    def load_pretrained(self, directory: str | Path) -> None:
        """Load the weights :meth:`save_pretrained` wrote (strict: every key must match)."""
        self.load_state_dict(load_file(Path(directory) / self.weights_name))


# Old key -> new key, per backbone class; what now comes from the shape is dropped for all.
_RENAMED = {"num_class_embeds": "num_classes", "norm_num_groups": "norm_groups"}
_HEADS = {"UNet2DCond": "num_heads", "UNet3DCond": "head_dim"}  # diffusers' attention_head_dim means either
_FROM_SHAPE = ("in_channels", "sample_size", "dims")


def upgrade_backbone_config(node: dict[str, Any]) -> dict[str, Any]:
    """A backbone config written before the shape flowed from the adapter, in today's keys.

    Drops ``in_channels``, ``sample_size`` and ``dims`` (the model builder passes ``shape``),
    renames ``num_class_embeds`` -> ``num_classes``, ``norm_num_groups`` -> ``norm_groups``,
    ``attention_head_dim`` -> ``num_heads`` (``UNet2DCond``: a head count there) or ``head_dim``
    (``UNet3DCond``: a head width there) and ``pooled_cond: true|false`` -> ``pooled_dim:
    cross_attention_dim|None``. Only ``multidiff.backbones.`` targets change; a new-style config
    comes back equal. The input is not modified.
    """
    node = dict(node)
    target = str(node.get("_target_", ""))
    if not target.startswith("multidiff.backbones."):
        return node
    for key in _FROM_SHAPE:
        node.pop(key, None)
    for old, new in _RENAMED.items():
        if old in node:
            node[new] = node.pop(old)
    heads = _HEADS.get(target.rsplit(".", 1)[-1])
    if heads and "attention_head_dim" in node:
        node[heads] = node.pop("attention_head_dim")
    if "pooled_cond" in node:
        # pooled_cond projected a vector as wide as the tokens; 384 is the constructors' default width
        node["pooled_dim"] = node.get("cross_attention_dim", 384) if node.pop("pooled_cond") else None
    return node


def zero_input_channels(conv: nn.Module, start: int, count: int) -> None:
    """Zero the weights of input channels ``start .. start + count`` of a convolution (or linear)
    layer: inputs added for mask conditioning then change nothing until training uses them."""
    if count:
        with torch.no_grad():
            conv.weight[:, start : start + count].zero_()


class WidenError(ValueError):
    """Weights cannot start a backbone of another layout (see :func:`load_widened`)."""


def load_widened(backbone: nn.Module, state: dict[str, Tensor], *, source: str = "the source model") -> list[str]:
    """Load ``state`` (a trained backbone's state dict) into ``backbone``, which may take more input
    channels (mask conditioning added): a weight whose input axis (dim 1) is wider here gets the
    trained values in its first channels and zeros in the new ones. Every other weight must match
    exactly. Returns the names of the widened weights; :class:`WidenError` names what differs."""
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise WidenError(f"{source} has another layout than this backbone: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; extend a model with the same backbone config")
    widened, out = [], {}
    for name, mine in own.items():
        theirs = state[name]
        if theirs.shape == mine.shape:
            out[name] = theirs
        elif theirs.ndim == mine.ndim >= 2 and theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:] \
                and theirs.shape[1] < mine.shape[1]:
            grown = torch.zeros_like(mine)
            grown[:, : theirs.shape[1]] = theirs
            out[name], _ = grown, widened.append(name)
        else:
            raise WidenError(f"{source}: weight {name} has shape {tuple(theirs.shape)}, this backbone's has "
                             f"{tuple(mine.shape)}; only input channels may be added")
    backbone.load_state_dict(out)
    return widened
