"""Quality of the image_digits recipes: prompted-digit accuracy and Fréchet distance.

    python benchmarks/image_digits_quality.py --train          # train the recipe (timed), then evaluate
    python benchmarks/image_digits_quality.py --model runs/digits/model
    python benchmarks/image_digits_quality.py --train --recipe image_digits_latent \
        --autoencoder-recipe autoencoder_digits --model runs/latent/model --name image_digits_latent_recipe

With ``--autoencoder-recipe`` the autoencoder is trained first (timed too, into ``AE/`` beside the
model's run directory) and measured on its own: the share of real digits whose reconstruction the
classifier labels as it labels the digit (``agreement``), written to ``--ae-name``.

A classifier trained only on the real scikit-learn digits (upsampled like the dataset) labels the
generated images; a Fréchet distance between Gaussian fits of generated and real digits in a PCA
space fitted on real digits measures fidelity and diversity, reported next to the same distance
between two halves of the real data (the floor). Saturation (share of pixels at pure 0 or 1) and
total variation (speckle) are reported against their real values. Prints a table and writes
benchmarks/results/image_digits_quality.{json,md}.
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
from common import write_results  # noqa: E402

from multidiff.datasets.digits import DIGIT_NAMES, digits_images  # noqa: E402


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (rows are samples)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def image_stats(x: np.ndarray) -> dict:
    """x: (N, H, W) in [0, 1]. Saturation share and mean total variation per image."""
    sat = float(((x <= 1 / 255) | (x >= 254 / 255)).mean())
    tv = float((np.abs(np.diff(x, axis=1)).sum((1, 2)) + np.abs(np.diff(x, axis=2)).sum((1, 2))).mean())
    return {"saturated": sat, "total_variation": tv}


class Judge:
    """Classifier + PCA features, both fitted on real digits only."""

    def __init__(self, size: int = 16, seed: int = 0, pca_dim: int = 20) -> None:
        from sklearn.decomposition import PCA
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        self.size = size
        images, labels = digits_images(size)
        x = images[:, 0].numpy()
        flat = x.reshape(len(x), -1)
        xtr, xte, ytr, yte = train_test_split(flat, labels, test_size=0.3, random_state=seed, stratify=labels)
        self.clf = SVC(gamma="scale", C=10).fit(xtr, ytr)
        self.real_accuracy = float((self.clf.predict(xte) == yte).mean())
        self.pca = PCA(pca_dim, random_state=seed).fit(flat)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(flat))
        half = len(flat) // 2
        self.ref = self.pca.transform(flat[perm[:half]])
        self.real_vs_real = frechet(self.pca.transform(flat[perm[half:]]), self.ref)
        self.real_stats = image_stats(x)

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict:
        flat = images.reshape(len(images), -1)
        acc = float((self.clf.predict(flat) == labels).mean())
        fd = frechet(self.pca.transform(flat), self.ref)
        return {"accuracy": acc, "frechet": fd, "fd_ratio": fd / self.real_vs_real, **image_stats(images)}


def generate(pipe, sampler: str, steps: int, per_digit: int, guidance: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    prompts = [f"a handwritten digit {name}" for name in DIGIT_NAMES]
    out = pipe.generate(prompts, num_samples=per_digit, seed=seed, sampler=sampler, steps=steps,
                        guidance_scale=guidance, batch_size=100, progress=False)
    labels = np.repeat(np.arange(10), per_digit)
    return out[:, 0].numpy(), labels


def train(recipe: str, run_dir: Path, *overrides: str) -> float:
    """Train ``recipe`` into ``run_dir`` through the CLI; minutes taken."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "multidiff.cli.main", "train", f"recipe={recipe}", f"run_dir={run_dir}",
                    "+trainer.enable_progress_bar=false", *overrides], check=True)
    return round((time.time() - t0) / 60, 2)


