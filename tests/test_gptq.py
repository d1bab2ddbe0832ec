"""GPTQ refinement: act-aware rounding, the scale sweep and the RTN gate, on synthetic Linears."""

from __future__ import annotations

import pytest
import torch

from pq_lightning import gptq as gptq_mod
from pq_lightning.formats import NonFiniteTensorError, get_format
from pq_lightning.formats.e2m1 import e2m1_codes, e2m1_decode
from pq_lightning.formats.fp8 import fp8_round
from pq_lightning.formats.nvfp4 import fp8_group_scales
from pq_lightning.gptq import (
    CandidateError,
    GPTQConfig,
    accumulate_hessian,
    gptq_fp8,
    gptq_nvfp4,
    gptq_nvfp4_candidates,
    group_output_error,
    inverse_hessian_factor,
    output_error,
    output_errors,
    refine_fp8,
    refine_nvfp4,
    scale_sweep_nvfp4,
)

NVFP4 = get_format("nvfp4")
FP8 = get_format("fp8")
OUT, IN = 64, 128


def _mixing(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(IN, IN, generator=g) / IN**0.5


def _tokens(n: int, A: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, A.shape[0], generator=g) @ A  # correlated inputs x = z @ A


def _hessian(x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    H, n = None, 0
    for b in x.split(batch):
        H, n = accumulate_hessian(H, b, n)
    return H / n


@pytest.fixture(scope="module")
def correlated():
    torch.manual_seed(0)
    W = torch.randn(OUT, IN)
    A = _mixing()
    H_fit = _hessian(_tokens(2048, A, seed=10))
    H_held = _hessian(_tokens(2048, A, seed=11))
    return W, H_fit, H_held, NVFP4.global_scale(W)


def _same_nvfp4(a, b) -> bool:
    return (
        torch.equal(a.codes, b.codes)
        and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
        and torch.equal(a.global_scale, b.global_scale)
    )


def _upper_inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Textbook U: (H + λI)⁻¹ = UᵀU, λ = damp·mean(diag H), via an explicit inverse."""
    Hd = H.double()
    Hd = Hd + damp * Hd.diagonal().mean() * torch.eye(Hd.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True).float()


# ---- Hessian and output error -----------------------------------------------------------------
def test_accumulate_hessian_streams_to_xtx():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 32)
    H, n = None, 0
    for chunk in x.split(1):
        H, n = accumulate_hessian(H, chunk, n)
    ref = x.reshape(-1, 32).double().T @ x.reshape(-1, 32).double()
    assert n == 150 and H.dtype == torch.float32
    torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="features"):
        accumulate_hessian(H, torch.randn(4, 16), n)


def test_output_error_is_the_token_sum_of_squared_output_errors():
    torch.manual_seed(0)
    W = torch.randn(40, 64)
    x = torch.randn(300, 64)
    H, _ = accumulate_hessian(None, x, 0)
    W_hat = NVFP4.fake_quant(W)
    ref = float((((W_hat.double() - W.double()) @ x.double().T) ** 2).sum())
    assert output_error(W, W_hat, H) == pytest.approx(ref, rel=1e-5)


def test_output_errors_batch_equals_plain_fp64_traces(monkeypatch):
    """Every candidate under every Hessian, several column panels and row chunks (some spanning
    two candidates), an H that is not exactly symmetric: the plain fp64 sum((ΔW @ H) ⊙ ΔW)."""
    torch.manual_seed(6)
    out, n = 37, 400  # 400 columns: three panels of the symmetric sum
    W = torch.randn(out, n)
    x = torch.randn(300, n) @ torch.randn(n, n) / n**0.5
    H1 = accumulate_hessian(None, x, 0)[0]
    H2 = H1 + 1e-3 * torch.randn(n, n)  # not symmetric
    W_hats = [NVFP4.fake_quant(W), W + 0.01 * torch.randn(out, n), NVFP4.fake_quant(W), W.clone()]
    monkeypatch.setattr(gptq_mod, "_ERROR_CHUNK_ELEMS", 16 * n)  # 16-row chunks: 37 rows straddle them
    got = output_errors(W, W_hats, [H1, H2])
    assert got.shape == (4, 2) and got.dtype == torch.float64
    for k, W_hat in enumerate(W_hats):
        d = W_hat.double() - W.double()
        for h, H in enumerate((H1, H2)):
            ref = float(((d @ H.double()) * d).sum())
            assert float(got[k, h]) == pytest.approx(ref, rel=1e-12, abs=1e-300)
    assert torch.equal(got[0], got[2])  # equal candidates, equal errors (exact ties stay ties)
    assert float(got[3].abs().max()) == 0.0
    assert output_error(W, W_hats[1], H2) == pytest.approx(float(got[1, 1]), rel=1e-12)


def test_gptq_and_sweep_fall_back_to_the_reference_rounding_for_extreme_global_scales():
    """With a global scale so large that eff / 8 could leave fp32's normal range, the column loop
    and the sweep use e2m1_codes itself; results still match the plain loop / RTN rules."""
    torch.manual_seed(7)
    W = torch.randn(4, 32)
    x = torch.randn(64, 32) @ torch.randn(32, 32)
    H, _ = accumulate_hessian(None, x, 0)
    for gs in (NVFP4.global_scale(W), torch.tensor([2.0**118])):
        assert gptq_mod._eighth_is_exact(gs, 2.0**-9) == (float(gs) < 2.0**100)
        codes, scales = _plain_gptq_nvfp4(W, H, gs, damp=0.01)
        q = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, block_size=16)
        assert torch.equal(q.codes, codes)
        assert torch.equal(q.scale.view(torch.uint8), scales.view(torch.uint8))
        sw = scale_sweep_nvfp4(W, H, global_scale=gs)
        assert torch.equal(NVFP4.quantize(W, global_scale=gs, scale=sw.scale).codes, sw.codes)


def test_signed_zero_weights_keep_their_code_sign():
    """Exact ±0 weights (no feedback under a diagonal Hessian) get RTN's codes, sign bit included."""
    torch.manual_seed(8)
    W = torch.randn(OUT, IN)
    W[0, :5] = -0.0
    W[1, :5] = 0.0
    gs = NVFP4.global_scale(W)
    rtn = NVFP4.quantize(W, global_scale=gs)
    assert int((rtn.codes[0, :5] == 8).sum()) == 5  # RTN: -0 -> code 8
    q = gptq_nvfp4(W, torch.diag(torch.rand(IN) + 0.1), global_scale=gs, damp=0.01)
    assert _same_nvfp4(q, rtn)
    sw = scale_sweep_nvfp4(W, torch.diag(torch.rand(IN) + 0.1), global_scale=gs)
    assert torch.equal(NVFP4.quantize(W, global_scale=gs, scale=sw.scale).codes, sw.codes)


def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_damped_inverse():
    torch.manual_seed(0)
    x = torch.randn(100, 48) @ torch.randn(48, 48)
    x[:, 7] = 0.0  # a dead input
    H, _ = accumulate_hessian(None, x, 0)
    U, dead = inverse_hessian_factor(H, 0.05)
    assert dead.nonzero().flatten().tolist() == [7]
    Hd = H.double()
    Hd[7, 7] = 1.0
    Hd += 0.05 * H.double().diagonal().mean() * torch.eye(48, dtype=torch.float64)
    torch.testing.assert_close((U.double().T @ U.double()), torch.linalg.inv(Hd), rtol=1e-4, atol=1e-8)
    assert torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    assert int((U[7] != 0).sum()) == 1 and int((U[:, 7] != 0).sum()) == 1


# ---- GPTQ vs RTN --------------------------------------------------------------------------------
def test_gptq_beats_rtn_on_correlated_inputs_and_refine_keeps_it(correlated):
    W, H_fit, H_held, gs = correlated
    rtn = NVFP4.quantize(W, global_scale=gs).dequantize()
    e_rtn = output_error(W, rtn, H_held)
    for act_order in (False, True):
        q = gptq_nvfp4(W, H_fit, global_scale=gs, damp=0.01, act_order=act_order)
        e_gptq = output_error(W, q.dequantize(), H_held)
        assert e_gptq <= 0.9 * e_rtn, (act_order, e_gptq, e_rtn)

    res = refine_nvfp4(W, H_fit, H_held, global_scale=gs)
    assert res.method != "rtn"
    assert res.candidates[res.key].heldout < 0.9 * res.candidates["rtn"].heldout
    assert res.candidates[res.key].heldout == min(c.heldout for c in res.candidates.values())
    assert set(res.candidates) == {"rtn", "sweep", "gptq@0.03", "sweep+gptq@0.03", "sweep+gptq@0.1"}
    assert not res.failed
    assert torch.equal(res.w_hat, res.quantized.dequantize())
    assert res.heldout_gain > 0.1


def test_default_candidates_are_a_subset_of_the_full_grid_scored_the_same(correlated):
    """The default five candidates are the full grid's (three dampings under both scales) with the
    same errors to the bit: solving fewer of them together changes none of them."""
    W, H_fit, H_held, gs = correlated
    full_grid = GPTQConfig(dampening=(0.01, 0.03, 0.1), own_scale_dampening=(0.01, 0.03, 0.1))
    full = refine_nvfp4(W, H_fit, H_held, global_scale=gs, config=full_grid)
    assert set(full.candidates) == {"rtn", "sweep"} | {f"{m}@{d:g}" for m in ("gptq", "sweep+gptq") for d in (0.01, 0.03, 0.1)}
    res = refine_nvfp4(W, H_fit, H_held, global_scale=gs)
    assert all(res.candidates[k] == full.candidates[k] for k in res.candidates)
    # without the sweep the dampings are GPTQ's own-scale candidates
    no_sweep = refine_nvfp4(W, H_fit, H_held, global_scale=gs, config=GPTQConfig(sweep=False))
    assert set(no_sweep.candidates) == {"rtn", "gptq@0.03", "gptq@0.1"}
    assert no_sweep.candidates["gptq@0.1"] == full.candidates["gptq@0.1"]
    with pytest.raises(ValueError, match="own_scale_dampening"):
        GPTQConfig(own_scale_dampening=(-0.1,))


def test_gate_reverts_to_rtn_when_gptq_overfits():
    torch.manual_seed(0)
    W = torch.randn(OUT, IN)
    gs = NVFP4.global_scale(W)
    H_fit = _hessian(_tokens(8, _mixing(1), seed=20))  # rank 8 << in_features
    H_held = _hessian(torch.randn(2048, IN))  # a different (isotropic) distribution
    cfg = GPTQConfig(dampening=(0.01, 0.03, 0.1), sweep=False)  # the sweep (per group) does not overfit here
    res = refine_nvfp4(W, H_fit, H_held, global_scale=gs, config=cfg)
    rtn = NVFP4.quantize(W, global_scale=gs / cfg.scale_headroom)
    for d in (0.01, 0.03, 0.1):  # GPTQ fits the 8 directions and is worse on held-out data
        assert res.candidates[f"gptq@{d:g}"].fit < res.candidates["rtn"].fit
        assert res.candidates[f"gptq@{d:g}"].heldout > res.candidates["rtn"].heldout
    assert res.method == "rtn" and res.damp is None
    assert _same_nvfp4(res.quantized, rtn)
    assert torch.equal(res.w_hat, rtn.dequantize())
    assert res.heldout_gain == 0.0
    # RTN kept: nothing to refit, the same bits with an H_refit given
    again = refine_nvfp4(W, H_fit, H_held, global_scale=gs, config=cfg, H_refit=(H_fit + H_held) / 2)
    assert not again.refit and "refit" not in again.candidates and _same_nvfp4(again.quantized, rtn)


def test_refit_solves_the_chosen_recipe_on_all_tokens(correlated):
    """The gate picks on held-out tokens; the kept weight is that recipe (method, damping) solved on
    ``H_refit``, scored under ``"refit"``; the gate's own record is unchanged."""
    W, H_fit, H_held, gs = correlated
    H_all = (H_fit + H_held) / 2
    plain = refine_nvfp4(W, H_fit, H_held, global_scale=gs)
    res = refine_nvfp4(W, H_fit, H_held, global_scale=gs, H_refit=H_all)
    assert (res.method, res.damp) == (plain.method, plain.damp) and res.method.endswith("gptq")
    assert {k: v for k, v in res.candidates.items() if k != "refit"} == plain.candidates
    cfg = GPTQConfig()
    gs_used = gs / cfg.scale_headroom  # every candidate's weight global scale
    scale = (scale_sweep_nvfp4(W, H_all, global_scale=gs_used, grid=cfg.sweep_grid).scale
             if res.method == "sweep+gptq" else None)
    want = gptq_nvfp4(W, H_all, global_scale=gs_used, damp=res.damp, scale=scale, act_order=cfg.act_order,
                      search_grid=cfg.sweep_grid if cfg.scale_search else None)
    assert res.refit and _same_nvfp4(res.quantized, want) and torch.equal(res.w_hat, want.dequantize())
    assert not _same_nvfp4(res.quantized, plain.quantized)
    fit, held = output_errors(W, [res.w_hat], [H_fit, H_held])[0].tolist()
    assert res.candidates["refit"] == CandidateError(fit=fit, heldout=held)
    off = refine_nvfp4(W, H_fit, H_held, global_scale=gs, H_refit=H_all, config=GPTQConfig(refit=False))
    assert not off.refit and _same_nvfp4(off.quantized, plain.quantized)
    fp8 = refine_fp8(W, H_fit, H_held, H_refit=H_all)
    assert fp8.refit and torch.equal(fp8.quantized["weight"].view(torch.uint8),
                                     gptq_fp8(W, H_all, damp=fp8.damp, act_order=True)["weight"].view(torch.uint8))


def test_packed_bytes_decode_to_the_weight_gptq_used(correlated):
    W, H_fit, _, gs = correlated
    sweep = scale_sweep_nvfp4(W, H_fit, global_scale=gs)
    for kwargs in (
        {},
        {"act_order": True},
        {"scale": sweep.scale},
        {"scale": sweep.scale, "act_order": True},
    ):
        q, w_hat = gptq_nvfp4(W, H_fit, global_scale=gs, damp=0.03, return_w_hat=True, **kwargs)
        decoded = NVFP4.unpack(NVFP4.pack_quantized(q))
        assert torch.equal(decoded, q.dequantize())
        assert torch.equal(decoded, w_hat)
        # codes are what NVFP4 rounding of the decoded weight gives back under the same scales
        assert torch.equal(NVFP4.quantize(w_hat, global_scale=gs, scale=q.scale).codes & 7, q.codes & 7)
        if "scale" in kwargs:
            assert torch.equal(q.scale.view(torch.uint8), sweep.scale.view(torch.uint8))


def test_diagonal_hessian_gives_rtn_exactly():
    torch.manual_seed(0)
    W = torch.randn(OUT, IN)
    gs = NVFP4.global_scale(W)
    rtn = NVFP4.quantize(W, global_scale=gs)
    for H in (3.7 * torch.eye(IN), torch.diag(torch.rand(IN) + 0.1)):
        for act_order in (False, True):
            q = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, act_order=act_order)
            assert _same_nvfp4(q, rtn)
    q8 = gptq_fp8(W, 2.0 * torch.eye(IN), damp=0.01)
    ref = FP8.pack(W)
    assert torch.equal(q8["weight"].view(torch.uint8), ref["weight"].view(torch.uint8))
    assert torch.equal(q8["weight_scale"], ref["weight_scale"])


# ---- reference loops ------------------------------------------------------------------------------
def _plain_gptq_nvfp4(W: torch.Tensor, H: torch.Tensor, gs: torch.Tensor, damp: float, search=None):
    """One column at a time, no blocks: scale at group entry from the current weights (with
    ``search``: per row, the multiplier of the amax whose plainly rounded group has the least
    ``Δᵀ (U_ggᵀ U_gg)⁻¹ Δ``, first minimum kept, 1 tried first)."""
    W = W.clone().float()
    U = _upper_inverse_factor(H, damp)
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    scales = torch.zeros(W.shape[0], W.shape[1] // 16, dtype=torch.float8_e4m3fn)
    for j in range(W.shape[1]):
        if j % 16 == 0:
            amax = W[:, j : j + 16].abs().amax(1)
            scales[:, j // 16] = fp8_group_scales(amax, gs)
            if search:
                Ug = U[j : j + 16, j : j + 16].double()
                block_inv = torch.linalg.inv(Ug.T @ Ug)  # the group's block of the remaining inverse Hessian
                for r in range(W.shape[0]):
                    best = None
                    for m in [1.0] + [m for m in search if m != 1.0]:
                        sc = fp8_group_scales(amax[r : r + 1] * m, gs)
                        eff = sc.float() / gs
                        d = (e2m1_decode(e2m1_codes(W[r, j : j + 16] / eff)) * eff - W[r, j : j + 16]).double()
                        loss = float(d @ block_inv @ d)
                        if best is None or loss < best[0] * (1 - 1e-9):
                            best = (loss, sc)
                    scales[r, j // 16] = best[1][0]
        eff = scales[:, j // 16].float() / gs
        codes[:, j] = e2m1_codes(W[:, j] / eff)
        err = (W[:, j] - e2m1_decode(codes[:, j]) * eff) / U[j, j]
        for k in range(j + 1, W.shape[1]):
            W[:, k] -= err * U[j, k]
    return codes, scales


def test_blocked_gptq_matches_a_plain_column_loop():
    torch.manual_seed(3)
    W = torch.randn(4, 32)
    x = torch.randn(64, 32) @ torch.randn(32, 32)
    H, _ = accumulate_hessian(None, x, 0)
    gs = NVFP4.global_scale(W)
    codes, scales = _plain_gptq_nvfp4(W, H, gs, damp=0.01)
    q = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, block_size=16)
    assert torch.equal(q.codes, codes)
    assert torch.equal(q.scale.view(torch.uint8), scales.view(torch.uint8))
    assert not torch.equal(codes, NVFP4.quantize(W, global_scale=gs).codes)  # feedback did something
    q128 = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, block_size=128)
    assert torch.equal(q128.codes, codes)


def test_scale_search_in_the_loop_matches_a_plain_search():
    """Scales chosen at each group's entry among multipliers of its current amax by the loss after
    feedback ‖U_gg⁻ᵀ Δ‖², as a plain per-row search with the explicit block inverse does."""
    torch.manual_seed(6)
    W = torch.randn(8, 64)
    x = torch.randn(256, 64) @ torch.randn(64, 64)
    H, _ = accumulate_hessian(None, x, 0)
    gs = NVFP4.global_scale(W)
    grid = (0.8, 0.9, 1.0, 1.1, 1.2)
    codes, scales = _plain_gptq_nvfp4(W, H, gs, damp=0.01, search=grid)
    q = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, block_size=32, search_grid=grid)
    assert torch.equal(q.scale.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(q.codes, codes)
    plain = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, block_size=32)
    assert not torch.equal(q.scale.view(torch.uint8), plain.scale.view(torch.uint8))  # the search moved some
    # a grid of 1 alone is the amax rule, bit for bit
    same = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, block_size=32, search_grid=(1.0,))
    assert torch.equal(same.codes, plain.codes)


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_candidates_equal_solving_each_alone(correlated, act_order):
    """One column loop over several (damping, scales) candidates gives each one's own result, bit
    for bit, whatever the batch size; a damping that cannot be inverted comes back as its error."""
    W, H_fit, _, gs = correlated
    swept = scale_sweep_nvfp4(W, H_fit, global_scale=gs).scale
    members = [(0.01, None), (0.1, None), (0.01, swept), (0.03, swept)]
    alone = [gptq_nvfp4(W, H_fit, global_scale=gs, damp=d, scale=s, act_order=act_order, block_size=32,
                        return_w_hat=True) for d, s in members]
    for max_batch in (4, 3):
        got = gptq_nvfp4_candidates(W, H_fit, global_scale=gs, candidates=members, act_order=act_order,
                                    block_size=32, max_batch=max_batch)
        for (q, w_hat), (q_ref, w_ref) in zip(got, alone, strict=True):
            assert torch.equal(q.codes, q_ref.codes)
            assert torch.equal(q.scale.view(torch.uint8), q_ref.scale.view(torch.uint8))
            assert torch.equal(w_hat, w_ref) and torch.equal(w_hat, q.dequantize())
    # a factor cache shared by two Linears of one H (fused siblings): each damping factored once,
    # every result unchanged
    cache: dict = {}
    for weight in (W, W.flip(0)):
        got = gptq_nvfp4_candidates(weight, H_fit, global_scale=gs, candidates=members, act_order=act_order,
                                    block_size=32, factor_cache=cache)
        ref = gptq_nvfp4_candidates(weight, H_fit, global_scale=gs, candidates=members, act_order=act_order,
                                    block_size=32)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(got, ref, strict=True))
    assert sorted(cache) == [(0.01, act_order), (0.03, act_order), (0.1, act_order)]
    if not act_order:
        assert torch.equal(cache[(0.01, False)], inverse_hessian_factor(H_fit, 0.01)[0])
    # the candidates differ from each other (the batch does not collapse them)
    assert not torch.equal(alone[0][0].codes, alone[1][0].codes)
    assert not torch.equal(alone[0][0].codes, alone[2][0].codes)
    mixed = gptq_nvfp4_candidates(W, H_fit, global_scale=gs, candidates=[(-1.0, None), (0.01, None)],
                                  act_order=act_order, block_size=32)
    assert isinstance(mixed[0], ValueError) and "damping" in str(mixed[0])
    assert torch.equal(mixed[1][0].codes, alone[0][0].codes)


