"""One layer walk for a sweep of plans: statistics from the unquantized stream, decisions shared.

:func:`~pq_lightning.refine.refine_model` walks the decoder *sequentially*: each layer sees the layers
above in their served (quantized) state, so its statistics depend on the plan upstream and a sweep of
N budgets walks the model N times. :func:`refine_plans` walks it once for all of them, on the
unquantized stream: each Linear's Hessians are built from the inputs the unquantized model gives it
(GPTQ's original, layer-parallel setting).

What still differs between plans at one Linear:

* the smoothing a plan folds around it (:mod:`pq_lightning.smooth`). The scales are powers of two, so
  in the folded model the Linear's input is exactly ``x / s`` and its weight exactly
  ``diag(1/r) · W · diag(s)`` (``s``: the fold in front of it, ``r``: the fold it produces, e.g.
  ``up_proj`` rows for ``down_proj``). The walk runs the unfolded model and applies the scales in its
  hooks and to the weights it decides: bit-identical to walking each folded model;
* the format, whose activation fake-quant (under a static input scale calibrated on the same
  inputs, for W4A4 NVFP4) shapes the Hessian.

Each distinct (fused group, format, ``s``), a *variant*, gets its own input amax and fit / held-out
Hessians, and each distinct (Linear, variant, ``r``) is decided once by
:func:`pq_lightning.refine._decide` (GPTQ, scale sweep, RTN gate, refit) for every plan that asks for
it. Per layer: one forward per window, whose outputs are the next layer's inputs and whose hooks see
every group's input, plus a second one only when a format needs the input amax before it can quantize
the input (W4A4 NVFP4) and that input is too large to keep (``max_kept_input_bytes`` per layer).

Distributed: amax (MAX), Hessians and token counts (SUM) are all-reduced; each decision is made by
one owner rank and broadcast, as in the sequential walk.

Memory: as the sequential walk, except that a layer's inputs are kept for all its groups at once
(``max_kept_input_bytes`` in all) and every variant's Hessians of the layer live until its decisions.

Measured (README, 64 x 512 tokens, 2-core CPU): four budgets in one shared walk cost 1.18x (SmolLM2-135M)
and 1.20x (Gemma-3-270M) one budget walked sequentially; KL within 1.5 % of the sequential walk at
6.0 bpp, but 6 % higher ``kl_conf`` on Gemma at 4.5 (all NVFP4): the Hessians do not see upstream
quantization. Hence a sweep tool; one budget keeps the sequential walk by default.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .activation_store import ActivationStore, ResidentBudget
from .architectures import fused_groups, model_type_of
from .flops import FlopTally, count_flops, not_counted
from .formats.base import QuantFormat
from .gptq import GPTQConfig
from .input_error import InputErrors, InputErrorSums
from .models import language_model_layers
from .refine import (
    FLOP_SAMPLE_STRIDE,
    LinearDecision,
    RefineOutput,
    _accumulate,
    _all_reduce,
    _broadcast_decision,
    _check_plan,
    _decide,
    _input_quantizer,
    _mirror_upper_,
    _run_layer,
    _totals,
    _Walk,
    compensates,
)

__all__ = ["WalkPlan", "refine_plans"]


@dataclass
class WalkPlan:
    """One plan of a shared walk: formats, serving groups, and the smoothing folded around its Linears.

    ``input_scales``: Linear -> ``s`` folded in front of it (its input ``x / s``, its weight's columns
    times ``s``); ``row_scales``: Linear -> ``r`` its rows are divided by (it produces a folded input).
    Both powers of two (fp32), as :func:`pq_lightning.smooth.fold_smoothing` makes them; use
    :meth:`from_folds`.
    """

    formats: Mapping[str, str]
    groups: Sequence[Sequence[str]] | None = None
    input_scales: Mapping[str, torch.Tensor] = field(default_factory=dict)
    row_scales: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_folds(cls, formats: Mapping[str, str], groups: Sequence[Sequence[str]] | None, folds: Any) -> WalkPlan:
        """From a :class:`~pq_lightning.smooth.SmoothResult` (``None``: nothing folded)."""
        inputs: dict[str, torch.Tensor] = {}
        rows: dict[str, torch.Tensor] = {}
        for m in [] if folds is None else folds.mappings:
            s = folds.scales[m.producer].float()
            for c in m.consumers:
                inputs[c] = s
            if m.kind != "norm":
                rows[m.producer] = m.producer_rows(s)
        return cls(dict(formats), groups, inputs, rows)


def _digest(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha1(t.detach().float().cpu().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class _Variant:
    """What a group's input statistics depend on: the group, its format and the scale in front of it."""

    group: tuple[str, ...]
    fmt: str
    scale: str | None


