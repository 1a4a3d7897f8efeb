"""Sampler overhead: time per sampling step of ``Pipeline.generate`` (CFG on) over the bare backbone forward.

    python benchmarks/sampler_overhead.py                           # image, audio, video default backbones
    python benchmarks/sampler_overhead.py --recipes image_digits    # one modality
    python benchmarks/sampler_overhead.py --model runs/digits/model # a trained export instead of a recipe
    python benchmarks/sampler_overhead.py --options                 # also channels_last (and --compile)

Each modality's default backbone (its recipe's, random weights: cost does not depend on them) at
``generate``'s default batch size (16 prompts; ``--batch``). With guidance on, every step of
``generate`` calls the backbone once on the doubled batch (conditional + unconditional). The
physical limit of a step is therefore one forward of the bare diffusers model (``UNet2DConditionModel``,
``UNet3DConditionModel``) on ``2 x batch`` samples with exactly the inputs multidiff's backbone
wrapper hands it (recorded from one wrapper call: same tensors, dtype, memory format), under
``torch.inference_mode``. Reported, as medians over ``--repeats`` interleaved repeats after
``--warmup`` untimed ones:

- ``bare_ms``: one bare forward on the doubled batch;
- ``step_ms``: the wall time of a whole ``generate`` call (noise, prompt lookup, sampling) less its
  decoding (``decode_ms``, e.g. Griffin-Lim for audio: not a sampling step), divided by its number
  of steps, and ``ratio = step_ms / bare_ms`` (the target, <= 1.05);
- ``marginal_ms``: the extra time of ``2 x steps`` over ``steps`` per extra step (fixed costs
  cancel), and its ratio;
- ``paired_ratio``: the median of the per-repeat ratios, ``min_ratio``: fastest over fastest
  (both more robust than the ratio of medians where other work shares the machine);
- ``overhead_ms``: multidiff's own work per step (wrapper, denoiser scalings, guidance, solver
  update, and the per-call noise and prompt lookup spread over the steps), measured with the
  diffusers model replaced by an identity; ``overhead_share`` is that over ``bare_ms``: the part of
  the ratio that is not noise. ``bare_spread``: (slowest - fastest) / median of the bare forwards.

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

PROMPTS = {  # per recipe; any other model cycles its config's preview prompts
    "image": ["a handwritten digit zero", "a handwritten digit three", "the number 8, written by hand"],
    "audio": ["a plucked string playing A4", "a flute-like tone playing C5", "a brassy horn playing G4"],
    "video": ["the digit 3 moving to the left", "the digit 7 moving to the right", "the digit 0 moving up"],
}


def prompts_for(pipe, batch: int) -> list[str]:
    from omegaconf import OmegaConf

    base = list(OmegaConf.select(pipe.config, "preview_prompts", default=None) or [])
    if not base:
        target = str(OmegaConf.select(pipe.config, "modality._target_", default=""))
        kind = next((k for k in PROMPTS if k in target), "image")
        base = PROMPTS[kind]
    return [base[k % len(base)] for k in range(batch)]


class Identity(nn.Module):
    """Stands in for the diffusers model: returns its input, so only multidiff's own per-step work is timed."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def forward(self, x, t, **kwargs):
        return (x,)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def record_inputs(backbone, x, c_noise, cond):
    """The positional and keyword arguments the wrapper passes to its diffusers model for one call."""
    seen = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    handle = backbone.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            backbone(x, c_noise, cond)
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def measure(pipe, *, batch: int, steps: int, sampler: str, guidance: float, repeats: int, warmup: int) -> dict:
    from multidiff.core.cond import Cond

    prompts = prompts_for(pipe, batch)
    backbone = pipe.denoiser.backbone
    unet = backbone.unet
    cond = Cond.cat([pipe.conditioner.encode(prompts), pipe.conditioner.null(batch)])
    shape = (2 * batch, *pipe.adapter.sample_shape())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if getattr(backbone, "_multidiff_channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    sigmas = pipe.schedule.sigmas(steps)
    c_noise = [pipe.denoiser.parameterization.c_noise(sigmas[i].repeat(2 * batch)) for i in range(steps)]
    args, kwargs = record_inputs(backbone, x, c_noise[0], cond)
    sample, rest = args[0], args[2:]

    def bare():
        with torch.inference_mode():
            for t in c_noise:
                unet(sample, t, *rest, **kwargs)

    decode = pipe._decode
    decode_s = []

    def timed_decode(*a, **k):
        t0 = time.perf_counter()
        out = decode(*a, **k)
        decode_s.append(time.perf_counter() - t0)
        return out

    pipe._decode = timed_decode

    def gen(n):
        def call():
            decode_s.clear()
            t0 = time.perf_counter()
            pipe.generate(prompts, steps=n, sampler=sampler, guidance_scale=guidance, seed=0, batch_size=batch,
                          progress=False)
            total = time.perf_counter() - t0
            return total - sum(decode_s), sum(decode_s)
        return call

    try:
        for _ in range(warmup):
            bare()
            gen(steps)()
        bare_t, gen_t, marg_t, dec_t = [], [], [], []
        for _ in range(repeats):  # interleaved, so that drift of the machine hits all three alike
            bare_t.append(timed(bare) / steps)
            g1, d1 = gen(steps)()
            g2, _ = gen(2 * steps)()
            gen_t.append(g1 / steps)
            marg_t.append((g2 - g1) / steps)
            dec_t.append(d1)
        backbone.unet = Identity(unet.config)
        try:
            gen(steps)()
            over = statistics.median(gen(steps)()[0] / steps for _ in range(repeats))
        finally:
            backbone.unet = unet
    finally:
        del pipe._decode
    bare_ms, step_ms, marg_ms = (1e3 * statistics.median(v) for v in (bare_t, gen_t, marg_t))
    return {
        "shape": "x".join(map(str, shape[1:])), "bare_ms": bare_ms, "step_ms": step_ms, "ratio": step_ms / bare_ms,
        "paired_ratio": statistics.median(g / b for g, b in zip(gen_t, bare_t)),
        "min_ratio": min(gen_t) / min(bare_t),
        "marginal_ms": marg_ms, "marginal_ratio": marg_ms / bare_ms, "overhead_ms": 1e3 * over,
        "overhead_share": over / statistics.median(bare_t),
        "bare_spread": (max(bare_t) - min(bare_t)) / statistics.median(bare_t),
        "decode_ms": 1e3 * statistics.median(dec_t),
    }


def pipeline_for(source: str, device: str, options: dict):
    """A trained export (a path) or a recipe's default model with random weights (a recipe name)."""
    import multidiff

    if Path(source).exists():
        return multidiff.load(source, device=device, **options)
    from multidiff.cli.compose import compose
    from multidiff.pipeline import Pipeline, build_parts

    cfg = compose("train", [f"recipe={source}"])
    return Pipeline(build_parts(cfg), config=cfg, source=f"recipe={source}", device=device, **options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["image_digits", "audio_notes", "video_moving_digits"],
                    help="recipes whose default backbone is measured (random weights)")
    ap.add_argument("--model", nargs="+", default=[], help="exported models to measure instead of recipes")
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch (the backbone sees twice as many)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--options", action="store_true", help="also measure with channels_last")
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile (slow to compile)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.guidance == 1.0:
        ap.error("--guidance 1 disables CFG; this benchmark measures the guided (doubled-batch) step")

    configs = [("default", {})]
    if args.options:
        configs.append(("channels_last", {"channels_last": True}))
    if args.compile:
        configs.append(("compile", {"compile": True}))
    rows = []
    for source in args.model or args.recipes:
        for name, options in configs:
            pipe = pipeline_for(source, args.device, options)
            row = {"model": source, "config": name, "batch": args.batch, "backbone_batch": 2 * args.batch,
                   "steps": args.steps, "sampler": args.sampler,
                   **measure(pipe, batch=args.batch, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                             repeats=args.repeats, warmup=args.warmup)}
            rows.append(row)
            print(f"{source:20s} {name:14s} {row['shape']:>10s} bare {row['bare_ms']:.1f} ms  step {row['step_ms']:.1f} ms"
                  f"  ratio {row['ratio']:.3f} (paired {row['paired_ratio']:.3f}, min {row['min_ratio']:.3f}, "
                  f"marginal {row['marginal_ratio']:.3f})  multidiff overhead {row['overhead_ms']:.3f} ms/step "
                  f"({100 * row['overhead_share']:.2f}%), decode {row['decode_ms']:.0f} ms/call, "
                  f"bare spread {100 * row['bare_spread']:.0f}%", flush=True)
    worst = max(r["ratio"] for r in rows if r["config"] == "default")
    extra = {"guidance": args.guidance, "dtype": "float32", "device": args.device, "repeats": args.repeats,
             "weights": "random (recipes) unless --model", "target": "ratio <= 1.05 for every modality",
             "verdict": "met" if worst <= 1.05 else f"missed (worst {worst:.3f})"}
    cols = ["model", "config", "shape", "batch", "backbone_batch", "steps", "sampler", "bare_ms", "step_ms", "ratio",
            "paired_ratio", "min_ratio", "marginal_ratio", "overhead_ms", "overhead_share", "bare_spread",
            "decode_ms"]
    path = write_results("sampler_overhead", rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