def test_fp8_gptq_matches_a_plain_column_loop_and_decodes_exactly():
    torch.manual_seed(4)
    W = torch.randn(4, 24)
    x = torch.randn(64, 24) @ torch.randn(24, 24)
    H, _ = accumulate_hessian(None, x, 0)
    U = _upper_inverse_factor(H, 0.01)
    # RTN's scale, amax / 448 rounded to the nearest BF16 value (kept in fp32)
    s = (W.abs().amax(1) / 448).to(torch.bfloat16).float()
    Wc, ref = W.clone(), torch.zeros(W.shape, dtype=torch.float8_e4m3fn)
    for j in range(W.shape[1]):
        ref[:, j] = fp8_round(Wc[:, j] / s)
        err = (Wc[:, j] - ref[:, j].float() * s) / U[j, j]
        for k in range(j + 1, W.shape[1]):
            Wc[:, k] -= err * U[j, k]
    t = gptq_fp8(W, H, damp=0.01, block_size=8)
    assert torch.equal(t["weight"].view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(FP8.unpack(t), ref.float() * s.unsqueeze(1))


def test_act_order_permutes_whole_groups_by_hessian_mass(correlated):
    W, H_fit, _, gs = correlated
    d = torch.ones(IN)
    d[:16] = 0.1  # scale inputs 0..15 down: group 0 becomes the lightest, the order is not the identity
    H = d[:, None] * H_fit * d[None, :]
    mass = H.diagonal().reshape(-1, 16).sum(1)
    gperm = torch.sort(-mass.double(), stable=True).indices
    assert gperm[-1] == 0
    cperm = (gperm[:, None] * 16 + torch.arange(16)).reshape(-1)
    qp = gptq_nvfp4(W[:, cperm], H[cperm][:, cperm], global_scale=gs, damp=0.01)
    q = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, act_order=True)
    assert torch.equal(q.codes, qp.codes[:, torch.argsort(cperm)])
    assert torch.equal(q.scale.view(torch.uint8), qp.scale[:, torch.argsort(gperm)].view(torch.uint8))


