"""GPTQ's lazy block update ``C -= Aᵀ B`` as one fp32 Triton matmul-with-subtract.

In :func:`pq_lightning.gptq._gptq_loop` (on the transposed weight ``Wᵀ [in, out]``), after the
columns ``i1:i2`` of a block are rounded, the remaining rows receive the block's scaled errors::

    WT[i2:] -= U[i1:i2, i2:]ᵀ @ E1        (torch: WT[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1))

with ``U`` the upper Cholesky factor of the damped inverse Hessian and ``E1 [i2-i1, out]`` the
block's errors divided by ``U``'s diagonal. One program computes a ``[BLOCK_M, BLOCK_N]`` tile of
``Aᵀ B`` in fp32 (``input_precision="ieee"``: no TF32 on tensor cores, so the products are the
fp32 products the torch path forms) and subtracts it from ``C`` in place. ``A`` is read through
its strides, so the slice of ``U`` is never copied or transposed in memory.

The sum over ``K`` runs in another order than cuBLAS / the CPU BLAS, so the two paths agree to
fp32 rounding, not bit for bit (exactly when every partial sum is representable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sub_at_b_kernel(
    c_ptr,
    a_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_cm,
    stride_cn,
    stride_ak,
    stride_am,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = rk < K
        # Aᵀ tile [BLOCK_M, BLOCK_K] read straight from A [K, M]
        a = tl.load(
            a_ptr + rk[None, :] * stride_ak + rm[:, None] * stride_am,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    cmask = m_ok[:, None] & n_ok[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c = tl.load(c_ptrs, mask=cmask, other=0.0)
    tl.store(c_ptrs, c - acc, mask=cmask)


def sub_at_b_triton_(
    c: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 16,
) -> torch.Tensor:
    """``c -= aᵀ @ b`` in place, fp32; returns ``c``.

    Args:
        c: fp32 ``[M, N]`` (any strides; updated in place).
        a: fp32 ``[K, M]`` (any strides: a slice of a larger matrix is fine).
        b: fp32 ``[K, N]`` (any strides).
    """
    if c.ndim != 2 or a.ndim != 2 or b.ndim != 2:
        raise ValueError("sub_at_b_triton_ takes 2-D c [M, N], a [K, M], b [K, N]")
    K, M = a.shape
    if b.shape[0] != K or tuple(c.shape) != (M, b.shape[1]):
        raise ValueError(
            f"shapes do not chain: c {tuple(c.shape)} -= a{tuple(a.shape)}ᵀ @ b{tuple(b.shape)} "
            "(need c [M, N], a [K, M], b [K, N])"
        )
    if not (c.dtype == a.dtype == b.dtype == torch.float32):
        raise ValueError(f"sub_at_b_triton_ works in fp32, got c {c.dtype}, a {a.dtype}, b {b.dtype}")
    if not (c.device == a.device == b.device):
        raise ValueError(f"c, a, b must share one device, got {c.device}, {a.device}, {b.device}")
    N = c.shape[1]
    if M == 0 or N == 0 or K == 0:
        return c
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _sub_at_b_kernel[grid](
        c,
        a,
        b,
        M,
        N,
        K,
        c.stride(0),
        c.stride(1),
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return c
