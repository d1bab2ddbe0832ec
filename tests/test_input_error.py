"""Input compensation: the error of a quantized input, its compensating target and the refiner's use
of both, each against a plain computation (direct mean over tokens, least squares, a plain forward)."""

from __future__ import annotations

import pytest
import torch

from pq_lightning.config import RefineConfig
from pq_lightning.formats import get_format
from pq_lightning.gptq import GPTQConfig, output_errors, refine_nvfp4
from pq_lightning.input_error import (
    InputError,
    InputErrors,
    InputErrorSums,
    choose_target,
    compensated_target,
    full_output_errors,
)
from pq_lightning.refine import refine_model

NVFP4 = get_format("nvfp4")


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Tokens with a few outlier channels (what NVFP4's per-16 input scales round badly beside) and
    correlated channels (what a compensating weight can predict the lost part from)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d // 4, generator=g)
    x = z @ torch.randn(d // 4, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)
    x[:, ::16] *= 12.0
    return x


def _moments(x: torch.Tensor, igs: torch.Tensor, split: str = "fit") -> tuple[torch.Tensor, torch.Tensor, InputError]:
    """``x̂``, ``H = E[x̂x̂ᵀ]`` and the input error, summed in two batches as the refiner does."""
    sums = InputErrorSums()
    xq = NVFP4.fake_quant_activation(x, igs)
    half = x.shape[0] // 2
    for a, b in ((0, half), (half, x.shape[0])):
        sums.add(split, x[a:b], xq[a:b])
    c_fit, g_fit, c_held, g_held = sums.tensors(x.shape[1], x.device)
    n = x.shape[0]
    err = InputError(c_fit / n, g_fit / n) if split == "fit" else InputError(c_held / n, g_held / n)
    return xq, (xq.T @ xq) / n, err


def _direct(W: torch.Tensor, W_hat: torch.Tensor, x: torch.Tensor, xq: torch.Tensor) -> float:
    """``mean_t ‖W x_t − Ŵ x̂_t‖²`` in fp64."""
    return float((x.double() @ W.detach().double().T - xq.double() @ W_hat.detach().double().T).pow(2).sum(1).mean())


def test_full_output_error_equals_the_direct_mean():
    x = _inputs(512, 64, 0)
    igs = NVFP4.calibrate_input_global_scale(x.abs().max())
    xq, H, err = _moments(x, igs)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    W_hats = [NVFP4.fake_quant(W), W, W + 0.01 * torch.randn(48, 64, generator=torch.Generator().manual_seed(2))]
    got = full_output_errors(W, output_errors(W, W_hats, [H]), W_hats, [err.terms(W)])[:, 0]
    for k, W_hat in enumerate(W_hats):
        assert float(got[k]) == pytest.approx(_direct(W, W_hat, x, xq), rel=1e-5)
    # the unquantized weight's error is the constant tr(W G Wᵀ): the input's own error
    assert err.terms(W).const == pytest.approx(_direct(W, W, x, xq), rel=1e-5)


def test_sums_of_the_two_splits_stay_apart():
    x = _inputs(256, 32, 3)
    igs = NVFP4.calibrate_input_global_scale(x.abs().max())
    sums = InputErrorSums()
    xq = NVFP4.fake_quant_activation(x, igs)
    sums.add("fit", x[:200], xq[:200])
    sums.add("heldout", x[200:], xq[200:])
    ie = InputErrorSums.per_token(sums.tensors(32, x.device), 200, 56, refit=True)
    e = (x - xq).double()
    for got, rows in ((ie.fit, slice(0, 200)), (ie.heldout, slice(200, 256)), (ie.refit, slice(0, 256))):
        n = e[rows].shape[0]
        assert torch.allclose(got.cross.double(), e[rows].T @ xq[rows].double() / n, atol=1e-5)
        assert torch.allclose(got.gram.double(), e[rows].T @ e[rows] / n, atol=1e-5)


def test_undamped_target_is_the_least_squares_regression():
    x = _inputs(1024, 32, 4)
    igs = NVFP4.calibrate_input_global_scale(x.abs().max())
    xq, H, err = _moments(x, igs)
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(5))
    T = compensated_target(W, H, W @ err.cross, 0.0)
    # min_T Σ‖W x − T x̂‖²: rows of T solve x̂ Tᵀ ≈ x Wᵀ
    ref = torch.linalg.lstsq(xq.double(), (x.double() @ W.double().T)).solution.T
    assert torch.allclose(T.double(), ref, rtol=1e-4, atol=1e-4)
    assert _direct(W, T, x, xq) < _direct(W, W, x, xq)


def test_choose_target_keeps_the_weight_when_the_input_is_exact():
    x = _inputs(256, 32, 6)
    zero = InputError(torch.zeros(32, 32), torch.zeros(32, 32))
    H = x.T @ x / 256
    W = torch.randn(8, 32)
    T, damp = choose_target(W, H, zero.terms(W), H, zero.terms(W), (0.01, 0.1))
    assert damp is None and torch.equal(T, W)


def _fit_and_heldout(seed: int):
    """Fit and held-out moments of one input distribution under one calibrated input scale, a weight."""
    x, x_held = _inputs(2048, 64, seed), _inputs(512, 64, seed + 1)
    igs = NVFP4.calibrate_input_global_scale(torch.cat([x, x_held]).abs().max())
    _, H, fit = _moments(x, igs)
    xq_h, H_h, held = _moments(x_held, igs, "heldout")
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed + 2))
    return W, H, fit, x_held, xq_h, H_h, held


