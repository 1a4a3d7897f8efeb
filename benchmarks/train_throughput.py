"""Training throughput: ``multidiff train`` (Lightning) against a minimal hand-written PyTorch loop.

    python benchmarks/train_throughput.py                  # digits recipe, batch 64, fp32 and bf16-mixed
    python benchmarks/train_throughput.py --options        # also training.channels_last=true
    python benchmarks/train_throughput.py --compile        # also training.compile=true (slow to compile)
    python benchmarks/train_throughput.py --steps 50 --warmup 10 --batch 128

Each configuration runs in a fresh subprocess (so that peak RSS is its own):

- ``multidiff``: the recipe's config composed as ``multidiff train recipe=image_digits`` does, built
  by ``multidiff.cli.train.build`` (the real ``DiffusionModule``, ``DiffusionDataModule``, callbacks,
  CSV logger, progress bar and ``lightning.Trainer``) and fitted; only the sample previews are off
  (they are not training) and the periodic checkpoints fall outside the few measured steps;
- ``plain``: the same model (same seed, same init), batch, data (the same cached dataset, shuffled
  by a ``DataLoader``), loss (``Denoiser.loss`` with the same noise density and condition
  dropout), AdamW + warm-up schedule, gradient clipping at 1.0 and EMA update, written as the
  usual ``zero_grad / backward / clip / step`` loop; bf16-mixed is ``torch.autocast`` around the
  forward and the loss, as Lightning does.

Throughput is measured between the end of step ``--warmup`` and the end of step
``--warmup + --steps`` (everything between, data loading included), as samples/s; each
implementation runs ``--repeats`` times in alternating order and the median counts (a 2-core VM
drifts by ~10% between runs of a minute). Peak memory is
the process's peak RSS (and the CUDA peak on a GPU). Target: multidiff / plain >= 0.95.
Prints a table and writes benchmarks/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


def overrides(args, run_dir: str) -> list[str]:
    out = ["recipe=image_digits", f"run_dir={run_dir}", f"data_root={args.data_root}",
           f"trainer.max_steps={args.warmup + args.steps}", f"trainer.precision={PRECISIONS[args.precision]}",
           f"data.batch_size={args.batch}", "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false",
           f"training.channels_last={str(args.channels_last).lower()}", f"training.compile={str(args.compile).lower()}"]
    if args.device == "cuda":
        out += ["trainer.accelerator=gpu"]
    return out


def peak_memory() -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker_multidiff(args) -> dict:
    import lightning as L
    import torch

    from multidiff.cli.compose import compose
    from multidiff.cli.train import build

    class StepTimes(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            self.times.append(time.perf_counter())
            self.threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MULTIDIFF_RUN_DIR"] = tmp
        cfg = compose("train", overrides(args, tmp))
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        _, module, datamodule, trainer = build(cfg, Path(tmp))
        timer = StepTimes()
        trainer.callbacks.append(timer)
        trainer.fit(module, datamodule=datamodule)
    return {"times": timer.times, "torch_threads": timer.threads}


def worker_plain(args) -> dict:
    import copy

    import torch
    from torch.utils.data import DataLoader

    from multidiff.cli.compose import compose
    from multidiff.configuration import safe_instantiate
    from multidiff.core.cond import Cond
    from multidiff.datasets.folder import collate
    from multidiff.pipeline import build_parts
    from multidiff.training.ema import ema_decay, ema_update

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("train", overrides(args, tmp))
    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    parts = build_parts(cfg)
    dataset = safe_instantiate(cfg.data.dataset, adapter=parts.adapter)
    noise_density = safe_instantiate(cfg.diffusion.noise)
    denoiser = parts.denoiser.to(device).train()
    ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
    if args.channels_last or args.compile:
        from multidiff.performance import apply_performance_options

        apply_performance_options(denoiser.backbone, channels_last=args.channels_last, compile=args.compile)
    conditioner = parts.conditioner.to(device)
    null = conditioner.null()
    opt = torch.optim.AdamW(denoiser.parameters(), lr=float(cfg.optimizer.lr), betas=tuple(cfg.optimizer.betas),
                            weight_decay=float(cfg.optimizer.weight_decay))
    warmup = int(cfg.lr_scheduler.lr_lambda.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    dropout, clip, max_decay = float(cfg.conditioning.dropout), float(cfg.trainer.gradient_clip_val), float(
        cfg.training.ema_decay)
    bf16 = args.precision == "bf16"
    times, step = [], 0
    while step < args.warmup + args.steps:
        for batch in loader:
            x0 = batch["x"].to(device, non_blocking=True)
            b = x0.shape[0]
            with torch.no_grad():
                cond = conditioner.encode(batch["text"])
                keep = torch.rand(b, device=device) >= dropout
                cond = Cond.where(keep, cond, null)
            sigma = noise_density.sample(b, device=device)
            noise = torch.randn_like(x0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = denoiser.loss(x0, sigma, noise, cond).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), clip)
            opt.step()
            sched.step()
            ema_update(ema, denoiser, ema_decay(step, max_decay))
            sync()
            times.append(time.perf_counter())
            step += 1
            if step >= args.warmup + args.steps:
                break
    return {"times": times, "torch_threads": torch.get_num_threads()}


def run_worker(args, impl: str, precision: str, channels_last: bool, compile: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--precision", precision,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--data-root", args.data_root, "--device", args.device]
    cmd += ["--channels-last"] * channels_last + ["--compile"] * compile
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "MULTIDIFF_BENCH_OUT": f.name}
        env.pop("MULTIDIFF_RUN_DIR", None)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{impl} {precision} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        result = json.loads(Path(f.name).read_text())
    times = result.pop("times")
    w = args.warmup
    window = times[w + args.steps - 1] - times[w - 1]
    step_s = [b - a for a, b in zip(times[w - 1 :], times[w:])]
    step_s.sort()
    return {"impl": impl, "precision": precision, "channels_last": channels_last, "compile": compile,
            "samples_per_s": args.batch * args.steps / window, "step_ms": 1e3 * window / args.steps,
            "median_step_ms": 1e3 * step_s[len(step_s) // 2], "wall_s": round(time.time() - t0, 1), **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the measurement starts (>= 1)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each implementation (alternating order)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--options", action="store_true", help="also training.channels_last=true (fp32)")
    ap.add_argument("--compile", action="store_true", help="also training.compile=true (fp32; compiling takes minutes)")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    ap.add_argument("--worker", choices=["multidiff", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be >= 1")

    if args.worker:
        result = (worker_multidiff if args.worker == "multidiff" else worker_plain)(args)
        result.update(peak_memory())
        Path(os.environ["MULTIDIFF_BENCH_OUT"]).write_text(json.dumps(result))
        return

    configs = [(p, False, False) for p in args.precisions.split(",") if p]
    if args.options:
        configs.append(("fp32", True, False))
    if args.compile:
        configs.append(("fp32", False, True))
    rows = []
    for precision, channels_last, compile in configs:
        pair = {"plain": [], "multidiff": []}
        for r in range(args.repeats):  # ABBA order, so that drift of the machine hits both alike
            for impl in (("plain", "multidiff") if r % 2 == 0 else ("multidiff", "plain")):
                result = run_worker(args, impl, precision, channels_last, compile)
                pair[impl].append(result)
                print(f"  run {r}: {impl:9s} {precision} channels_last={channels_last} compile={compile}: "
                      f"{result['samples_per_s']:.1f} samples/s", flush=True)
        best = {impl: statistics.median(x["samples_per_s"] for x in pair[impl]) for impl in pair}
        ratio = best["multidiff"] / best["plain"]
        for impl in ("multidiff", "plain"):
            row = {**pair[impl][0], "samples_per_s": best[impl], "step_ms": 1e3 * args.batch / best[impl],
                   "runs": ", ".join(f"{x['samples_per_s']:.1f}" for x in pair[impl]),
                   "peak_rss_mb": max(x["peak_rss_mb"] for x in pair[impl]),
                   "ratio": ratio if impl == "multidiff" else None}
            row.pop("median_step_ms", None)
            rows.append(row)
            print(f"{impl:9s} {precision} channels_last={channels_last} compile={compile}: "
                  f"{row['samples_per_s']:.1f} samples/s ({row['step_ms']:.0f} ms/step), "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB" + (f", ratio {ratio:.3f}" if impl == "multidiff" else ""),
                  flush=True)
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    extra = {"recipe": "image_digits", "batch": args.batch, "warmup_steps": args.warmup, "measured_steps": args.steps,
             "repeats": args.repeats, "samples_per_s": "median over the repeats (each run listed in runs)",
             "device": args.device, "target": "multidiff / plain samples/s >= 0.95",
             "worst_ratio": min(ratios), "verdict": "met" if min(ratios) >= 0.95 else f"missed ({min(ratios):.3f})"}
    cols = ["impl", "precision", "channels_last", "compile", "samples_per_s", "step_ms", "ratio", "runs",
            "peak_rss_mb", "peak_cuda_mb", "torch_threads"]
    path = write_results("train_throughput", rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
