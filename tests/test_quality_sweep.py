"""scripts/quality_sweep.py: rank correlation, ladder checks, the study's evaluation against
QuantEvaluator, the shared probe, and the whole script on a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TEXT

from pq_lightning import stages
from pq_lightning.evaluate import evaluate_models, fake_quant_candidate
from pq_lightning.models import find_body_linears
from pq_lightning.pipeline import CalibrationConfig, ProbeConfig, SmoothConfig, TrainerConfig
from pq_lightning.stage_runner import StageRunner

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("_script_quality_sweep", REPO / "scripts" / "quality_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


# ---- rank correlation ---------------------------------------------------------------------------


def test_spearman_hand_values(sweep):
    # torchmetrics adds 1e-6 to the denominator (product of the rank deviations, >= 0.25 for n >= 2)
    # and ranks in float32: within 5e-6 of the exact value
    tol = 5e-6
    # ties share their mean rank. y ranks [1, 2, 3.5, 5, 3.5]: deviations from 3 are x (-2,-1,0,1,2),
    # y (-2,-1,.5,2,.5); sum xy = 8, sum x^2 = 10, sum y^2 = 9.5 -> 8 / sqrt(95) = 0.8208
    # (ordinal tie-breaking, y ranks [1, 2, 3, 5, 4], would give 1 - 6*2/120 = 0.9)
    assert sweep.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=tol)
    # x ranks [1.5, 3, 1.5, 4], y ranks [2, 3, 1, 4]: deviations from 2.5 give sum xy = 4.5,
    # sum x^2 = 4.5, sum y^2 = 5 -> sqrt(0.9) = 0.9487 (ordinal x ranks [1, 3, 2, 4]: 0.8)
    assert sweep.spearman([10, 20, 10, 30], [2, 3, 1, 4]) == pytest.approx(math.sqrt(0.9), abs=tol)
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of y are (2, 1, 4, 3, 5): d^2 = 1+1+1+1+0 = 4
    assert sweep.spearman([0.1, 0.2, 0.3, 0.4, 0.5], [20, 10, 40, 30, 50]) == pytest.approx(1 - 6 * 4 / (5 * 24), abs=tol)
    assert sweep.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0, abs=tol)
    assert sweep.spearman([1, 10, 100], [0.001, 0.002, 5.0]) == pytest.approx(1.0, abs=tol)  # ranks, not values
    assert math.isnan(sweep.spearman([1, 2, 3], [4, 4, 4]))  # constant: undefined
    assert math.isnan(sweep.spearman([1, 2, float("nan")], [1, 2, 3]))
    assert math.isnan(sweep.spearman([1], [2]))
    with pytest.raises(ValueError, match="one length"):
        sweep.spearman([1, 2], [1, 2, 3])


# ---- ladder checks ------------------------------------------------------------------------------


def _row(b, kl, top1):
    return {"budget": b, "kl_all": kl, "kl_conf": kl / 2, "kl_top20_conf": kl / 3, "top1_conf": top1,
            "top1_all": top1 - 0.1}


def test_ladder_checks(sweep):
    rows = [_row(6.0, 0.02, 0.95), _row(5.5, 0.04, 0.93), _row(4.5, 0.2, 0.8)]  # any order
    checks = sweep.ladder_checks(rows)
    assert [c["status"] for c in checks] == ["PASS"] * 5
    assert checks[0]["detail"] == "4.5:0.2 > 5.5:0.04 > 6:0.02"

    rows[0]["kl_conf"] = 0.03  # above 5.5's 0.02: neither falling nor closer
    rows[0]["top1_all"] = 0.5
    status = {c["check"]: c["status"] for c in sweep.ladder_checks(rows)}
    assert status["kl_conf falls monotonically over the ladder"] == "FAIL"
    assert status["kl_all falls monotonically over the ladder"] == "PASS"
    closer = [c for c in sweep.ladder_checks(rows) if c["check"].startswith("6.0 bpp")][0]
    assert closer["status"] == "FAIL" and "not closer: kl_conf, top1_all" in closer["detail"]

    equal = [_row(5.0, 0.05, 0.9), _row(6.0, 0.05, 0.9)]  # a tie is not a fall
    checks = sweep.ladder_checks(equal)
    assert checks[0]["status"] == "FAIL" and checks[-1]["status"] == "SKIP"  # no 5.5
    assert all(c["status"] == "SKIP" for c in sweep.ladder_checks([_row(6.0, 0.1, 0.9)]))


# ---- the study's evaluation ---------------------------------------------------------------------


def test_measure_plans_equals_quant_evaluator(sweep, make_tiny_llama):
    """Switching served forms in place gives QuantEvaluator's numbers for apply_fake_quant's candidate."""
    model = make_tiny_llama(hidden_size=64, intermediate_size=128, initializer_range=0.2)
    names = list(find_body_linears(model))
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(4, 128, (3, 17), generator=g)
    windows[:, 0] = 1
    cal = torch.randint(4, 128, (4, 17), generator=g)
    amax = sweep.calibrate_input_amax(model, names, cal, batch_size=3)
    assert set(amax) == set(names) and all(v > 0 for v in amax.values())

    def fmt(name):  # fused siblings alike: layer 0 attn nvfp4, layer 0 gate/up fp8, down bf16, layer 1 mixed
        if ".0.self_attn." in name:
            return "nvfp4"
        if ".0.mlp." in name:
            return "bf16" if "down" in name else "fp8"
        return "fp8" if "o_proj" in name or "down" in name else "nvfp4"

    plans = [{n: fmt(n) for n in names}, {n: "nvfp4" for n in names}]
    expected = [
        evaluate_models(model, fake_quant_candidate(model, p, amax), windows, batch_size=2, top_k=5, accelerator="cpu")
        for p in plans
    ]
    with torch.inference_mode():
        ref_logits = model(input_ids=windows, use_cache=False).logits.clone()
    switcher = sweep.PlanSwitcher(model, names, ["nvfp4", "fp8"], amax)
    got, times = sweep.measure_plans(model, switcher, plans, windows, batch_size=2, top_k=5)
    assert set(times) == {"reference_forward_s", "candidate_forward_s", "metrics_s"}
    for e, r in zip(expected, got, strict=True):
        assert set(r) == set(e)
        assert r["n_positions"] == e["n_positions"] == 3 * 16
        for k, v in e.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(r[k]), k
            else:
                assert r[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert 0 < got[0]["kl_all"] != got[1]["kl_all"] > 0  # two different, real distortions
    with torch.inference_mode():  # all switches back on bf16: the reference itself
        assert torch.equal(model(input_ids=windows, use_cache=False).logits, ref_logits)
    with pytest.raises(ValueError, match="no served form"):
        switcher.set({names[0]: "fp4_unknown"})


def test_probe_output_error_leaves_trace_and_diagonals_unchanged(tmp_path, make_tiny_llama, tiny_tokenizer):
    """Why one probe with the output error can stand in for the ladder's trace-only probe."""
    (tmp_path / "text.txt").write_text(TINY_TEXT)
    cal = CalibrationConfig(source=str(tmp_path / "text.txt"), seqlen=32, num_samples=4, batch_size=2,
                            holdout_fraction=0.25)
    sens = {}
    for oe in (True, False):
        model = make_tiny_llama(hidden_size=64, intermediate_size=128, initializer_range=0.2)
        run = StageRunner(tmp_path / f"out-{oe}")
        loaded = stages.LoadedModel.wrap(model, tiny_tokenizer)
        calib = stages.calibration(run, loaded, cal)
        body = stages.body(run, loaded, include=None, exclude=None)
        sens[oe] = stages.probe(run, loaded, calib, body, formats=["nvfp4", "fp8"], output_error=oe,
                                cfg=ProbeConfig(), smooth=SmoothConfig(enabled=False),
                                trainer=TrainerConfig(accelerator="cpu")).sensitivity
    assert set(sens[True].linears) == set(sens[False].linears) and len(sens[True].linears) == 14
    for name, a in sens[True].linears.items():
        b = sens[False].linears[name]
        assert set(a.output_error) == {"nvfp4", "fp8"} and not b.output_error
        assert a.h_trace == pytest.approx(b.h_trace, rel=1e-12)
        torch.testing.assert_close(a.diag_out, b.diag_out, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.diag_in, b.diag_in, rtol=1e-12, atol=0)