def test_choose_target_picks_the_damping_of_least_heldout_error():
    W, H, fit, x_held, xq_h, H_h, held = _fit_and_heldout(7)
    dampings = (0.001, 0.1, 10.0)
    T, damp = choose_target(W, H, fit.terms(W), H_h, held.terms(W), dampings)
    errs = {d: _direct(W, compensated_target(W, H, W @ fit.cross, d), x_held, xq_h) for d in dampings}
    assert damp == min(errs, key=errs.get)
    assert _direct(W, T, x_held, xq_h) < _direct(W, W, x_held, xq_h)


def test_refine_nvfp4_compensated_records_true_errors_and_keeps_the_gate():
    W, H, fit, x_held, xq_h, H_h, held = _fit_and_heldout(10)
    gs = NVFP4.global_scale(W)
    ie = InputErrors(fit, held)
    plain = refine_nvfp4(W, H, H_h, global_scale=gs, config=GPTQConfig(refit=False))
    # the input error is ignored unless the config asks for it: bit for bit the plain result
    ignored = refine_nvfp4(W, H, H_h, global_scale=gs, config=GPTQConfig(refit=False), input_error=ie)
    assert torch.equal(ignored.w_hat, plain.w_hat) and ignored.target_damp is None
    comp = refine_nvfp4(W, H, H_h, global_scale=gs, config=GPTQConfig(refit=False, compensate_inputs=True),
                        input_error=ie)
    assert comp.target_damp is not None
    true_comp = _direct(W, comp.w_hat, x_held, xq_h)
    # its recorded held-out errors are the true ones (against the unquantized Linear), and the gate holds
    assert comp.candidates[comp.key].heldout == pytest.approx(true_comp, rel=1e-5)
    true_rtn = _direct(W, NVFP4.fake_quant(W, gs), x_held, xq_h)
    assert comp.candidates["rtn"].heldout == pytest.approx(true_rtn, rel=1e-5)
    assert true_comp < true_rtn


def test_error_is_the_targets_quadratic_plus_a_constant():
    """On the tokens it is fitted on, E‖W x − Ŵ x̂‖² − tr((T − Ŵ) H (T − Ŵ)ᵀ) is the same for every Ŵ
    (T undamped): why GPTQ and the sweep run on T minimise the error against the unquantized Linear."""
    x = _inputs(1024, 32, 13)
    igs = NVFP4.calibrate_input_global_scale(x.abs().max())
    xq, H, err = _moments(x, igs)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(14))
    T = compensated_target(W, H, W @ err.cross, 0.0).double()
    g = torch.Generator().manual_seed(15)
    gaps = []
    for W_hat in (W, NVFP4.fake_quant(W), T.float(), W + 0.1 * torch.randn(16, 32, generator=g)):
        D = T - W_hat.double()
        gaps.append(_direct(W, W_hat, x, xq) - float(((D @ H.double()) * D).sum()))
    assert max(gaps) - min(gaps) < 1e-4 * _direct(W, W, x, xq)


def test_config_rejects_an_empty_damping_list():
    with pytest.raises(ValueError, match="compensate_damp"):
        GPTQConfig(compensate_inputs=True, compensate_damp=())
    with pytest.raises(ValueError, match="compensate_damp"):
        RefineConfig(compensate_inputs=True, compensate_damp=[-1.0])
    RefineConfig(compensate_damp=[])  # not used: no error


