"""Triton kernels of the probe's output-space error and GPTQ's block update against the torch paths.

The kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` is read when a kernel
module is imported, so they run in a subprocess, as in ``tests/test_formats.py``). The subprocess
draws the inputs, runs the Triton side and saves inputs and results; this process computes the
torch reference (the default path on the CPU) and compares.

Tolerances:

* exact (``torch.equal``) for integer-valued inputs: every product and partial sum is an integer
  below ``2**24``, so fp32 arithmetic is exact in any order and the two paths must agree bit for bit;
* the probe sum (``Σ g² e²``): the terms are the same fp32 products in both paths, only the order of
  the fp32 sum differs. Every term is ``>= 0`` (no cancellation), so each path's relative error is
  at most (longest chain of additions) × 2⁻²⁴ (plus a little): the kernel adds at most 8 tiles
  element-wise and then reduces a 32 × 128 tile (a tree of ~12 levels; the partials are added in
  float64), ~20 · 2⁻²⁴ ≈ 1.2e-6 in the worst case and far less in practice; torch's ``dot``
  accumulates in a few SIMD lanes. Hence ``rtol = 1e-6`` between the paths and against the float64
  sum (the observed differences are ~1e-7);
* the block update (``C − Aᵀ B``) can cancel, so a relative tolerance per element means nothing; the
  standard bound for an fp32 dot product of length ``K`` in any order, plus the final subtraction,
  is ``|err| <= γ_{K+1} · (|C| + |A|ᵀ|B|)`` with ``γ_n = n·u / (1 − n·u)``, ``u = 2⁻²⁴``. Each path is
  checked against float64 with it, and the two paths against each other with twice it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pq_lightning import fisher, gptq
from pq_lightning.fisher import FisherAccumulator, output_error_sum
from pq_lightning.kernels import triton_kernels_enabled

U32 = 2.0**-24

_CHILD = r"""
import sys
import torch
from pq_lightning.fisher import FisherAccumulator, output_error_sum
from pq_lightning.gptq import gptq_fp8, gptq_nvfp4
from pq_lightning.kernels import triton_kernels_enabled
from pq_lightning.kernels.gptq_triton import sub_at_b_triton_
from pq_lightning.kernels.probe_triton import weighted_square_sum_triton

torch.manual_seed(0)
out = {"enabled": triton_kernels_enabled(torch.zeros(1))}

# ---- probe: Σ w[rows] e² -------------------------------------------------------------------------
probe = []
for T, O, R in [(7, 5, None), (37, 130, None), (45, 33, 20), (9, 16, 0)]:
    g = torch.randn(T, O)
    e = torch.randn(T if R is None else R, O) * 0.1
    rows = None if R is None else torch.randint(0, T, (R,))
    res = weighted_square_sum_triton(g.square(), e, rows)
    res_sq = weighted_square_sum_triton(g, e, rows, square_weight=True)  # g² formed in the kernel
    res_disp = output_error_sum(g.square(), e, rows)  # the dispatcher, here to Triton
    # small tiles: a 2-D grid of row blocks x column spans, ragged at both ends
    res_grid = weighted_square_sum_triton(g.square(), e, rows, block_r=4, block_o=16, tiles_per_program=2)
    probe.append(dict(g=g, e=e, rows=rows, res=res, res_sq=res_sq, res_disp=res_disp, res_grid=res_grid))
gi = torch.randint(-3, 4, (50, 140)).float()  # integer-valued: exact in any order
ei = torch.randint(-3, 4, (50, 140)).float()
out["probe_int"] = dict(g=gi, e=ei, res=weighted_square_sum_triton(gi.square(), ei))
strided = torch.randn(12, 40)
out["probe_strided"] = dict(
    g=strided, e=strided[:, ::2], res=weighted_square_sum_triton(strided[:, 1::2].square(), strided[:, ::2])
)
out["probe"] = probe

