"""Activation smoothing: per-input-channel scales moved from the activations into the weights.

W4A4 NVFP4 error is mostly activation error (SmolLM2-135M at 4.5 bpp, WikiText-2: kl_conf 0.265 with
weights and activations quantized, 0.087 with the same weights and BF16 activations). A few input
channels carry most of an activation's range, and every 16-element group that holds one of them is
quantized on a coarse grid. Dividing input channel ``j`` by ``s_j`` and multiplying the consumer
Linears' column ``j`` by ``s_j`` leaves the function unchanged and moves range from the activations
(quantized per token at serve time) into the weights (quantized once, with GPTQ):

    s_j = amax_x[j] ** alpha / amax_W[:, j] ** (1 - alpha)        (SmoothQuant, Xiao et al. 2023)

with ``amax_x`` over the calibration tokens and ``amax_W`` over every consumer of the input. ``s`` is
rounded to a power of two, so folding it is exact: the smoothed model computes bit for bit what the
original computes (the evaluation's reference is unchanged).

The scales are folded into the producer of the input, found by running the model, never by name:

* a norm whose output tensor is the consumers' input (``input_layernorm`` -> q/k/v; the norm before
  the MLP -> gate/up), when its gain is ``w`` (Llama / Qwen / Gemma-4 RMSNorm) or ``1 + w`` (Gemma
  1-3), checked on the norm itself. A ``1 + w`` norm takes ``w' = (1 + w) / s - 1``, which is exact
  only where ``w'`` is representable; :func:`exact_scales` keeps ``s`` on those channels and the
  nearest exact power of two toward 1 elsewhere (Gemma-3-270M: every channel in fp32; in bf16 the
  8-15 % left behind make the quantized error worse than no fold, so the search leaves those
  inputs alone);
* the ``up_proj`` rows of a gated MLP (``down_proj(act(gate_proj(x)) * up_proj(x))``) -> ``down_proj``;
* with ``SmoothConfig.attention``, the ``v_proj`` rows of attention -> ``o_proj`` (kind ``head_rows``):
  ``o_proj``'s input channel ``(h, d)`` is a softmax-weighted sum of ``v`` channel ``(kv(h), d)``, so
  one scale per (kv head, head dim), shared by the query heads of that kv head (grouped-query
  attention), folds exactly; the scale is computed on the amax over those heads' channels.

After folding the whole model is checked on a calibration window; if the logits moved, every fold is
undone and smoothing is reported as skipped. The attention folds are checked on their own afterwards:
an architecture that normalises ``v`` per head (Gemma-4's ``v_norm``) loses only those.

The pipeline collects the statistics once and, per budget, folds only the mappings whose consumers
all take a format with ``smooth_inputs`` (NVFP4 W4A4): measured on SmolLM2, smoothing in front of
FP8 W8A8 Linears hurts (per-row FP8 weight scales cannot take column outliers, per-token FP8
activations did not need it). The folds come before GPTQ and export and are undone before the next
budget. The output is still a plain Hugging Face model: norms and Linears are changed in place and
exported as they are (vLLM needs no support for smoothing).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .formats.base import QuantFormat

#: Floor of an amax before the power (an all-zero channel or column would give 0 or inf).
AMAX_FLOOR = 1e-5
#: Largest |log2 s|: a channel is scaled by at most 2**16 either way.
MAX_LOG2_SCALE = 16
#: What the saved statistics hold (2: attention's o_proj input too); part of the probe's cache key.
SMOOTH_STATS_VERSION = 2


@dataclass(frozen=True)
class SmoothConfig:
    """Activation smoothing in front of NVFP4 W4A4 Linears (SmoothQuant scales, rounded to powers of two).

    ``alpha`` trades activation range for weight range: 0 leaves the activations alone, 1 makes
    every input channel's calibration amax one. With ``search`` (the default) each mapping takes the
    grid's alpha, or no fold, whose consumers' RTN output error (weights and inputs quantized) on
    ``search_tokens`` calibration rows is least; ``alpha`` is then only the fallback for a mapping
    with no format to search with. An empty ``search`` folds ``alpha`` everywhere.

    ``attention``: fold into ``v_proj``'s rows in front of ``o_proj`` too (``head_rows``; opt-in: on
    SmolLM2-135M at 4.5 bpp the search's four o_proj folds raised ``kl_conf`` 6 %).
    ``price_folds``: the allocator prices a smoothed format (NVFP4) by what it will carry, its probe-measured
    ``Δloss`` times the fold's error ratio on the samples (:func:`fold_gains`; ``output`` estimator only;
    opt-in: on SmolLM2-135M at 6.0 bpp the cheaper NVFP4 took 4 more Linears and ``kl_conf`` rose 6 %).
    """

    enabled: bool = True
    alpha: float = 0.5
    search: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    search_tokens: int = 256
    attention: bool = False
    price_folds: bool = False

    @property
    def active(self) -> bool:
        """False when nothing would be folded (disabled, or alpha 0 with no search)."""
        return self.enabled and (self.alpha > 0 or bool(self.search))

    def __post_init__(self) -> None:
        for a in [self.alpha, *self.search]:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"smooth alpha values must lie in [0, 1], got {a}; 0.5 is the measured default")
        if self.search_tokens < 1:
            raise ValueError(f"smooth.search_tokens must be >= 1, got {self.search_tokens}")


@dataclass
class SmoothMapping:
    """One fold: ``producer`` (a norm, or the Linear whose rows make the input) and its consumers."""

    producer: str
    consumers: list[str]
    kind: str  # "norm", "linear_rows" or "head_rows"
    #: ``head_rows`` only: (kv heads, query heads per kv head, head dim) of the consumer's input.
    heads: tuple[int, int, int] | None = None

    def producer_rows(self, s: torch.Tensor) -> torch.Tensor:
        """The producer's row scales for consumer-input scales ``s`` (a kv head's rows once, not per query head)."""
        if self.heads is None:
            return s
        kv, rep, hd = self.heads
        return s.reshape(kv, rep, hd)[:, 0].reshape(-1)


@dataclass
class SmoothStats:
    """What :class:`SmoothingObserver` measured: the mappings, each one's per-channel input amax, and a
    uniform sample of its input rows (fp32, for the per-mapping search; empty when not asked for)."""

    mappings: list[SmoothMapping]
    amax: dict[str, torch.Tensor]
    samples: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SmoothResult:
    """What :func:`smooth_model` did: the mappings folded, their scales, and what was skipped."""

    mappings: list[SmoothMapping] = field(default_factory=list)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # producer -> s (fp32)
    skipped: list[str] = field(default_factory=list)
    max_logit_change: float | None = None
    alphas: dict[str, float] = field(default_factory=dict)  # producer -> the alpha folded
    offsets: dict[str, float] = field(default_factory=dict)  # norm -> c of its gain c + w

    def summary(self) -> dict:
        spread = [float(s.max() / s.min()) for s in self.scales.values()]
        return {
            "folded": len(self.mappings),
            "consumers": sum(len(m.consumers) for m in self.mappings),
            "skipped": list(self.skipped),
            "max_scale_ratio": max(spread) if spread else None,
            "max_logit_change": self.max_logit_change,
            "alphas": dict(self.alphas),
        }


def smoothing_scales(x_amax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float,
                     heads: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Power-of-two SmoothQuant scales ``2**round(log2(amax_x**a / amax_W**(1-a)))`` per input channel.

    ``heads`` (kv heads, query heads per kv head, head dim): channels ``(h, d)`` of the query heads of one
    kv head share a scale, computed on their amax over those heads (the ``head_rows`` fold)."""
    # on the statistics' device (the CPU), wherever the weights are
    w_amax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).to(x_amax.device)
    if w_amax.shape != x_amax.shape:
        raise ValueError(f"activation amax has {tuple(x_amax.shape)} channels, the weights {tuple(w_amax.shape)}")
    x_amax = x_amax.float()
    if heads is not None:
        x_amax, w_amax = (a.reshape(heads).amax(1) for a in (x_amax, w_amax))
    log2 = alpha * torch.log2(x_amax.clamp_min(AMAX_FLOOR)) - (1 - alpha) * torch.log2(
        w_amax.clamp_min(AMAX_FLOOR)
    )
    s = torch.exp2(torch.round(log2).clamp(-MAX_LOG2_SCALE, MAX_LOG2_SCALE))
    return s if heads is None else s[:, None].expand(heads).reshape(-1)


