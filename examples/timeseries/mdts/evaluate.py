"""Score generated series against their prompts: ``python -m mdts.evaluate OUT_DIR``.

For every row of ``OUT_DIR/metadata.jsonl`` the prompt is parsed (``"a 3 Hz sine on channel 1
with rising amplitude"``) and the series checked on three counts:

- frequency: the dominant FFT frequency of the prompted channel (mean removed) equals the prompt's;
- channel: the prompted channel carries more energy than every other channel;
- envelope: rising / falling / constant as the ratio of the RMS of the second half to the first
  (> 1.4 rising, < 1 / 1.4 falling, otherwise constant; the data's ramps give 1.9 and 0.53).

Prints one JSON object with the accuracies and the number of samples.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from mdts.adapter import TimeSeriesAdapter
from mdts.data import parse_caption


def dominant_frequency(series: Tensor, sample_rate: float) -> float:
    """Frequency in Hz of the largest non-DC FFT bin of a ``(L,)`` series."""
    x = series.float() - series.float().mean()
    magnitude = torch.fft.rfft(x).abs()
    magnitude[0] = 0
    return float(magnitude.argmax()) * sample_rate / x.shape[-1]


def envelope_of(series: Tensor, *, ratio: float = 1.4) -> str:
    """``rising`` / ``falling`` / ``constant`` from the RMS of the second half over the first."""
    half = series.shape[-1] // 2
    first, second = series[:half].pow(2).mean().sqrt(), series[half:].pow(2).mean().sqrt()
    r = float(second / first.clamp_min(1e-8))
    return "rising" if r > ratio else "falling" if r < 1 / ratio else "constant"


def score(series: Tensor, prompt: str, sample_rate: float) -> dict[str, bool]:
    """Checks of one ``(C, L)`` series against its prompt."""
    freq, channel, kind = parse_caption(prompt)
    x = series[channel - 1]
    energy = series.float().pow(2).mean(dim=1)
    # one FFT bin is sample_rate / L wide: within half a bin is "the same frequency"
    tolerance = sample_rate / series.shape[-1] / 2
    return {
        "frequency": abs(dominant_frequency(x, sample_rate) - freq) <= tolerance,
        "channel": int(energy.argmax()) == channel - 1,
        "envelope": envelope_of(x) == kind,
    }


def evaluate(out_dir: str | Path) -> dict:
    """Accuracies over every sample listed in ``out_dir/metadata.jsonl``."""
    out_dir = Path(out_dir)
    rows = [json.loads(line) for line in (out_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        raise ValueError(f"{out_dir}/metadata.jsonl lists no samples")
    reader = TimeSeriesAdapter(channels=1)  # load() reads any channel count
    results = [score(reader.load(out_dir / r["file"]), r["prompt"], float(r.get("sample_rate", 64.0))) for r in rows]
    summary = {f"{k}_accuracy": sum(r[k] for r in results) / len(results) for k in results[0]}
    return {**summary, "samples": len(results)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mdts.evaluate OUT_DIR   (a folder written by multidiff generate)", file=sys.stderr)
        return 2
    print(json.dumps(evaluate(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
