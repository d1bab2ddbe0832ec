"""Activation smoothing: hand-computed scales, exact folds on Llama, Gemma-4 and Gemma-3 (``1 + weight``
norms, fp32 and bf16), the W4A4 error it removes, and the refusals (a norm of another form, a fold that
would change the logits)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pq_lightning.formats import get_format
from pq_lightning.smooth import (
    SmoothConfig,
    SmoothMapping,
    exact_scales,
    gain_offset,
    refold_smoothing,
    smooth_model,
    smoothing_scales,
    unfold_smoothing,
)

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def _windows(n: int = 4, t: int = 16) -> torch.Tensor:
    return torch.randint(4, 128, (n, t), generator=torch.Generator().manual_seed(1))


def test_scales_match_a_plain_loop():
    x_amax = torch.tensor([8.0, 1.0, 0.25, 0.0, 3.0])
    w1 = torch.tensor([[2.0, -1.0, 4.0, 1.0, 0.5], [0.0, 0.5, -1.0, 0.0, -0.1]])
    w2 = torch.tensor([[1.0, -4.0, 1.0, 0.0, 0.2]])
    for alpha in (0.0, 0.3, 0.5, 1.0):
        got = smoothing_scales(x_amax, [w1, w2], alpha)
        for j in range(5):
            wa = max(abs(float(w[r, j])) for w in (w1, w2) for r in range(w.shape[0]))
            raw = max(float(x_amax[j]), 1e-5) ** alpha / max(wa, 1e-5) ** (1 - alpha)
            want = 2.0 ** max(-16, min(16, round(math.log2(raw))))
            assert got[j].item() == pytest.approx(want, rel=1e-6), (alpha, j)
    # by hand, alpha 0.5: sqrt(8 / 2) = 2; sqrt(1 / 4) = 0.5; sqrt(0.25 / 4) = 0.25; zero amax floors at 1e-5
    assert smoothing_scales(x_amax, [w1, w2], 0.5)[:3].tolist() == [2.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="channels"):
        smoothing_scales(x_amax[:3], [w1], 0.5)
    for bad in ({"alpha": 1.5}, {"search": [0.5, -0.1]}, {"search_tokens": 0}):
        with pytest.raises(ValueError, match="must"):
            SmoothConfig(**bad)


@pytest.mark.parametrize("arch", ["llama", "gemma4"])
def test_folds_are_exact_and_found_by_dataflow(arch, make_tiny_llama, make_tiny_gemma4):
    """Llama: norms -> q/k/v and gate/up, up rows -> down, v rows -> o (one scale per kv head and head dim,
    shared by its 2 query heads). Gemma-4 normalises v per head (``v_norm``): its attention folds would move
    the logits, so only they are undone."""
    model = (make_tiny_llama() if arch == "llama" else make_tiny_gemma4()).eval()
    w = _windows()
    with torch.no_grad():
        before = model(input_ids=w).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    res = smooth_model(model, w, SmoothConfig(alpha=0.5, attention=True))
    with torch.no_grad():
        after = model(input_ids=w).logits
    # power-of-two scales: the smoothed model computes exactly what the original does
    assert torch.equal(before, after)
    prefix = "model.layers" if arch == "llama" else "model.language_model.layers"
    mlp_norm = "post_attention_layernorm" if arch == "llama" else "pre_feedforward_layernorm"
    want = []
    for i in range(2):
        want += [
            (f"{prefix}.{i}.input_layernorm", "norm", ["q_proj", "k_proj", "v_proj"]),
            (f"{prefix}.{i}.{mlp_norm}", "norm", ["gate_proj", "up_proj"]),
            (f"{prefix}.{i}.mlp.up_proj", "linear_rows", ["down_proj"]),
        ]
    if arch == "llama":
        want += [(f"{prefix}.{i}.self_attn.v_proj", "head_rows", ["o_proj"]) for i in range(2)]
        assert res.max_logit_change == 0.0 and res.skipped == []
    else:
        assert len(res.skipped) == 1 and res.skipped[0].startswith("the attention (v_proj -> o_proj) folds undone")
    got = [(m.producer, m.kind, [c.rsplit(".", 1)[1] for c in m.consumers]) for m in res.mappings]
    assert got == want
    # every Linear: its columns times the scales of the folds it consumes, its rows over those of the one it makes
    state = model.state_dict()
    expect = {k: v.clone() for k, v in weights.items()}
    for m in res.mappings:
        s = res.scales[m.producer]
        assert not torch.all(s == 1)
        for c in m.consumers:
            expect[f"{c}.weight"] *= s
        if m.kind == "norm":
            expect[f"{m.producer}.weight"] /= s
        else:
            expect[f"{m.producer}.weight"] /= m.producer_rows(s)[:, None]
    assert all(torch.equal(state[k], expect[k]) for k in state)
    if arch == "llama":  # kv head g's scales are o_proj's columns of query heads 2g and 2g + 1 (head_dim 8)
        s = res.scales[f"{prefix}.0.self_attn.v_proj"].reshape(4, 8)
        assert torch.equal(s[0], s[1]) and torch.equal(s[2], s[3])


def test_smoothing_cuts_the_w4a4_error_of_an_outlier_channel(make_tiny_llama):
    """An input channel 64x larger than the rest: NVFP4 W4A4 output error of q/k/v falls after smoothing."""
    model = make_tiny_llama().eval()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 64.0
    w = _windows(8, 32)
    fmt = get_format("nvfp4")
    lin = model.model.layers[0].self_attn.q_proj

    def w4a4_error() -> float:
        xs = []
        h = lin.register_forward_pre_hook(lambda mod, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            model(input_ids=w)
        h.remove()
        x = torch.cat(xs)
        igs = fmt.calibrate_input_global_scale(x.abs().max())
        W = lin.weight.detach()
        y = x @ W.T
        y_hat = fmt.fake_quant_activation(x, igs) @ fmt.fake_quant(W).T
        return float((y - y_hat).pow(2).sum() / y.pow(2).sum())

    before = w4a4_error()
    res = smooth_model(model, w)
    after = w4a4_error()
    assert res.scales["model.layers.0.input_layernorm"][5] > 1  # the outlier channel is divided down
    assert after < 0.5 * before, (before, after)


class _OnePlusNorm(nn.Module):
    """Gemma-3 style: ``x * (1 + weight)``; dividing the weight by s does not divide the output by s."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return x * (1 + self.weight)


