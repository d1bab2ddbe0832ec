"""The shared walk (several plans, one walk on the unquantized stream): tiny random Llama (hidden 64)."""

from __future__ import annotations

import socket

import pytest
import torch
from test_refine import CONFIG, _llama, _same_bits, _windows

from pq_lightning import shared_walk as shared_module
from pq_lightning.formats import get_format
from pq_lightning.gptq import output_error
from pq_lightning.models import find_body_linears
from pq_lightning.refine import refine_model
from pq_lightning.shared_walk import WalkPlan, refine_plans
from pq_lightning.smooth import SmoothConfig, find_mappings, fold_smoothing, unfold_smoothing

NVFP4 = get_format("nvfp4")

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def _mixed(model) -> dict[str, str]:
    """Layer 0 all NVFP4; layer 1: o_proj BF16, down_proj FP8, the rest NVFP4."""
    return {n: "bf16" if n.endswith("layers.1.self_attn.o_proj") else "fp8" if n.endswith("layers.1.mlp.down_proj")
            else "nvfp4" for n in find_body_linears(model)}


def _all_nvfp4(model) -> dict[str, str]:
    return dict.fromkeys(find_body_linears(model), "nvfp4")


def _folded(model, plan):
    """The plan's smoothing folded into ``model`` (NVFP4 consumers, alpha searched) and its result."""
    ids = torch.cat(_windows()[0])[:4]
    stats = find_mappings(model, ids, keep_tokens=128)
    formats = {n: get_format(f) for n, f in plan.items()}
    return fold_smoothing(model, stats, SmoothConfig(alpha=0.5, search=[], attention=True), ids[:1], formats=formats,
                          select=lambda m: all(formats[c].smooth_inputs for c in m.consumers))


def test_first_group_is_decided_as_by_the_sequential_walk():
    """Layer 0's q/k/v see the same inputs in both walks (nothing upstream is quantized yet)."""
    model = _llama()
    fit, held = _windows()
    seq = refine_model(model, _mixed(model), fit, held, config=CONFIG)
    (out,) = refine_plans(model, [WalkPlan(_mixed(model))], fit, held, config=CONFIG)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
        for k, v in seq.packed[name].items():
            assert torch.equal(v.view(torch.uint8), out.packed[name][k].view(torch.uint8)), (name, k)
        assert out.input_amax[name] == seq.input_amax[name]
        assert out.decisions[name].errors == seq.decisions[name].errors
    # later groups see the unquantized stream here, the quantized one there: other (valid) decisions
    assert out.decisions.keys() == seq.decisions.keys()
    assert out.totals["walk"] == "shared"


def test_heldout_error_uses_the_unquantized_models_inputs():
    """A layer-1 Linear's RTN held-out error equals ``tr(ΔW H ΔWᵀ)/n`` from a plain forward of the model."""
    model = _llama()
    fit, held = _windows()
    name = "model.layers.1.mlp.gate_proj"
    (out,) = refine_plans(model, [WalkPlan(_mixed(model))], fit, held, config=CONFIG)
    lin = dict(model.named_modules())[name]
    xs: dict[str, list] = {"fit": [], "held": []}
    with torch.no_grad():
        for split, batches in (("fit", fit), ("held", held)):
            h = lin.register_forward_pre_hook(lambda m, a, s=split: xs[s].append(a[0].detach().clone()))
            for b in batches:
                model(input_ids=b, use_cache=False)
            h.remove()
    amax = max(float(x.abs().max()) for x in xs["fit"] + xs["held"])
    assert out.input_amax[name] == amax
    igs = NVFP4.calibrate_input_global_scale(amax)
    xq = torch.cat([NVFP4.fake_quant_activation(x, igs).reshape(-1, 64) for x in xs["held"]]).double()
    H = xq.T @ xq / xq.shape[0]
    W = lin.weight.detach().float()
    gs = NVFP4.shared_global_scale([W, dict(model.named_modules())["model.layers.1.mlp.up_proj"].weight.float()])
    w_rtn = NVFP4.unpack(NVFP4.pack(W, global_scale=gs)).float()
    want = output_error(W.double(), w_rtn.double(), H)
    assert out.decisions[name].errors["rtn"]["heldout"] == pytest.approx(want, rel=1e-5)


