"""How the cost of the video recipe grows with the number of frames.

    python benchmarks/video_cost.py                       # 8, 16, 32 frames, the recipe's backbone
    python benchmarks/video_cost.py --frames 8 16 --batch 4 --overrides backbone=unet3d_tiny

For each frame count, the backbone of recipe=video_moving_digits (random weights; cost does not
depend on them) is timed and measured for
- a training step: denoiser loss (v-prediction) + backward + AdamW step at ``--batch`` clips;
- a sampling step: one classifier-free-guided denoiser call (the batch doubles inside CFG) at
  ``--batch`` clips, which is what every sampler step costs.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU, each measurement runs in its own
process and reports its peak resident memory (``ru_maxrss``) above the resident memory just before
the first step (model, optimizer and text encoder loaded), i.e. activations, gradients and
optimizer state. Times are medians over ``--repeats`` steps after one warm-up step. The growth
exponent ``k`` in ``cost ~ frames^k`` is fitted over the frame counts. Writes
benchmarks/results/video_cost.{json,md}.
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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(frames: int, mode: str, batch: int, repeats: int, overrides: list[str]) -> dict:
    """One measurement in this process: seconds per step and peak memory (MB) of ``mode``."""
    from multidiff.cli.compose import compose
    from multidiff.core.guidance import CFGDenoiser
    from multidiff.pipeline import build_parts

    cfg = compose("train", ["recipe=video_moving_digits", f"modality.num_frames={frames}", *overrides])
    parts = build_parts(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    denoiser, cond_enc = parts.denoiser.to(device), parts.conditioner.to(device)
    shape = (batch, *parts.adapter.sample_shape(num_frames=frames))
    cond = cond_enc.encode(["the digit 3 moving to the left"] * batch)
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
    params = sum(p.numel() for p in denoiser.parameters())
    return {"seconds": statistics.median(times), "peak_mb": max(peak, 0.0), "params": params}


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` on ``log x``."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--overrides", nargs="*", default=[], help="config overrides, e.g. backbone=unet3d_tiny")
    ap.add_argument("--name", default="video_cost")
    ap.add_argument("--worker", nargs=2, metavar=("FRAMES", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.batch, args.repeats, args.overrides)))
        return

    rows = []
    for frames in args.frames:
        row = {"frames": frames, "batch": args.batch}
        for mode in ("train", "sample"):
            # a fresh process per measurement: ru_maxrss is a high-water mark of the whole process
            cmd = [sys.executable, __file__, "--worker", str(frames), mode, "--batch", str(args.batch),
                   "--repeats", str(args.repeats), "--overrides", *args.overrides]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            row[f"{mode}_s_per_step"] = result["seconds"]
            row[f"{mode}_peak_mb"] = result["peak_mb"]
            row["params"] = result["params"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for r in rows:
        for key in ("train_s_per_step", "sample_s_per_step", "train_peak_mb", "sample_peak_mb"):
            r[key.replace("_s_per_step", "_time").replace("_peak_mb", "_mem") + "_x"] = r[key] / max(base[key], 1e-9)
    frames = [r["frames"] for r in rows]
    extra = {"overrides": " ".join(["recipe=video_moving_digits", *args.overrides]),
             "device": "cuda" if torch.cuda.is_available() else "cpu",
             "memory": "CUDA max_memory_allocated" if torch.cuda.is_available()
             else "peak RSS above the pre-step RSS, one process per cell"}
    if len(rows) > 1:
        for key in ("train_s_per_step", "sample_s_per_step", "train_peak_mb", "sample_peak_mb"):
            extra[f"exponent_{key}"] = round(exponent(frames, [max(r[key], 1e-9) for r in rows]), 2)
    cols = ["frames", "batch", "params", "train_s_per_step", "train_time_x", "train_peak_mb", "train_mem_x",
            "sample_s_per_step", "sample_time_x", "sample_peak_mb", "sample_mem_x"]
    path = write_results(args.name, rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