def _norm_like(module: nn.Module, width: int) -> bool:
    w = getattr(module, "weight", None)
    return (
        not isinstance(module, nn.Linear)
        and isinstance(w, nn.Parameter)
        and w.dim() == 1
        and w.numel() == width
        and len(list(module.children())) == 0
    )


#: Gain offsets a norm may have: ``n(x) * w`` (Llama, Qwen, Gemma-4) or ``n(x) * (1 + w)`` (Gemma 1-3).
GAIN_OFFSETS = (0.0, 1.0)


def gain_offset(norm: nn.Module) -> float | None:
    """``c`` such that ``norm(x) == n(x) * (c + weight)`` for a ``c`` of :data:`GAIN_OFFSETS`
    (checked in fp32 on a copy of the norm with a probe input: weight as it is, zero and one), or None."""
    probe = copy.deepcopy(norm).float()
    w = probe.weight
    x = torch.randn(3, w.numel(), generator=torch.Generator().manual_seed(0)).to(w.device)
    saved = w.detach().clone()
    with torch.no_grad():
        outs = []
        for value in (saved, torch.zeros_like(saved), torch.ones_like(saved)):
            w.copy_(value)
            outs.append(probe(x).float())
    y, y0, y1 = outs
    unit = y1 - y0  # n(x): the output per unit of weight
    for c in GAIN_OFFSETS:
        want = unit * (c + saved.float())
        tol = 1e-6 * float(want.abs().max().clamp_min(1))
        if torch.allclose(y0, unit * c, rtol=1e-3, atol=tol) and torch.allclose(y, want, rtol=1e-3, atol=tol):
            return c
    return None


