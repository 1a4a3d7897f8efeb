"""The typed training options (``training.*`` in ``conf/train.yaml``), validated once, here.

:class:`TrainingOptions` is the one definition of what ``training.*`` holds: each field's type and
default (``conf/train.yaml`` documents them and must agree: a test compares the two), and its
rules. :meth:`TrainingOptions.from_config` reads the config node and raises :class:`OptionError`,
one paragraph naming the key, for an unknown key, a wrong type or a value out of range.
:class:`~multidiff.training.module.DiffusionModule` takes the same object, so a Python user gets
the same checks and messages as the command line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

SIGNALS = ("SIGTERM", "SIGINT", "SIGKILL", "SIGUSR1")


class OptionError(ValueError):
    """A training option is unknown or invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class TrainingOptions:
    """What ``training.*`` may hold; ``conf/train.yaml`` explains each key."""

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

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # messages echo the input
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f"training.{f.name}", getattr(self, f.name), _hints()[f.name]))
        rules = [
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
        for key, ok, what in rules:
            if not ok:
                raise OptionError(f"training.{key}={given[key]!r} is invalid: it must be {what}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> TrainingOptions:
        """Options from the ``training`` config node (a dict or DictConfig; missing keys take the defaults)."""
        from omegaconf import DictConfig, OmegaConf

        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise OptionError(f"unknown key training.{unknown[0]}: the training options are {', '.join(known)} "
                              "(conf/train.yaml explains each); check the spelling")
        return cls(**values)

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

    @staticmethod
    def describe() -> list[tuple[str, str, Any, str]]:
        """``(key, type, default, help)`` for every option: for ``--help`` and the docs."""
        rows = []
        for f in dataclasses.fields(TrainingOptions):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((f"training.{f.name}", _type_name(_hints()[f.name]), default, _field_docs()[f.name]))
        return rows


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainingOptions)


def _field_docs() -> dict[str, str]:
    """The attribute docstrings of :class:`TrainingOptions` (one line each), read from its source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainingOptions))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "|".join(typing.get_args(hint))
    if isinstance(hint, types.UnionType):
        return "|".join("null" if a is type(None) else a.__name__ for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` (an int is a valid float); :class:`OptionError` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise OptionError(f"{key}={value!r} is invalid: choose one of {', '.join(map(str, args))}")
        return value
    if isinstance(hint, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        what = {int: "an integer", float: "a number", bool: "true or false", dict: "a mapping {key: value}"}[hint]
        raise OptionError(f"{key}={value!r} is invalid: it must be {what}")
    return value