# the accumulator end to end (error on a subset of rows)
x, gg = torch.randn(2, 11, 32), torch.randn(2, 11, 40)
rows = torch.tensor([0, 3, 4, 10, 11, 12, 20])
errs = {"fp8": torch.randn(7, 40), "nvfp4": torch.randn(7, 40) * 3}
acc = FisherAccumulator({"lin": (40, 32)}, formats=["nvfp4", "fp8"])
acc.update("lin", x, gg, errs, grad_scale=3.0, error_rows=rows, error_scale=11 / 7)
acc.commit(22)
out["acc"] = dict(x=x, g=gg, rows=rows, errs=errs, state=acc.state_dict())

# ---- GPTQ block update: C -= Aᵀ B ----------------------------------------------------------------
upd = []
for M, N, K in [(1, 1, 1), (5, 7, 3), (70, 33, 17), (64, 64, 16)]:
    big = torch.randn(K + 3, M + 5)
    a = big[2 : 2 + K, 4 : 4 + M]  # a strided slice, as U[i1:i2, i2:] is
    b, c = torch.randn(K, N), torch.randn(M, N)
    upd.append(dict(a=a.clone(), b=b, c=c.clone(), res=sub_at_b_triton_(c, a, b)))
ai, bi, ci = (torch.randint(-4, 5, s).float() for s in [(40, 70), (40, 33), (70, 33)])
out["update_int"] = dict(a=ai, b=bi, c=ci.clone(), res=sub_at_b_triton_(ci, ai, bi))
out["update"] = upd

# GPTQ end to end (in 48: three 16-column blocks, two block updates)
W = torch.randn(8, 48)
Z = torch.randn(256, 48) @ (torch.randn(48, 48) / 7)
H = Z.T @ Z
gs = torch.tensor([448 * 6 / float(W.abs().max())])
q, w_hat = gptq_nvfp4(W, H, global_scale=gs, block_size=16, return_w_hat=True)
f8 = gptq_fp8(W, H, block_size=5)
out["gptq"] = dict(W=W, H=H, gs=gs, codes=q.codes, scale=q.scale, w_hat=w_hat, fp8=f8["weight"])
torch.save(out, sys.argv[1])
print("KERNELS_OK")
"""


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory):
    """Run the Triton side in the interpreter once; its inputs and results."""
    path = tmp_path_factory.mktemp("kernels") / "triton.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PQ_TRITON="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "KERNELS_OK" in r.stdout, r.stderr[-3000:]
    return torch.load(path)


@pytest.fixture
def cpu_default(monkeypatch):
    """The plain CPU setting: neither PQ_TRITON nor TRITON_INTERPRET set."""
    monkeypatch.delenv("PQ_TRITON", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _torch_probe(w2: torch.Tensor, e: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The torch path of the probe sum, as FisherAccumulator.update computes it on the CPU."""
    g = w2 if rows is None else w2.index_select(0, rows)
    return torch.dot(g.reshape(-1), e.square().reshape(-1))


def _f64_probe(w2: torch.Tensor, e: torch.Tensor, rows: torch.Tensor | None) -> float:
    """The same fp32 terms ``w2 · (e · e)``, summed in float64 (the exact sum, to ~1e-16)."""
    g = w2 if rows is None else w2.index_select(0, rows)
    return float((g * (e * e)).double().sum())


def _rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / abs(b) if b else abs(a)


# ---- probe ---------------------------------------------------------------------------------------
def test_probe_kernel_matches_torch(triton_run, cpu_default):
    assert triton_run["enabled"] is True  # PQ_TRITON=1 + TRITON_INTERPRET=1 turned the kernels on
    for case in triton_run["probe"]:
        g, e, rows = case["g"], case["e"], case["rows"]
        ref, exact = _torch_probe(g.square(), e, rows), _f64_probe(g.square(), e, rows)
        assert ref.dtype == torch.float32 and case["res"].dtype == torch.float64
        if e.shape[0] == 0:
            assert float(case["res"]) == 0.0 == float(ref)
            continue
        for key in ("res", "res_sq", "res_disp", "res_grid"):
            assert _rel(case[key], ref) <= 1e-6, (key, tuple(g.shape), tuple(e.shape))
            assert _rel(case[key], exact) <= 1e-6, (key, tuple(g.shape))
        assert _rel(ref, exact) <= 1e-6
        # g² formed in the kernel is the same fp32 product as g.square(): the same bits
        assert torch.equal(case["res_sq"], case["res"])


