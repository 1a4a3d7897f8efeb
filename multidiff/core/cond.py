"""The condition passed to every denoiser: a small tensor container that guidance can batch."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Cond:
    """Conditioning for a batch of ``B`` samples. Every field is optional.

    Attributes:
        tokens: ``(B, L, D)`` token embeddings for cross-attention.
        mask: ``(B, L)`` bool, True where a token is real (not padding).
        pooled: ``(B, D)`` one vector per sample.
        labels: ``(B,)`` int64 class labels.
        concat: ``(B, K, *dims)`` channels concatenated to the backbone's input (a mask-conditioned
            model's mask and known values, see :mod:`multidiff.core.editing`); they describe the
            input, not the prompt, so guidance gives both branches the same ones.
        modality: ``(B,)`` int64, which modality of a model of several the batch is (an index into
            its list, see :class:`~multidiff.backbones.dit.DiT`); also a description of the input,
            handled like ``concat``.
        seconds: ``(B, 2)`` float, where the item sits in its source recording: start and end in
            seconds (Stable Audio's ``seconds_start`` / ``seconds_total``; a waveform adapter sets
            them from the requested duration). Also a description of the input, like ``concat``.
    """

    tokens: Tensor | None = None
    mask: Tensor | None = None
    pooled: Tensor | None = None
    labels: Tensor | None = None
    concat: Tensor | None = None
    modality: Tensor | None = None
    seconds: Tensor | None = None

    def _tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        for t in self._tensors().values():
            return t.shape[0]
        return 0

    def map(self, fn) -> Cond:
        """Apply ``fn`` to every tensor field."""
        return replace(self, **{k: fn(v) for k, v in self._tensors().items()})

    def to(self, device=None, dtype: torch.dtype | None = None) -> Cond:
        """Move to ``device``; cast floating fields (never masks or labels) to ``dtype``."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return self.map(move)

    def index(self, idx) -> Cond:
        return self.map(lambda t: t[idx])

    def repeat_interleave(self, n: int) -> Cond:
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate along the batch dimension; all conds must carry the same fields."""
        keys = conds[0]._tensors().keys()
        for c in conds[1:]:
            if c._tensors().keys() != keys:
                raise ValueError("cannot concatenate conditions with different fields")
        return Cond(**{k: torch.cat([c._tensors()[k] for c in conds]) for k in keys})

    @staticmethod
    def where(keep: Tensor, cond: Cond, null: Cond) -> Cond:
        """Per-sample choice: ``cond`` where ``keep`` (``(B,)`` bool) is True, else ``null`` (broadcast).

        Fields ``null`` does not have (:data:`INPUT_FIELDS`: the input, not the prompt) are kept as they are."""
        out = {}
        nulls = null._tensors()
        for k, v in cond._tensors().items():
            if k not in nulls:
                out[k] = v
                continue
            n = nulls[k].to(v.device).expand_as(v)
            m = keep.reshape((-1,) + (1,) * (v.ndim - 1))
            out[k] = torch.where(m, v, n)
        return Cond(**out)


INPUT_FIELDS = ("concat", "modality", "seconds")
"""Fields of a :class:`Cond` that describe the input rather than the prompt: guidance gives the
unconditional branch the conditional one's, condition dropout keeps them."""


def with_input(cond: Cond | None, **fields) -> Cond:
    """``cond`` with input fields (:data:`INPUT_FIELDS`) set; ``None`` becomes a new :class:`Cond`."""
    unknown = set(fields) - set(INPUT_FIELDS)
    if unknown:
        raise ValueError(f"with_input sets only {', '.join(INPUT_FIELDS)}, not {', '.join(sorted(unknown))}")
    return Cond(**fields) if cond is None else replace(cond, **fields)
