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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .formats import QuantFormat, get_format
from .sensitivity import LinearSensitivity, Sensitivity

Shape = tuple[int, int]

#: How the activation global scale of NVFP4 (W4A4) is chosen when the probe emulates the serving
#: kernel: from each calibration sequence's own amax. Independent of how sequences are batched, so
#: gradient accumulation, batch size and the number of ranks do not change the result.
ACTIVATION_SCALE_RULE = "per_sequence_amax"


# --------------------------------------------------------------------------------------------------
# Per-step quantities
# --------------------------------------------------------------------------------------------------


def quantized_output_error(
    x: torch.Tensor,
    weight: torch.Tensor,
    qweight: torch.Tensor,
    fmt: QuantFormat,
    *,
    y: torch.Tensor | None = None,
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
        y: optional ``W x`` already in fp32 ``[..., out]`` (without bias); computed when ``None``.
    """
    if fmt.quantizes_activations:
        if x.dim() == 3:
            xq = torch.stack([fmt.fake_quant_activation(seq) for seq in x.unbind(0)])
        else:
            xq = fmt.fake_quant_activation(x)
    else:
        xq = x
    x2 = x.reshape(-1, x.shape[-1])
    xq2 = xq.reshape(-1, x.shape[-1]).float()
    y_hat = xq2 @ qweight.float().t()
    if y is None:
        y2 = x2.float() @ weight.float().t()
    else:
        y2 = y.reshape(-1, y.shape[-1]).float()
    return y2 - y_hat


@dataclass
class _LinearSums:
    """float64 running sums of one Linear (divide by the token count to get means)."""

    shape: Shape
    formats: tuple[str, ...]
    h_trace: torch.Tensor
    diag_out: torch.Tensor
    diag_in: torch.Tensor
    output_error: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def zeros(cls, shape: Shape, formats: Sequence[str], device: torch.device | str | None) -> _LinearSums:
        z = {"dtype": torch.float64, "device": device}
        return cls(
            shape=(int(shape[0]), int(shape[1])),
            formats=tuple(formats),
            h_trace=torch.zeros((), **z),
            diag_out=torch.zeros(int(shape[0]), **z),
            diag_in=torch.zeros(int(shape[1]), **z),
            output_error={f: torch.zeros((), **z) for f in formats},
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.h_trace, self.diag_out, self.diag_in, *(self.output_error[f] for f in self.formats)]

    def add_(self, other: _LinearSums) -> None:
        for a, b in zip(self.tensors(), other.tensors(), strict=True):
            a.add_(b.to(a.device))

    def zero_(self) -> None:
        for t in self.tensors():
            t.zero_()

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors())


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
        self._sums = {n: _LinearSums.zeros(s, self.linear_formats[n], device) for n, s in self.shapes.items()}
        self._pending: dict[str, _LinearSums] = {}
        self.n_tokens: int = 0
        self.n_batches: int = 0
        self.n_dropped_batches: int = 0

    # ---- per step ------------------------------------------------------------------------
    def update(
        self,
        name: str,
        x: torch.Tensor,
        g: torch.Tensor,
        y_err_by_format: Mapping[str, torch.Tensor] | None = None,
        *,
        grad_scale: float = 1.0,
    ) -> None:
        """Stage one backward's contribution of Linear ``name``.

        Args:
            x: inputs ``[..., in]`` (flattened to ``[T, in]``).
            g: output gradients ``[..., out]`` matching ``x``'s tokens.
            y_err_by_format: ``{format: y − ŷ [..., out]}`` for (a subset of) this Linear's formats.
            grad_scale: the factor that turns ``g`` into the gradient of the sum-reduced loss
                (quadratic quantities are multiplied by its square).
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
        pend = self._pending.get(name)
        if pend is None:
            pend = self._pending[name] = _LinearSums.zeros(
                self.shapes[name], self.linear_formats[name], x.device
            )
        pend.h_trace.add_(torch.dot(g_norm, x_norm).double(), alpha=c2)
        pend.diag_out.add_((g2.t() @ x_norm).double(), alpha=c2)
        pend.diag_in.add_((xsq.t() @ g_norm).double(), alpha=c2)
        for fmt, err in (y_err_by_format or {}).items():
            fmt = get_format(fmt).name
            if fmt not in pend.output_error:
                raise ValueError(f"{name}: format {fmt!r} is not in its menu {list(pend.output_error)}")
            e2 = err.detach().reshape(-1, out_f).float().square()
            pend.output_error[fmt].add_(torch.sum(g2 * e2).double(), alpha=0.5 * c2)

    def commit(self, n_tokens: int) -> bool:
        """Add the staged batch to the totals with its ``n_tokens`` loss tokens.

        Returns ``False`` (and drops the batch) when a staged value is not finite, as happens on
        fp16 steps whose gradients overflowed (the grad scaler skips those optimizer steps too).
        """
        n_tokens = int(n_tokens)
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        pending, self._pending = self._pending, {}
        if not all(p.all_finite() for p in pending.values()):
            self.n_dropped_batches += 1
            return False
        for name, p in pending.items():
            self._sums[name].add_(p)
        self.n_tokens += n_tokens
        self.n_batches += 1
        return True

    def discard_pending(self) -> None:
        """Forget a staged, uncommitted batch."""
        self._pending = {}

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
        self._pending = {}

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
