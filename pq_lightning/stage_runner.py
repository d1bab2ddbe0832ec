"""Bookkeeping of one ``quantize`` run: console, per-stage wall time / CPU time / peak memory, stage
cache keys, and the rank-zero rules of a multi-process run.

Peak memory per stage is the process's resident-set high-water mark (``VmHWM``), reset at the start
of each stage through ``/proc/self/clear_refs`` (Linux); elsewhere it is the run's overall peak.
Under a multi-process strategy every rank runs the same chain; files are written by rank zero, and a
decision that would send ranks down different paths (is a stage cached?) is made by rank zero and
broadcast once the process group exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def stage_key(*parts: Any) -> str:
    """16 hex characters of sha256 over ``parts`` as sorted-key JSON (``str`` for anything else)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (since the last reset where Linux allows it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


#: A file to which every stage start is appended as one line (for tools that interrupt a run at a
#: chosen stage, e.g. ``scripts/fuzz_cli.py``); unset: nothing is written.
TRACE_ENV = "PQ_LIGHTNING_STAGE_TRACE"


def _trace(name: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {os.getpid()}\n")


@dataclass
class StageRecord:
    """What one stage cost, summed over its calls (a stage runs once per budget for some)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss: int = 0
    calls: int = 0
    cached: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3),
                "peak_rss_gib": round(self.peak_rss / 2**30, 3), "calls": self.calls, "cached": self.cached,
                **self.notes}


class StageRunner:
    """Console, stage records and cache locations of one run into ``output_dir``."""

    def __init__(self, output_dir: str | Path, *, quiet: bool = False) -> None:
        from rich.console import Console

        self.out = Path(output_dir)
        self.work = self.out / "work"
        self.console = Console(stderr=True, quiet=quiet or not self.is_zero)
        self.records: dict[str, StageRecord] = {}

    # ---- ranks ---------------------------------------------------------------------------
    @staticmethod
    def _dist():
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() else None

    @property
    def is_zero(self) -> bool:
        """Rank zero, or the only process (also in a launched child before its group exists)."""
        dist = self._dist()
        if dist is not None:
            return dist.get_rank() == 0
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0

    @property
    def world_size(self) -> int:
        dist = self._dist()
        return dist.get_world_size() if dist is not None else 1

    def decide(self, question: Callable[[], bool]) -> bool:
        """``question()`` answered by rank zero and shared with every rank (where a group exists)."""
        dist = self._dist()
        if dist is None:
            return bool(question())
        box = [bool(question()) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def agree(self, question: Callable[[], T]) -> T:
        """``question()`` answered by rank zero and shared with every rank (any picklable value)."""
        dist = self._dist()
        if dist is None:
            return question()
        box = [question() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist = self._dist()
        if dist is not None:
            dist.barrier()

    # ---- stages --------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        """Time a stage (wall and CPU seconds) and record its peak resident memory."""
        record = self.records.setdefault(name, StageRecord())
        _trace(name)
        reset = _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield record
        finally:
            record.wall_s += time.perf_counter() - t0
            record.cpu_s += time.process_time() - c0
            record.calls += 1
            record.peak_rss = max(record.peak_rss, peak_rss_bytes() if reset or not record.peak_rss else 0)

    def cache_path(self, stage: str, key: str, suffix: str) -> Path:
        return self.work / f"{stage}-{key}{suffix}"

    def usable(self, path: Path) -> bool:
        """Whether a cache file exists and is whole; a damaged one is said, removed and recomputed."""
        from .integrity import cache_problem

        if not path.exists():
            return False
        problem = cache_problem(path)
        if problem is None:
            return True
        self.console.print(f"[yellow]{path.name}: {problem}; computing it again")
        path.unlink(missing_ok=True)
        return False

    def cached(self, record: StageRecord, path: Path) -> bool:
        """Whether ``path`` (a stage's cache) exists and is whole, decided on rank zero; counts and says so."""
        hit = self.decide(lambda: self.usable(path))
        if hit:
            record.cached += 1
            self.console.print(f"{path.name.split('-')[0]}: cached ({path.name})")
        return hit

    def track(self, items: Iterable[T], description: str) -> Iterable[T]:
        from rich.progress import track

        items = list(items)
        if not self.is_zero:
            return items
        return track(items, description=description, console=self.console, transient=True)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: r.as_dict() for name, r in self.records.items()}