def test_probe_on_a_window_subsample_equals_the_probe_of_fewer_windows(tmp_path, make_tiny_llama, tiny_tokenizer):
    """``probe.num_samples``: the probe reads the first windows only, exactly as a calibration of that
    many windows would (GPTQ keeps them all); the stage's work is counted per calibration token."""
    (tmp_path / "text.txt").write_text(TINY_TEXT)
    model = make_tiny_llama(hidden_size=64, intermediate_size=128, initializer_range=0.2)
    loaded = stages.LoadedModel.wrap(model, tiny_tokenizer)
    sens, fe = {}, {}
    for label, windows, probe_windows in (("head", 6, 2), ("fewer", 2, None)):
        run = StageRunner(tmp_path / label)
        calib = stages.calibration(run, loaded, CalibrationConfig(source=str(tmp_path / "text.txt"), seqlen=32,
                                                                  num_samples=windows, batch_size=2,
                                                                  holdout_fraction=0.0))
        body = stages.body(run, loaded, include=None, exclude=None)
        sens[label] = stages.probe(run, loaded, calib, body, formats=["nvfp4", "fp8"], output_error=True,
                                   cfg=ProbeConfig(num_samples=probe_windows), smooth=SmoothConfig(enabled=False),
                                   trainer=TrainerConfig(accelerator="cpu")).sensitivity
        fe[label] = run.records["probe"].notes["fe_per_token"]
    assert fe["head"] == pytest.approx(fe["fewer"] / 3, abs=2e-3)  # the same work over 3x the windows
    for name, a in sens["head"].linears.items():
        b = sens["fewer"].linears[name]
        assert a.h_trace == b.h_trace and a.output_error == b.output_error
        assert torch.equal(a.diag_out, b.diag_out) and torch.equal(a.diag_in, b.diag_in)
    with pytest.raises(ValueError, match="probe.num_samples"):
        ProbeConfig(num_samples=0)


