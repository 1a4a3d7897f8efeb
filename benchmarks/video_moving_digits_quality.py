"""Quality of the video_moving_digits recipe: does the clip move the prompted way, and is it the prompted digit?

    python benchmarks/video_moving_digits_quality.py --train             # train the recipe (timed), then evaluate
    python benchmarks/video_moving_digits_quality.py --model runs/video_digits/model
    python benchmarks/video_moving_digits_quality.py --train --recipe video_moving_digits_latent \
        --autoencoder-recipe autoencoder_moving_digits --model runs/video_latent/model --name video_moving_digits_latent_recipe

The frame size, frame count, digit size and speed are those the model was trained with (its run's
``config.yaml``); with ``--autoencoder-recipe`` the autoencoder is trained first (timed, into ``AE/``
beside the model's run directory) and its reconstructions of real clips are judged too.

For prompts over every digit and direction ("the digit 3 moving to the left"), generated clips are
judged by two measurements made on the frames only:

- motion direction: the centre of mass of the ink (above the frame's median) in every frame; the
  least-squares velocity over the first half of the clip (every training clip moves in its
  captioned direction for that long before it may bounce) is assigned to the nearest of the four
  directions; under 0.25 px/frame counts as "no motion" (wrong).
- digit: an SVM trained only on real scikit-learn digits (a held-out 30 % scores
  ``real_test_accuracy``) labels a 10x10 crop centred on the ink in every frame; the clip's label
  is the majority over frames.

Fidelity beside accuracy: ``speed`` (px/frame; the data moves at 1), ``mass_cv`` (variation of the
ink mass over a clip's frames; real clips: 0), ``fd_ratio`` (Fréchet distance of the digit crops
to real digits in a PCA space, over the real-vs-real distance) and ``saturated``. The same judge on
real clips of held-out digits gives the ceiling. Prints a table and writes
benchmarks/results/video_moving_digits_quality.{json,md} and a sample sheet (.png).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from multidiff.datasets.digits import digits_images  # noqa: E402
from multidiff.datasets.moving_digits import DIRECTIONS, first_half_steps, moving_caption  # noqa: E402

FOUR = ("left", "right", "up", "down")


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real))


def centre_of_mass(clip: np.ndarray) -> np.ndarray:
    """clip ``(T, H, W)`` in [0, 1] -> ``(T, 2)`` ink centre ``(y, x)`` per frame (background removed)."""
    w = np.clip(clip - np.median(clip, axis=(1, 2), keepdims=True), 0, None)
    mass = w.sum((1, 2)) + 1e-8
    ys, xs = np.arange(clip.shape[1]), np.arange(clip.shape[2])
    return np.stack([(w.sum(2) * ys).sum(1) / mass, (w.sum(1) * xs).sum(1) / mass], 1)


def velocity(clip: np.ndarray) -> np.ndarray:
    """Least-squares ``(dy, dx)`` per frame of the centre of mass over the first half of the clip."""
    n = first_half_steps(clip.shape[0]) + 1
    com = centre_of_mass(clip)[:n]
    t = np.arange(n) - (n - 1) / 2
    return (t[:, None] * (com - com.mean(0))).sum(0) / (t**2).sum()


def direction_of(v: np.ndarray, directions=FOUR, min_speed: float = 0.25) -> str:
    if np.hypot(*v) < min_speed:
        return "none"
    units = {d: np.array(DIRECTIONS[d], float) / np.hypot(*DIRECTIONS[d]) for d in directions}
    return max(units, key=lambda d: float(units[d] @ v))


class Judge:
    """Digit classifier and PCA features fitted on real digits only (``digit_size`` px).

    Digits are compared as ``window x window`` crops centred on their ink's centre of mass, both
    when fitting (real digits on a black canvas) and when judging frames, so the classifier sees
    real and generated digits cut out the same way.
    """

    def __init__(self, digit_size: int = 8, seed: int = 0, pca_dim: int = 16, window: int | None = None,
                 min_speed: float = 0.25) -> None:
        from sklearn.decomposition import PCA
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        window = window or digit_size + 2 * max(1, digit_size // 8)
        self.size, self.window, self.min_speed = digit_size, window, min_speed
        images, labels = digits_images(digit_size)
        margin = (window - digit_size) // 2 + 1
        canvas = F.pad(images[:, 0], (margin,) * 4).numpy()  # each real digit on a black canvas
        flat = np.stack([self.crops(c[None])[0] for c in canvas]).reshape(len(labels), -1)
        idx = np.arange(len(labels))
        tr, te = train_test_split(idx, test_size=0.3, random_state=seed, stratify=labels)
        self.clf = SVC(gamma="scale", C=10).fit(flat[tr], labels[tr])
        self.real_accuracy = float((self.clf.predict(flat[te]) == labels[te]).mean())
        self.test_digits = set(te.tolist())
        self.pca = PCA(pca_dim, random_state=seed).fit(flat)
        perm = np.random.default_rng(seed).permutation(len(flat))
        half = len(flat) // 2
        self.ref = self.pca.transform(flat[perm[:half]])
        self.real_vs_real = frechet(self.pca.transform(flat[perm[half:]]), self.ref)

    def crops(self, clip: np.ndarray) -> np.ndarray:
        """``(T, H, W)`` -> ``(T, window, window)``: each frame cut around its ink's centre of mass."""
        k = self.window
        com = centre_of_mass(clip)
        padded = np.pad(clip, ((0, 0), (k, k), (k, k)))
        top = np.round(com - (k - 1) / 2).astype(int) + k
        return np.stack([padded[t, y : y + k, x : x + k] for t, (y, x) in enumerate(top)])

    def score(self, clips: np.ndarray, digits: np.ndarray, directions: list[str]) -> dict:
        """clips ``(N, T, H, W)`` in [0, 1]; the prompted digit and direction of each."""
        crops = np.stack([self.crops(c) for c in clips])  # (N, T, s, s)
        n, t = crops.shape[:2]
        frame_pred = self.clf.predict(crops.reshape(n * t, -1)).reshape(n, t)
        clip_pred = np.array([np.bincount(p, minlength=10).argmax() for p in frame_pred])
        vel = np.stack([velocity(c) for c in clips])
        moved = [direction_of(v, min_speed=self.min_speed) for v in vel]
        mass = clips.reshape(n, t, -1).sum(2)
        return {
            "direction_acc": float(np.mean([m == d for m, d in zip(moved, directions)])),
            "digit_acc": float((clip_pred == digits).mean()),
            "digit_acc_frames": float((frame_pred == digits[:, None]).mean()),
            "both_acc": float(np.mean([(m == d) and (p == g) for m, d, p, g in zip(moved, directions, clip_pred, digits)])),
            "speed": float(np.hypot(vel[:, 0], vel[:, 1]).mean()),
            "mass_cv": float((mass.std(1) / (mass.mean(1) + 1e-8)).mean()),
            "fd_ratio": frechet(self.pca.transform(crops.reshape(n * t, -1)), self.ref) / self.real_vs_real,
            "saturated": float(((clips <= 1 / 255) | (clips >= 254 / 255)).mean()),
        }


