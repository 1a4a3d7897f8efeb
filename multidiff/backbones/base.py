"""The backbone contract and its weight I/O."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from multidiff.core.cond import Cond


class Backbone(nn.Module):
    """Base class of every backbone: the network inside a :class:`~multidiff.core.denoiser.Denoiser`.

    **Required**: ``forward(x, c_noise, cond) -> Tensor``

    - ``x``: ``(B, C, *dims)``, the noisy sample already scaled by the parameterization's ``c_in``;
    - ``c_noise``: ``(B,)`` float32, what the parameterization says the network should see of the
      noise level (a timestep in ``[0, 1000)`` for VP models, ``ln(sigma) / 4`` for EDM,
      ``1000 t`` for flow matching): embed it, e.g. sinusoidally;
    - ``cond``: a :class:`~multidiff.core.cond.Cond` (``tokens (B, L, D)`` + ``mask (B, L)``,
      ``pooled (B, D)``, ``labels (B,)``; any may be ``None``) or ``None`` (unconditional);
    - returns a tensor shaped like ``x`` (the parameterization decides what it predicts).

    **Optional**: ``save_pretrained(directory)`` / ``load_pretrained(directory)`` write and read
    the weights as ``model.safetensors`` (no pickle); a subclass wrapping a diffusers model
    overrides them to use diffusers' own format. Constructor options come from the ``backbone``
    config (``_target_`` + keyword arguments), so keep them plain and keyword-only.
    :class:`~multidiff.backbones.convunet.ConvUNet` serves data of rank 1, 2 or 3 without a
    network of your own.
    """

    weights_name = "model.safetensors"

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:  # pragma: no cover
        """``(B, C, *dims)``, ``(B,)``, ``Cond | None`` -> ``(B, C_out, *dims)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, c_noise, cond)")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/model.safetensors`` (the state dict, on CPU, contiguous)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, directory / self.weights_name)

    def load_pretrained(self, directory: str | Path) -> None:
        """Load the weights :meth:`save_pretrained` wrote (strict: every key must match)."""
        self.load_state_dict(load_file(Path(directory) / self.weights_name))
