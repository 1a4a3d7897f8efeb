"""``multidiff generate model=DIR prompt="..." out=OUT [num_samples= seed= sampler= steps= ...]``."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from multidiff.cli.compose import ConfigError, config_root, require
from multidiff.configuration import safe_instantiate

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def route_options(overrides: list[str]) -> list[str]:
    """``name=value`` for a name that is not a key of ``generate`` -> ``+options.name=value``.

    The model's modality declares its own generation options (``duration=1.5``, ``num_frames=16``,
    a new modality's ``length=256``); the CLI passes them through without knowing any. Names the
    model does not declare are refused once the model is loaded, with the list of those it does.
    """
    known = set(OmegaConf.load(config_root() / "conf" / "generate.yaml")) | {"sampler", "hydra"}
    return [f"+options.{o}" if _PLAIN_KEY.match(o) and o.split("=", 1)[0] not in known else o for o in overrides]


def model_help(cfg: DictConfig) -> str:
    """The generation options of ``cfg.model``'s modality, one per line, with the model's defaults."""
    from multidiff.pipeline import read_model_config

    model = require(cfg, "model", "an exported model directory (RUN/model) or a checkpoint (.ckpt)")
    model_cfg = read_model_config(str(model))
    trusted = [str(t) for t in cfg.get("trusted_targets") or []]
    adapter = safe_instantiate(model_cfg.modality, trusted=trusted, source=str(model))
    options = adapter.generation_options()
    lines = [f"generation options of {model} ({type(adapter).__name__}), as name=value:"]
    lines += [f"  {o.describe()}" for o in options] or ["  (none)"]
    formats = adapter.formats or (adapter.suffix.lstrip("."),)
    lines.append(f"  format: one of {', '.join(formats)} (default {adapter.suffix.lstrip('.')})")
    return "\n".join(lines)


def read_prompts(cfg: DictConfig) -> list[str]:
    """Prompts from ``prompt=`` or ``prompts_file=`` (one per line, blank lines ignored)."""
    if cfg.get("prompt") is not None and cfg.get("prompts_file") is not None:
        raise ConfigError("give either prompt=... or prompts_file=..., not both")
    if cfg.get("prompts_file") is not None:
        path = Path(str(cfg.prompts_file))
        if not path.is_file():
            raise ConfigError(f"prompts_file {path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompts_file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ConfigError(f"prompts_file {path} holds no prompts; write one prompt per line")
        return prompts
    if cfg.get("prompt") is None:
        raise ConfigError('missing prompt="..." (or prompts_file=FILE with one prompt per line)')
    return [str(cfg.prompt)]


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}={value!r} is invalid: it must be a positive integer")
    return value


def run(cfg: DictConfig) -> list[Path]:
    from multidiff.pipeline import GenerationError, Pipeline

    model = require(cfg, "model", "an exported model directory (RUN/model) or a checkpoint (.ckpt)")
    out = Path(str(require(cfg, "out", "the output directory for the generated files")))
    prompts = read_prompts(cfg)
    num_samples, steps, batch_size = (_positive_int(cfg, k) for k in ("num_samples", "steps", "batch_size"))
    guidance = cfg.guidance_scale
    if not isinstance(guidance, int | float) or guidance < 0:
        raise ConfigError(f"guidance_scale={guidance!r} is invalid: it must be a number >= 0 (1 disables guidance)")
    if (out / "metadata.jsonl").exists() and not cfg.overwrite:
        raise ConfigError(f"out={out} already holds results (metadata.jsonl); choose a new out= or add overwrite=true")
    sampler = safe_instantiate(cfg.sampler.fn, source="sampler config")
    trusted = [str(t) for t in cfg.get("trusted_targets") or []]
    compile_options = cfg.get("compile_options")
    pipe = Pipeline.load(
        str(model), device=cfg.get("device"), trusted_targets=trusted, channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
        compile_options=OmegaConf.to_container(compile_options, resolve=True) if compile_options else None,
    )
    options = OmegaConf.to_container(cfg.get("options") or OmegaConf.create({}), resolve=True)
    try:
        if cfg.get("format"):  # before sampling: a wrong file type should not cost a generation
            pipe.adapter.check_format(str(cfg.format))
        samples = pipe.generate(
            prompts, num_samples=num_samples, seed=int(cfg.seed), sampler=sampler, sampler_name=cfg.sampler.name,
            steps=steps, guidance_scale=float(guidance), negative_prompt=cfg.get("negative_prompt"),
            batch_size=batch_size, **options,
        )
        paths = pipe.save(samples, out, overwrite=bool(cfg.overwrite), model=str(model), format=cfg.get("format"))
    except (GenerationError, ValueError) as e:
        message = str(e)
        if message.startswith("unknown generation option"):
            keys = ", ".join(k for k in OmegaConf.load(config_root() / "conf" / "generate.yaml") if k != "defaults")
            message += f". (generate's own keys: {keys}, sampler)"
        raise ConfigError(message) from None
    print(f"wrote {len(paths)} file(s) and metadata.jsonl to {out}")
    return paths


