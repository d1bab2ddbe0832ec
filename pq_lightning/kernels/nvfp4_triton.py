"""NVFP4 RTN quantize / pack / fake-quant in one Triton pass.

One program handles ``BLOCK`` groups of 16 consecutive weights of a row-major ``[out, in]``
tensor. It reads each group once and writes the packed codes (8 bytes), the FP8 group scale and,
optionally, the dequantised fp32 values. Divisions use ``div_rn`` (IEEE round-to-nearest), so the
result is bit-identical to the torch reference in :mod:`pq_lightning.formats.nvfp4`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats.nvfp4 import FP8_SCALE_EPS, GROUP_SIZE

# compiled Triton reads a module global only when it is a constexpr (the interpreter reads any)
_FP8_SCALE_EPS = tl.constexpr(FP8_SCALE_EPS)


@triton.jit
def _e2m1_round(a):
    """Magnitude ``a >= 0`` to (E2M1 index, E2M1 value), ties to even."""
    idx = (a > 0.25).to(tl.int32)
    idx += (a >= 0.75).to(tl.int32)
    idx += (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32)
    idx += (a > 2.5).to(tl.int32)
    idx += (a >= 3.5).to(tl.int32)
    idx += (a > 5.0).to(tl.int32)
    val = tl.where(idx < 5, idx.to(tl.float32) * 0.5, (idx - 2).to(tl.float32))
    val = tl.where(idx == 7, 6.0, val)
    return idx, val


@triton.jit
def _fp8_e4m3_round(s):
    """Round ``0 <= s <= 448`` to the nearest FP8 E4M3 value, ties to even, in fp32 arithmetic.

    Spelled out rather than a dtype cast so that compiled and interpreted Triton agree bit for
    bit: the spacing of E4M3 values at ``s`` is ``2**(max(e, -6) - 3)`` with ``e`` the binary
    exponent of ``s``, and adding then subtracting ``2**23`` rounds to an integer, ties to even.
    """
    bits = s.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6) - 3
    ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
    v = s / ulp  # exact: a power-of-two division
    r = (v + 8388608.0) - 8388608.0
    return r * ulp


@triton.jit
def _nvfp4_quantize_kernel(
    w_ptr,
    gs_ptr,
    packed_ptr,
    scale_ptr,
    deq_ptr,
    n_groups,
    BLOCK: tl.constexpr,
    WANT_DEQUANT: tl.constexpr,
):
    pid = tl.program_id(0)
    gid = pid * BLOCK + tl.arange(0, BLOCK)
    gmask = gid < n_groups
    pair = tl.arange(0, 8)
    even = gid[:, None] * 16 + 2 * pair[None, :]
    mask = gmask[:, None]
    x0 = tl.load(w_ptr + even, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(w_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr).to(tl.float32)

    amax = tl.maximum(tl.max(tl.abs(x0), axis=1), tl.max(tl.abs(x1), axis=1))
    s = gs * tl.div_rn(amax, 6.0)
    s = tl.minimum(tl.maximum(s, -448.0), 448.0)
    sf = _fp8_e4m3_round(s)
    sf = tl.where(sf == 0.0, _FP8_SCALE_EPS, sf)
    tl.store(scale_ptr + gid, sf.to(tl.float8e4nv), mask=gmask)
    eff = tl.div_rn(sf, gs)

    q0 = tl.div_rn(x0, eff[:, None])
    q1 = tl.div_rn(x1, eff[:, None])
    neg0 = (q0.to(tl.int32, bitcast=True) >> 31) & 1
    neg1 = (q1.to(tl.int32, bitcast=True) >> 31) & 1
    i0, v0 = _e2m1_round(tl.abs(q0))
    i1, v1 = _e2m1_round(tl.abs(q1))
    c0 = i0 | (neg0 << 3)
    c1 = i1 | (neg1 << 3)
    byte = (c0 | (c1 << 4)).to(tl.uint8)
    tl.store(packed_ptr + gid[:, None] * 8 + pair[None, :], byte, mask=mask)
    if WANT_DEQUANT:
        # the sign goes in as a bit: compiled Triton negates as 0 - x, which loses -0.0
        d0 = ((v0 * eff[:, None]).to(tl.int32, bitcast=True) | (neg0 << 31)).to(tl.float32, bitcast=True)
        d1 = ((v1 * eff[:, None]).to(tl.int32, bitcast=True) | (neg1 << 31)).to(tl.float32, bitcast=True)
        tl.store(deq_ptr + even, d0, mask=mask)
        tl.store(deq_ptr + even + 1, d1, mask=mask)


def nvfp4_quantize_triton(
    w: torch.Tensor, global_scale: torch.Tensor, *, want_dequant: bool = True, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RTN NVFP4 of ``w [out, in]`` under ``global_scale``.

    Returns ``(weight_packed uint8 [out, in/2], weight_scale fp8 [out, in/16], dequant fp32 | None)``.
    """
    if w.ndim != 2 or w.shape[1] % GROUP_SIZE:
        raise ValueError(f"NVFP4 kernel needs a 2-D weight with in % 16 == 0, got {tuple(w.shape)}")
    w = w.contiguous()
    out, inp = w.shape
    n_groups = out * inp // GROUP_SIZE
    packed = torch.empty(out, inp // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(out, inp // GROUP_SIZE, dtype=torch.float8_e4m3fn, device=w.device)
    deq = torch.empty(out, inp, dtype=torch.float32, device=w.device) if want_dequant else packed
    gs = global_scale.float().reshape(1).contiguous()
    grid = (triton.cdiv(n_groups, block),)
    _nvfp4_quantize_kernel[grid](w, gs, packed, scale, deq, n_groups, BLOCK=block, WANT_DEQUANT=want_dequant)
    return packed, scale, (deq if want_dequant else None)
