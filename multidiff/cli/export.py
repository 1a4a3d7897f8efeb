"""``multidiff export model=DIR [lora=PATH ...] [format=diffusers] out=DIR``: a model written again as a
plain multidiff export or as a diffusers pipeline directory, with any LoRA adapters merged into its
weights at their scales (``docs/pretrained.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig

from multidiff.cli.compose import ConfigError
from multidiff.options import REQUIRED, OptionError, Options


@dataclass(frozen=True)
class ExportOptions(Options):
    """The keys of ``multidiff export`` (``conf/export.yaml``, which must agree)."""

    WHERE = "multidiff export --help lists them"

    model: str = REQUIRED
    """the model to export: an exported model (RUN/model, a LoRA run's too), a .ckpt or a diffusers pipeline directory."""
    lora: list[str] | str | None = None
    """LoRA adapters (a lora.rank run's RUN/model, or a list of them) merged into the weights."""
    lora_scale: list[float] | float | None = None
    """each LoRA's scale (one number for all, or one each; null: 1)."""
    out: str = REQUIRED
    """the directory the model is written to."""
    format: Literal["multidiff", "diffusers"] = "multidiff"
    """multidiff (an export multidiff.load reads) or diffusers (a pipeline directory DiffusionPipeline.from_pretrained runs)."""
    overwrite: bool = False
    """replace an existing model in out=."""
    verbose: bool = False
    """show every dependency message (Lightning tips, deprecation warnings) for debugging."""

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ExportOptions:
        from omegaconf import OmegaConf

        try:
            return cls.from_mapping(OmegaConf.to_container(cfg, resolve=True))
        except OptionError as e:
            raise ConfigError(str(e)) from None


def run(cfg: DictConfig) -> Path:
    """Load ``model`` with its LoRAs, fold them into the weights and write ``out`` as a plain model."""
    from multidiff.pipeline import Pipeline, export_model, merge_all_loras
    from multidiff.pretrained.export import PretrainedError, diffusers_family, diffusers_problems, export_diffusers

    opts = ExportOptions.from_config(cfg)
    out = Path(opts.out).expanduser()
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise ConfigError(f"out={out} is not empty; choose a new out= or add overwrite=true")
    if out.resolve() == Path(opts.model).expanduser().resolve():
        raise ConfigError(f"out={out} is the model itself; write the export to another folder")
    pipe = Pipeline.load(opts.model, device="cpu", lora=opts.lora, lora_scale=opts.lora_scale)
    if opts.format == "diffusers" and (problems := diffusers_problems(pipe)):  # before anything is merged or written
        raise ConfigError(f"format=diffusers: {opts.model} cannot be written as a diffusers {diffusers_family(pipe)}: "
                          + "; ".join(problems) + ". Export it with format=multidiff instead")
    backbone = pipe.denoiser.backbone
    merged = merge_all_loras(pipe)  # the backbone's adapters and the text encoder's
    try:
        written = (export_diffusers(pipe, out) if opts.format == "diffusers"
                   else export_model(out, pipe.config, backbone, stage=pipe.stage, conditioner=pipe.conditioner,
                                     text_encoder_changed="text_encoder" in merged))
    except PretrainedError as e:
        raise ConfigError(str(e)) from None
    print(f"exported {opts.model}{' with its LoRA merged' if merged else ''} to {written} ({opts.format})")
    return written
