"""Predicted loss increase and exact bits of every (Linear, format) pair.

Estimators of ``Δloss`` for quantizing one Linear ``W [out, in]`` with format ``f`` (all are
per-token means, the unit of the calibration loss):

* ``trace``: PrismaQuant's ``0.5 · H_trace · MSE_W`` with ``H_trace`` the per-token empirical Fisher
  trace and ``MSE_W = mean((Q_f(W) − W)²)`` from the format's own ``fake_quant``;
* ``diag``: ``0.5 · Σ_{o,i} F_oi · ΔW_oi²`` with the Fisher diagonal approximated as rank one,
  ``F_oi ≈ diag_out[o] · diag_in[i] / H_trace`` (exact marginals, so it sums to ``H_trace``);
* ``output``: the probe's measured output-space error ``½ Σ_t Σ_o g_to² (y_t − ŷ_t)_o² / N``,
  which includes activation quantization (a weight-only estimate mis-ranks W4A4 formats).

BF16 costs nothing (it is the reference). Weights are read one Linear at a time, on the device
they live on; nothing is copied model-wide.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .formats import get_format
from .streaming import ensure_loaded

ESTIMATORS = ("trace", "diag", "output")


@dataclass
class LinearCost:
    """Bits on disk and predicted Δloss of one Linear under every format it can take."""

    name: str
    shape: tuple[int, int]
    bits: dict[str, int] = field(default_factory=dict)
    dloss: dict[str, float] = field(default_factory=dict)
    mse: dict[str, float] = field(default_factory=dict)
    #: Formats the Linear's shape cannot take, with the reason (reported, then excluded).
    unsupported: dict[str, str] = field(default_factory=dict)
    #: Format -> the factor its ``dloss`` was scaled by for the smoothing fold it will carry (:func:`price_folds`).
    fold_ratio: dict[str, float] = field(default_factory=dict)
    #: Format -> the factor its ``dloss`` was scaled by for what GPTQ / the sweep delivered (:func:`price_refined`).
    refine_ratio: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def _dloss(estimator: str, fmt_name: str, w: torch.Tensor, q: torch.Tensor, s) -> tuple[float, float]:
    err2 = (q - w.float()).pow(2)
    mse = float(err2.mean())
    if estimator == "trace":
        return 0.5 * float(s.h_trace) * mse, mse
    if estimator == "diag":
        h = float(s.h_trace)
        if h <= 0:
            return 0.0, mse
        d_out = s.diag_out.to(err2.device, torch.float64)
        d_in = s.diag_in.to(err2.device, torch.float64)
        return 0.5 * float(d_out @ err2.double() @ d_in) / h, mse
    if estimator == "output":
        try:
            return float(s.output_error[fmt_name]), mse
        except KeyError:
            raise ValueError(
                f"estimator 'output' needs the probe's output-space error for format {fmt_name!r} "
                f"on {s.name}, but the sensitivity file has {sorted(s.output_error)}; add "
                f"{fmt_name!r} to the FisherProbe's `formats` and re-run the probe, or use "
                "estimator 'trace' or 'diag'."
            ) from None
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")


@torch.no_grad()
def compute_costs(
    linears: Mapping[str, torch.nn.Module] | Iterable[tuple[str, torch.nn.Module]],
    sensitivity,
    formats: Iterable[str],
    *,
    estimator: str = "trace",
    progress=None,
) -> dict[str, LinearCost]:
    """Cost of every Linear under every format in ``formats`` (``bf16`` is always added).

    ``linears`` maps body Linear names to modules (``find_body_linears``); ``sensitivity`` is the
    probe's :class:`~pq_lightning.sensitivity.Sensitivity`. ``progress`` is an optional callable
    wrapping an iterable (e.g. ``rich.progress.track``).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    fmts = [get_format(f) for f in dict.fromkeys([*formats, "bf16"])]
    items = list(linears.items() if isinstance(linears, Mapping) else linears)
    missing = [n for n, _ in items if n not in sensitivity.linears]
    if missing:
        raise ValueError(
            f"the sensitivity file has no measurement for {len(missing)} Linear(s), e.g. {missing[:3]}; "
            "it was measured with other include/exclude settings or on another model: re-run the probe."
        )
    costs: dict[str, LinearCost] = {}
    iterator = progress(items) if progress is not None else items
    for name, module in iterator:
        ensure_loaded(module)  # a layer streamed from disk (pq_lightning.streaming) is read here
        w = module.weight.detach()
        shape = (int(w.shape[0]), int(w.shape[1]))
        c = LinearCost(name=name, shape=shape)
        s = sensitivity.linears[name]
        for fmt in fmts:
            reason = fmt.unsupported_reason(shape)
            if reason is not None:
                c.unsupported[fmt.name] = reason
                continue
            c.bits[fmt.name] = fmt.bits(shape)
            if not fmt.quantizes_weights:
                c.dloss[fmt.name], c.mse[fmt.name] = 0.0, 0.0
                continue
            c.dloss[fmt.name], c.mse[fmt.name] = _dloss(estimator, fmt.name, w, fmt.fake_quant(w), s)
        costs[name] = c
    return costs


def price_folds(costs: Mapping[str, LinearCost], fmt_name: str, ratios: Mapping[str, float]) -> int:
    """Scale each Linear's predicted ``Δloss`` under ``fmt_name`` by ``ratios[name]``, the ratio of its
    quantized output error with and without the smoothing fold it gets in that format
    (:func:`pq_lightning.smooth.fold_gains`); the number of Linears repriced.

    The probe measures every format on the unfolded model, but a W4A4 Linear is exported behind its fold;
    this prices what the checkpoint carries (opt-in: on SmolLM2-135M the cheaper NVFP4 made the 6.0-bpp
    build worse, see the README). Only the ``output`` estimator should take it: the ratio is of the
    weight-and-activation error that estimator measures, while ``trace`` / ``diag`` price the weight
    error alone (which a fold raises).
    """
    return _scale(costs, fmt_name, ratios, "fold_ratio")


def price_refined(costs: Mapping[str, LinearCost], fmt_name: str, gains: Mapping[str, float]) -> int:
    """Scale each Linear's predicted ``Δloss`` under ``fmt_name`` by ``gains[name]``, the ratio of its
    held-out output error after refine (GPTQ / scale sweep, behind its fold) to RTN's, both against
    the unquantized Linear (:attr:`pq_lightning.refine.LinearDecision.refine_gain`); the number of
    Linears repriced.

    The probe prices a format by RTN on the unfolded model, while the checkpoint carries refined
    weights: where refine pays most, the format was priced too dear. Like :func:`price_folds` this is
    a ratio of the weight-and-activation error, so it belongs with the ``output`` estimator.
    """
    return _scale(costs, fmt_name, gains, "refine_ratio")


def _scale(costs: Mapping[str, LinearCost], fmt_name: str, ratios: Mapping[str, float], record: str) -> int:
    n = 0
    for name, ratio in ratios.items():
        c = costs.get(name)
        if c is None or fmt_name not in c.dloss:
            continue
        if not ratio >= 0:
            raise ValueError(f"{record.replace('_', ' ')} of {name} under {fmt_name} is {ratio}; it must be a "
                             "non-negative number")
        c.dloss[fmt_name] *= ratio
        getattr(c, record)[fmt_name] = ratio
        n += 1
    return n