def real_clips(judge: Judge, data_root: str, limit: int | None = None, **data) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Real clips of held-out digits (materialized like the recipe's data: ``data`` are the settings of
    :func:`materialize_moving_digits`)."""
    from multidiff.adapters.video import read_video
    from multidiff.datasets.moving_digits import materialize_moving_digits, read_rows

    folder = materialize_moving_digits(data_root, **data)
    rows = [r for r in read_rows(folder) if r["digit_index"] in judge.test_digits][:limit]
    clips = np.stack([read_video(folder / r["file_name"], channels=1)[0][0].numpy() for r in rows])
    return clips, np.array([r["label"] for r in rows]), [r["direction"] for r in rows]


def generate(pipe, *, per_prompt: int, template: int, num_frames: int | None, sampler: str, steps: int,
             guidance: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    combos = [(d, where) for d in range(10) for where in FOUR]
    prompts = [moving_caption(d, where, template) for d, where in combos]
    options = {} if num_frames is None else {"num_frames": num_frames}
    out = pipe.generate(prompts, num_samples=per_prompt, seed=seed, sampler=sampler, steps=steps,
                        guidance_scale=guidance, batch_size=40, progress=False, **options)
    digits = np.repeat([d for d, _ in combos], per_prompt)
    directions = [where for _, where in combos for _ in range(per_prompt)]
    return out[:, 0].numpy(), digits, directions


def sample_sheet(pipe, path: Path, seed: int, guidance: float) -> None:
    """One clip per (digit, direction) for digits 0-9 as frame strips, saved as a PNG to look at."""
    from torchvision.utils import make_grid, save_image

    prompts = [moving_caption(d, where) for d in range(10) for where in FOUR]
    clips = pipe.generate(prompts, num_samples=1, seed=seed, steps=20, guidance_scale=guidance, batch_size=40, progress=False)
    strips = [pipe.adapter.preview(c) for c in clips]
    save_image(make_grid(torch.stack(strips), nrow=4, padding=2, pad_value=1.0), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/video_digits/model")
    ap.add_argument("--train", action="store_true", help="train recipe=video_moving_digits into the model's run dir first")
    ap.add_argument("--train-args", default="", help="extra overrides for --train, space separated")
    ap.add_argument("--per-prompt", type=int, default=5, help="samples per (digit, direction) prompt, main row")
    ap.add_argument("--per-prompt-extra", type=int, default=2, help="samples per prompt for the other rows")
    ap.add_argument("--guidance", type=float, default=2.0, help="main row (the generate default)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--name", default="video_moving_digits_quality")
    ap.add_argument("--recipe", default="video_moving_digits", help="the recipe --train trains")
    ap.add_argument("--autoencoder-recipe", default=None, help="train this autoencoder recipe first (latent recipes)")
    ap.add_argument("--ae-name", default="autoencoder_moving_digits_recipe", help="results file of the autoencoder")
    args = ap.parse_args()

    extra: dict = {"recipe": args.recipe}
    model = Path(args.model)
    ae_model = model.parent.parent / "AE" / "model"
    if args.train:
        overrides = args.train_args.split()
        if args.train_args:  # the overrides on top of the recipe: the record says what ran
            extra["train_args"] = args.train_args
        if args.autoencoder_recipe:
            ae = train(ae_model.parent, args.data_root, [], recipe=args.autoencoder_recipe)
            extra["autoencoder_minutes"] = ae["train_minutes"]
            overrides.append(f"autoencoder.path={ae_model}")
        extra.update(train(model.parent, args.data_root, overrides, recipe=args.recipe))
        extra["diffusion_minutes"] = extra["train_minutes"]
        extra["train_minutes"] = round(extra["train_minutes"] + extra.get("autoencoder_minutes", 0), 2)
    metrics = model.parent / "logs" / "metrics.csv"
    if metrics.is_file():
        extra.update(_train_speed(metrics))

    import multidiff

    torch.manual_seed(0)
    pipe = multidiff.load(model, device="cpu")
    data = data_settings(model, pipe)
    judge = Judge(digit_size=data["digit_size"], min_speed=0.25 * data["speed"])
    extra.update({"model": str(model), "real_test_accuracy": judge.real_accuracy, "data": data,
                  "prompt": "the digit {d} moving {to the left|to the right|up|down}"})
    rows = []
    clips, digits, dirs = real_clips(judge, args.data_root, **data)
    rows.append({"source": "real clips (held-out digits)", "frames": clips.shape[1], "clips": len(clips),
                 **judge.score(clips, digits, dirs)})
    if not pipe.stage.is_identity:
        recon = reconstruct(pipe.stage, clips)
        row = {"source": "real clips through the autoencoder", "frames": recon.shape[1], "clips": len(recon),
               **judge.score(recon, digits, dirs)}
        row["agreement"] = agreement(judge, clips, recon)
        rows.append(row)
        print(f"autoencoder: digit {row['digit_acc']:.3f} direction {row['direction_acc']:.3f} "
              f"frame agreement {row['agreement']:.4f}", flush=True)
        ae_extra = {"recipe": args.autoencoder_recipe, "model": str(ae_model)}
        if "autoencoder_minutes" in extra:
            ae_extra["train_minutes"] = extra["autoencoder_minutes"]
        write_results(args.ae_name, [row], list(row), ae_extra)
    g, n, n2 = args.guidance, args.per_prompt, args.per_prompt_extra
    frames = data["num_frames"]
    base = dict(template=0, num_frames=None, sampler="dpmpp_2m", steps=args.steps, guidance=g)
    runs = [
        ("generated", dict(base, per_prompt=n)),
        ("generated, guidance 4", dict(base, per_prompt=n2, guidance=4.0)),
        ("generated, guidance 6", dict(base, per_prompt=n2, guidance=6.0)),
        ("generated, paraphrase 'a handwritten {name} moving ...'", dict(base, per_prompt=n2, template=1)),
        ("generated, ddim", dict(base, per_prompt=n2, sampler="ddim")),
        (f"generated, {2 * frames} frames (trained on {frames})", dict(base, per_prompt=n2, num_frames=2 * frames)),
    ]
    for name, kw in runs:
        t0 = time.time()
        clips, digits, dirs = generate(pipe, seed=args.seed, **kw)
        row = {"source": name, "sampler": kw["sampler"], "steps": kw["steps"], "guidance": kw["guidance"], "frames": clips.shape[1],
               "clips": len(clips), **judge.score(clips, digits, dirs), "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{name:55s} direction {row['direction_acc']:.3f}  digit {row['digit_acc']:.3f}  "
              f"speed {row['speed']:.2f}  fd {row['fd_ratio']:.2f}  ({row['seconds']} s)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    sample_sheet(pipe, RESULTS / f"{args.name}_samples.png", args.seed, args.guidance)
    cols = ["source", "sampler", "steps", "guidance", "frames", "clips", "direction_acc", "digit_acc", "digit_acc_frames",
            "both_acc", "speed", "mass_cv", "fd_ratio", "saturated", "seconds"]
    path = write_results(args.name, rows, cols, extra)
    print()
    print(path.read_text())


def data_settings(model: Path, pipe) -> dict:
    """The moving-digits settings the model was trained on: frame size and count from its modality, the
    rest from its run's ``config.yaml`` (defaults when the run directory is gone)."""
    from omegaconf import OmegaConf

    config = model.parent / "config.yaml"
    dataset = OmegaConf.load(config).data.dataset if config.is_file() else {}
    _, frames, h, w = pipe.adapter.shape
    return {"canvas": [int(h), int(w)], "num_frames": int(frames), "digit_size": int(dataset.get("digit_size", 8)),
            "speed": int(dataset.get("speed", 1)), "fps": float(pipe.adapter.fps)}


