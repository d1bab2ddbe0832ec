"""Logits a few positions at a time: the next-token loss and the evaluation over a large vocabulary.

With a 262,144-token vocabulary (Gemma-3) the logits ``[batch, seq, vocab]`` in fp32, and in
training their gradient, are the largest tensors of a step by far: 2 GiB per copy for 4 windows of
512 tokens, against 5 MiB for the hidden states that produce them. Here the model runs with its
output-embedding module (``lm_head``) seeing only the last position; the module's input at every
position (the final hidden states) is kept, and logits are made from it a chunk of positions at a
time, by the same module and the same elementwise post-processing the model applies (final-logit
soft-capping, logit scales). The last position's logits, computed both ways, must agree, else the
caller falls back to the model's own full logits.

:func:`next_token_loss_mean` takes the cross-entropy chunk by chunk inside one autograd function
that also computes, in its forward pass, each chunk's gradient (with respect to the hidden states
and to any head parameter that requires grad): the backward pass then only scales those, so no
``[tokens, vocab]`` tensor outlives its chunk and nothing is recomputed. Each position goes through
the same operations as in the unchunked loss; only the matmuls' summation order may differ (the
loss and gradients agree to ~1e-7 relative, tested).

No Lightning here.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
#: Bytes of one chunk's fp32 logits ``[positions, vocab]`` (its softmax and gradient are as large).
LOGIT_CHUNK_BYTES = 64 * 2**20

RunFn = Callable[[Tensor, "Tensor | None"], Any]
# per model: whether its logits are its head module's output plus a known post-processing
_VERDICT: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@dataclass
class HeadSplit:
    """The head's input at every position ``hidden [batch, seq, d]``, the head module and the
    model's post-processing of its output: ``head(rows)`` gives the model's logits of ``rows``."""

    hidden: Tensor
    module: nn.Module
    post: Callable[[Tensor], Tensor]
    vocab_size: int

    def head(self, rows: Tensor) -> Tensor:
        return self.post(self.module(rows))


def positions_per_chunk(vocab_size: int, chunk_bytes: int = LOGIT_CHUNK_BYTES) -> int:
    """Positions whose fp32 logits fit in ``chunk_bytes`` (at least one)."""
    return max(1, int(chunk_bytes) // (4 * max(1, int(vocab_size))))


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks
    )


def _post_processing(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The elementwise steps transformers' causal LMs apply after ``lm_head``, from the model's config."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)  # Cohere: a module attribute
    divisor = getattr(text, "logits_scaling", None)  # Granite

    def post(logits: Tensor) -> Tensor:
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if isinstance(divisor, (int, float)) and not isinstance(divisor, bool):
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return post


def _capture_head_input(head_module: nn.Module, run: Callable[[], Any]) -> tuple[Any, list[Tensor]]:
    """Run ``run()`` with ``head_module`` given only the last position of its input; that input is kept."""
    seen: list[Tensor] = []

    def capture(module: nn.Module, args: tuple) -> tuple | None:
        seen.append(args[0])
        return (args[0][:, -1:], *args[1:]) if args[0].dim() == 3 else None

    handle = head_module.register_forward_pre_hook(capture)
    try:
        out = run()
    finally:
        handle.remove()
    return out, seen


def split_head(model: nn.Module, run: RunFn, input_ids: Tensor, attention_mask: Tensor | None = None) -> HeadSplit | None:
    """Run ``run(input_ids, attention_mask)`` (a forward of ``model``) with the head seeing the last
    position only, keeping the head's input at every position.

    Returns None without running when the model has no output-embedding module or that module
    carries hooks (a probe on ``lm_head`` must see every position). Returns None after the run when
    the last position's logits made from the kept input (the head module, then the post-processing
    of :func:`_post_processing`) are not the model's own: the model is remembered (later calls
    return None at once) and the caller runs it again for its full logits, so this batch's forward
    hooks see two forwards, with a warning.
    """
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head_module, nn.Module) or _has_hooks(head_module) or _VERDICT.get(model) is False:
        return None
    out, seen = _capture_head_input(head_module, lambda: run(input_ids, attention_mask))
    logits = getattr(out, "logits", None)
    ok = len(seen) == 1 and seen[0].dim() == 3 and logits is not None and logits.shape[:2] == (seen[0].shape[0], 1)
    split = HeadSplit(seen[0], head_module, _post_processing(model), int(logits.shape[-1])) if ok else None
    if split is not None:
        with torch.no_grad():
            again = split.head(split.hidden[:, -1:].detach())
        ok = again.shape == logits.shape and torch.allclose(
            again.float(), logits.detach().float(), rtol=1e-5, atol=1e-5
        )
    if not ok:
        _VERDICT[model] = False
        warnings.warn(
            f"{type(model).__name__}: its logits are not its output embeddings' output plus a known "
            "post-processing; its full logits are used (more memory), and this first batch ran twice.",
            stacklevel=2,
        )
        return None
    return split


def logit_chunks(split: HeadSplit, row: int, stop: int, chunk: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """``(start, logits [n, vocab])`` of positions ``0 … stop-1`` of batch row ``row``, ``chunk`` at a time."""
    step = chunk or positions_per_chunk(split.vocab_size)
    for start in range(0, stop, step):
        yield start, split.head(split.hidden[row, start : min(stop, start + step)])


class _ChunkedCrossEntropy(torch.autograd.Function):
    """``sum_t CE(head(hidden_t), label_t) / count``, its gradient taken chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, labels: Tensor, head: Callable, count: int, chunk: int, *params: Tensor):
        wants = [hidden.requires_grad] + [p.requires_grad for p in params]
        grad_h = torch.zeros_like(hidden) if wants[0] else None
        grad_p = [torch.zeros_like(p) if w else None for p, w in zip(params, wants[1:], strict=True)]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        targets = [p for p, w in zip(params, wants[1:], strict=True) if w]
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].detach().requires_grad_(wants[0])
            with torch.enable_grad():
                loss = F.cross_entropy(head(h).float(), labels[rows], ignore_index=IGNORE_INDEX, reduction="sum")
                grads = torch.autograd.grad(loss / count, ([h] if wants[0] else []) + targets)
            total += loss.detach()
            it = iter(grads)
            if grad_h is not None:
                grad_h[rows] = next(it)
            for i, w in enumerate(wants[1:]):
                if w:
                    grad_p[i] += next(it)
        ctx.grads = (grad_h, grad_p)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_p = ctx.grads
        ctx.grads = None
        scaled = [None if g is None else g * grad_out for g in grad_p]
        return (None if grad_h is None else grad_h * grad_out), None, None, None, None, *scaled


