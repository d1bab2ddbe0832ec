"""GPTQ refinement of quantized Linears: act-aware rounding, a per-group scale sweep and an RTN gate.

Pure maths (no Lightning). Every function takes a Linear weight ``W [out, in]`` and the second
moment of its inputs ``H = Σ_t x_tᵀ x_t [in, in]`` (see :func:`accumulate_hessian`); the output
error of a quantized weight ``Ŵ`` over those inputs is ``Σ_t ‖(Ŵ − W) x_t‖² = tr(ΔW H ΔWᵀ)``
(:func:`output_error`). Pass ``H / n_tokens`` where per-token numbers are wanted: GPTQ itself is
invariant to the scale of ``H`` (damping is relative to ``mean(diag(H))``).

NVFP4 (:func:`gptq_nvfp4`)
    The global scale is fixed first (passed in: fused siblings share one). Columns are rounded
    left to right; the rounding error of each column is spread over the not-yet-rounded columns
    through the upper Cholesky factor ``U`` of the damped inverse Hessian
    (``(H + λI)⁻¹ = UᵀU``, ``λ = damp · mean(diag(H))``), with lazy block updates. The FP8 group
    scale of each 16-column group is chosen when the loop enters the group, from the group's
    *current* (error-updated) weights, exactly as :func:`~pq_lightning.formats.nvfp4.fp8_group_scales`
    rounds it, unless scales are given (e.g. from :func:`scale_sweep_nvfp4`). Codes and
    dequantised values are computed with the same fp32 operations as
    :meth:`NVFP4.quantize <pq_lightning.formats.nvfp4.NVFP4.quantize>` and
    :meth:`NVFP4Weight.dequantize`, so the packed checkpoint decodes to exactly the weight GPTQ
    used for its error feedback.

Dead inputs (``H_ii == 0``: the input channel was always zero in calibration)
    Their Hessian row and column are zero, so ``H_ii`` is set to 1 and the damped inverse keeps
    them decoupled (their off-diagonal entries of ``U`` are forced to exactly zero). Such a column
    therefore neither receives nor gives error feedback: it keeps its original weights and is
    rounded under its group's scale, like RTN. Zeroing it (what some implementations do) would
    change the stored weight for inputs the calibration simply never saw.

Activation order (``act_order=True``)
    NVFP4 permutes whole 16-column *groups* by descending Hessian mass ``Σ_{i∈g} H_ii`` (ties
    keep the original order), never single columns, so every group scale still covers 16
    contiguous original columns and the result is servable as is; codes and scales are permuted
    back before returning. FP8 (one scale per output row) permutes single columns by ``H_ii``.

Scale sweep (:func:`scale_sweep_nvfp4`)
    For each row and 16-column group, candidate FP8 scales ``fp8(m · gs · amax_g / 6)`` for
    ``m`` in a grid (``m = 1`` is RTN's scale, bit for bit); codes are re-rounded per candidate
    and the candidate with the least *diagonal-block* output error is kept::

        e(r, g) = Δw_{r,g}ᵀ H_gg Δw_{r,g}      (H_gg: the 16×16 diagonal block of H for group g)

    which is the exact output error when ``H`` is block diagonal over groups and ignores the
    cross-group terms otherwise (:func:`group_output_error`). Ties keep RTN's scale, so the sweep
    is never worse than RTN under this criterion, group by group.

Gate (:func:`refine_nvfp4`, :func:`refine_fp8`)
    Candidates are fitted on one Hessian and judged on a held-out one; the best candidate is
    kept only when its held-out output error is strictly below RTN's, else the RTN weight is
    returned bit for bit. With a refit Hessian (``H_refit``: fit and held-out tokens pooled) and
    :attr:`GPTQConfig.refit`, the winning recipe (method, damping) is then solved again on it: the
    held-out tokens choose, every calibration token fits (on SmolLM2-135M at 4.5 bpp, 8 × 128
    calibration tokens, a quarter held out: −3 % KL on confident positions).

Numerics: weights and the column loop in fp32, the inverse Hessian in fp64, output errors in
fp64 (:func:`output_errors` scores every candidate under the fit and held-out Hessians in one pass,
from the upper block triangle of each ``H``: about half the products of ``(ΔW @ H) ⊙ ΔW``). The
column loop and the sweep round with a table lookup that is bit for bit
:func:`~pq_lightning.formats.e2m1.e2m1_codes` (fewer tensor ops per column). Device-agnostic
(everything runs on ``W``'s device); on CUDA the lazy block update is a Triton kernel
(:mod:`pq_lightning.kernels.gptq_triton`, off with ``PQ_TRITON=0``). NaN or Inf in ``W`` or ``H``
raises :class:`~pq_lightning.formats.NonFiniteTensorError`. Hessians are not checked per batch in
:func:`accumulate_hessian` (that would synchronise the device); a non-finite input shows up as a
non-finite ``H`` and is reported when ``H`` is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .formats.base import check_finite
from .formats.e2m1 import E2M1Table, e2m1_codes, e2m1_decode, e2m1_round
from .formats.fp8 import fp8_round, weight_scale_from_amax
from .formats.nvfp4 import GROUP_SIZE, NVFP4Weight, fp8_group_scales
from .input_error import InputErrors, choose_target, compensated_target, full_output_errors
from .kernels import triton_kernels_enabled

__all__ = [
    "CandidateError",
    "GPTQConfig",
    "RefineResult",
    "accumulate_hessian",
    "gptq_fp8",
    "gptq_nvfp4",
    "group_output_error",
    "inverse_hessian_factor",
    "output_error",
    "output_errors",
    "refine_fp8",
    "refine_nvfp4",
    "scale_sweep_nvfp4",
]

#: fp64 elements of stacked ``ΔW`` rows per chunk when computing output errors (bounds the temporaries).
_ERROR_CHUNK_ELEMS = 1 << 22
#: Column block of the symmetric output-error sum and of the triangular inverse. A multiple of 48:
#: MKL runs power-of-two widths of these strided panels markedly slower.
_PANEL = 192


# ---- Hessian ------------------------------------------------------------------------------------
@torch.no_grad()
def accumulate_hessian(H: torch.Tensor | None, x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Add one batch of Linear inputs to the running input second moment.

    ``x`` is ``[..., in]`` (any float dtype); it is flattened to ``[T, in]`` tokens and
    ``H += x̂ᵀ x̂`` is accumulated in fp32 on ``x``'s device (``H`` is created when ``None``).
    Returns ``(H, n + T)``. ``H`` is a *sum*: reduce it and the token count across ranks with a
    plain sum, and divide by the count where a per-token Hessian is wanted.
    """
    if x.dim() < 1:
        raise ValueError("accumulate_hessian needs inputs shaped [..., in_features], got a scalar")
    xf = x.detach().reshape(-1, x.shape[-1]).float()
    if H is None:
        H = torch.zeros(xf.shape[1], xf.shape[1], dtype=torch.float32, device=xf.device)
    elif H.shape != (xf.shape[1], xf.shape[1]):
        raise ValueError(
            f"Hessian is {tuple(H.shape)} but the inputs have {xf.shape[1]} features; "
            "use one Hessian per Linear input"
        )
    elif H.dtype != torch.float32:
        raise ValueError(f"accumulate into an fp32 Hessian (got {H.dtype}); start from H=None")
    H.addmm_(xf.T, xf)
    return H, n + xf.shape[0]


