"""``multidiff generate model=DIR prompt="..." out=OUT [num_samples= seed= sampler= steps= ...]``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from multidiff.cli.compose import ConfigError, require
from multidiff.configuration import safe_instantiate
from multidiff.options import REQUIRED, OptionError, Options


@dataclass(frozen=True)
class GenerateOptions(Options):
    """The keys of ``multidiff generate`` (``conf/generate.yaml``, which must agree: a test compares
    them); the sampler is a config group and the model's own options live under ``options``."""

    WHERE = "multidiff generate --help lists them"

    model: str = REQUIRED
    """an exported model directory (RUN/model), a training checkpoint (.ckpt) or a diffusers pipeline (docs/pretrained.md)."""
    prompt: str | None = None
    """the text prompt (or prompts_file=)."""
    prompts_file: str | None = None
    """a UTF-8 text file with one prompt per line, instead of prompt=."""
    negative_prompt: str | None = None
    """what guidance steers away from (null: the empty prompt)."""
    num_samples: int = 1
    """samples per prompt."""
    seed: int = 0
    """sample k of a prompt uses seed + k, so any sample can be made again alone."""
    steps: int = 20
    """sampler steps (denoiser evaluations: steps, twice that for heun)."""
    guidance_scale: float = 2.0
    """classifier-free guidance; 1 disables it, higher follows the prompt more and varies less."""
    batch_size: int = 16
    """samples denoised together (memory, not results)."""
    out: str = REQUIRED
    """the output directory: NNNN.<format> files and metadata.jsonl."""
    modality: str | None = None
    """a model of several modalities: which one to generate (generate model=DIR --help lists them)."""
    overwrite: bool = False
    """replace the results of an earlier run in out=."""
    trusted_targets: list[str] = field(default_factory=list)
    """module prefixes beyond multidiff. that the model's config may build (models of your own modalities)."""
    device: str | None = None
    """cpu, cuda, cuda:1, ... (null: cuda if available, else cpu)."""
    channels_last: bool = False
    """NHWC weights and inputs for 2-D (NDHWC for 3-D) convolutions."""
    compile: bool = False
    """torch.compile the backbone (a slow first batch while it compiles)."""
    compile_options: dict = field(default_factory=dict)
    """torch.compile keyword arguments, e.g. {mode: max-autotune}."""
    format: str | None = None
    """a file type the model's modality writes (e.g. gif for clips); null: its default."""
    init: str | None = None
    """an input file to edit (image, audio or clip): a variation of it, or with a region the input kept there."""
    mask: str | None = None
    """with init: a mask image (white: regenerate, black: keep), or use the modality's keep_*/fill_* options."""
    strength: float | None = None
    """with init: the share of the steps run from the noised input, 0..1 (null: 1 with a region, 0.6 without)."""
    harmonize: int = 0
    """with a region: resampling passes per step for better seams (each costs one more model call)."""
    lora: list[str] | str | None = None
    """LoRA adapters loaded on top of the model: a lora.rank run's RUN/model, or a list of them (stacked)."""
    lora_scale: list[float] | float | None = None
    """each LoRA's scale: one number for all or one each (null: 1; 0 gives the base model exactly)."""
    options: dict = field(default_factory=dict)
    """the model's own generation options (name=value lands here; generate model=DIR --help lists them)."""
    verbose: bool = False
    """show every dependency message (Lightning tips, deprecation warnings) for debugging."""

    def rules(self):
        return [
            ("num_samples", self.num_samples > 0, "a positive integer"),
            ("steps", self.steps > 0, "a positive integer"),
            ("batch_size", self.batch_size > 0, "a positive integer"),
            ("seed", self.seed >= 0, "an integer >= 0"),
            ("guidance_scale", self.guidance_scale >= 0, "a number >= 0 (1 disables guidance)"),
            ("strength", self.strength is None or 0 <= self.strength <= 1, "a number in [0, 1] (0 returns init)"),
            ("harmonize", self.harmonize >= 0, "an integer >= 0"),
        ]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> GenerateOptions:
        """The options of a composed ``generate`` config, checked; :class:`ConfigError` names the key."""
        try:
            return cls.from_mapping(cfg, only_known=True)
        except OptionError as e:
            raise ConfigError(str(e)) from None

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def route_options(overrides: list[str]) -> list[str]:
    """``name=value`` for a name that is not a key of ``generate`` -> ``+options.name=value``.

    The model's modality declares its own generation options (``duration=1.5``, ``num_frames=16``,
    a new modality's ``length=256``); the CLI passes them through without knowing any. Names the
    model does not declare are refused once the model is loaded, with the list of those it does.
    """
    known = {*GenerateOptions.keys(), "defaults", "sampler", "hydra"}  # the schema a test holds equal to generate.yaml
    return [f"+options.{o}" if _PLAIN_KEY.match(o) and o.split("=", 1)[0] not in known else o for o in overrides]


def model_adapter(cfg: DictConfig):
    """The adapter of ``cfg.model``, built from the model's config alone (no weights are read from
    an exported directory): enough to check and list the modality's options before a model load."""
    model = require(cfg, "model", "an exported model directory (RUN/model) or a checkpoint (.ckpt)")
    return adapter_of(str(model), [str(t) for t in cfg.get("trusted_targets") or []], cfg.get("modality"))


