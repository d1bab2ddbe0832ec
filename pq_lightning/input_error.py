"""The error a Linear's quantized input adds to its output, and the weight that compensates for it.

A W4A4 Linear serves ``Ŵ x̂``, where ``x̂`` is its input after the activation fake-quant. GPTQ as
usually posed fits ``Ŵ`` to ``W`` on the served input, minimising ``E‖(W − Ŵ) x̂‖²``, and leaves the
input's own error ``W (x − x̂)`` alone; at NVFP4 W4A4 that is about half of a Linear's output error
(SmolLM2-135M, RTN activations, GPTQ weights). Against the unquantized Linear the error is

    E‖W x − Ŵ x̂‖² = tr(Δ H Δᵀ) + 2⟨Δ, W C⟩ + tr(W G Wᵀ),      Δ = W − Ŵ,

with the per-token moments ``H = E[x̂ x̂ᵀ]``, ``C = E[e x̂ᵀ]``, ``G = E[e eᵀ]`` of ``e = x − x̂``.
Its least point over unquantized weights is the *target* ``T = W + W C H⁻¹`` (the regression of
``W x`` on ``x̂``), and for every ``Ŵ`` the error equals ``tr((T − Ŵ) H (T − Ŵ)ᵀ)`` plus a constant:
GPTQ and the scale sweep run on ``T`` minimise the error against the unquantized Linear exactly.
Input channels that NVFP4's per-16 scales round to zero beside an outlier are where ``T`` gains:
the other channels predict part of what they carried.

``T`` is a regression with ``in²`` coefficients, so ``H`` is damped (``H + λ·mean diag(H)·I``) and
``T`` is only used where it lowers the error on held-out tokens (:func:`choose_target`).
Pure maths; no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ErrorTerms", "InputError", "InputErrorSums", "InputErrors", "choose_target", "compensated_target",
           "full_output_errors"]


@dataclass(frozen=True)
class InputError:
    """Per-token moments of the input error ``e = x − x̂``: ``cross = E[e x̂ᵀ]``, ``gram = E[e eᵀ]``
    (fp32 ``[in, in]``)."""

    cross: torch.Tensor
    gram: torch.Tensor

    def terms(self, W: torch.Tensor) -> ErrorTerms:
        """What the error of any ``Ŵ`` needs of ``W`` and this input error (one Linear, one split)."""
        Wf = W.detach().float()
        WC = Wf @ self.cross.to(Wf.device).float()
        const = float(((Wf @ self.gram.to(Wf.device).float()).double() * Wf.double()).sum())
        return ErrorTerms(WC, const)


@dataclass(frozen=True)
class ErrorTerms:
    """``W C`` (fp32 ``[out, in]``) and ``tr(W G Wᵀ)``: the linear term and the constant of
    ``E‖W x − Ŵ x̂‖² = tr(Δ H Δᵀ) + 2⟨Δ, W C⟩ + tr(W G Wᵀ)`` (the constant: the unquantized weight's
    error on the quantized input)."""

    WC: torch.Tensor
    const: float


@dataclass(frozen=True)
class InputErrors:
    """A group's input error on the fit and held-out tokens, and on both pooled (for the refit)."""

    fit: InputError
    heldout: InputError
    refit: InputError | None = None


def full_output_errors(W: torch.Tensor, base: torch.Tensor, W_hats: Sequence[torch.Tensor],
                       terms: Sequence[ErrorTerms]) -> torch.Tensor:
    """``E‖W x − Ŵ x̂‖²`` of every ``Ŵ`` under each input error's :class:`ErrorTerms`, from ``base`` =
    ``tr(Δ H Δᵀ)`` (``[len(W_hats), len(terms)]`` fp64: :func:`pq_lightning.gptq.output_errors` on
    the same splits' ``H``); the inner products are summed in fp64."""
    out = base.clone()
    Wd = W.detach().double()
    for j, t in enumerate(terms):
        P = t.WC.to(Wd.device).double()
        for k, W_hat in enumerate(W_hats):
            out[k, j] += 2.0 * float(((Wd - W_hat.detach().to(Wd.device).double()) * P).sum()) + t.const
    return out