def test_dead_inputs_keep_rtn_rounding_and_get_no_feedback(correlated):
    W, _, _, gs = correlated
    x = _tokens(512, _mixing(), seed=30)
    dead = torch.tensor([0, 5, 17, 100])
    x[:, dead] = 0.0
    H = _hessian(x)
    assert bool((H.diagonal()[dead] == 0).all())
    for act_order in (False, True):
        q = gptq_nvfp4(W, H, global_scale=gs, damp=0.01, act_order=act_order)
        eff = (q.scale.float() / gs).repeat_interleave(16, dim=1)
        # dead columns: their original weights rounded under the group's scale
        assert torch.equal(q.codes[:, dead], e2m1_codes(W[:, dead] / eff[:, dead]))
        # and they feed no error into live columns: same result as GPTQ without those inputs' weights
        W2 = W.clone()
        W2[:, dead] = 0.0
        q2 = gptq_nvfp4(W2, H, global_scale=gs, damp=0.01, scale=q.scale, act_order=act_order)
        live = torch.ones(IN, dtype=torch.bool)
        live[dead] = False
        assert torch.equal(q.codes[:, live], q2.codes[:, live])
    # all inputs dead: nothing to fit, GPTQ is RTN
    q0 = gptq_nvfp4(W, torch.zeros(IN, IN), global_scale=gs, damp=0.01)
    assert _same_nvfp4(q0, NVFP4.quantize(W, global_scale=gs))