# ---- the script ---------------------------------------------------------------------------------


def test_quality_sweep_end_to_end(sweep, tmp_path, tiny_model_dir):
    cfg = {
        "model": str(tiny_model_dir), "dtype": "float32", "formats": ["nvfp4", "fp8"], "estimator": "trace",
        "trainer": {"accelerator": "cpu"}, "pareto_bits": [4.5, 6.0],
        "calibration": {"source": str(tmp_path / "text.txt"), "seqlen": 32, "num_samples": 8, "batch_size": 4,
                        "holdout_fraction": 0.25},
        "evaluation": {"path": str(tmp_path / "text.txt"), "window": 31, "max_windows": 6, "batch_size": 2},
        "refine": {"dampening": [0.01]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    rc = sweep.main(["--config", str(tmp_path / "cfg.yaml"), "--output", str(out), "--budgets", "6.0", "5.5",
                     "--study-budgets", "5.0", "6.0", "--random-plans", "2", "--max-eval-windows", "4",
                     "--study-max-eval-windows", "3"])
    assert rc == 0
    res = json.loads((out / "quality_sweep.json").read_text())
    assert (out / "quality_sweep.md").read_text().startswith("# Quality sweep")

    lad = res["ladder"]
    assert [r["budget"] for r in lad["rows"]] == [5.5, 6.0]
    assert all(r["n_positions"] == 4 * 31 for r in lad["rows"])  # --max-eval-windows reached the pipeline
    assert lad["checks"] == sweep.ladder_checks(lad["rows"])
    assert {c["status"] for c in lad["checks"]} <= {"PASS", "FAIL"}
    # the ladder's trace estimator reused the study's probe (the output error is a superset)
    assert len(list((out / "ladder" / "work").glob("sensitivity-*.safetensors"))) == 1
    assert res["ladder"]["stages"]["probe"]["cached"] == 1

    st = res["study"]
    plans = st["plans"]
    assert st["n_plans"] == len(plans) >= 8  # 6 estimator optima (some may coincide) + 6 rules + 2 random
    assert st["eval_windows"] == [3, 32]  # --study-max-eval-windows: the study's own count
    kinds = {p["kind"] for p in plans}
    assert kinds == {"optimal", "rule", "random"}
    labels = [s for p in plans for s in p["sources"]]
    for e in ("trace", "diag", "output"):
        assert f"{e}@5" in labels and f"{e}@6" in labels
    assert {f"random{i}@{b}" for i, b in ((0, 5), (1, 6))} <= set(labels)
    for p in plans:
        assert p["measured"]["n_positions"] == 3 * 31
        if p["kind"] == "random":
            assert p["bpp_body"] <= float(p["label"].split("@")[1]) + 1e-9
    per_plan = json.loads((out / "study_plans.json").read_text())
    assert set(per_plan) == {p["label"] for p in plans} and all(len(f) == 14 for f in per_plan.values())
    # the table is the Spearman of the stored numbers
    for row in st["table"]:
        e = row["estimator"]
        for key in ("kl_conf", "kl_all"):
            want = sweep.spearman([p["predicted_dloss"][e] for p in plans], [p["measured"][key] or math.nan for p in plans])
            got = row[f"spearman_{key}"]
            assert (got is None and math.isnan(want)) or got == pytest.approx(want)
    assert st["best"] in ("trace", "diag", "output", None)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "study_scatter.png").stat().st_size > 0
