"""What the latent stage buys: time and peak memory per training and sampling step, pixel vs latent,
at the same output size.

    python benchmarks/latent_cost.py                       # image 32x32 and video 16x32x32
    python benchmarks/latent_cost.py --pairs image --repeats 5

| pair  | pixel model                                           | latent model                                          |
|-------|-------------------------------------------------------|-------------------------------------------------------|
| image | image_digits at modality.size=32 (1x32x32)            | image_digits_latent (4x8x8 latents of a 4x autoencoder) |
| video | video_moving_digits at 16 frames of 32x32 (1x16x32x32) | video_moving_digits_latent (4x16x8x8, per-frame autoencoder) |

Each model keeps its recipe's backbone and batch size (random weights: the cost does not depend on
them; the autoencoder is the autoencoder recipe's architecture, untrained). Measured, each in its
own process (peak memory is the process's resident high-water mark above the memory before the
first step; on CUDA ``max_memory_allocated``), as medians over ``--repeats`` steps after a warm-up:

- ``train``: denoiser loss + backward + AdamW on a batch of model tensors (latents read from the
  cache: no encoding in the step);
- ``encode``: the autoencoder's encode of a batch of data (what each step would add without the cache;
  paid once per item with it);
- ``sample``: one classifier-free-guided denoiser call on a batch (what every sampler step costs);
- ``decode``: the autoencoder's decode of a batch (paid once per generated batch, not per step).

Writes benchmarks/results/latent_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from scaling import measure  # noqa: E402

PAIRS = {
    # pair: (pixel overrides, latent recipe, autoencoder recipe, prompt)
    "image": (["recipe=image_digits", "modality.size=32"], "image_digits_latent", "autoencoder_digits",
              "a handwritten digit three"),
    "video": (["recipe=video_moving_digits", "modality.size=32", "modality.num_frames=16", "data.dataset.digit_size=16",
               "data.dataset.speed=2"], "video_moving_digits_latent", "autoencoder_moving_digits",
              "the digit 3 moving to the left"),
}


def autoencoder_export(recipe: str, directory: Path) -> Path:
    """An untrained autoencoder of ``recipe``'s architecture, exported as its run would export it."""
    from omegaconf import OmegaConf

    from multidiff.autoencoders.trained import export_autoencoder
    from multidiff.cli.compose import compose
    from multidiff.configuration import safe_instantiate

    cfg = compose("train", [f"recipe={recipe}"])
    adapter = safe_instantiate(cfg.modality)
    stage = safe_instantiate(cfg.autoencoder, shape=tuple(adapter.shape))
    return export_autoencoder(directory, stage, OmegaConf.to_yaml(cfg.modality))


def worker(overrides: list[str], mode: str, repeats: int, prompt: str) -> dict:
    from multidiff.cli.compose import compose
    from multidiff.core.guidance import CFGDenoiser
    from multidiff.pipeline import build_parts

    cfg = compose("train", overrides)
    batch = int(cfg.data.batch_size)
    parts = build_parts(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    denoiser, text, stage = parts.denoiser.to(device), parts.conditioner.to(device), parts.stage.to(device)
    data_shape = tuple(parts.adapter.sample_shape())
    shape = (batch, *stage.latent_shape(data_shape))
    cond = text.encode([prompt] * batch)
    z = torch.randn(shape, device=device)
    x = torch.rand((batch, *data_shape), device=device) * 2 - 1
    if mode == "train":
        denoiser.train()
        opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)

        def step() -> None:
            loss = denoiser.loss(z, torch.rand(batch, device=device) * 10 + 0.05, torch.randn_like(z), cond).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif mode == "sample":
        denoiser.eval()
        guided, sigma = CFGDenoiser(denoiser, text.null(), 2.0), torch.full((batch,), 2.0, device=device)

        def step() -> None:
            with torch.no_grad():
                guided(z, sigma, cond)
    else:
        if stage.is_identity:
            return {"seconds": 0.0, "peak_mb": 0.0}

        def step() -> None:
            with torch.no_grad():
                stage.encode(x) if mode == "encode" else stage.decode(z, shape=data_shape)

    seconds, peak = measure(step, repeats, device)
    return {"seconds": seconds, "peak_mb": peak, "batch": batch,
            "data_shape": "x".join(map(str, data_shape)), "model_shape": "x".join(map(str, shape[1:])),
            "params": sum(p.numel() for p in denoiser.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "PROMPT"), help=argparse.SUPPRESS)
    ap.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.overrides, args.worker[0], args.repeats, args.worker[1])))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            pixel, latent_recipe, ae_recipe, prompt = PAIRS[pair]
            ae = autoencoder_export(ae_recipe, Path(tmp) / pair)
            for kind, overrides in (("pixel", pixel), ("latent", [f"recipe={latent_recipe}", f"autoencoder.path={ae}"])):
                row = {"pair": pair, "model": kind}
                for mode in ("train", "sample", "encode", "decode"):
                    cmd = [sys.executable, __file__, "--worker", mode, prompt, "--repeats", str(args.repeats),
                           "--overrides", *overrides]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"{pair} {kind} {mode} failed:\n{proc.stderr[-3000:]}")
                    out = json.loads(proc.stdout.strip().splitlines()[-1])
                    row.update({k: out[k] for k in ("batch", "data_shape", "model_shape", "params") if k in out})
                    row[f"{mode}_s"], row[f"{mode}_mb"] = round(out["seconds"], 4), round(out["peak_mb"], 1)
                rows.append(row)
                print(f"{pair:5s} {kind:6s} {row['model_shape']:>12s}  train {row['train_s']:.3f} s ({row['train_mb']:.0f} MB)"
                      f"  sample {row['sample_s']:.3f} s ({row['sample_mb']:.0f} MB)  encode {row['encode_s']:.3f} s"
                      f"  decode {row['decode_s']:.3f} s", flush=True)
    for row in rows:  # what the stage buys: the pixel model's cost over the latent model's
        if row["model"] == "latent":
            pix = next(r for r in rows if r["pair"] == row["pair"] and r["model"] == "pixel")
            row["train_speedup"] = round(pix["train_s"] / row["train_s"], 2)
            row["sample_speedup"] = round(pix["sample_s"] / row["sample_s"], 2)
            row["train_memory_ratio"] = round(pix["train_mb"] / max(row["train_mb"], 1e-6), 2)
    cols = ["pair", "model", "data_shape", "model_shape", "batch", "params", "train_s", "train_mb", "sample_s", "sample_mb",
            "encode_s", "decode_s", "train_speedup", "sample_speedup", "train_memory_ratio"]
    path = write_results("latent_cost", rows, cols)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
