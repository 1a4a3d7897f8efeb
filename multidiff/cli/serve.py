"""``multidiff serve model=RUN/model [models=[...]] out=runs/serve host=127.0.0.1 port=7860``.

A local web page (Gradio) to prompt a model, watch the sampling steps and play, view or download
what it made. The page is built from what the model's modality declares (its generation options,
its regions to edit, its file formats); the requests go through the same checks as
``multidiff generate`` and the files are written like its (``OUT/NNNN.ext`` + ``metadata.jsonl``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from multidiff.cli.compose import ConfigError
from multidiff.options import OptionError, Options


@dataclass(frozen=True)
class ServeOptions(Options):
    """The keys of ``multidiff serve`` (``conf/serve.yaml``, which must agree: a test compares them);
    the sampler the page starts with is the ``sampler`` config group, as for ``generate``."""

    WHERE = "multidiff serve --help lists them"

    model: str | None = None
    """an exported model directory (RUN/model), a .ckpt or a diffusers pipeline directory to serve."""
    models: list[str] = field(default_factory=list)
    """several models to choose from in the page (with or instead of model=)."""
    out: str = "runs/serve"
    """the run folder: every result is written here as NNNN.<format> + a metadata.jsonl row; nothing is overwritten."""
    host: str = "127.0.0.1"
    """the address to listen on (127.0.0.1: this machine only; 0.0.0.0 opens it to the network)."""
    port: int = 7860
    """the port to listen on."""
    concurrency: int = 1
    """generations run at once (more queue behind them); 1 suits a CPU."""
    queue_size: int = 32
    """requests that may wait in the queue; more are refused until it drains."""
    max_steps: int = 100
    """the most sampler steps one request may ask for."""
    max_samples: int = 8
    """the most samples one request may ask for."""
    max_scale: float = 4.0
    """the largest sample one request may ask for, as a multiple of the model's training size (a length, a duration, frames)."""
    max_options: dict = field(default_factory=dict)
    """upper limits on the modality's own numeric options, e.g. {duration: 10, num_frames: 64}."""
    steps: int = 20
    """the steps the page starts with."""
    guidance_scale: float = 2.0
    """the guidance scale the page starts with."""
    trusted_targets: list[str] = field(default_factory=list)
    """module prefixes beyond multidiff. that the models' configs may build (models of your own modalities)."""
    device: str | None = None
    """cpu, cuda, cuda:1, ... (null: cuda if available, else cpu)."""
    share: bool = False
    """also publish the page through a public Gradio share link (off: nothing leaves this machine)."""
    open_browser: bool = False
    """open the page in this machine's browser once it is up."""
    verbose: bool = False
    """show every dependency message (server logs, deprecation warnings) for debugging."""

    def rules(self):
        return [
            ("port", 0 <= self.port < 65536, "a port number, 0..65535 (0: any free port)"),
            ("concurrency", self.concurrency > 0, "a positive integer"),
            ("queue_size", self.queue_size > 0, "a positive integer"),
            ("max_steps", self.max_steps > 0, "a positive integer"),
            ("max_samples", self.max_samples > 0, "a positive integer"),
            ("max_scale", self.max_scale > 0, "a positive number"),
            ("steps", 0 < self.steps <= self.max_steps, f"a positive integer <= max_steps ({self.max_steps})"),
            ("guidance_scale", self.guidance_scale >= 0, "a number >= 0 (1 disables guidance)"),
        ]

    @property
    def model_list(self) -> list[str]:
        """``model`` followed by ``models``, each once."""
        return list(dict.fromkeys([*([self.model] if self.model else []), *self.models]))

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ServeOptions:
        try:
            opts = cls.from_mapping(cfg, only_known=True)
        except OptionError as e:
            raise ConfigError(str(e)) from None
        if not opts.model_list:
            raise ConfigError("missing model=...: the exported model directory (RUN/model) or .ckpt to serve "
                              "(or models=[A,B] for several)")
        return opts


def run(cfg: DictConfig) -> None:
    """Check the options and every model's config, then serve until interrupted."""
    from multidiff.cli.service import GenerationService, Limits
    from multidiff.webapp.page import build_app, launch

    opts = ServeOptions.from_config(cfg)
    limits = Limits(steps=opts.max_steps, samples=opts.max_samples, scale=opts.max_scale,
                    options=dict(opts.max_options))
    service = GenerationService(opts.model_list, opts.out, limits=limits, device=opts.device,
                                trusted_targets=opts.trusted_targets)
    app = build_app(service, sampler=str(cfg.sampler.name), steps=opts.steps, guidance_scale=opts.guidance_scale)
    launch(app, service, host=opts.host, port=opts.port, concurrency=opts.concurrency, queue_size=opts.queue_size,
           share=opts.share, open_browser=opts.open_browser, quiet=not opts.verbose)
