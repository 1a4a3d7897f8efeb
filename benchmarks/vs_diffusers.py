"""multidiff against a hand-written diffusers scheduler loop on the same UNet weights.

    python benchmarks/vs_diffusers.py                     # runs/digits/model, 8 prompts, 20 and 50 steps
    python benchmarks/vs_diffusers.py --steps 20,50,100 --repeats 5

Both sides get identical inputs: the exported UNet (``RUN/model/backbone``, loaded a second time
with ``diffusers.UNet2DConditionModel.from_pretrained``), the text embeddings and mask of
multidiff's conditioner (prompt and null prompt), the same initial noise and the same guidance
scale. The diffusers side is the usual loop (``cat([x, x])``, UNet, CFG on the prediction,
``scheduler.step``) with

- ``DDIMScheduler`` (eta 0) against multidiff's ``ddim``,
- ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2, ``final_sigmas_type="zero"``) against
  multidiff's ``dpmpp_2m``,

both configured from the model's own ``config.yaml`` (beta schedule, timestep spacing, prediction
type). multidiff samples in the sigma frame ``x = x0 + sigma * noise`` from ``noise * sigma_max``
(what ``generate`` does); diffusers in the VP frame, so its initial latents are that same tensor
divided by ``sqrt(1 + sigma_max^2)`` (the frames coincide at sigma 0, where the outputs are compared).

Reported per (sampler, steps): median seconds over ``--repeats`` alternating runs of multidiff's
sampling (``Pipeline.sample_tensors``: seeded noise, cached prompt lookup, guided sampler) and of the
diffusers loop, their ratio (target multidiff / diffusers <= 1.0; also the median of the per-repeat
ratios and the ratio of the fastest runs), one whole ``generate`` call (which also decodes), the
time per step each loop spends outside the UNet (measured with the UNet replaced by an identity:
immune to the machine's noise, which at ~5% dwarfs these sub-millisecond costs), and the max abs
difference of the final samples (in model space, [-1, 1]). Prints a table and writes
benchmarks/results/vs_diffusers.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from sampler_overhead import Identity  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# multidiff's beta schedule names -> diffusers'
BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_NAMES = {"EpsPrediction": "epsilon", "VPrediction": "v_prediction", "X0Prediction": "sample"}


def diffusers_config(model_dir: Path) -> dict:
    """Scheduler arguments that match the model's VP schedule and prediction type."""
    cfg = OmegaConf.load(model_dir / "config.yaml")
    sched = cfg.diffusion.schedule
    if not str(sched._target_).endswith("VPSchedule"):
        raise SystemExit(f"{model_dir}: only discrete VP schedules have a diffusers counterpart here ({sched._target_})")
    if float(sched.get("shift", 1.0)) != 1.0:
        raise SystemExit(f"{model_dir}: schedule shift {sched.shift} has no diffusers scheduler counterpart here")
    spacing = sched.get("spacing", "trailing")
    if spacing == "karras":
        raise SystemExit("karras spacing: use diffusers' use_karras_sigmas, not covered by this benchmark")
    kind = str(cfg.diffusion.parameterization._target_).rsplit(".", 1)[-1]
    return {
        "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
        "beta_schedule": BETA_NAMES[sched.get("beta_schedule", "cosine")],
        "beta_start": float(sched.get("beta_start", 1e-4)),
        "beta_end": float(sched.get("beta_end", 2e-2)),
        "timestep_spacing": spacing,
        "prediction_type": PREDICTION_NAMES[kind],
    }


def make_scheduler(name: str, common: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True, clip_sample=False)
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                       final_sigmas_type="zero", lower_order_final=True)


@torch.inference_mode()
def diffusers_loop(unet, scheduler, latents, tokens, mask, scale: float, steps: int):
    """The textbook diffusers sampling loop with classifier-free guidance (cond first, as multidiff)."""
    scheduler.set_timesteps(steps)
    x = latents
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(inp, t, encoder_hidden_states=tokens, encoder_attention_mask=mask, return_dict=False)[0]
        out_c, out_u = out.chunk(2)
        x = scheduler.step(out_u + scale * (out_c - out_u), t, x, return_dict=False)[0]
    return x


