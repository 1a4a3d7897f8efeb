"""docs/new_modality.md runs as written: its ```bash blocks, in order, in one shell."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

DOC = ROOT / "docs" / "new_modality.md"


def bash_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```bash blocks of a markdown text, in order."""
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M)


def test_doc_has_the_steps_it_promises():
    blocks = bash_blocks(DOC.read_text(encoding="utf-8"))
    joined = "\n".join(blocks)
    assert len(blocks) >= 8
    for needle in ("multidiff train", "multidiff generate", "trusted_targets=[mdts.]", "hydra.searchpath=[$PLUGIN]",
                   "multidiff.load", "python -m mdts.evaluate"):
        assert needle in joined, needle


def test_tutorial_commands_run_as_written(tmp_path):
    """Run every bash block with ``set -euo pipefail`` in a fresh directory that looks like a checkout
    (``examples/`` linked in), so the doc's ``$PWD``-relative paths hold and nothing is written to the repo."""
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    script = "set -euo pipefail\n" + "\n".join(bash_blocks(DOC.read_text(encoding="utf-8")))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MULTIDIFF_RUN_DIR", None)
    env.pop("PYTHONPATH", None)  # the doc sets it itself
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"tutorial failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"

    out = proc.stdout
    assert "mdts from" in out and "_target_: mdts.adapter.TimeSeriesAdapter" in out
    assert "refused, as it should be" in out and "is outside the allowed namespaces" in proc.stderr
    assert "(2, 2, 128)" in out
    run = tmp_path / "runs" / "sines_tutorial"
    assert (run / "model" / "backbone" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "samples").glob("step_*.png")) == ["step_000010.png", "step_000020.png"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "sines" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"{k:04d}.npy" for k in range(4)]
    assert all((tmp_path / "out" / "sines" / f"{k:04d}.png").is_file() for k in range(4))
    assert (tmp_path / "out" / "sines_csv" / "0001.csv").is_file() and (tmp_path / "out" / "sines_api" / "0001.npy").is_file()
    scores = json.loads(next(line for line in out.splitlines() if line.startswith('{"frequency_accuracy"')))
    # 20 steps train nothing measurable: the check is that the printed scores are the evaluator's
    # for exactly these 4 files (the quality itself is measured by test_timeseries_example, slow)
    sys.path.insert(0, str(ROOT / "examples" / "timeseries"))
    from mdts.evaluate import evaluate

    assert scores == evaluate(tmp_path / "out" / "sines") and scores["samples"] == 4
    assert scores["frequency_accuracy"] * 4 == round(scores["frequency_accuracy"] * 4)
    assert not (tmp_path / "out" / "refused").exists()