class _SquareNorm(_OnePlusNorm):
    def forward(self, x):
        return x * self.weight**2


def test_the_gain_form_of_a_norm_is_found_on_the_norm_itself(make_tiny_llama, make_tiny_gemma3):
    assert gain_offset(_OnePlusNorm(4)) == 1.0
    assert gain_offset(make_tiny_gemma3().model.layers[0].input_layernorm) == 1.0
    norm = make_tiny_llama().model.layers[0].input_layernorm
    saved = norm.weight.detach().clone()
    assert gain_offset(norm) == 0.0
    assert torch.equal(norm.weight, saved)  # the check leaves the weight as it found it
    square = _SquareNorm(4)
    with torch.no_grad():
        square.weight.fill_(1.5)
    assert gain_offset(square) is None


def test_exact_scales_by_hand():
    """``w' = (1 + w) / s - 1`` must give back ``(1 + w) / s`` and unfold to ``w`` bit for bit."""
    # fp32, gain 1 + w: 6.4375 -> 2.71875 (exact); -1 (gain 0) folds at any s; 2**-30 vanishes in
    # 1 + w, so no fold unfolds to it: 1; gain 1.5 at s 1/2 -> w' = 2 (exact)
    w = torch.tensor([6.4375, -1.0, 2.0**-30, 0.5])
    s = torch.tensor([2.0, 4.0, 2.0, 0.5])
    assert exact_scales(w, 1.0, s).tolist() == [2.0, 4.0, 1.0, 0.5]
    # bf16, w = 77/256: at s 4, w' = -691/1024 needs 10 significant bits (bf16 has 8); at s 2,
    # w' = -179/512 fits: the nearest exact power of two toward 1
    wb = torch.tensor([77 / 256, 6.4375], dtype=torch.bfloat16)
    assert exact_scales(wb, 1.0, torch.tensor([4.0, 2.0])).tolist() == [2.0, 2.0]
    # gain w: every power of two folds exactly
    assert exact_scales(torch.tensor([0.3, -7.1]), 0.0, torch.tensor([8.0, 0.25])).tolist() == [8.0, 0.25]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_plus_weight_norms_fold_exactly(make_tiny_gemma3, dtype):
    """Gemma-3 (``1 + w`` norms holding bf16 values, as the real checkpoints do): the logits do not move
    by one bit and the unfold gives back every weight. In fp32 every channel takes its wanted scale; in
    bf16 the channels whose folded weight is not representable take a smaller power of two."""
    from pq_lightning.smooth import find_mappings, fold_smoothing

    model = make_tiny_gemma3().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.to(dtype)
    w = _windows()
    with torch.no_grad():
        before = model(input_ids=w).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = find_mappings(model, w)
    modules = dict(model.named_modules())
    wanted = {m.producer: smoothing_scales(stats.amax[m.consumers[0]], [modules[c].weight for c in m.consumers], 0.5,
                                           m.heads) for m in stats.mappings}
    res = fold_smoothing(model, stats, SmoothConfig(alpha=0.5, search=[], attention=True), w[:1])
    with torch.no_grad():
        after = model(input_ids=w).logits
    assert torch.equal(before, after) and res.max_logit_change == 0.0 and res.skipped == []
    kinds = [(m.producer.rsplit(".", 1)[1], m.kind) for m in res.mappings]
    assert kinds == ([("input_layernorm", "norm"), ("pre_feedforward_layernorm", "norm"), ("up_proj", "linear_rows")] * 2
                     + [("v_proj", "head_rows")] * 2)
    assert res.offsets["model.layers.0.input_layernorm"] == 1.0
    stepped = 0
    for m in res.mappings:
        got, want = res.scales[m.producer], wanted[m.producer]
        # each channel: the wanted power of two, or one nearer to 1 (never past it)
        assert torch.all((got == want) | ((got - 1) * (want - got) > 0) | (got == 1)), m.producer
        stepped += int((got != want).sum())
        if m.kind == "norm":
            gain = 1 + modules[m.producer].weight.float()
            assert torch.equal(gain, (1 + state[f"{m.producer}.weight"].float()) / got), m.producer
    assert (stepped == 0) if dtype == torch.float32 else (stepped > 0)
    folded = {k: v.clone() for k, v in model.state_dict().items()}
    unfold_smoothing(model, res)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    refold_smoothing(model, res)  # the shared walk's budgets are folded again for export: the same bits
    assert all(torch.equal(v, folded[k]) for k, v in model.state_dict().items())


