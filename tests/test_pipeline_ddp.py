"""``pq-lightning quantize --trainer.strategy ddp --trainer.devices 2``: two gloo processes launched by
Lightning run the probe, the refine and the evaluation; the checkpoint equals the one-process build
byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
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


def test_two_ddp_processes_tune_the_norms_as_one(tmp_path, tiny_model_dir):
    """Norm tuning under DDP: each step's windows split over the ranks, gradients averaged, so the tuned
    norms equal one process's up to the order of the gradient sums."""
    from safetensors.torch import load_file

    cfg = {
        "model": str(tiny_model_dir), "dtype": "float32", "target_bits": 4.5, "pareto_bits": [4.5],
        "calibration": {"source": str(tmp_path / "text.txt"), "seqlen": 32, "num_samples": 10, "batch_size": 2,
                        "holdout_fraction": 0.2},
        "evaluation": {"enabled": False}, "smooth": {"enabled": False},
        "tune": {"enabled": True, "epochs": 2, "lr": 2e-2, "batch_size": 2, "keep": "always"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    runs = [_quantize(tmp_path / "cfg.yaml", tmp_path / "one"),
            _quantize(tmp_path / "cfg.yaml", tmp_path / "two", "--trainer.strategy", "ddp", "--trainer.devices", "2")]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    (a,), (b,) = ((tmp_path / d / "work").glob("tune-*.safetensors") for d in ("one", "two"))
    ta, tb = load_file(a), load_file(b)
    src = load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert sorted(ta) == sorted(tb) and len(ta) == 5
    for k in ta:
        assert (ta[k] - src[k]).abs().max() > 1e-3, k  # tuned, not left as they were
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert rb["tune"]["heldout_kl_after"] == pytest.approx(ra["tune"]["heldout_kl_after"], rel=1e-4)
