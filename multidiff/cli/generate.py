"""``multidiff generate model=DIR prompt="..." out=OUT [num_samples= seed= sampler= steps= ...]``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from multidiff.cli.compose import ConfigError, require
from multidiff.configuration import safe_instantiate

SHAPE_OPTIONS = ("duration", "num_frames", "fps")


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
    options = {k: cfg[k] for k in SHAPE_OPTIONS if cfg.get(k) is not None}
    try:
        samples = pipe.generate(
            prompts, num_samples=num_samples, seed=int(cfg.seed), sampler=sampler, sampler_name=cfg.sampler.name,
            steps=steps, guidance_scale=float(guidance), negative_prompt=cfg.get("negative_prompt"),
            batch_size=batch_size, **options,
        )
    except GenerationError as e:
        raise ConfigError(str(e)) from None
    suffix = f".{cfg.format}" if cfg.get("format") else None
    paths = pipe.save(samples, out, overwrite=bool(cfg.overwrite), model=str(model), suffix=suffix, **options)
    print(f"wrote {len(paths)} file(s) and metadata.jsonl to {out}")
    return paths


