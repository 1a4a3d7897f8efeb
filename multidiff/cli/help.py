"""What ``--help``, ``multidiff recipes`` and ``docs/options.md`` say, drawn from the option schemas.

Every option line comes from a typed definition that also validates (:class:`RunOptions`,
:class:`TrainingOptions`, :data:`GROUP_KEYS` for ``train``; :class:`GenerateOptions` for
``generate``; the adapter's :class:`GenerationOption` list for a model), so the help cannot drift
from what is checked. Recipes describe themselves in their header comments (``# summary:``,
``# time:``, ``# quality:``, ``# benchmark:``; see :func:`recipe_info`).

``python -m multidiff.cli.help > docs/options.md`` regenerates the reference (a test fails when it
is stale).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from multidiff.cli.compose import RECIPE_GROUP, available, config_root
from multidiff.options import OptionRow, format_value

TRAIN_GROUPS = ("modality", "autoencoder", "backbone", "diffusion", "conditioning", "data", "sampler", "trainer",
                "callbacks", "logger")
GENERATE_GROUPS = ("sampler",)
USAGE = {
    "train": "usage: multidiff train [recipe=NAME] [key=value ...] [--cfg] [--help]",
    "generate": 'usage: multidiff generate model=DIR prompt="..." out=DIR [key=value ...] [--cfg] [--help]',
    "serve": "usage: multidiff serve model=DIR [models=[DIR,...]] [out=DIR] [host=127.0.0.1] [port=7860] [key=value ...]",
}
ABOUT = {
    "train": "Trains a diffusion model from a recipe (or the defaults below) and exports it to RUN_DIR/model.",
    "generate": "Samples a trained model from prompts and writes OUT/NNNN.<format> files and OUT/metadata.jsonl.",
    "serve": ("Serves a web page (Gradio) to prompt a model, follow the sampling and play, view or download the results,\n"
              "which are also written to OUT/NNNN.<format> + OUT/metadata.jsonl. docs/serve.md has more."),
}


_ABSENT = object()


def option_table(rows: Iterable[OptionRow], values: DictConfig | None = None, indent: str = "  ") -> list[str]:
    """``key  type  default  help`` lines, aligned; ``values`` (a composition) overrides the defaults."""
    shown = []
    for row in rows:
        value = row.default
        if values is not None:
            node = OmegaConf.select(values, row.key, default=_ABSENT, throw_on_missing=False)
            if node is not _ABSENT:
                value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        shown.append((row.key, row.type, format_value(value), row.help))
    wk = min(max((len(k) for k, *_ in shown), default=0), 30)
    wt = min(max((len(t) for _, t, *_ in shown), default=0), 16)
    wv = min(max((len(v) for _, _, v, _ in shown), default=0), 12)
    return [f"{indent}{key:<{wk}}  {kind:<{wt}}  {_short(value):<{wv}}  {meaning}" for key, kind, value, meaning in shown]


def _short(value: str, limit: int = 40) -> str:
    """A long value (a recipe's list of prompts) cut to one readable cell."""
    return value if len(value) <= limit else value[: limit - 4] + " ..." + value[-1:]


def group_lines(groups: Iterable[str], choices: dict[str, str], extra_dirs: list[Path] = ()) -> list[str]:
    """``group  a, b*, c`` with the composition's choice starred."""
    groups = list(groups)
    width = max(len(g) for g in groups)
    return [f"  {g:<{width}}  " + ", ".join(o + ("*" if choices.get(g) == o else "") for o in available(g, extra_dirs))
            for g in groups]


def train_help(cfg: DictConfig, choices: dict[str, str], extra_dirs: list[Path] = ()) -> str:
    """``multidiff train [overrides] --help``: every option, with the values of this composition."""
    from multidiff.cli.train import RunOptions, group_key_rows
    from multidiff.training.autoencoder import ReconstructionOptions
    from multidiff.training.options import LoraOptions, TrainingOptions

    recipe = choices.get(f"{RECIPE_GROUP}@_global_")
    lines = [USAGE["train"], "", ABOUT["train"], "",
             f"options (key=value; type, value{' with recipe ' + recipe if recipe else ''}, meaning):"]
    lines += option_table([*RunOptions.describe(), *TrainingOptions.describe(), *LoraOptions.describe(),
                           *ReconstructionOptions.describe(), *group_key_rows()], cfg)
    lines += ["", "config groups (group=option; * = chosen):",
              "  " + f"{'recipe':<12}  " + ", ".join(r + ("*" if r == recipe else "") for r in available(RECIPE_GROUP, extra_dirs))
              + "   (multidiff recipes describes each)"]
    lines += group_lines(TRAIN_GROUPS, choices, extra_dirs)
    lines += ["", "Any key of the composed config can be set too (trainer.max_steps=500, optimizer.betas=[0.9,0.95]);",
              "--cfg prints the whole composition; docs/options.md is the full reference."]
    return "\n".join(lines)


def generate_help(cfg: DictConfig, choices: dict[str, str], extra_dirs: list[Path] = ()) -> str:
    """``multidiff generate [model=DIR] --help``: the command's options, then the model's own."""
    from multidiff.cli.generate import GenerateOptions, model_help

    lines = [USAGE["generate"], "", ABOUT["generate"], "", "options (key=value; type, value, meaning):"]
    lines += option_table(GenerateOptions.describe(), cfg)
    lines += ["", "config groups (group=option; * = chosen):"] + group_lines(GENERATE_GROUPS, choices, extra_dirs)
    lines.append("")
    if OmegaConf.is_missing(cfg, "model"):
        lines.append("A model's modality adds options of its own (duration=, num_frames=, ...): "
                     "multidiff generate model=DIR --help lists them.")
    else:
        lines.append(model_help(cfg))
    return "\n".join(lines)


def serve_help(cfg: DictConfig, choices: dict[str, str], extra_dirs: list[Path] = ()) -> str:
    """``multidiff serve --help``: the command's options (a model's own appear in the page)."""
    from multidiff.cli.serve import ServeOptions

    lines = [USAGE["serve"], "", ABOUT["serve"], "", "options (key=value; type, value, meaning):"]
    lines += option_table(ServeOptions.describe(), cfg)
    lines += ["", "config groups (group=option; * = the page's first choice):"]
    lines += group_lines(GENERATE_GROUPS, choices, extra_dirs)
    lines += ["", "The page shows each model's own generation options and regions to edit; "
              "multidiff generate model=DIR --help lists them too."]
    return "\n".join(lines)


# -- recipes ---------------------------------------------------------------------------------------

HEADER = re.compile(r"^#\s*(summary|time|quality|benchmark):\s*(.*?)\s*$")
METRIC = re.compile(r"\{(\w+)=([^}]*)\}")


def recipe_file(name: str, extra_dirs: list[Path] = ()) -> Path | None:
    from multidiff.cli.compose import _with_conf_dirs

    for d in [config_root() / RECIPE_GROUP] + [Path(x) / RECIPE_GROUP for x in _with_conf_dirs(list(extra_dirs))]:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    return None


def recipe_info(path: Path) -> dict[str, str]:
    """A recipe's header comments: ``summary``, ``time`` (on a 2-core CPU), ``quality`` (with
    ``{metric=value}`` fields that a test compares with the benchmark's results) and ``benchmark``
    (results name and the row's ``key=value`` selectors). Continuation lines join the key above."""
    info: dict[str, str] = {}
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if m := HEADER.match(line):
            last = m.group(1)
            info[last] = m.group(2)
        elif last and line.startswith("#   "):
            info[last] += " " + line[1:].strip()
        else:
            last = None
    return info


def render_quality(text: str) -> str:
    """``digit accuracy {accuracy=1.00}`` -> ``digit accuracy 1.00``."""
    return METRIC.sub(lambda m: m.group(2), text)


def recipes_listing(extra_dirs: list[Path] = ()) -> str:
    """``multidiff recipes``: one line per recipe (what, time, quality), then the group options."""
    names = available(RECIPE_GROUP, extra_dirs)
    width = max((len(n) for n in names), default=0)
    lines = ["recipes (multidiff train recipe=NAME; times on a 2-core CPU, quality from benchmarks/):"]
    for name in names:
        path = recipe_file(name, extra_dirs)
        info = recipe_info(path) if path else {}
        parts = [info.get("summary", "(no summary: add a '# summary:' line to its header)")]
        if "time" in info:
            parts.append(info["time"])
        if "quality" in info:
            parts.append(render_quality(info["quality"]))
        lines.append(f"  {name:<{width}}  " + " | ".join(parts))
    lines += ["", "config groups (group=option):"] + group_lines(TRAIN_GROUPS, {}, extra_dirs)
    return "\n".join(lines)


# -- docs/options.md -------------------------------------------------------------------------------

def _md_rows(rows: Iterable[OptionRow]) -> list[str]:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r.key}` | {r.type.replace('|', ' or ')} | `{format_value(r.default)}` | {r.help} |")
    return out


def reference() -> str:
    """The whole option reference as Markdown (``docs/options.md``), from the schemas alone."""
    from multidiff.cli.compose import compose
    from multidiff.cli.export import ExportOptions
    from multidiff.cli.generate import GenerateOptions
    from multidiff.cli.serve import ServeOptions
    from multidiff.cli.train import RunOptions, group_key_rows
    from multidiff.training.autoencoder import ReconstructionOptions
    from multidiff.training.options import LoraOptions, TrainingOptions

    lines = ["# Option reference", "",
             "Generated from the option schemas by `python -m multidiff.cli.help > docs/options.md`; a test fails when",
             "this file is stale. `multidiff train --help` and `multidiff generate --help` print the same options with",
             "the values of the composition you give them (a recipe's, for example).", "",
             "## multidiff train", "", "Top-level keys (`conf/train.yaml`):", ""]
    lines += _md_rows(RunOptions.describe())
    lines += ["", "Training options (`training.*`):", ""] + _md_rows(TrainingOptions.describe())
    lines += ["", "LoRA fine-tuning (`lora.*`, with `init_from`; docs/pretrained.md):", ""] + _md_rows(LoraOptions.describe())
    lines += ["", "Autoencoder training (`reconstruction.*`, read with `task=autoencoder`):", ""]
    lines += _md_rows(ReconstructionOptions.describe())
    lines += ["", "Keys of config groups that a run checks before it starts (the defaults are those of the default",
              "groups; a recipe or another group option sets its own):", ""]
    lines += _md_rows(group_key_rows(compose("train", [])))
    lines += ["", "Config groups (`group=option`; the default is the first in `conf/train.yaml`'s defaults list):", ""]
    lines += [f"- `{g}`: {', '.join(available(g))}" for g in TRAIN_GROUPS]
    lines += ["", "Recipes (`recipe=NAME`; `multidiff recipes` prints this list):", ""]
    for name in available(RECIPE_GROUP):
        info = recipe_info(recipe_file(name))
        extra = "; ".join(x for x in (info.get("time"), render_quality(info["quality"]) if "quality" in info else None) if x)
        lines.append(f"- `{name}`: {info.get('summary', '')}" + (f" ({extra})" if extra else ""))
    lines += ["", "## multidiff generate", "", "Keys (`conf/generate.yaml`):", ""] + _md_rows(GenerateOptions.describe())
    lines += ["", f"Config groups: `sampler`: {', '.join(available('sampler'))}.", "",
              "### Options of each modality", "",
              "Written as `name=value` after the model (`multidiff generate model=DIR --help` lists a model's own, with",
              "the defaults it was trained with). The modalities that ship with multidiff:", ""]
    lines += _modality_sections()
    lines += ["", "## multidiff serve", "", "Keys (`conf/serve.yaml`; `docs/serve.md` describes the page):", ""]
    lines += _md_rows(ServeOptions.describe())
    lines += ["", "Config groups: `sampler` (the page's first choice; the page offers every one)."]
    lines += ["", "## multidiff export", "", "Keys (`conf/export.yaml`; a plain export, LoRA merged):", ""]
    lines += _md_rows(ExportOptions.describe())
    return "\n".join(lines) + "\n"


def _modality_sections() -> list[str]:
    from multidiff.configuration import safe_instantiate

    out = []
    for name in available("modality"):
        adapter = safe_instantiate(OmegaConf.load(config_root() / "conf" / "modality" / f"{name}.yaml"),
                                   source=f"conf/modality/{name}.yaml")
        formats = adapter.formats or (adapter.suffix.lstrip("."),)
        out += [f"`modality={name}` ({type(adapter).__name__}; format: {', '.join(formats)}):", ""]
        options = adapter.generation_options()
        out += ([f"- {o.describe()}" for o in options] or ["- (no options of its own)"]) + [""]
    return out


if __name__ == "__main__":
    sys.stdout.write(reference())
