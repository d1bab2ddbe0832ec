"""The probe's output-space error sum ``Σ_r Σ_o w[rows[r], o] · e[r, o]²`` in one Triton pass.

:meth:`FisherAccumulator.update <pq_lightning.fisher.FisherAccumulator.update>` adds, per format,
``½ Σ_t Σ_o g_{t,o}² (y_t − ŷ_t)_o²`` over the tokens whose error ``e = y − ŷ`` was computed. Its
torch path squares ``e`` into a new tensor, gathers the rows of ``g²`` that go with the error rows
(``index_select``: another copy) and takes a dot product. This kernel reads ``e``, the weights and
the row indices once and writes one fp32 partial sum per program: neither ``e²`` nor the gathered
weights are materialised, and with ``square_weight=True`` neither is ``g²``.

Each term is formed as ``w · (e · e)`` in fp32 (``w = g · g`` when squared here), the same
operations as the torch path, so the terms agree bit for bit; only the order of the fp32 summation
differs: a program adds up to ``SPAN_O / BLOCK_O`` column tiles of ``[BLOCK_R, BLOCK_O]`` terms
element-wise, reduces the tile and writes one fp32 partial; the partials (one per row block and
column span, so a few hundred programs keep a GPU busy) are added in float64 by torch, in a fixed
order (no atomics): the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _weighted_square_sum_kernel(
    w_ptr,
    e_ptr,
    rows_ptr,
    part_ptr,
    n_rows,
    n_cols,
    n_w_rows,
    stride_wr,
    stride_wc,
    stride_er,
    stride_ec,
    HAS_ROWS: tl.constexpr,
    SQUARE_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    SPAN_O: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_o = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    if HAS_ROWS:
        wr = tl.load(rows_ptr + r, mask=rmask, other=0).to(tl.int64)
        # an index outside w is masked (read as 0), never dereferenced; callers pass valid rows
        rmask = rmask & (wr >= 0) & (wr < n_w_rows)
    else:
        wr = r.to(tl.int64)
    er = r.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    for o0 in range(0, SPAN_O, BLOCK_O):
        o = pid_o * SPAN_O + o0 + tl.arange(0, BLOCK_O)
        m = rmask[:, None] & (o < n_cols)[None, :]
        e = tl.load(e_ptr + er[:, None] * stride_er + o[None, :] * stride_ec, mask=m, other=0.0).to(
            tl.float32
        )
        w = tl.load(w_ptr + wr[:, None] * stride_wr + o[None, :] * stride_wc, mask=m, other=0.0).to(
            tl.float32
        )
        if SQUARE_W:
            w = w * w
        acc += w * (e * e)
    tl.store(part_ptr + pid_r * tl.num_programs(1) + pid_o, tl.sum(tl.sum(acc, axis=1), axis=0))


def weighted_square_sum_triton(
    w: torch.Tensor,
    e: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    square_weight: bool = False,
    block_r: int = 32,
    block_o: int = 128,
    tiles_per_program: int = 8,
) -> torch.Tensor:
    """``Σ_r Σ_o w'[rows[r], o] · e[r, o]²`` with ``w' = w²`` when ``square_weight`` else ``w``.

    Args:
        w: weights ``[T, out]`` (the probe passes ``g²``, already squared for its diagonals).
        e: errors ``[R, out]`` (``y − ŷ``), on ``w``'s device.
        rows: long ``[R]``: the row of ``w`` that goes with each row of ``e`` (the sampled tokens);
            ``None`` when ``e`` covers every row of ``w`` (then ``R == T``). Indices must lie in
            ``[0, T)``; one outside is read as a zero weight (the kernel never reads out of bounds).
        square_weight: square ``w`` in the kernel (pass the raw gradient ``g``).
        block_r, block_o, tiles_per_program: one program sums a ``[block_r, block_o]`` tile over
            ``tiles_per_program`` consecutive column tiles (powers of two for ``block_*``).

    Returns a float64 scalar on ``e``'s device: fp32 per-program sums, added in float64.
    """
    if w.ndim != 2 or e.ndim != 2 or w.shape[1] != e.shape[1]:
        raise ValueError(
            f"weights [T, out] and errors [R, out] must share out, got {tuple(w.shape)}, {tuple(e.shape)}"
        )
    if w.device != e.device:
        raise ValueError(f"weights on {w.device} but errors on {e.device}: move both to one device")
    n_rows, n_cols = e.shape
    if rows is None:
        if w.shape[0] != n_rows:
            raise ValueError(f"{n_rows} error rows but {w.shape[0]} weight rows: pass rows= for a subset")
        rows_arg = e  # unused (HAS_ROWS is False)
    else:
        if rows.ndim != 1 or rows.numel() != n_rows:
            raise ValueError(
                f"rows must be 1-D with one index per error row ({n_rows}), got {tuple(rows.shape)}"
            )
        rows_arg = rows.to(device=e.device, dtype=torch.int64).contiguous()
    span = block_o * tiles_per_program
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, span))
    part = torch.zeros(max(1, grid[0] * grid[1]), dtype=torch.float32, device=e.device)
    if n_rows and n_cols:
        _weighted_square_sum_kernel[grid](
            w,
            e,
            rows_arg,
            part,
            n_rows,
            n_cols,
            w.shape[0],
            w.stride(0),
            w.stride(1),
            e.stride(0),
            e.stride(1),
            HAS_ROWS=rows is not None,
            SQUARE_W=square_weight,
            BLOCK_R=block_r,
            BLOCK_O=block_o,
            SPAN_O=span,
        )
    return part.sum(dtype=torch.float64)