class _VariantStats:
    """Input amax and fit / held-out Hessians of one variant, from the unfolded input ``x``."""

    def __init__(self, fmt: QuantFormat, s: torch.Tensor | None, *, hessians: bool, input_error: bool = False) -> None:
        self.fmt, self.s, self.hessians = fmt, s, hessians
        self.amax: torch.Tensor | None = None
        self.H: dict[str, torch.Tensor | None] = {"fit": None, "heldout": None}
        self.n = {"fit": 0, "heldout": 0}
        self.errors = InputErrorSums() if hessians and input_error else None
        self.error_sums: list[torch.Tensor] | None = None  # the errors' reduced sums
        # a static input scale is known only once every window's amax is: until then, nothing to quantize with
        self.quantize: Callable[[torch.Tensor], torch.Tensor] | None = (
            None if fmt.static_input_scale else _input_quantizer(fmt, None))

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.s is None else x / self.s.to(device=x.device, dtype=x.dtype)

    def observe(self, split: str, x: torch.Tensor) -> None:
        """The first pass's view of one window: the amax, and the Hessians unless the scale waits for the amax."""
        xs = self.scaled(x)
        a = xs.abs().amax().float()
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        if self.quantize is not None and self.hessians:
            self._add(split, xs)

    def calibrate(self) -> None:
        self.quantize = _input_quantizer(self.fmt, self.fmt.calibrate_input_global_scale(self.amax))

    def add(self, split: str, x: torch.Tensor) -> None:
        self._add(split, self.scaled(x))

    def _add(self, split: str, xs: torch.Tensor) -> None:
        xq = self.quantize(xs)
        _accumulate(self.H, self.n, split, xq)
        if self.errors is not None:
            self.errors.add(split, xs, xq)

    def per_token(self, refit: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, InputErrors | None]:
        """``H_fit / n_fit``, ``H_heldout / n_heldout``, with ``refit`` their pooled mean, and the
        input error per token (``None`` unless collected)."""
        H_fit, H_held = self.H["fit"], self.H["heldout"]
        n_fit, n_held = self.n["fit"], self.n["heldout"]
        H_refit = (H_fit + H_held) / (n_fit + n_held) if refit and n_held else None
        ie = (None if self.error_sums is None
              else InputErrorSums.per_token(self.error_sums, n_fit, n_held, H_refit is not None))
        return H_fit / n_fit, (H_held / n_held if n_held else H_fit / n_fit), H_refit, ie


@dataclass
class _Job:
    """One decision: a Linear under one variant and one row scale, wanted by one or more plans."""

    member: str
    variant: _Variant | None  # None: RTN by rule, no statistics
    fmt: QuantFormat
    weight: torch.Tensor  # fp32, scales applied
    gs: torch.Tensor | None
    plans: list[int]