def _check_inputs(W: torch.Tensor, H: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if W.dim() != 2:
        raise ValueError(f"{what}: weights must be 2-D [out, in], got shape {tuple(W.shape)}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"{what}: Hessian must be [in, in] = [{W.shape[1]}, {W.shape[1]}], got {tuple(H.shape)}"
        )
    check_finite(W, f"{what}: weight")
    check_finite(H, f"{what}: Hessian")
    return W.detach().float(), H.detach().to(W.device)


@torch.no_grad()
def inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` (fp32) of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag(H))``.

    Dead inputs (``H_ii == 0``) get ``H_ii = 1`` and their off-diagonal entries of ``U`` are set
    to exactly zero, so they are decoupled from every other column. Returns ``(U, dead_mask)``.
    The inverse is computed in fp64.
    """
    if not (damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"damping must be a finite number >= 0, got {damp}")
    Hd = H.to(torch.float64, copy=True)
    diag = torch.diagonal(Hd)
    dead = diag == 0
    lam = damp * float(diag.mean()) if diag.numel() else 0.0
    diag[dead] = 1.0
    diag += lam
    # (H + λI)⁻¹ = UᵀU without forming the inverse: with J the order-reversing permutation and
    # J H J = L Lᵀ, H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), so U = J L⁻¹ J (upper, positive diagonal).
    L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
    if int(info) != 0:
        raise ValueError(
            f"the damped Hessian is not positive definite (damping {damp} × mean diag); "
            "use a larger damping or check that the Hessian is a sum of xᵀx"
        )
    U = _lower_inverse(L).float().flip(0, 1)
    if bool(dead.any()):
        keep = torch.diagonal(U).clone()
        U[dead, :] = 0.0
        U[:, dead] = 0.0
        idx = dead.nonzero().squeeze(1)
        U[idx, idx] = keep[idx]
    return U, dead


def _lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``L``, one column panel at a time.

    Column panel ``J`` of ``L⁻¹`` is zero above its diagonal block, so it solves only the trailing
    system ``L[j0:, j0:] X = I[j0:, J]``: about a third of the work of one triangular solve
    against the whole identity (a triangular solve cannot skip the identity's zeros).
    """
    n = L.shape[0]
    Linv = torch.zeros_like(L)
    for j0 in range(0, n, _PANEL):
        j1 = min(j0 + _PANEL, n)
        rhs = torch.zeros(n - j0, j1 - j0, dtype=L.dtype, device=L.device)
        rhs.diagonal().fill_(1.0)
        Linv[j0:, j0:j1] = torch.linalg.solve_triangular(L[j0:, j0:], rhs, upper=False)
    return Linv


# ---- the column loop ----------------------------------------------------------------------------
RoundColumn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], None]


def _gptq_loop(
    WT: torch.Tensor, U: Sequence[torch.Tensor], block_size: int, round_column: RoundColumn
) -> torch.Tensor:
    """GPTQ with lazy block updates on a batch of *transposed* weights; returns ``Ŵᵀ`` ``[B, in, out]``.

    ``WT`` is ``[B, in, out]``: ``B`` candidates solved together (``Wᵀ`` each, modified in place),
    each with its own inverse-Hessian factor ``U[b]`` (``[in, in]``; candidates may share one),
    e.g. several dampings or group scales of one Linear. On a CPU the loop is bound by per-column overhead, so ``B``
    candidates cost little more than one. Each column of ``W`` is a contiguous row of ``WT[b]``;
    the rank-1 update is ``addcmul_`` (bit-identical to ``addr_`` of one candidate) and the block
    update one ``addmm_`` per candidate, so every candidate's result is bit-identical to solving it
    alone. ``round_column(j, w, q, U1, i)`` rounds column ``j`` of every candidate (``w`` ``[B, out]``:
    its current, error-updated values; the next 15 columns of a 16-aligned group follow it in memory)
    and writes the dequantised values into ``q`` ``[B, out]``; ``U1`` ``[B, blk, blk]`` is the current
    block of the factors and ``i`` the column's index in it.
    """
    B, n, _ = WT.shape
    W_hat = torch.empty_like(WT)
    use_triton = triton_kernels_enabled(WT)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = WT[:, i1:i2].clone()
        U1 = torch.stack([u[i1:i2, i1:i2] for u in U])
        E1 = torch.empty_like(W1)
        cols, errs, qs = W1.unbind(1), E1.unbind(1), W_hat[:, i1:i2].unbind(1)
        diag = U1.diagonal(dim1=1, dim2=2).T.unsqueeze(2)  # [rows, B, 1]
        for i in range(i2 - i1):
            q, err = qs[i], errs[i]
            round_column(i1 + i, cols[i], q, U1, i)
            torch.sub(cols[i], q, out=err)
            err.div_(diag[i])
            if i + 1 < i2 - i1:
                W1[:, i + 1 :].addcmul_(U1[:, i, i + 1 :].unsqueeze(2), err.unsqueeze(1), value=-1.0)
        if i2 < n:
            for b in range(B):
                _block_update_(WT[b, i2:], U[b][i1:i2, i2:], E1[b], use_triton)
    return W_hat


def _block_update_(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor, use_triton: bool) -> None:
    """The lazy block update ``C -= Aᵀ B`` in place (fp32): ``C = WT[i2:]``, ``A = U[i1:i2, i2:]``,
    ``B`` the block's scaled errors. The Triton kernel on CUDA (see :mod:`pq_lightning.kernels`),
    else torch's ``addmm_``; the two differ only in the order of the fp32 sum over the block.
    """
    if use_triton:
        from .kernels.gptq_triton import sub_at_b_triton_

        sub_at_b_triton_(C, A, B)
    else:
        C.addmm_(A.T, B, alpha=-1.0)


def _group_order(H: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Group indices by descending Hessian mass (stable: ties keep the original order)."""
    mass = torch.diagonal(H).double().reshape(n_groups, GROUP_SIZE).sum(1)
    return torch.sort(-mass, stable=True).indices


def _check_block_size(block_size: int, multiple: int) -> None:
    if block_size < 1 or block_size % multiple:
        raise ValueError(
            f"block_size must be a positive multiple of {multiple} (so no group straddles a block), "
            f"got {block_size}"
        )


# ---- NVFP4 --------------------------------------------------------------------------------------
@torch.no_grad()
def gptq_nvfp4(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    global_scale: torch.Tensor,
    scale: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    return_w_hat: bool = False,
    search_grid: Sequence[float] | None = None,
) -> NVFP4Weight | tuple[NVFP4Weight, torch.Tensor]:
    """GPTQ-rounded NVFP4 weight of ``W`` under the input second moment ``H``.

    ``global_scale`` is fixed (shape ``[1]``; fused siblings share one). Group scales come from
    the current weights of each group when the loop enters it (their amax, or with
    ``search_grid`` the best of those multipliers of it under the loop's own loss,
    :func:`_searched_scales`), or from ``scale`` (float8_e4m3fn ``[out, in/16]``) when given. ``block_size`` must be a multiple of 16.
    With ``return_w_hat`` also returns the fp32 weight used for the error feedback (which equals
    ``result.dequantize()`` exactly). :func:`gptq_nvfp4_candidates` solves several
    (damping, scale) pairs in one loop, each bit-identical to this function.
    """
    (res,) = gptq_nvfp4_candidates(
        W, H, global_scale=global_scale, candidates=[(damp, scale)], block_size=block_size, act_order=act_order,
        search_grid=search_grid,
    )
    if isinstance(res, ValueError):
        raise res
    return res if return_w_hat else res[0]


@torch.no_grad()
def gptq_nvfp4_candidates(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    global_scale: torch.Tensor,
    candidates: Sequence[tuple[float, torch.Tensor | None]],
    block_size: int = 128,
    act_order: bool = False,
    max_batch: int = 8,
    factor_cache: dict | None = None,
    search_grid: Sequence[float] | None = None,
) -> list[tuple[NVFP4Weight, torch.Tensor] | ValueError]:
    """:func:`gptq_nvfp4` for every ``(damp, scale)`` of ``candidates``, solved ``max_batch`` at a
    time in one column loop (memory: that many fp32 copies of ``W``).

    Returns, per candidate and in order, ``(weight, w_hat)`` or the ``ValueError`` raised for it
    (a damping whose Hessian cannot be inverted); bad arguments raise at once. ``factor_cache``: a
    dict shared by Linears with the same ``H`` (fused siblings), filled with the inverse-Hessian
    factors so each damping is factored once per Hessian; never share one across Hessians.
    """
    Wf, H = _check_inputs(W, H, "gptq_nvfp4")
    out, n = Wf.shape
    if n % GROUP_SIZE:
        raise ValueError(f"NVFP4 needs in_features divisible by {GROUP_SIZE}, got {n}")
    _check_block_size(block_size, GROUP_SIZE)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    gs = global_scale.detach().float().reshape(1).to(Wf.device)
    check_finite(gs, "gptq_nvfp4: global scale")
    n_groups = n // GROUP_SIZE
    scales_in = []
    for _, scale in candidates:
        if scale is not None:
            if scale.dtype != torch.float8_e4m3fn or scale.shape != (out, n_groups):
                raise ValueError(
                    f"scale must be float8_e4m3fn [{out}, {n_groups}], got {scale.dtype} {tuple(scale.shape)}"
                )
            scale = scale.to(Wf.device)
        scales_in.append(scale)

    gperm = cperm = None
    if act_order:
        gperm = _group_order(H, n_groups).to(Wf.device)
        cperm = (gperm.unsqueeze(1) * GROUP_SIZE + torch.arange(GROUP_SIZE, device=Wf.device)).reshape(-1)
        Wf = Wf[:, cperm]
        H = H[cperm][:, cperm]
        scales_in = [None if s is None else s[:, gperm] for s in scales_in]

    cache = factor_cache if factor_cache is not None else {}
    factors: dict[float, torch.Tensor | ValueError] = {}
    for d, _ in candidates:
        if d not in factors:
            key = (d, act_order)
            if key not in cache:
                try:
                    cache[key] = inverse_hessian_factor(H, d)[0]
                except ValueError as e:
                    cache[key] = e
            factors[d] = cache[key]
    results: list[tuple[NVFP4Weight, torch.Tensor] | ValueError | None] = [None] * len(candidates)
    runnable = []
    for k, (d, _) in enumerate(candidates):
        if isinstance(factors[d], ValueError):
            results[k] = factors[d]
        else:
            runnable.append(k)
    for c0 in range(0, len(runnable), max_batch):
        batch = runnable[c0 : c0 + max_batch]
        U = [factors[candidates[k][0]] for k in batch]
        solved = _nvfp4_loop(Wf, U, gs, [scales_in[k] for k in batch], block_size, search_grid)
        for k, (codes, scales, W_hat) in zip(batch, solved, strict=True):
            if act_order:
                inv_c = torch.argsort(cperm)
                codes, W_hat, scales = codes[:, inv_c], W_hat[:, inv_c], scales[:, torch.argsort(gperm)]
            q = NVFP4Weight(codes=codes.contiguous(), scale=scales.contiguous(), global_scale=gs)
            results[k] = (q, W_hat.contiguous())
    return results  # type: ignore[return-value]


def _eighth_is_exact(gs: torch.Tensor, smallest_scale: float) -> bool:
    """Whether every ``eff = scale / gs`` (``scale >= smallest_scale``) divided by 8 is exact in fp32,
    i.e. ``w / (eff / 8) == 8 · (w / eff)`` bit for bit (``eff / 8`` stays a normal number)."""
    if not smallest_scale > 0:
        return False
    g = float(gs.reshape(-1)[0])
    eff_min = float(torch.tensor(smallest_scale, dtype=torch.float32) / torch.tensor(g, dtype=torch.float32))
    return math.isfinite(g) and g > 0 and eff_min >= 2.0**-123


_FP8_MIN_SCALE = 2.0**-9  # the least positive float8_e4m3fn value (fp8_group_scales never gives 0)


def _nvfp4_loop(
    Wf: torch.Tensor,
    U: Sequence[torch.Tensor],
    gs: torch.Tensor,
    scales: Sequence[torch.Tensor | None],
    block_size: int,
    search: Sequence[float] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One batched column loop: per candidate ``(codes [out, in], scales [out, groups], w_hat)``.
    ``search``: scale multipliers for the candidates without given scales (:func:`_searched_scales`)."""
    out, n = Wf.shape
    B, n_groups = len(U), n // GROUP_SIZE
    codes_t = torch.empty(B, n, out, dtype=torch.uint8, device=Wf.device)
    scales_t = torch.empty(B, n_groups, out, dtype=torch.float8_e4m3fn, device=Wf.device)
    for b, s in enumerate(scales):
        if s is not None:
            scales_t[b] = s.T
    dyn = [b for b, s in enumerate(scales) if s is None]
    dynamic = torch.tensor(dyn, dtype=torch.int64, device=Wf.device)
    smallest = min([_FP8_MIN_SCALE] * bool(dyn) + [float(s.float().min()) for s in scales if s is not None])
    fast = _eighth_is_exact(gs, smallest)
    eff = torch.empty(B, out, dtype=torch.float32, device=Wf.device)
    eff8 = torch.empty_like(eff)
    t = torch.empty_like(eff)
    lut = E2M1Table.on(Wf.device)

    def round_column(j: int, w: torch.Tensor, q: torch.Tensor, U1: torch.Tensor, i: int) -> None:
        g = j // GROUP_SIZE
        if j % GROUP_SIZE == 0:
            if dyn:
                # w is row i of the block [B, rows, out]: the group's 16 columns follow it
                group = w.as_strided((B, GROUP_SIZE, out), (w.stride(0), out, 1))[dynamic]
                if search:
                    U_gg = U1[dynamic, i : i + GROUP_SIZE, i : i + GROUP_SIZE]
                    scales_t[dynamic, g] = _searched_scales(group, U_gg, gs, search)
                else:
                    scales_t[dynamic, g] = fp8_group_scales(group.abs().amax(1), gs)
            torch.div(scales_t[:, g].float(), gs, out=eff)
            torch.mul(eff, 0.125, out=eff8)
        if fast:  # t = w / (eff / 8) = 8 (w / eff) exactly; the code's sign bit is added after the loop
            torch.div(w, eff8, out=t)
            key = lut.key(t)
            codes_t[:, j] = key
            torch.copysign(lut.magnitude[key.long()], t, out=q)
            q.mul_(eff)
        else:  # the reference rounding (e.g. a zero scale given: w / 0)
            c = e2m1_codes(w / eff)
            codes_t[:, j] = c
            torch.mul(e2m1_decode(c), eff, out=q)

    WT = Wf.T.unsqueeze(0).repeat(B, 1, 1)
    W_hat = _gptq_loop(WT, U, block_size, round_column)
    if fast:  # keys -> codes; q = ±|v|·eff carries the sign of w / eff exactly, -0 included
        codes_t = lut.codes(codes_t, torch.signbit(W_hat))
    return [(codes_t[b].T, scales_t[b].T, W_hat[b].T) for b in range(B)]


def _searched_scales(
    group: torch.Tensor, U_gg: torch.Tensor, gs: torch.Tensor, mults: Sequence[float]
) -> torch.Tensor:
    """FP8 scales of one 16-column group chosen inside the column loop: per candidate and row, the
    multiplier ``m`` of ``fp8(m · gs · amax / 6)`` whose rounded group has the least loss after
    optimal feedback into the columns not yet rounded, ``‖U_gg⁻ᵀ (q − w)‖²`` (``group``
    ``[B, 16, out]``: the current, error-updated weights; ``U_gg`` ``[B, 16, 16]``: the factor's
    diagonal block; ``(U_ggᵀ U_gg)`` is the group's block of the remaining inverse Hessian). The
    group's codes are approximated by plain rounding under each scale; ``m = 1`` (the loop's own
    amax rule) is tried first and kept on ties.
    """
    amax = group.abs().amax(1)
    lower = U_gg.transpose(1, 2)
    best_s = best_loss = None
    for m in [1.0] + [float(m) for m in mults if float(m) != 1.0]:
        s = fp8_group_scales(amax * m if m != 1.0 else amax, gs)
        e = (s.float() / gs).unsqueeze(1)
        d = e2m1_round(group / e).mul_(e).sub_(group)
        loss = torch.linalg.solve_triangular(lower, d, upper=False).square_().sum(1)
        if best_s is None:
            best_s, best_loss = s, loss
            continue
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_s = torch.where(better, s, best_s)
    return best_s


def _diag_blocks(H: torch.Tensor) -> torch.Tensor:
    """The 16×16 diagonal blocks of ``H``: ``[in/16, 16, 16]``."""
    G = H.shape[0] // GROUP_SIZE
    idx = torch.arange(G, device=H.device)
    return H.reshape(G, GROUP_SIZE, G, GROUP_SIZE)[idx, :, idx, :]


@torch.no_grad()
def group_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Diagonal-block output error per row and group: ``Δw_{r,g}ᵀ H_gg Δw_{r,g}``, fp64 ``[out, in/16]``.

    Exact for a Hessian that is block diagonal over 16-column groups; cross-group terms of ``H``
    are ignored. The scale sweep's criterion.
    """
    return _group_error(W.detach().float(), W_hat.float(), _diag_blocks(H.detach().to(W.device).double()))


def _group_error(Wf: torch.Tensor, W_hat: torch.Tensor, Hb: torch.Tensor) -> torch.Tensor:
    d = (W_hat.double() - Wf.double()).unflatten(-1, (-1, GROUP_SIZE)).transpose(0, 1)  # [G, out, 16]
    return _grouped_error(d, Hb).T  # [out, G]


def _grouped_error(d: torch.Tensor, Hb: torch.Tensor) -> torch.Tensor:
    """``Δw_{r,g}ᵀ H_gg Δw_{r,g}`` from group-major differences ``d`` ``[G, out, 16]``: ``[G, out]``."""
    return (torch.bmm(d, Hb) * d).sum(-1)


@torch.no_grad()
def scale_sweep_nvfp4(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    global_scale: torch.Tensor,
    grid: Sequence[float] = (0.80, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2),
) -> NVFP4Weight:
    """Per row and 16-column group, the FP8 scale among ``fp8(m · gs · amax_g / 6)`` (``m`` in
    ``grid``) whose re-rounded codes give the least :func:`group_output_error` under ``H``.

    ``m = 1`` (RTN's scale) is always tried first and wins ties, so the result is never worse
    than RTN under this criterion for any group. Candidate scales are rounded to FP8 (zero
    replaced by FP8's eps) exactly as the packer stores them.
    """
    Wf, H = _check_inputs(W, H, "scale_sweep_nvfp4")
    out, n = Wf.shape
    if n % GROUP_SIZE:
        raise ValueError(f"NVFP4 needs in_features divisible by {GROUP_SIZE}, got {n}")
    mults = [1.0] + [float(m) for m in grid if float(m) != 1.0]
    if any(not (m > 0 and math.isfinite(m)) for m in mults):
        raise ValueError(f"scale sweep multipliers must be finite and > 0, got {tuple(grid)}")
    gs = global_scale.detach().float().reshape(1).to(Wf.device)
    # group-major layout [G, out, 16]: every multiplier's error is one batched product with H_gg
    WgT = Wf.unflatten(-1, (-1, GROUP_SIZE)).transpose(0, 1).contiguous()
    Wg64 = WgT.double()
    amax = WgT.abs().amax(-1)  # [G, out]
    Hb = _diag_blocks(H.double())
    lut = E2M1Table.on(Wf.device)
    fast = _eighth_is_exact(gs, _FP8_MIN_SCALE)

    best_scale = best_codes = best_err = None
    for m in mults:
        s = fp8_group_scales(amax * m if m != 1.0 else amax, gs)
        e = (s.float() / gs).unsqueeze(-1)
        if fast:  # the key stands for the code (its sign is w's), see _nvfp4_loop
            t = WgT / (e * 0.125)
            c = lut.key(t)
            q = torch.copysign(lut.magnitude[c.long()], t).mul_(e)
        else:
            c = e2m1_codes(WgT / e)
            q = e2m1_decode(c) * e
        d = q.double().sub_(Wg64)
        err = _grouped_error(d, Hb)  # [G, out]
        c = c.to(torch.uint8)
        if best_err is None:
            best_scale, best_codes, best_err = s, c, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
        best_codes = torch.where(better.unsqueeze(-1), c, best_codes)
    if fast:
        best_codes = lut.codes(best_codes, torch.signbit(WgT))
    return NVFP4Weight(
        codes=best_codes.transpose(0, 1).flatten(-2).contiguous(), scale=best_scale.T.contiguous(), global_scale=gs
    )


# ---- FP8 ----------------------------------------------------------------------------------------
@torch.no_grad()
def gptq_fp8(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> dict[str, torch.Tensor]:
    """GPTQ-rounded FP8 E4M3 per-channel weight, as the on-disk tensors of ``FP8.pack``.

    The per-row scale ``bf16(amax(W[o]) / 448)`` (``FP8.weight_scale``) is fixed from the original weight (RTN's); error
    feedback acts on the FP8 rounding (values pushed past ±448 by feedback are clamped).
    ``act_order`` permutes single columns by descending ``H_ii`` (the scale is per row, so any
    column order is servable). Returns ``{"weight": float8_e4m3fn [out, in], "weight_scale":
    fp32 [out, 1]}``; ``FP8().unpack`` of it is exactly the weight used for the feedback.
    """
    Wf, H = _check_inputs(W, H, "gptq_fp8")
    _check_block_size(block_size, 1)
    s = weight_scale_from_amax(Wf.abs().amax(dim=1, keepdim=True))  # [out, 1], BF16-exact
    s_col = s.squeeze(1)
    if act_order:
        perm = torch.sort(-torch.diagonal(H).double(), stable=True).indices.to(Wf.device)
        Wf = Wf[:, perm]
        H = H[perm][:, perm]
    U, _ = inverse_hessian_factor(H, damp)
    q8_t = torch.empty(Wf.shape[1], Wf.shape[0], dtype=torch.float8_e4m3fn, device=Wf.device)

    def round_column(j: int, w: torch.Tensor, q: torch.Tensor, U1: torch.Tensor, i: int) -> None:
        c = fp8_round(w[0] / s_col)
        q8_t[j] = c
        torch.mul(c.float(), s_col, out=q[0])

    _gptq_loop(Wf.T.contiguous().unsqueeze(0), [U], block_size, round_column)
    q8 = q8_t.T
    if act_order:
        q8 = q8[:, torch.argsort(perm)]
    return {"weight": q8.contiguous(), "weight_scale": s}


# ---- errors -------------------------------------------------------------------------------------
@torch.no_grad()
def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` with ``ΔW = Ŵ − W``, computed in fp64 (row chunks bound the memory)."""
    if W.shape != W_hat.shape:
        raise ValueError(f"output_error: W is {tuple(W.shape)} but W_hat is {tuple(W_hat.shape)}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"output_error: H must be [{W.shape[1]}, {W.shape[1]}], got {tuple(H.shape)}")
    return float(output_errors(W, [W_hat], [H])[0, 0])


def _symmetric_panels(Hs: Sequence[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
    """Per column block ``J = [j0, j1)``: the fp64 panel ``[j1, len(Hs)·(j1 − j0)]`` holding, for
    each ``H`` side by side, rows ``< j0`` as ``H[:j0, J] + H[J, :j0]ᵀ`` (each pair of mirrored
    blocks counted once) and rows ``J`` as the diagonal block ``H[J, J]``. Then
    ``Σ_J sum((ΔW[:, :j1] @ panel_J) ⊙ ΔW[:, J]) = tr(ΔW H ΔWᵀ)`` exactly in real arithmetic, for any
    (even not exactly symmetric) ``H``, with about half the products of ``(ΔW @ H) ⊙ ΔW``.
    """
    Hd = [H.double() for H in Hs]
    n = Hd[0].shape[0]
    panels = []
    for j0 in range(0, n, _PANEL):
        j1 = min(j0 + _PANEL, n)
        parts = []
        for h in Hd:
            p = h[:j1, j0:j1].clone()
            p[:j0] += h[j0:j1, :j0].T  # fp32 entries: the fp64 sum is exact
            parts.append(p)
        panels.append((j0, j1, torch.cat(parts, 1)))
    return panels


@torch.no_grad()
def output_errors(W: torch.Tensor, W_hats: Sequence[torch.Tensor], Hs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``tr(ΔW H ΔWᵀ)`` of every ``Ŵ`` in ``W_hats`` under every ``H`` in ``Hs``: fp64 ``[len(W_hats), len(Hs)]``.

    One pass for all of them: the ``ΔW`` rows of several candidates are stacked into one fp64
    product per column block against all the Hessians side by side, and only the upper block
    triangle of each ``H`` is used (:func:`_symmetric_panels`), so the cost is about half of one
    ``ΔW @ H`` per candidate and Hessian. Candidates equal bit for bit to an earlier one get its
    errors (so exact ties stay exact ties). Agrees with the plain ``sum((ΔW @ H) ⊙ ΔW)`` in fp64 up
    to the order of the fp64 sums.
    """
    out, n = W.shape
    if not Hs:
        raise ValueError("output_errors needs at least one Hessian")
    for k, W_hat in enumerate(W_hats):
        if W_hat.shape != W.shape:
            raise ValueError(f"output_errors: W is {tuple(W.shape)} but W_hats[{k}] is {tuple(W_hat.shape)}")
    for H in Hs:
        if H.shape != (n, n):
            raise ValueError(f"output_errors: every H must be [{n}, {n}], got {tuple(H.shape)}")
    Wf = W.detach()
    totals = torch.zeros(len(W_hats), len(Hs), dtype=torch.float64, device=W.device)
    same_as: dict[int, int] = {}
    todo: list[int] = []
    for k, W_hat in enumerate(W_hats):
        twin = next((t for t in todo if torch.equal(W_hats[t], W_hat)), None)
        if twin is None:
            todo.append(k)
        else:
            same_as[k] = twin
    if todo and out and n:
        panels = _symmetric_panels([H.detach().to(W.device) for H in Hs])
        Wd = Wf.double()
        rows = max(1, _ERROR_CHUNK_ELEMS // n)
        chunk: list[tuple[int, int, int]] = []
        pieces = [(k, r0, min(r0 + rows, out)) for k in todo for r0 in range(0, out, rows)]
        for i, piece in enumerate(pieces):
            chunk.append(piece)
            if i + 1 == len(pieces) or sum(r1 - r0 for _, r0, r1 in chunk) + (pieces[i + 1][2] - pieces[i + 1][1]) > rows:
                _chunk_errors(Wd, W_hats, chunk, panels, len(Hs), totals)
                chunk = []
    for k, twin in same_as.items():
        totals[k] = totals[twin]
    return totals


def _chunk_errors(
    Wd: torch.Tensor,
    W_hats: Sequence[torch.Tensor],
    chunk: Sequence[tuple[int, int, int]],
    panels: Sequence[tuple[int, int, torch.Tensor]],
    n_h: int,
    totals: torch.Tensor,
) -> None:
    """Adds the errors of the stacked row ranges ``chunk`` (``(candidate, r0, r1)``) to ``totals``."""
    D = torch.cat([W_hats[k][r0:r1].detach().to(Wd.device).double() - Wd[r0:r1] for k, r0, r1 in chunk])
    acc = torch.zeros(D.shape[0], n_h, dtype=torch.float64, device=D.device)
    for j0, j1, panel in panels:
        P = (D[:, :j1] @ panel).view(D.shape[0], n_h, j1 - j0)
        acc += (P * D[:, None, j0:j1]).sum(-1)
    r = 0
    for k, r0, r1 in chunk:
        totals[k] += acc[r : r + r1 - r0].sum(0)
        r += r1 - r0


# ---- refine + gate ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTQConfig:
    """What :func:`refine_nvfp4` / :func:`refine_fp8` try.

    * ``dampening``: relative dampings tried for GPTQ (the best on held-out data is kept): under the
      swept scales when the sweep is on, else under GPTQ's own scales; FP8 tries each;
    * ``own_scale_dampening``: with the sweep on, the dampings also tried under GPTQ's own
      (in-loop) group scales; ``None``: the smallest of ``dampening``. The default five candidates
      (RTN, sweep, ``gptq@0.03``, ``sweep+gptq@0.03``, ``sweep+gptq@0.1``) lost at most 0.03 % of
      the summed held-out error of the former eight (three dampings under both scales) on
      SmolLM2-135M (4.5 and 6.0 bpp, 64 x 512) and Gemma-3-270M (4k and 16k tokens), for half the
      GPTQ solves;
    * ``block_size``: lazy-update block width (a multiple of 16);
    * ``act_order``: group-wise activation order for NVFP4, column-wise for FP8 (on by default:
      on SmolLM2-135M at 4.5 bpp it cut the summed held-out output error by 29 %);
    * ``sweep`` / ``sweep_grid``: the NVFP4 per-group scale sweep and its multipliers;
    * ``sweep_then_gptq``: also run GPTQ under the swept scales (at every damping);
    * ``max_batch``: NVFP4 GPTQ candidates (dampings x {own, swept} scales) solved together in one
      column loop (each bit-identical to solving it alone; memory: that many fp32 copies of W);
    * ``refit``: once the gate has picked a candidate on the held-out tokens, solve that recipe
      (method and damping) again on the fit and held-out tokens together and keep that weight: the
      held-out tokens choose the recipe, all calibration tokens fit the weights. Needs ``H_refit``
      (:func:`refine_nvfp4`); the refiner passes it. RTN picks are never refitted;
    * ``scale_search``: GPTQ candidates that pick their group scales in the loop (``gptq@d``) try
      the ``sweep_grid`` multipliers of each group's amax and keep the one with the least loss
      after feedback (instead of the amax alone);
    * ``compensate_inputs``: where the Linear's input is quantized (W4A4) and the refiner passes its
      input error, GPTQ and the sweep fit the weight that compensates for it
      (:mod:`pq_lightning.input_error`: ``E‖W x − Ŵ x̂‖²`` instead of ``E‖(W − Ŵ) x̂‖²``), at the
      ``compensate_damp`` damping of least held-out error, or not at all when no damping beats ``W``
      on the held-out tokens; every candidate and the RTN gate are then scored on that error;
    * ``scale_headroom``: NVFP4 candidates (RTN included, so fused siblings keep one scale) use the
      weight global scale ``448·6 / (headroom · amax)``: a power of two, so RTN's served weight is the
      same bit for bit, while the largest groups' FP8 scales get room for ``sweep_grid`` multipliers
      above 1 (a group's largest value mapped to 4 instead of 6 with 1.5). Off by default: with
      ``sweep_grid`` up to 1.5 it lowered SmolLM2's 4.5-bpp KL but raised Gemma-3-270M's ``kl_conf``
      (README, quality levers);
    * ``measure_input_error``: the refiner also collects each W4A4 group's input error and records,
      per Linear, the held-out error the quantized input adds to RTN's and to the packed weight
      (:attr:`pq_lightning.refine.LinearDecision.heldout_act_rtn`), so the gate's weight-only errors
      become errors against the unquantized Linear (what the probe's ``output`` estimator prices).
      Changes no weight.
    """

    dampening: tuple[float, ...] = (0.03, 0.1)
    own_scale_dampening: tuple[float, ...] | None = None
    block_size: int = 128
    act_order: bool = True
    sweep: bool = True
    sweep_grid: tuple[float, ...] = (0.80, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)
    sweep_then_gptq: bool = True
    max_batch: int = 8
    refit: bool = True
    scale_search: bool = False
    compensate_inputs: bool = False
    compensate_damp: tuple[float, ...] = (0.01, 0.1, 1.0)
    scale_headroom: float = 1.0
    measure_input_error: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dampening", tuple(float(d) for d in self.dampening))
        object.__setattr__(self, "sweep_grid", tuple(float(m) for m in self.sweep_grid))
        object.__setattr__(self, "compensate_damp", tuple(float(d) for d in self.compensate_damp))
        if self.compensate_inputs and (not self.compensate_damp or any(
                not (d >= 0 and math.isfinite(d)) for d in self.compensate_damp)):
            raise ValueError(f"compensate_damp needs at least one finite value >= 0, got {self.compensate_damp}")
        if not self.dampening or any(not (d >= 0 and math.isfinite(d)) for d in self.dampening):
            raise ValueError(f"dampening needs at least one finite value >= 0, got {self.dampening}")
        if self.own_scale_dampening is not None:
            object.__setattr__(self, "own_scale_dampening", tuple(float(d) for d in self.own_scale_dampening))
            if any(not (d >= 0 and math.isfinite(d)) for d in self.own_scale_dampening):
                raise ValueError(f"own_scale_dampening needs finite values >= 0 (or None), got {self.own_scale_dampening}")
        _check_block_size(self.block_size, GROUP_SIZE)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if any(not (m > 0 and math.isfinite(m)) for m in self.sweep_grid):
            raise ValueError(f"sweep_grid multipliers must be finite and > 0, got {self.sweep_grid}")
        h = float(self.scale_headroom)
        if not (h >= 1 and math.isfinite(h) and math.frexp(h)[0] == 0.5):
            raise ValueError(f"scale_headroom must be a power of two >= 1 (1, 2, 4), got {self.scale_headroom}")


@dataclass(frozen=True)
class CandidateError:
    """Output errors ``tr(ΔW H ΔWᵀ)`` of one candidate on the fit and held-out Hessians."""

    fit: float
    heldout: float


@dataclass
class RefineResult:
    """The gate's decision for one Linear.

    ``quantized`` is an :class:`NVFP4Weight` (NVFP4) or the ``{"weight", "weight_scale"}`` tensors
    (FP8); ``w_hat`` its exact dequantised weight; ``method`` one of ``"rtn"``, ``"gptq"``,
    ``"sweep"``, ``"sweep+gptq"``; ``damp`` the chosen GPTQ damping (``None`` for RTN / sweep);
    ``candidates`` every candidate's errors keyed ``"rtn"``, ``"gptq@0.01"``, ``"sweep"``,
    ``"sweep+gptq@0.01"``…; ``failed`` candidates that could not be computed, with the reason.
    ``refit``: ``quantized`` is the chosen recipe solved again on the fit and held-out tokens
    together (:attr:`GPTQConfig.refit`); its errors are ``candidates["refit"]`` (the held-out one is
    then in-sample), the gate's evidence stays under :attr:`key`. ``target_damp``: the candidates
    were fitted to the input-compensating target at this damping (:attr:`GPTQConfig.compensate_inputs`;
    ``None``: to ``W``).
    """

    quantized: NVFP4Weight | dict[str, torch.Tensor]
    w_hat: torch.Tensor
    method: str
    damp: float | None
    candidates: dict[str, CandidateError]
    failed: dict[str, str] = field(default_factory=dict)
    refit: bool = False
    target_damp: float | None = None

    @property
    def key(self) -> str:
        return self.method if self.damp is None else f"{self.method}@{self.damp:g}"

    @property
    def heldout_gain(self) -> float:
        """Relative held-out error reduction vs RTN (0 when RTN is kept)."""
        rtn = self.candidates["rtn"].heldout
        return 0.0 if rtn == 0 else 1.0 - self.candidates[self.key].heldout / rtn


class _Candidates:
    """Collects candidates, scores them all in one pass (:func:`output_errors`), applies the RTN gate.
    With ``input_errors`` every error is the one against the unquantized Linear on the unquantized
    input (:func:`pq_lightning.input_error.full_output_errors`)."""

    def __init__(self, W: torch.Tensor, H_fit: torch.Tensor, H_heldout: torch.Tensor,
                 input_errors: InputErrors | None = None) -> None:
        self.W, self.H_fit, self.H_heldout = W, H_fit, H_heldout
        self.terms = None if input_errors is None else (input_errors.fit.terms(W), input_errors.heldout.terms(W))
        self.items: list[tuple[str, float | None, object, torch.Tensor]] = []
        self.failed: dict[str, str] = {}

    def errors(self, W_hats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[len(W_hats), 2]`` fp64: each weight's fit and held-out error."""
        base = output_errors(self.W, W_hats, [self.H_fit, self.H_heldout])
        return base if self.terms is None else full_output_errors(self.W, base, W_hats, self.terms)

    def add(self, method: str, damp: float | None, quantized: object, w_hat: torch.Tensor) -> None:
        self.items.append((method, damp, quantized, w_hat))

    def refit(self, best: RefineResult, quantized: object, w_hat: torch.Tensor) -> None:
        """Replace ``best``'s weight by its refit and record the refit's errors under ``"refit"``."""
        fit, held = self.errors([w_hat])[0].tolist()
        best.quantized, best.w_hat, best.refit = quantized, w_hat, True
        best.candidates["refit"] = CandidateError(fit=fit, heldout=held)

    def choose(self) -> RefineResult:
        """The least held-out error among candidates, kept only when strictly below RTN's."""
        errs = self.errors([item[3] for item in self.items]).tolist()
        errors = {
            (m if d is None else f"{m}@{d:g}"): CandidateError(fit=e[0], heldout=e[1])
            for (m, d, _, _), e in zip(self.items, errs, strict=True)
        }
        best, best_err = self.items[0], errs[0][1]  # RTN, always added first
        for item, e in zip(self.items[1:], errs[1:], strict=True):
            if e[1] < best_err:
                best, best_err = item, e[1]
        method, damp, quantized, w_hat = best
        return RefineResult(
            quantized=quantized,
            w_hat=w_hat,
            method=method,
            damp=damp,
            candidates=errors,
            failed=self.failed,
        )


@torch.no_grad()
def refine_nvfp4(
    W: torch.Tensor,
    H_fit: torch.Tensor,
    H_heldout: torch.Tensor,
    *,
    global_scale: torch.Tensor,
    config: GPTQConfig | None = None,
    factor_cache: dict | None = None,
    H_refit: torch.Tensor | None = None,
    input_error: InputErrors | None = None,
) -> RefineResult:
    """RTN, GPTQ at each damping, the scale sweep and GPTQ under the swept scales at each damping
    (all GPTQ candidates in one batched column loop), fitted on ``H_fit``; the
    candidate with the least held-out output error is kept only when it beats RTN's held-out
    error, else RTN (bit for bit). GPTQ at one damping counts as one candidate per damping; a
    damping whose Hessian cannot be inverted is listed in ``failed`` and skipped. ``factor_cache``:
    see :func:`gptq_nvfp4_candidates` (fused siblings share ``H_fit`` and can share one).
    ``H_refit``: the input second moment of the fit and held-out tokens together (per token); with
    ``config.refit`` the chosen recipe is solved again on it (:attr:`RefineResult.refit`).
    ``input_error``: the input's quantization error (:mod:`pq_lightning.input_error`); with
    ``config.compensate_inputs`` every candidate but RTN is fitted to the compensating target, and
    all are scored on the error against the unquantized Linear.
    """
    from .formats.nvfp4 import NVFP4

    config = config or GPTQConfig()
    Wf, H_fit = _check_inputs(W, H_fit, "refine_nvfp4")
    _, H_heldout = _check_inputs(W, H_heldout, "refine_nvfp4 (held-out)")
    gs = global_scale.detach().float().reshape(1).to(Wf.device) / config.scale_headroom
    rtn = NVFP4().quantize(Wf, global_scale=gs)
    ie = input_error if config.compensate_inputs else None
    cands = _Candidates(Wf, H_fit, H_heldout, ie)
    cands.add("rtn", None, rtn, rtn.dequantize())
    T, t_damp = _target(Wf, H_fit, H_heldout, cands, config, factor_cache)

    sw = scale_sweep_nvfp4(T, H_fit, global_scale=gs, grid=config.sweep_grid) if config.sweep else None
    swept_gptq = sw is not None and config.sweep_then_gptq
    own = config.dampening
    if swept_gptq:
        own = config.own_scale_dampening if config.own_scale_dampening is not None else (min(config.dampening),)
    members: list[tuple[float, torch.Tensor | None]] = [(d, None) for d in own]
    if swept_gptq:
        members += [(d, sw.scale) for d in config.dampening]
    solved = gptq_nvfp4_candidates(
        T, H_fit, global_scale=gs, candidates=members, block_size=config.block_size,
        act_order=config.act_order, max_batch=config.max_batch, factor_cache=factor_cache,
        search_grid=config.sweep_grid if config.scale_search else None,
    )
    results = list(zip(members, solved, strict=True))
    for (d, _), res in results[: len(own)]:
        if isinstance(res, ValueError):
            cands.failed[f"gptq@{d:g}"] = str(res)
        else:
            cands.add("gptq", d, *res)
    if sw is not None:
        cands.add("sweep", None, sw, sw.dequantize())
        for (d, _), res in results[len(own) :]:
            if isinstance(res, ValueError):
                cands.failed[f"sweep+gptq@{d:g}"] = str(res)
            else:
                cands.add("sweep+gptq", d, *res)
    best = cands.choose()
    best.target_damp = t_damp
    if config.refit and H_refit is not None and best.method != "rtn":
        _, H_refit = _check_inputs(Wf, H_refit, "refine_nvfp4 (refit)")
        T = _refit_target(Wf, H_refit, ie, t_damp, factor_cache)
        scale = None
        if best.method.startswith("sweep"):
            swept = scale_sweep_nvfp4(T, H_refit, global_scale=gs, grid=config.sweep_grid)
            scale = swept.scale
        if best.method == "sweep":
            quantized, w_hat = swept, swept.dequantize()
        else:
            (res,) = gptq_nvfp4_candidates(T, H_refit, global_scale=gs, candidates=[(best.damp, scale)],
                                           block_size=config.block_size, act_order=config.act_order,
                                           search_grid=config.sweep_grid if config.scale_search else None)
            if isinstance(res, ValueError):  # cannot be: the damped H_fit + H_heldout is a larger PD matrix
                raise res
            quantized, w_hat = res
        cands.refit(best, quantized, w_hat)
    return best


@torch.no_grad()
def refine_fp8(
    W: torch.Tensor,
    H_fit: torch.Tensor,
    H_heldout: torch.Tensor,
    *,
    config: GPTQConfig | None = None,
    H_refit: torch.Tensor | None = None,
    input_error: InputErrors | None = None,
) -> RefineResult:
    """RTN vs GPTQ (each damping) for FP8 per-channel, with the same held-out gate (and refit) and
    input compensation as NVFP4 (GPTQ takes its row scales from the weight it fits)."""
    from .formats.fp8 import FP8

    config = config or GPTQConfig()
    Wf, H_fit = _check_inputs(W, H_fit, "refine_fp8")
    _, H_heldout = _check_inputs(W, H_heldout, "refine_fp8 (held-out)")
    fmt = FP8()
    rtn = fmt.pack(Wf)
    ie = input_error if config.compensate_inputs else None
    cands = _Candidates(Wf, H_fit, H_heldout, ie)
    cands.add("rtn", None, rtn, fmt.unpack(rtn))
    T, t_damp = _target(Wf, H_fit, H_heldout, cands, config, None)
    for d in config.dampening:
        try:
            t = gptq_fp8(T, H_fit, damp=d, block_size=config.block_size, act_order=config.act_order)
        except ValueError as e:
            cands.failed[f"gptq@{d:g}"] = str(e)
            continue
        cands.add("gptq", d, t, fmt.unpack(t))
    best = cands.choose()
    best.target_damp = t_damp
    if config.refit and H_refit is not None and best.method != "rtn":
        _, H_refit = _check_inputs(Wf, H_refit, "refine_fp8 (refit)")
        t = gptq_fp8(_refit_target(Wf, H_refit, ie, t_damp, None), H_refit, damp=best.damp, block_size=config.block_size,
                     act_order=config.act_order)
        cands.refit(best, t, fmt.unpack(t))
    return best


def _target(W: torch.Tensor, H_fit: torch.Tensor, H_heldout: torch.Tensor, cands: _Candidates,
            config: GPTQConfig, cache: dict | None) -> tuple[torch.Tensor, float | None]:
    """What the candidates are fitted to: ``W``, or its input-compensating target when that has the
    lower held-out error (:func:`pq_lightning.input_error.choose_target`); ``cache``: the siblings'
    shared factor cache."""
    if cands.terms is None:
        return W, None
    fit, held = cands.terms
    chol = None if cache is None else cache.setdefault("input_error_fit", {})
    return choose_target(W, H_fit, fit, H_heldout, held, config.compensate_damp, chol)


def _refit_target(W: torch.Tensor, H_refit: torch.Tensor, ie: InputErrors | None, damp: float | None,
                  cache: dict | None) -> torch.Tensor:
    """The refit's target: the chosen damping's compensating target on all calibration tokens."""
    if ie is None or damp is None:
        return W
    if ie.refit is None:
        raise ValueError("refit with input compensation needs the pooled input error (InputErrors.refit)")
    chol = None if cache is None else cache.setdefault("input_error_refit", {})
    return compensated_target(W, H_refit, W.float() @ ie.refit.cross.to(W.device).float(), damp, chol)
