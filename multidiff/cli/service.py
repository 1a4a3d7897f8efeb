"""The request service of ``multidiff serve`` (no web code): checks a request exactly as
``multidiff generate`` does (the same option rules and messages, the modality's own checks, the
edit), adds the server's limits, runs the model and appends the files to the run folder. The
page (:mod:`multidiff.webapp.page`) is one client of it; Python code can be another.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multidiff.cli.compose import ConfigError, available, config_root
from multidiff.cli.generate import GenerateOptions, adapter_of, check_request, read_prompts, with_own_keys
from multidiff.configuration import safe_instantiate
from multidiff.options import OptionError


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: ``steps``, ``samples``, a sample at most ``scale`` times the
    model's training size (numbers of tensor elements), and caps on the modality's own numeric
    ``options`` (``{"duration": 10}``)."""

    steps: int = 100
    samples: int = 8
    scale: float = 4.0
    options: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Result:
    """One request's files (absolute paths in the run folder) and their ``metadata.jsonl`` rows."""

    paths: list[Path]
    rows: list[dict]


class GenerationService:
    """Checks and runs generation requests for one or more models, writing to one run folder.

    Models load on first use (their configs are read at once, so a wrong path fails at start).
    Requests may come from several threads: model loading and writing are serialized, so each
    request gets its own files and ``metadata.jsonl`` rows, and nothing is overwritten.
    """

    def __init__(self, models: Sequence[str], out: str | Path, *, limits: Limits = Limits(), device: str | None = None,
                 trusted_targets: Sequence[str] = ()) -> None:
        if not models:
            raise ConfigError("no model to serve: give model=RUN/model (or models=[A,B])")
        from multidiff.pipeline import modalities

        # a model of several modalities is served as one entry per modality, "RUN/model [audio]"
        self.sources: dict[str, tuple[str, str | None]] = {}
        for m in (str(m) for m in models):
            for name in modalities(m) or [None]:
                self.sources[m if name is None else f"{m} [{name}]"] = (m, name)
        self.models = list(self.sources)
        self.out = Path(out).resolve()
        self.limits, self.device, self.trusted = limits, device, list(trusted_targets)
        self.adapters = {key: adapter_of(m, self.trusted, name) for key, (m, name) in self.sources.items()}
        self.samplers = {name: _sampler_fn(name) for name in available("sampler")}
        self._pipes: dict[str, Any] = {}
        self._load_lock, self._save_lock = threading.Lock(), threading.Lock()

    # -- checking ------------------------------------------------------------------------------

    def check(self, model: str, values: Mapping[str, Any]) -> tuple[GenerateOptions, str]:
        """``values`` (``generate``'s keys: prompt, seed, steps, ..., ``sampler``, and the modality's
        ``options``) as checked options and the sampler name; :class:`ConfigError` says what is wrong
        in ``generate``'s words, or which limit of this server a request passes."""
        if model not in self.adapters:
            raise ConfigError(f"unknown model {model!r}; this server serves: {', '.join(self.models)}")
        values = {k: v for k, v in values.items() if k not in ("model", "out")}
        sampler = values.pop("sampler", None) or "dpmpp_2m"
        if sampler not in self.samplers:
            raise ConfigError(f"unknown sampler '{sampler}'; valid choices: {', '.join(self.samplers)}")
        try:
            opts = GenerateOptions.from_mapping({**values, "model": self.sources[model][0], "out": str(self.out)})
        except OptionError as e:
            raise ConfigError(with_own_keys(str(e))) from None
        read_prompts(opts)
        if opts.prompts_file is not None:
            raise ConfigError("prompts_file= is not taken by the server; send one prompt per request")
        self._check_limits(opts)
        adapter = self.adapters[model]
        try:
            options = check_request(adapter, opts)
            size = math.prod(adapter.sample_shape(**options))
        except ValueError as e:
            raise ConfigError(with_own_keys(str(e))) from None
        for name, cap in self.limits.options.items():
            if isinstance(options.get(name), int | float) and options[name] > cap:
                raise ConfigError(f"{name}={options[name]!r} is more than this server allows ({name} <= {cap}; "
                                  f"max_options.{name} of multidiff serve)")
        trained = math.prod(adapter.shape)
        if size > self.limits.scale * trained:
            raise ConfigError(f"the sample asked for ({_shape(adapter.sample_shape(**options))}) is "
                              f"{size / trained:.3g} times this model's training size; this server allows up to "
                              f"{self.limits.scale:g} times (max_scale of multidiff serve)")
        return opts, sampler

    def _check_limits(self, opts: GenerateOptions) -> None:
        for key, value, cap in (("steps", opts.steps, self.limits.steps),
                                ("num_samples", opts.num_samples, self.limits.samples)):
            if value > cap:
                limit = "max_steps" if key == "steps" else "max_samples"
                raise ConfigError(f"{key}={value} is more than this server allows ({key} <= {cap}; "
                                  f"{limit} of multidiff serve)")

    # -- running -------------------------------------------------------------------------------

    def pipeline(self, model: str):
        """The loaded :class:`~multidiff.pipeline.Pipeline` of ``model`` (loaded once)."""
        from multidiff.pipeline import Pipeline

        with self._load_lock:
            if model not in self._pipes:
                path, modality = self.sources[model]
                self._pipes[model] = Pipeline.load(path, device=self.device, trusted_targets=self.trusted,
                                                   modality=modality)
            return self._pipes[model]

    def generate(self, model: str, values: Mapping[str, Any], *,
                 progress: Callable[[int, int], None] | None = None) -> Result:
        """Check ``values``, sample, and append the files and rows to the run folder."""
        from multidiff.pipeline import GenerationError

        opts, sampler = self.check(model, values)
        pipe = self.pipeline(model)
        try:
            samples = pipe.generate(
                read_prompts(opts), num_samples=opts.num_samples, seed=opts.seed, sampler=self.samplers[sampler],
                sampler_name=sampler, steps=opts.steps, guidance_scale=opts.guidance_scale,
                negative_prompt=opts.negative_prompt or None, batch_size=opts.batch_size, init=opts.init,
                mask=opts.mask, strength=opts.strength, harmonize=opts.harmonize, progress=progress or False,
                **opts.options,
            )
            with self._save_lock:
                paths = pipe.save(samples, self.out, append=True, model=self.sources[model][0], format=opts.format)
                lines = (self.out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
        except (GenerationError, ValueError) as e:
            raise ConfigError(with_own_keys(str(e))) from None
        return Result([p.resolve() for p in paths], [json.loads(line) for line in lines[-len(paths):]])


def _sampler_fn(name: str):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_root() / "conf" / "sampler" / f"{name}.yaml")
    return safe_instantiate(cfg.fn, source=f"conf/sampler/{name}.yaml")


def _shape(shape) -> str:
    return "x".join(str(int(d)) for d in shape)
