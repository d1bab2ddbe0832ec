"""Per-token empirical Fisher statistics of Linear layers (pure maths, no Lightning).

For a Linear with weight ``W [out, in]``, per counted token ``t`` with input ``x_t [in]`` and output
gradient ``g_t [out]`` of the *sum-reduced* loss ``L = Σ_s ℓ_s``, the weight gradient decomposes by
position as ``∇_W L = Σ_t g_t x_tᵀ``. With ``N`` the number of counted (loss) tokens, the
:class:`FisherAccumulator` keeps float64 sums of:

* ``h_trace  = Σ_t ‖g_t‖²·‖x_t‖² / N`` (``= Σ_t ‖g_t x_tᵀ‖²_F / N``, exact: the Frobenius norm of a
  rank-one matrix is the product of the norms);
* ``diag_out[o] = Σ_t g_{t,o}²·‖x_t‖² / N`` and ``diag_in[i] = Σ_t ‖g_t‖²·x_{t,i}² / N``: the row and
  column sums of the per-element diagonal ``Σ_t (g_t x_tᵀ)² / N``; both sum to ``h_trace``;
* per format ``f``: ``output_error[f] = ½ Σ_t Σ_o g_{t,o}²·(y_t − ŷ_t)_o² / N`` with ``y_t = W x_t``
  and ``ŷ_t = Q_f(W)·Q_{f,a}(x_t)``: the output-space error of serving the Linear in ``f``,
  activation quantisation included (see :func:`quantized_output_error`).

Every step costs a few matrix-vector products per Linear: ``‖x_t‖²`` and ``‖g_t‖²`` are row norms,
``diag_out = (g²)ᵀ·‖x‖²`` and ``diag_in = (x²)ᵀ·‖g‖²``. Per-step values are computed in fp32 and added
to float64 totals. Contributions are staged per batch and committed with the batch's token count
(:meth:`FisherAccumulator.commit`), so a batch whose gradients overflowed (fp16) is dropped whole.

The output-space error costs one matmul per format per Linear and token (as much as the Linear's
forward pass) plus the activation fake-quant. It can be estimated on a random subset of ``k`` of the
``S`` positions of every sequence (:func:`token_subset`), the sum rescaled by ``S / k``: unbiased
over the draw of the subsets, and ``k / S`` of the cost. The activation global scale stays that of
the whole sequence (:func:`fake_quant_activation_per_sequence`), so a sampled token is quantized
exactly as in the full computation.

On CUDA the output-space error sum is one fused Triton pass (:func:`output_error_sum`,
:mod:`pq_lightning.kernels.probe_triton`; off with ``PQ_TRITON=0``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .formats import QuantFormat, get_format
from .kernels import triton_kernels_enabled
from .sensitivity import LinearSensitivity, Sensitivity

Shape = tuple[int, int]

#: How the activation global scale of NVFP4 (W4A4) is chosen when the probe emulates the serving
#: kernel: from each calibration sequence's own amax. Independent of how sequences are batched, so
#: gradient accumulation, batch size and the number of ranks do not change the result.
ACTIVATION_SCALE_RULE = "per_sequence_amax"


# --------------------------------------------------------------------------------------------------
# Per-step quantities
# --------------------------------------------------------------------------------------------------


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[batch, seq, in]``: a 3-D input as is, any other shape as one sequence."""
    return x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])


