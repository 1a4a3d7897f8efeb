"""Editing: a denoiser wrapper that keeps a known region, and the start of a variation (SDEdit).

One mechanism serves inpainting, audio continuation, frame interpolation and clip extension in
every modality: the modality turns a user's description of a region into a ``keep`` mask in its
own tensor space (see :meth:`multidiff.adapters.base.Adapter.keep_mask`), and the core sees only
``known`` values and ``keep``. Like guidance this is a denoiser wrapper, never a sampler flag, so
every sampler (deterministic or stochastic) edits.

Why replacing the prediction is enough: every sampler here moves ``x`` towards the denoiser's
``x0`` estimate in the sigma frame (``x = x0 + sigma * n``). When the estimate equals the known
values in the known region, the known part of the state stays ``known + sigma * n`` for the noise
``n`` it started with (or that a stochastic sampler injects), i.e. a correctly noised copy of the
input at every level, and the last step (``sigma = 0``) lands on the input itself. The network
sees that noisy copy beside the unknown part, which is what pulls the unknown part towards
agreement with it (the "replacement" method; Song et al. 2021, appendix I.2; Lugmayr et al. 2022).

Replacement is exact when the unknown part does not depend on the known part; where it does (a
correlated Gaussian, real images), the network only sees a *noisy* copy of the known part, and
:attr:`InpaintDenoiser.harmonize` passes (RePaint-style resampling: estimate, paste the known
values, re-noise to the same level with fresh noise, estimate again) bring the estimate closer to
the exact conditional. A model trained with mask conditioning (``editing=masked``) sees the clean
known values and the mask as extra input channels (``Cond.concat``) and is exact in that sense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from multidiff.core.cond import Cond
from multidiff.core.noise import Generator, append_dims, randn_like

DenoiserFn = Callable[..., Tensor]


class EditError(ValueError):
    """An edit request is invalid: a mask of the wrong size, nothing to keep or nothing to generate."""


def check_keep(keep: Tensor, known: Tensor) -> Tensor:
    """``keep`` as float32 in ``[0, 1]`` that broadcasts against ``known`` ``(B, C, *dims)``.

    ``keep`` is ``(B or 1, 1 or C, *dims)`` (an axis of size 1 broadcasts): 1 where the input is
    kept, 0 where new content is generated (fractions blend). :class:`EditError` names what is
    wrong otherwise.
    """
    if keep.ndim != known.ndim or any(k not in (1, n) for k, n in zip(keep.shape, known.shape)):
        raise EditError(f"the keep mask has shape {tuple(keep.shape)} but the input has shape {tuple(known.shape)}; "
                        f"a mask is (B or 1, 1 or C, {', '.join(map(str, known.shape[2:]))})")
    keep = keep.float()
    if not torch.isfinite(keep).all() or keep.min() < 0 or keep.max() > 1:
        raise EditError("the keep mask must hold values in [0, 1] (1 keeps the input, 0 generates)")
    return keep


def with_concat(cond: Cond | None, concat: Tensor) -> Cond:
    """``cond`` with ``concat`` channels set (a new :class:`Cond`; ``None`` becomes one)."""
    return Cond(concat=concat) if cond is None else replace(cond, concat=concat)


def mask_channels(known: Tensor, keep: Tensor) -> Tensor:
    """The extra backbone input of a mask-conditioned model: ``cat([keep, keep * known])``,
    ``(B, 1 + C, *dims)``; zeros (nothing known) are plain generation."""
    keep1 = keep if keep.shape[1] == 1 else keep.amin(1, keepdim=True)
    keep1 = keep1.expand(known.shape[0], 1, *known.shape[2:])
    return torch.cat([keep1, keep1 * known], dim=1)


class InpaintDenoiser:
    """A denoiser that keeps the ``known`` values where ``keep`` is 1.

    ``D'(x, sigma, cond) = keep * known + (1 - keep) * D(x, sigma, cond)``

    Args:
        denoiser: ``D(x, sigma, cond) -> x0_hat`` (a guided one: put guidance inside, so that
            harmonizing passes use the guided estimate).
        known: ``(B or 1, C, *dims)`` clean values of the input in the model's tensor space.
        keep: ``(B or 1, 1 or C, *dims)`` in ``[0, 1]``: 1 keeps the input (see :func:`check_keep`).
        harmonize: extra resampling passes per denoiser call (0: none). Each pass pastes the known
            values into the estimate, re-noises it to the same level with fresh noise and estimates
            again (RePaint's resampling with a jump to the clean estimate); it costs one more
            denoiser evaluation per pass.
        harmonize_interval: ``(sigma_lo, sigma_hi)`` where harmonizing applies (default: every level
            above 0); late, low-noise steps gain little from it.
        concat: also hand ``cat([keep, keep * known])`` to the denoiser as ``cond.concat`` (for a
            model trained with mask conditioning, whose backbone takes those channels).
        generator: noise of the harmonizing passes (``None``: the global RNG).
    """

    def __init__(self, denoiser: DenoiserFn, known: Tensor, keep: Tensor, *, harmonize: int = 0,
                 harmonize_interval: tuple[float, float] | None = None, concat: bool = False,
                 generator: Generator = None) -> None:
        if isinstance(harmonize, bool) or not isinstance(harmonize, int) or harmonize < 0:
            raise EditError(f"harmonize must be an integer >= 0 (resampling passes per step), got {harmonize!r}")
        self.denoiser, self.known = denoiser, known.float()
        self.keep = check_keep(keep, self.known)
        self.harmonize, self.interval, self.generator = harmonize, harmonize_interval, generator
        self.concat = mask_channels(self.known, self.keep) if concat else None
        self._with_concat: tuple[Cond | None, int, Cond] | None = None

    def _cond(self, cond: Cond | None, x: Tensor) -> Cond | None:
        """``cond`` with the mask channels, built once per ``cond`` (so guidance's own cache holds)."""
        if self.concat is None:
            return cond
        if self._with_concat is None or self._with_concat[0] is not cond or self._with_concat[1] != x.shape[0]:
            concat = self.concat.to(x.device).expand(x.shape[0], *self.concat.shape[1:])
            self._with_concat = (cond, x.shape[0], with_concat(cond, concat))
        return self._with_concat[2]

    def _estimate(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        d = self.denoiser(x, sigma, self._cond(cond, x))
        return torch.lerp(d, self.known.to(d.device), self.keep.to(d.device))  # keep * known + (1 - keep) * d

    def _harmonizes(self, sigma: Tensor) -> bool:
        if self.harmonize == 0:
            return False
        lo, hi = self.interval or (0.0, float("inf"))
        s = sigma.float()
        return bool(((s > 0) & (s >= lo) & (s <= hi)).any())

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        d = self._estimate(x, sigma, cond)
        if self._harmonizes(sigma):
            s = append_dims(sigma.float(), x.ndim)
            for _ in range(self.harmonize):
                x = (d + s * randn_like(d, self.generator)).to(x.dtype)
                d = self._estimate(x, sigma, cond)
        return d


def check_strength(strength: float) -> float:
    """``strength`` as a float in ``[0, 1]``, or :class:`EditError`."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 <= strength <= 1:
        raise EditError(f"strength={strength!r} is invalid: it must be a number in [0, 1] (0 returns the input, "
                        "1 ignores it)")
    return float(strength)


def variation_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The part of the grid ``sigmas`` (``steps + 1`` levels) a variation of ``strength`` runs: the
    last ``round(steps * strength)`` steps (``[sigmas[-1]]`` for none)."""
    steps = len(sigmas) - 1
    run = min(steps, round(steps * check_strength(strength)))
    return sigmas[steps - run :]


def variation_start(known: Tensor, noise: Tensor, sigmas: Tensor, strength: float,
                    start_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """The start of a variation (SDEdit, Meng et al. 2022): ``(x, sigmas)`` to hand a sampler.

    ``strength`` in ``[0, 1]`` picks how much of the grid ``sigmas`` (``steps + 1`` levels) runs,
    as diffusers' image-to-image does: the last ``round(steps * strength)`` steps, starting from
    ``known + sigma_start * noise``. Strength 1 is plain generation from ``noise * start_scale``
    (default ``sigmas[0]``; the parameterization's ``start_scale(sigmas[0])`` in a pipeline; the
    input is not added, so it equals generation with the same seed); strength 0 runs no step
    and returns ``known`` with a one-level grid ``[0]`` (the caller skips the sampler).
    """
    run = variation_sigmas(sigmas, strength)
    if len(run) == 1:
        return known.expand_as(noise).clone(), run
    if strength >= 1:
        return noise * (sigmas[0] if start_scale is None else start_scale), sigmas
    return known + noise * run[0], run
