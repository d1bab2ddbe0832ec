"""The GPTQ refiner: walk the decoder layer by layer, upstream already quantized, and decide each Linear.

Pure maths-level orchestration (no Lightning): :func:`refine_model` takes a Hugging Face causal LM, a
plan (Linear name -> format name) and calibration windows, and returns the exact on-disk tensors of
every quantized body Linear plus the calibrated input amax that W4A4 NVFP4 needs for its
``input_global_scale``. The per-Linear maths (GPTQ, scale sweep, RTN gate) is :mod:`pq_lightning.gptq`.

How the walk goes
    1. *Capture.* One forward of the model per window, with a pre-hook on every decoder layer that
       records the arguments the layer is called with (references, not copies: position embeddings
       and masks are shared objects) and, for layer 0, the hidden states. The layers themselves do
       not compute during the capture (each hands its input on: the arguments a model gives its
       layers, masks and rotary tables, do not depend on the hidden states), and the hook on the last
       layer stops the forward. Per-layer arguments matter: Gemma-style models pass each layer the mask and
       rotary embeddings of its own attention type (sliding / full), and per-layer inputs.
    2. *Layer ℓ.* The Linears of layer ℓ are grouped into fused sets (:func:`fused_groups`: q/k/v,
       gate/up; one input, one Hessian, one NVFP4 weight global scale, one input amax) and the groups
       are processed in the order the layer *executes* them (recorded on the first window, e.g.
       q/k/v -> o -> gate/up -> down). For each group, the layer is re-run on every stored window
       with every already-decided Linear of the layer in its served state, and the forward stops as
       soon as the group's input is known (at the first member's pre-hook: the members share it):

       * amax pass (only when the format has ``static_input_scale``, W4A4 NVFP4): ``max |x|`` of the
         group's input; all-reduced with MAX across ranks; ``input_global_scale`` =
         ``fmt.calibrate_input_global_scale(amax)``. When the group's inputs over this rank's windows
         take at most ``max_kept_input_bytes`` (default 1 GiB: the inputs of one group, in the
         model's dtype), the pass keeps them and the Hessian
         below is built from them instead of from a second pass (the same sums);
       * Hessian pass, only when a decision needs it (the format refines: NVFP4; FP8 with
         ``fp8_gptq``; or ``rtn_errors`` / ``keep_hessians`` ask for every group): ``H = Σ x̂ᵀx̂``
         (fp32, the blocks on and above the diagonal summed, the rest mirrored once) of the *served*
         input ``x̂ = fmt.fake_quant_activation(x, input_global_scale)`` (NVFP4 W4A4: dynamic per-16
         scales under the static global scale just calibrated; FP8 W8A8: per token; weight-only
         formats: ``x`` itself), separately over fit and held-out windows, with token counts;
         all-reduced with SUM across ranks. A group packed by RTN by rule with no static input
         scale (FP8 by default) has no pass at all: it is packed and put in its served state.

       Each member is then decided from ``H_fit / n_fit`` and ``H_heldout / n_heldout`` (per-token
       output errors; with ``config.refit`` the chosen recipe is then solved again on
       ``(H_fit + H_heldout) / (n_fit + n_heldout)``) by ``fmt.refine`` (NVFP4: :func:`~pq_lightning.gptq.refine_nvfp4`;
       FP8, whose ``refine_by_default`` is off, only with ``fp8_gptq``: :func:`~pq_lightning.gptq.refine_fp8`), under the
       siblings' shared weight scale ``fmt.shared_global_scale`` when the format declares
       ``shares_global_scale`` (NVFP4: ``448·6 / max_siblings amax|W|``); a format without ``refine``
       -> RTN (``fmt.pack``); BF16 -> untouched. ``gptq=False`` makes every
       Linear RTN (the input amax is still calibrated: the export needs it). The decided group is put
       in its served state: weight = the decided ``ŵ`` cast to the weight's dtype, and a pre-hook that
       applies the format's activation fake-quant with the calibrated scale. Later groups of the same
       layer therefore see the quantized earlier ones.
    3. The layer is run once more, fully served, on every window; its outputs become layer ℓ+1's
       stored inputs (skipped for the last layer). Layer ℓ's weights are then restored and its hooks
       removed: its effect lives on only in the stored hidden states.

    Layer forwards per layer: one discovery run (one window) + per measured group one pass cut short
    before the group (two when its inputs are too large to keep) + one full output pass. A block of
    the layer whose quantized Linears are all decided (``self_attn`` once ``o_proj`` is) gives the
    same output in every later pass: the first later pass records it and the others replay it
    (:class:`_BlockReplays`), so on a Llama layer the attention block runs about twice instead of
    four times. When the block's last Linear kept its inputs (``o_proj``, ``down_proj`` in NVFP4),
    that first pass runs only this Linear on them, so the attention block and the MLP's gate, up
    and activation run once per layer. Everything runs under ``torch.no_grad`` with the model in
    eval mode; the caller's model comes back bit-identical (same Parameter objects and storages; a
    ``try/finally`` restores weights, hooks and the train/eval flag even when something fails).

Memory
    Stored hidden states: ``n_windows × seqlen × hidden`` in the model's dtype, twice during a layer
    (its inputs and the next layer's inputs), on the model's device, plus the replayed block's
    outputs (one more such copy, under the same ``max_resident_activation_bytes``), plus each window's captured
    layer arguments (rotary tables, masks: shared across layers of one attention type). Per group one
    or two ``[in, in]`` fp32 Hessians (fit and held-out), plus one layer's served weights at a time,
    plus the group's kept inputs (at most ``max_kept_input_bytes``) while its Hessians are built
    (kept until the block it ends has been recorded, at most to the layer's output pass).
    For a 31B model with 128 windows × 2048 tokens × 5376 hidden in bf16 that is ~2.8 GB per copy of
    the hidden states. Weights stay where they are; the packed results are moved to the CPU.

Distributed
    With an initialised ``torch.distributed`` (or an explicit ``process_group``) every rank walks its
    own windows; amax is all-reduced with MAX and Hessians and token counts with SUM before each
    decision. Each Linear is then decided by one rank only, its owner: owners are assigned greedily
    to the least-loaded rank, largest Linear first, with the cost ``out·in² + in³`` of GPTQ (the
    column loop and the inverse-Hessian factor), a rule every rank evaluates identically from the
    shapes. The owner broadcasts the packed tensors and the decision record; every rank decodes the
    served weight from the packed tensors (``fmt.unpack``, the exact weight the decision chose), so
    all ranks hold identical results and the next group's inputs agree. Every rank must call this
    with the same plan and model; a rank without windows is an error (raised on every rank).

Models larger than memory
    With a :class:`~pq_lightning.streaming.LayerStreamer` attached to the model, each decoder layer is
    put on the device for its step of the walk and dropped after it (the capture forward streams every
    layer once per window under the streamer's memory cap). The stored hidden states and Hessians are
    as above; the results equal the in-memory walk.

One walk per plan: each layer's statistics depend on the plan upstream. A sweep of budgets can share
one walk on the unquantized stream instead (:mod:`pq_lightning.shared_walk`, ``--refine.walk shared``).

Known limits
    A Linear called more than once in one layer forward disables the early stop (correct, slower).
    Planned Linears outside the decoder layers (``lm_head``...) are not refined (a warning says so):
    the export packs them by RTN and needs their input amax from another calibration.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .activation_store import ActivationStore, ResidentBudget
from .architectures import fused_groups, model_type_of
from .flops import FlopTally, count_flops, not_counted
from .formats import get_format
from .formats.base import QuantFormat
from .gptq import _PANEL, GPTQConfig, output_error, output_errors
from .input_error import InputErrors, InputErrorSums, full_output_errors
from .models import language_model_layers
from .streaming import streamer_of

__all__ = ["LinearDecision", "RefineOutput", "refine_model"]


# ---- results ------------------------------------------------------------------------------------
@dataclass
class LinearDecision:
    """What the refiner chose for one Linear and why.

    ``errors``: every candidate's per-token output error ``tr(ΔW H ΔWᵀ)/n`` on the fit and held-out
    Hessians, keyed like :attr:`pq_lightning.gptq.RefineResult.candidates` (``"rtn"``,
    ``"gptq@0.01"``, ``"sweep"``...). ``method`` is ``"rtn"``, ``"gptq"``, ``"sweep"``,
    ``"sweep+gptq"`` or ``"bf16"`` (left as is); ``damp`` the chosen GPTQ damping or ``None``.
    ``heldout_chosen`` is the chosen candidate's held-out error, the gate's evidence. Both are
    ``None`` (and ``errors`` empty) for a Linear no decision needed to measure: one its format packs
    by RTN (FP8 unless ``fp8_gptq``), unless the walk runs with ``rtn_errors``. ``refit``: the
    packed weight is that recipe solved again on the fit and held-out tokens together
    (:attr:`~pq_lightning.gptq.GPTQConfig.refit`); its errors are ``errors["refit"]`` (in-sample).
    ``target_damp``: the candidates were fitted to the input-compensating target at that damping
    (:attr:`~pq_lightning.gptq.GPTQConfig.compensate_inputs`; then every error is the one against the
    unquantized Linear on the unquantized input); ``None``: to the weight itself.
    ``heldout_act_rtn`` / ``heldout_act_chosen``: what the quantized input adds to the held-out error
    of RTN's weight and of the packed one, ``2⟨W − Ŵ, W C⟩ + tr(W G Wᵀ)``
    (:class:`~pq_lightning.input_error.ErrorTerms`), so that ``heldout_* + heldout_act_*`` is the error
    against the unquantized Linear on the unquantized input; ``0.0`` when the errors already are
    (``compensate_inputs``), ``None`` when not measured (:attr:`GPTQConfig.measure_input_error`).
    """

    name: str
    format: str
    method: str
    damp: float | None
    errors: dict[str, dict[str, float]]
    heldout_rtn: float | None
    heldout_chosen: float | None
    refit: bool = False
    target_damp: float | None = None
    heldout_act_rtn: float | None = None
    heldout_act_chosen: float | None = None

    @property
    def refine_gain(self) -> float | None:
        """Held-out output error against the unquantized Linear, packed over RTN (weight and input
        error together; below 1 where refine paid); ``None`` unless the input error was measured."""
        if self.heldout_act_rtn is None or self.heldout_rtn is None or self.heldout_chosen is None:
            return None
        rtn = self.heldout_rtn + self.heldout_act_rtn
        return (self.heldout_chosen + self.heldout_act_chosen) / rtn if rtn > 0 else 1.0


@dataclass
class RefineOutput:
    """The refiner's result.

    * ``packed``: name -> the exact on-disk tensors of every quantized Linear (CPU), ready for
      ``export_checkpoint(quantized=...)`` (``input_global_scale`` is not included: it comes from
      ``input_amax``);
    * ``input_amax``: name -> ``max |x|`` of the Linear's input over all calibration windows with
      upstream quantized (fused siblings share the max), for every quantized Linear whose input was
      observed: those whose format calibrates a static input scale (W4A4 NVFP4: the export needs it)
      and every measured one;
    * ``decisions``: name -> :class:`LinearDecision` (BF16 Linears of the plan included);
    * ``totals``: summed per-token held-out errors of the measured Linears ``{"heldout_rtn",
      "heldout_chosen", "by_format": {format: {"heldout_rtn", "heldout_chosen", "n_linears",
      "n_refined", "n_measured"}}}``;
    * ``hessians``: only with ``keep_hessians=True``: group (tuple of names) -> ``{"fit", "n_fit",
      "heldout", "n_heldout"}``, the raw summed fp32 Hessians (CPU) the decisions used.
    """

    packed: dict[str, dict[str, torch.Tensor]]
    input_amax: dict[str, float]
    decisions: dict[str, LinearDecision]
    totals: dict[str, Any]
    hessians: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)

    def save(self, path) -> None:
        """The packed tensors (safetensors) with amax, decisions and totals (metadata), atomically."""
        import json
        from dataclasses import asdict

        from safetensors.torch import save

        from .atomic import atomic_write_bytes

        tensors = {f"{name}::{k}": t.detach().cpu().clone() for name, d in self.packed.items() for k, t in d.items()}
        meta = {"input_amax": self.input_amax, "decisions": {n: asdict(d) for n, d in self.decisions.items()},
                "totals": self.totals}
        atomic_write_bytes(path, save(tensors, metadata={"pq_lightning.refine": json.dumps(meta, default=float)}))

    @classmethod
    def load(cls, path) -> RefineOutput:
        """Inverse of :meth:`save`."""
        import json

        from safetensors import safe_open

        packed: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["pq_lightning.refine"])
            for key in f.keys():
                name, _, tensor = key.rpartition("::")
                packed.setdefault(name, {})[tensor] = f.get_tensor(key)
        return cls(packed=packed, input_amax={k: float(v) for k, v in meta["input_amax"].items()},
                   decisions={n: LinearDecision(**d) for n, d in meta["decisions"].items()}, totals=meta["totals"])


# ---- hooks and capture --------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a hook to cut a forward short once what it needed has run."""


