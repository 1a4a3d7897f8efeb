"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": _commit(),
    }
    return info


def _commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)
    return head + body


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_results(name: str, rows: list[dict], columns: list[str], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), **(extra or {}), "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(info, indent=2))
    md = f"# {name}\n\nmachine: {json.dumps(info['machine'])}\n\n"
    if extra:
        md += "".join(f"- {k}: {v}\n" for k, v in extra.items()) + "\n"
    md += markdown_table(rows, columns)
    (RESULTS / f"{name}.md").write_text(md)
    return RESULTS / f"{name}.md"