def next_token_loss_mean(
    split: HeadSplit, labels: Tensor, count: int, chunk: int | None = None
) -> Tensor:
    """Mean next-token cross-entropy (fp32) of positions ``0 … seq-2`` against ``labels [batch, seq-1]``
    (``IGNORE_INDEX`` not counted; ``count`` targets counted), chunk by chunk; differentiable."""
    hidden = split.hidden[:, :-1].reshape(-1, split.hidden.shape[-1])
    flat = labels.reshape(-1)
    step = chunk or positions_per_chunk(split.vocab_size)
    params = [p for p in split.module.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _ChunkedCrossEntropy.apply(hidden, flat, split.head, count, step, *params)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        total += F.cross_entropy(split.head(hidden[rows]).float(), flat[rows], ignore_index=IGNORE_INDEX,
                                 reduction="sum")
    return total / count


@dataclass
class ChunkedLogits:
    """A batch's logits, handed out a chunk of positions at a time: made from the head's input
    (``split``), or sliced from the model's full logits when its head could not be split."""

    split: HeadSplit | None
    full: Tensor | None
    chunk_bytes: int = LOGIT_CHUNK_BYTES

    def rows(self, row: int, stop: int) -> Iterator[tuple[int, Tensor]]:
        """``(start, logits [n, vocab])`` of positions ``0 … stop-1`` of batch row ``row``."""
        if self.split is not None:
            yield from logit_chunks(self.split, row, stop, positions_per_chunk(self.split.vocab_size, self.chunk_bytes))
            return
        assert self.full is not None
        step = positions_per_chunk(self.full.shape[-1], self.chunk_bytes)
        for start in range(0, stop, step):
            yield start, self.full[row, start : min(stop, start + step)]


def chunked_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, chunk_bytes: int = LOGIT_CHUNK_BYTES
) -> ChunkedLogits:
    """Run ``model`` (no KV cache) on ``input_ids`` keeping only what makes its logits chunk by chunk."""

    def run(ids: Tensor, mask: Tensor | None) -> Any:
        return model(input_ids=ids, attention_mask=mask, use_cache=False)

    split = split_head(model, run, input_ids, attention_mask)
    if split is None:
        return ChunkedLogits(None, run(input_ids, attention_mask).logits, chunk_bytes)
    return ChunkedLogits(split, None, chunk_bytes)
