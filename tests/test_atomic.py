"""pq_lightning/atomic.py: whole-or-nothing files and folders, no temporaries left, plain permissions."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from pq_lightning import atomic
from pq_lightning.atomic import atomic_dir, atomic_file, atomic_write_bytes, atomic_write_text, check_out_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_bytes_and_text_replace_the_file_with_plain_permissions(tmp_path, umask_022):
    path = tmp_path / "sub" / "report.json"
    atomic_write_bytes(path, b"\x00\x01old")
    assert path.read_bytes() == b"\x00\x01old"
    atomic_write_text(path, "néw\n")
    assert path.read_bytes() == "néw\n".encode()
    assert _mode(path) == 0o644  # 0o666 less the umask, as open() gives; mkstemp would give 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_atomic_file_takes_a_writer_by_name_and_keeps_the_old_file_on_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "cache.safetensors"
    want = {"a": torch.arange(6, dtype=torch.int32).view(2, 3), "b": torch.tensor([0.5, -1.25])}
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".cache.safetensors.tmp-")
        save_file(want, str(tmp))
    got = load_file(str(path))
    assert set(got) == {"a", "b"} and all(torch.equal(got[k], want[k]) for k in want)
    before = path.read_bytes()
    with pytest.raises(OSError, match="simulated"), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full (simulated)")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors"]


def test_atomic_dir_creates_refuses_replaces_and_survives_failure(tmp_path, umask_022):
    out = tmp_path / "ck"
    with atomic_dir(out) as tmp:
        assert not out.exists()
        (tmp / "config.json").write_text("1")
    assert (out / "config.json").read_text() == "1"
    assert _mode(out) == 0o755  # readable by a server running as another user; mkdtemp gives 0o700
    with pytest.raises(FileExistsError, match="overwrite=True"), atomic_dir(out) as tmp:
        pytest.fail("a non-empty folder must be refused before the body runs")
    with pytest.raises(RuntimeError, match="simulated"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("2")
        raise RuntimeError("simulated")
    assert (out / "config.json").read_text() == "1"
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_atomic_dir_puts_the_old_folder_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_check_out_dir(tmp_path):
    check_out_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_out_dir(tmp_path / "file", overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_out_dir(tmp_path / "full")
    check_out_dir(tmp_path / "full", overwrite=True)


def test_scripts_load_it_by_path_without_the_package(tmp_path, monkeypatch):
    """The peer runners and vLLM smoke run where pq_lightning is not installed."""
    monkeypatch.setitem(sys.modules, "pq_lightning", None)

    def load(name):
        spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    load("peers_llmcompressor").load_atomic().atomic_write_text(tmp_path / "peer_run.json", '{"ok": 1}\n')
    assert (tmp_path / "peer_run.json").read_text() == '{"ok": 1}\n'
    load("vllm_smoke")._write_json(tmp_path / "out" / "vllm_smoke.json", {"top1": 0.5})
    assert (tmp_path / "out" / "vllm_smoke.json").read_text() == '{\n "top1": 0.5\n}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "peer_run.json", "vllm_smoke.json"]