def test_a_fold_that_moves_the_logits_is_undone(make_tiny_llama, monkeypatch):
    """A wrong mapping (q_proj's input is not made by up_proj): every fold is rolled back, bit for bit."""
    import pq_lightning.smooth as smooth

    model = make_tiny_llama().eval()
    w = _windows()
    real = smooth.find_mappings

    def wrong(model, windows):
        stats = real(model, windows)
        bad = SmoothMapping("model.layers.1.mlp.gate_proj", ["model.layers.1.mlp.down_proj"], "linear_rows")
        stats.amax[bad.consumers[0]] = torch.rand(64) * 10
        stats.mappings.append(bad)
        return stats

    monkeypatch.setattr(smooth, "find_mappings", wrong)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = smooth_model(model, w)
    assert res.mappings == [] and res.scales == {}
    assert "undone" in res.skipped[-1] and res.max_logit_change > 1e-3
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_disabled_or_alpha_zero_without_search_changes_nothing(make_tiny_llama):
    model = make_tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for cfg in (SmoothConfig(enabled=False), SmoothConfig(alpha=0.0, search=[])):
        assert not cfg.active
        assert smooth_model(model, _windows(), cfg).mappings == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="calibration windows"):
        smooth_model(model, torch.zeros(0, 8, dtype=torch.long))


