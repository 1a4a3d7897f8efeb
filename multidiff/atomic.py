"""Publishing a directory atomically: written beside its final name, then renamed into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def replace_directory(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call ``fill(tmp)`` on an empty ``directory.tmp``, then swap it in for ``directory``.

    A reader never sees a half-written directory under the final name: an interrupted ``fill``
    leaves only ``directory.tmp`` (removed by the next call), and an older ``directory`` is
    replaced only once the new one is complete.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
