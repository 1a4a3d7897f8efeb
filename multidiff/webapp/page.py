"""The Gradio page of ``multidiff serve``, laid out from what each model's adapter declares.

Controls come from the adapter's generation options, region options and formats; no modality is
named here. Results are shown by their file's media type (MIME), which the adapter's writer
decided: images in a gallery, sound and moving pictures in players, anything else as a download.
This is the one place of the app that names media types; a new modality's files find their
player by their type. Requests go to :class:`~multidiff.cli.service.GenerationService`.
"""

from __future__ import annotations

import inspect
import json
import logging
import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multidiff.cli.compose import ConfigError
from multidiff.cli.service import GenerationService, Result

log = logging.getLogger(__name__)

CACHE_DIR = ".gradio"
"""The folder under the run folder where the page's uploads and served copies live."""

MEDIA = ("image", "audio", "video")


def media_kind(path: str | Path) -> str | None:
    """``image``, ``audio`` or ``video`` by the file's type (how the page shows it), else ``None``."""
    kind = (mimetypes.guess_type(str(path))[0] or "").split("/")[0]
    return kind if kind in MEDIA else None


@dataclass
class _ModelControls:
    """One model's own controls: its modality's options, region options and formats."""

    groups: list  # shown only while this model is chosen
    options: list[tuple[Any, Any]]  # (GenerationOption, component)
    regions: list[tuple[Any, Any]]
    format: Any

    @property
    def components(self) -> list:
        return [c for _, c in self.options] + [c for _, c in self.regions] + [self.format]


def _option_component(gr, option, *, region: bool = False):
    """A Gradio input for a :class:`~multidiff.adapters.base.GenerationOption` (by its type)."""
    label = option.name
    info = option.help or None
    if option.type is bool:
        return gr.Checkbox(value=bool(option.default), label=label, info=info)
    if option.choices:
        return gr.Dropdown(list(option.choices), value=option.default, label=label, info=info)
    if option.type in (int, float) and option.default is not None:
        return gr.Number(value=option.default, label=label, info=info, precision=0 if option.type is int else None)
    # text where empty must mean "the model's default": an emptied number box sends 0, not nothing
    placeholder = {list: "a list: [...]", int: "empty: the model's default", float: "empty: the model's default"}
    return gr.Textbox(value="" if option.default is None else str(option.default), label=label, info=info,
                      placeholder=placeholder.get(option.type), elem_classes=["region" if region else "option"])