def test_unfold_restores_every_weight_bit_for_bit_and_select_limits_the_folds(make_tiny_llama):
    from pq_lightning.smooth import find_mappings, fold_smoothing, unfold_smoothing

    model = make_tiny_llama().eval()
    w = _windows()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    only_mlp = fold_smoothing(model, find_mappings(model, w), SmoothConfig(), w[:1],
                              select=lambda m: "mlp" in m.consumers[0])
    assert [m.producer.rsplit(".", 1)[1] for m in only_mlp.mappings] == ["post_attention_layernorm", "up_proj"] * 2
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(".mlp." in k or "post_attention_layernorm" in k for k in changed)
    unfold_smoothing(model, only_mlp)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_search_keeps_the_alpha_with_the_least_quantized_output_error(make_tiny_llama):
    from pq_lightning.smooth import _search_alpha, find_mappings, relative_output_error

    model = make_tiny_llama().eval()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 64.0
    stats = find_mappings(model, _windows(8, 32), keep_tokens=100)
    q = "model.layers.0.self_attn.q_proj"
    x = stats.samples[q]
    assert x.shape == (100, 32)  # keep_tokens rows of the 256 seen
    names = [q, "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    mods = dict(model.named_modules())
    weights = [mods[n].weight for n in names]
    fmt = get_format("nvfp4")
    # the error by hand for one consumer, no fold
    W = weights[0].detach()
    y = x @ W.T
    y_hat = fmt.fake_quant_activation(x, fmt.calibrate_input_global_scale(x.abs().amax())) @ fmt.fake_quant(W).T
    assert relative_output_error(x, weights[:1], [fmt], None) == pytest.approx(
        float((y - y_hat).pow(2).sum() / y.pow(2).sum()), rel=1e-6)
    grid = [0.25, 0.5, 0.75]
    errors = {None: relative_output_error(x, weights, [fmt] * 3, None)}
    for a in grid:
        errors[a] = relative_output_error(x, weights, [fmt] * 3, smoothing_scales(stats.amax[q], weights, a))
    best = min(errors, key=errors.get)
    assert best is not None  # the outlier channel makes some fold pay
    assert _search_alpha(x, weights, [fmt] * 3, stats.amax[q], grid) == best
    res = fold_smoothing_with_search(model, stats, grid)
    assert res.alphas["model.layers.0.input_layernorm"] == best


def fold_smoothing_with_search(model, stats, grid):
    from pq_lightning.smooth import fold_smoothing

    fmts = {n: get_format("nvfp4") for m in stats.mappings for n in m.consumers}
    return fold_smoothing(model, stats, SmoothConfig(search=grid), _windows()[:1], formats=fmts)


def test_observer_keeps_a_uniform_sample_of_copied_rows_and_merges_exactly(make_tiny_llama):
    from pq_lightning.smooth import SmoothingObserver, find_mappings

    model = make_tiny_llama().eval()
    w = _windows(8, 32)
    q = "model.layers.1.self_attn.q_proj"
    # reference: every input row of q_proj and the keys the observer draws (one torch.rand per forward)
    seen = []
    h = dict(model.named_modules())[q].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, 32).clone()))
    stats = find_mappings(model, w, keep_tokens=50, seed=3)
    h.remove()
    rows = torch.cat(seen)
    gen = torch.Generator().manual_seed(3)
    keys = []
    for _ in range(8):  # the observer draws for layer 0's q, mlp, down, then layer 1's (o_proj: its own generator)
        for _ in range(6):
            keys.append(torch.rand(32, generator=gen))
    keys = torch.stack(keys).view(8, 6, 32)[:, 3].reshape(-1)
    want = rows[torch.topk(keys, 50, largest=False).indices]
    got = stats.samples[q]
    assert got.shape == (50, 32)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    assert torch.equal(stats.amax[q], rows.abs().amax(0))
    # kept rows are copies: they pin 50 rows, not the windows' activations
    assert got.untyped_storage().nbytes() == 50 * 32 * 4
    # two observers over halves merge into the same amax and a sample drawn from the union
    a, b = SmoothingObserver(model, keep_tokens=50, seed=3), SmoothingObserver(model, keep_tokens=50, seed=4)
    with torch.no_grad():
        for obs, half in ((a, w[:4]), (b, w[4:])):
            for win in half:
                obs.begin_forward()
                model(input_ids=win[None])
                obs.end_forward()
    a.detach(), b.detach()
    a.merge(b.state())
    merged = a.stats()
    assert torch.equal(merged.amax[q], stats.amax[q])
    assert [m.producer for m in merged.mappings] == [m.producer for m in stats.mappings]
    allrows = {tuple(r) for r in rows.tolist()}
    assert merged.samples[q].shape == (50, 32) and all(tuple(r) in allrows for r in merged.samples[q].tolist())


