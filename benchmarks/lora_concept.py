"""LoRA fine-tuning quality: teach a trained digits model a new concept in minutes, keep what it knew.

    python benchmarks/lora_concept.py --train-base                 # the base first (recipe image_digits, ~14 min)
    python benchmarks/lora_concept.py --base runs/digits/model     # LoRA on an existing digits export

The concept is one the base never saw: **dark digits on a light background**, prompted as
"a handwritten digit seven in black ink on white paper". The LoRA (rank ``--rank`` on the UNet's
attention, through ``multidiff train ... init_from=BASE lora.rank=R``) trains on the embedded digits
with ``data.dataset.ink=both``: every digit once as in the base data (white ink, its usual caption)
and once inverted with the new caption, so the base prompts are rehearsed beside the concept (prior
preservation). It is timed and capped by ``--minutes`` (``trainer.max_time``).

Independent measures, from the real digits only (benchmarks/image_digits_quality.py's classifier):

- **concept**: a sample shows the concept when its border (the outermost pixel ring, background in
  every real digit) is light, mean > 0.5, *and* the classifier reads the prompted digit in the
  inverted image; the share over ``--per-digit`` samples of each digit.
- **base prompts**: "a handwritten digit N" with the LoRA loaded: the classifier's accuracy on the
  samples as they are (white ink), and the share with a dark border (the base look kept).

Rows: the base alone, the base with the LoRA at scale 1 and at 0.5. Prints a table and writes
benchmarks/results/lora_concept.{json,md} (+ a sample grid).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402
from image_digits_quality import Judge  # noqa: E402

import multidiff  # noqa: E402
from multidiff.datasets.digits import BLACK_INK, DIGIT_NAMES  # noqa: E402


def border(x: np.ndarray) -> np.ndarray:
    """Mean of the outermost pixel ring of each image ``(N, H, W)``."""
    ring = np.concatenate([x[:, 0, :], x[:, -1, :], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    return ring.mean(1)


def sample(pipe, suffix: str, per_digit: int, seed: int, steps: int, guidance: float) -> np.ndarray:
    prompts = [f"a handwritten digit {name}{suffix}" for name in DIGIT_NAMES]
    out = pipe.generate(prompts, num_samples=per_digit, seed=seed, sampler="dpmpp_2m", steps=steps,
                        guidance_scale=guidance, batch_size=100, progress=False)
    return out[:, 0].numpy()


def measure(pipe, judge: Judge, per_digit: int, seed: int, steps: int, guidance: float) -> tuple[dict, np.ndarray]:
    labels = np.repeat(np.arange(10), per_digit)
    concept = sample(pipe, BLACK_INK, per_digit, seed, steps, guidance)
    base = sample(pipe, "", per_digit, seed, steps, guidance)
    read_inverted = judge.clf.predict((1 - concept).reshape(len(concept), -1)) == labels
    light = border(concept) > 0.5
    base_read = judge.clf.predict(base.reshape(len(base), -1)) == labels
    row = {"concept": float((light & read_inverted).mean()), "concept_light_border": float(light.mean()),
           "concept_digit": float(read_inverted.mean()), "base_accuracy": float(base_read.mean()),
           "base_dark_border": float((border(base) < 0.5).mean())}
    return row, np.concatenate([concept[::per_digit], base[::per_digit]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/lora_bench/base/model", help="an exported digits model")
    ap.add_argument("--train-base", action="store_true", help="train recipe=image_digits into --base's run first")
    ap.add_argument("--run", default="runs/lora_bench/lora", help="the LoRA run directory")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=400, help="LoRA optimizer steps (capped by --minutes)")
    ap.add_argument("--minutes", type=float, default=5.0, help="most LoRA training time (trainer.max_time)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-args", default="", help="extra LoRA run overrides, space separated")
    ap.add_argument("--per-digit", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--name", default="lora_concept")
    args = ap.parse_args()

    base = Path(args.base)
    cli = [sys.executable, "-m", "multidiff.cli.main", "train", "+trainer.enable_progress_bar=false",
           f"data_root={args.data_root}"]
    extra: dict = {}
    if args.train_base:
        t0 = time.time()
        subprocess.run([*cli, "recipe=image_digits", f"run_dir={base.parent}"], check=True)
        extra["base_train_minutes"] = round((time.time() - t0) / 60, 2)
    seconds = int(round(args.minutes * 60))
    limit = f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"  # DD:HH:MM:SS
    overrides = ["recipe=image_digits", f"run_dir={args.run}", f"init_from={base}", f"lora.rank={args.rank}",
                 "data.dataset.ink=both", f"trainer.max_steps={args.steps}", f"+trainer.max_time={limit}",
                 f"optimizer.lr={args.lr}", f"data.batch_size={args.batch}", "lr_scheduler.lr_lambda.warmup_steps=20",
                 "callbacks.samples.every_n_steps=0", *args.train_args.split()]
    t0 = time.time()
    subprocess.run([*cli, *overrides], check=True)
    minutes = round((time.time() - t0) / 60, 2)
    lora = Path(args.run) / "model"
    size_kb = round((lora / "lora.safetensors").stat().st_size / 1024, 1)
    extra.update({"lora_train_minutes": minutes, "lora_file_kb": size_kb, "overrides": " ".join(overrides)})

    judge = Judge(16)
    rows, grids = [], []
    for label, kwargs in (("base alone", {}), ("base + LoRA (scale 1)", {"lora": str(lora)}),
                          ("base + LoRA (scale 0.5)", {"lora": str(lora), "lora_scale": 0.5})):
        pipe = multidiff.load(base, device="cpu", **kwargs)
        row, grid = measure(pipe, judge, args.per_digit, args.seed, args.sample_steps, args.guidance)
        rows.append({"model": label, **row})
        grids.append(grid)
        print(rows[-1], flush=True)
    columns = ["model", "concept", "concept_light_border", "concept_digit", "base_accuracy", "base_dark_border"]
    out = write_results(args.name, rows, columns, extra)
    from PIL import Image

    tiles = np.concatenate([np.concatenate(list(g), axis=1) for g in grids], axis=0)  # rows: concept, base prompts
    Image.fromarray((tiles * 255).round().astype(np.uint8)).resize((tiles.shape[1] * 4, tiles.shape[0] * 4),
                                                                    Image.NEAREST).save(RESULTS / f"{args.name}_samples.png")
    print(open(out).read())


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