def test_probe_kernel_exact_on_integer_values(triton_run):
    d = triton_run["probe_int"]
    ref = _torch_probe(d["g"].square(), d["e"], None)
    assert float(ref) < 2**24 and float(ref) == _f64_probe(d["g"].square(), d["e"], None)
    assert float(d["res"]) == float(ref)


def test_probe_kernel_reads_strided_views(triton_run):
    d = triton_run["probe_strided"]
    s = d["g"]
    ref = _torch_probe(s[:, 1::2].square(), s[:, ::2], None)
    assert _rel(d["res"], ref) <= 1e-6


def test_accumulator_under_triton_matches_torch(triton_run, cpu_default):
    d = triton_run["acc"]
    acc = FisherAccumulator({"lin": (40, 32)}, formats=["nvfp4", "fp8"])
    acc.update("lin", d["x"], d["g"], d["errs"], grad_scale=3.0, error_rows=d["rows"], error_scale=11 / 7)
    acc.commit(22)
    ref, got = acc.state_dict()["linears"]["lin"], d["state"]["linears"]["lin"]
    # trace and diagonals do not go through a kernel: same code, same bits
    for k in ("h_trace", "diag_out", "diag_in"):
        assert torch.equal(got[k], ref[k]), k
    for f in ("nvfp4", "fp8"):
        assert float(ref["output_error"][f]) > 0
        assert _rel(got["output_error"][f], ref["output_error"][f]) <= 1e-6, f