# ---- scale sweep --------------------------------------------------------------------------------
def test_scale_sweep_never_worse_than_rtn_and_picks_the_best_fp8_candidate(correlated):
    W, H_fit, _, gs = correlated
    grid = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)
    sw = scale_sweep_nvfp4(W, H_fit, global_scale=gs, grid=grid)
    rtn = NVFP4.quantize(W, global_scale=gs)
    e_sw = group_output_error(W, sw.dequantize(), H_fit)
    e_rtn = group_output_error(W, rtn.dequantize(), H_fit)
    assert bool((e_sw <= e_rtn).all())
    assert float(e_sw.sum()) < 0.9 * float(e_rtn.sum())
    # brute force over the candidates, each re-rounded: the sweep's error is the minimum
    amax = W.unflatten(-1, (-1, 16)).abs().amax(-1)
    errs, cand_scales = [], []
    for m in grid:
        s = fp8_group_scales(amax * m, gs)
        cand_scales.append(s.view(torch.uint8))
        errs.append(group_output_error(W, NVFP4.quantize(W, global_scale=gs, scale=s).dequantize(), H_fit))
    torch.testing.assert_close(e_sw, torch.stack(errs).min(0).values, rtol=1e-12, atol=0)
    # chosen scales are FP8 values from the candidate set and the codes are RTN under them
    assert sw.scale.dtype == torch.float8_e4m3fn
    assert bool((torch.stack(cand_scales) == sw.scale.view(torch.uint8)).any(0).all())
    assert torch.equal(sw.scale.float().to(torch.float8_e4m3fn).view(torch.uint8), sw.scale.view(torch.uint8))
    assert torch.equal(NVFP4.quantize(W, global_scale=gs, scale=sw.scale).codes, sw.codes)
    assert torch.equal(NVFP4.unpack(NVFP4.pack_quantized(sw)), sw.dequantize())


