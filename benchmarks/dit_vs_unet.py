"""The diffusion transformer against the UNet: cost per training and sampling step, how each grows with
size, length or frames, and what each recipe reaches in how long.

    python benchmarks/dit_vs_unet.py                  # image, audio and video
    python benchmarks/dit_vs_unet.py --axis audio --repeats 5

For each axis, the UNet recipe and its DiT twin are timed by ``benchmarks/scaling.py``'s measurement
(one process per cell, median of ``--repeats`` steps after a warm-up, random weights) at the same batch
(the DiT recipe's ``data.batch_size``, so a step is the same data for both), and the growth exponent
``k`` of ``seconds ~ value^k`` is fitted over the values. The quality columns are each recipe's own
benchmark row (the one its ``# benchmark:`` header names, written by the quality benchmarks with
``--train``): training minutes and the bars of the issue, so the two are compared at their measured
quality, not only per step. Writes benchmarks/results/dit_vs_unet.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402
from scaling import AXES, exponent, measure_axis  # noqa: E402

# axis: (UNet recipe, DiT recipe, values, quality keys of the recipe's first generated row)
PAIRS = {
    "image": ("image_digits", "image_digits_dit", [16, 32], ["accuracy", "fd_ratio"]),
    "audio": ("audio_notes", "audio_notes_dit", [16, 32, 64], ["pitch_acc"]),
    "video": ("video_moving_digits", "video_moving_digits_dit", [8, 16, 32], ["direction_acc", "digit_acc"]),
}


def recipe_quality(recipe: str, keys: list[str]) -> dict:
    """Training minutes and the quality measures of the row that ``recipe``'s ``# benchmark:`` header
    names (the row ``multidiff recipes`` quotes; empty if the results are missing)."""
    from multidiff.cli.help import recipe_file, recipe_info

    name, *selectors = recipe_info(recipe_file(recipe))["benchmark"].split()
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return {}
    info = json.loads(path.read_text())
    wanted = dict(s.split("=", 1) for s in selectors)
    row = next((r for r in info["rows"] if all(str(r.get(k)) == v for k, v in wanted.items())), None)
    out = {"train_minutes": info.get("train_minutes")}
    if row is not None:
        out["quality"] = ", ".join(f"{k} {row[k]:.3g}" for k in keys if k in row)
    return out


def compare(axis: str, repeats: int, batch: int | None) -> list[dict]:
    from multidiff.cli.compose import compose

    unet, dit, values, keys = PAIRS[axis]
    batch = batch or int(compose("train", [f"recipe={dit}"]).data.batch_size)
    rows = []
    for recipe in (unet, dit):
        args = SimpleNamespace(repeats=repeats, batch=batch, overrides=[], recipe=recipe)
        cells = measure_axis(axis, values, args)
        xs = [c["value"] for c in cells]
        row = {"axis": axis, "recipe": recipe, "batch": batch, "params": cells[0]["params"],
               **recipe_quality(recipe, keys)}
        for c in cells:
            row[f"train_s@{c['value']}"] = c["train_s_per_step"]
            row[f"sample_s@{c['value']}"] = c["sample_s_per_step"]
        row["train_k"] = round(exponent(xs, [c["train_s_per_step"] for c in cells]), 2)
        row["sample_k"] = round(exponent(xs, [c["sample_s_per_step"] for c in cells]), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--axis", choices=[*PAIRS, "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, help="items per step for both (default: the DiT recipe's data.batch_size)")
    ap.add_argument("--name", default="dit_vs_unet")
    args = ap.parse_args()
    axes = list(PAIRS) if args.axis == "all" else [args.axis]
    rows = [r for axis in axes for r in compare(axis, args.repeats, args.batch)]
    cols = ["axis", "recipe", "params", "batch", "train_minutes", "quality"]
    for axis in axes:
        for v in PAIRS[axis][2]:
            for mode in ("train", "sample"):
                if f"{mode}_s@{v}" not in cols:
                    cols.append(f"{mode}_s@{v}")
    cols += ["train_k", "sample_k"]
    extra = {"values": "; ".join(f"{a}: {AXES[a][1]} {PAIRS[a][2]}" for a in axes),
             "sampling step": "one CFG denoiser call (backbone on the doubled batch)",
             "k": "growth exponent of seconds per step over the values (1: linear, 2: quadratic)"}
    path = write_results(args.name, rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