# ---- GPTQ block update ---------------------------------------------------------------------------
def _update_bound(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    k = a.shape[0] + 1
    gamma = k * U32 / (1 - k * U32)
    return gamma * (c.double().abs() + a.double().abs().T @ b.double().abs())


def test_block_update_kernel_matches_torch(triton_run, cpu_default):
    for case in triton_run["update"]:
        a, b, c = case["a"], case["b"], case["c"]
        ref = c.clone().addmm_(a.T, b, alpha=-1.0)  # the torch path of gptq._gptq_loop
        exact = c.double() - a.double().T @ b.double()
        bound = _update_bound(a, b, c)
        got = case["res"]
        assert got.dtype == torch.float32 and got.shape == c.shape
        assert bool(((got.double() - exact).abs() <= bound).all()), tuple(a.shape)
        assert bool(((ref.double() - exact).abs() <= bound).all())
        assert bool(((got.double() - ref.double()).abs() <= 2 * bound).all())


def test_block_update_kernel_exact_on_integer_values(triton_run):
    d = triton_run["update_int"]
    ref = d["c"].clone().addmm_(d["a"].T, d["b"], alpha=-1.0)
    assert torch.equal(ref.double(), d["c"].double() - d["a"].double().T @ d["b"].double())
    assert torch.equal(d["res"], ref)


def test_gptq_under_triton_matches_torch(triton_run, cpu_default):
    """The whole GPTQ loop: the update differs from BLAS by fp32 rounding at most, which moves no
    code on these inputs (the rounding decisions are far from ties at that scale)."""
    d = triton_run["gptq"]
    q, w_hat = gptq.gptq_nvfp4(d["W"], d["H"], global_scale=d["gs"], block_size=16, return_w_hat=True)
    assert torch.equal(d["codes"], q.codes)
    assert torch.equal(d["scale"].view(torch.uint8), q.scale.view(torch.uint8))
    assert torch.equal(d["w_hat"], w_hat)
    f8 = gptq.gptq_fp8(d["W"], d["H"], block_size=5)
    assert torch.equal(d["fp8"].view(torch.uint8), f8["weight"].view(torch.uint8))


# ---- dispatch ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env", [{}, {"PQ_TRITON": "1"}, {"TRITON_INTERPRET": "1"}, {"PQ_TRITON": "0", "TRITON_INTERPRET": "1"}]
)
def test_cpu_dispatch_is_torch(monkeypatch, cpu_default, env):
    """On the CPU the torch paths run unless both PQ_TRITON=1 and TRITON_INTERPRET=1 are set."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = torch.zeros(2, 2)
    assert not triton_kernels_enabled(t)
    assert not fisher.triton_kernels_enabled(t) and not gptq.triton_kernels_enabled(t)

    def boom(*args, **kwargs):
        raise AssertionError("a Triton kernel was called on the CPU")

    import pq_lightning.kernels.gptq_triton as gk
    import pq_lightning.kernels.probe_triton as pk

    monkeypatch.setattr(pk, "weighted_square_sum_triton", boom)
    monkeypatch.setattr(gk, "sub_at_b_triton_", boom)
    torch.manual_seed(3)
    g2, e, rows = torch.rand(6, 10), torch.randn(4, 10), torch.tensor([5, 0, 2, 2])
    got = output_error_sum(g2, e, rows)
    assert got.dtype == torch.float32 and torch.equal(got, _torch_probe(g2, e, rows))
    a, b, c = torch.randn(3, 5), torch.randn(3, 4), torch.randn(5, 4)
    ref = c.clone().addmm_(a.T, b, alpha=-1.0)
    gptq._block_update_(c, a, b, gptq.triton_kernels_enabled(c))
    assert torch.equal(c, ref)
    W = torch.randn(4, 32)
    gptq.gptq_nvfp4(W, torch.eye(32), global_scale=torch.tensor([100.0]), block_size=16)


def test_kernel_wrappers_reject_bad_shapes():
    pytest.importorskip("triton")
    from pq_lightning.kernels.gptq_triton import sub_at_b_triton_
    from pq_lightning.kernels.probe_triton import weighted_square_sum_triton

    with pytest.raises(ValueError, match="share out"):
        weighted_square_sum_triton(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="pass rows="):
        weighted_square_sum_triton(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one index per error row"):
        weighted_square_sum_triton(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="do not chain"):
        sub_at_b_triton_(torch.zeros(3, 4), torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="fp32"):
        sub_at_b_triton_(torch.zeros(3, 4), torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.float64))


# ---- what compiled Triton accepts ----------------------------------------------------------------
def _global_reads(fn) -> set[str]:
    """Names a function reads that it does not bind itself (arguments, assignments, loop targets)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    func = tree.body[0]
    args = func.args
    bound = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    bound |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for stmt in func.body for n in ast.walk(stmt)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


@pytest.mark.parametrize("module", ["nvfp4_triton", "probe_triton", "gptq_triton"])
def test_jitted_functions_read_only_what_compiled_triton_allows(module):
    """The interpreter (the CPU tests) lets a kernel read any module global; compiled Triton only
    constexpr globals, other jitted functions and modules (a plain float global failed to compile on
    an H200). Checks every jitted function's free names against that rule."""
    import builtins
    import importlib
    import types

    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(f"pq_lightning.kernels.{module}")
    jitted = [v for v in vars(mod).values() if isinstance(v, JITFunction)]
    assert jitted, f"no jitted function found in {module}"
    for jf in jitted:
        for name in sorted(_global_reads(jf.fn)):
            value = jf.fn.__globals__.get(name, getattr(builtins, name, None))
            allowed = (isinstance(value, (JITFunction, types.ModuleType, tl.constexpr))
                       or name in ("range", "min", "max", "float", "int", "print", "len", "isinstance"))
            assert allowed, (f"{module}.{jf.fn.__name__} reads the global {name}={value!r}, which compiled "
                             f"Triton refuses: make it {name} = tl.constexpr(...)")
