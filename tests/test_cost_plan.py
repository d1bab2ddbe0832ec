"""Cost estimators against hand-written sums; groups, pins, budgets and plan.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pq_lightning.architectures import fused_groups, group_name
from pq_lightning.cost import compute_costs
from pq_lightning.formats import get_format
from pq_lightning.plan import Plan, budget_bits, build_groups, make_plan, non_body_bytes, write_pareto_csv
from pq_lightning.sensitivity import LinearSensitivity, Sensitivity


def _layer_names(n_layers=2):
    names = []
    for i in range(n_layers):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            names.append(f"model.layers.{i}.{p}")
    return names


def _fake_setup(seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    names = _layer_names()
    shapes = shapes or {n: (32, 48) if "down" in n else (48, 32) for n in names}
    linears, sens = {}, {}
    for n in names:
        lin = torch.nn.Linear(shapes[n][1], shapes[n][0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(shapes[n], generator=g) * 0.05)
        linears[n] = lin
        d_out = torch.rand(shapes[n][0], generator=g, dtype=torch.float64)
        d_in = torch.rand(shapes[n][1], generator=g, dtype=torch.float64)
        d_in *= d_out.sum() / d_in.sum()  # both marginals sum to h_trace
        sens[n] = LinearSensitivity(
            name=n, shape=shapes[n], h_trace=float(d_out.sum()), diag_out=d_out, diag_in=d_in,
            output_error={"nvfp4": float(torch.rand(1, generator=g)), "fp8": float(torch.rand(1, generator=g)) / 10},
            weight_numel=shapes[n][0] * shapes[n][1],
        )
    return linears, Sensitivity(linears=sens, meta={})


def test_trace_and_diag_estimators_equal_hand_sums():
    linears, sens = _fake_setup()
    trace = compute_costs(linears, sens, ["nvfp4", "fp8"], estimator="trace")
    diag = compute_costs(linears, sens, ["nvfp4", "fp8"], estimator="diag")
    out = compute_costs(linears, sens, ["nvfp4", "fp8"], estimator="output")
    for n, lin in linears.items():
        w = lin.weight.detach().double()
        s = sens.linears[n]
        for f in ("nvfp4", "fp8"):
            q = get_format(f).fake_quant(lin.weight.detach()).double()
            err2 = (q - w) ** 2
            want_trace = 0.5 * s.h_trace * float(err2.mean())
            assert trace[n].dloss[f] == pytest.approx(want_trace, rel=1e-6)
            # explicit double loop over the rank-one Fisher diagonal
            want_diag = 0.0
            for o in range(w.shape[0]):
                for i in range(w.shape[1]):
                    want_diag += float(s.diag_out[o] * s.diag_in[i]) / s.h_trace * float(err2[o, i])
            assert diag[n].dloss[f] == pytest.approx(0.5 * want_diag, rel=1e-6)
            assert out[n].dloss[f] == s.output_error[f]
            assert trace[n].bits[f] == get_format(f).bits(tuple(w.shape))
        assert trace[n].dloss["bf16"] == 0.0 and trace[n].bits["bf16"] == 16 * w.numel()


def test_output_estimator_names_the_missing_format():
    linears, sens = _fake_setup()
    with pytest.raises(ValueError, match="nvfp4a16.*re-run the probe"):
        compute_costs(linears, sens, ["nvfp4a16"], estimator="output")


def test_unsupported_shape_is_excluded_and_reported():
    names = _layer_names()
    shapes = {n: (48, 40) if n.endswith("o_proj") else (48, 32) for n in names}
    linears, sens = _fake_setup(shapes=shapes)
    costs = compute_costs(linears, sens, ["nvfp4", "fp8"])
    o = costs["model.layers.0.self_attn.o_proj"]
    assert "nvfp4" not in o.bits and "divisible by 16" in o.unsupported["nvfp4"]
    groups = build_groups(costs, model_type="llama", formats=["nvfp4", "fp8"])
    og = next(g for g in groups if g.name == "model.layers.0.self_attn.o_proj")
    assert [opt.format for opt in og.options] == ["fp8", "bf16"]


def test_fused_groups_follow_serving_constraints():
    names = _layer_names(1)
    groups = fused_groups(names, "llama")
    assert groups == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.self_attn.o_proj",),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
        ("model.layers.0.mlp.down_proj",),
    ]
    assert group_name(groups[0]) == "model.layers.0.self_attn.q_proj+k_proj+v_proj"
    # a sibling excluded from the body breaks the set
    partial = [n for n in names if not n.endswith("k_proj")]
    assert ("model.layers.0.self_attn.q_proj",) in fused_groups(partial, "llama")


def test_plan_respects_budget_pins_and_fused_siblings(tmp_path):
    linears, sens = _fake_setup()
    costs = compute_costs(linears, sens, ["nvfp4", "fp8"])
    groups = build_groups(costs, model_type="llama", formats=["nvfp4", "fp8"], pins={r"down_proj$": "fp8"})
    max_bits = budget_bits(groups, target_bits=6.0)
    plan = make_plan(costs, groups, max_bits=max_bits, estimator="trace", target={"target_bits": 6.0})
    assert plan.total_bits <= max_bits
    assert plan.bpp_body <= 6.0
    assert plan.total_bits == sum(costs[n].bits[lp.format] for n, lp in plan.linears.items())
    for i in range(2):
        assert plan.linears[f"model.layers.{i}.mlp.down_proj"].format == "fp8"
        q, k, v = (plan.linears[f"model.layers.{i}.self_attn.{p}_proj"].format for p in "qkv")
        assert q == k == v
    assert plan.predicted_dloss == pytest.approx(math.fsum(lp.predicted_dloss for lp in plan.linears.values()))
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.formats == plan.formats and again.total_bits == plan.total_bits
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["formats"] == plan.format_counts()
    write_pareto_csv([plan], tmp_path / "pareto.csv")
    assert (tmp_path / "pareto.csv").read_text().splitlines()[1].startswith("6.0,")


def test_bad_pins_and_budgets_say_what_to_do():
    linears, sens = _fake_setup()
    costs = compute_costs(linears, sens, ["nvfp4", "fp8"])
    with pytest.raises(ValueError, match="matches no body Linear"):
        build_groups(costs, model_type="llama", formats=["nvfp4"], pins={"nothing_here": "fp8"})
    with pytest.raises(ValueError, match="share no allowed format"):
        build_groups(costs, model_type="llama", formats=["nvfp4", "fp8"], pins={"q_proj": "fp8", "k_proj": "nvfp4"})
    groups = build_groups(costs, model_type="llama", formats=["nvfp4", "fp8"])
    with pytest.raises(ValueError, match="exactly one budget"):
        budget_bits(groups)
    with pytest.raises(ValueError, match="leaves no room"):
        budget_bits(groups, target_size_gb=1e-9, non_body=10_000)


def test_size_budget_counts_everything_on_disk():
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(100, 32)
    model.body = torch.nn.Linear(32, 48, bias=True)
    # the non-body bytes: embedding + the Linear's bias, as the BF16 the exporter writes
    assert non_body_bytes(model, ["body"]) == (100 * 32 + 48) * 2
    linears, sens = _fake_setup()
    costs = compute_costs(linears, sens, ["nvfp4", "fp8"])
    groups = build_groups(costs, model_type="llama", formats=["nvfp4", "fp8"])
    bits = budget_bits(groups, target_size_gb=1e-4, non_body=50_000)
    assert bits == (100_000 - 50_000) * 8


def test_the_cost_stage_prices_nvfp4_behind_its_smoothing_fold(tmp_path, make_tiny_llama, tiny_tokenizer):
    """``smooth.price_folds``: with the output estimator, each folded consumer's NVFP4 Δloss is the probe's
    times :func:`fold_gains`'s ratio, FP8 and unfolded Linears unchanged; the trace estimator is left alone."""
    from conftest import TINY_TEXT

    from pq_lightning import stages
    from pq_lightning.config import CalibrationConfig, ProbeConfig, TrainerConfig
    from pq_lightning.smooth import SmoothConfig, fold_gains
    from pq_lightning.stage_runner import StageRunner

    (tmp_path / "text.txt").write_text(TINY_TEXT)
    model = make_tiny_llama(hidden_size=64, intermediate_size=128, initializer_range=0.2)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 32.0  # an outlier channel: a fold that pays
    run = StageRunner(tmp_path / "out", quiet=True)
    loaded = stages.LoadedModel.wrap(model, tiny_tokenizer)
    cal = stages.calibration(run, loaded, CalibrationConfig(source=str(tmp_path / "text.txt"), seqlen=32,
                                                            num_samples=4, batch_size=2, holdout_fraction=0.25))
    body = stages.body(run, loaded, include=None, exclude=None)
    smooth = SmoothConfig()
    probed = stages.probe(run, loaded, cal, body, formats=["nvfp4", "fp8"], output_error=True, cfg=ProbeConfig(),
                          smooth=smooth, trainer=TrainerConfig(accelerator="cpu"))

    def costs(estimator, **kw):
        return stages.cost(run, loaded, body, probed, cal, formats=["nvfp4", "fp8"], estimator=estimator,
                           smooth=SmoothConfig(**kw))

    gains = fold_gains(model, probed.smoothing, smooth, get_format("nvfp4"), cal.fit[:1])
    assert "model.layers.0.self_attn.q_proj" in gains and gains["model.layers.0.self_attn.q_proj"] < 1
    priced, plain = costs("output", price_folds=True), costs("output")
    for name, c in priced.items():
        want = plain[name].dloss["nvfp4"] * gains.get(name, 1.0)
        assert c.dloss["nvfp4"] == pytest.approx(want, rel=1e-12) and c.dloss["fp8"] == plain[name].dloss["fp8"]
        assert c.fold_ratio == ({"nvfp4": gains[name]} if name in gains else {})
    trace = costs("trace", price_folds=True)
    assert all(not c.fold_ratio for c in trace.values())
