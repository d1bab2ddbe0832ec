"""Counted work: matmul and attention FLOPs of a block of code, as forward-equivalents per token.

:func:`count_flops` counts with ``torch.utils.flop_counter``'s formulas plus the ops they miss here:
in-place ``addmm_`` / ``baddbmm_`` (Hessian sums, error sums), the CPU kernels of scaled
dot-product attention, and attention with fewer kv heads than query heads (grouped-query, as
transformers calls it on CUDA). :func:`not_counted` switches counting off inside a counted block for
work that does not scale with the data (a GPTQ solve), so the tally of a stage divided by its tokens and
by a forward pass's FLOPs per token is the stage's cost per calibration token in forward passes.
Elementwise work (fake-quantisation, norms) is not counted: on a GPU it rides along the matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils import flop_counter as _fc
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten


def _addmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.mm_flop(a_shape, b_shape)


def _baddbmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.bmm_flop(a_shape, b_shape)


def _kv_as_query_heads(q_shape, k_shape, v_shape):
    """Key and value shapes with the query's head count: grouped-query attention (``enable_gqa``,
    fewer kv heads, as transformers calls it on CUDA) does the work of the repeated kv heads, and
    torch's formulas refuse unequal head counts."""
    if len(q_shape) == 4 and len(k_shape) == 4 and k_shape[1] != q_shape[1]:
        k_shape = (k_shape[0], q_shape[1], *k_shape[2:])
        v_shape = (v_shape[0], q_shape[1], *v_shape[2:])
    return k_shape, v_shape


def _attention(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(q_shape, *_kv_as_query_heads(q_shape, k_shape, v_shape))


def _attention_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_shape, q_shape, *_kv_as_query_heads(q_shape, k_shape, v_shape))


_ATTENTION_OPS = (  # [batch, heads, seq, dim] layouts: the CPU kernel and the three CUDA ones
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
)


def _extra_ops() -> dict:
    ops = {_aten.addmm_: _addmm, _aten.baddbmm_: _baddbmm}
    for name in _ATTENTION_OPS:
        for op_name, fn in ((name, _attention), (name + "_backward", _attention_backward)):
            if hasattr(_aten, op_name):
                ops[getattr(_aten, op_name)] = fn
    return ops


class FlopTally:
    """FLOPs counted so far (summed over every :func:`count_flops` block given this tally)."""

    def __init__(self) -> None:
        self.flops = 0

    def per_token(self, tokens: int, forward_flops_per_token: float) -> float:
        """Forward-equivalents per token: the tally over ``tokens`` tokens, in forward passes."""
        if tokens <= 0 or forward_flops_per_token <= 0:
            return float("nan")
        return self.flops / tokens / forward_flops_per_token


class _Counter(TorchDispatchMode):
    """Adds the FLOPs of every counted op to a tally (no module tracking: no hooks on the graph)."""

    def __init__(self, tally: FlopTally) -> None:
        super().__init__()
        self.tally = tally
        self.registry = {**_fc.flop_registry, **{k: _fc.shape_wrapper(v) for k, v in _extra_ops().items()}}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.tally.flops += int(count(*args, **kwargs, out_val=out))
        return out


@contextlib.contextmanager
def count_flops(tally: FlopTally | None = None) -> Iterator[FlopTally]:
    """Count the FLOPs of the block into ``tally`` (a new one when None)."""
    tally = tally if tally is not None else FlopTally()
    with _Counter(tally):
        yield tally


@contextlib.contextmanager
def not_counted() -> Iterator[None]:
    """Run the block outside any active counter (and without its per-op overhead)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def forward_flops_per_token(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """FLOPs of one forward pass of ``model`` on ``input_ids`` ``[batch, T]``, per token."""
    with torch.no_grad(), count_flops() as tally:
        model(input_ids=input_ids, use_cache=False)
    return tally.flops / input_ids.numel()