def compensated_target(W: torch.Tensor, H: torch.Tensor, WC: torch.Tensor, damp: float,
                       cache: dict | None = None) -> torch.Tensor:
    """``T = W + W C (H + λ·mean diag(H)·I)⁻¹`` (fp32): the unquantized weight whose output on the
    served input is closest to ``W x`` (``damp`` = 0: exactly the least-squares one). ``WC``:
    ``W @ cross``; ``cache``: damping -> Cholesky factor of this ``H`` (fused siblings share one)."""
    key = float(damp)
    L = None if cache is None else cache.get(key)
    if L is None:
        Hd = H.detach().double()
        Hd = Hd + float(damp) * float(Hd.diagonal().mean()) * torch.eye(Hd.shape[0], dtype=torch.float64,
                                                                           device=Hd.device)
        L = torch.linalg.cholesky(Hd).float()
        if cache is not None:
            cache[key] = L
    # T − W = X solves X H_d = W C, i.e. H_d Xᵀ = (W C)ᵀ with H_d = L Lᵀ
    X = torch.cholesky_solve(WC.detach().float().T.contiguous(), L).T
    return W.detach().float() + X


def choose_target(W: torch.Tensor, H_fit: torch.Tensor, fit: ErrorTerms, H_heldout: torch.Tensor,
                  heldout: ErrorTerms, dampings: Sequence[float],
                  cache: dict | None = None) -> tuple[torch.Tensor, float | None]:
    """The target of least held-out error among ``W`` and its compensated targets fitted on the fit
    tokens at each damping; ``(W, None)`` when none beats ``W`` itself (ties keep ``W``)."""
    from .gptq import output_errors

    targets, tried = [], []
    for d in dampings:
        try:
            targets.append(compensated_target(W, H_fit, fit.WC, d, cache))
            tried.append(float(d))
        except torch.linalg.LinAlgError:  # undamped and singular: that damping is not a candidate
            continue
    errs = full_output_errors(W, output_errors(W, targets, [H_heldout]), targets, [heldout])[:, 0].tolist()
    best, best_err, best_damp = W.detach().float(), heldout.const, None
    for T, e, d in zip(targets, errs, tried, strict=True):
        if e < best_err:
            best, best_err, best_damp = T, e, float(d)
    return best, best_damp


class InputErrorSums:
    """Sums of ``eᵀx̂`` and ``eᵀe`` over the tokens of each split, fed one batch at a time (fp32).

    ``gram`` is summed on the blocks on and above the diagonal only, like the Hessian it sits
    beside; :meth:`per_token` mirrors it."""

    def __init__(self) -> None:
        self.cross: dict[str, torch.Tensor | None] = {"fit": None, "heldout": None}
        self.gram: dict[str, torch.Tensor | None] = {"fit": None, "heldout": None}

    def add(self, split: str, x: torch.Tensor, xq: torch.Tensor) -> None:
        from .refine import _add_gram_upper_

        x = x.detach().reshape(-1, x.shape[-1]).float()
        xq = xq.detach().reshape(-1, xq.shape[-1]).float()
        e = x - xq
        if self.cross[split] is None:
            self.cross[split] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.gram[split] = torch.zeros_like(self.cross[split])
        self.cross[split].addmm_(e.T, xq)
        _add_gram_upper_(self.gram[split], e)

    def tensors(self, n_in: int, device: torch.device) -> list[torch.Tensor]:
        """The four sums (fit cross, fit gram, held-out cross, held-out gram; zeros where a split saw
        nothing), the grams mirrored: what the ranks all-reduce with SUM."""
        from .refine import _mirror_upper_

        out = []
        for split in ("fit", "heldout"):
            for sums, mirror in ((self.cross, False), (self.gram, True)):
                t = sums[split]
                t = torch.zeros(n_in, n_in, dtype=torch.float32, device=device) if t is None else t
                out.append(_mirror_upper_(t) if mirror else t)
        return out

    @staticmethod
    def per_token(sums: Sequence[torch.Tensor], n_fit: int, n_held: int, refit: bool) -> InputErrors:
        """:class:`InputErrors` from the (reduced) :meth:`tensors` and token counts."""
        c_fit, g_fit, c_held, g_held = sums
        fit = InputError(c_fit / n_fit, g_fit / n_fit)
        held = InputError(c_held / n_held, g_held / n_held) if n_held else fit
        pooled = (InputError((c_fit + c_held) / (n_fit + n_held), (g_fit + g_held) / (n_fit + n_held))
                  if refit and n_held else None)
        return InputErrors(fit, held, pooled)
