"""Scaling: time and peak memory per training step and per sampling step as the data grows.

    python benchmarks/scaling.py                          # all three axes below
    python benchmarks/scaling.py --axis video             # video frames 8, 16, 32 (writes video_cost too)
    python benchmarks/scaling.py --axis image --values 16 32 --batch 16 --overrides backbone=unet2d_tiny
    python benchmarks/scaling.py --axis image --recipe image_digits_dit --name scaling_image_dit

Axes (each doubling the data per sample, with the recipe's own backbone and batch size):

| axis  | recipe              | override                  | default values               |
|-------|---------------------|---------------------------|------------------------------|
| image | image_digits        | ``modality.size``         | 16, 32, 64 pixels a side     |
| audio | audio_notes         | ``modality.frames``       | 16, 32, 64 frames (1, 2, 4 s) |
| video | video_moving_digits | ``modality.num_frames``   | 8, 16, 32 frames             |

For each value, the backbone (random weights; cost does not depend on them) is timed and measured for
- a training step: denoiser loss + backward + AdamW step on a batch of the recipe's ``data.batch_size``
  (or ``--batch``);
- a sampling step: one classifier-free-guided denoiser call (the batch doubles inside CFG) on the same
  batch, which is what every sampler step costs.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU, each measurement runs in its own
process and reports its peak resident memory (``ru_maxrss``) above the resident memory just before
the first step (model, optimizer and text encoder loaded), i.e. activations, gradients and
optimizer state. Times are medians over ``--repeats`` steps after one warm-up step. The growth
exponent ``k`` in ``cost ~ value^k`` is fitted over the values (1: linear in the data; 2: quadratic).
Writes benchmarks/results/scaling_<axis>.{json,md} (the video axis also as video_cost.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

AXES = {
    # axis: (recipe, override key, default values, unit, prompt)
    "image": ("image_digits", "modality.size", [16, 32, 64], "pixels", "a handwritten digit three"),
    "audio": ("audio_notes", "modality.frames", [16, 32, 64], "frames", "a plucked string playing A4"),
    "video": ("video_moving_digits", "modality.num_frames", [8, 16, 32], "frames", "the digit 3 moving to the left"),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(axis: str, value: int, mode: str, batch: int | None, repeats: int, overrides: list[str],
           recipe: str | None = None) -> dict:
    """One measurement in this process: seconds per step and peak memory (MB) of ``mode``."""
    from multidiff.cli.compose import compose
    from multidiff.core.guidance import CFGDenoiser
    from multidiff.pipeline import build_parts

    default_recipe, key, _, _, prompt = AXES[axis]
    recipe = recipe or default_recipe
    cfg = compose("train", [f"recipe={recipe}", f"{key}={value}", *overrides])
    batch = batch or int(cfg.data.batch_size)
    parts = build_parts(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    denoiser, cond_enc = parts.denoiser.to(device), parts.conditioner.to(device)
    shape = (batch, *parts.adapter.sample_shape())
    cond = cond_enc.encode([prompt] * batch)
    x0 = torch.rand(shape, device=device) * 2 - 1
    if mode == "train":
        denoiser.train()
        opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)

        def step() -> None:
            sigma = torch.rand(batch, device=device) * 10 + 0.05
            loss = denoiser.loss(x0, sigma, torch.randn_like(x0), cond).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        denoiser.eval()
        guided = CFGDenoiser(denoiser, cond_enc.null(), 4.0)
        sigma = torch.full((batch,), 2.0, device=device)

        def step() -> None:
            with torch.no_grad():
                guided(x0, sigma, cond)

    seconds, peak = measure(step, repeats, device)
    params = sum(p.numel() for p in denoiser.parameters())
    return {"seconds": seconds, "peak_mb": peak, "params": params, "batch": batch, "shape": list(shape[1:])}


def measure(step, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of ``step()`` over ``repeats`` calls after one warm-up, and the peak memory (MB) above
    what was in use before the first call (CUDA: allocated; CPU: this process's resident high-water mark)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    times = []
    for i in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i > 0:  # the first step pays one-time allocations and kernel selection
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
    else:
        peak = _peak_rss_mb() - base
    return statistics.median(times), max(peak, 0.0)


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` on ``log x``."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def measure_axis(axis: str, values: list[int], args) -> list[dict]:
    """Rows of train/sample seconds and peak memory per value of ``axis`` (``args``: repeats, batch,
    overrides and recipe as on the command line; recipe None = the axis' own)."""
    unit = AXES[axis][3]
    rows = []
    for value in values:
        row = {"axis": axis, "value": value, "unit": unit}
        for mode in ("train", "sample"):
            # a fresh process per measurement: ru_maxrss is a high-water mark of the whole process
            cmd = [sys.executable, __file__, "--worker", axis, str(value), mode, "--repeats", str(args.repeats)]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            if args.recipe:
                cmd += ["--recipe", args.recipe]
            cmd += ["--overrides", *args.overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"scaling: {axis}={value} ({mode}) failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            row[f"{mode}_s_per_step"] = result["seconds"]
            row[f"{mode}_peak_mb"] = result["peak_mb"]
            row.update(params=result["params"], batch=result["batch"], shape="x".join(map(str, result["shape"])))
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for r in rows:
        for k in ("train_s_per_step", "sample_s_per_step", "train_peak_mb", "sample_peak_mb"):
            r[k.replace("_s_per_step", "_time").replace("_peak_mb", "_mem") + "_x"] = r[k] / max(base[k], 1e-9)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--axis", choices=[*AXES, "all"], default="all")
    ap.add_argument("--values", type=int, nargs="+", help="override the axis' default values (one axis only)")
    ap.add_argument("--batch", type=int, help="clips/images per step (default: the recipe's data.batch_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overrides", nargs="*", default=[], help="config overrides, e.g. backbone=unet3d_tiny")
    ap.add_argument("--recipe", help="measure this recipe instead of the axis' own (e.g. image_digits_dit)")
    ap.add_argument("--name", help="results name (one axis only; default scaling_<axis>)")
    ap.add_argument("--worker", nargs=3, metavar=("AXIS", "VALUE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        axis, value, mode = args.worker
        print(json.dumps(worker(axis, int(value), mode, args.batch, args.repeats, args.overrides, args.recipe)))
        return
    axes = list(AXES) if args.axis == "all" else [args.axis]
    if (args.values or args.name) and len(axes) > 1:
        ap.error("--values and --name need one --axis")

    cols = ["value", "unit", "shape", "batch", "params", "train_s_per_step", "train_time_x", "train_peak_mb",
            "train_mem_x", "sample_s_per_step", "sample_time_x", "sample_peak_mb", "sample_mem_x"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for axis in axes:
        default_recipe, key, defaults, _, _ = AXES[axis]
        recipe = args.recipe or default_recipe
        rows = measure_axis(axis, args.values or defaults, args)
        extra = {"axis": f"{axis}: {key}", "overrides": " ".join([f"recipe={recipe}", *args.overrides]),
                 "device": device,
                 "memory": "CUDA max_memory_allocated" if device == "cuda"
                 else "peak RSS above the pre-step RSS, one process per cell",
                 "sampling step": "one CFG denoiser call (backbone on the doubled batch)"}
        if len(rows) > 1:
            xs = [r["value"] for r in rows]
            for k in ("train_s_per_step", "sample_s_per_step", "train_peak_mb", "sample_peak_mb"):
                extra[f"exponent_{k}"] = round(exponent(xs, [max(r[k], 1e-9) for r in rows]), 2)
        if args.name:
            names = [args.name]
        else:
            names = [f"scaling_{axis}"] + (["video_cost"] if axis == "video" and not args.recipe else [])
        for name in names:
            path = write_results(name, rows, cols, extra)
        print()
        print(path.read_text(), flush=True)


if __name__ == "__main__":
    main()