def test_folds_applied_by_the_walk_equal_walking_the_folded_model():
    """Scales are powers of two: x / s and diag(1/r) W diag(s) in the hooks give the folded model's bits."""
    model = _llama()
    fit, held = _windows()
    plan = _all_nvfp4(model)
    folds = _folded(model, plan)
    assert {m.kind for m in folds.mappings} == {"norm", "linear_rows", "head_rows"}  # every kind exercised
    (on_folded,) = refine_plans(model, [WalkPlan(plan)], fit, held, config=CONFIG)
    unfold_smoothing(model, folds)
    (by_walk,) = refine_plans(model, [WalkPlan.from_folds(plan, None, folds)], fit, held, config=CONFIG)
    _same_bits(by_walk, on_folded)


def test_plans_walked_together_equal_each_alone_and_share_decisions(monkeypatch):
    model = _llama()
    fit, held = _windows()
    plans = [WalkPlan(_mixed(model)), WalkPlan(_all_nvfp4(model))]
    alone = [refine_plans(model, [p], fit, held, config=CONFIG)[0] for p in plans]
    calls = []
    real = shared_module._decide
    monkeypatch.setattr(shared_module, "_decide", lambda name, *a, **k: calls.append(name) or real(name, *a, **k))
    together = refine_plans(model, plans, fit, held, config=CONFIG)
    for a, b in zip(together, alone, strict=True):
        _same_bits(a, b)
    # the plans differ in 2 Linears (o_proj, down_proj of layer 1); down_proj's FP8 is a decision of its own
    n_quant = [sum(f != "bf16" for f in p.formats.values()) for p in plans]
    assert len(calls) == n_quant[1] + 1 == 15


def test_inputs_too_large_to_keep_take_a_second_pass_with_the_same_bits():
    model = _llama()
    fit, held = _windows()
    plans = [WalkPlan(_mixed(model))]
    _same_bits(refine_plans(model, plans, fit, held, config=CONFIG, max_kept_input_bytes=0)[0],
               refine_plans(model, plans, fit, held, config=CONFIG)[0])


def test_model_comes_back_bit_identical_and_bad_plans_are_refused():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit, held = _windows()
    plan = _mixed(model)
    refine_plans(model, [WalkPlan(plan)], fit, held, config=CONFIG)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="at least one plan"):
        refine_plans(model, [], fit, held)
    bad = dict(plan, **{"model.layers.0.self_attn.k_proj": "fp8"})
    with pytest.raises(ValueError, match="share one format"):
        refine_plans(model, [WalkPlan(bad)], fit, held)


# ---- two gloo processes -------------------------------------------------------------------------
def _gloo_worker(rank: int, world: int, port: int, out_path: str) -> None:
    from conftest import gloo_group

    with gloo_group(rank, world, port):
        model = _llama()
        fit, held = _windows()
        outs = refine_plans(model, [WalkPlan(_mixed(model)), WalkPlan(_all_nvfp4(model))], fit[rank::world],
                            held[rank::world], config=CONFIG)
        torch.save([{"packed": o.packed, "amax": o.input_amax,
                     "methods": {n: d.method for n, d in o.decisions.items()}} for o in outs], f"{out_path}.{rank}")


@pytest.mark.distributed
def test_two_gloo_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    model = _llama()
    fit, held = _windows()
    want = refine_plans(model, [WalkPlan(_mixed(model)), WalkPlan(_all_nvfp4(model))], fit, held, config=CONFIG)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "rank")
    mp.spawn(_gloo_worker, args=(2, port, path), nprocs=2, join=True)
    for r in range(2):
        for got, out in zip(torch.load(f"{path}.{r}"), want, strict=True):
            assert got["amax"] == out.input_amax
            assert got["methods"] == {n: d.method for n, d in out.decisions.items()}
            for name, packed in out.packed.items():  # decided by one owner rank, broadcast to the other
                for k, v in packed.items():
                    assert torch.equal(got["packed"][name][k].view(torch.uint8), v.view(torch.uint8)), (name, k)