def test_head_tied_scales_by_hand():
    """One kv head, two query heads, head dim 2: channel d of both query heads takes one scale, computed on
    their joint amax (x: max(8, 2) = 8 and max(1, 4) = 4; W: 2 and 4): sqrt(8 / 2) = 2, sqrt(4 / 4) = 1."""
    x_amax = torch.tensor([8.0, 1.0, 2.0, 4.0])
    w = torch.tensor([[2.0, 1.0, -1.0, 4.0]])
    assert smoothing_scales(x_amax, [w], 0.5, (1, 2, 2)).tolist() == [2.0, 1.0, 2.0, 1.0]
    m = SmoothMapping("v", ["o"], "head_rows", (1, 2, 2))
    assert m.producer_rows(torch.tensor([2.0, 1.0, 2.0, 1.0])).tolist() == [2.0, 1.0]


def test_fold_gains_are_the_measured_error_ratios_of_the_folds_made(make_tiny_llama):
    """Every consumer the all-NVFP4 fold reaches: its RTN W4A4 output error with that fold over the error
    without, on the kept samples; the model comes back bit for bit. The outlier channel makes q's ratio < 1."""
    from pq_lightning.cost import LinearCost, price_folds
    from pq_lightning.smooth import find_mappings, fold_gains, fold_smoothing, output_errors

    model = make_tiny_llama().eval()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 64.0
    w = _windows(8, 32)
    stats = find_mappings(model, w, keep_tokens=100)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fmt = get_format("nvfp4")
    cfg = SmoothConfig(attention=True)
    gains = fold_gains(model, stats, cfg, fmt, w[:1])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    folds = fold_smoothing(model, stats, cfg, w[:1], formats={c: fmt for m in stats.mappings for c in m.consumers})
    unfold_smoothing(model, folds)
    mods = dict(model.named_modules())
    want = {}
    for m in folds.mappings:
        x = stats.samples[m.consumers[0]]
        for c in m.consumers:
            W = mods[c].weight
            want[c] = output_errors(x, [W], [fmt], folds.scales[m.producer])[0] / output_errors(x, [W], [fmt], None)[0]
    assert gains == pytest.approx(want, rel=1e-6) and len(gains) >= 3
    assert gains["model.layers.0.self_attn.q_proj"] < 0.5
    # the allocator's price: the probe's Δloss times the ratio, recorded beside it
    costs = {c: LinearCost(c, (1, 1), dloss={"nvfp4": 2.0, "fp8": 1.0}) for c in gains}
    assert price_folds(costs, "nvfp4", {**gains, "not.in.the.body": 0.5}) == len(gains)
    assert all(costs[c].dloss == {"nvfp4": 2.0 * g, "fp8": 1.0} and costs[c].fold_ratio == {"nvfp4": g}
               for c, g in gains.items())
    with pytest.raises(ValueError, match="non-negative"):
        price_folds(costs, "nvfp4", {next(iter(gains)): float("nan")})


def test_attention_folds_are_opt_in(make_tiny_llama):
    model = make_tiny_llama().eval()
    res = smooth_model(model, _windows(), SmoothConfig(alpha=0.5))
    assert res.mappings and all(m.kind != "head_rows" for m in res.mappings)
