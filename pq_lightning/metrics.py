"""Evaluation metrics of a quantized causal LM against its reference: token KL and top-1 agreement.

Definitions (the project's evaluation protocol, as in the README's "Evaluation")
-----------------------------------------------------------------
For one position with reference logits ``r`` and candidate (quantized) logits ``z`` over a
vocabulary of ``V`` tokens, in the compute dtype (fp32 by default, whatever the logits' dtype):

* ``log p = log_softmax(r)``, ``log q = log_softmax(z)`` over the full vocabulary.
* **Full KL**: ``KL(P_ref || P_q) = sum_v p_v (log p_v - log q_v)`` over all ``V`` tokens.
* **Top-k KL** (the variant vLLM's top-k logprobs allow): let ``T`` be the ``k`` tokens with the largest
  reference log-probabilities. ``KL_k = sum_{v in T} p_v (log p_v - log q_v)``, where both
  ``log p_v`` and ``log q_v`` are the *full-vocabulary* log-probabilities (not renormalised over
  ``T``). It is a partial sum of the full KL's terms. The omitted terms add up to
  ``P(not T) * KL(P_rest || Q_rest) + P(not T) log(P(not T) / Q(not T))`` (chain rule), whose
  second part can be negative, so ``KL_k`` is not a strict lower bound of every position's KL;
  in practice the tail mass is small and ``KL_k <= KL``. It is what a serving engine's top-k
  logprob API lets one compute, and it needs only the reference's top-k (see the cache below).
* **Confident positions**: those whose reference top-1 probability ``max_v p_v`` is strictly
  greater than ``confidence_threshold`` (0.5 by default; a position at exactly the threshold is
  not confident).
* **Top-1 agreement**: ``argmax(r) == argmax(z)`` (argmax of the logits; ties go to the lowest
  token id, torch's rule).

Design
------
One function, :func:`position_stats`, computes every per-position quantity for a pair of logits
tensors: it walks the positions in chunks whose size comes from a byte budget, so it never holds
more than a few chunk-sized buffers beyond the inputs, and it runs ``log_softmax`` once per model
per chunk. The result, :class:`PositionStats`, holds a handful of numbers per position. The
metrics only accumulate from it: :class:`TokenKLDivergence`, :class:`Top1Agreement` and
:class:`PositionCount` each accept raw logits (and then call :func:`position_stats` themselves),
a :class:`PositionStats`, or a :class:`ReferenceCache`. :class:`QuantEvalMetrics` computes the
stats once per ``update`` and feeds every member, so one ``update`` costs one ``log_softmax`` per
model per chunk whatever the number of metrics.

State is a float64 sum and an int64 count per metric, both reduced with ``"sum"``: a distributed
``compute()`` equals the single-process value up to float64 summation order. ``compute()``
returns the mean over counted positions, or ``nan`` when no position was counted (for example
``kl_conf`` when no position is confident), never an error.

Reference cache
---------------
When the reference model cannot stay in memory next to the quantized one, run it first and keep
:func:`reference_cache_entries` of its logits: per position the top-k log-probabilities (sorted
descending) and their token ids, the top-1 probability and the argmax, about ``12 k + 12`` bytes
per position. Updating from a cache (``update_from_cache`` or ``update(cache, q_logits)``)
supports the top-k KL (for any ``top_k`` up to the cache's ``k``), top-1 agreement and the
confidence selection, i.e. ``kl_top20_conf``, ``top1_conf``, ``top1_all``, ``n_positions`` and
``n_confident``. The full-vocabulary KL (``kl_all``, ``kl_conf``) needs the whole reference
distribution: a :class:`TokenKLDivergence` without ``top_k`` raises on a cache, and
:class:`QuantEvalMetrics` leaves those members untouched (they stay ``nan`` unless they also get
direct updates; do not mix the two kinds of update in one collection if the sets of positions
must agree).

Inputs with NaN or infinite logits (at positions not excluded by ``mask``) raise ``ValueError``
before any state changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "PositionCount",
    "PositionStats",
    "QuantEvalMetrics",
    "ReferenceCache",
    "Top1Agreement",
    "TokenKLDivergence",
    "position_stats",
    "position_stats_from_cache",
    "positions_per_chunk",
    "reference_cache_entries",
]

DEFAULT_CHUNK_BYTES = 128 * 2**20
"""Default working-memory budget of one chunk (bytes), on top of the input logits."""

# [n, V] buffers of one chunk, used to turn the byte budget into a number of positions:
# log p, log q and a scratch buffer (compute dtype), one gather buffer (input dtype).
_COMPUTE_BUFFERS = 3
_INPUT_BUFFERS = 1


@dataclass(frozen=True)
class PositionStats:
    """Per-position quantities of the counted positions (mask already applied), flat ``[N]``.

    Attributes:
        ref_top1_prob: reference top-1 probability, compute dtype.
        top1_match: ``argmax(ref) == argmax(q)``, bool.
        kl: full-vocabulary ``KL(P_ref || P_q)``, compute dtype; ``None`` when the reference
            came from a :class:`ReferenceCache`.
        kl_topk: KL restricted to the reference's top-``top_k`` tokens (module docstring);
            ``None`` when ``top_k`` is ``None``.
        top_k: the ``k`` of ``kl_topk``, or ``None``.
    """

    ref_top1_prob: Tensor
    top1_match: Tensor
    kl: Tensor | None
    kl_topk: Tensor | None
    top_k: int | None

    @property
    def num_positions(self) -> int:
        return int(self.top1_match.numel())


@dataclass(frozen=True)
class ReferenceCache:
    """What the top-k metrics need from the reference model, per position ``[...]``.

    Attributes:
        topk_logprobs: ``[..., k]`` the reference's largest full-vocabulary log-probabilities,
            sorted descending (compute dtype).
        topk_ids: ``[..., k]`` int64 token ids of ``topk_logprobs``.
        top1_prob: ``[...]`` reference top-1 probability (``exp(topk_logprobs[..., 0])``).
        argmax: ``[...]`` int64 argmax of the reference logits.
    """

    topk_logprobs: Tensor
    topk_ids: Tensor
    top1_prob: Tensor
    argmax: Tensor

    def __post_init__(self) -> None:
        lead = tuple(self.top1_prob.shape)
        if self.topk_logprobs.ndim != len(lead) + 1 or tuple(self.topk_logprobs.shape[:-1]) != lead:
            raise ValueError(
                f"ReferenceCache: topk_logprobs has shape {tuple(self.topk_logprobs.shape)}, expected "
                f"{lead} + (k,) to match top1_prob {lead}; build the cache with reference_cache_entries()."
            )
        if tuple(self.topk_ids.shape) != tuple(self.topk_logprobs.shape):
            raise ValueError(
                f"ReferenceCache: topk_ids shape {tuple(self.topk_ids.shape)} differs from topk_logprobs "
                f"shape {tuple(self.topk_logprobs.shape)}."
            )
        if tuple(self.argmax.shape) != lead:
            raise ValueError(f"ReferenceCache: argmax shape {tuple(self.argmax.shape)} differs from {lead}.")
        if self.topk_ids.dtype != torch.int64 or self.argmax.dtype != torch.int64:
            raise ValueError("ReferenceCache: topk_ids and argmax must be int64 token ids.")
        if self.topk_logprobs.shape[-1] < 1:
            raise ValueError("ReferenceCache: k must be at least 1.")

    @property
    def k(self) -> int:
        return int(self.topk_logprobs.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """Leading (position) shape."""
        return self.top1_prob.shape

    def to(self, device: torch.device | str) -> ReferenceCache:
        return ReferenceCache(
            self.topk_logprobs.to(device),
            self.topk_ids.to(device),
            self.top1_prob.to(device),
            self.argmax.to(device),
        )

    def as_dict(self) -> dict[str, Tensor]:
        """Plain tensors (e.g. for ``safetensors.torch.save_file``)."""
        return {
            "topk_logprobs": self.topk_logprobs,
            "topk_ids": self.topk_ids,
            "top1_prob": self.top1_prob,
            "argmax": self.argmax,
        }

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor]) -> ReferenceCache:
        return cls(tensors["topk_logprobs"], tensors["topk_ids"], tensors["top1_prob"], tensors["argmax"])


# --------------------------------------------------------------------------------------------
# Per-position computation
# --------------------------------------------------------------------------------------------


def positions_per_chunk(
    vocab_size: int,
    *,
    input_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """Number of positions processed at once so that a chunk's buffers fit in ``chunk_bytes``.

    A chunk of ``n`` positions uses three ``[n, V]`` compute-dtype buffers (log p, log q and a
    scratch buffer) and, when a mask selects rows of a dtype other than the compute dtype, one
    ``[n, V]`` input-dtype gather buffer; everything else is ``O(n)`` or ``O(n k)``.
    """
    item_c = torch.empty((), dtype=compute_dtype).element_size()
    item_i = torch.empty((), dtype=input_dtype).element_size()
    per_position = vocab_size * (_COMPUTE_BUFFERS * item_c + _INPUT_BUFFERS * item_i)
    return max(1, int(chunk_bytes) // max(1, per_position))


def _check_compute_dtype(compute_dtype: torch.dtype) -> None:
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}.")


def _check_logits(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of logits [..., V], got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of logits [..., V], got dtype {x.dtype}.")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}.")


def _check_top_k(top_k: int | None, vocab_size: int | None = None) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}.")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab_size}; use top_k <= V or None.")


def _flat_mask(mask: Tensor | None, lead_shape: torch.Size, device: torch.device) -> Tensor | None:
    """Flat indices of the counted positions, or None when every position counts."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor (True = count this position).")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(lead_shape)} "
            "(one entry per position)."
        )
    return mask.reshape(-1).to(device).nonzero().squeeze(1)