def flat_positions(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``positions [batch, k]`` as indices into the ``batch * seq_len`` flattened tokens, ``[batch * k]``."""
    offsets = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1) * seq_len
    return (positions + offsets).reshape(-1)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows ``positions[b]`` of every sequence ``b`` of ``x`` (see :func:`as_sequences`): ``[batch, k, in]``."""
    seqs = as_sequences(x)
    if positions.dim() != 2 or positions.shape[0] != seqs.shape[0]:
        raise ValueError(f"positions must be [batch={seqs.shape[0]}, k], got {tuple(positions.shape)}")
    rows = seqs.reshape(-1, seqs.shape[-1]).index_select(0, flat_positions(positions, seqs.shape[1]))
    return rows.view(positions.shape[0], positions.shape[1], seqs.shape[-1])


def fake_quant_activation_per_sequence(
    x: torch.Tensor, fmt: QuantFormat, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """``fmt``'s activation fake-quant of every sequence of ``x``, optionally at some positions only.

    Args:
        x: a Linear's input ``[batch, seq, in]``; any other shape is one sequence ``[..., in]``.
        fmt: the format (identity when it does not quantize activations).
        positions: ``[batch, k]`` positions (long) to return; ``None`` returns every position.

    Every sequence gets the activation global scale of its own amax over *all* its positions
    (:data:`ACTIVATION_SCALE_RULE`), so the rows returned for ``positions`` equal the same rows of the
    full result exactly. A format without ``static_input_scale`` has no sequence-level parameter:
    its activation scales come from each token alone (FP8 per token), and all sequences go through
    one call.

    Returns ``[batch, seq, in]``, or ``[batch, k, in]`` with ``positions``, in ``x``'s dtype (a 3-D
    result even for a non-3-D ``x``, whose one sequence is ``x.reshape(1, -1, in)``).
    """
    seqs = as_sequences(x)
    rows = None if positions is None else gather_positions(seqs, positions)
    if not fmt.quantizes_activations:
        return seqs if positions is None else rows
    if not fmt.static_input_scale:
        return fmt.fake_quant_activation(seqs if positions is None else rows)
    if positions is None:
        return torch.stack([fmt.fake_quant_activation(seq) for seq in seqs.unbind(0)])
    out = []
    for seq, sel in zip(seqs.unbind(0), rows.unbind(0), strict=True):
        lo, hi = torch.aminmax(seq.detach())
        gs = fmt.calibrate_input_global_scale(torch.maximum(lo.abs(), hi.abs()).float())
        out.append(fmt.fake_quant_activation(sel, gs))
    return torch.stack(out)


def quantized_output_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    qweight: torch.Tensor,
    fmt: QuantFormat,
    *,
    y: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y − ŷ`` in fp32 for every token: ``y = W x``, ``ŷ = Q(W)·Q_a(x)``, flattened to ``[T, out]``.

    Args:
        x: the Linear's input ``[..., in]``. A 3-D input is ``[batch, seq, in]``: the activation
            fake-quant runs per sequence (``fmt.fake_quant_activation`` without a global scale takes
            the amax of what it is given, see :data:`ACTIVATION_SCALE_RULE`); any other shape is
            treated as one sequence.
        weight: ``W [out, in]`` (any dtype, used in fp32).
        qweight: ``fmt.fake_quant(W)``, fp32 (cache it: it does not change between steps).
        fmt: the format whose activation quantisation is emulated.
        y: optional ``W x`` already in fp32 (without bias), for the returned tokens: ``[..., out]``
            for all of ``x``'s tokens, or ``[batch * k, out]`` with ``positions``; computed when ``None``.
        positions: ``[batch, k]`` positions of every sequence to compute (see :func:`token_subset`);
            the result is then ``[batch * k, out]``, rows in ``positions`` order.
    """
    xq = fake_quant_activation_per_sequence(x, fmt, positions)
    xq2 = xq.reshape(-1, x.shape[-1]).float()
    if y is None:
        x2 = x if positions is None else gather_positions(x, positions)
        y2 = x2.reshape(-1, x.shape[-1]).float() @ weight.float().t()
    else:
        y2 = y.reshape(-1, y.shape[-1]).float()
    return torch.addmm(y2, xq2, qweight.float().t(), alpha=-1)


def tokens_per_sequence(spec: int | float | None, seq_len: int) -> int:
    """How many of a sequence's ``seq_len`` positions the output-space error uses.

    ``spec``: ``None`` (all), a fraction in ``(0, 1]`` (``ceil(spec * seq_len)``), or a count ``>= 1``
    (at most ``seq_len``).
    """
    check_error_tokens(spec)
    if spec is None:
        return seq_len
    if isinstance(spec, float):
        return max(1, min(seq_len, math.ceil(spec * seq_len)))
    return min(int(spec), seq_len)


def check_error_tokens(spec: int | float | None) -> None:
    """Raise a ValueError unless ``spec`` is ``None``, a fraction in ``(0, 1]`` or an int ``>= 1``."""
    if spec is None:
        return
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise ValueError(
            f"output_error_tokens must be None (every token), a fraction in (0, 1] or a number of "
            f"positions per sequence >= 1, got {spec!r}"
        )
    if isinstance(spec, float) and not 0.0 < spec <= 1.0:
        raise ValueError(
            f"output_error_tokens as a fraction must lie in (0, 1], got {spec}; pass an int for a "
            "number of positions per sequence or None for every token"
        )
    if isinstance(spec, int) and spec < 1:
        raise ValueError(f"output_error_tokens as a number of positions must be >= 1, got {spec}")


def token_subset(seq_len: int, k: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``k`` distinct positions of ``range(seq_len)`` drawn uniformly without replacement, sorted.

    Deterministic for a ``seed`` (a CPU ``torch.Generator``), independent of the device. Each
    position is drawn with probability ``k / seq_len``, so ``seq_len / k`` times the sum of a
    quantity over the drawn positions is an unbiased estimate of its sum over all positions.
    """
    if not 1 <= k <= seq_len:
        raise ValueError(f"need 1 <= k <= seq_len, got k={k}, seq_len={seq_len}")
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    pos = torch.randperm(seq_len, generator=gen)[:k].sort().values
    return pos.to(device) if device is not None else pos


def output_error_sum(g2: torch.Tensor, e: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_r Σ_o g2[rows[r], o] · e[r, o]²``: the probe's output-space error sum (without the ½).

    Args:
        g2: squared output gradients ``g²`` ``[T, out]``, fp32.
        e: output errors ``y − ŷ`` ``[R, out]``, fp32, on ``g2``'s device.
        rows: long ``[R]``, the token (row of ``g2``) of each error row; ``None`` when ``R == T``.

    On CUDA (see :mod:`pq_lightning.kernels`) one Triton pass that materialises neither ``e²`` nor
    the gathered rows of ``g2`` (a float64 scalar: fp32 partial sums added in float64); elsewhere
    ``torch.dot`` of the gathered ``g2`` and ``e²`` (an fp32 scalar). The terms are the same fp32
    products; only the order of the sum differs.
    """
    if triton_kernels_enabled(e):
        from .kernels.probe_triton import weighted_square_sum_triton

        return weighted_square_sum_triton(g2, e, rows)
    g_err = g2 if rows is None else g2.index_select(0, rows.to(g2.device))
    return torch.dot(g_err.reshape(-1), e.square().reshape(-1))


@dataclass
class _LinearSums:
    """float64 running sums of one Linear (divide by the token count to get means)."""

    shape: Shape
    formats: tuple[str, ...]
    h_trace: torch.Tensor
    diag_out: torch.Tensor
    diag_in: torch.Tensor
    output_error: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def numel(shape: Shape, formats: Sequence[str]) -> int:
        return 1 + int(shape[0]) + int(shape[1]) + len(formats)

    @classmethod
    def view(cls, flat: torch.Tensor, shape: Shape, formats: Sequence[str]) -> _LinearSums:
        """Sums stored in ``flat`` (float64, :meth:`numel` long): trace, diag_out, diag_in, errors."""
        out_f, in_f = int(shape[0]), int(shape[1])
        return cls(
            shape=(out_f, in_f),
            formats=tuple(formats),
            h_trace=flat[0],
            diag_out=flat[1 : 1 + out_f],
            diag_in=flat[1 + out_f : 1 + out_f + in_f],
            output_error={f: flat[1 + out_f + in_f + i] for i, f in enumerate(formats)},
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.h_trace, self.diag_out, self.diag_in, *(self.output_error[f] for f in self.formats)]

    def add_(self, other: _LinearSums) -> None:
        for a, b in zip(self.tensors(), other.tensors(), strict=True):
            a.add_(b.to(a.device))


class FisherAccumulator:
    """Running per-token Fisher sums for a set of Linears.

    Args:
        shapes: ``{name: (out_features, in_features)}`` of every tracked Linear.
        formats: the format menu for the output-space error (names as in :func:`get_format`). A
            Linear only gets the formats whose ``supports(shape)`` is true.
        device: where the sums live (the Linears' device keeps per-step additions cheap).

    Use: for each backward, :meth:`update` every Linear with its inputs and output gradients (of the
    sum-reduced loss, or pass ``grad_scale`` to convert), then :meth:`commit` the batch with its
    number of loss tokens. At the end of a distributed run :meth:`all_reduce` (on every rank), then
    :meth:`finalize`.
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        formats: Sequence[str] = (),
        device: torch.device | str | None = None,
    ) -> None:
        if not shapes:
            raise ValueError("FisherAccumulator needs at least one Linear to track")
        self.formats: tuple[str, ...] = tuple(get_format(f).name for f in formats)
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must be unique, got {list(formats)}")
        self.device = device
        self.shapes: dict[str, Shape] = {}
        self.linear_formats: dict[str, tuple[str, ...]] = {}
        for name, shape in shapes.items():
            if len(shape) != 2:
                raise ValueError(f"{name}: Linear weights are 2-D [out, in], got shape {tuple(shape)}")
            shp = (int(shape[0]), int(shape[1]))
            self.shapes[name] = shp
            self.linear_formats[name] = tuple(f for f in self.formats if get_format(f).supports(shp))
        # every sum lives in one float64 buffer (and the staged batch in another of the same layout), so
        # staging, the finiteness check and the commit are a few operations per batch, not per Linear
        self._flat, self._sums = self._layout(device)
        self._pending_flat, self._pending_sums = self._layout(device)
        self._pending: set[str] = set()
        self.n_tokens: int = 0
        self.n_batches: int = 0
        self.n_dropped_batches: int = 0

    def _layout(self, device: torch.device | str | None) -> tuple[torch.Tensor, dict[str, _LinearSums]]:
        sizes = [_LinearSums.numel(s, self.linear_formats[n]) for n, s in self.shapes.items()]
        flat = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        views, offset = {}, 0
        for (name, shape), size in zip(self.shapes.items(), sizes, strict=True):
            views[name] = _LinearSums.view(flat[offset : offset + size], shape, self.linear_formats[name])
            offset += size
        return flat, views

    # ---- per step ------------------------------------------------------------------------
    def update(
        self,
        name: str,
        x: torch.Tensor,
        g: torch.Tensor,
        y_err_by_format: Mapping[str, torch.Tensor] | None = None,
        *,
        grad_scale: float = 1.0,
        error_rows: torch.Tensor | None = None,
        error_scale: float = 1.0,
    ) -> None:
        """Stage one backward's contribution of Linear ``name``.

        Args:
            x: inputs ``[..., in]`` (flattened to ``[T, in]``).
            g: output gradients ``[..., out]`` matching ``x``'s tokens.
            y_err_by_format: ``{format: y − ŷ [..., out]}`` for (a subset of) this Linear's formats:
                for every token, or for the tokens ``error_rows`` only.
            grad_scale: the factor that turns ``g`` into the gradient of the sum-reduced loss
                (quadratic quantities are multiplied by its square).
            error_rows: flat indices (into the ``T`` tokens) of the rows of ``y_err_by_format``;
                ``None`` when they cover every token.
            error_scale: factor on the output-space error sums (``S / k`` for ``k`` of ``S``
                positions drawn per sequence, which keeps the estimate unbiased).
        """
        if name not in self._sums:
            raise KeyError(f"{name!r} is not a tracked Linear; tracked: {list(self._sums)[:6]}...")
        out_f, in_f = self.shapes[name]
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        g2 = g.detach().reshape(-1, g.shape[-1]).float().square()
        if x2.shape != (g2.shape[0], in_f) or g2.shape[1] != out_f:
            raise ValueError(
                f"{name}: inputs {tuple(x.shape)} and output gradients {tuple(g.shape)} do not match the "
                f"Linear's shape [out={out_f}, in={in_f}]"
            )
        xsq = x2.square()
        x_norm = xsq.sum(1)  # [T]
        g_norm = g2.sum(1)  # [T]
        c2 = float(grad_scale) ** 2
        pend = self._pending_sums[name]
        self._pending.add(name)
        dev = self._pending_flat.device
        # fp32 values added to float64 sums (in-place type promotion: computed in float64)
        pend.h_trace.add_(torch.dot(g_norm, x_norm).to(dev), alpha=c2)
        pend.diag_out.add_((g2.t() @ x_norm).to(dev), alpha=c2)
        pend.diag_in.add_((xsq.t() @ g_norm).to(dev), alpha=c2)
        if not y_err_by_format:
            return
        if triton_kernels_enabled(g2):  # the kernel gathers the rows itself
            g_err, rows = g2, None if error_rows is None else error_rows.to(g2.device)
            n_err = g2.shape[0] if rows is None else rows.numel()
        else:
            g_err, rows = (g2 if error_rows is None else g2.index_select(0, error_rows.to(g2.device))), None
            n_err = g_err.shape[0]
        for fmt, err in y_err_by_format.items():
            fmt = get_format(fmt).name
            if fmt not in pend.output_error:
                raise ValueError(f"{name}: format {fmt!r} is not in its menu {list(pend.output_error)}")
            e = err.detach().reshape(-1, out_f).float()
            if e.shape[0] != n_err:
                raise ValueError(
                    f"{name}: {e.shape[0]} output-error rows for format {fmt!r} but {n_err} "
                    "tokens (pass error_rows when the error covers a subset of the tokens)"
                )
            pend.output_error[fmt].add_(
                output_error_sum(g_err, e, rows).to(dev), alpha=0.5 * c2 * error_scale
            )

    def commit(self, n_tokens: int) -> bool:
        """Add the staged batch to the totals with its ``n_tokens`` loss tokens.

        Returns ``False`` (and drops the batch) when a staged value is not finite, as happens on
        fp16 steps whose gradients overflowed (the grad scaler skips those optimizer steps too).
        """
        n_tokens = int(n_tokens)
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        staged, self._pending = self._pending, set()
        if staged:
            finite = bool(torch.isfinite(self._pending_flat).all())
            if finite:
                self._flat.add_(self._pending_flat)
            self._pending_flat.zero_()
            if not finite:
                self.n_dropped_batches += 1
                return False
        self.n_tokens += n_tokens
        self.n_batches += 1
        return True

    def discard_pending(self) -> None:
        """Forget a staged, uncommitted batch."""
        if self._pending:
            self._pending_flat.zero_()
        self._pending = set()

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    # ---- combine -------------------------------------------------------------------------
    def _check_compatible(self, other: FisherAccumulator) -> None:
        if self.shapes != other.shapes or self.linear_formats != other.linear_formats:
            raise ValueError("cannot merge Fisher sums of different Linears or format menus")

    def merge(self, other: FisherAccumulator) -> FisherAccumulator:
        """Add ``other``'s committed sums and counts into this accumulator (in place); returns self."""
        self._check_compatible(other)
        for name, s in self._sums.items():
            s.add_(other._sums[name])
        self.n_tokens += other.n_tokens
        self.n_batches += other.n_batches
        self.n_dropped_batches += other.n_dropped_batches
        return self

    def copy(self) -> FisherAccumulator:
        new = FisherAccumulator(self.shapes, self.formats, self.device)
        return new.merge(self)

    def all_reduce(self, process_group=None) -> FisherAccumulator:
        """A copy whose sums and counts are summed over all ranks of ``process_group``.

        One collective: every sum is flattened into a single float64 buffer (on the CPU for gloo,
        on the sums' device otherwise). Must be called on every rank. Without an initialised
        process group it returns a plain copy.
        """
        import torch.distributed as dist

        if self._pending:
            raise RuntimeError("commit() or discard_pending() the staged batch before all_reduce()")
        out = self.copy()
        if not (dist.is_available() and dist.is_initialized()):
            return out
        tensors = [t for s in out._sums.values() for t in s.tensors()]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        counts = torch.tensor([out.n_tokens, out.n_batches, out.n_dropped_batches], dtype=torch.float64)
        comm_device = torch.device("cpu") if dist.get_backend(process_group) == "gloo" else flat.device
        buf = torch.cat([flat.to(comm_device), counts.to(comm_device)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=process_group)
        buf = buf.cpu()
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(buf[offset : offset + n].reshape(t.shape))
            offset += n
        out.n_tokens, out.n_batches, out.n_dropped_batches = (int(round(float(v))) for v in buf[offset:])
        return out

    # ---- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Committed sums and counts (CPU tensors), enough to continue accumulating later."""
        return {
            "version": 1,
            "formats": list(self.formats),
            "n_tokens": self.n_tokens,
            "n_batches": self.n_batches,
            "n_dropped_batches": self.n_dropped_batches,
            "linears": {
                name: {
                    "shape": list(s.shape),
                    "h_trace": s.h_trace.cpu().clone(),
                    "diag_out": s.diag_out.cpu().clone(),
                    "diag_in": s.diag_in.cpu().clone(),
                    "output_error": {f: v.cpu().clone() for f, v in s.output_error.items()},
                }
                for name, s in self._sums.items()
            },
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore sums saved by :meth:`state_dict` (the tracked Linears and formats must match)."""
        if int(state.get("version", 0)) != 1:
            raise ValueError(f"unknown Fisher accumulator state version {state.get('version')!r}")
        saved = state["linears"]
        if set(saved) != set(self._sums) or list(state["formats"]) != list(self.formats):
            missing = sorted(set(self._sums) - set(saved))[:4]
            extra = sorted(set(saved) - set(self._sums))[:4]
            raise ValueError(
                "the saved Fisher sums were measured on other Linears or another format menu "
                f"(missing {missing}, unexpected {extra}, formats {state['formats']} vs {list(self.formats)}); "
                "resume with the same include/exclude/formats settings or start a fresh probe."
            )
        for name, s in self._sums.items():
            d = saved[name]
            if tuple(d["shape"]) != s.shape or set(d["output_error"]) != set(s.output_error):
                raise ValueError(f"{name}: saved shape/formats {d['shape']} differ from {s.shape}")
            s.h_trace.copy_(d["h_trace"])
            s.diag_out.copy_(d["diag_out"])
            s.diag_in.copy_(d["diag_in"])
            for f, v in d["output_error"].items():
                s.output_error[f].copy_(v)
        self.n_tokens = int(state["n_tokens"])
        self.n_batches = int(state.get("n_batches", 0))
        self.n_dropped_batches = int(state.get("n_dropped_batches", 0))
        self.discard_pending()

    # ---- result --------------------------------------------------------------------------
    def finalize(self, meta: Mapping | None = None) -> Sensitivity:
        """Means over the counted tokens as a :class:`Sensitivity` (``meta`` is copied into it)."""
        if self.n_tokens <= 0:
            raise ValueError(
                "no loss tokens were counted: the probe saw no training backward pass. Run it with "
                "Trainer.fit on data with at least one labelled token (and check max_tokens / limit_train_batches)."
            )
        n = float(self.n_tokens)
        linears = {}
        for name, s in self._sums.items():
            linears[name] = LinearSensitivity(
                name=name,
                shape=s.shape,
                h_trace=float(s.h_trace) / n,
                diag_out=(s.diag_out / n).cpu(),
                diag_in=(s.diag_in / n).cpu(),
                output_error={f: float(v) / n for f, v in s.output_error.items()},
                weight_numel=s.shape[0] * s.shape[1],
            )
        full_meta = {
            "n_tokens": self.n_tokens,
            "n_batches": self.n_batches,
            "n_dropped_batches": self.n_dropped_batches,
            "formats": list(self.formats),
            **dict(meta or {}),
        }
        return Sensitivity(linears=linears, meta=full_meta)

    def names(self) -> Iterable[str]:
        return self._sums.keys()
