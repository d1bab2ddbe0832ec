"""Atomic writes: a file or folder appears whole at its final path, or not at all.

Every writer of the project goes through here: :func:`atomic_file` for writers that take a file
name (safetensors' ``save_file``), :func:`atomic_write_bytes` / :func:`atomic_write_text` for data in
memory, :func:`atomic_dir` for folders (checkpoints, reference models). The work happens under a
fresh hidden name beside the target (same filesystem, so the final rename is atomic); on any error
it is removed and the target is left as it was.

New files and folders get the permissions of a plain ``open`` / ``mkdir`` (0o666 / 0o777 less the
umask), not ``mkstemp``'s 0o600: a checkpoint must stay readable to the server that loads it.

The module imports only the standard library, so scripts that must run without pq_lightning
installed (peer runners, vLLM smoke) load it by path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _sibling(path: Path, tag: str) -> Path:
    """A hidden name beside ``path`` that no other writer picks (``.NAME.TAG-RANDOM``)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; what the caller writes there then replaces ``path``.

    The temporary file exists (empty) when yielded; the caller may overwrite it by name. It is
    flushed to disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _sibling(path, "tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - a 48-bit random name already taken
            continue
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def check_out_dir(path: str | Path, *, overwrite: bool = False) -> None:
    """Raise unless ``path`` can become an output folder: absent, empty, or replaceable (``overwrite``).

    :func:`atomic_dir` runs this on entry; call it early as well when the folder's content takes
    long to compute, so that a refusal comes before the work.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{path} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it, "
            "or choose another output folder"
        )


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``.

    An existing non-empty ``path`` is refused unless ``overwrite`` (:func:`check_out_dir`); the old
    folder is moved aside only once the new one is complete, and deleted after the new one is in
    place (put back if that last rename fails).
    """
    path = Path(path)
    check_out_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        old = None
        if path.exists():
            old = _sibling(path, "old")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
