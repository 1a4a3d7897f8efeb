"""Write an embedded dataset to disk once: atomically, and keyed by everything that defines its files.

An embedded dataset (digits, notes, moving digits, an example's synthetic set) is a deterministic
function of a few settings. :func:`materialize` stores it as ``root/{name}-{key}/``, where ``key``
hashes *every* setting that changes the files, so two settings never share a folder and a changed
setting writes a new one. The folder holds ``manifest.json`` (the name and the settings) beside the
files, so what a folder holds can be read off it.

The files are written into a hidden temporary folder beside the target, flushed to disk (fsync)
and renamed into place in one step: a folder under its final name is always complete, and an
interrupted write leaves at most a hidden ``.{name}-{key}.tmp-*`` folder that nothing reads.
Processes that materialize the same folder at once (the ranks of a multi-GPU run) take turns on a
lock file where the file system offers ``flock``; where it does not, each writes its own copy and
the first rename wins: the others discard theirs and use the winner's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def content_key(name: str, settings: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over ``name`` and the canonical JSON of ``settings``."""
    text = json.dumps({"name": name, "settings": settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dataset_folder(root: str | Path, name: str, settings: Mapping[str, Any]) -> Path:
    """Where :func:`materialize` keeps the dataset ``name`` with ``settings`` (written or not)."""
    return Path(root) / f"{name}-{content_key(name, settings)}"


def materialize(root: str | Path, name: str, settings: Mapping[str, Any], write: Callable[[Path], None]) -> Path:
    """Return ``root/{name}-{key}/``, first calling ``write(folder)`` to fill it if it is not there yet.

    Args:
        root: the parent folder (created if missing), e.g. the run's ``data_root``.
        name: the dataset's name, the start of the folder name.
        settings: every setting that changes the files, JSON-serializable (lists, not tuples, if
            the written manifest should compare equal), including a version of the writing code.
        write: fills an empty folder with the dataset; any exception it raises propagates after
            its partial folder is removed.
    """
    folder = dataset_folder(root, name, settings)
    manifest = {"name": name, "settings": json.loads(json.dumps(settings))}
    if _complete(folder, manifest):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.parent / f".{folder.name}.lock"):
        if _complete(folder, manifest):  # another process wrote it while this one waited
            return folder
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # not mkdtemp: the published folder keeps the umask's permissions, not 0700
        try:
            write(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            _fsync_tree(tmp)
            _publish(tmp, folder, manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def _complete(folder: Path, manifest: dict) -> bool:
    """Whether ``folder`` is a finished copy of the dataset ``manifest`` describes."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")) == manifest
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, folder: Path, manifest: dict) -> None:
    """Rename the finished ``tmp`` to ``folder``; if another process published first, keep its copy."""
    for _ in range(3):
        try:
            os.rename(tmp, folder)  # atomic; fails on a non-empty directory (POSIX) or any existing one (Windows)
        except OSError:
            if _complete(folder, manifest):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if folder.exists():  # not ours and not complete (edited by hand, or a foreign file): set it aside
                aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
                with contextlib.suppress(OSError):
                    os.rename(folder, aside / "old")
                shutil.rmtree(aside, ignore_errors=True)
            continue
        _fsync_dir(folder.parent)
        return
    raise OSError(f"could not move the materialized dataset {tmp} to {folder}")


def _fsync_tree(top: Path) -> None:
    """Flush every file under ``top`` and the folders themselves, so a crash after the rename
    cannot leave the published folder with empty or short files."""
    for dirpath, _, filenames in os.walk(top):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable on their own terms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an advisory lock on ``lock`` (a file) where ``fcntl.flock`` works; otherwise do nothing
    (correctness never depends on the lock: :func:`_publish` resolves races, the lock saves work)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = open(lock, "a+b")  # noqa: SIM115 - held open for the lock's lifetime
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without locks
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