@dataclass
class _Window:
    split: str  # "fit" or "heldout"
    args: tuple  # positional args of the layer call, hidden states first
    kwargs: dict


def _input_ids(batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        ids, extra = batch, {}
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        ids = batch["input_ids"]
        extra = {k: batch[k] for k in ("attention_mask",) if batch.get(k) is not None}
    else:
        raise ValueError(
            "calibration batches must be LongTensors of token ids [batch, seqlen] or dicts with "
            f"'input_ids'; got {type(batch).__name__}"
        )
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        extra = {k: v.unsqueeze(0) if v.dim() == 1 else v for k, v in extra.items()}
    return ids, extra


def _capture(
    model: nn.Module, layers: nn.ModuleList, batches: Iterable[Any], split: str, device: torch.device
) -> list[list[_Window]]:
    """Per window, the call of every decoder layer: ``out[window][layer]`` (hidden states only for 0)."""
    windows: list[list[_Window]] = []
    current: list[_Window] = []
    last = len(layers) - 1

    def make_hook(idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                kwargs = dict(kwargs)
                hidden, rest = kwargs.pop("hidden_states"), ()
            stored = (hidden.detach(),) if idx == 0 else (None,)
            current.append(_Window(split, stored + rest, dict(kwargs)))
            if idx == last:
                raise _StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:  # only the calls are wanted: each layer hands its input on untouched
        layer.forward = _pass_through
    streamer = streamer_of(model)
    paused = streamer.paused_loading() if streamer is not None else contextlib.nullcontext()
    try:
        with paused:
            for batch in batches:
                ids, extra = _input_ids(batch)
                current = []
                try:
                    model(input_ids=ids.to(device), use_cache=False, **{k: v.to(device) for k, v in extra.items()})
                except _StopForward:
                    pass
                if len(current) != len(layers):
                    raise RuntimeError(
                        f"captured {len(current)} of {len(layers)} decoder-layer calls for one window; the "
                        "model's forward does not call every decoder layer once (unsupported architecture)"
                    )
                windows.append(current)
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            del layer.forward
    return windows


def _pass_through(*args: Any, **kwargs: Any) -> torch.Tensor:
    """A decoder layer's stand-in during the capture: returns its hidden states unchanged."""
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: _Window) -> torch.Tensor | None:
    """Run ``layer`` on stored inputs; ``None`` when a hook stopped it early."""
    try:
        return _layer_output(layer(hidden, *call.args[1:], **call.kwargs))
    except _StopForward:
        return None


# ---- distributed --------------------------------------------------------------------------------
def _dist_active(process_group: Any) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return False
    return True


class _Owners:
    """Greedy load balancing of per-Linear decisions over the ranks (identical on every rank)."""

    def __init__(self, world_size: int) -> None:
        self.load = [0.0] * world_size

    def assign(self, shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
        """Owner rank of each Linear: largest GPTQ cost first, to the least-loaded rank (ties: lowest)."""
        owners: dict[str, int] = {}
        for name in sorted(shapes, key=lambda n: (-_gptq_cost(shapes[n]), n)):
            rank = min(range(len(self.load)), key=lambda r: (self.load[r], r))
            owners[name] = rank
            self.load[rank] += _gptq_cost(shapes[name])
        return owners


def _gptq_cost(shape: tuple[int, int]) -> float:
    out_f, in_f = shape
    return float(out_f) * in_f * in_f + float(in_f) ** 3


def _broadcast_decision(
    packed: Mapping[str, torch.Tensor] | None, decision: LinearDecision | None, owner: int, process_group: Any
) -> tuple[dict[str, torch.Tensor], LinearDecision]:
    """The owner's packed tensors (CPU) and decision record, on every rank of the group.

    The record and the tensors' names, dtypes and shapes go as one pickled object; each tensor's bytes
    then go as a raw uint8 broadcast (pickling float8 tensors is not portable across torch's
    serialisers, raw bytes are exact for every dtype).
    """
    import torch.distributed as dist

    src = owner if process_group is None else dist.get_global_rank(process_group, owner)
    meta = None if packed is None else (decision, [(k, v.dtype, tuple(v.shape)) for k, v in packed.items()])
    box = [meta]
    dist.broadcast_object_list(box, src=src, group=process_group)
    decision, layout = box[0]
    device = torch.device("cpu") if dist.get_backend(process_group) == "gloo" else torch.device("cuda", torch.cuda.current_device())
    out: dict[str, torch.Tensor] = {}
    for key, dtype, shape in layout:
        if packed is not None:
            buf = packed[key].contiguous().reshape(-1).view(torch.uint8).to(device)
        else:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            buf = torch.empty(n, dtype=torch.uint8, device=device)
        dist.broadcast(buf, src=src, group=process_group)
        out[key] = buf.cpu().view(dtype).reshape(shape)
    return out, decision


def _all_reduce(tensors: Sequence[torch.Tensor], op: str, process_group: Any) -> list[torch.Tensor]:
    """All-reduce fp32/fp64 tensors in one collective (CPU buffer for gloo); returns new tensors."""
    import torch.distributed as dist

    # gloo reduces host memory, NCCL device memory: every piece goes to the backend's device first
    # (the token counts are built on the CPU, the Hessians wherever the layer ran)
    device = torch.device("cpu") if dist.get_backend(process_group) == "gloo" else torch.device(
        "cuda", torch.cuda.current_device())
    buf = torch.cat([t.detach().to(device, torch.float64).reshape(-1) for t in tensors])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=process_group)
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(buf[offset : offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        offset += n
    return out


# ---- per-group statistics -----------------------------------------------------------------------
class _GroupStats:
    """Input amax and fit / held-out Hessians of one fused group, fed by forward pre-hooks."""

    def __init__(self, split: dict[str, str]) -> None:
        self._split = split  # shared, mutable: which split the window being run belongs to
        self.amax: torch.Tensor | None = None
        self.H: dict[str, torch.Tensor | None] = {"fit": None, "heldout": None}
        self.n: dict[str, int] = {"fit": 0, "heldout": 0}
        self.quantize_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
        self.track_amax_in_hessian_pass = True
        # inputs kept by the amax pass (and their splits), so the Hessian needs no second pass
        self.kept: ActivationStore | None = None
        self.kept_splits: list[str] = []
        self.errors: InputErrorSums | None = None  # the input's quantization error, when compensated

    def observe_amax(self, module: nn.Module, args: tuple) -> None:
        a = args[0].detach().abs().amax().float()
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        if self.kept is not None:
            self.kept.append(args[0].detach().clone())
            self.kept_splits.append(self._split["split"])

    def accumulate(self, module: nn.Module, args: tuple) -> None:
        if self.track_amax_in_hessian_pass:
            self.observe_amax(module, args)
        self._add(self._split["split"], args[0])

    def accumulate_kept(self) -> None:
        """The Hessians from the inputs the amax pass kept (same windows, same order: same sums).
        The inputs stay kept: a group ending its block replays the block from them (:meth:`take_kept`)."""
        assert self.kept is not None
        for split, x in zip(self.kept_splits, self.kept, strict=True):
            self._add(split, x)

    def take_kept(self) -> ActivationStore | None:
        """The kept inputs, now the caller's to close."""
        kept, self.kept, self.kept_splits = self.kept, None, []
        return kept

    def close(self) -> None:
        if self.kept is not None:
            self.take_kept().close()

    def _add(self, split: str, x: torch.Tensor) -> None:
        xq = self.quantize_input(x)
        _accumulate(self.H, self.n, split, xq)
        if self.errors is not None:
            self.errors.add(split, x, xq)


def _accumulate(H: dict, n: dict, split: str, xq: torch.Tensor) -> None:
    """``H[split] += xqᵀxq`` (upper panels, fp32; created on first use) and its token count."""
    xq = xq.detach().reshape(-1, xq.shape[-1]).float()
    if H[split] is None:
        H[split] = torch.zeros(xq.shape[1], xq.shape[1], dtype=torch.float32, device=xq.device)
    _add_gram_upper_(H[split], xq)
    n[split] += xq.shape[0]


def _add_gram_upper_(H: torch.Tensor, x: torch.Tensor) -> None:
    """``H += xᵀx`` on the column panels' blocks on and above the diagonal only (the rest is left
    as is: :func:`_mirror_upper_` completes ``H`` once the sums are done). About half the products
    of the full ``xᵀx``: 1.6-1.9x faster on a CPU for 576-2048 inputs."""
    n = x.shape[1]
    for j0 in range(0, n, _PANEL):
        j1 = min(j0 + _PANEL, n)
        H[:j1, j0:j1].addmm_(x[:, :j1].T, x[:, j0:j1])


def _mirror_upper_(H: torch.Tensor) -> torch.Tensor:
    """Completes a Hessian summed by :func:`_add_gram_upper_`: the blocks below the diagonal blocks
    become the transpose of those above (the diagonal blocks were summed whole)."""
    n = H.shape[0]
    for j0 in range(_PANEL, n, _PANEL):
        H[j0 : j0 + _PANEL, :j0] = H[:j0, j0 : j0 + _PANEL].T
    return H


def compensates(config: GPTQConfig, fmt: QuantFormat) -> bool:
    """Whether a measured group of ``fmt`` collects its input error: the config asks for input
    compensation or for its measurement, and the format quantizes its input (W4A4 NVFP4, W8A8 FP8)."""
    return (config.compensate_inputs or config.measure_input_error) and fmt.quantizes_activations


def _input_quantizer(fmt: QuantFormat, igs: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if not fmt.quantizes_activations:
        return lambda x: x
    return _SharedInputQuantizer(lambda x: fmt.fake_quant_activation(x, igs))


class _SharedInputQuantizer:
    """A group's activation fake-quant, computed once per input tensor: fused siblings (q/k/v,
    gate/up) are called with the same tensor object one after the other, and each would otherwise
    quantize it again (as costly as their matmul on a CPU). Keeps the last input and its result."""

    def __init__(self, quantize: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.quantize = quantize
        self.last: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.last is not None and self.last[0] is x and self.last[1] == x._version:
            return self.last[2]
        out = self.quantize(x)
        self.last = (x, x._version, out)
        return out


def _served_input_hook(quantize: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (quantize(args[0]), *args[1:])

    return hook


def _rtn(fmt: QuantFormat, W: torch.Tensor, gs: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    packed = fmt.pack(W) if gs is None else fmt.pack(W, global_scale=gs)
    return packed, fmt.unpack(packed).float()


def _errors(W: torch.Tensor, w_hat: torch.Tensor, H_fit: torch.Tensor, H_held: torch.Tensor,
            input_error: InputErrors | None) -> dict[str, float]:
    if input_error is None:
        return {"fit": output_error(W, w_hat, H_fit), "heldout": output_error(W, w_hat, H_held)}
    base = output_errors(W, [w_hat], [H_fit, H_held])
    terms = [input_error.fit.terms(W), input_error.heldout.terms(W)]
    fit, held = full_output_errors(W, base, [w_hat], terms)[0].tolist()
    return {"fit": fit, "heldout": held}


def _decide(
    name: str,
    fmt: QuantFormat,
    W: torch.Tensor,
    H_fit: torch.Tensor | None,
    H_held: torch.Tensor | None,
    gs: torch.Tensor | None,
    *,
    config: GPTQConfig,
    gptq: bool,
    fp8_gptq: bool,
    factor_cache: dict | None = None,
    H_refit: torch.Tensor | None = None,
    input_error: InputErrors | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, LinearDecision]:
    """Packed tensors, served weight (fp32) and the decision record of one quantized Linear
    (``H_fit`` ``None``: RTN, not measured; ``input_error``: errors against the unquantized Linear,
    and the input compensation of :attr:`GPTQConfig.compensate_inputs`)."""
    Wf = W.detach().float()
    res = None
    if H_fit is None:
        packed, w_hat = _rtn(fmt, Wf, gs)
        return packed, w_hat, LinearDecision(name, fmt.name, "rtn", None, {}, None, None)
    if gptq and (fmt.refine_by_default or fp8_gptq):
        res = fmt.refine(Wf, H_fit, H_held, config=config, global_scale=gs, factor_cache=factor_cache,
                         H_refit=H_refit, input_error=input_error)
    if res is not None:
        packed, w_hat = fmt.pack_quantized(res.quantized), res.w_hat
        errors = {k: {"fit": c.fit, "heldout": c.heldout} for k, c in res.candidates.items()}
        decision = LinearDecision(name, fmt.name, res.method, res.damp, errors, errors["rtn"]["heldout"],
                                  errors[res.key]["heldout"], res.refit, res.target_damp)
    else:  # no refinement asked for, or the format has none
        packed, w_hat = _rtn(fmt, Wf, gs)
        errs = _errors(Wf, w_hat, H_fit, H_held, input_error if config.compensate_inputs else None)
        decision = LinearDecision(name, fmt.name, "rtn", None, {"rtn": errs}, errs["heldout"], errs["heldout"])
    if input_error is not None and config.measure_input_error:
        decision.heldout_act_rtn, decision.heldout_act_chosen = _input_error_added(
            fmt, Wf, w_hat, gs, input_error, already_in=config.compensate_inputs)
    return packed, w_hat, decision


def _input_error_added(fmt: QuantFormat, W: torch.Tensor, w_hat: torch.Tensor, gs: torch.Tensor | None,
                       input_error: InputErrors, *, already_in: bool) -> tuple[float, float]:
    """What the quantized input adds to the held-out error of RTN's weight and of ``w_hat``
    (:attr:`LinearDecision.heldout_act_rtn`); zeros when the decision's errors include it already."""
    if already_in:
        return 0.0, 0.0
    terms = input_error.heldout.terms(W)
    Wd, P = W.double(), terms.WC.double()
    added = [2.0 * float(((Wd - w.to(Wd.device).double()) * P).sum()) + terms.const
             for w in (_rtn(fmt, W, gs)[1], w_hat)]
    return added[0], added[1]


# ---- one layer ----------------------------------------------------------------------------------
class _LayerStep:
    """Decides the Linears of one decoder layer, group by group, on its stored inputs."""

    def __init__(
        self,
        layer: nn.Module,
        prefix: str,
        hidden: ActivationStore,
        calls: list[_Window],
        formats: Mapping[str, QuantFormat],
        groups: Sequence[Sequence[str]],
    ) -> None:
        self.layer, self.hidden, self.calls = layer, hidden, calls
        self.linears = {f"{prefix}{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        self.formats = formats
        self.split = {"split": "fit"}
        quant = [n for n in self.linears if n in formats and formats[n].quantizes_weights]
        # the layer's blocks (self_attn, mlp...) that hold quantized Linears, and which ones
        self.block_linears = {name: {f"{prefix}{name}.{n}" for n, _ in child.named_modules()} & set(quant)
                              for name, child in layer.named_children()}
        self.block_linears = {name: held for name, held in self.block_linears.items() if held}
        self.blocks = {name: layer.get_submodule(name) for name in self.block_linears}
        self.decided: set[str] = set()
        self.replays = _BlockReplays(budget=hidden.budget, spill_dir=hidden.spill_dir)
        self.order, n_calls = self._discover(quant)
        never = [n for n in quant if n not in self.order]
        if never:
            raise RuntimeError(f"{never} never ran in the layer's forward; the refiner cannot calibrate them")
        # a Linear run twice in one forward may feed itself: then always run the whole layer
        self.early_stop = all(c == 1 for c in n_calls.values())
        in_layer = set(quant)
        groups = [tuple(m for m in g if m in in_layer) for g in groups]
        groups = [g for g in groups if g]
        groups += [(n,) for n in quant if not any(n in g for g in groups)]
        for g in groups:
            kinds = {formats[m].name for m in g}
            if len(kinds) > 1:
                raise ValueError(
                    f"fused siblings must share one format (vLLM runs them as one matmul): {g} have "
                    f"{sorted(kinds)}. Give every member of the group the same format in the plan."
                )
        self.groups = sorted(groups, key=lambda g: min(self.order[m] for m in g))

    def _discover(self, names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
        """Execution order and call counts of ``names`` on the first window (blocks called more
        than once per forward are never replayed)."""
        order: dict[str, int] = {}
        n_calls: dict[str, int] = {}

        def make(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                order.setdefault(name, len(order))
                n_calls[name] = n_calls.get(name, 0) + 1

            return hook

        handles = [self.linears[n].register_forward_pre_hook(make(n)) for n in names]
        handles += [b.register_forward_pre_hook(make(f"block:{k}")) for k, b in self.blocks.items()]
        try:
            _run_layer(self.layer, self.hidden[0], self.calls[0])
        finally:
            for h in handles:
                h.remove()
        self.blocks = {k: b for k, b in self.blocks.items() if n_calls.get(f"block:{k}") == 1}
        return {n: o for n, o in order.items() if n in names}, {n: c for n, c in n_calls.items() if n in names}

    def mark_decided(self, group: Sequence[str]) -> None:
        """The group is in its served state: blocks whose quantized Linears are all decided now give
        the same output in every later pass (their inputs come from decided or fixed modules)."""
        self.decided.update(group)

    def _complete_blocks(self) -> list[str]:
        return [k for k in self.blocks if self.block_linears[k] <= self.decided]

    def block_ended_by(self, group: Sequence[str]) -> str | None:
        """The block whose last-run quantized Linear is the group's only member (it may end the block:
        :class:`_TailReplay` checks that it does)."""
        if len(group) != 1:
            return None
        for k, held in self.block_linears.items():
            if k in self.blocks and group[0] in held and max(held, key=self.order.__getitem__) == group[0]:
                return k
        return None

    def _run_windows(self, each: Callable[[torch.Tensor], None] | None = None, *, last: bool = False) -> None:
        """Run every window through the layer, replaying the complete blocks (:class:`_BlockReplays`)
        and, unless this is the layer's ``last`` pass, recording those completed since (a recording
        is kept only when the pass ran the block on every window)."""
        with self.replays.around(self._complete_blocks(), self.blocks, len(self.calls), record=not last):
            for h_in, call in zip(self.hidden, self.calls, strict=True):
                self.split["split"] = call.split
                out = _run_layer(self.layer, h_in, call)
                if each is not None:
                    each(out)

    def close(self) -> None:
        self.replays.close()

    def run_group_pass(self, group: Sequence[str], pre_hook: Callable[[nn.Module, tuple], None]) -> None:
        """Run every window with ``pre_hook`` on the group's first-executed member and stop there: the
        members share that input, so nothing after it is needed (the whole layer runs when a Linear is
        called more than once per forward)."""
        first = min(group, key=lambda m: self.order[m])

        def observe_then_stop(module: nn.Module, args: tuple) -> None:
            pre_hook(module, args)
            raise _StopForward

        handles = [self.linears[first].register_forward_pre_hook(observe_then_stop if self.early_stop else pre_hook)]
        try:
            self._run_windows()
        finally:
            for h in handles:
                h.remove()

    def outputs(self, store: ActivationStore) -> ActivationStore:
        """The layer's outputs on every window, appended to ``store`` (the next layer's inputs)."""
        self._run_windows(store.append, last=True)
        return store


class _BlockReplays:
    """Recorded outputs of a layer's complete blocks, one per window, and their replay.

    Once every quantized Linear of a block (``self_attn`` after ``o_proj`` is decided) is in its
    served state, its output on each window no longer changes, yet every later pass of the layer
    (the prefixes of the later groups, the output pass) would compute it again: on a Llama layer
    the attention block is ~30 % of a forward, and its served inputs need activation fake-quant.
    The first pass that runs a complete block records its outputs (a forward hook); later passes
    replace the block's ``forward`` by a lookup of the window's recorded output (bit for bit what it
    would compute: same inputs, same weights). Outputs that are not a tensor or a tuple of a tensor
    and ``None`` (attention weights not returned) are not recorded. When the block's last Linear
    kept its inputs for its Hessians (``o_proj``, ``down_proj`` in NVFP4), even that first pass
    skips the block: it runs only that Linear on them (:class:`_TailReplay`); the layer's last
    pass, the output pass, records nothing.
    """

    def __init__(self, budget: ResidentBudget, spill_dir: str | None) -> None:
        self.budget, self.spill_dir = budget, spill_dir
        self.stores: dict[str, tuple[ActivationStore, int]] = {}  # block -> (outputs, tuple length or 0)
        self.unrecordable: set[str] = set()
        self.tails: dict[str, _TailReplay] = {}

    def add_tail(self, key: str, linear: nn.Module, inputs: ActivationStore) -> None:
        """The block ``key`` ends in ``linear``, whose input on every window is in ``inputs``: the
        next pass computes the block as ``linear(input)`` (:class:`_TailReplay`) instead of whole."""
        self.tails[key] = _TailReplay(linear, inputs)

    @contextlib.contextmanager
    def around(self, complete: Sequence[str], blocks: Mapping[str, nn.Module], n_windows: int, *, record: bool = True):
        """Complete blocks replayed during the pass: recorded outputs if any, else computed from their
        last Linear's kept inputs; with ``record``, those not recorded yet are recorded (from then on
        replayed from the recording, the kept inputs dropped)."""
        recording = {k: ActivationStore(self.budget, self.spill_dir) for k in complete
                     if record and k not in self.stores and k not in self.unrecordable}
        lengths: dict[str, int] = {}
        handles, replayed = [], []
        for k, store in recording.items():
            handles.append(blocks[k].register_forward_hook(self._recorder(k, store, lengths)))
        own = {k: blocks[k].__dict__.get("forward") for k in complete}  # a wrapper someone set on the instance
        for k in complete:
            if k in self.stores:
                blocks[k].forward = self._replayer(*self.stores[k])
                replayed.append(k)
            elif k in self.tails:
                blocks[k].forward = self.tails[k].forward(blocks[k].forward)
                replayed.append(k)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for k in replayed:
                if own[k] is None:
                    del blocks[k].forward
                else:
                    blocks[k].forward = own[k]
            for k in [k for k, t in self.tails.items() if t.ok is False]:  # not what the block computes
                self.tails.pop(k).inputs.close()
        for k, store in recording.items():
            if len(store) == n_windows and k not in self.unrecordable:
                self.stores[k] = (store, lengths[k])
                if k in self.tails:
                    self.tails.pop(k).inputs.close()
            else:  # the pass stopped before the block on some window, or it returned something else
                store.close()

    def _recorder(self, key: str, store: ActivationStore, lengths: dict[str, int]):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            # copies: the layer may update its block's output in place after the block returns
            if isinstance(out, torch.Tensor):
                lengths[key] = 0
                store.append(out.clone())
            elif (isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor)
                  and all(o is None for o in out[1:])):
                lengths[key] = len(out)
                store.append(out[0].clone())
            else:
                self.unrecordable.add(key)

        return hook

    @staticmethod
    def _replayer(store: ActivationStore, length: int):
        outputs = iter(store)

        def replay(*args: Any, **kwargs: Any) -> Any:
            out = next(outputs).clone()  # the store stays intact whatever the layer does with it
            return out if length == 0 else (out, *([None] * (length - 1)))

        return replay

    def close(self) -> None:
        for store, _ in self.stores.values():
            store.close()
        for tail in self.tails.values():
            tail.inputs.close()
        self.stores, self.tails = {}, {}


class _TailReplay:
    """A complete block computed from the kept input of its last Linear: ``linear(x)``, that
    Linear in its served state, instead of the whole block (on a Llama layer the MLP's gate, up and
    activation, about half of a forward, are skipped in the output pass).

    Valid only when the block returns exactly that Linear's output and the kept input is what the
    block feeds it now; the first window run checks both (the block runs whole there: its output
    must be the very tensor the Linear returned, its Linear input equal to the kept one bit for bit)
    and the check's verdict holds for the rest of the layer. A block that fails it runs whole and
    its kept inputs are dropped after the pass.
    """

    def __init__(self, linear: nn.Module, inputs: ActivationStore) -> None:
        self.linear, self.inputs = linear, inputs
        self.ok: bool | None = None
        self.length = 0  # 0: the block returns a tensor, else a tuple (tensor, None, ...) of this length

    def forward(self, run_block: Callable[..., Any]) -> Callable[..., Any]:
        kept = iter(self.inputs)

        def forward(*args: Any, **kwargs: Any) -> Any:
            x = next(kept)
            if self.ok:
                y = self.linear(x)
                return y if self.length == 0 else (y, *([None] * (self.length - 1)))
            if self.ok is False:
                return run_block(*args, **kwargs)
            return self._check(run_block, x, args, kwargs)

        return forward

    def _check(self, run_block: Callable[..., Any], x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        seen: dict[str, torch.Tensor] = {}
        handles = [
            # prepended: sees the input before the served activation fake-quant replaces it
            self.linear.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]), prepend=True),
            self.linear.register_forward_hook(lambda m, a, y: seen.setdefault("y", y)),
        ]
        try:
            out = run_block(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        if isinstance(out, tuple) and out and all(o is None for o in out[1:]):
            y, self.length = out[0], len(out)
        else:
            y, self.length = out, 0
        self.ok = "y" in seen and y is seen["y"] and torch.equal(seen["x"], x)
        return out


# ---- the walk -----------------------------------------------------------------------------------
@torch.no_grad()
def refine_model(
    model: nn.Module,
    plan: Mapping[str, str],
    fit_batches: Iterable[Any],
    heldout_batches: Iterable[Any],
    *,
    config: GPTQConfig | None = None,
    gptq: bool = True,
    fp8_gptq: bool = False,
    model_type: str | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    process_group: Any = None,
    keep_hessians: bool = False,
    rtn_errors: bool = False,
    max_kept_input_bytes: int = 2**30,
    max_resident_activation_bytes: int | None = None,
    spill_dir: str | None = None,
    count_flops_into: FlopTally | None = None,
) -> RefineOutput:
    """Refine every planned body Linear of ``model`` layer by layer (see the module docstring).

    Args:
        model: a Hugging Face causal LM (Llama-, Gemma-style...); returned unchanged.
        plan: Linear name (as in ``model.named_modules()``) -> format name (``"nvfp4"``, ``"fp8"``,
            ``"bf16"``...). Fused siblings must share a format.
        fit_batches / heldout_batches: token windows, LongTensor ``[batch, seqlen]`` (or ``[seqlen]``)
            or dicts with ``"input_ids"``. GPTQ candidates are fitted on the first and judged on the
            second (the RTN gate). With ``gptq=False`` held-out windows are optional (errors are
            then reported on the fit windows).
        config: what GPTQ tries (:class:`GPTQConfig`; default when ``None``).
        gptq: ``False`` makes every Linear RTN (amax is still calibrated).
        fp8_gptq: also run ``fmt.refine`` (GPTQ with the gate) on formats whose ``refine_by_default``
            is off (FP8); otherwise they are RTN.
        model_type: the architecture key for fused siblings (default: the text config's model type).
        groups: the serving groups (fused siblings: one Hessian, shared NVFP4 scales), e.g.
            ``Plan.groups``; default: the architecture's fused sets among the plan's Linears.
        progress: optional wrapper of the layer iterable (``rich.progress.track``-style).
        process_group: reduce statistics over this group (default: the world, when initialised).
        keep_hessians: also return the raw summed Hessians (CPU) in :attr:`RefineOutput.hessians`
            (of every quantized group: implies ``rtn_errors``).
        rtn_errors: also measure the output errors of the Linears packed by RTN because their format
            has no refinement (FP8 unless ``fp8_gptq``; every Linear with ``gptq=False``). No decision
            needs them, so by default their groups get no Hessians and, unless the format calibrates
            a static input scale, no pass of their own: at 6.0 bpp on SmolLM2-135M that is 127 of
            210 Linears. Their decisions then carry no errors (``None``).
        max_kept_input_bytes: a group whose inputs over this rank's windows fit in this many bytes
            keeps them from the amax pass and builds its Hessians from them (one layer pass fewer,
            same sums); larger inputs are recomputed by a second pass.
        max_resident_activation_bytes: at most this many bytes of stored hidden states and kept
            inputs stay in memory (``None``: no limit); the rest go to a scratch file in ``spill_dir``
            (default: the system's temporary folder) and are read back window by window, so memory
            does not grow with the number of windows. The results are the same.
        count_flops_into: count the FLOPs of a sample of the layers' passes (every
            :data:`FLOP_SAMPLE_STRIDE`-th layer, the first included: the counter's per-op overhead
            stays small; formats, and so the work, differ between layers) into this tally;
            ``totals["flops_counted_layers"]`` says how many layers it holds.
    """
    config = config or GPTQConfig()
    layers_name, layers = language_model_layers(model)
    formats = _check_plan(model, plan, layers_name)
    if groups is None:
        groups = fused_groups(list(formats), model_type if model_type is not None else model_type_of(model))
    walk = _Walk(model, formats, config, gptq=gptq, fp8_gptq=fp8_gptq, process_group=process_group,
                 keep_hessians=keep_hessians, rtn_errors=rtn_errors, max_kept_input_bytes=max_kept_input_bytes,
                 budget=ResidentBudget(max_resident_activation_bytes), spill_dir=spill_dir)
    was_training = model.training
    model.eval()
    try:
        walk.capture(layers, fit_batches, heldout_batches)
        layer_iter: Iterable[int] = range(len(layers))
        for li in progress(layer_iter) if progress is not None else layer_iter:
            counting = (count_flops(count_flops_into) if count_flops_into is not None and li % FLOP_SAMPLE_STRIDE == 0
                        else None)
            with counting or contextlib.nullcontext():
                walk.layer(li, layers[li], f"{layers_name}.{li}.", groups, last=li == len(layers) - 1)
    finally:
        walk.close()
        model.train(was_training)
    for name, fmt in formats.items():
        if not fmt.quantizes_weights:
            walk.out.decisions[name] = LinearDecision(name, fmt.name, "bf16", None, {}, 0.0, 0.0)
    walk.out.totals = _totals(walk.out.decisions, walk.out.packed)
    walk.out.totals["resident_activation_peak_bytes"] = walk.budget.peak
    walk.out.totals["flops_counted_layers"] = len(range(0, len(layers), FLOP_SAMPLE_STRIDE))
    walk.out.totals["walk"] = "sequential"
    return walk.out


#: :func:`refine_model` counts the FLOPs of every this-many-th layer (``count_flops_into``).
FLOP_SAMPLE_STRIDE = 4


class _Walk:
    """The state of one layer-by-layer walk: stored activations, ranks, results, what to restore."""

    def __init__(self, model, formats, config, *, gptq, fp8_gptq, process_group, keep_hessians, rtn_errors,
                 max_kept_input_bytes, budget, spill_dir) -> None:
        self.model, self.formats, self.config = model, formats, config
        self.gptq, self.fp8_gptq, self.keep_hessians = gptq, fp8_gptq, keep_hessians
        self.rtn_errors = rtn_errors or keep_hessians
        self.process_group = process_group
        self.distributed = _dist_active(process_group)
        self.max_kept_input_bytes, self.budget, self.spill_dir = max_kept_input_bytes, budget, spill_dir
        self.streamer = streamer_of(model)
        _, layers = language_model_layers(model)
        self.device = (self.streamer.target_device() if self.streamer is not None
                       else next(iter(layers.parameters())).device)
        self.out = RefineOutput(packed={}, input_amax={}, decisions={}, totals={})
        self.restore: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.handles: list[Any] = []
        self.hidden: ActivationStore | None = None
        self.windows: list[list[_Window]] = []
        self.n_tokens = 0
        if self.distributed:
            import torch.distributed as dist

            self.rank, self.owners = dist.get_rank(process_group), _Owners(dist.get_world_size(process_group))

    def capture(self, layers: nn.ModuleList, fit_batches, heldout_batches) -> None:
        """Every window's layer calls; the first layer's inputs go into the activation store."""
        self.windows = _capture(self.model, layers, fit_batches, "fit", self.device)
        self.windows += _capture(self.model, layers, heldout_batches, "heldout", self.device)
        self._check_windows()
        self.hidden = ActivationStore(self.budget, self.spill_dir)
        for w in self.windows:
            h = w[0].args[0]
            self.n_tokens += h.shape[:-1].numel()
            w[0].args = (None, *w[0].args[1:])
            self.hidden.append(h)

    def _check_windows(self) -> None:
        n_fit = sum(w[0].split == "fit" for w in self.windows)
        n_held = sum(w[0].split == "heldout" for w in self.windows)
        if self.distributed:  # every rank learns the smallest per-rank fit count and the held-out total
            (neg_min_fit,) = _all_reduce([torch.tensor([-float(n_fit)])], "max", self.process_group)
            (held,) = _all_reduce([torch.tensor([float(n_held)])], "sum", self.process_group)
            n_fit, n_held = -float(neg_min_fit), float(held)
        if n_fit == 0:
            raise ValueError(
                "no fit windows (on at least one rank): pass calibration batches in fit_batches, and give "
                "every rank some"
            )
        if n_held == 0 and self.gptq:
            raise ValueError(
                "GPTQ needs held-out windows for its RTN gate; split the calibration windows into fit and "
                "held-out sets (e.g. 3:1), or pass gptq=False"
            )

    def layer(self, li: int, layer: nn.Module, prefix: str, groups, *, last: bool) -> None:
        """Decide layer ``li`` group by group, then store its served outputs as the next layer's inputs."""
        if self.streamer is not None:
            self.streamer.load(li)  # resident while its Linears are decided (nothing else loads meanwhile)
        step = _LayerStep(layer, prefix, self.hidden, [w[li] for w in self.windows], self.formats, groups)
        try:
            for group in step.groups:
                self._group(step, group)
                step.mark_decided(group)
            if not last:
                previous, self.hidden = self.hidden, step.outputs(ActivationStore(self.budget, self.spill_dir))
                previous.close()
        finally:
            step.close()
        self._give_back()  # the layer's effect now lives on in the stored hidden states only
        if self.streamer is not None:
            self.streamer.release(li)

    def _group(self, step: _LayerStep, group: Sequence[str]) -> None:
        """Statistics of one fused group's input, its members decided, the group put in its served state."""
        fmt = self.formats[group[0]]
        measured = self.rtn_errors or (self.gptq and (fmt.refine_by_default or self.fp8_gptq))
        stats = self._statistics(step, group, fmt, hessians=measured)
        try:
            self._decide_group(step, group, fmt, stats, measured)
            tail = step.block_ended_by(group)
            if tail is not None and stats.kept is not None:
                step.replays.add_tail(tail, step.linears[group[0]], stats.take_kept())
        finally:
            stats.close()

    def _decide_group(self, step: _LayerStep, group: Sequence[str], fmt: QuantFormat, stats: _GroupStats,
                      measured: bool) -> None:
        gs = fmt.shared_global_scale(step.linears[m].weight for m in group) if fmt.shares_global_scale else None
        if measured:
            decided = self._measured_members(step, group, fmt, stats, gs)
        else:  # RTN by rule: every rank packs the same bits, nothing to measure or send
            decided = {m: _decide(m, fmt, step.linears[m].weight, None, None, gs, config=self.config, gptq=False,
                                  fp8_gptq=False) for m in group}
        for m in group:
            packed, w_hat, decision = decided[m]
            lin = step.linears[m]
            self.out.packed[m] = {k: v.detach().cpu() for k, v in packed.items()}
            if stats.amax is not None:
                self.out.input_amax[m] = float(stats.amax)
            self.out.decisions[m] = decision
            # served state, seen by the later groups of this layer and by the output pass
            self.restore.append((lin.weight, lin.weight.data))
            lin.weight.data = w_hat.to(device=lin.weight.device, dtype=lin.weight.dtype)
            if fmt.quantizes_activations:
                self.handles.append(lin.register_forward_pre_hook(_served_input_hook(stats.quantize_input)))

    def _measured_members(self, step, group, fmt, stats, gs) -> dict[str, tuple]:
        """The group's Hessians reduced and scaled per token, then every member decided on them."""
        H_fit, H_held, n_fit, n_held, err_sums = _reduced_hessians(stats, step, group, self.device, self.distributed,
                                                                   self.process_group)
        if self.keep_hessians:
            self.out.hessians[tuple(group)] = {
                "fit": H_fit.cpu().clone(), "n_fit": n_fit, "heldout": H_held.cpu().clone(), "n_heldout": n_held,
            }
        # the chosen recipe is solved again on every calibration token (GPTQConfig.refit)
        H_refit = (H_fit + H_held) / (n_fit + n_held) if self.gptq and self.config.refit and n_held else None
        H_fit = H_fit / n_fit
        H_held = H_held / n_held if n_held else H_fit
        ie = None if err_sums is None else InputErrorSums.per_token(err_sums, n_fit, n_held, H_refit is not None)
        return self._decide_members(step, group, fmt, H_fit, H_held, H_refit, gs, ie)

    def _statistics(self, step: _LayerStep, group: Sequence[str], fmt: QuantFormat, *, hessians: bool) -> _GroupStats:
        """Input amax (first, when the format calibrates a static input scale) and, with ``hessians``,
        fit / held-out Hessians (and the amax when not calibrated before). No pass when neither is
        needed."""
        stats = _GroupStats(step.split)
        igs = None
        kept = False
        if fmt.static_input_scale:  # amax first, then quantize with it
            n_in = step.linears[group[0]].in_features
            kept = hessians and self.n_tokens * n_in * self.hidden[0].element_size() <= self.max_kept_input_bytes
            stats.kept = ActivationStore(self.budget, self.spill_dir) if kept else None
            step.run_group_pass(group, stats.observe_amax)
            if self.distributed:
                (stats.amax,) = _all_reduce([stats.amax], "max", self.process_group)
            igs = fmt.calibrate_input_global_scale(stats.amax)
            stats.track_amax_in_hessian_pass = False
        stats.quantize_input = _input_quantizer(fmt, igs)
        if hessians and compensates(self.config, fmt):
            stats.errors = InputErrorSums()
        if kept:
            stats.accumulate_kept()  # the inputs stay kept until the group is decided (_group)
        elif hessians:
            step.run_group_pass(group, stats.accumulate)
        return stats

    def _decide_members(self, step, group, fmt, H_fit, H_held, H_refit, gs, ie) -> dict[str, tuple]:
        """Packed tensors, served weight and decision of every member; under ranks each member is
        decided by its owner and broadcast, so every rank holds the same bits."""
        owner = (self.owners.assign({m: tuple(step.linears[m].weight.shape) for m in group})
                 if self.distributed else dict.fromkeys(group, 0))
        decided: dict[str, tuple] = {}
        factors: dict = {}  # the siblings' shared H_fit is factored once per damping
        for m in group:
            if self.distributed and owner[m] != self.rank:
                continue
            with not_counted():  # a solve per Linear: not part of the cost per token
                packed, w_hat, decision = _decide(
                    m, fmt, step.linears[m].weight, H_fit, H_held, gs, config=self.config, gptq=self.gptq,
                    fp8_gptq=self.fp8_gptq, factor_cache=factors, H_refit=H_refit, input_error=ie,
                )
            decided[m] = (packed, w_hat, decision)  # moved to the CPU once put in self.out
        if not self.distributed:
            return decided
        for m in group:
            mine = decided.get(m)
            packed, decision = _broadcast_decision(
                *((None, None) if mine is None else (mine[0], mine[2])), owner[m], self.process_group
            )
            decided[m] = (packed, fmt.unpack(packed), decision)  # the same bits on every rank, owner included
        return decided

    def _give_back(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        while self.restore:
            p, data = self.restore.pop()
            p.data = data

    def close(self) -> None:
        """Restore every weight and hook and free the stored activations (also after a failure)."""
        self._give_back()
        if self.hidden is not None:
            self.hidden.close()


def _reduced_hessians(
    stats: _GroupStats,
    step: _LayerStep,
    group: Sequence[str],
    device: torch.device,
    distributed: bool,
    process_group: Any,
) -> tuple[torch.Tensor, torch.Tensor, int, int, list[torch.Tensor] | None]:
    """Summed fit / held-out Hessians and token counts (all-reduced), the amax (all-reduced) and the
    input error sums (:meth:`InputErrorSums.tensors`, all-reduced) when the group has them."""
    n_in = step.linears[group[0]].in_features
    H = [
        stats.H[s] if stats.H[s] is not None else torch.zeros(n_in, n_in, dtype=torch.float32, device=device)
        for s in ("fit", "heldout")
    ]
    H = [_mirror_upper_(h) for h in H]
    ns = torch.tensor([float(stats.n["fit"]), float(stats.n["heldout"])], dtype=torch.float64)
    errs = None if stats.errors is None else stats.errors.tensors(n_in, device)
    if distributed:
        H[0], H[1], ns, *rest = _all_reduce([H[0], H[1], ns, *(errs or [])], "sum", process_group)
        errs = rest or None
        if stats.track_amax_in_hessian_pass:
            (stats.amax,) = _all_reduce([stats.amax], "max", process_group)
    return H[0], H[1], int(round(float(ns[0]))), int(round(float(ns[1]))), errs


def _check_plan(model: nn.Module, plan: Mapping[str, str], layers_name: str) -> dict[str, QuantFormat]:
    """The format of every planned Linear inside the decoder layers; a warning for those outside."""
    named = dict(model.named_modules())
    formats: dict[str, QuantFormat] = {}
    outside: list[str] = []
    for name, fmt_name in plan.items():
        mod = named.get(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(
                f"plan names {name!r}, which is not an nn.Linear of the model; plan keys must be module "
                "names as in model.named_modules() (e.g. 'model.layers.0.self_attn.q_proj')"
            )
        fmt = get_format(fmt_name)
        if fmt.quantizes_weights:
            reason = fmt.unsupported_reason(tuple(mod.weight.shape))
            if reason is not None:
                raise ValueError(f"plan puts {name} in {fmt.name}, which cannot take it: {reason}")
        if name.startswith(layers_name + "."):
            formats[name] = fmt
        elif fmt.quantizes_weights:
            outside.append(name)
    if outside:
        warnings.warn(
            f"the refiner walks the decoder layers only; {len(outside)} planned Linears outside "
            f"'{layers_name}' (e.g. {outside[0]}) are left to the export's RTN and need their input amax "
            "from another calibration",
            stacklevel=3,
        )
    return formats


def _totals(decisions: Mapping[str, LinearDecision], packed: Mapping[str, Any]) -> dict[str, Any]:
    by_format: dict[str, dict[str, float]] = {}
    for d in decisions.values():
        if d.name not in packed:
            continue
        f = by_format.setdefault(d.format, {"heldout_rtn": 0.0, "heldout_chosen": 0.0, "n_linears": 0, "n_refined": 0,
                                            "n_measured": 0})
        f["n_linears"] += 1
        f["n_refined"] += int(d.method != "rtn")
        if d.heldout_rtn is not None:  # Linears packed by RTN without measuring are not in the sums
            f["heldout_rtn"] += d.heldout_rtn
            f["heldout_chosen"] += d.heldout_chosen
            f["n_measured"] += 1
    return {
        "heldout_rtn": math.fsum(f["heldout_rtn"] for f in by_format.values()),
        "heldout_chosen": math.fsum(f["heldout_chosen"] for f in by_format.values()),
        "by_format": by_format,
    }
