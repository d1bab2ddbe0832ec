"""Pure maths of the Fisher probe (pq_lightning.fisher) and the sensitivity file (pq_lightning.sensitivity)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from pq_lightning.fisher import (
    FisherAccumulator,
    check_error_tokens,
    fake_quant_activation_per_sequence,
    flat_positions,
    quantized_output_error,
    token_subset,
    tokens_per_sequence,
)
from pq_lightning.formats import get_format
from pq_lightning.sensitivity import LinearSensitivity, Sensitivity, load_sensitivity, save_sensitivity


def _loop_reference(x: torch.Tensor, g: torch.Tensor, scale: float = 1.0):
    """h_trace, diag_out, diag_in sums by explicit per-token outer products in float64."""
    out_f, in_f = g.shape[-1], x.shape[-1]
    h = torch.zeros((), dtype=torch.float64)
    d_out = torch.zeros(out_f, dtype=torch.float64)
    d_in = torch.zeros(in_f, dtype=torch.float64)
    for xt, gt in zip(x.reshape(-1, in_f).double(), g.reshape(-1, out_f).double(), strict=True):
        grad = torch.outer(gt * scale, xt)
        h += grad.pow(2).sum()
        d_out += grad.pow(2).sum(1)
        d_in += grad.pow(2).sum(0)
    return h, d_out, d_in


def _rel(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_accumulator_matches_per_token_outer_products():
    torch.manual_seed(0)
    out_f, in_f = 24, 32
    acc = FisherAccumulator({"lin": (out_f, in_f)}, formats=["nvfp4", "fp8"])
    batches = [(torch.randn(2, 5, in_f), torch.randn(2, 5, out_f)) for _ in range(3)]
    scale = 7.0
    for x, g in batches:
        acc.update("lin", x, g, grad_scale=scale)
        assert acc.commit(n_tokens=10)
    sens = acc.finalize()
    lin = sens["lin"]
    h = torch.zeros((), dtype=torch.float64)
    d_out = torch.zeros(out_f, dtype=torch.float64)
    d_in = torch.zeros(in_f, dtype=torch.float64)
    for x, g in batches:
        hh, do, di = _loop_reference(x, g, scale)
        h, d_out, d_in = h + hh, d_out + do, d_in + di
    assert sens.n_tokens == 30
    assert _rel(lin.h_trace, h / 30) < 1e-6
    assert _rel(lin.diag_out, d_out / 30) < 1e-6
    assert _rel(lin.diag_in, d_in / 30) < 1e-6
    # both diagonals sum to the trace
    assert abs(float(lin.diag_out.sum()) - lin.h_trace) / lin.h_trace < 1e-6  # fp32 per step
    assert abs(float(lin.diag_in.sum()) - lin.h_trace) / lin.h_trace < 1e-6  # fp32 per step
    assert lin.output_error == {"nvfp4": 0.0, "fp8": 0.0}  # no errors given


def test_output_error_matches_float64_loop():
    torch.manual_seed(1)
    out_f, in_f = 16, 48
    w = torch.randn(out_f, in_f)
    x = torch.randn(3, 7, in_f) * torch.linspace(0.1, 4.0, in_f)
    g = torch.randn(3, 7, out_f)
    acc = FisherAccumulator({"lin": (out_f, in_f)}, formats=["nvfp4", "fp8"])
    errs = {}
    for name in ("nvfp4", "fp8"):
        fmt = get_format(name)
        errs[name] = quantized_output_error(x, w, fmt.fake_quant(w), fmt)
    acc.update("lin", x, g, errs)
    acc.commit(21)
    got = acc.finalize()["lin"].output_error
    for name in ("nvfp4", "fp8"):
        fmt = get_format(name)
        qw = fmt.fake_quant(w).double()
        total = 0.0
        for b in range(3):
            xq = fmt.fake_quant_activation(x[b])  # one sequence: its own activation global scale
            for t in range(7):
                err = w.double() @ x[b, t].double() - qw @ xq[t].double()
                total += 0.5 * float((g[b, t].double() ** 2 * err**2).sum())
        assert _rel(got[name], total / 21) < 1e-5, name
        assert got[name] > 0
    # W4A4 error exceeds the W8A8 one on these inputs
    assert got["nvfp4"] > got["fp8"]


def test_output_error_uses_given_y():
    torch.manual_seed(2)
    w = torch.randn(8, 16)
    x = torch.randn(5, 16)
    fmt = get_format("fp8")
    qw = fmt.fake_quant(w)
    a = quantized_output_error(x, w, qw, fmt)
    b = quantized_output_error(x, w, qw, fmt, y=x @ w.t())
    ref = x.double() @ w.double().t() - fmt.fake_quant_activation(x).double() @ qw.double().t()
    assert _rel(a, ref) < 1e-5 and _rel(b, ref) < 1e-5


def test_unsupported_format_is_skipped_per_linear():
    acc = FisherAccumulator({"a": (8, 32), "b": (8, 24)}, formats=["nvfp4", "fp8"])
    assert acc.linear_formats == {"a": ("nvfp4", "fp8"), "b": ("fp8",)}
    with pytest.raises(ValueError, match="not in its menu"):
        acc.update("b", torch.randn(2, 24), torch.randn(2, 8), {"nvfp4": torch.zeros(2, 8)})


def test_non_finite_batch_is_dropped_whole():
    torch.manual_seed(3)
    acc = FisherAccumulator({"a": (4, 16), "b": (4, 16)})
    x, g = torch.randn(3, 16), torch.randn(3, 4)
    acc.update("a", x, g)
    acc.update("b", x, g)
    assert acc.commit(3)
    acc.update("a", x, g)
    acc.update("b", x, torch.full_like(g, float("inf")))
    assert not acc.commit(3)
    sens = acc.finalize()
    h, _, _ = _loop_reference(x, g)
    assert sens.n_tokens == 3 and acc.n_dropped_batches == 1
    assert _rel(sens["a"].h_trace, h / 3) < 1e-6
    assert _rel(sens["b"].h_trace, h / 3) < 1e-6


def test_state_dict_and_merge_equal_single_accumulation():
    torch.manual_seed(4)
    shapes = {"a": (8, 16), "b": (16, 32)}
    batches = [
        {n: (torch.randn(4, s[1]), torch.randn(4, s[0]), torch.randn(4, s[0])) for n, s in shapes.items()}
        for _ in range(4)
    ]

    def run(acc, items):
        for batch in items:
            for n, (x, g, e) in batch.items():
                acc.update(n, x, g, {"fp8": e})
            acc.commit(4)
        return acc

    whole = run(FisherAccumulator(shapes, ["fp8"]), batches)
    first = run(FisherAccumulator(shapes, ["fp8"]), batches[:2])
    resumed = FisherAccumulator(shapes, ["fp8"])
    resumed.load_state_dict(first.state_dict())
    run(resumed, batches[2:])
    merged = run(FisherAccumulator(shapes, ["fp8"]), batches[:2]).merge(
        run(FisherAccumulator(shapes, ["fp8"]), batches[2:])
    )
    ref = whole.finalize()
    for other in (resumed.finalize(), merged.finalize()):
        assert other.n_tokens == ref.n_tokens == 16
        for n in shapes:
            assert _rel(other[n].h_trace, ref[n].h_trace) < 1e-12
            assert _rel(other[n].diag_out, ref[n].diag_out) < 1e-12
            assert _rel(other[n].diag_in, ref[n].diag_in) < 1e-12
            assert _rel(other[n].output_error["fp8"], ref[n].output_error["fp8"]) < 1e-12
    with pytest.raises(ValueError, match="other Linears"):
        FisherAccumulator({"a": (8, 16)}, ["fp8"]).load_state_dict(first.state_dict())


def test_finalize_without_tokens_says_what_to_do():
    with pytest.raises(ValueError, match="no loss tokens"):
        FisherAccumulator({"a": (4, 16)}).finalize()


def _gloo_worker(rank: int, world: int, port: int, batches, out_path: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        acc = FisherAccumulator({"a": (8, 16)}, ["fp8"])
        for x, g, e in batches[rank::world]:
            acc.update("a", x, g, {"fp8": e})
            acc.commit(x.shape[0])
        reduced = acc.all_reduce()
        if rank == 0:
            torch.save(reduced.state_dict(), out_path)
        # this rank's own sums are left untouched
        assert acc.n_tokens == sum(x.shape[0] for x, _, _ in batches[rank::world])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_over_gloo_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(5)
    batches = [(torch.randn(3 + i, 16), torch.randn(3 + i, 8), torch.randn(3 + i, 8)) for i in range(4)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "reduced.pt"
    mp.spawn(_gloo_worker, args=(2, port, batches, str(out)), nprocs=2, join=True)
    reduced = FisherAccumulator({"a": (8, 16)}, ["fp8"])
    reduced.load_state_dict(torch.load(out))
    single = FisherAccumulator({"a": (8, 16)}, ["fp8"])
    for x, g, e in batches:
        single.update("a", x, g, {"fp8": e})
        single.commit(x.shape[0])
    a, b = reduced.finalize()["a"], single.finalize()["a"]
    assert reduced.n_tokens == single.n_tokens == 3 + 4 + 5 + 6
    assert _rel(a.h_trace, b.h_trace) < 1e-6
    assert _rel(a.diag_out, b.diag_out) < 1e-6
    assert _rel(a.diag_in, b.diag_in) < 1e-6
    assert _rel(a.output_error["fp8"], b.output_error["fp8"]) < 1e-6


def _toy_sensitivity(fingerprint: str) -> Sensitivity:
    torch.manual_seed(6)
    lin = LinearSensitivity(
        name="model.layers.0.mlp.down_proj",
        shape=(8, 32),
        h_trace=3.5,
        diag_out=torch.rand(8, dtype=torch.float64),
        diag_in=torch.rand(32, dtype=torch.float64),
        output_error={"nvfp4": 0.25, "fp8": 0.0125},
    )
    return Sensitivity(linears={lin.name: lin}, meta={"model_fingerprint": fingerprint, "n_tokens": 100})


def test_sensitivity_file_round_trip(tmp_path):
    sens = _toy_sensitivity("abc123")
    path = save_sensitivity(sens, tmp_path / "sub" / "sens.safetensors")
    assert sorted(os.listdir(path.parent)) == ["sens.safetensors"]  # no temporary left behind
    back = load_sensitivity(path, model_fingerprint="abc123")
    lin, orig = back["model.layers.0.mlp.down_proj"], sens["model.layers.0.mlp.down_proj"]
    assert lin.shape == (8, 32) and lin.weight_numel == 256
    assert lin.h_trace == 3.5
    assert torch.equal(lin.diag_out, orig.diag_out) and torch.equal(lin.diag_in, orig.diag_in)
    assert lin.output_error == {"nvfp4": 0.25, "fp8": 0.0125}
    assert back.n_tokens == 100 and back.meta["model_fingerprint"] == "abc123"
    # the rank-one diagonal approximation sums to the trace
    assert abs(float(lin.diag().sum()) - float(orig.diag_out.sum() * orig.diag_in.sum() / 3.5)) < 1e-9


def test_sensitivity_file_from_another_model_is_refused(tmp_path):
    path = save_sensitivity(_toy_sensitivity("abc123"), tmp_path / "sens.safetensors")
    with pytest.raises(ValueError, match="measured on another model.*re-run the probe"):
        load_sensitivity(path, model_fingerprint="ffff0000")
    with pytest.raises(FileNotFoundError, match="run the Fisher probe"):
        load_sensitivity(tmp_path / "missing.safetensors")


# ---- subsampled output-space error ---------------------------------------------------------------


def test_activation_fake_quant_at_positions_equals_rows_of_full():
    torch.manual_seed(7)
    # sequences with very different amax: NVFP4's per-sequence global scale matters
    x = torch.randn(3, 20, 32) * torch.tensor([0.1, 1.0, 30.0]).view(3, 1, 1)
    positions = torch.stack([token_subset(20, 6, seed) for seed in range(3)])
    for name in ("nvfp4", "fp8", "nvfp4a16"):
        fmt = get_format(name)
        full = fake_quant_activation_per_sequence(x, fmt)
        ref = torch.stack([fmt.fake_quant_activation(seq) for seq in x])  # one call per sequence
        assert torch.equal(full, ref), name
        rows = fake_quant_activation_per_sequence(x, fmt, positions)
        assert torch.equal(rows, torch.stack([full[b, positions[b]] for b in range(3)])), name


def test_token_subset_is_seeded_uniform_and_without_replacement():
    a = token_subset(50, 12, seed=123)
    assert torch.equal(a, token_subset(50, 12, seed=123))
    assert not torch.equal(a, token_subset(50, 12, seed=124))
    assert a.shape == (12,) and len(set(a.tolist())) == 12 and torch.equal(a, a.sort().values)
    assert 0 <= int(a.min()) and int(a.max()) < 50
    assert torch.equal(token_subset(7, 7, seed=5), torch.arange(7))
    # every position is drawn with probability k / S
    n = 4000
    counts = torch.zeros(50)
    for seed in range(n):
        counts[token_subset(50, 12, seed)] += 1
    p = 12 / 50
    sigma = (n * p * (1 - p)) ** 0.5
    assert float((counts - n * p).abs().max()) < 5 * sigma


def test_tokens_per_sequence_and_bad_specs():
    assert tokens_per_sequence(None, 256) == 256
    assert tokens_per_sequence(0.25, 256) == 64
    assert tokens_per_sequence(0.25, 10) == 3  # ceil
    assert tokens_per_sequence(1e-6, 10) == 1
    assert tokens_per_sequence(1.0, 10) == 10
    assert tokens_per_sequence(64, 256) == 64 and tokens_per_sequence(64, 10) == 10
    for bad in (0, -3, 0.0, 1.5, True, "all"):
        with pytest.raises(ValueError, match="output_error_tokens"):
            check_error_tokens(bad)


def _subsampled_error(x, g, w, fmt, positions, scale):
    acc = FisherAccumulator({"lin": tuple(w.shape)}, formats=[fmt.name])
    err = quantized_output_error(x, w, fmt.fake_quant(w), fmt, positions=positions)
    rows = flat_positions(positions, x.shape[1])
    acc.update("lin", x, g, {fmt.name: err}, error_rows=rows, error_scale=scale)
    acc.commit(x.shape[0] * x.shape[1])
    return acc.finalize()["lin"].output_error[fmt.name]


def test_subsampled_output_error_matches_loop_and_is_unbiased():
    torch.manual_seed(8)
    out_f, in_f, n_seq, seq_len, k = 8, 32, 2, 16, 4
    w = torch.randn(out_f, in_f)
    x = torch.randn(n_seq, seq_len, in_f) * torch.linspace(0.1, 3.0, in_f)
    g = torch.randn(n_seq, seq_len, out_f)
    for name in ("nvfp4", "fp8"):
        fmt = get_format(name)
        qw = fmt.fake_quant(w).double()
        per_token = torch.zeros(n_seq, seq_len, dtype=torch.float64)  # ½ Σ_o g² (y − ŷ)² per token
        for b in range(n_seq):
            xq = fmt.fake_quant_activation(x[b])
            for t in range(seq_len):
                err = w.double() @ x[b, t].double() - qw @ xq[t].double()
                per_token[b, t] = 0.5 * (g[b, t].double() ** 2 * err**2).sum()
        full = float(per_token.sum()) / (n_seq * seq_len)
        # k == S: the full computation
        everything = torch.arange(seq_len).repeat(n_seq, 1)
        assert abs(_subsampled_error(x, g, w, fmt, everything, 1.0) - full) / full < 1e-5
        estimates = []
        for seed in range(300):
            pos = torch.stack([token_subset(seq_len, k, 1000 * seed + b) for b in range(n_seq)])
            est = _subsampled_error(x, g, w, fmt, pos, seq_len / k)
            loop = float(sum(per_token[b, pos[b]].sum() for b in range(n_seq))) * (seq_len / k)
            assert abs(est - loop / (n_seq * seq_len)) / full < 1e-5, name
            estimates.append(est)
        est = torch.tensor(estimates, dtype=torch.float64)
        # unbiased: the mean over draws is the full value within a few standard errors
        stderr = float(est.std()) / len(estimates) ** 0.5
        assert abs(float(est.mean()) - full) < 4 * stderr, name
        assert float(est.std()) > 0
