"""Speed options for a backbone: ``channels_last`` memory format and ``torch.compile``.

Both are off by default and change no numbers beyond float round-off; ``benchmarks/`` measures
where they help (``benchmarks/README.md``). They are applied in place to one module (the
backbone inside a :class:`~multidiff.core.denoiser.Denoiser`) and leave its ``state_dict`` keys
as they are, so checkpoints, exports and EMA copies are unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _to_channels_last(t):
    fmt = _FORMATS.get(t.ndim) if isinstance(t, torch.Tensor) else None
    return t if fmt is None else t.contiguous(memory_format=fmt)


def _channels_last_inputs(module, args, kwargs):
    if args:
        args = (_to_channels_last(args[0]), *args[1:])
    return args, kwargs


def apply_performance_options(
    module: nn.Module,
    *,
    channels_last: bool = False,
    compile: bool = False,
    compile_options: Mapping | None = None,
) -> nn.Module:
    """Apply the speed options to ``module`` in place and return it.

    - ``channels_last``: 4-D weights (2-D convolutions) become ``channels_last`` and 5-D ones
      ``channels_last_3d``; a forward pre-hook gives the first input (``x``) the same layout. Other
      ranks (1-D data, linear layers) are untouched, so the option is harmless for any backbone.
    - ``compile``: ``module.compile(**compile_options)`` (``torch.compile`` of its forward; the
      first calls of every new input shape are slow while it compiles). ``compile_options`` are
      ``torch.compile``'s keyword arguments, e.g. ``{"mode": "max-autotune"}`` or
      ``{"backend": "aot_eager"}``.
    """
    if channels_last:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                fmt = _FORMATS.get(t.ndim)
                if fmt is not None:
                    t.data = t.data.contiguous(memory_format=fmt)
        if not getattr(module, "_multidiff_channels_last", False):
            module.register_forward_pre_hook(_channels_last_inputs, with_kwargs=True)
            module._multidiff_channels_last = True
    if compile:
        module.compile(**dict(compile_options or {}))
    return module
