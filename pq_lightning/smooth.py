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
* the ``up_proj`` rows of a gated MLP (``down_proj(act(gate_proj(x)) * up_proj(x))``) -> ``down_proj``.

The attention output (-> ``o_proj``) is left alone: its channels mix heads that grouped-query
attention ties together. After folding the whole model is checked on a calibration window; if the
logits moved, every fold is undone and smoothing is reported as skipped.

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

import torch
from torch import nn

from .formats.base import QuantFormat

#: Floor of an amax before the power (an all-zero channel or column would give 0 or inf).
AMAX_FLOOR = 1e-5
#: Largest |log2 s|: a channel is scaled by at most 2**16 either way.
MAX_LOG2_SCALE = 16


@dataclass(frozen=True)
class SmoothConfig:
    """Activation smoothing in front of NVFP4 W4A4 Linears (SmoothQuant scales, rounded to powers of two).

    ``alpha`` trades activation range for weight range: 0 leaves the activations alone, 1 makes
    every input channel's calibration amax one. With ``search`` (the default) each mapping takes the
    grid's alpha, or no fold, whose consumers' RTN output error (weights and inputs quantized) on
    ``search_tokens`` calibration rows is least; ``alpha`` is then only the fallback for a mapping
    with no format to search with. An empty ``search`` folds ``alpha`` everywhere.
    """

    enabled: bool = True
    alpha: float = 0.5
    search: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    search_tokens: int = 256

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
    kind: str  # "norm" or "linear_rows"


@dataclass
class SmoothStats:
    """What :func:`find_mappings` measured: the mappings, each one's per-channel input amax, and a
    strided sample of its input rows (for the per-mapping search; empty when not asked for)."""

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