def refine_plans(
    model: nn.Module,
    plans: Sequence[WalkPlan],
    fit_batches: Iterable[Any],
    heldout_batches: Iterable[Any],
    *,
    config: GPTQConfig | None = None,
    gptq: bool = True,
    fp8_gptq: bool = False,
    rtn_errors: bool = False,
    model_type: str | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    process_group: Any = None,
    max_kept_input_bytes: int = 2**30,
    max_resident_activation_bytes: int | None = None,
    spill_dir: str | None = None,
    count_flops_into: FlopTally | None = None,
) -> list[RefineOutput]:
    """Refine every plan's body Linears in one walk of ``model`` (see the module docstring).

    Args:
        model: a Hugging Face causal LM, *unfolded* (the plans' folds are applied by the walk); returned
            unchanged.
        plans: one :class:`WalkPlan` per budget.
        The others: as :func:`pq_lightning.refine.refine_model`.

    Returns one :class:`~pq_lightning.refine.RefineOutput` per plan, in order.
    """
    if not plans:
        raise ValueError("refine_plans needs at least one plan")
    config = config or GPTQConfig()
    layers_name, layers = language_model_layers(model)
    mt = model_type if model_type is not None else model_type_of(model)
    resolved = []
    for p in plans:
        formats = _check_plan(model, p.formats, layers_name)
        groups = p.groups if p.groups is not None else fused_groups(list(formats), mt)
        resolved.append((formats, [tuple(g) for g in groups], p))
    walk = _SharedWalk(model, resolved, config, gptq=gptq, fp8_gptq=fp8_gptq, rtn_errors=rtn_errors,
                       process_group=process_group, max_kept_input_bytes=max_kept_input_bytes,
                       budget=ResidentBudget(max_resident_activation_bytes), spill_dir=spill_dir)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            walk.capture(layers, fit_batches, heldout_batches)
            it: Iterable[int] = range(len(layers))
            for li in progress(it) if progress is not None else it:
                counting = (count_flops(count_flops_into)
                            if count_flops_into is not None and li % FLOP_SAMPLE_STRIDE == 0 else None)
                with counting or contextlib.nullcontext():
                    walk.layer(li, layers[li], f"{layers_name}.{li}.", last=li == len(layers) - 1)
    finally:
        walk.close()
        model.train(was_training)
    for (formats, _, _), out in zip(resolved, walk.outs, strict=True):
        for name, fmt in formats.items():
            if not fmt.quantizes_weights:
                out.decisions[name] = LinearDecision(name, fmt.name, "bf16", None, {}, 0.0, 0.0)
        out.totals = _totals(out.decisions, out.packed)
        out.totals["resident_activation_peak_bytes"] = walk.budget.peak
        out.totals["flops_counted_layers"] = len(range(0, len(layers), FLOP_SAMPLE_STRIDE))
        out.totals["walk"] = "shared"
    return walk.outs


