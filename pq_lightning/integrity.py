"""Sizes and sha256 of the files a folder should hold: written with an artefact, checked before reuse.

A result is reused only when the files on disk are the ones recorded when it was written: a
truncated shard, a missing tokenizer file or a file edited by hand makes it stale.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path

CHUNK = 1 << 22


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_table(folder: str | Path, *, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``folder`` except ``skip`` names."""
    folder = Path(folder)
    table = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            table[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return table


def table_digest(table: Mapping[str, Mapping]) -> str:
    """16 hex characters identifying a files table (the content of everything it lists)."""
    blob = json.dumps({k: v["sha256"] for k, v in table.items()}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def table_problems(folder: str | Path, table: Mapping[str, Mapping], *, check_hash: bool = True) -> list[str]:
    """How the files under ``folder`` differ from ``table`` (missing, size, sha256); empty when they match."""
    folder = Path(folder)
    problems = []
    for rel, want in table.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = p.stat().st_size
        if size != want["size"]:
            problems.append(f"{rel} is {size:,} B, {want['size']:,} B were written")
        elif check_hash and file_sha256(p) != want["sha256"]:
            problems.append(f"{rel} changed since it was written (sha256 differs)")
    return problems


def safetensors_problem(path: str | Path) -> str | None:
    """Why a ``.safetensors`` file cannot be whole (a short or unreadable header, a truncated body), or None."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} B, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"{path.name} is truncated: its header needs {8 + n:,} B, the file has {size:,} B"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"{path.name} has an unreadable safetensors header ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    want = 8 + n + max(ends, default=0)
    if size < want:
        return f"{path.name} is truncated: {size:,} B of the {want:,} B its header describes"
    return None


def cache_problem(path: str | Path) -> str | None:
    """Why a stage cache file cannot be read back whole (a truncated safetensors file, invalid JSON), or None."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return f"unreadable JSON ({e})"
    return None