def adapter_of(model: str, trusted_targets=(), modality: str | None = None):
    """The adapter of the model at ``model`` (an export or a checkpoint), from its config alone;
    ``modality``: which one of a model of several (refused, listing them, when missing or unknown)."""
    from multidiff.multimodal import ModalityError, select
    from multidiff.pipeline import read_model_config

    cfg = read_model_config(model)
    try:
        name = select(cfg, modality, model)
    except ModalityError as e:
        raise ConfigError(str(e)) from None
    node = cfg.modality if name is None else cfg.modalities[name].modality
    return safe_instantiate(node, trusted=list(trusted_targets), source=model)


def check_request(adapter, opts: GenerateOptions) -> dict:
    """Everything about a request that ``adapter`` can judge without weights: the modality's options,
    the edit (files, sizes, regions) and the file format. Returns the checked options (with those an
    input implies, such as its duration); ``ValueError`` says what is wrong."""
    from multidiff.pipeline import prepare_edit

    options = adapter.read_options(opts.options)
    region = {o.name: options.pop(o.name) for o in adapter.region_options()}
    prepare_edit(adapter, opts.init, opts.mask, opts.strength, opts.harmonize, options, region)
    if opts.format:
        adapter.check_format(opts.format)
    return options


def model_help(cfg: DictConfig) -> str:
    """The generation options of ``cfg.model``'s modality, one per line, with the model's defaults
    (for a model of several modalities, those of each, or of the one ``modality=`` names)."""
    from multidiff.multimodal import modality_names
    from multidiff.pipeline import read_model_config

    names = modality_names(read_model_config(str(require(cfg, "model", "an exported model directory"))))
    if names and cfg.get("modality") is None:
        head = f"{cfg.model} generates {', '.join(names)}: choose one with modality=NAME"
        return "\n".join([head] + [_options_help(cfg, adapter_of(str(cfg.model), [str(t) for t in cfg.get(
            "trusted_targets") or []], n), f"modality={n}") for n in names])
    return _options_help(cfg, model_adapter(cfg), f"modality={cfg.modality}" if names else "")


def _options_help(cfg: DictConfig, adapter, which: str) -> str:
    options = adapter.generation_options()
    where = f"{cfg.model}{', ' + which if which else ''}"
    lines = [f"generation options of {where} ({type(adapter).__name__}), as name=value:"]
    lines += [f"  {o.describe()}" for o in options] or ["  (none)"]
    regions = adapter.region_options()
    if regions:
        lines.append("regions to edit, with init=FILE (docs/editing.md):")
        lines += [f"  {o.describe()}" for o in regions]
    formats = adapter.formats or (adapter.suffix.lstrip("."),)
    lines.append(f"  format: one of {', '.join(formats)} (default {adapter.suffix.lstrip('.')})")
    return "\n".join(lines)


def read_prompts(opts: GenerateOptions) -> list[str]:
    """Prompts from ``prompt=`` or ``prompts_file=`` (one per line, blank lines ignored)."""
    if opts.prompt is not None and opts.prompts_file is not None:
        raise ConfigError("give either prompt=... or prompts_file=..., not both")
    if opts.prompts_file is not None:
        path = Path(opts.prompts_file)
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
    if opts.prompt is None:
        raise ConfigError('missing prompt="..." (or prompts_file=FILE with one prompt per line)')
    return [opts.prompt]


def run(cfg: DictConfig) -> list[Path]:
    """Check everything the config alone can tell (keys, prompts, the output folder, the model's
    own options and format), then load the model, sample and write ``out``."""
    from multidiff.pipeline import GenerationError, Pipeline

    opts = GenerateOptions.from_config(cfg)
    out = Path(opts.out)
    prompts = read_prompts(opts)
    if (out / "metadata.jsonl").exists() and not opts.overwrite:
        raise ConfigError(f"out={out} already holds results (metadata.jsonl); choose a new out= or add overwrite=true")
    sampler = safe_instantiate(cfg.sampler.fn, source="sampler config")
    try:  # before the model loads: a wrong option, file type or edit should cost a second, not a model load
        check_request(model_adapter(cfg), opts)
    except ValueError as e:
        raise ConfigError(with_own_keys(str(e))) from None
    pipe = Pipeline.load(opts.model, device=opts.device, trusted_targets=opts.trusted_targets, modality=opts.modality,
                         lora=opts.lora, lora_scale=opts.lora_scale, channels_last=opts.channels_last,
                         compile=opts.compile, compile_options=opts.compile_options or None)
    try:
        samples = pipe.generate(
            prompts, num_samples=opts.num_samples, seed=opts.seed, sampler=sampler, sampler_name=cfg.sampler.name,
            steps=opts.steps, guidance_scale=opts.guidance_scale, negative_prompt=opts.negative_prompt,
            batch_size=opts.batch_size, init=opts.init, mask=opts.mask, strength=opts.strength,
            harmonize=opts.harmonize, **opts.options,
        )
        paths = pipe.save(samples, out, overwrite=opts.overwrite, model=opts.model, format=opts.format)
    except (GenerationError, ValueError) as e:
        raise ConfigError(with_own_keys(str(e))) from None
    print(f"wrote {len(paths)} file(s) and metadata.jsonl to {out}")
    return paths


def with_own_keys(message: str) -> str:
    """An unknown generation option may be a misspelt key of generate itself: list those too."""
    if message.startswith("unknown generation option"):
        message += f". (generate's own keys: {', '.join(GenerateOptions.keys())}, sampler)"
    return message