@torch.no_grad()
def autoencoder_row(stage, judge: Judge) -> dict:
    """How faithfully a latent stage reconstructs every real digit (model space ``[-1, 1]``): the share
    the classifier labels as it labels the original, and the PSNR."""
    images, _ = digits_images(judge.size)
    x = images * 2 - 1
    stage = stage.cpu().eval()
    recon = torch.cat([stage.decode(stage.encode(x[i : i + 256]), shape=tuple(x.shape[1:])) for i in range(0, len(x), 256)])
    real, back = images[:, 0].numpy(), ((recon + 1) / 2).clamp(0, 1)[:, 0].numpy()
    same = judge.clf.predict(back.reshape(len(back), -1)) == judge.clf.predict(real.reshape(len(real), -1))
    mse = float(((recon - x) ** 2).mean())
    return {"items": len(x), "agreement": float(same.mean()), "mse": mse, "psnr": float(10 * np.log10(4 / mse)),
            "latent_shape": "x".join(map(str, stage.latent_shape())), **{f"recon_{k}": v for k, v in image_stats(back).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/digits/model")
    ap.add_argument("--train", action="store_true", help="train recipe=image_digits into the model's run dir first")
    ap.add_argument("--per-digit", type=int, default=50, help="samples per digit for the main row")
    ap.add_argument("--per-digit-extra", type=int, default=20, help="samples per digit for the other rows")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--steps-extra", default="5,10,50", help="other step counts of dpmpp_2m at the main guidance")
    ap.add_argument("--guidance-extra", default="1.0,4.0", help="other guidance scales at 20 steps")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--samplers", default="ddim,euler,heun,dpmpp_3m", help="extra samplers at 20 steps")
    ap.add_argument("--name", default="image_digits_quality", help="results file name under benchmarks/results")
    ap.add_argument("--recipe", default="image_digits", help="the recipe --train trains")
    ap.add_argument("--autoencoder-recipe", default=None, help="train this autoencoder recipe first (latent recipes)")
    ap.add_argument("--ae-name", default="autoencoder_digits_recipe", help="results file of the autoencoder's measures")
    ap.add_argument("--train-args", default="", help="extra overrides for --train, space separated (e.g. diffusion=v_cosine)")
    args = ap.parse_args()

    extra = {"recipe": args.recipe}
    if args.train_args:
        extra["train_args"] = args.train_args
    model = Path(args.model)
    ae_model = model.parent.parent / "AE" / "model"
    if args.train:
        run_dir = model.parent
        extra_args = []
        if args.autoencoder_recipe:
            ae_minutes = train(args.autoencoder_recipe, ae_model.parent)
            extra_args = [f"autoencoder.path={ae_model}"]
            extra["autoencoder_minutes"] = ae_minutes
        extra["diffusion_minutes"] = train(args.recipe, run_dir, *extra_args, *args.train_args.split())
        extra["train_minutes"] = round(extra["diffusion_minutes"] + extra.get("autoencoder_minutes", 0), 2)

    import multidiff

    torch.manual_seed(0)
    pipe = multidiff.load(model)
    judge = Judge(size=int(pipe.adapter.shape[-1]))
    if args.autoencoder_recipe:
        ae_row = autoencoder_row(pipe.stage, judge)
        print(f"autoencoder: agreement {ae_row['agreement']:.4f}  psnr {ae_row['psnr']:.2f} dB", flush=True)
        ae_extra = {"recipe": args.autoencoder_recipe, "model": str(ae_model)}
        if "autoencoder_minutes" in extra:
            ae_extra["train_minutes"] = extra["autoencoder_minutes"]
        write_results(args.ae_name, [ae_row], list(ae_row), ae_extra)
        extra["autoencoder_agreement"] = ae_row["agreement"]
    extra.update({"model": str(model), "real_vs_real_frechet": judge.real_vs_real,
                  "real_test_accuracy": judge.real_accuracy, "real_saturated": judge.real_stats["saturated"],
                  "real_total_variation": judge.real_stats["total_variation"]})
    g = args.guidance
    runs = [("dpmpp_2m", 20, args.per_digit, g)]
    runs += [("dpmpp_2m", int(s), args.per_digit_extra, g) for s in args.steps_extra.split(",") if s]
    runs += [("dpmpp_2m", 20, args.per_digit_extra, float(x)) for x in args.guidance_extra.split(",") if x]
    runs += [(s, 20, args.per_digit_extra, g) for s in args.samplers.split(",") if s]
    rows = []
    for sampler, steps, n, guidance in runs:
        t0 = time.time()
        images, labels = generate(pipe, sampler, steps, n, guidance, args.seed)
        row = {"sampler": sampler, "steps": steps, "guidance": guidance, "samples": len(images),
               **judge.score(images, labels), "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{sampler:10s} {steps:3d} steps cfg {guidance:.1f} acc {row['accuracy']:.3f}  FD {row['frechet']:.2f} "
              f"({row['fd_ratio']:.2f}x real-vs-real)  sat {row['saturated']:.3f}  tv {row['total_variation']:.2f}",
              flush=True)
    cols = ["sampler", "steps", "guidance", "samples", "accuracy", "frechet", "fd_ratio", "saturated", "total_variation", "seconds"]
    path = write_results(args.name, rows, cols, extra)
    print()
    print(path.read_text())


if __name__ == "__main__":
    main()