# ---- in the refiner ----------------------------------------------------------------------------
def test_refiner_records_the_true_error_of_layer0_qproj(quiet_single_thread):
    from conftest import build_tiny_llama

    model = build_tiny_llama(hidden_size=64, intermediate_size=128)
    ids = torch.randint(4, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    fit, held = [ids[i : i + 2] for i in range(0, 12, 2)], [ids[i : i + 2] for i in range(12, 16, 2)]
    plan = {n: "nvfp4" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
    config = GPTQConfig(dampening=(0.01,), compensate_inputs=True, refit=False)
    out = refine_model(model, plan, fit, held, config=config)
    name = "model.layers.0.self_attn.q_proj"
    q = dict(model.named_modules())[name]
    xs: dict[str, list] = {"fit": [], "held": []}
    with torch.no_grad():
        for split, batches in (("fit", fit), ("held", held)):
            h = q.register_forward_pre_hook(lambda m, a, s=split: xs[s].append(a[0].reshape(-1, 64).clone()))
            for b in batches:
                model(input_ids=b, use_cache=False)
            h.remove()
    igs = NVFP4.calibrate_input_global_scale(out.input_amax[name])
    x_h = torch.cat(xs["held"])
    xq_h = NVFP4.fake_quant_activation(x_h, igs)
    decision = out.decisions[name]
    gs = NVFP4.shared_global_scale(dict(model.named_modules())[f"model.layers.0.self_attn.{p}_proj"].weight
                                   for p in "qkv")
    rtn = NVFP4.fake_quant(q.weight.detach(), gs)
    assert decision.heldout_rtn == pytest.approx(_direct(q.weight, rtn, x_h, xq_h), rel=1e-4)
    served = NVFP4.unpack(out.packed[name])
    assert decision.heldout_chosen == pytest.approx(_direct(q.weight, served, x_h, xq_h), rel=1e-4)
    assert decision.heldout_chosen <= decision.heldout_rtn


def test_measured_input_error_completes_the_weight_only_errors(quiet_single_thread):
    """``measure_input_error`` (for ``refine.reprice``): weight-only gate errors plus what the quantized
    input adds equal the direct error against the unquantized Linear, and no weight changes."""
    from conftest import build_tiny_llama

    from pq_lightning.shared_walk import WalkPlan, refine_plans

    model = build_tiny_llama(hidden_size=64, intermediate_size=128)
    ids = torch.randint(4, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    fit, held = [ids[i : i + 2] for i in range(0, 12, 2)], [ids[i : i + 2] for i in range(12, 16, 2)]
    plan = {n: "nvfp4" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
    plain = refine_model(model, plan, fit, held, config=GPTQConfig(dampening=(0.01,), refit=False))
    config = GPTQConfig(dampening=(0.01,), refit=False, measure_input_error=True)
    out = refine_model(model, plan, fit, held, config=config)
    name = "model.layers.0.self_attn.q_proj"
    modules = dict(model.named_modules())
    q = modules[name]
    xs: list[torch.Tensor] = []
    with torch.no_grad():
        h = q.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, 64).clone()))
        for b in held:
            model(input_ids=b, use_cache=False)
        h.remove()
    x_h = torch.cat(xs)
    xq_h = NVFP4.fake_quant_activation(x_h, NVFP4.calibrate_input_global_scale(out.input_amax[name]))
    d = out.decisions[name]
    gs = NVFP4.shared_global_scale(modules[f"model.layers.0.self_attn.{p}_proj"].weight for p in "qkv")
    rtn, served = NVFP4.fake_quant(q.weight.detach(), gs), NVFP4.unpack(out.packed[name])
    full_rtn, full_served = _direct(q.weight, rtn, x_h, xq_h), _direct(q.weight, served, x_h, xq_h)
    assert d.heldout_rtn + d.heldout_act_rtn == pytest.approx(full_rtn, rel=1e-4)
    assert d.heldout_chosen + d.heldout_act_chosen == pytest.approx(full_served, rel=1e-4)
    assert d.refine_gain == pytest.approx(full_served / full_rtn, rel=1e-4)
    assert d.heldout_rtn == plain.decisions[name].heldout_rtn  # the weight-only errors as without it
    for n in plan:
        for k, v in plain.packed[n].items():
            assert torch.equal(v.view(torch.uint8), out.packed[n][k].view(torch.uint8)), (n, k)
        assert out.decisions[n].refine_gain is not None and plain.decisions[n].refine_gain is None
    (shared,) = refine_plans(model, [WalkPlan(plan)], fit, held, config=config)
    for p in "qkv":  # the first layer's inputs are the same in both walks
        n = f"model.layers.0.self_attn.{p}_proj"
        assert shared.decisions[n].heldout_act_chosen == pytest.approx(out.decisions[n].heldout_act_chosen, rel=1e-5)


# ---- shared walk and ranks ---------------------------------------------------------------------
COMPENSATED = GPTQConfig(dampening=(0.01, 0.1), compensate_inputs=True)


def test_shared_walk_compensates_the_first_group_as_the_sequential_walk(quiet_single_thread):
    from test_refine import _llama, _windows
    from test_shared_walk import _mixed

    from pq_lightning.shared_walk import WalkPlan, refine_plans

    model = _llama()
    fit, held = _windows()
    seq = refine_model(model, _mixed(model), fit, held, config=COMPENSATED)
    (out,) = refine_plans(model, [WalkPlan(_mixed(model))], fit, held, config=COMPENSATED)
    compensated = 0
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
        for k, v in seq.packed[name].items():
            assert torch.equal(v.view(torch.uint8), out.packed[name][k].view(torch.uint8)), (name, k)
        assert out.decisions[name].errors == seq.decisions[name].errors
        assert out.decisions[name].target_damp == seq.decisions[name].target_damp
        compensated += seq.decisions[name].target_damp is not None
    assert compensated  # the test exercises a compensated decision


def test_shared_walk_compensates_the_folded_model_from_the_unfolded_stream(quiet_single_thread):
    """The input error is taken of the folded input x / s: the same bits as walking the folded model."""
    from test_refine import _llama, _same_bits, _windows
    from test_shared_walk import _all_nvfp4, _folded

    from pq_lightning.shared_walk import WalkPlan, refine_plans
    from pq_lightning.smooth import unfold_smoothing

    model = _llama()
    fit, held = _windows()
    plan = _all_nvfp4(model)
    folds = _folded(model, plan)
    (on_folded,) = refine_plans(model, [WalkPlan(plan)], fit, held, config=COMPENSATED)
    unfold_smoothing(model, folds)
    (by_walk,) = refine_plans(model, [WalkPlan.from_folds(plan, None, folds)], fit, held, config=COMPENSATED)
    _same_bits(by_walk, on_folded)
    assert any(d.target_damp is not None for d in by_walk.decisions.values())


def _gloo_worker(rank: int, world: int, port: int, out_path: str) -> None:
    from conftest import gloo_group
    from test_refine import _llama, _plan, _windows

    with gloo_group(rank, world, port):
        model = _llama()
        fit, held = _windows()
        out = refine_model(model, _plan(model), fit[rank::world], held[rank::world], config=COMPENSATED)
        torch.save({"packed": out.packed, "decisions": out.decisions}, f"{out_path}.{rank}")


@pytest.mark.distributed
def test_two_gloo_processes_reduce_the_input_error(tmp_path, quiet_single_thread):
    import socket

    import torch.multiprocessing as mp
    from test_refine import _llama, _plan, _windows

    model = _llama()
    fit, held = _windows()
    want = refine_model(model, _plan(model), fit, held, config=COMPENSATED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "rank")
    mp.spawn(_gloo_worker, args=(2, port, path), nprocs=2, join=True)
    ranks = [torch.load(f"{path}.{r}", weights_only=False) for r in range(2)]
    for name, packed in ranks[0]["packed"].items():  # decided by the owner, the same bits on both ranks
        assert all(torch.equal(v.view(torch.uint8), ranks[1]["packed"][name][k].view(torch.uint8))
                   for k, v in packed.items()), name
    first = "model.layers.0.self_attn.q_proj"  # its inputs do not depend on upstream decisions
    got, ref = ranks[0]["decisions"][first], want.decisions[first]
    assert got.target_damp == ref.target_damp and got.method == ref.method
    # the errors are of the all-reduced moments: those of one process over every window
    assert got.heldout_rtn == pytest.approx(ref.heldout_rtn, rel=1e-5)
    assert got.heldout_chosen == pytest.approx(ref.heldout_chosen, rel=1e-4)
