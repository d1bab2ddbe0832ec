"""Counted FLOPs of attention against the hand-computed count (4·b·h·s_q·s_k·d forward)."""

from __future__ import annotations

import pytest
import torch

from pq_lightning.flops import _ATTENTION_OPS, FlopTally, _Counter, count_flops

B, HQ, HKV, S, D = 2, 6, 2, 10, 8
ATTENTION_FORWARD = 4 * B * HQ * S * S * D  # q·kᵀ and p·v, each 2·b·h·s·s·d


def test_grouped_query_attention_counts_as_the_repeated_heads():
    q = torch.randn(B, HQ, S, D)
    k, v = torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D)
    with count_flops() as grouped:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    rep = HQ // HKV
    with count_flops() as repeated:
        torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    assert grouped.flops == repeated.flops == ATTENTION_FORWARD


@pytest.mark.parametrize("name", _ATTENTION_OPS)
def test_every_attention_kernel_takes_fewer_kv_heads(name):
    """The CUDA kernels cannot run here; their formulas get the shapes they would see under GQA
    (a plain float global and this assert were what broke the first H200 run)."""
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        pytest.skip(f"this torch has no aten.{name}")
    registry = _Counter(FlopTally()).registry
    q, kv = torch.empty(B, HQ, S, D, device="meta"), torch.empty(B, HKV, S, D, device="meta")
    assert registry[op](q, kv, kv, out_val=None) == ATTENTION_FORWARD
    backward = getattr(torch.ops.aten, name + "_backward", None)
    if backward is not None:
        grad = torch.empty(B, HQ, S, D, device="meta")
        full = torch.empty(B, HQ, S, D, device="meta")
        assert registry[backward](grad, q, kv, kv, out_val=None) == registry[backward](
            grad, q, full, full, out_val=None)
        # scores recomputed, then dv, dp, dq, dk: five products of 2·b·h·s·s·d
        assert registry[backward](grad, q, kv, kv, out_val=None) == 5 * ATTENTION_FORWARD // 2
