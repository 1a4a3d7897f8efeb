"""The typed training options (``training.*`` in ``conf/train.yaml``), validated once, here.

:class:`TrainingOptions` is the one definition of what ``training.*`` holds: each field's type,
default and help line (``conf/train.yaml`` documents them and must agree: a test compares the two;
``multidiff train --help`` and ``docs/options.md`` print them), and its rules.
:meth:`TrainingOptions.from_config` reads the config node and raises :class:`OptionError`, one
paragraph naming the key, for an unknown key, a wrong type or a value out of range.
:class:`~multidiff.training.module.DiffusionModule` takes the same object, so a Python user gets
the same checks and messages as the command line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from multidiff.options import OptionError, Options

__all__ = ["LoraOptions", "OptionError", "TrainingOptions"]

SIGNALS = ("SIGTERM", "SIGINT", "SIGKILL", "SIGUSR1")


@dataclass(frozen=True)
class TrainingOptions(Options):
    """What ``training.*`` may hold; ``conf/train.yaml`` explains each key."""

    PREFIX = "training."
    WHERE = "conf/train.yaml explains each"

    ema_decay: float = 0.999
    """maximum EMA decay, in [0, 1); the EMA weights are sampled and exported."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """scale optimizer.lr by global_batch / base_batch_size (linear) or its square root (sqrt)."""
    base_batch_size: int | None = 64
    """the global batch optimizer.lr was tuned for (null: the run's own global batch)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """a NaN/inf loss or gradient: stop (keeping the last good checkpoint) or skip the step."""
    inject_nan_at_step: int | None = None
    """fault drill: make the loss NaN at this optimizer step."""
    inject_signal_at_step: int | None = None
    """fault drill: send inject_signal to this process at this step."""
    inject_signal: Literal["SIGTERM", "SIGINT", "SIGKILL", "SIGUSR1"] = "SIGTERM"
    """the signal of inject_signal_at_step."""
    slice_items: int = 0
    """items of each per-device batch trained on one slice along slice_dim (0 = off)."""
    slice_dim: int = 1
    """the item axis slice_items slices (1 = the first axis after the channels)."""
    slice_sigma_scale: float = 1.0
    """multiplies the noise levels of the sliced items (1 = unchanged)."""
    channels_last: bool = False
    """channels-last memory format for the trained backbone."""
    compile: bool = False
    """torch.compile the trained backbone's forward."""
    compile_options: dict = field(default_factory=dict)
    """keyword arguments of torch.compile."""

    def rules(self):
        return [
            ("ema_decay", 0 <= self.ema_decay < 1, "a number in [0, 1)"),
            ("base_batch_size", self.base_batch_size is None or self.base_batch_size > 0, "a positive integer or null"),
            ("inject_nan_at_step", self.inject_nan_at_step is None or self.inject_nan_at_step >= 0, "a step >= 0 or null"),
            ("inject_signal_at_step", self.inject_signal_at_step is None or self.inject_signal_at_step >= 0,
             "a step >= 0 or null"),
            ("slice_items", self.slice_items >= 0, "a whole number >= 0 (0 = off)"),
            ("slice_dim", self.slice_dim >= 1, "an item axis >= 1 (0 is the channels)"),
            ("slice_sigma_scale", math.isfinite(self.slice_sigma_scale) and self.slice_sigma_scale > 0,
             "a number > 0 (1 = unchanged)"),
        ]

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> TrainingOptions:
        """Options from the ``training`` config node (a dict or DictConfig; missing keys take the defaults)."""
        return cls.from_mapping(node)

    def check_batch(self, batch_size: int, shape: tuple[int, ...]) -> None:
        """Rules that need the per-device batch size and the item shape ``(C, *dims)`` (the builder
        checks them before training; the module checks :meth:`check_shape` on its batches)."""
        if self.slice_items and self.slice_items >= batch_size:
            raise OptionError(
                f"training.slice_items={self.slice_items} is invalid: it must be a whole number from 0 (off) to "
                f"data.batch_size - 1 ({batch_size - 1}); it says how many of each batch's {batch_size} items train "
                "on one slice (e.g. one frame of a clip)"
            )
        self.check_shape(shape)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """``training.slice_dim`` must name an axis of items of ``shape`` ``(C, *dims)`` when slicing."""
        if self.slice_items and self.slice_dim >= len(shape):
            raise OptionError(
                f"training.slice_dim={self.slice_dim} does not name an axis of this model's items {tuple(shape)} "
                f"(axes 1..{len(shape) - 1} follow the channels): set training.slice_dim to one of them, or "
                "training.slice_items=0"
            )


@dataclass(frozen=True)
class LoraOptions(Options):
    """What ``lora.*`` may hold: LoRA fine-tuning of the backbone's attention through peft (docs/pretrained.md)."""

    PREFIX = "lora."
    WHERE = "conf/train.yaml explains each"

    rank: int = 0
    """rank of the low-rank adapters; 0 = off (every weight trains). Needs init_from (the model they adapt)."""
    alpha: float | None = None
    """the adapters' output is scaled by alpha / rank (null: alpha = rank, a scale of 1)."""
    dropout: float = 0.0
    """dropout on the adapters' input, in [0, 1)."""
    target_modules: list[str] | None = None
    """names of the linear layers to adapt (null: every attention projection of the backbone)."""
    text_encoder: bool = False
    """also adapt the text encoder's attention projections (same rank, alpha and dropout): they train
    beside the backbone's, are averaged by the EMA, and export and load with them (RUN/model/text_encoder/)."""

    def rules(self):
        return [
            ("rank", self.rank >= 0, "a whole number >= 0 (0 = off)"),
            ("alpha", self.alpha is None or self.alpha > 0, "a number > 0 or null"),
            ("dropout", 0 <= self.dropout < 1, "a number in [0, 1)"),
        ]
