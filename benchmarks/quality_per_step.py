"""Quality per step: prompted-digit accuracy of every sampler at 4 to 250 steps (digits recipe).

    python benchmarks/quality_per_step.py                     # reduced sample counts (~5 min on 2 CPU cores)
    python benchmarks/quality_per_step.py --full              # 10 samples per digit in every cell
    python benchmarks/quality_per_step.py --samplers dpmpp_2m,dpmpp_3m --steps 4,6,8

For each sampler and number of steps, samples of the ten prompts "a handwritten digit
{zero..nine}" (sample ``k`` is digit ``k mod 10`` with seed ``--seed + k``, the same in every cell) are drawn with
classifier-free guidance ``--guidance`` (2.0, the default of ``generate``) and labelled by the SVC
of ``image_digits_quality.py`` (trained on the real scikit-learn digits only). ``nfe`` is the
number of model evaluations per sample, counted by wrapping the guided denoiser (one guided
evaluation runs the backbone once on the doubled cond + uncond batch; Heun evaluates twice per
step except on the last). To keep the default run under 5 minutes on 2 CPU cores, the number of
samples falls with the cost of a cell: ``--samples`` (30, three per digit) up to 10 steps (the cells
the target is about), ``--samples-mid`` (10) from 11 to 49 steps and ``--samples-long`` (5: digits
zero to four, a reference for the converged ODE/SDE) from 50 steps on; ``--full`` draws 100 (ten
per digit) in every cell (about 20 minutes on 2 cores).

Target (issue 7): >= 90% accuracy at <= 10 model evaluations with the best sampler.
Prints a table and writes benchmarks/results/quality_per_step.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from image_digits_quality import Judge  # noqa: E402

from multidiff.datasets.digits import DIGIT_NAMES  # noqa: E402

SAMPLERS = "ddim,euler,dpmpp_2m,dpmpp_3m,heun,unipc,dpmpp_2m_sde"
STEPS = "4,6,8,10,20,50,250"


def counting(fn, counter: list[int]):
    """A sampler that counts the calls of the (guided) denoiser it is given."""

    def sampler(denoiser, x, sigmas, **kw):
        def counted(*a, **k):
            counter[0] += 1
            return denoiser(*a, **k)

        return fn(counted, x, sigmas, **kw)

    sampler.__name__ = getattr(fn, "__name__", "sampler")
    return sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/digits/model")
    ap.add_argument("--samplers", default=SAMPLERS, help="unknown names (e.g. unipc where it is missing) are skipped")
    ap.add_argument("--steps", default=STEPS)
    ap.add_argument("--samples", type=int, default=30, help="samples per cell of <= 10 steps")
    ap.add_argument("--samples-mid", type=int, default=10, help="samples per cell of 11-49 steps")
    ap.add_argument("--samples-long", type=int, default=5, help="samples per cell of >= 50 steps")
    ap.add_argument("--full", action="store_true", help="100 samples in every cell (about 4x longer)")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--max-nfe", type=int, default=10, help="the NFE budget of the target")
    ap.add_argument("--modality", default=None, help="for a model of several modalities: its digits (e.g. image)")
    ap.add_argument("--name", default="quality_per_step", help="results file name under benchmarks/results")
    args = ap.parse_args()
    if args.full:
        args.samples = args.samples_mid = args.samples_long = 100

    import multidiff
    from multidiff.core.samplers import SAMPLERS as TABLE

    torch.manual_seed(0)
    pipe = multidiff.load(args.model, device="cpu", modality=args.modality)
    judge = Judge()
    prompts = [f"a handwritten digit {name}" for name in DIGIT_NAMES]
    names = [s for s in args.samplers.split(",") if s]
    missing = [s for s in names if s not in TABLE]
    if missing:
        print(f"skipping samplers multidiff does not have: {', '.join(missing)}")
    rows = []
    t_start = time.time()
    for name in (s for s in names if s in TABLE):
        for steps in (int(s) for s in args.steps.split(",")):
            n = args.samples if steps <= 10 else args.samples_mid if steps < 50 else args.samples_long
            counter = [0]
            t0 = time.time()
            out = pipe.generate([prompts[k % 10] for k in range(n)], num_samples=1, seed=args.seed,
                                sampler=counting(TABLE[name], counter), sampler_name=name, steps=steps,
                                guidance_scale=args.guidance, batch_size=100, progress=False)
            images = out[:, 0].numpy()
            labels = np.arange(n) % 10
            acc = float((judge.clf.predict(images.reshape(len(images), -1)) == labels).mean())
            batches = -(-len(images) // 100)
            row = {"sampler": name, "steps": steps, "nfe": counter[0] // batches, "samples": len(images),
                   "accuracy": acc, "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(f"{name:13s} {steps:4d} steps  nfe {row['nfe']:4d}  acc {acc:.3f}  ({len(images)} samples, "
                  f"{row['seconds']}s)", flush=True)
    within = [r for r in rows if r["nfe"] <= args.max_nfe]
    best = max(within, key=lambda r: (r["accuracy"], -r["nfe"])) if within else None
    extra = {"model": args.model, "guidance": args.guidance, "seed": args.seed, "skipped": missing,
             "real_test_accuracy": judge.real_accuracy, "minutes": round((time.time() - t_start) / 60, 2),
             "target": f">= 90% accuracy at <= {args.max_nfe} NFE with the best sampler"}
    if best:
        extra["best_within_budget"] = f"{best['sampler']} {best['steps']} steps, {best['nfe']} NFE: {best['accuracy']:.3f}"
        extra["verdict"] = "met" if best["accuracy"] >= 0.9 else "missed"
    # one compact pivot: accuracy per sampler (rows) and steps (columns)
    steps_list = sorted({r["steps"] for r in rows})
    pivot = []
    for name in dict.fromkeys(r["sampler"] for r in rows):
        cells = {r["steps"]: r for r in rows if r["sampler"] == name}
        pivot.append({"sampler": name, **{f"{s} steps": f"{cells[s]['accuracy']:.2f} ({cells[s]['nfe']})"
                                          for s in steps_list if s in cells}})
    cols = ["sampler", "steps", "nfe", "samples", "accuracy", "seconds"]
    path = write_results(args.name, rows, cols, extra)
    from common import markdown_table

    with open(path, "a") as f:
        f.write("\n## accuracy (NFE) per sampler and steps\n\n")
        f.write(markdown_table(pivot, ["sampler"] + [f"{s} steps" for s in steps_list]))
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
