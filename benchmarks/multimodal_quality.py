"""Quality of recipe=multimodal_dit: one checkpoint judged on each of its modalities by the same
independent measures as the one-modality recipes.

    python benchmarks/multimodal_quality.py --train --model runs/mm/model     # train (timed), then judge
    python benchmarks/multimodal_quality.py --model runs/mm/model

- image: the digit classifier and the PCA Fréchet distance of ``image_digits_quality.py`` (prompted
  digit accuracy, Fréchet distance as a multiple of real-vs-real);
- audio: the pitch tracker of ``audio_notes_quality.py`` (share of notes within 50 cents of the
  prompted pitch, every family x 25 pitches x ``--per-note``);
- video: the digit classifier and motion estimate of ``video_moving_digits_quality.py`` (direction
  and digit accuracy over every (digit, direction) prompt x ``--per-clip``).

Each with dpmpp_2m, 20 steps and the guidance its one-modality benchmark uses. Prints a table and
writes benchmarks/results/<name>.{json,md} (one row per modality, the bars of issue 17 beside them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import audio_notes_quality as notes  # noqa: E402
import image_digits_quality as digits  # noqa: E402
import video_moving_digits_quality as video  # noqa: E402
from common import write_results  # noqa: E402

BARS = {"image": "accuracy >= 0.90, fd_ratio <= 10", "audio": "pitch_acc >= 0.80",
        "video": "direction_acc >= 0.80, digit_acc >= 0.70"}


def image_row(model: Path, per_digit: int, seed: int) -> dict:
    import multidiff

    pipe = multidiff.load(model, modality="image", device="cpu")
    judge = digits.Judge(size=int(pipe.adapter.shape[-1]))
    t0 = time.time()
    images, labels = digits.generate(pipe, "dpmpp_2m", 20, per_digit, 2.0, seed)
    score = judge.score(images, labels)
    return {"modality": "image", "samples": len(images), "accuracy": score["accuracy"], "fd_ratio": score["fd_ratio"],
            "guidance": 2.0, "seconds": round(time.time() - t0, 1)}


def audio_row(model: Path, per_note: int, seed: int) -> dict:
    import multidiff

    pipe = multidiff.load(model, modality="audio", device="cpu")
    judge = notes.Judge()
    grid = [notes.NoteSpec(f, m, 0) for f in notes.FAMILIES for m in range(57, 82)] * per_note
    t0 = time.time()
    waves = notes.generate(pipe, grid, template=0, steps=20, guidance=4.0, seed=seed, sampler="dpmpp_2m")
    score = judge.score(waves, grid)
    return {"modality": "audio", "samples": len(waves), "pitch_acc": score["pitch_acc"],
            "median_cents": score["median_cents"], "family_acc_spectrum": score["family_acc_spectrum"],
            "guidance": 4.0, "seconds": round(time.time() - t0, 1)}


def video_row(model: Path, per_clip: int, seed: int) -> dict:
    import multidiff

    pipe = multidiff.load(model, modality="video", device="cpu")
    judge = video.Judge(digit_size=8, min_speed=0.25)
    t0 = time.time()
    clips, labels, directions = video.generate(pipe, per_prompt=per_clip, template=0, num_frames=None,
                                               sampler="dpmpp_2m", steps=20, guidance=2.0, seed=seed)
    score = judge.score(clips, labels, directions)
    return {"modality": "video", "samples": len(clips), "direction_acc": score["direction_acc"],
            "digit_acc": score["digit_acc"], "fd_ratio": score["fd_ratio"], "guidance": 2.0,
            "seconds": round(time.time() - t0, 1)}


def summary_row(rows: list[dict]) -> dict:
    """One row with every modality's headline measure (what the recipe's header quotes)."""
    by = {r["modality"]: r for r in rows}
    out = {"modality": "all", "samples": sum(r["samples"] for r in rows)}
    for name, keys in (("image", ("accuracy", "fd_ratio")), ("audio", ("pitch_acc", "median_cents")),
                       ("video", ("direction_acc", "digit_acc"))):
        out.update({k: by[name][k] for k in keys if name in by})
    met = [r["bar_met"] for r in rows if "bar_met" in r]
    out["bar"] = "all three" if met and all(met) else f"{sum(met)} of {len(met)}"
    out["bar_met"] = bool(met) and all(met)
    return out


def bar_met(row: dict) -> bool:
    """Whether a modality's row meets issue 17's bar for it."""
    if row["modality"] == "image":
        return row["accuracy"] >= 0.9 and row["fd_ratio"] <= 10
    if row["modality"] == "audio":
        return row["pitch_acc"] >= 0.8
    return row["direction_acc"] >= 0.8 and row["digit_acc"] >= 0.7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/mm/model")
    ap.add_argument("--train", action="store_true", help="train recipe=multimodal_dit into the model's run dir first")
    ap.add_argument("--train-args", default="", help="extra overrides for --train, space separated")
    ap.add_argument("--recipe", default="multimodal_dit")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--per-digit", type=int, default=30)
    ap.add_argument("--per-note", type=int, default=2)
    ap.add_argument("--per-clip", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--name", default="multimodal_dit_recipe")
    args = ap.parse_args()

    model = Path(args.model)
    extra: dict = {"recipe": args.recipe, "model": str(model)}
    if args.train:
        if args.train_args:  # the overrides on top of the recipe: the record says what ran
            extra["train_args"] = args.train_args
        extra.update(video.train(model.parent, args.data_root, args.train_args.split(), recipe=args.recipe))
    metrics = model.parent / "logs" / "metrics.csv"
    if metrics.is_file():
        extra.update(video._train_speed(metrics))
    torch.manual_seed(0)
    np.random.seed(0)
    rows = []
    for make, n in ((image_row, args.per_digit), (audio_row, args.per_note), (video_row, args.per_clip)):
        row = make(model, n, args.seed)
        row["bar"] = BARS[row["modality"]]
        row["bar_met"] = bar_met(row)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    rows.append(summary_row(rows))
    cols = ["modality", "samples", "guidance", "accuracy", "fd_ratio", "pitch_acc", "median_cents", "family_acc_spectrum",
            "direction_acc", "digit_acc", "bar", "bar_met", "seconds"]
    path = write_results(args.name, rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
