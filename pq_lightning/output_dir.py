"""The output folder of ``quantize``: one run at a time, only its own files replaced, outputs published together.

* **Lock.** A run holds an exclusive ``flock`` on ``<output_dir>/.pq-lightning.lock`` (which names its
  PID) from start to end; a second run into the same folder refuses, naming the first. The kernel
  drops the lock when a process dies, so a killed run never blocks the next one.
* **Ownership.** ``pq_outputs.json`` lists every file and checkpoint this tool wrote, with its sha256
  (checkpoints: their manifest). Before any work, a run refuses when a file it would write exists
  and is not listed (the user's own ``report.md``), or was changed since it was written (unless
  ``overwrite``); before the probe, when a checkpoint it would write was built from other inputs
  (unless ``overwrite``) or is not one of ours.
* **Publishing.** Checkpoints are exported into ``work/`` and moved into place at the end of the run
  together with the plans, ``pareto.csv`` and the report, so a crash never leaves a new plan beside
  an old checkpoint. The manifest is marked ``publishing`` during that step; a run that finds the
  mark (its writer died mid-way) says which outputs may mix two runs, and rewrites them.
* **Leftovers.** Temporary files and folders of killed runs (``.checkpoint-*.tmp-*``, ``*.tmp``)
  are removed by the next run; a failed run leaves no empty ``work/`` and no folder it created empty.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .atomic import atomic_write_text
from .errors import UserError
from .integrity import file_sha256

T = TypeVar("T")

LOCK_NAME = ".pq-lightning.lock"
OUTPUTS_NAME = "pq_outputs.json"
OUTPUTS_FORMAT = "pq-lightning-outputs-v1"
SHARED_OUTPUTS = ("pareto.csv", "pareto.png", "report.json", "report.md", "sensitivity.png")
STAGED_PREFIX = "checkpoint-"


def budget_outputs(label: str) -> list[str]:
    """The files (and checkpoint folder) one budget publishes."""
    return [f"plan-{label}.json", f"formats-{label}.png", f"checkpoint-{label}"]


def run_outputs(labels: Sequence[str]) -> list[str]:
    """Everything a run with these budget labels publishes, in publishing order."""
    return [name for label in labels for name in budget_outputs(label)] + list(SHARED_OUTPUTS)


# ---- leftovers ----------------------------------------------------------------------------------
# Temporary names of pq_lightning.atomic / export / sensitivity writers: ".<name>.tmp-<hex>",
# ".<name>.old-<hex>", ".<name>.<8 chars>.tmp" (tempfile.mkstemp / mkdtemp), ".<name>.old"; the
# sensitivity file's temporary name has no leading dot ("<name>.<8 chars>.tmp", in work/ only).
_TMP_RX = re.compile(r"^(?P<dot>\.?)(?P<name>.+?)\.(tmp-[0-9a-f]{8,}|old-[0-9a-f]{8,}|[A-Za-z0-9_]{8}\.tmp|old)$")


def leftovers(folder: Path, owned: Callable[[str], bool], *, hidden_only: bool = True) -> list[Path]:
    """Temporary files / folders in ``folder`` left by killed writers of names ``owned`` accepts
    (``hidden_only``: only names starting with a dot, as the writers of the output folder make them)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _TMP_RX.match(p.name)
        if m and (m.group("dot") or not hidden_only) and owned(m.group("name")):
            found.append(p)
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---- the lock -----------------------------------------------------------------------------------
class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.pq-lightning.lock`` holding this run's PID."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: runs are not serialised there
            return

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                raise UserError(
                    f"{self.path.parent} is in use by another pq-lightning run (pid {holder.get('pid', '?')}, "
                    f"started {holder.get('started', '?')}); wait for it to finish or choose another --output_dir"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder unlinked while we waited to open it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _read_fd(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}


# ---- the folder ---------------------------------------------------------------------------------
class OutputDir:
    """The output folder as one run owns it (inactive, doing nothing, on ranks other than zero)."""

    def __init__(self, out: Path, *, active: bool = True) -> None:
        self.out = Path(out)
        self.work = self.out / "work"
        self.active = active
        self.run_id = f"{uuid.uuid4().hex[:12]}-{os.getpid()}"
        self.created: list[Path] = []  # folders this run created, innermost first
        self.lock = FolderLock(self.out)
        self.record: dict[str, Any] = {"format": OUTPUTS_FORMAT, "entries": {}}
        self.unfinished: list[str] = []  # names a dead run was publishing when it stopped

    # ---- start and end ---------------------------------------------------------------------
    def claim(self, labels: Sequence[str], *, overwrite: bool, say: Callable[[str], None]) -> OutputDir:
        """Lock the folder, remove leftovers of killed runs, and refuse files that are not ours."""
        if not self.active:
            return self
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output_dir {self.out} exists and is not a folder; choose another --output_dir")
        self.created = [p for p in [self.out, *self.out.parents] if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self.record = self._read_record()
            self._note_unfinished(say)
            self._clean_leftovers(say)
            self.check_owned(run_outputs(labels), overwrite=overwrite)
            self.work.mkdir(exist_ok=True)
        except BaseException:
            self.release(failed=True)
            raise
        return self

    def release(self, *, failed: bool) -> None:
        """Unlock; after a failure, remove an empty ``work/`` and the folders this run created and left empty."""
        if not self.active:
            return
        if failed and self.work.is_dir() and not any(self.work.iterdir()):
            self.work.rmdir()
        self.lock.release()
        for folder in self.created if failed else ():
            if not (folder.is_dir() and not any(folder.iterdir())):
                break
            folder.rmdir()

    # ---- ownership -------------------------------------------------------------------------
    def _read_record(self) -> dict[str, Any]:
        path = self.out / OUTPUTS_NAME
        if not path.exists():
            return {"format": OUTPUTS_FORMAT, "entries": {}}
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or record.get("format") != OUTPUTS_FORMAT:
            raise UserError(f"{path} is not pq-lightning's list of outputs; move it away or choose another --output_dir")
        record.setdefault("entries", {})
        return record

    def _note_unfinished(self, say: Callable[[str], None]) -> None:
        publishing = self.record.get("publishing")
        if publishing:
            self.unfinished = [n for n in publishing.get("names", []) if (self.out / n).exists()]
        mixed = sorted(set(self.unfinished) | set(self.record.get("mixed", [])))
        if mixed:
            say(f"[yellow]a run into {self.out} stopped while publishing; these outputs may mix two runs until a "
                f"run with their budgets rewrites them: {', '.join(mixed)}")

    def is_ours(self, name: str) -> bool:
        return name in self.record["entries"] or name in self.unfinished

    def _clean_leftovers(self, say: Callable[[str], None]) -> None:
        ours = set(run_outputs(["*"])) | {OUTPUTS_NAME}

        def owned_top(name: str) -> bool:
            return name in ours or self.is_ours(name) or bool(re.fullmatch(r"(checkpoint|plan|formats)-.+", name))

        found = leftovers(self.out, owned_top) + leftovers(self.work, lambda name: True, hidden_only=False)
        for p in found:
            _remove(p)
        if found:
            size = sum(_size(p) for p in found)
            say(f"removed {len(found)} leftover(s) of an interrupted run ({size:,} B): "
                + ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else ""))

    def check_owned(self, names: Sequence[str], *, overwrite: bool) -> None:
        """Refuse a name this run would write that exists and is not ours (or is ours but was edited)."""
        for name in names:
            path = self.out / name
            if not path.exists() and not path.is_symlink():
                continue
            if name.startswith("checkpoint-"):
                self._check_checkpoint_folder(path)
                continue
            entry = self.record["entries"].get(name)
            if entry is None and name not in self.unfinished:
                raise UserError(
                    f"{path} exists and pq-lightning did not write it; move it away or choose another --output_dir")
            if entry is not None and name not in self.unfinished and not overwrite and (
                    not path.is_file() or file_sha256(path) != entry.get("sha256")):
                raise UserError(
                    f"{path} was changed after pq-lightning wrote it; move it away, or pass --overwrite to replace it")

    @staticmethod
    def _check_checkpoint_folder(path: Path) -> None:
        from .export import MANIFEST_NAME

        if path.is_dir() and not any(path.iterdir()):
            return
        if not (path.is_dir() and (path / MANIFEST_NAME).is_file()):
            raise UserError(
                f"{path} exists and is not a checkpoint pq-lightning wrote; move it away or choose another --output_dir")

    def check_inputs(self, labels: Sequence[str], inputs_key: str, *, overwrite: bool) -> None:
        """Before the probe: refuse to replace a checkpoint built from other inputs unless ``overwrite``."""
        from .export import read_manifest

        if not self.active or overwrite:
            return
        for label in labels:
            path = self.out / f"checkpoint-{label}"
            record = read_manifest(path) if path.is_dir() else None
            if record is None:
                continue
            built = (record.get("manifest") or {}).get("inputs_key")
            if built != budget_inputs_key(inputs_key, label):
                raise UserError(
                    f"{path} was built from other inputs (model, calibration or settings changed); pass --overwrite "
                    "to replace it, or choose another --output_dir")

    # ---- staging and publishing --------------------------------------------------------------
    def publish(self, labels: Sequence[str], checkpoints: Mapping[Path, Path], write: Callable[[], T]) -> T:
        """Move the staged ``checkpoints`` (final path -> where it is now) into place, run ``write`` (plans,
        pareto, report), then record what changed as this run's; marked ``publishing`` meanwhile."""
        if not self.active:
            return write()
        names = run_outputs(labels)
        self.record["publishing"] = {"run": self.run_id, "pid": os.getpid(), "names": names}
        self._save_record()
        for final, source in checkpoints.items():
            if Path(source) != Path(final):
                _replace(Path(source), Path(final))
        before = self._snapshot()
        result = write()
        written = [n for n in self._changed(before) if n in names] + [Path(p).name for p in checkpoints]
        for name in written:
            self._record(name)
        for p in self.work.glob(f"{STAGED_PREFIX}*"):  # staged builds of other keys: superseded
            _remove(p)
        mixed = sorted((set(self.unfinished) | set(self.record.get("mixed", []))) - set(written))
        self.record.pop("publishing", None)
        self.record["mixed"] = [n for n in mixed if (self.out / n).exists()]
        self.unfinished = []
        self._save_record()
        return result

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in self.out.iterdir() if p.is_file()}

    def _changed(self, before: Mapping[str, tuple[int, int]]) -> list[str]:
        after = self._snapshot()
        skip = {OUTPUTS_NAME, LOCK_NAME}
        return sorted(n for n, s in after.items() if n not in skip and before.get(n) != s)

    def _record(self, name: str) -> None:
        from .export import read_manifest

        path = self.out / name
        if path.is_dir():
            manifest = (read_manifest(path) or {}).get("manifest", {})
            entry = {"kind": "checkpoint", "stage_key": manifest.get("stage_key"),
                     "inputs_key": manifest.get("inputs_key")}
        else:
            entry = {"kind": "file", "size": path.stat().st_size, "sha256": file_sha256(path)}
        self.record["entries"][name] = {**entry, "run": self.run_id}

    def _save_record(self) -> None:
        entries = self.record["entries"]
        for name in [n for n in entries if not (self.out / n).exists()]:
            del entries[name]
        atomic_write_text(self.out / OUTPUTS_NAME, json.dumps(self.record, indent=1, sort_keys=True) + "\n")


def staged_checkpoint(work: Path, label: str, key: str) -> Path:
    """Where a budget's checkpoint is exported before it is published."""
    return Path(work) / f"{STAGED_PREFIX}{label}-{key}"


def reusable_checkpoint(candidates: Sequence[Path], key: str, *, say: Callable[[str], None]) -> str | None:
    """The first of ``candidates`` whose manifest names stage ``key`` and whose files are those it lists."""
    from .export import checkpoint_problems, manifest_stage_key

    for path in candidates:
        if manifest_stage_key(path) != key:
            continue
        problems = checkpoint_problems(path)
        if not problems:
            return str(path)
        say(f"[yellow]export: {path.name} is not what was written ({'; '.join(problems[:2])}); exporting again")
    return None


def budget_inputs_key(inputs_key: str, label: str) -> str:
    """What a budget's checkpoint was built from: the run's inputs and the budget."""
    from .stage_runner import stage_key

    return stage_key("inputs", inputs_key, label)


def _replace(source: Path, final: Path) -> None:
    """Move ``source`` to ``final``; an old ``final`` is set aside first and removed once the move is done."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    try:
        source.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        _remove(old)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