def loop_overheads(pipe, ours, scheduler, latents, tokens, mask, scale, steps, repeats: int = 5) -> tuple[float, float]:
    """ms per step of each loop with its UNet replaced by an identity: everything but the network."""
    backbone = pipe.denoiser.backbone
    unet = backbone.unet
    stub = Identity(unet.config)
    backbone.unet = stub
    try:
        ours()
        a = statistics.median(timed(ours)[0] for _ in range(repeats))
    finally:
        backbone.unet = unet
    diffusers_loop(stub, scheduler, latents, tokens, mask, scale, steps)
    b = statistics.median(timed(lambda: diffusers_loop(stub, scheduler, latents, tokens, mask, scale, steps))[0]
                          for _ in range(repeats))
    return 1e3 * a / steps, 1e3 * b / steps


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/digits/model")
    ap.add_argument("--batch", type=int, default=8, help="prompts (the UNet sees twice as many with CFG)")
    ap.add_argument("--steps", default="20,50")
    ap.add_argument("--samplers", default="ddim,dpmpp_2m")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from diffusers import UNet2DConditionModel

    import multidiff
    from multidiff.core.noise import PerSampleGenerator
    from multidiff.core.samplers import SAMPLERS

    model = Path(args.model)
    pipe = multidiff.load(model, device="cpu")
    unet = UNet2DConditionModel.from_pretrained(str(model / "backbone"), low_cpu_mem_usage=False).eval().requires_grad_(False)
    common = diffusers_config(model)
    prompts = [f"a handwritten digit {DIGITS[k % 10]}" for k in range(args.batch)]
    seeds = [args.seed + k for k in range(args.batch)]
    shape = tuple(pipe.adapter.sample_shape())
    cond, null = pipe.conditioner.encode(prompts), pipe.conditioner.null(args.batch)
    tokens = torch.cat([cond.tokens, null.tokens])
    mask = torch.cat([cond.mask, null.mask]).float()
    noise = PerSampleGenerator(seeds).randn((args.batch, *shape))

    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        sigmas = pipe.schedule.sigmas(steps)
        s0 = float(sigmas[0])
        latents = noise * s0 / math.sqrt(1 + s0**2)  # the VP-frame view of multidiff's start noise * s0
        for name in args.samplers.split(","):
            scheduler = make_scheduler(name, common)
            ours = partial(pipe.sample_tensors, prompts, seeds, shape, SAMPLERS[name], sigmas, args.guidance)
            full = partial(pipe.generate, prompts, seed=args.seed, sampler=name, steps=steps,
                           guidance_scale=args.guidance, batch_size=args.batch, progress=False)
            theirs = partial(diffusers_loop, unet, scheduler, latents, tokens, mask, args.guidance, steps)
            ours(), theirs()  # warm-up
            t_ours, t_theirs, outs = [], [], {}
            for r in range(args.repeats):  # alternating order (ABBA...), so that drift hits both alike
                for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                    t, out = timed(ours if side == "ours" else theirs)
                    (t_ours if side == "ours" else t_theirs).append(t)
                    outs.setdefault(side, out)
            t_full = timed(full)[0]
            diff = (outs["ours"].float() - outs["theirs"].float()).abs().max().item()
            m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
            loop_ours, loop_theirs = loop_overheads(pipe, ours, scheduler, latents, tokens, mask, args.guidance, steps)
            row = {"sampler": name, "diffusers": type(scheduler).__name__, "steps": steps, "batch": args.batch,
                   "multidiff_s": m_ours, "diffusers_s": m_theirs, "ratio": m_ours / m_theirs,
                   "paired_ratio": statistics.median(a / b for a, b in zip(t_ours, t_theirs)),
                   "min_ratio": min(t_ours) / min(t_theirs), "generate_s": t_full, "ratio_generate": t_full / m_theirs,
                   "loop_ms_multidiff": loop_ours, "loop_ms_diffusers": loop_theirs,
                   "spread": (max(t_theirs) - min(t_theirs)) / m_theirs, "max_abs_diff": diff,
                   "output_range": float(outs["theirs"].abs().max())}
            rows.append(row)
            print(f"{name:9s} {steps:3d} steps  multidiff {m_ours:.3f}s (generate {t_full:.3f}s)  diffusers "
                  f"{m_theirs:.3f}s  ratio {row['ratio']:.3f} (paired {row['paired_ratio']:.3f}, min {row['min_ratio']:.3f})"
                  f"  loop overhead {loop_ours:.3f} vs {loop_theirs:.3f} ms/step  max|diff| {diff:.2e}", flush=True)
    worst_ratio = max(r["ratio"] for r in rows)
    worst_diff = max(r["max_abs_diff"] for r in rows)
    extra = {"model": str(model), "scheduler_config": common, "guidance": args.guidance, "repeats": args.repeats,
             "dtype": "float32", "targets": "ratio <= 1.0; outputs agree (max abs diff ~1e-4)",
             "worst_ratio": worst_ratio, "worst_max_abs_diff": worst_diff}
    cols = ["sampler", "diffusers", "steps", "batch", "multidiff_s", "diffusers_s", "ratio", "paired_ratio",
            "min_ratio", "generate_s", "ratio_generate", "loop_ms_multidiff", "loop_ms_diffusers", "spread",
            "max_abs_diff"]
    path = write_results("vs_diffusers", rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
