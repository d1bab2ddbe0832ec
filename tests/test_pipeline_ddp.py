"""``pq-lightning quantize --trainer.strategy ddp --trainer.devices 2``: two gloo processes launched by
Lightning run the probe, the refine and the evaluation; the checkpoint equals the one-process build
byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.distributed


def _quantize(cfg_path, out, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pq_lightning.cli", "quantize", "--config", str(cfg_path), "--output_dir", str(out),
           "--trainer.accelerator", "cpu", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_ddp_processes_write_the_same_checkpoint_as_one(tmp_path, tiny_model_dir):
    cfg = {
        "model": str(tiny_model_dir), "dtype": "float32", "target_bits": 6.0, "pareto_bits": [6.0],
        # 8 fit and 2 held-out windows, 4 evaluation windows: every rank gets an equal share
        "calibration": {"source": str(tmp_path / "text.txt"), "seqlen": 32, "num_samples": 10, "batch_size": 2,
                        "holdout_fraction": 0.2},
        "evaluation": {"path": str(tmp_path / "text.txt"), "window": 31, "max_windows": 4, "batch_size": 2},
        "refine": {"dampening": [0.01, 0.1]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    one = _quantize(tmp_path / "cfg.yaml", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _quantize(tmp_path / "cfg.yaml", tmp_path / "two", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (tmp_path / d / "checkpoint-6bpp" for d in ("one", "two"))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:  # tensors, config, manifest: byte for byte
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert ra["formats"] == rb["formats"] and ra["eval"] == rb["eval"]
    assert rb["settings"]["trainer"]["strategy"] == "ddp"
    # rank zero alone wrote the outputs: one plan, one report, no stray files from rank one
    assert sorted(p.name for p in (tmp_path / "two").glob("plan-*.json")) == ["plan-6bpp.json"]