def test_group_error_is_exact_for_a_block_diagonal_hessian():
    torch.manual_seed(5)
    W = torch.randn(8, 48)
    blocks = [torch.randn(32, 16) for _ in range(3)]
    H = torch.block_diag(*[b.T @ b for b in blocks])
    W_hat = NVFP4.fake_quant(W)
    assert float(group_output_error(W, W_hat, H).sum()) == pytest.approx(output_error(W, W_hat, H), rel=1e-9)


# ---- FP8, determinism, errors ---------------------------------------------------------------------
def test_refine_fp8_keeps_gptq_on_correlated_inputs(correlated):
    W, H_fit, H_held, _ = correlated
    res = refine_fp8(W, H_fit, H_held)
    assert res.method == "gptq"
    assert res.candidates[res.key].heldout <= 0.9 * res.candidates["rtn"].heldout
    assert torch.equal(res.w_hat, FP8.unpack(res.quantized))


def test_deterministic(correlated):
    W, H_fit, H_held, gs = correlated
    W0, H0 = W.clone(), H_fit.clone()
    a = refine_nvfp4(W, H_fit, H_held, global_scale=gs, config=GPTQConfig(act_order=True))
    b = refine_nvfp4(W, H_fit, H_held, global_scale=gs, config=GPTQConfig(act_order=True))
    assert a.key == b.key and a.candidates == b.candidates
    assert _same_nvfp4(a.quantized, b.quantized)
    assert torch.equal(W, W0) and torch.equal(H_fit, H0)  # inputs are never modified