def _read_option(option, value):
    """A value from the page for ``option``: empty -> ``None``; numbers and lists typed as text
    (``1.5``, ``[0, 0.5]``) are read as the command line reads them."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if option.type in (int, float, list) and isinstance(value, str):
        return _read_text(value)
    if option.type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _read_text(value: str):
    """``"1.5"`` -> 1.5, ``"[0, 0.5]"`` -> ``[0, 0.5]``; text that is neither stays text, for the
    option's own check to name."""
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def build_app(service: GenerationService, *, sampler: str = "dpmpp_2m", steps: int = 20,
              guidance_scale: float = 2.0):
    """The Gradio page (``gradio.Blocks``) for ``service``; :func:`launch` serves it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["GRADIO_TEMP_DIR"] = str(service.out / CACHE_DIR)  # uploads and served copies stay in the run folder
    import gradio as gr

    if sampler not in service.samplers:
        raise ConfigError(f"unknown sampler '{sampler}'; valid choices: {', '.join(service.samplers)}")
    limits = service.limits
    first = service.models[0]
    with gr.Blocks(title="multidiff", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown("## multidiff\nType a prompt and press **Generate**. Results are also written to "
                    f"`{service.out}` with a `metadata.jsonl` row each.")
        model = gr.Dropdown(service.models, value=first, label="model", visible=len(service.models) > 1,
                            elem_id="model")
        prompt = gr.Textbox(value="", label="prompt", lines=2, elem_id="prompt")
        negative = gr.Textbox(value="", label="negative prompt", elem_id="negative_prompt")
        with gr.Row():
            sampler_box = gr.Dropdown(list(service.samplers), value=sampler, label="sampler", elem_id="sampler")
            # numbers, not sliders: a slider's own bounds check would answer in other words than generate's
            steps_box = gr.Number(value=min(steps, limits.steps), precision=0, label=f"steps (up to {limits.steps})",
                                  elem_id="steps")
            guidance = gr.Number(value=guidance_scale, label="guidance scale", elem_id="guidance_scale")
            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
            count = gr.Number(value=1, precision=0, label=f"samples (up to {limits.samples})", elem_id="num_samples")
        controls = {m: _model_controls(gr, service.adapters[m], visible=m == first) for m in service.models}
        with gr.Accordion("edit an input (init file, region, strength)", open=False, elem_id="editing"):
            init = gr.File(label="init: the file to edit", type="filepath", elem_id="init")
            mask = gr.File(label="mask image (white: regenerate, black: keep)", type="filepath", elem_id="mask")
            for m in service.models:
                _region_controls(gr, controls[m], service.adapters[m], visible=m == first)
            with gr.Row():
                strength = gr.Textbox(value="", label="strength, 0..1", placeholder="empty: 1 with a region, 0.6 without",
                                      elem_id="strength")
                harmonize = gr.Number(value=0, precision=0, label="harmonize passes", elem_id="harmonize")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="images", visible=False, columns=4, height="auto", elem_id="images",
                             buttons=["download"])
        audios = [gr.Audio(label=f"audio {k}", type="filepath", interactive=False, visible=False,
                           elem_id=f"audio-{k}", buttons=["download"]) for k in range(limits.samples)]
        videos = [gr.Video(label=f"video {k}", interactive=False, visible=False, elem_id=f"video-{k}",
                           buttons=["download"]) for k in range(limits.samples)]
        files = gr.File(label="download", file_count="multiple", interactive=False, elem_id="files")
        metadata = gr.Code(label="metadata.jsonl rows", language="json", interactive=False, elem_id="metadata")

        own = [c for m in service.models for c in controls[m].components]

        def on_generate(*values, progress=gr.Progress()):
            model_name, prompt_text, negative_text, sampler_name, n_steps, scale, seed_value, n, init_file, \
                mask_file, strength_value, harmonize_value, *rest = values
            request = {"prompt": prompt_text or "", "negative_prompt": negative_text or None, "sampler": sampler_name,
                       "steps": _int(n_steps), "guidance_scale": scale, "seed": _int(seed_value),
                       "num_samples": _int(n), "init": init_file, "mask": mask_file,
                       "strength": _read_text(strength_value) if strength_value and strength_value.strip() else None,
                       "harmonize": _int(harmonize_value) if harmonize_value is not None else 0}
            request.update(_own_values(controls, service.models, model_name, rest))
            try:
                result = service.generate(model_name, request,
                                          progress=lambda done, total: progress((done, total), desc="sampling",
                                                                                unit="steps"))
            except ConfigError as e:
                raise gr.Error(str(e), duration=None, title="multidiff", print_exception=False) from None
            except Exception as e:  # noqa: BLE001 - the page reports it and the server keeps serving
                log.exception("generation failed")
                raise gr.Error(f"generation failed: {type(e).__name__}: {e}", duration=None, title="multidiff") from None
            return _show(gr, result, len(audios))

        on_generate.__signature__ = _api_signature(controls, service.models, progress=gr.Progress())
        button.click(on_generate, inputs=[model, prompt, negative, sampler_box, steps_box, guidance, seed, count, init,
                                          mask, strength, harmonize, *own],
                     outputs=[gallery, *audios, *videos, files, metadata], api_name="generate",
                     concurrency_id="generate")
        groups = [(m, g) for m in service.models for g in controls[m].groups]
        model.change(lambda name: [gr.update(visible=name == m) for m, _ in groups], inputs=model,
                     outputs=[g for _, g in groups], api_name=False)
    return app


COMMON_INPUTS = ("model", "prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "seed", "num_samples",
                 "init", "mask", "strength", "harmonize")
"""The page's inputs before the models' own, in order: also the parameter names of its API."""


def _api_signature(controls: dict, models: list[str], *, progress) -> inspect.Signature:
    """Named, optional parameters for ``/generate`` (Gradio's API and its clients read the handler's
    signature): ``generate``'s keys, then each model's options and format (suffixed ``_K`` for the
    K-th model where a name repeats)."""
    names, seen = list(COMMON_INPUTS), set(COMMON_INPUTS)
    for k, m in enumerate(models):
        c = controls[m]
        for name in [o.name for o, _ in c.options] + [o.name for o, _ in c.regions] + ["format"]:
            unique = name if name not in seen else f"{name}_{k}"
            names.append(unique)
            seen.add(unique)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind, default=None) for n in names]
    params.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=progress))
    return inspect.Signature(params)


def _int(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _model_controls(gr, adapter, *, visible: bool) -> _ModelControls:
    """A model's generation options and format (its regions join later, inside the editing box)."""
    formats = list(adapter.formats or (adapter.suffix.lstrip("."),))
    with gr.Group(visible=visible) as group:
        options = [(o, _option_component(gr, o)) for o in adapter.generation_options()]
        fmt = gr.Dropdown(formats, value=adapter.suffix.lstrip("."), label="format", elem_classes=["format"])
    return _ModelControls([group], options, [], fmt)


