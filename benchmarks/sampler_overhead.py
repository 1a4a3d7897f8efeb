"""Sampler overhead: time per sampling step of ``Pipeline.generate`` (CFG on) over the bare backbone forward.

    python benchmarks/sampler_overhead.py                       # runs/digits/model, 8 prompts, 20 steps
    python benchmarks/sampler_overhead.py --options             # also channels_last (and --compile)
    python benchmarks/sampler_overhead.py --batch 32 --steps 50 --repeats 9

With guidance on, every step of ``generate`` calls the backbone once on the doubled batch
(conditional + unconditional). The physical limit of a step is therefore one forward of the bare
diffusers ``UNet2DConditionModel`` on ``2 x batch`` samples with the same inputs (same dtype, same
memory format, ``torch.inference_mode``). Reported, as medians over ``--repeats`` interleaved
repeats after ``--warmup`` untimed ones:

- ``bare_ms``: one bare forward on the doubled batch;
- ``step_ms``: the wall time of a whole ``generate`` call (noise, prompt lookup, sampling, decoding)
  divided by its number of steps, and ``ratio = step_ms / bare_ms`` (the target, <= 1.05);
- ``marginal_ms``: the extra time of ``2 x steps`` over ``steps`` per extra step (fixed costs
  cancel), and its ratio;
- ``paired_ratio``: the median of the per-repeat ratios, ``min_ratio``: fastest over fastest
  (both more robust than the ratio of medians where other work shares the machine);
- ``overhead_ms``: multidiff's own work per step (wrapper, denoiser scalings, guidance, solver
  update, and the per-call noise, prompt lookup and decoding spread over the steps), measured with
  the UNet replaced by an identity; ``overhead_share`` is that over ``bare_ms``: the part of the
  ratio that is not noise. ``bare_spread``: (slowest - fastest) / median of the bare forwards.

Prints a table and writes benchmarks/results/sampler_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def prompts_for(batch: int) -> list[str]:
    return [f"a handwritten digit {DIGITS[k % 10]}" for k in range(batch)]


class Identity(nn.Module):
    """Stands in for the UNet: returns its input, so only multidiff's own per-step work is timed."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def forward(self, x, t, **kwargs):
        return (x,)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(pipe, *, batch: int, steps: int, sampler: str, guidance: float, repeats: int, warmup: int) -> dict:
    prompts = prompts_for(batch)
    backbone = pipe.denoiser.backbone
    unet = backbone.unet
    cond = pipe.conditioner.encode(prompts)
    null = pipe.conditioner.null(batch)
    tokens = torch.cat([cond.tokens, null.tokens])
    mask = torch.cat([cond.mask, null.mask]).float()
    shape = (2 * batch, *pipe.adapter.sample_shape())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if getattr(backbone, "_multidiff_channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    sigmas = pipe.schedule.sigmas(steps)
    ts = [pipe.denoiser.parameterization.c_noise(sigmas[i].repeat(2 * batch)) for i in range(steps)]

    def bare():
        with torch.inference_mode():
            for t in ts:
                unet(x, t, encoder_hidden_states=tokens, encoder_attention_mask=mask, return_dict=False)

    def gen(n):
        return lambda: pipe.generate(prompts, steps=n, sampler=sampler, guidance_scale=guidance, seed=0,
                                     batch_size=batch, progress=False)

    for _ in range(warmup):
        bare()
        gen(steps)()
    bare_t, gen_t, marg_t = [], [], []
    for _ in range(repeats):  # interleaved, so that drift of the machine hits all three alike
        bare_t.append(timed(bare) / steps)
        g1 = timed(gen(steps))
        g2 = timed(gen(2 * steps))
        gen_t.append(g1 / steps)
        marg_t.append((g2 - g1) / steps)
    backbone.unet = Identity(unet.config)
    try:
        gen(steps)()
        over = statistics.median(timed(gen(steps)) / steps for _ in range(repeats))
    finally:
        backbone.unet = unet
    bare_ms, step_ms, marg_ms = (1e3 * statistics.median(v) for v in (bare_t, gen_t, marg_t))
    return {
        "bare_ms": bare_ms, "step_ms": step_ms, "ratio": step_ms / bare_ms,
        "paired_ratio": statistics.median(g / b for g, b in zip(gen_t, bare_t)),
        "min_ratio": min(gen_t) / min(bare_t),
        "marginal_ms": marg_ms, "marginal_ratio": marg_ms / bare_ms, "overhead_ms": 1e3 * over,
        "overhead_share": over / statistics.median(bare_t),
        "bare_spread": (max(bare_t) - min(bare_t)) / statistics.median(bare_t),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/digits/model")
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch (the backbone sees twice as many)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--options", action="store_true", help="also measure with channels_last")
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile (slow to compile)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.guidance == 1.0:
        ap.error("--guidance 1 disables CFG; this benchmark measures the guided (doubled-batch) step")

    import multidiff

    configs = [("default", {})]
    if args.options:
        configs.append(("channels_last", {"channels_last": True}))
    if args.compile:
        configs.append(("compile", {"compile": True}))
    rows = []
    for name, options in configs:
        pipe = multidiff.load(args.model, device=args.device, **options)
        row = {"config": name, "batch": args.batch, "backbone_batch": 2 * args.batch, "steps": args.steps,
               "sampler": args.sampler, **measure(pipe, batch=args.batch, steps=args.steps, sampler=args.sampler,
                                                  guidance=args.guidance, repeats=args.repeats, warmup=args.warmup)}
        rows.append(row)
        print(f"{name:14s} bare {row['bare_ms']:.2f} ms  step {row['step_ms']:.2f} ms  ratio {row['ratio']:.3f} "
              f"(paired {row['paired_ratio']:.3f}, min {row['min_ratio']:.3f}, marginal {row['marginal_ratio']:.3f})  "
              f"multidiff overhead {row['overhead_ms']:.3f} ms/step ({100 * row['overhead_share']:.2f}%), "
              f"bare spread {100 * row['bare_spread']:.0f}%", flush=True)
    best = rows[0]["ratio"]
    extra = {"model": args.model, "guidance": args.guidance, "dtype": "float32", "device": args.device,
             "repeats": args.repeats, "target": "ratio <= 1.05",
             "verdict": "met" if best <= 1.05 else f"missed ({best:.3f})"}
    cols = ["config", "batch", "backbone_batch", "steps", "sampler", "bare_ms", "step_ms", "ratio", "paired_ratio",
            "min_ratio", "marginal_ratio", "overhead_ms", "overhead_share", "bare_spread"]
    path = write_results("sampler_overhead", rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