class _SharedWalk(_Walk):
    """The state of one shared walk: the sequential walk's capture and stores, one output per plan."""

    def __init__(self, model, resolved, config, *, gptq, fp8_gptq, rtn_errors, process_group, max_kept_input_bytes,
                 budget, spill_dir) -> None:
        super().__init__(model, {}, config, gptq=gptq, fp8_gptq=fp8_gptq, process_group=process_group,
                         keep_hessians=False, rtn_errors=rtn_errors, max_kept_input_bytes=max_kept_input_bytes,
                         budget=budget, spill_dir=spill_dir)
        self.plans = resolved
        self.outs = [RefineOutput(packed={}, input_amax={}, decisions={}, totals={}) for _ in resolved]

    def layer(self, li: int, layer: nn.Module, prefix: str, *, last: bool) -> None:
        """Statistics of every variant of layer ``li`` from its unquantized inputs, then every decision."""
        if self.streamer is not None:
            self.streamer.load(li)
        linears = {f"{prefix}{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        wanted = [self._layer_groups(i, linears) for i in range(len(self.plans))]
        stats: dict[_Variant, _VariantStats] = {}
        for per_plan in wanted:
            for _, fmt, v, s, measured in per_plan:
                if v is not None and v not in stats:
                    stats[v] = _VariantStats(fmt, s, hessians=measured, input_error=compensates(self.config, fmt))
        calls = [w[li] for w in self.windows]
        next_hidden = self._passes(layer, linears, calls, stats, last=last)
        if next_hidden is not None:
            previous, self.hidden = self.hidden, next_hidden
            previous.close()
        self._decide_layer(linears, wanted, stats)
        if self.streamer is not None:
            self.streamer.release(li)

    def _layer_groups(self, i: int, linears: Mapping[str, nn.Module]) -> list[tuple]:
        """Plan ``i``'s quantized groups in this layer: (group, format, variant or None, s, measured)."""
        formats, groups, plan = self.plans[i]
        quant = [n for n in linears if n in formats and formats[n].quantizes_weights]
        in_layer = set(quant)
        found = [g2 for g2 in (tuple(m for m in g if m in in_layer) for g in groups) if g2]
        found += [(n,) for n in quant if not any(n in g for g in found)]
        out = []
        for g in found:
            fmt = formats[g[0]]
            if len({formats[m].name for m in g}) > 1 or len({_digest(plan.input_scales.get(m)) for m in g}) > 1:
                raise ValueError(f"fused siblings {g} must share one format and one smoothing scale (they share "
                                 "their input); give every member of the group the same format in the plan")
            measured = self.rtn_errors or (self.gptq and (fmt.refine_by_default or self.fp8_gptq))
            s = plan.input_scales.get(g[0])
            v = _Variant(g, fmt.name, _digest(s)) if measured or fmt.static_input_scale else None
            out.append((g, fmt, v, s, measured))
        return out

    def _passes(self, layer, linears, calls, stats, *, last: bool) -> ActivationStore | None:
        """The layer's forward on every window (its outputs returned as the next layer's inputs), feeding
        every variant; a second forward only for variants whose inputs had to wait for their amax."""
        sites: dict[tuple[str, ...], list[_VariantStats]] = {}
        for v, st in stats.items():
            sites.setdefault(v.group, []).append(st)
        waiting = {g for g, vs in sites.items() if any(st.quantize is None and st.hessians for st in vs)}
        kept: dict[tuple[str, ...], tuple[ActivationStore, list[str]]] = {}
        room = self.max_kept_input_bytes
        for g in sorted(waiting):
            nbytes = self.n_tokens * linears[g[0]].in_features * self.hidden[0].element_size()
            if nbytes <= room:
                kept[g], room = (ActivationStore(self.budget, self.spill_dir), []), room - nbytes
        split = {"split": "fit"}

        def first(g, vs):
            def hook(module: nn.Module, args: tuple) -> None:
                for st in vs:
                    st.observe(split["split"], args[0])
                if g in kept:
                    kept[g][0].append(args[0].detach().clone())
                    kept[g][1].append(split["split"])
            return hook

        out = None if last else ActivationStore(self.budget, self.spill_dir)
        try:
            self._run(layer, calls, split, {linears[g[0]]: first(g, vs) for g, vs in sites.items()}, out)
            self._calibrate([st for vs in sites.values() for st in vs])
            for g, (store, splits) in kept.items():
                for x, s in zip(store, splits, strict=True):
                    for st in sites[g]:
                        if st.hessians and st.fmt.static_input_scale:
                            st.add(s, x)
            again = {g: sites[g] for g in waiting if g not in kept}

            def second(vs):
                def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input goes on unchanged
                    for st in vs:
                        if st.hessians and st.fmt.static_input_scale:
                            st.add(split["split"], args[0])
                return hook

            if again:
                self._run(layer, calls, split, {linears[g[0]]: second(vs) for g, vs in again.items()}, None)
        except BaseException:
            if out is not None:
                out.close()
            raise
        finally:
            for store, _ in kept.values():
                store.close()
        return out

    def _run(self, layer, calls, split, hooks: Mapping[nn.Module, Callable], out: ActivationStore | None) -> None:
        handles = [m.register_forward_pre_hook(h) for m, h in hooks.items()]
        try:
            for h_in, call in zip(self.hidden, calls, strict=True):
                split["split"] = call.split
                y = _run_layer(layer, h_in, call)
                if out is not None:
                    out.append(y)
        finally:
            for h in handles:
                h.remove()

    def _calibrate(self, every: Sequence[_VariantStats]) -> None:
        """Amax all-reduced (MAX) across ranks; static input scales calibrated from it."""
        observed = [st for st in every if st.amax is not None]
        if self.distributed and observed:
            for st, a in zip(observed, _all_reduce([st.amax for st in observed], "max", self.process_group),
                             strict=True):
                st.amax = a
        for st in every:
            if st.quantize is None:
                st.calibrate()

    def _reduce(self, measured: Sequence[_VariantStats], linears: Mapping[str, nn.Module],
                groups: Mapping[int, tuple[str, ...]]) -> None:
        """Hessians completed from their upper blocks and, under ranks, summed with the token counts."""
        flat: list[torch.Tensor] = []
        for st in measured:
            n_in = linears[groups[id(st)][0]].in_features
            for split in ("fit", "heldout"):
                H = st.H[split]
                st.H[split] = (_mirror_upper_(H) if H is not None
                               else torch.zeros(n_in, n_in, dtype=torch.float32, device=self.device))
            flat += [st.H["fit"], st.H["heldout"], torch.tensor([float(st.n["fit"]), float(st.n["heldout"])],
                                                                dtype=torch.float64)]
            if st.errors is not None:
                st.error_sums = st.errors.tensors(n_in, self.device)
                flat += st.error_sums
        if not (self.distributed and measured):
            return
        flat = _all_reduce(flat, "sum", self.process_group)
        k = 0
        for st in measured:
            st.H["fit"], st.H["heldout"], ns = flat[k : k + 3]
            st.n = {"fit": int(round(float(ns[0]))), "heldout": int(round(float(ns[1])))}
            k += 3
            if st.error_sums is not None:
                st.error_sums, k = flat[k : k + 4], k + 4

    def _jobs(self, linears, wanted) -> dict[tuple, _Job]:
        """Every distinct decision of the layer, with the plans that want it."""
        jobs: dict[tuple, _Job] = {}
        for i, per_plan in enumerate(wanted):
            plan = self.plans[i][2]
            for g, fmt, v, s, _ in per_plan:
                rows = tuple(_digest(plan.row_scales.get(m)) for m in g)
                keys = [(m, v if v is not None else (g, fmt.name, _digest(s)), rows) for m in g]
                if keys[0] in jobs:  # a group's keys share variant and row scales: all known, or none
                    for key in keys:
                        jobs[key].plans.append(i)
                    continue
                weights = [_scaled_weight(linears[m].weight, s, plan.row_scales.get(m)) for m in g]
                gs = fmt.shared_global_scale(weights) if fmt.shares_global_scale else None
                for m, w, key in zip(g, weights, keys, strict=True):
                    jobs[key] = _Job(m, v, fmt, w, gs, [i])
        return jobs

    def _decide_layer(self, linears, wanted, stats: Mapping[_Variant, _VariantStats]) -> None:
        """Every distinct decision once (by its owner rank), handed to every plan that wants it."""
        measured = [st for st in stats.values() if st.hessians]
        self._reduce(measured, linears, {id(st): v.group for v, st in stats.items()})
        jobs = self._jobs(linears, wanted)
        names = {key: f"{job.member}#{n}" for n, (key, job) in enumerate(jobs.items())}
        owner = (self.owners.assign({names[k]: tuple(j.weight.shape) for k, j in jobs.items()})
                 if self.distributed else dict.fromkeys(names.values(), 0))
        factors: dict[_Variant, dict] = {}  # siblings share H_fit: factored once per damping
        for key, job in jobs.items():
            st = stats.get(job.variant) if job.variant is not None else None
            mine = None
            if not self.distributed or owner[names[key]] == self.rank:
                mine = self._decide_job(job, st, factors)
            if self.distributed:
                mine = _broadcast_decision(*((None, None) if mine is None else mine), owner[names[key]],
                                           self.process_group)
            packed, decision = mine
            for i in job.plans:
                out = self.outs[i]
                out.packed[job.member] = packed
                out.decisions[job.member] = replace(decision)
                if st is not None and st.amax is not None:
                    out.input_amax[job.member] = float(st.amax)

    def _decide_job(self, job: _Job, st: _VariantStats | None, factors: dict) -> tuple[dict, LinearDecision]:
        with not_counted():  # a solve per Linear: not part of the cost per token
            if st is None or not st.hessians:  # RTN by rule
                packed, _, decision = _decide(job.member, job.fmt, job.weight, None, None, job.gs,
                                              config=self.config, gptq=False, fp8_gptq=False)
            else:
                H_fit, H_held, H_refit, ie = st.per_token(self.gptq and self.config.refit)
                packed, _, decision = _decide(job.member, job.fmt, job.weight, H_fit, H_held, job.gs,
                                              config=self.config, gptq=self.gptq, fp8_gptq=self.fp8_gptq,
                                              factor_cache=factors.setdefault(job.variant, {}), H_refit=H_refit,
                                              input_error=ie)
        return {k: v.detach().cpu() for k, v in packed.items()}, decision


def _scaled_weight(weight: torch.Tensor, s: torch.Tensor | None, r: torch.Tensor | None) -> torch.Tensor:
    """``diag(1/r) · W · diag(s)`` in fp32: the folded model's weight (exact: powers of two)."""
    w = weight.detach().float()
    if r is not None:
        w = w / r.to(w.device)[:, None]
    if s is not None:
        w = w * s.to(w.device)[None, :]
    return w