def smoothing_scales(x_amax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """Power-of-two SmoothQuant scales ``2**round(log2(amax_x**a / amax_W**(1-a)))`` per input channel."""
    w_amax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    if w_amax.shape != x_amax.shape:
        raise ValueError(f"activation amax has {tuple(x_amax.shape)} channels, the weights {tuple(w_amax.shape)}")
    log2 = alpha * torch.log2(x_amax.float().clamp_min(AMAX_FLOOR)) - (1 - alpha) * torch.log2(
        w_amax.clamp_min(AMAX_FLOOR)
    )
    return torch.exp2(torch.round(log2).clamp(-MAX_LOG2_SCALE, MAX_LOG2_SCALE))


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


def _gain_offset(norm: nn.Module) -> float | None:
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


def find_mappings(model: nn.Module, windows: torch.Tensor, *, keep_tokens: int = 0) -> SmoothStats:
    """Mappings of the decoder layers and each one's per-channel input amax over ``windows`` ``[n, T]``
    (plus at least ``keep_tokens`` input rows each, fewer than twice as many, strided over the windows).

    The producer of q/k/v's and gate/up's input is found by tensor identity during the forward pass;
    the gated-MLP fold is taken where ``up_proj`` and ``down_proj`` exist beside ``gate_proj``.
    """
    from .models import language_model_layers

    prefix, layers = language_model_layers(model)
    produced: dict[int, tuple[str, weakref.ref]] = {}  # id(output) -> (norm, its output), this forward
    consumed: dict[str, str | None] = {}  # consumer -> the norm whose output it was given
    amax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    first_consumers: set[str] = set()
    stride = max(1, windows.numel() // keep_tokens) if keep_tokens else 1
    hooks = []
    candidates: list[tuple[str, list[str]]] = []

    def out_hook(name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                produced[id(output)] = (name, weakref.ref(output))
        return hook

    def in_hook(name: str):
        def hook(module, args):
            x = args[0]
            seen = produced.get(id(x))  # an id outlives its tensor: the weak reference must be this x
            consumed[name] = seen[0] if seen is not None and seen[1]() is x else None
            if name not in first_consumers:
                return  # siblings read the same input: its statistics are the first consumer's
            rows = x.detach().reshape(-1, x.shape[-1])
            a = rows.abs().amax(0).float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
            if keep_tokens:
                samples.setdefault(name, []).append(rows[::stride].float().cpu())
        return hook

    for i, layer in enumerate(layers):
        base = f"{prefix}.{i}"
        mods = dict(layer.named_modules())
        groups = [
            [n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if isinstance(mods.get(n), nn.Linear)],
            [n for n in ("mlp.gate_proj", "mlp.up_proj") if isinstance(mods.get(n), nn.Linear)],
        ]
        if isinstance(mods.get("mlp.down_proj"), nn.Linear) and len(groups[1]) == 2:
            groups.append(["mlp.down_proj"])
        for g in groups:
            if g:
                candidates.append((base, g))
                first_consumers.add(f"{base}.{g[0]}")
                hooks.append(mods[g[0]].register_forward_pre_hook(in_hook(f"{base}.{g[0]}")))
                for other in g[1:]:
                    hooks.append(mods[other].register_forward_pre_hook(in_hook(f"{base}.{other}")))
        width = next((mods[g[0]].in_features for g in groups[:2] if g), None)
        if width is not None:
            for n, m in layer.named_modules():
                if n and _norm_like(m, width):
                    hooks.append(m.register_forward_hook(out_hook(f"{base}.{n}")))

    pairs: dict[str, str] = {}  # consumer -> producer seen in every window
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for w in windows:
                produced.clear()
                consumed.clear()
                model(input_ids=w.unsqueeze(0).to(_device(model)))
                for c, p in consumed.items():
                    if c not in pairs:
                        pairs[c] = p
                    elif pairs[c] != p:
                        pairs[c] = None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    mappings: list[SmoothMapping] = []
    for base, g in candidates:
        names = [f"{base}.{n}" for n in g]
        if g == ["mlp.down_proj"]:
            mappings.append(SmoothMapping(f"{base}.mlp.up_proj", names, "linear_rows"))
            continue
        producers = {pairs.get(n) for n in names}
        if len(producers) == 1 and None not in producers:
            mappings.append(SmoothMapping(producers.pop(), names, "norm"))
    firsts = [m.consumers[0] for m in mappings if m.consumers[0] in amax]
    return SmoothStats(mappings, {c: amax[c] for c in firsts},
                       {c: torch.cat(samples[c]) for c in firsts if c in samples})


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

    ``check_window``: token ids ``[1, T]``; the logits on it must not move, else every fold is undone.
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
    with torch.no_grad():
        before = model(input_ids=check).logits.float()
        for m in stats.mappings:
            if select is not None and not select(m):
                continue
            consumers = [modules[c] for c in m.consumers]
            weights = [c.weight for c in consumers]
            producer = modules[m.producer]
            offset = _gain_offset(producer) if m.kind == "norm" else 0.0
            if offset is None:
                result.skipped.append(f"{m.producer}: its output is neither w * n(x) nor (1 + w) * n(x)")
                continue

            def feasible(s: torch.Tensor, producer=producer, offset=offset, kind=m.kind) -> torch.Tensor:
                return exact_scales(producer.weight, offset, s).to(s.device) if kind == "norm" else s

            alpha = config.alpha
            x = stats.samples.get(m.consumers[0])
            if config.search and formats is not None and x is not None:
                alpha = _search_alpha(x, weights, [formats[c] for c in m.consumers], stats.amax[m.consumers[0]],
                                      config.search, feasible)
                if alpha is None:
                    continue  # no fold beats leaving this input alone
            s = feasible(smoothing_scales(stats.amax[m.consumers[0]], weights, alpha))
            if bool((s == 1).all()):
                result.skipped.append(f"{m.producer}: no channel's scale folds exactly into its (1 + w) gain")
                continue
            _scale(producer, consumers, m.kind, s, inverse=False, offset=offset)
            result.mappings.append(m)
            result.scales[m.producer] = s
            result.alphas[m.producer] = alpha
            result.offsets[m.producer] = offset
        after = model(input_ids=check).logits.float()
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    result.max_logit_change = change
    if not math.isfinite(change) or change > 1e-3:
        unfold_smoothing(model, result)
        result.skipped.append(f"all folds undone: the logits moved by {change:.2e} of their range")
        result.mappings, result.scales = [], {}
    model.train(was_training)
    return result


def quantized_output_error(
    x: torch.Tensor, weights: Sequence[torch.Tensor], formats: Sequence[QuantFormat], s: torch.Tensor | None
) -> float:
    """Sum over consumers of ``||x W^T - Q_a(x / s) Q(W s)^T||^2 / ||x W^T||^2`` (fp32, RTN)."""
    total = 0.0
    xs = x if s is None else x / s
    for w, fmt in zip(weights, formats, strict=True):
        w = w.detach().float().to(x.device)
        ws = w if s is None else w * s
        xq = fmt.fake_quant_activation(xs, fmt.calibrate_input_global_scale(xs.abs().amax())) if (
            fmt.quantizes_activations) else xs
        y = x @ w.T
        total += float((y - xq @ fmt.fake_quant(ws).T).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
    return total


def _search_alpha(
    x: torch.Tensor, weights: Sequence[torch.Tensor], formats: Sequence[QuantFormat], x_amax: torch.Tensor,
    grid: Sequence[float], feasible: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float | None:
    """The alpha of ``grid`` with the least quantized output error, or None when no fold beats none.
    ``feasible`` maps wanted scales to those that fold exactly (default: all do)."""
    best, best_err = None, quantized_output_error(x, weights, formats, None)
    for a in grid:
        s = smoothing_scales(x_amax, weights, a)
        if feasible is not None:
            s = feasible(s)
        err = quantized_output_error(x, weights, formats, s.to(x.device))
        if err < best_err:
            best, best_err = a, err
    return best


def _scale(
    producer: nn.Module, consumers: Sequence[nn.Module], kind: str, s: torch.Tensor, *, inverse: bool,
    offset: float = 0.0,
) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' columns by it (or undo).
    A norm of gain ``offset + w`` gets the weight whose gain is divided (``s`` from :func:`exact_scales`)."""
    down = (lambda t, f: t.mul_(f)) if inverse else (lambda t, f: t.div_(f))
    up = (lambda t, f: t.div_(f)) if inverse else (lambda t, f: t.mul_(f))
    w = producer.weight
    f = s.to(w.device, w.dtype)
    if kind == "norm":
        s32 = s.to(w.device, torch.float32)
        w.copy_(_unfolded_weight(w, offset, s32) if inverse else _folded_weight(w, offset, s32))
    else:
        down(w, f[:, None])
    bias = getattr(producer, "bias", None)
    if kind == "linear_rows" and bias is not None:
        down(bias, s.to(bias.device, bias.dtype))
    for c in consumers:
        up(c.weight, s.to(c.weight.device, c.weight.dtype))


def unfold_smoothing(model: nn.Module, result: SmoothResult) -> None:
    """Undo :func:`fold_smoothing` exactly (power-of-two scales), newest fold first."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for m in reversed(result.mappings):
            _scale(modules[m.producer], [modules[c] for c in m.consumers], m.kind, result.scales[m.producer],
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