def _region_controls(gr, controls: _ModelControls, adapter, *, visible: bool) -> None:
    regions = adapter.region_options()
    if not regions:
        return
    with gr.Group(visible=visible) as group:
        controls.regions.extend((o, _option_component(gr, o, region=True)) for o in regions)
    controls.groups.append(group)


def _own_values(controls: dict, models: list[str], chosen: str, values: list) -> dict:
    """The chosen model's option values (and format) out of every model's flattened controls."""
    out: dict[str, Any] = {"options": {}}
    index = 0
    for m in models:
        c = controls[m]
        n = len(c.components)
        if m == chosen:
            mine = values[index:index + n]
            declared = [o for o, _ in c.options] + [o for o, _ in c.regions]
            for option, value in zip(declared, mine):
                read = _read_option(option, value)
                if read is not None:
                    out["options"][option.name] = read
            out["format"] = mine[-1] or None
        index += n
    return out


def _show(gr, result: Result, slots: int) -> list:
    """Updates of the output components for ``result``: each file in the player of its type."""
    captions = [f"{row['file']} · seed {row['seed']}" for row in result.rows]
    kinds = [media_kind(p) for p in result.paths]
    images = [(str(p), c) for p, c, k in zip(result.paths, captions, kinds) if k == "image"]
    gallery = gr.update(value=images or None, visible=bool(images))

    def players(kind):
        items = [(str(p), c) for p, c, k in zip(result.paths, captions, kinds) if k == kind]
        return [gr.update(value=items[k][0], label=items[k][1], visible=True) if k < len(items)
                else gr.update(value=None, visible=False) for k in range(slots)]

    lines = "\n".join(json.dumps(row) for row in result.rows)
    return [gallery, *players("audio"), *players("video"), [str(p) for p in result.paths], lines]


def launch(app, service: GenerationService, *, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 1,
           queue_size: int = 32, share: bool = False, open_browser: bool = False, quiet: bool = True,
           block: bool = True):
    """Serve ``app``: offline (Gradio 6 bundles its fonts; no analytics, no share link unless asked),
    files only from the run folder, at most ``concurrency`` generations at once and ``queue_size`` waiting."""
    service.out.mkdir(parents=True, exist_ok=True)
    app.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    try:
        _, url, share_url = app.launch(
            server_name=host, server_port=port, share=share, inbrowser=open_browser, quiet=quiet,
            allowed_paths=[], blocked_paths=[], ssr_mode=False, mcp_server=False, show_error=True,
            footer_links=["api"], prevent_thread_lock=True,
        )
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port} ({e}); choose another port=... or stop the program "
                          "using it") from None
    print(f"multidiff serve: {url} ({len(service.models)} model(s); results in {service.out}); Ctrl+C stops it",
          flush=True)
    if share_url:
        print(f"multidiff serve: public share link {share_url}", flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return url