def _row_chunks(n_rows: int, idx: Tensor | None, step: int) -> Iterator[tuple[int, slice | Tensor]]:
    """Yield (offset into the counted positions, rows) with rows a slice or an index tensor."""
    total = n_rows if idx is None else int(idx.numel())
    for a in range(0, total, step):
        b = min(total, a + step)
        yield a, (slice(a, b) if idx is None else idx[a:b])


class _ChunkBuffers:
    """Preallocated ``[step, V]`` work buffers, reused by every chunk of one call.

    Reusing them (``out=`` and in-place ops only) keeps the extra memory at the budget whatever
    the allocator does with freed blocks: with fresh tensors per chunk, glibc's heap kept ~1 GB
    of freed chunk buffers on a [512, 256000] pair.
    """

    def __init__(
        self,
        rows: int,
        vocab: int,
        n_compute: int,
        compute_dtype: torch.dtype,
        gather_dtype: torch.dtype | None,
        device: torch.device,
    ) -> None:
        self.compute = [
            torch.empty(rows, vocab, dtype=compute_dtype, device=device) for _ in range(n_compute)
        ]
        self.gather = (
            None if gather_dtype is None else torch.empty(rows, vocab, dtype=gather_dtype, device=device)
        )


def _log_softmax_rows(
    flat: Tensor,
    rows: slice | Tensor,
    out: Tensor,
    scratch: Tensor,
    gather: Tensor | None,
    name: str,
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Write the log-softmax of the selected rows of ``flat`` into ``out`` (compute dtype).

    Returns ``(argmax, log_s)`` per row: the argmax of the raw logits and
    ``log_s = log sum_v exp(x_v - max x)``, so that the top-1 log-probability is exactly ``-log_s``.
    ``scratch`` (compute dtype, same shape as ``out``) is overwritten. Selected rows of another
    dtype than ``out`` go through ``gather``; the subtraction of the row maximum is evaluated in
    the wider of the two dtypes, so low-precision logits are never rounded in their own dtype.

    Raises ValueError if a row holds NaN or an infinity (amax/amin propagate NaN).
    """
    if isinstance(rows, slice):
        raw = flat[rows]
    elif flat.dtype == out.dtype:
        raw = torch.index_select(flat, 0, rows, out=out)
    else:
        assert gather is not None
        raw = torch.index_select(flat, 0, rows, out=gather[: out.shape[0]])
    hi = raw.amax(dim=-1, keepdim=True)
    lo = raw.amin(dim=-1, keepdim=True)
    finite = (torch.isfinite(hi) & torch.isfinite(lo)).squeeze(-1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().squeeze(1)
        first = int(bad[0])
        flat_pos = (rows.start + first) if isinstance(rows, slice) else int(rows[first])
        raise ValueError(
            f"{name} contains NaN or Inf logits at {int(bad.numel())} position(s) of a chunk (first at flat "
            f"position {flat_pos}, counted position {offset + first}). Check the model's numerics (fp16 "
            "overflow?) or exclude those positions with mask=."
        )
    arg = raw.argmax(dim=-1)  # before out (which raw may be) is overwritten
    torch.sub(raw, hi.to(out.dtype), out=out)
    torch.exp(out, out=scratch)
    log_s = scratch.sum(dim=-1).log_()
    out.sub_(log_s.unsqueeze(-1))
    return arg, log_s


def _topk_kl(topk_logprobs: Tensor, topk_ids: Tensor, log_q: Tensor) -> Tensor:
    """sum over the given tokens of p_ref * (log p_ref - log q), full-vocabulary log-probs."""
    return (topk_logprobs.exp() * (topk_logprobs - log_q.gather(-1, topk_ids))).sum(dim=-1)


def _gather_dtype(
    mask_idx: Tensor | None, input_dtypes: tuple[torch.dtype, ...], compute_dtype: torch.dtype
) -> torch.dtype | None:
    if mask_idx is None:
        return None
    other = [d for d in input_dtypes if d != compute_dtype]
    return max(other, key=lambda d: torch.empty((), dtype=d).element_size()) if other else None


@torch.no_grad()
def position_stats(
    ref_logits: Tensor,
    q_logits: Tensor,
    mask: Tensor | None = None,
    *,
    top_k: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> PositionStats:
    """Every per-position quantity of the metrics for one pair of logits ``[..., V]``.

    Positions are processed in chunks of :func:`positions_per_chunk` rows through preallocated
    buffers: besides the inputs, about ``chunk_bytes`` (plus ``O(N k)`` outputs) is allocated.
    The log-softmax of each model is computed once per chunk (``x - max - log sum exp``).
    ``mask`` (bool, the logits' leading shape, True = count) selects the positions; the outputs
    are flat over the selected positions, in order. Logits at excluded positions are not read.
    Non-contiguous logits are reshaped with ``reshape`` (which copies them): pass contiguous ones.

    Raises:
        ValueError: shapes differ, NaN/Inf logits at a counted position, bad ``top_k``/``mask``.
    """
    _check_logits(ref_logits, "ref_logits")
    _check_logits(q_logits, "q_logits")
    _check_compute_dtype(compute_dtype)
    if ref_logits.shape != q_logits.shape:
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} and q_logits {tuple(q_logits.shape)} must have the same "
            "shape [..., V]; cut both to the same positions and vocabulary."
        )
    if ref_logits.device != q_logits.device:
        raise ValueError(
            f"ref_logits on {ref_logits.device} and q_logits on {q_logits.device}: move them together."
        )
    vocab = int(ref_logits.shape[-1])
    _check_top_k(top_k, vocab)
    dev = ref_logits.device
    idx = _flat_mask(mask, ref_logits.shape[:-1], dev)
    r_flat = ref_logits.reshape(-1, vocab)
    q_flat = q_logits.reshape(-1, vocab)
    n_total = r_flat.shape[0] if idx is None else int(idx.numel())
    in_dtype = ref_logits.dtype if ref_logits.element_size() >= q_logits.element_size() else q_logits.dtype
    step = positions_per_chunk(
        vocab, input_dtype=in_dtype, compute_dtype=compute_dtype, chunk_bytes=chunk_bytes
    )

    top1 = torch.empty(n_total, dtype=compute_dtype, device=dev)
    match = torch.empty(n_total, dtype=torch.bool, device=dev)
    kl = torch.empty(n_total, dtype=compute_dtype, device=dev)
    kl_topk = torch.empty(n_total, dtype=compute_dtype, device=dev) if top_k is not None else None
    if n_total:
        gdt = _gather_dtype(idx, (ref_logits.dtype, q_logits.dtype), compute_dtype)
        buf = _ChunkBuffers(min(step, n_total), vocab, 3, compute_dtype, gdt, dev)
    for offset, rows in _row_chunks(r_flat.shape[0], idx, step):
        out = slice(
            offset, offset + (rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel()))
        )
        n = out.stop - out.start
        log_p, log_q, scratch = (b[:n] for b in buf.compute)
        arg_r, log_s = _log_softmax_rows(r_flat, rows, log_p, scratch, buf.gather, "ref_logits", offset)
        arg_q, _ = _log_softmax_rows(q_flat, rows, log_q, scratch, buf.gather, "q_logits", offset)
        match[out] = arg_r == arg_q
        top1[out] = log_s.neg_().exp_()
        if kl_topk is not None:
            tl, ti = log_p.topk(top_k, dim=-1)
            kl_topk[out] = _topk_kl(tl, ti, log_q)
        torch.sub(log_p, log_q, out=scratch)
        scratch.mul_(log_p.exp_())  # log_p becomes p in place
        kl[out] = scratch.sum(dim=-1)
    return PositionStats(ref_top1_prob=top1, top1_match=match, kl=kl, kl_topk=kl_topk, top_k=top_k)


@torch.no_grad()
def reference_cache_entries(
    ref_logits: Tensor,
    k: int,
    *,
    compute_dtype: torch.dtype = torch.float32,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ReferenceCache:
    """Top-k cache of reference logits ``[..., V]`` (every position), computed in chunks.

    Use the same ``compute_dtype`` here and in the metrics: then the cached path reproduces the
    direct path's top-k KL, top-1 agreement and confidence selection.

    Raises:
        ValueError: NaN/Inf logits, ``k`` not in ``[1, V]``.
    """
    _check_logits(ref_logits, "ref_logits")
    _check_compute_dtype(compute_dtype)
    vocab = int(ref_logits.shape[-1])
    _check_top_k(k, vocab)
    lead = ref_logits.shape[:-1]
    r_flat = ref_logits.reshape(-1, vocab)
    step = positions_per_chunk(
        vocab, input_dtype=ref_logits.dtype, compute_dtype=compute_dtype, chunk_bytes=chunk_bytes
    )
    n = r_flat.shape[0]
    dev = ref_logits.device
    topk_logprobs = torch.empty(n, k, dtype=compute_dtype, device=dev)
    topk_ids = torch.empty(n, k, dtype=torch.int64, device=dev)
    top1 = torch.empty(n, dtype=compute_dtype, device=dev)
    argmax = torch.empty(n, dtype=torch.int64, device=dev)
    if n:
        buf = _ChunkBuffers(min(step, n), vocab, 2, compute_dtype, None, dev)
    for offset, rows in _row_chunks(n, None, step):
        m = rows.stop - rows.start
        log_p, scratch = (b[:m] for b in buf.compute)
        arg, log_s = _log_softmax_rows(r_flat, rows, log_p, scratch, None, "ref_logits", offset)
        argmax[rows] = arg
        top1[rows] = log_s.neg_().exp_()
        torch.topk(log_p, k, dim=-1, out=(topk_logprobs[rows], topk_ids[rows]))
    return ReferenceCache(
        topk_logprobs=topk_logprobs.reshape(*lead, k),
        topk_ids=topk_ids.reshape(*lead, k),
        top1_prob=top1.reshape(lead),
        argmax=argmax.reshape(lead),
    )


@torch.no_grad()
def position_stats_from_cache(
    cache: ReferenceCache,
    q_logits: Tensor,
    mask: Tensor | None = None,
    *,
    top_k: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> PositionStats:
    """:func:`position_stats` with the reference given as a :class:`ReferenceCache`.

    ``kl`` is ``None`` (the full-vocabulary KL needs the full reference). ``top_k`` may be any
    value up to ``cache.k`` (the cache's first ``top_k`` columns are used).
    """
    if not isinstance(cache, ReferenceCache):
        raise ValueError(
            f"cache must be a ReferenceCache (see reference_cache_entries), got {type(cache).__name__}."
        )
    _check_logits(q_logits, "q_logits")
    _check_compute_dtype(compute_dtype)
    vocab = int(q_logits.shape[-1])
    _check_top_k(top_k, vocab)
    if tuple(q_logits.shape[:-1]) != tuple(cache.shape):
        raise ValueError(
            f"q_logits positions {tuple(q_logits.shape[:-1])} differ from the cache's {tuple(cache.shape)}; "
            "the cache must come from the same batch of positions."
        )
    if top_k is not None and top_k > cache.k:
        raise ValueError(f"top_k={top_k} needs a cache with k >= {top_k}, this one has k={cache.k}.")
    dev = q_logits.device
    cache = cache.to(dev)
    idx = _flat_mask(mask, q_logits.shape[:-1], dev)
    q_flat = q_logits.reshape(-1, vocab)
    c_lp = cache.topk_logprobs.reshape(-1, cache.k)
    c_id = cache.topk_ids.reshape(-1, cache.k)
    c_top1 = cache.top1_prob.reshape(-1)
    c_arg = cache.argmax.reshape(-1)
    if c_id.numel() and (int(c_id.min()) < 0 or int(c_id.max()) >= vocab):
        raise ValueError(f"cache token ids fall outside [0, {vocab}): the cache is for another vocabulary.")
    if idx is not None:
        c_lp, c_id, c_top1, c_arg = (t.index_select(0, idx) for t in (c_lp, c_id, c_top1, c_arg))
    n_total = int(c_arg.numel())
    step = positions_per_chunk(
        vocab, input_dtype=q_logits.dtype, compute_dtype=compute_dtype, chunk_bytes=chunk_bytes
    )

    match = torch.empty(n_total, dtype=torch.bool, device=dev)
    kl_topk = torch.empty(n_total, dtype=compute_dtype, device=dev) if top_k is not None else None
    if n_total:
        gdt = _gather_dtype(idx, (q_logits.dtype,), compute_dtype)
        buf = _ChunkBuffers(min(step, n_total), vocab, 2, compute_dtype, gdt, dev)
    for offset, rows in _row_chunks(q_flat.shape[0], idx, step):
        n = rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())
        out = slice(offset, offset + n)
        log_q, scratch = (b[:n] for b in buf.compute)
        arg_q, _ = _log_softmax_rows(q_flat, rows, log_q, scratch, buf.gather, "q_logits", offset)
        match[out] = c_arg[out] == arg_q
        if kl_topk is not None:
            kl_topk[out] = _topk_kl(c_lp[out, :top_k].to(compute_dtype), c_id[out, :top_k], log_q)
    return PositionStats(
        ref_top1_prob=c_top1.to(compute_dtype),
        top1_match=match,
        kl=None,
        kl_topk=kl_topk,
        top_k=top_k,
    )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

RefInput = Tensor | ReferenceCache | PositionStats


class _PositionMetric(Metric):
    """Shared input handling: raw logits, a ReferenceCache or precomputed PositionStats."""

    is_differentiable = False
    full_state_update = False
    needs_full_kl = False

    def __init__(
        self,
        *,
        top_k: int | None = None,
        confident_only: bool = False,
        confidence_threshold: float = 0.5,
        compute_dtype: torch.dtype = torch.float32,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_top_k(top_k)
        _check_compute_dtype(compute_dtype)
        if not 0.0 <= float(confidence_threshold) <= 1.0:
            raise ValueError(f"confidence_threshold must lie in [0, 1], got {confidence_threshold}.")
        if int(chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}.")
        self.top_k = top_k
        self.confident_only = bool(confident_only)
        self.confidence_threshold = float(confidence_threshold)
        self.compute_dtype = compute_dtype
        self.chunk_bytes = int(chunk_bytes)

    def supports(self, stats: PositionStats) -> bool:
        """Whether this metric can accumulate from ``stats``."""
        if self.needs_full_kl and stats.kl is None:
            return False
        return not (self.top_k is not None and stats.top_k != self.top_k)

    def _stats(self, ref: RefInput, q_logits: Tensor | None, mask: Tensor | None) -> PositionStats:
        opts = {"top_k": self.top_k, "compute_dtype": self.compute_dtype, "chunk_bytes": self.chunk_bytes}
        if isinstance(ref, PositionStats):
            if q_logits is not None or mask is not None:
                raise ValueError(
                    "update(PositionStats) takes no q_logits or mask: the stats already hold them."
                )
            stats = ref
        elif isinstance(ref, ReferenceCache):
            if q_logits is None:
                raise ValueError("update(cache, q_logits, mask=None) needs the candidate's logits q_logits.")
            if self.needs_full_kl:
                raise ValueError(
                    f"{type(self).__name__} without top_k is the full-vocabulary KL and needs the full reference "
                    "logits; a ReferenceCache supports top-k KL, top-1 agreement and the confidence selection."
                )
            stats = position_stats_from_cache(ref, q_logits, mask, **opts)
        else:
            if q_logits is None:
                raise ValueError("update(ref_logits, q_logits, mask=None) needs both logits tensors.")
            stats = position_stats(ref, q_logits, mask, **opts)
        if not self.supports(stats):
            if self.needs_full_kl and stats.kl is None:
                raise ValueError(
                    f"{type(self).__name__}: these stats come from a cache and carry no full KL."
                )
            raise ValueError(
                f"{type(self).__name__}(top_k={self.top_k}) got stats computed with top_k={stats.top_k}; "
                "compute them with the same top_k."
            )
        return stats

    def _selected(self, stats: PositionStats) -> Tensor | None:
        """Bool selection of counted positions, or None for all of them."""
        if not self.confident_only:
            return None
        # Compared in float64 so that the threshold is not rounded to the compute dtype.
        return stats.ref_top1_prob.to(torch.float64) > self.confidence_threshold

    def update(
        self, ref_logits: RefInput, q_logits: Tensor | None = None, mask: Tensor | None = None
    ) -> None:
        """Accumulate one batch.

        Args:
            ref_logits: reference logits ``[..., V]``, or a :class:`ReferenceCache` of them, or
                :class:`PositionStats` already computed (then no ``q_logits``/``mask``).
            q_logits: candidate logits ``[..., V]`` (same positions).
            mask: bool, the logits' leading shape; False excludes a position (padding, BOS).
        """
        self._accumulate(self._stats(ref_logits, q_logits, mask))

    def update_from_cache(self, cache: ReferenceCache, q_logits: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate one batch whose reference is a :class:`ReferenceCache`."""
        if not isinstance(cache, ReferenceCache):
            raise ValueError(f"update_from_cache needs a ReferenceCache, got {type(cache).__name__}.")
        self.update(cache, q_logits, mask)

    def _accumulate(self, stats: PositionStats) -> None:
        raise NotImplementedError


class TokenKLDivergence(_PositionMetric):
    """Mean per-position ``KL(P_ref || P_q)`` (nats), full vocabulary or top-k (module docstring).

    Args:
        top_k: ``None`` for the full-vocabulary KL; ``k`` for the KL restricted to the reference's
            top-``k`` tokens (a partial sum of full-vocabulary terms, what vLLM's top-k logprobs allow).
        confident_only: count only positions whose reference top-1 probability is
            ``> confidence_threshold``.
        confidence_threshold: default 0.5.
        compute_dtype: float32 (the protocol) or float64.
        chunk_bytes: working-memory budget per chunk.

    ``compute()`` returns a float64 scalar, ``nan`` when no position was counted.
    """

    higher_is_better = False
    plot_lower_bound = 0.0

    def __init__(
        self,
        top_k: int | None = None,
        confident_only: bool = False,
        confidence_threshold: float = 0.5,
        compute_dtype: torch.dtype = torch.float32,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **kwargs,
    ) -> None:
        super().__init__(
            top_k=top_k,
            confident_only=confident_only,
            confidence_threshold=confidence_threshold,
            compute_dtype=compute_dtype,
            chunk_bytes=chunk_bytes,
            **kwargs,
        )
        self.needs_full_kl = top_k is None
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _accumulate(self, stats: PositionStats) -> None:
        values = stats.kl if self.top_k is None else stats.kl_topk
        assert values is not None  # guaranteed by supports()
        sel = self._selected(stats)
        if sel is not None:
            values = values[sel]
        self.kl_sum += values.to(torch.float64).sum().to(self.kl_sum.device)
        self.count += int(values.numel())

    def compute(self) -> Tensor:
        return self.kl_sum / self.count.to(torch.float64)


class Top1Agreement(_PositionMetric):
    """Fraction of positions where ``argmax(ref) == argmax(q)``.

    Args:
        confident_only: count only positions whose reference top-1 probability is
            ``> confidence_threshold``.
        confidence_threshold: default 0.5.
        compute_dtype, chunk_bytes: as in :class:`TokenKLDivergence`.

    ``compute()`` returns a float64 scalar in [0, 1], ``nan`` when no position was counted.
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(
        self,
        confident_only: bool = False,
        confidence_threshold: float = 0.5,
        compute_dtype: torch.dtype = torch.float32,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **kwargs,
    ) -> None:
        super().__init__(
            top_k=None,
            confident_only=confident_only,
            confidence_threshold=confidence_threshold,
            compute_dtype=compute_dtype,
            chunk_bytes=chunk_bytes,
            **kwargs,
        )
        self.add_state("match", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _accumulate(self, stats: PositionStats) -> None:
        m = stats.top1_match
        sel = self._selected(stats)
        if sel is not None:
            m = m[sel]
        self.match += m.sum().to(self.match.device)
        self.count += int(m.numel())

    def compute(self) -> Tensor:
        return self.match.to(torch.float64) / self.count.to(torch.float64)


class PositionCount(_PositionMetric):
    """Number of counted positions (all, or confident ones); ``compute()`` is an int64 scalar."""

    higher_is_better = None

    def __init__(
        self,
        confident_only: bool = False,
        confidence_threshold: float = 0.5,
        compute_dtype: torch.dtype = torch.float32,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **kwargs,
    ) -> None:
        super().__init__(
            top_k=None,
            confident_only=confident_only,
            confidence_threshold=confidence_threshold,
            compute_dtype=compute_dtype,
            chunk_bytes=chunk_bytes,
            **kwargs,
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _accumulate(self, stats: PositionStats) -> None:
        sel = self._selected(stats)
        self.count += stats.num_positions if sel is None else int(sel.sum())

    def compute(self) -> Tensor:
        return self.count.clone()


class QuantEvalMetrics(MetricCollection):
    """The report's metrics from one shared pass over each logits pair.

    Members (names as in the report; ``prefix``/``postfix`` are added by MetricCollection):
    ``kl_all``, ``kl_conf``, ``kl_top{top_k}_conf`` (``kl_top20_conf`` by default),
    ``top1_conf``, ``top1_all``, ``n_positions``, ``n_confident``.

    ``update(ref_logits, q_logits, mask=None)`` computes :func:`position_stats` once (one
    ``log_softmax`` per model per chunk) and every member accumulates from it.
    ``update(cache, q_logits, mask=None)`` / ``update_from_cache`` take a :class:`ReferenceCache`
    and update every member except ``kl_all`` and ``kl_conf`` (full-vocabulary KL).
    """

    def __init__(
        self,
        top_k: int = 20,
        confidence_threshold: float = 0.5,
        compute_dtype: torch.dtype = torch.float32,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        prefix: str | None = None,
        postfix: str | None = None,
    ) -> None:
        _check_top_k(top_k)
        common = {
            "confidence_threshold": confidence_threshold,
            "compute_dtype": compute_dtype,
            "chunk_bytes": chunk_bytes,
        }
        metrics = {
            "kl_all": TokenKLDivergence(**common),
            "kl_conf": TokenKLDivergence(confident_only=True, **common),
            f"kl_top{top_k}_conf": TokenKLDivergence(top_k=top_k, confident_only=True, **common),
            "top1_conf": Top1Agreement(confident_only=True, **common),
            "top1_all": Top1Agreement(**common),
            "n_positions": PositionCount(**common),
            "n_confident": PositionCount(confident_only=True, **common),
        }
        super().__init__(metrics, prefix=prefix, postfix=postfix, compute_groups=False)
        self.top_k = top_k
        self.compute_dtype = compute_dtype
        self.chunk_bytes = int(chunk_bytes)

    def _shared_stats(self, ref: RefInput, q_logits: Tensor | None, mask: Tensor | None) -> PositionStats:
        opts = {"top_k": self.top_k, "compute_dtype": self.compute_dtype, "chunk_bytes": self.chunk_bytes}
        if isinstance(ref, PositionStats):
            if q_logits is not None or mask is not None:
                raise ValueError(
                    "update(PositionStats) takes no q_logits or mask: the stats already hold them."
                )
            return ref
        if q_logits is None:
            raise ValueError(
                "update(ref_logits_or_cache, q_logits, mask=None) needs the candidate's logits q_logits."
            )
        if isinstance(ref, ReferenceCache):
            return position_stats_from_cache(ref, q_logits, mask, **opts)
        return position_stats(ref, q_logits, mask, **opts)

    def update(
        self, ref_logits: RefInput, q_logits: Tensor | None = None, mask: Tensor | None = None
    ) -> None:
        """Accumulate one batch (see the class docstring)."""
        stats = self._shared_stats(ref_logits, q_logits, mask)
        for m in self.values(copy_state=False):
            if m.supports(stats):
                m.update(stats)

    def update_from_cache(self, cache: ReferenceCache, q_logits: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate one batch whose reference is a :class:`ReferenceCache`."""
        if not isinstance(cache, ReferenceCache):
            raise ValueError(f"update_from_cache needs a ReferenceCache, got {type(cache).__name__}.")
        self.update(cache, q_logits, mask)

    def forward(
        self, ref_logits: RefInput, q_logits: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Accumulate one batch and return the members' values on that batch alone."""
        stats = self._shared_stats(ref_logits, q_logits, mask)
        return {
            self._set_name(str(name)): m(stats)
            for name, m in self.items(keep_base=True, copy_state=False)
            if m.supports(stats)
        }