def test_non_finite_and_bad_arguments_raise_clear_errors(correlated):
    W, H_fit, H_held, gs = correlated
    Wn = W.clone()
    Wn[3, 7] = float("nan")
    with pytest.raises(NonFiniteTensorError, match="weight"):
        gptq_nvfp4(Wn, H_fit, global_scale=gs)
    Hi = H_fit.clone()
    Hi[2, 2] = float("inf")
    with pytest.raises(NonFiniteTensorError, match="Hessian"):
        refine_nvfp4(W, Hi, H_held, global_scale=gs)
    with pytest.raises(NonFiniteTensorError, match="Hessian"):
        gptq_fp8(W, Hi)
    with pytest.raises(ValueError, match="multiple of 16"):
        gptq_nvfp4(W, H_fit, global_scale=gs, block_size=24)
    with pytest.raises(ValueError, match="multiple of 16"):
        GPTQConfig(block_size=40)
    with pytest.raises(ValueError, match=r"\[in, in\]"):
        gptq_nvfp4(W, H_fit[:64, :64], global_scale=gs)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        gptq_nvfp4(W, H_fit, global_scale=gs, scale=torch.ones(OUT, IN // 16))
    with pytest.raises(ValueError, match="damping"):
        gptq_nvfp4(W, H_fit, global_scale=gs, damp=-1.0)


# ---- weight global scale headroom --------------------------------------------------------------
def test_headroom_keeps_rtn_and_frees_the_largest_groups_scales(correlated):
    W, H_fit, H_held, gs = correlated
    # a power of two: the same served weight under RTN, scales halved exactly
    plain, roomy = NVFP4.quantize(W, global_scale=gs), NVFP4.quantize(W, global_scale=gs / 2)
    assert torch.equal(plain.dequantize(), roomy.dequantize()) and torch.equal(plain.codes, roomy.codes)
    assert torch.equal(roomy.scale.float() * 2, plain.scale.float())
    # the group holding the tensor's amax: without headroom its FP8 scale is at 448 and a multiplier
    # of 1.5 clamps back to it; with it, the scale takes 1.5x (its largest value maps to 4)
    amax = W.unflatten(-1, (-1, 16)).abs().amax(-1)
    top = amax == amax.max()
    assert bool((fp8_group_scales(amax * 1.5, gs).float()[top] == 448).all())
    assert torch.allclose(fp8_group_scales(amax * 1.5, gs / 2).float()[top], (gs / 2 * amax[top] * 1.5 / 6), rtol=0.07)
    old = GPTQConfig().sweep_grid  # the defaults: no headroom
    assert old == (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2) and GPTQConfig().scale_headroom == 1.0
    grid = old + (1.3, 1.4, 1.5)
    base = refine_nvfp4(W, H_fit, H_held, global_scale=gs, config=GPTQConfig(refit=False))
    res = refine_nvfp4(W, H_fit, H_held, global_scale=gs,
                       config=GPTQConfig(refit=False, sweep_grid=grid, scale_headroom=2.0))
    assert torch.equal(res.quantized.global_scale, gs / 2)  # every candidate's, so siblings share it
    assert res.candidates["rtn"] == base.candidates["rtn"]
    # the sweep is a brute-force minimum over more candidates: never worse per group
    e_base = group_output_error(W, scale_sweep_nvfp4(W, H_fit, global_scale=gs, grid=old).dequantize(), H_fit)
    e_room = group_output_error(W, scale_sweep_nvfp4(W, H_fit, global_scale=gs / 2, grid=grid).dequantize(), H_fit)
    assert bool((e_room <= e_base * (1 + 1e-9)).all()) and float(e_room.sum()) < float(e_base.sum())
    with pytest.raises(ValueError, match="power of two"):
        GPTQConfig(scale_headroom=3.0)
