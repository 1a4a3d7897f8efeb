"""Editing quality on real embedded data, judged independently: inpainting digits, continuing notes,
filling the middle frames of moving-digit clips. Training-free editing of the recipes' models
(``docs/editing.md``); a mask-conditioned model (``editing=masked``) adds rows when given.

    python benchmarks/editing_quality.py --digits runs/digits/model --notes runs/notes/model \
        --video runs/video/model [--digits-masked runs/digits_masked/model] [--data-root data]

- **digits**: real scikit-learn digits (``--per-digit`` of each class) with the lower half
  regenerated (``fill_box=[8,0,16,16]``), prompted with the true digit; the classifier of
  ``image_digits_quality.py`` (fitted on real digits only) must recognise the prompted digit, and the
  upper half must be the input exactly. Baselines: the real digits, the lower half blanked, and a
  prompt naming another digit (what the prompt does, and what the kept half alone implies).
- **notes**: held-out real notes (the judge's test split) whose first half (0-0.512 s) is kept and
  whose second half is generated from a prompt naming the note; the pitch tracker of
  ``audio_notes_quality.py`` measures the second half against the prompted pitch (50 cents).
- **video**: real clips of held-out digits with the first and last frame kept and the six middle
  ones generated; the judges of ``video_moving_digits_quality.py`` measure the direction of motion
  and the digit of the six generated frames. Baseline: a cross-fade of the two kept frames.

Prints a table per task and writes benchmarks/results/editing_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

from multidiff.core.samplers import SAMPLERS  # noqa: E402
from multidiff.pipeline import Edit, decode_samples  # noqa: E402


@torch.inference_mode()
def edit_batch(pipe, prompts: list[str], known: torch.Tensor, keep: torch.Tensor, *, seed: int, steps: int = 20,
               guidance: float = 2.0, sampler: str = "dpmpp_2m", harmonize: int = 0, batch: int = 50) -> list[torch.Tensor]:
    """One edit per row of ``known`` ``(N, C, *dims)`` (the adapter's tensors), region ``keep``
    ``(N or 1, 1, *dims)``, through the pipeline's own parts: latent edit, sampler, decode with the
    kept region pasted. Returns the decoded raw samples."""
    shape = tuple(known.shape[1:])
    sigmas = pipe.schedule.sigmas(steps)
    out = []
    for i in range(0, len(prompts), batch):
        k = keep if keep.shape[0] == 1 else keep[i : i + batch]
        edit = pipe.latent_edit(Edit(known[i : i + batch], k, 1.0, harmonize))
        z = pipe.sample_tensors(prompts[i : i + batch], list(range(seed + i, seed + i + len(edit.known))),
                                pipe.stage.latent_shape(shape), SAMPLERS[sampler], sigmas, guidance, edit=edit)
        out.extend(r.cpu() for r in decode_samples(pipe.stage, pipe.adapter, z, shape, paste=(known[i : i + batch], k)))
    return out


# -- digits --------------------------------------------------------------------------------------

def digits_task(model: str, *, per_digit: int, seed: int, masked: str | None) -> tuple[list[dict], dict]:
    from image_digits_quality import Judge

    import multidiff
    from multidiff.datasets.digits import DIGIT_NAMES, digits_images

    judge = Judge()
    images, labels = digits_images(judge.size)
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.choice(np.flatnonzero(labels == d), per_digit, replace=False) for d in range(10)])
    real, truth = images[pick], labels[pick]
    h = real.shape[-2]
    known = real * 2 - 1
    keep = torch.ones(1, 1, h, real.shape[-1])
    keep[..., h // 2 :, :] = 0

    def row(source: str, x: torch.Tensor, prompted: np.ndarray, seconds: float | None = None) -> dict:
        x = x[:, 0].numpy()
        pred = judge.clf.predict(x.reshape(len(x), -1))
        upper = np.abs(np.round(x[:, : h // 2] * 255) - np.round(real[:, 0, : h // 2].numpy() * 255)).max()
        return {"source": source, "samples": len(x), "prompted_acc": float((pred == prompted).mean()),
                "true_digit_acc": float((pred == truth).mean()), "upper_half_max_diff_255": float(upper),
                "seconds": seconds}

    blank = real.clone()
    blank[..., h // 2 :, :] = 0
    rows = [row("real digits", real, truth), row("lower half blanked (no generation)", blank, truth)]
    prompts = [f"a handwritten digit {DIGIT_NAMES[d]}" for d in truth]
    other = (truth + 5) % 10
    runs = [("inpainted, dpmpp_2m", {}, prompts, truth), ("inpainted, harmonize 2", {"harmonize": 2}, prompts, truth),
            ("inpainted, euler_ancestral", {"sampler": "euler_ancestral"}, prompts, truth),
            ("inpainted, prompt names digit + 5", {}, [f"a handwritten digit {DIGIT_NAMES[d]}" for d in other], other)]
    models = [("", multidiff.load(model, device="cpu"))]
    if masked:
        models.append(("mask-conditioned: ", multidiff.load(masked, device="cpu")))
    for prefix, pipe in models:
        for name, kw, ps, prompted in runs:
            t0 = time.time()
            x = torch.stack(edit_batch(pipe, ps, known, keep, seed=seed, **kw))
            rows.append(row(prefix + name, x, prompted, round(time.time() - t0, 1)))
            print(f"digits  {rows[-1]['source']:48s} prompted {rows[-1]['prompted_acc']:.3f}  "
                  f"upper diff {rows[-1]['upper_half_max_diff_255']:.0f}", flush=True)
    return rows, {"digits_model": model, "digits_masked_model": masked, "digits_real_test_accuracy": judge.real_accuracy}


# -- notes ---------------------------------------------------------------------------------------

def notes_task(model: str, *, seed: int, limit: int | None) -> tuple[list[dict], dict]:
    from audio_notes_quality import SR, TOLERANCE_CENTS, Judge

    import multidiff
    from multidiff.datasets.notes import note_caption, note_frequency
    from multidiff.evaluation.audio import cents, estimate_f0

    pipe = multidiff.load(model, device="cpu")
    adapter = pipe.adapter
    judge = Judge()
    specs = judge.test_specs[:limit]
    waves = [torch.from_numpy(np.asarray(judge.real[s], np.float32))[None] for s in specs]
    duration = waves[0].shape[-1] / SR  # 1.024 s
    half = duration / 2
    shape = adapter.sample_shape(duration=duration)
    known = torch.stack([adapter.encode_input(w, duration=duration) for w in waves])
    keep = adapter.keep_mask(shape, raw=waves[0], keep_seconds=[0, half])[None]
    cut = int(half * SR)

    def row(source: str, outs: list[np.ndarray], seconds: float | None = None) -> dict:
        errors = []
        for w, s in zip(outs, specs):
            f = estimate_f0(np.asarray(w, np.float64).reshape(-1)[cut:], SR)
            errors.append(cents(f, note_frequency(s.midi)) if np.isfinite(f) else np.inf)
        errors = np.abs(np.array(errors))
        finite = errors[np.isfinite(errors)]
        return {"source": source, "samples": len(outs), "second_half_pitch_acc": float((errors <= TOLERANCE_CENTS).mean()),
                "median_cents": float(np.median(finite)) if len(finite) else float("nan"),
                "unvoiced": float((~np.isfinite(errors)).mean()), "seconds": seconds}

    prompts = [note_caption(s.family, s.midi, 0) for s in specs]
    rows = [row("real notes", [w.numpy() for w in waves]),
            row("real notes through the vocoder", [adapter.decode(k).numpy() for k in known])]
    t0 = time.time()
    plain = pipe.generate(prompts, seed=seed, steps=20, guidance_scale=4.0, duration=duration, batch_size=50,
                          progress=False)
    rows.append(row("generated without input (reference)", [x.numpy() for x in plain], round(time.time() - t0, 1)))
    for name, kw in [("continued from the first half", {}), ("continued, harmonize 2", {"harmonize": 2})]:
        t0 = time.time()
        outs = edit_batch(pipe, prompts, known, keep, seed=seed, guidance=4.0, **kw)
        outs = [adapter.fit_length(o, duration=duration).numpy() for o in outs]
        rows.append(row(name, outs, round(time.time() - t0, 1)))
        print(f"notes   {name:48s} pitch {rows[-1]['second_half_pitch_acc']:.3f}", flush=True)
    wrong = [note_caption(s.family, s.midi + 5, 0) for s in specs]  # a fourth above: the kept half says otherwise
    outs = edit_batch(pipe, wrong, known, keep, seed=seed, guidance=4.0)
    outs = [adapter.fit_length(o, duration=duration).numpy() for o in outs]
    r = row("continued, prompt a fourth above (pitch vs. the input's)", outs)
    rows.append(r)
    return rows, {"notes_model": model, "notes_kept_seconds": [0, half], "notes_guidance": 4.0,
                  "tolerance_cents": TOLERANCE_CENTS}


# -- video ---------------------------------------------------------------------------------------

def video_task(model: str, *, seed: int, data_root: str, limit: int | None, harmonize: int = 2) -> tuple[list[dict], dict]:
    from video_moving_digits_quality import Judge, data_settings, direction_of, real_clips, velocity

    import multidiff
    from multidiff.datasets.moving_digits import moving_caption

    pipe = multidiff.load(model, device="cpu")
    data = data_settings(Path(model), pipe)
    judge = Judge(digit_size=data["digit_size"], min_speed=0.25 * data["speed"])
    clips, digits, dirs = real_clips(judge, data_root, limit=limit, **data)
    t = clips.shape[1]
    known = torch.from_numpy(clips)[:, None] * 2 - 1
    keep = pipe.adapter.keep_mask(tuple(known.shape[1:]), raw=torch.from_numpy(clips[:1]), keep_frames=[0, -1])[None]

    def row(source: str, out: np.ndarray, seconds: float | None = None) -> dict:
        moved = [direction_of(velocity(c), min_speed=judge.min_speed) for c in out]
        middle = np.stack([judge.crops(c[1:-1]) for c in out])  # the generated frames only
        n, m = middle.shape[:2]
        pred = judge.clf.predict(middle.reshape(n * m, -1)).reshape(n, m)
        vote = np.array([np.bincount(p, minlength=10).argmax() for p in pred])
        ends = np.abs(out[:, [0, -1]] - clips[:, [0, -1]]).max() * 255
        return {"source": source, "clips": len(out), "direction_acc": float(np.mean([a == b for a, b in zip(moved, dirs)])),
                "digit_acc_middle": float((vote == digits).mean()),
                "digit_acc_middle_frames": float((pred == digits[:, None]).mean()),
                "kept_frames_max_diff_255": round(float(ends), 3), "seconds": seconds}

    w = np.linspace(0, 1, t)[None, :, None, None]
    fade = (1 - w) * clips[:, :1] + w * clips[:, -1:]
    rows = [row("real clips", clips), row("cross-fade of the first and last frame", fade)]
    prompts = [moving_caption(int(d), where) for d, where in zip(digits, dirs)]
    runs = [("middle 6 frames filled", {})] + ([(f"filled, harmonize {harmonize}", {"harmonize": harmonize})]
                                              if harmonize else [])
    for name, kw in runs:
        t0 = time.time()
        out = torch.stack(edit_batch(pipe, prompts, known, keep, seed=seed, batch=40, **kw))[:, 0].numpy()
        rows.append(row(name, out, round(time.time() - t0, 1)))
        print(f"video   {name:48s} direction {rows[-1]['direction_acc']:.3f}  digit {rows[-1]['digit_acc_middle']:.3f}",
              flush=True)
    return rows, {"video_model": model, "video_kept_frames": [0, t - 1], "video_data": data}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", help="an exported image_digits model")
    ap.add_argument("--digits-masked", help="an exported image_digits model trained with editing=masked")
    ap.add_argument("--notes", help="an exported audio_notes model")
    ap.add_argument("--video", help="an exported video_moving_digits model")
    ap.add_argument("--per-digit", type=int, default=30)
    ap.add_argument("--notes-limit", type=int, default=None, help="at most this many held-out notes")
    ap.add_argument("--clips", type=int, default=200, help="at most this many held-out clips")
    ap.add_argument("--video-harmonize", type=int, default=2, help="harmonize passes of the extra video row (0: none)")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--name", default="editing_quality")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows, extra, tables = [], {}, []
    tasks = [("digits", args.digits, lambda: digits_task(args.digits, per_digit=args.per_digit, seed=args.seed,
                                                         masked=args.digits_masked)),
             ("notes", args.notes, lambda: notes_task(args.notes, seed=args.seed, limit=args.notes_limit)),
             ("video", args.video, lambda: video_task(args.video, seed=args.seed, data_root=args.data_root,
                                                      limit=args.clips, harmonize=args.video_harmonize))]
    for task, model, run in tasks:
        if not model:
            continue
        task_rows, task_extra = run()
        rows += [{"task": task, **r} for r in task_rows]
        extra.update(task_extra)
        cols = ["task", *task_rows[0]]
        tables.append(markdown_table([{"task": task, **r} for r in task_rows], cols))
    if not rows:
        raise SystemExit("give at least one of --digits, --notes, --video (exported models)")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    path = write_results(args.name, rows, columns, extra)
    print("\n\n".join(tables))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