def _folded_weight(weight: torch.Tensor, offset: float, s: torch.Tensor) -> torch.Tensor:
    """The weight whose gain ``offset + weight`` is the old gain divided by ``s`` (channels with s 1 kept)."""
    folded = ((offset + weight.float()) / s - offset).to(weight.dtype)
    return torch.where(s == 1, weight, folded)


def _unfolded_weight(weight: torch.Tensor, offset: float, s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 1, weight, ((offset + weight.float()) * s - offset).to(weight.dtype))


def exact_scales(weight: torch.Tensor, offset: float, s: torch.Tensor) -> torch.Tensor:
    """``s`` where folding it into a norm of gain ``offset + weight`` is exact, else the nearest power
    of two toward 1 that is (1 always is).

    Exact means: the folded gain, computed in fp32 as the norms do, is the old gain over ``s`` (the
    norm's output is then exactly divided by ``s`` and the consumers' products are unchanged), and
    unfolding gives back ``weight`` bit for bit. With ``offset`` 0 this holds for every power of two
    short of overflow; with ``offset`` 1, ``1 + w`` is rounded and the folded weight must be
    representable in the weight's dtype (Gemma-3-270M: every channel in fp32, 85-92 % in bf16).
    """
    w = weight.detach()
    s = s.to(w.device, torch.float32)
    out = torch.ones_like(s)
    todo = s != 1
    cur = s.clone()
    for _ in range(2 * MAX_LOG2_SCALE + 1):
        if not bool(todo.any()):
            break
        folded = _folded_weight(w, offset, cur)
        ok = ((offset + folded.float()) == (offset + w.float()) / cur) & (_unfolded_weight(folded, offset, cur) == w)
        hit = todo & ok
        out[hit] = cur[hit]
        todo &= ~ok
        cur = torch.where(cur > 1, cur / 2, torch.where(cur < 1, cur * 2, cur))
    return out