@torch.no_grad()
def reconstruct(stage, clips: np.ndarray) -> np.ndarray:
    """Real clips ``(N, T, H, W)`` in [0, 1] through the stage's round trip, back in [0, 1]."""
    x = torch.from_numpy(clips)[:, None] * 2 - 1
    out = [stage.decode(stage.encode(x[i : i + 16]), shape=tuple(x.shape[1:])) for i in range(0, len(x), 16)]
    return ((torch.cat(out)[:, 0] + 1) / 2).clamp(0, 1).numpy()


def agreement(judge: Judge, clips: np.ndarray, recon: np.ndarray) -> float:
    """Share of frames whose reconstruction the digit classifier labels as it labels the real frame."""
    a, b = (np.stack([judge.crops(c) for c in v]) for v in (clips, recon))
    n, t = a.shape[:2]
    return float((judge.clf.predict(a.reshape(n * t, -1)) == judge.clf.predict(b.reshape(n * t, -1))).mean())


def train(run_dir: Path, data_root: str, overrides: list[str], attempts: int = 5, recipe: str = "video_moving_digits") -> dict:
    """Train the recipe into ``run_dir``, timed; a run stopped by a signal is resumed (resume=auto)
    and the attempts' times are summed, so the minutes reported are minutes of training."""
    if (run_dir / "model").exists():
        raise SystemExit(f"{run_dir} already holds a trained model; remove it or pass another --model to train anew")
    from multidiff.cli.main import main as cli

    seconds, done = 0.0, False
    for attempt in range(attempts):
        argv = ["train", f"recipe={recipe}", f"run_dir={run_dir}", f"data_root={data_root}",
                "+trainer.enable_progress_bar=false", *overrides]
        t0 = time.time()
        code = cli(argv + (["resume=auto"] if attempt else []))  # in process: the timing is the training's
        seconds += time.time() - t0
        if code != 0:
            raise SystemExit(f"training failed with exit code {code}")
        if (run_dir / "model" / "multidiff.json").is_file():
            done = True
            break
        print(f"training was interrupted (attempt {attempt + 1}); resuming", flush=True)
    if not done:
        raise SystemExit(f"training did not finish in {attempts} attempts")
    return {"train_minutes": round(seconds / 60, 2), "train_attempts": attempt + 1}


def _train_speed(metrics: Path) -> dict:
    """Steps and the final loss from a run's CSV log (train time itself is measured by --train)."""
    import csv

    with open(metrics, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    if not rows:
        return {}
    tail = [float(r["train/loss"]) for r in rows[-20:]]
    return {"train_steps": int(rows[-1]["step"]) + 1, "final_loss_mean_last_20_logs": round(sum(tail) / len(tail), 4)}


if __name__ == "__main__":
    main()
