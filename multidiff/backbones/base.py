"""The backbone contract and its weight I/O."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from multidiff.core.cond import Cond


class Backbone(nn.Module):
    """Base class of every backbone.

    Subclasses implement ``forward(x, c_noise, cond)``: ``x`` is ``(B, C, *dims)``, ``c_noise`` is
    ``(B,)`` float32 (what the parameterization says the network should see of the noise level),
    ``cond`` a :class:`Cond` or ``None``; the output has the shape of ``x``.
    ``save_pretrained``/``load_pretrained`` write and read the weights as safetensors; a subclass
    wrapping a diffusers model overrides them to use diffusers' own format.
    """

    weights_name = "model.safetensors"

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, directory / self.weights_name)

    def load_pretrained(self, directory: str | Path) -> None:
        self.load_state_dict(load_file(Path(directory) / self.weights_name))