class SmoothingObserver:
    """Collects what smoothing needs from forward passes someone else runs (the probe's, or
    :func:`find_mappings`'s own): the producer of each consumer group's input, found by tensor
    identity, the per-channel input amax, and a uniform sample of ``keep_tokens`` input rows.

    The sample is the ``keep_tokens`` rows with the smallest keys drawn from a seeded generator
    (uniform without replacement over every row seen, whatever the number of windows), so memory
    stays ``keep_tokens`` rows per mapping and samples from several ranks merge exactly. Rows are
    copies in the activation's dtype: a kept row never pins the batch it came from.

    Call :meth:`begin_forward` before and :meth:`end_forward` after each forward pass;
    :meth:`stats` gives the result, :meth:`detach` removes the hooks.
    """

    def __init__(self, model: nn.Module, *, keep_tokens: int = 0, seed: int = 0) -> None:
        from .architectures import model_type_of
        from .models import language_model_layers

        self.keep_tokens = int(keep_tokens)
        self._generator = torch.Generator().manual_seed(seed)
        # the attention inputs draw their sample keys from a generator of their own: observing them leaves
        # every other mapping's sample (and so the default build) as it is without them
        self._attention_generator = torch.Generator().manual_seed(seed + 1)
        self._attention_inputs: set[str] = set()
        self._produced: dict[int, tuple[str, weakref.ref]] = {}  # id(output) -> (norm, output)
        self._consumed: dict[str, str | None] = {}  # consumer -> the norm whose output it got
        self.pairs: dict[str, str | None] = {}  # consumer -> producer seen in every forward
        self.amax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # first consumer -> (keys, rows)
        # (layer, consumers, the Linear whose rows produce their input, its head geometry)
        self.candidates: list[tuple[str, list[str], str | None, tuple[int, int, int] | None]] = []
        self._first: set[str] = set()
        self._hooks: list[Any] = []
        prefix, layers = language_model_layers(model)
        model_type = model_type_of(model)
        for i, layer in enumerate(layers):
            self._watch_layer(f"{prefix}.{i}", layer, model_type)

    def _watch_layer(self, base: str, layer: nn.Module, model_type: str | None) -> None:
        """Consumer groups of one layer from :mod:`pq_lightning.architectures`: each fused set (its
        producer found by dataflow), a gated MLP's ``down`` (its input made by ``up``'s rows) and
        attention's ``o`` (its input made by ``v``'s rows)."""
        from .architectures import attention_vo, fused_siblings, gated_mlp

        mods = dict(layer.named_modules())
        linears = {n for n, m in mods.items() if isinstance(m, nn.Linear)}
        groups: list[tuple[list[str], str | None, tuple[int, int, int] | None]] = [
            ([n for n in sibs if n in linears], None, None) for sibs in fused_siblings(model_type)
        ]
        gated = gated_mlp(model_type)
        if gated is not None and all(n in linears for n in gated):
            groups.append(([gated[2]], gated[1], None))
        vo = attention_vo(model_type)
        if vo is not None and all(n in linears for n in vo):
            heads = _head_geometry(mods, *vo)
            if heads is not None:
                groups.append(([vo[1]], vo[0], heads))
        groups = [(g, rows, heads) for g, rows, heads in groups if g]
        for g, rows, heads in groups:
            self.candidates.append((base, g, rows, heads))
            self._first.add(f"{base}.{g[0]}")
            if heads is not None:
                self._attention_inputs.add(f"{base}.{g[0]}")
            for n in g:
                self._hooks.append(mods[n].register_forward_pre_hook(self._in_hook(f"{base}.{n}")))
        widths = {mods[g[0]].in_features for g, rows, _ in groups if rows is None}
        for n, m in layer.named_modules():
            if n and any(_norm_like(m, w) for w in widths):
                self._hooks.append(m.register_forward_hook(self._out_hook(f"{base}.{n}")))

    def _out_hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self._produced[id(output)] = (name, weakref.ref(output))
        return hook

    def _in_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            seen = self._produced.get(id(x))  # an id outlives its tensor: the weak reference must be this x
            self._consumed[name] = seen[0] if seen is not None and seen[1]() is x else None
            if name in self._first:  # siblings read the same input: its statistics are the first's
                self._observe(name, x.detach().reshape(-1, x.shape[-1]))
        return hook

    def _observe(self, name: str, rows: torch.Tensor) -> None:
        a = rows.abs().amax(0).float()
        self.amax[name] = torch.maximum(self.amax[name], a) if name in self.amax else a
        if self.keep_tokens:
            gen = self._attention_generator if name in self._attention_inputs else self._generator
            keys = torch.rand(rows.shape[0], generator=gen)
            self.samples[name] = _smallest_keys(self.samples.get(name), keys, rows, self.keep_tokens)

    def begin_forward(self) -> None:
        self._produced.clear()
        self._consumed.clear()

    def end_forward(self) -> None:
        for c, p in self._consumed.items():
            self.pairs[c] = p if self.pairs.get(c, p) == p else None
        self.begin_forward()

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state(self) -> dict[str, Any]:
        """What this observer saw, as plain CPU tensors (to merge with other ranks' or to checkpoint)."""
        return {"pairs": dict(self.pairs), "amax": {k: v.cpu() for k, v in self.amax.items()},
                "samples": {k: (kk.cpu(), r.cpu()) for k, (kk, r) in self.samples.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.pairs = dict(state["pairs"])
        self.amax = dict(state["amax"])
        self.samples = {k: tuple(v) for k, v in state["samples"].items()}

    def merge(self, state: Mapping[str, Any]) -> None:
        """Fold another observer's :meth:`state` into this one (see :func:`merge_observer_states`)."""
        self.load_state(merge_observer_states(self.state(), state, self.keep_tokens))

    def stats(self) -> SmoothStats:
        """The mappings found (a norm producer only where every forward agreed on it) and their data."""
        mappings: list[SmoothMapping] = []
        for base, g, rows, heads in self.candidates:
            names = [f"{base}.{n}" for n in g]
            if rows is not None:
                mappings.append(SmoothMapping(f"{base}.{rows}", names, "linear_rows" if heads is None else "head_rows",
                                              heads))
                continue
            producers = {self.pairs.get(n) for n in names}
            if len(producers) == 1 and None not in producers:
                mappings.append(SmoothMapping(producers.pop(), names, "norm"))
        firsts = [m.consumers[0] for m in mappings if m.consumers[0] in self.amax]
        # on the CPU, as the samples: the amax was taken where the activations were (a GPU in the probe)
        return SmoothStats(mappings, {c: self.amax[c].cpu() for c in firsts},
                           {c: self.samples[c][1].float() for c in firsts if c in self.samples})


def _head_geometry(mods: Mapping[str, nn.Module], v: str, o: str) -> tuple[int, int, int] | None:
    """(kv heads, query heads per kv head, head dim) of the attention holding ``v`` and ``o``, read from
    the attention module (``head_dim``, ``num_key_value_groups``) and checked against the shapes."""
    attn = mods.get(v.rpartition(".")[0])
    hd, rep = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
    if not isinstance(hd, int) or not isinstance(rep, int) or hd < 1 or rep < 1:
        return None
    kv, rem = divmod(mods[v].out_features, hd)
    if rem or kv < 1 or mods[o].in_features != kv * rep * hd:
        return None
    return kv, rep, hd


def merge_observer_states(a: Mapping[str, Any], b: Mapping[str, Any], keep_tokens: int) -> dict[str, Any]:
    """Two observers' states as one: a producer only where both agree, the max of the amax, and the
    ``keep_tokens`` rows with the smallest keys of both samples (so merging is order-independent)."""
    pairs = dict(a["pairs"])
    for c, p in b["pairs"].items():
        pairs[c] = p if pairs.get(c, p) == p else None
    amax = dict(a["amax"])
    for k, v in b["amax"].items():
        amax[k] = torch.maximum(amax[k], v) if k in amax else v
    samples = dict(a["samples"])
    for k, (keys, rows) in b["samples"].items():
        samples[k] = _smallest_keys(samples.get(k), keys, rows, keep_tokens)
    return {"pairs": pairs, "amax": amax, "samples": samples}


def _smallest_keys(
    kept: tuple[torch.Tensor, torch.Tensor] | None, keys: torch.Tensor, rows: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of ``kept`` and ``rows`` with the smallest keys, as CPU copies."""
    keys, rows = keys.cpu(), rows.detach()
    if kept is not None:
        kept_keys, kept_rows = kept
        if kept_keys.numel() >= k:  # only rows that beat the largest kept key can enter
            sel = keys < kept_keys.max()
            keys, rows = keys[sel], rows[sel.to(rows.device)]
        keys = torch.cat([kept_keys, keys])
        rows = torch.cat([kept_rows, rows.to("cpu", kept_rows.dtype)])
    if keys.numel() > k:
        idx = torch.topk(keys, k, largest=False).indices
        return keys[idx], rows[idx.to(rows.device)].cpu()
    return keys, rows.to("cpu", copy=True) if kept is None else rows


def find_mappings(model: nn.Module, windows: torch.Tensor, *, keep_tokens: int = 0, seed: int = 0) -> SmoothStats:
    """Mappings of the decoder layers and each one's per-channel input amax over ``windows`` ``[n, T]``
    (plus a uniform sample of ``keep_tokens`` input rows each), from forward passes of its own.

    The pipeline collects the same statistics during the probe's forward passes instead
    (:class:`pq_lightning.callbacks.SmoothingStatistics`): no pass over the data of their own.
    """
    observer = SmoothingObserver(model, keep_tokens=keep_tokens, seed=seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for w in windows:
                observer.begin_forward()
                model(input_ids=w.unsqueeze(0).to(_device(model)))
                observer.end_forward()
    finally:
        observer.detach()
        model.train(was_training)
    return observer.stats()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def fold_smoothing(
    model: nn.Module,
    stats: SmoothStats,
    config: SmoothConfig,
    check_window: torch.Tensor,
    *,
    select: Callable[[SmoothMapping], bool] | None = None,
    formats: Mapping[str, QuantFormat] | None = None,
) -> SmoothResult:
    """Fold the scales of ``stats.mappings`` (those ``select`` keeps) into ``model`` in place.

    ``check_window``: token ids ``[1, T]``; the logits on it must not move, else the folds are undone
    (the attention folds are checked after the others, and only they are undone when they alone fail).
    With ``config.search``, each mapping's alpha (or no fold) is the one whose consumers, quantized
    in ``formats`` (consumer -> format), miss their unquantized output on ``stats.samples`` least.
    Undo a result with :func:`unfold_smoothing`.
    """
    result = SmoothResult()
    if not config.active:
        return result
    was_training = model.training
    model.eval()
    check = check_window.to(_device(model))
    modules = dict(model.named_modules())
    wanted = [m for m in stats.mappings if (select is None or select(m)) and (config.attention or m.kind != "head_rows")]
    with torch.no_grad():
        before = model(input_ids=check).logits.float()
        result.max_logit_change = 0.0  # nothing folded: nothing moved
        for phase in ([m for m in wanted if m.kind != "head_rows"], [m for m in wanted if m.kind == "head_rows"]):
            start = len(result.mappings)
            for m in phase:
                choice = _choose_fold(m, modules, stats, config, formats)
                if isinstance(choice, str):
                    result.skipped.append(choice)
                elif choice is not None:
                    s, alpha, offset = choice
                    _scale(modules[m.producer], [modules[c] for c in m.consumers], m, s, inverse=False, offset=offset)
                    result.mappings.append(m)
                    result.scales[m.producer], result.alphas[m.producer] = s, alpha
                    result.offsets[m.producer] = offset
            if len(result.mappings) == start:
                continue
            after = model(input_ids=check).logits.float()
            change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
            if math.isfinite(change) and change <= 1e-3:
                result.max_logit_change = max(change, result.max_logit_change)
                continue
            _undo_from(model, result, start)
            what = "all folds" if start == 0 else "the attention (v_proj -> o_proj) folds"
            result.skipped.append(f"{what} undone: the logits moved by {change:.2e} of their range")
            result.max_logit_change = change
            if start == 0:
                break  # the dataflow is not what the mappings say: fold nothing
    model.train(was_training)
    return result


def _choose_fold(
    m: SmoothMapping, modules: Mapping[str, nn.Module], stats: SmoothStats, config: SmoothConfig,
    formats: Mapping[str, QuantFormat] | None,
) -> tuple[torch.Tensor, float, float] | str | None:
    """``(s, alpha, gain offset)`` to fold for ``m``, why it cannot fold, or None when no fold beats none."""
    weights = [modules[c].weight for c in m.consumers]
    producer = modules[m.producer]
    offset = gain_offset(producer) if m.kind == "norm" else 0.0
    if offset is None:
        return f"{m.producer}: its output is neither w * n(x) nor (1 + w) * n(x)"

    def feasible(s: torch.Tensor) -> torch.Tensor:
        return exact_scales(producer.weight, offset, s).to(s.device) if m.kind == "norm" else s

    alpha = config.alpha
    x = stats.samples.get(m.consumers[0])
    if config.search and formats is not None and x is not None:
        alpha = _search_alpha(x, weights, [formats[c] for c in m.consumers], stats.amax[m.consumers[0]],
                              config.search, feasible, m.heads)
        if alpha is None:
            return None
    s = feasible(smoothing_scales(stats.amax[m.consumers[0]], weights, alpha, m.heads))
    if bool((s == 1).all()):
        return f"{m.producer}: no channel's scale folds exactly into its (1 + w) gain" if m.kind == "norm" else None
    return s, alpha, offset


def _undo_from(model: nn.Module, result: SmoothResult, start: int) -> None:
    """Unfold and forget ``result``'s folds from the ``start``-th on."""
    undone = SmoothResult(result.mappings[start:], result.scales, offsets=result.offsets)
    unfold_smoothing(model, undone)
    for m in undone.mappings:
        for d in (result.scales, result.alphas, result.offsets):
            d.pop(m.producer, None)
    del result.mappings[start:]


def fold_gains(model: nn.Module, stats: SmoothStats, config: SmoothConfig, fmt: QuantFormat,
               check_window: torch.Tensor) -> dict[str, float]:
    """Consumer -> its RTN output error (weights and inputs in ``fmt``, on ``stats.samples``) with the fold
    :func:`fold_smoothing` makes when every consumer takes ``fmt``, over the error without it.

    The allocator's price of ``fmt`` (measured on the unfolded model) times this ratio is the price of
    what the checkpoint carries. Consumers with no fold (none found, none better, or no sample) are left
    out; the model is handed back unfolded.
    """
    formats = {c: fmt for m in stats.mappings for c in m.consumers}
    folds = fold_smoothing(model, stats, config, check_window, formats=formats)
    unfold_smoothing(model, folds)
    modules = dict(model.named_modules())
    gains: dict[str, float] = {}
    for m in folds.mappings:
        x = stats.samples.get(m.consumers[0])
        if x is None:
            continue
        weights = [modules[c].weight for c in m.consumers]
        plain = output_errors(x, weights, [fmt] * len(weights), None)
        folded = output_errors(x, weights, [fmt] * len(weights), folds.scales[m.producer].to(x.device))
        gains.update({c: f / p for c, p, f in zip(m.consumers, plain, folded, strict=True) if p > 0})
    return gains


def output_errors(
    x: torch.Tensor, weights: Sequence[torch.Tensor], formats: Sequence[QuantFormat], s: torch.Tensor | None
) -> list[float]:
    """Per consumer ``||x W^T - Q_a(x / s) Q(W s)^T||^2 / ||x W^T||^2`` (fp32, RTN)."""
    out = []
    xs = x if s is None else x / s
    for w, fmt in zip(weights, formats, strict=True):
        w = w.detach().float().to(x.device)
        ws = w if s is None else w * s
        xq = fmt.fake_quant_activation(xs, fmt.calibrate_input_global_scale(xs.abs().amax())) if (
            fmt.quantizes_activations) else xs
        y = x @ w.T
        out.append(float((y - xq @ fmt.fake_quant(ws).T).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)))
    return out


def relative_output_error(
    x: torch.Tensor, weights: Sequence[torch.Tensor], formats: Sequence[QuantFormat], s: torch.Tensor | None
) -> float:
    """Sum over consumers of :func:`output_errors`."""
    return sum(output_errors(x, weights, formats, s))


def _search_alpha(
    x: torch.Tensor, weights: Sequence[torch.Tensor], formats: Sequence[QuantFormat], x_amax: torch.Tensor,
    grid: Sequence[float], feasible: Callable[[torch.Tensor], torch.Tensor] | None = None,
    heads: tuple[int, int, int] | None = None,
) -> float | None:
    """The alpha of ``grid`` with the least quantized output error, or None when no fold beats none.
    ``feasible`` maps wanted scales to those that fold exactly (default: all do)."""
    best, best_err = None, relative_output_error(x, weights, formats, None)
    for a in grid:
        s = smoothing_scales(x_amax, weights, a, heads)
        if feasible is not None:
            s = feasible(s)
        err = relative_output_error(x, weights, formats, s.to(x.device))
        if err < best_err:
            best, best_err = a, err
    return best


def _scale(
    producer: nn.Module, consumers: Sequence[nn.Module], m: SmoothMapping, s: torch.Tensor, *, inverse: bool,
    offset: float = 0.0,
) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' columns by it (or undo).
    A norm of gain ``offset + w`` gets the weight whose gain is divided (``s`` from :func:`exact_scales`)."""
    down = (lambda t, f: t.mul_(f)) if inverse else (lambda t, f: t.div_(f))
    up = (lambda t, f: t.div_(f)) if inverse else (lambda t, f: t.mul_(f))
    w = producer.weight
    if m.kind == "norm":
        s32 = s.to(w.device, torch.float32)
        w.copy_(_unfolded_weight(w, offset, s32) if inverse else _folded_weight(w, offset, s32))
    else:
        rows = m.producer_rows(s)
        down(w, rows.to(w.device, w.dtype)[:, None])
        bias = getattr(producer, "bias", None)
        if bias is not None:
            down(bias, rows.to(bias.device, bias.dtype))
    for c in consumers:
        up(c.weight, s.to(c.weight.device, c.weight.dtype))


def refold_smoothing(model: nn.Module, result: SmoothResult) -> None:
    """Fold ``result`` again after :func:`unfold_smoothing`: the same scales, the same bits, no search."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for m in result.mappings:
            _scale(modules[m.producer], [modules[c] for c in m.consumers], m, result.scales[m.producer],
                   inverse=False, offset=result.offsets.get(m.producer, 0.0))


def unfold_smoothing(model: nn.Module, result: SmoothResult) -> None:
    """Undo :func:`fold_smoothing` exactly (power-of-two scales), newest fold first."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for m in reversed(result.mappings):
            _scale(modules[m.producer], [modules[c] for c in m.consumers], m, result.scales[m.producer],
                   inverse=True, offset=result.offsets.get(m.producer, 0.0))


def smooth_model(
    model: nn.Module, windows: torch.Tensor, config: SmoothConfig = SmoothConfig(),  # noqa: B008 (frozen)
    *, select: Callable[[SmoothMapping], bool] | None = None,
) -> SmoothResult:
    """Find the mappings on ``windows`` (calibration token ids ``[n, T]``) and fold them; see
    :func:`fold_smoothing`. The folds are exact, so Linears that stay BF16 lose nothing."""
    if not config.active:
        return SmoothResult()
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"smoothing needs calibration windows [n, T] with n >= 1, got {tuple(windows.shape)}")
    return fold_smoothing(model, find_mappings(model, windows), config, windows[:1], select=select)


def save_smooth_stats(stats: SmoothStats, path) -> None:
    """Write ``stats`` as safetensors (amax and sample rows) with the mappings in the metadata, atomically."""
    import json

    from safetensors.torch import save

    from .atomic import atomic_write_bytes

    tensors = {f"amax::{k}": v.detach().cpu().contiguous() for k, v in stats.amax.items()}
    tensors.update({f"samples::{k}": v.detach().cpu().contiguous() for k, v in stats.samples.items()})
    meta = json.dumps([[m.producer, m.consumers, m.kind, m.heads] for m in stats.mappings])
    atomic_write_bytes(path, save(tensors, metadata={"pq_lightning.smooth_mappings": meta}))


def load_smooth_stats(path) -> SmoothStats:
    """Inverse of :func:`save_smooth_stats`."""
    import json

    from safetensors import safe_open

    amax: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        mappings = [SmoothMapping(p, list(c), k, tuple(h) if h else None)
                    for p, c, k, h in json.loads(f.metadata()["pq_lightning.smooth_mappings"])]
        for key in f.keys():
            kind, _, name = key.partition("::")
            (amax if kind == "amax" else samples)[name] = f.get_tensor(key)
    return SmoothStats(mappings, amax, samples)
