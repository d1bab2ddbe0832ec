"""``FisherProbe``: measure per-Linear Fisher sensitivity during any Lightning training run.

Attach it to ``Trainer.fit`` of a :class:`~pq_lightning.causal_lm.CausalLM` in probe-only mode (no
weight updates) or to any fine-tuning run; it changes neither losses nor weights. For every tracked
Linear a forward hook keeps the (detached) input ``x`` and puts a hook on the output tensor; when
the backward pass reaches that output, the hook combines ``x`` with the received gradient ``g``
into the per-token statistics of :mod:`pq_lightning.fisher` and lets ``x`` go. Parameter ``.grad``
is never read, so the probe works when weights have no gradient and under DDP (whose ``.grad`` is
averaged over ranks: the module hooks see this rank's own gradients before any averaging).

FSDP. Under Lightning's ``ModelParallelStrategy`` with FSDP2 (``fully_shard``, as
:meth:`~pq_lightning.causal_lm.CausalLM.configure_model` applies it; ``tensor_parallel_size=1``) the
hooks run while FSDP holds the Linear's weight unsharded (the forward pass and the layer's backward
pass), so they read the full weight, exactly as on one device. Between steps the weight is a
sharded ``DTensor``, so ``Q(W)`` is not cached for a sharded Linear: it is rebuilt from the unsharded
weight at every use (``fake_quant`` costs a small fraction of the error's matmul), and no full copy
of a weight outlives its backward pass. Layers streamed from disk or host memory
(:mod:`pq_lightning.streaming`, ``CausalLM(memory_cap_gb=...)``) are handled the same way: the hooks
read the resident weight, ``Q(W)`` is not cached. ``FSDPStrategy`` (FSDP1) and tensor-parallel Linears are
refused.

Gradient of the sum-reduced loss. The LightningModule's loss is the *mean* over
``pl_module.last_token_count`` tokens; in automatic optimisation Lightning divides it by
``trainer.accumulate_grad_batches``; under fp16 mixed precision the grad scaler multiplies it by its
scale. The hook therefore uses ``g_sum = g_seen × last_token_count × accumulate_grad_batches /
scaler_scale``. A batch whose gradients overflowed (non-finite values) is dropped whole.

Cost. The trace and the diagonals take a few row norms and two matrix-vector products per Linear and
step. The output-space error takes, per format, one matmul as large as the Linear's forward pass,
the activation fake-quant of its input (computed once per distinct input tensor, so ``q/k/v_proj``
and ``gate/up_proj`` share it) and ``Q(W)``, kept between steps in the format's packed form (about a
byte per weight and format, decoded exactly at each use; ``quantized_weights="float32"`` keeps fp32
copies instead: faster, 4 bytes per weight and format). By default it is computed on every token,
exactly. To make it cheaper, ``output_error_tokens`` computes it on a subset of the positions of
every sequence (e.g. ``0.25``: a quarter), drawn without replacement from a seed and the
sequence's token ids, and rescaled: an unbiased estimate (on SmolLM2-135M, 1/4 of the tokens kept
a Spearman rank correlation of 0.97 across Linears with the exact values). The draw depends only
on the sequence and ``output_error_seed``, never on the batch size, gradient accumulation or the
number of ranks.

Only training batches count (hooks are live between ``on_train_batch_start`` and
``on_train_batch_end`` and only with grad enabled), never validation or the sanity check. Sums are
the callback's checkpoint state, so a resumed run continues them. At ``on_train_end`` every rank
takes part in one sum-reduce, rank zero writes the sensitivity file atomically, and every rank keeps
the finalized :class:`~pq_lightning.sensitivity.Sensitivity` as ``probe.sensitivity``.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from pq_lightning.fisher import (
    ACTIVATION_SCALE_RULE,
    FisherAccumulator,
    as_sequences,
    check_error_tokens,
    fake_quant_activation_per_sequence,
    flat_positions,
    gather_positions,
    token_subset,
    tokens_per_sequence,
)
from pq_lightning.formats import CompactWeight, QuantFormat, get_format
from pq_lightning.sensitivity import Sensitivity, default_meta, save_sensitivity
from pq_lightning.streaming import ensure_loaded, is_streamed


class FisherProbe(Callback):
    """Per-token empirical Fisher statistics of the model's body Linears, written to a sensitivity file.

    Args:
        output_path: where rank zero writes the sensitivity file (safetensors) at the end of training.
        include: regexes (``re.search`` on full Linear names of ``pl_module.model``) selecting the
            Linears to track; ``None`` tracks the language-model body (see
            :func:`pq_lightning.models.find_body_linears`).
        exclude: regexes of Linears to leave out.
        formats: the format menu whose output-space error (activation quantisation included) is
            measured; a Linear gets only the formats that support its shape.
        output_error: measure the per-format output-space error (one extra matmul per format per
            Linear per step). ``False`` measures only the trace and the diagonals.
        max_tokens: stop counting once this many loss tokens have been counted (the batch that
            crosses the limit is counted whole); ``None`` counts every training batch.
        output_error_tokens: positions of every sequence on which the output-space error is
            computed: a fraction in ``(0, 1]``, a number of positions, or ``None`` (default) for
            every position (exact; ``1.0`` is the same). A subset of ``k`` of a
            sequence's ``S`` positions is drawn uniformly and its sum multiplied by ``S / k``, an
            unbiased estimate at ``k / S`` of the cost. The trace and diagonals always use every token.
        output_error_seed: seed of the position draw (combined with each sequence's token ids).
        quantized_weights: how ``Q(W)`` is kept between steps for the output-space error:
            ``"compact"`` (default) keeps what the format packs (NVFP4: 0.56 bytes per weight, FP8:
            1 byte) and decodes it exactly at each use; ``"float32"`` keeps fp32 copies (4 bytes per
            weight and format: faster, as much memory as the model's fp32 weights per format).
    """

    def __init__(
        self,
        output_path: str = "sensitivity.safetensors",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        formats: Sequence[str] = ("nvfp4", "fp8"),
        output_error: bool = True,
        max_tokens: int | None = None,
        output_error_tokens: int | float | None = None,
        output_error_seed: int = 0,
        quantized_weights: str = "compact",
    ) -> None:
        super().__init__()
        if not isinstance(output_path, (str, Path)) or not str(output_path):
            raise ValueError(f"output_path must be a non-empty file path, got {output_path!r}")
        self.output_path = str(output_path)
        self.include = self._check_regexes(include, "include")
        self.exclude = self._check_regexes(exclude, "exclude")
        if isinstance(formats, str):
            formats = [formats]
        names = []
        for f in formats:
            try:
                names.append(get_format(f).name)
            except KeyError as err:
                raise ValueError(str(err.args[0])) from None
        if len(set(names)) != len(names):
            raise ValueError(f"formats lists a format twice: {list(formats)}")
        self.formats = names
        self.output_error = bool(output_error)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        check_error_tokens(output_error_tokens)
        if isinstance(output_error_tokens, float) and output_error_tokens == 1.0:
            output_error_tokens = None
        self.output_error_tokens = output_error_tokens
        if isinstance(output_error_seed, bool) or not isinstance(output_error_seed, int):
            raise ValueError(f"output_error_seed must be an int, got {output_error_seed!r}")
        self.output_error_seed = int(output_error_seed)
        if quantized_weights not in ("compact", "float32"):
            raise ValueError(f"quantized_weights must be 'compact' or 'float32', got {quantized_weights!r}")
        self.quantized_weights = quantized_weights

        self.sensitivity: Sensitivity | None = None
        self.accumulator: FisherAccumulator | None = None
        self._linears: dict[str, torch.nn.Linear] = {}
        self._handles: list[Any] = []
        self._loaded_state: dict | None = None
        self._model_fingerprint: str | None = None
        self._qweights: dict[tuple[str, str], tuple[_QuantizedWeight, int, int]] = {}
        # Linears whose weight is sharded between steps (FSDP2): Q(W) is rebuilt at every use
        self._sharded: set[str] = set()
        # the model's fingerprint taken in setup, before a sharding strategy shards the weights
        self._setup_fingerprint: str | None = None
        # per batch: the inputs seen by the tracked Linears (shared by Linears with the same input),
        # the per-sequence seeds of the position draw and the drawn positions per input shape
        self._inputs: dict[tuple, _Input] = {}
        self._seeds: list[int] | None = None
        self._positions: dict[tuple[int, int], tuple[torch.Tensor, float] | None] = {}
        self._n_batches_seen = 0
        self._active = False
        self._grad_scale: float | None = None
        self._batch_tokens = 0
        self._batch: Any = None
        self._warned_no_scale = False

    @staticmethod
    def _check_regexes(patterns: list[str] | None, what: str) -> list[str] | None:
        if patterns is None:
            return None
        if isinstance(patterns, str):
            patterns = [patterns]
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"{what} regex {p!r} is not a valid regular expression: {err}") from err
        return list(patterns)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(output_path=self.output_path)

    @property
    def counting(self) -> bool:
        """Whether the probe still counts batches (``max_tokens`` not reached)."""
        if self.max_tokens is None or self.accumulator is None:
            return True
        return self.accumulator.n_tokens < self.max_tokens

    # ---- setup / teardown ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        from pq_lightning.models import find_body_linears

        model = getattr(pl_module, "model", pl_module)
        self._linears = find_body_linears(model, self.include, self.exclude)
        self._setup_fingerprint = None
        if _is_sharding(trainer.strategy):
            from pq_lightning.models import model_fingerprint

            # Lightning calls setup before configure_model: the weights are still whole here
            self._setup_fingerprint = model_fingerprint(model)
        self._remove_hooks()
        for name, module in self._linears.items():
            self._handles.append(module.register_forward_hook(self._make_forward_hook(name)))

    @staticmethod
    def _check_strategy(trainer: pl.Trainer) -> None:
        from lightning.pytorch.strategies import (
            DDPStrategy,
            FSDPStrategy,
            ModelParallelStrategy,
            SingleDeviceStrategy,
        )

        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                "FisherProbe does not support FSDPStrategy (FSDP1, flat parameters). For a sharded probe "
                "use FSDP2: strategy=ModelParallelStrategy(data_parallel_size=<processes>, "
                "tensor_parallel_size=1) with a module whose configure_model applies fully_shard "
                "(pq_lightning.causal_lm.CausalLM does); or strategy='ddp', or one device."
            )
        if isinstance(strategy, ModelParallelStrategy):
            tp = strategy.device_mesh["tensor_parallel"].size()
            if tp != 1:
                raise ValueError(
                    f"FisherProbe under ModelParallelStrategy supports FSDP2 data parallelism only, but the "
                    f"tensor_parallel size is {tp} (ranks of a tensor-parallel group see the same tokens); "
                    f"use ModelParallelStrategy(data_parallel_size={strategy.device_mesh.size()}, "
                    "tensor_parallel_size=1)."
                )
            return
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"FisherProbe supports single-device, DDP (ddp, ddp_spawn) and FSDP2 "
                f"(ModelParallelStrategy with tensor_parallel_size=1) strategies, got "
                f"{type(strategy).__name__}; run the probe with strategy='ddp' or on one device."
            )

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._qweights = {}
        self._sharded = set()
        self._end_batch()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._linears:
            return
        device = pl_module.device
        shapes = {n: tuple(m.weight.shape) for n, m in self._linears.items()}  # a DTensor's: the global shape
        # weights that do not stay put between steps (FSDP2 shards, streamed layers): Q(W) not cached
        self._sharded = {n for n, m in self._linears.items() if _is_dtensor(m.weight) or is_streamed(m)}
        self._qweights = {}
        self.accumulator = FisherAccumulator(shapes, self.formats if self.output_error else (), device=device)
        if self._loaded_state is not None:
            # totals over the ranks of the saving run: one rank carries them on (zeros elsewhere)
            if _rank() == 0 or not self._loaded_state.get("summed_over_ranks", False):
                self.accumulator.load_state_dict(self._loaded_state["sums"])
            self._model_fingerprint = self._loaded_state.get("model_fingerprint")
            self._loaded_state = None
        if self._model_fingerprint is None:
            from pq_lightning.models import model_fingerprint

            self._model_fingerprint = self._setup_fingerprint or model_fingerprint(
                getattr(pl_module, "model", pl_module)
            )

    # ---- per batch -----------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._active = self.accumulator is not None and self.counting
        self._grad_scale = None
        self._batch_tokens = 0
        self._batch = batch
        self._inputs = {}
        self._positions = {}
        self._seeds = None
        if self._active and self._subsampling:
            self._seeds = self._sequence_seeds(batch)
        self._n_batches_seen += 1

    @property
    def _subsampling(self) -> bool:
        return self.output_error and bool(self.formats) and self.output_error_tokens is not None

    def _sequence_seeds(self, batch: Any) -> list[int] | None:
        """One seed per sequence from ``output_error_seed`` and its token ids (``None`` without ids)."""
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        key = self.output_error_seed.to_bytes(8, "little", signed=True)
        rows = ids.detach().to("cpu", torch.int64).numpy()
        return [_hash_seed(key, row.tobytes()) for row in rows]

    def _draw(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """``(positions [batch, k], S / k)`` of the output-space error for input ``x``; ``None``: all."""
        if not self._subsampling:
            return None
        seqs = as_sequences(x)
        n_seq, seq_len = int(seqs.shape[0]), int(seqs.shape[1])
        key = (n_seq, seq_len)
        if key not in self._positions:
            k = tokens_per_sequence(self.output_error_tokens, seq_len)
            if k >= seq_len:
                self._positions[key] = None
            else:
                seeds = self._seeds
                if seeds is None or len(seeds) != n_seq:
                    # no token ids to key the draw on (or another batch layout): seed from the batch count
                    base = self.output_error_seed.to_bytes(8, "little", signed=True)
                    seeds = [_hash_seed(base, f"{self._n_batches_seen}:{b}".encode()) for b in range(n_seq)]
                pos = torch.stack([token_subset(seq_len, k, s) for s in seeds]).to(x.device)
                self._positions[key] = (pos, seq_len / k)
        return self._positions[key]

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if not self._active:
            return
        n = self._token_count(pl_module, self._batch)
        accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._grad_scale = n * accumulate / scale
        self._batch_tokens += n

    @staticmethod
    def _token_count(pl_module: pl.LightningModule, batch: Any) -> int:
        """Loss tokens of the current step: ``pl_module.last_token_count``, else counted from labels."""
        n = getattr(pl_module, "last_token_count", None)
        if n is not None:
            return int(n)
        if isinstance(batch, dict):
            if batch.get("labels") is not None:
                return int((batch["labels"][..., 1:] != -100).sum())
            if batch.get("attention_mask") is not None:
                return int(batch["attention_mask"][..., 1:].sum())
            if batch.get("input_ids") is not None:
                ids = batch["input_ids"]
                return int(ids[..., 1:].numel())
        raise ValueError(
            "FisherProbe needs the number of loss tokens of each step: set `self.last_token_count` in "
            "training_step (the loss must be the mean over those tokens) or pass batches as dicts with "
            "`labels` (ignore_index -100) or `input_ids`."
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.accumulator is not None and (self.accumulator.has_pending or self._batch_tokens):
            if not self.accumulator.commit(self._batch_tokens):
                warnings.warn(
                    f"FisherProbe: batch {batch_idx} had non-finite gradients (fp16 overflow?) and was not counted",
                    stacklevel=2,
                )
        self._end_batch()

    def _end_batch(self) -> None:
        self._active = False
        self._grad_scale = None
        self._batch = None
        self._inputs = {}
        self._positions = {}
        self._seeds = None

    # ---- hooks ---------------------------------------------------------------------------
    def _input_entry(self, x: torch.Tensor) -> _Input:
        """The batch's record of input ``x``, shared by every Linear called on the same tensor."""
        key = (
            x.untyped_storage().data_ptr(),
            x.storage_offset(),
            tuple(x.shape),
            tuple(x.stride()),
            x.dtype,
            x._version,
        )
        entry = self._inputs.get(key)
        if entry is None:
            entry = self._inputs[key] = _Input(key, x.detach(), self._draw(x))
        entry.users += 1
        return entry

    def _release(self, entry: _Input) -> None:
        entry.users -= 1
        if entry.users <= 0:
            self._inputs.pop(entry.key, None)
            entry.clear()

    def _make_forward_hook(self, name: str):
        def forward_hook(module: torch.nn.Linear, args: tuple, output: Any) -> None:
            if not self._active or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not args:
                return
            _check_whole_weight(name, module, "forward")
            entry = self._input_entry(args[0])
            y = y_version = None
            if self.output_error and self.accumulator.linear_formats[name] and output.dtype == torch.float32:
                y = output.detach()
                if entry.draw is not None:
                    y = gather_positions(y, entry.draw[0])  # a copy of the drawn rows only
                else:
                    y_version = y._version
            holder = [entry, y, y_version]
            output.register_hook(self._make_backward_hook(name, module, holder))

        return forward_hook

    def _make_backward_hook(self, name: str, module: torch.nn.Linear, holder: list):
        def backward_hook(grad: torch.Tensor) -> None:
            if not holder:
                return None
            entry, y, y_version = holder
            holder.clear()  # drop x (and y) now
            try:
                self._backward(name, module, entry, y, y_version, grad)
            finally:
                self._release(entry)
            return None

        return backward_hook

    def _backward(
        self,
        name: str,
        module: torch.nn.Linear,
        entry: _Input,
        y: torch.Tensor | None,
        y_version: int | None,
        grad: torch.Tensor,
    ) -> None:
        if self._grad_scale is None:
            if not self._warned_no_scale:
                warnings.warn(
                    "FisherProbe: a backward pass ran without Lightning's on_before_backward "
                    "(call self.manual_backward, not loss.backward); it is not counted",
                    stacklevel=3,
                )
                self._warned_no_scale = True
            return
        x = entry.x
        if x._version != entry.version:
            raise RuntimeError(
                f"FisherProbe: the input of {name} was modified in place after the forward pass; "
                "exclude this Linear (exclude=[...]) or avoid the in-place operation."
            )
        ensure_loaded(module)  # a streamed layer (its output-gradient hook has reloaded it already)
        with torch.no_grad():
            errs = {}
            rows, scale = None, 1.0
            formats = self.accumulator.linear_formats[name] if self.output_error else ()
            if formats:
                _check_whole_weight(name, module, "backward")
                if y is not None and (y_version is None or y._version == y_version):
                    y_lin = y.reshape(-1, y.shape[-1])
                    if module.bias is not None:
                        y_lin = y_lin - module.bias.detach()
                else:
                    y_lin = entry.rows().reshape(-1, x.shape[-1]).float() @ module.weight.detach().float().t()
                for f in formats:
                    fmt = get_format(f)
                    xq = entry.quantized(fmt)
                    errs[f] = torch.addmm(y_lin, xq, self._qweight(name, module, fmt).t(), alpha=-1)
                if entry.draw is not None:
                    rows, scale = entry.flat_rows(), entry.draw[1]
            self.accumulator.update(
                name, x, grad, errs, grad_scale=self._grad_scale, error_rows=rows, error_scale=scale
            )

    def _qweight(self, name: str, module: torch.nn.Linear, fmt) -> torch.Tensor:
        """``fmt.fake_quant(W)`` (fp32), from the cache; rebuilt only when the weight changed (fine-tuning).

        A Linear sharded between steps (FSDP2) is not cached: ``Q(W)`` is computed from the unsharded
        weight FSDP holds during this backward pass and dropped after use."""
        w = module.weight
        if name in self._sharded:
            return fmt.fake_quant(w.detach()).float()
        key = (name, fmt.name)
        cached = self._qweights.get(key)
        if cached is None or cached[1] != w._version or cached[2] != w.data_ptr():
            self._qweights.pop(key, None)
            stored = _QuantizedWeight.build(fmt, w.detach(), compact=self.quantized_weights == "compact")
            cached = self._qweights[key] = (stored, w._version, w.data_ptr())
        return cached[0].decode()

    # ---- end -----------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.accumulator is None:
            return
        self.accumulator.discard_pending()
        reduced = self.accumulator.all_reduce()  # a collective: every rank calls it
        data_fp = None
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and callable(getattr(dm, "fingerprint", None)):
            data_fp = dm.fingerprint()
        meta = default_meta(
            model_fingerprint=self._model_fingerprint,
            data_fingerprint=data_fp,
            world_size=trainer.world_size,
            estimator={
                "gradient": "per-token gradient of the sum-reduced loss (empirical Fisher)",
                "output_error": self.output_error,
                "activation_global_scale": ACTIVATION_SCALE_RULE,
                "include": self.include,
                "exclude": self.exclude,
                "max_tokens": self.max_tokens,
                "output_error_tokens": self.output_error_tokens if self.output_error else None,
                "output_error_seed": self.output_error_seed,
            },
        )
        self.sensitivity = reduced.finalize(meta)
        if trainer.is_global_zero:
            save_sensitivity(self.sensitivity, self.output_path)
        trainer.strategy.barrier("fisher_probe_written")

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The committed sums, totalled over all ranks (a collective: Lightning builds checkpoints on
        every rank and rank zero writes its copy). On resume rank zero loads the totals and the other
        ranks start from zero, so the final reduction counts every token once, whatever the world
        size of the resumed run."""
        if self.accumulator is None:
            return dict(self._loaded_state) if self._loaded_state is not None else {}
        # copy(): the committed sums only (a staged batch is not part of the state)
        sums = self.accumulator.copy().all_reduce().state_dict()
        return {"sums": sums, "model_fingerprint": self._model_fingerprint, "summed_over_ranks": True}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.accumulator is not None:
            if _rank() == 0 or not state_dict.get("summed_over_ranks", False):
                self.accumulator.load_state_dict(state_dict["sums"])
            self._model_fingerprint = state_dict.get("model_fingerprint")
        else:
            self._loaded_state = dict(state_dict)


def _rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch build without torch.distributed
    _DTensor = None


def _is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated parameter)."""
    return _DTensor is not None and isinstance(t, _DTensor)


def _is_sharding(strategy: Any) -> bool:
    """Whether ``strategy`` may shard the weights after ``setup`` (``ModelParallelStrategy``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def _check_whole_weight(name: str, module: torch.nn.Linear, when: str) -> None:
    """Refuse a Linear whose weight is a ``DTensor`` while it computes (tensor parallelism, or an FSDP
    unit that is not unsharded at that moment): the hooks need the whole weight."""
    if _is_dtensor(module.weight):
        raise RuntimeError(
            f"FisherProbe: the weight of {name} is a DTensor {module.weight.placements} during its {when} "
            "pass; the probe needs the whole weight there. Use FSDP2 only (fully_shard, "
            "tensor_parallel_size=1), with the Linear inside a module that FSDP unshards for its forward "
            "and backward passes, or exclude it (exclude=[...])."
        )


def _hash_seed(key: bytes, data: bytes) -> int:
    """A 63-bit seed from ``data`` under ``key`` (BLAKE2b: the same on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little") >> 1


class _Input:
    """One input tensor of tracked Linears in the current batch (``q/k/v_proj`` share one).

    Holds the detached input until the last Linear using it has had its backward pass, the drawn
    positions of the output-space error, and per format the fake-quantized activation rows (fp32,
    ``[rows, in]``), computed once for all the Linears that share the input.
    """

    __slots__ = ("key", "x", "version", "draw", "users", "_quantized", "_rows")

    def __init__(self, key: tuple, x: torch.Tensor, draw: tuple[torch.Tensor, float] | None) -> None:
        self.key = key
        self.x = x
        self.version = x._version
        self.draw = draw
        self.users = 0
        self._quantized: dict[str, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None

    def rows(self) -> torch.Tensor:
        """The input at the drawn positions ``[batch, k, in]`` (every position without a draw)."""
        if self.draw is None:
            return as_sequences(self.x)
        if self._rows is None:
            self._rows = gather_positions(self.x, self.draw[0])
        return self._rows

    def flat_rows(self) -> torch.Tensor:
        """Indices of the drawn positions among the flattened ``batch * seq`` tokens."""
        return flat_positions(self.draw[0], as_sequences(self.x).shape[1])

    def quantized(self, fmt) -> torch.Tensor:
        q = self._quantized.get(fmt.name)
        if q is None:
            pos = None if self.draw is None else self.draw[0]
            q = fake_quant_activation_per_sequence(self.x, fmt, pos)
            q = self._quantized[fmt.name] = q.reshape(-1, self.x.shape[-1]).float()
        return q

    def clear(self) -> None:
        self.x = None
        self._quantized = {}
        self._rows = None


class _QuantizedWeight:
    """``fmt.fake_quant(W)`` of one Linear, kept between steps.

    Compact when the format offers it (:meth:`QuantFormat.compact_weight`: FP8 keeps its fp8 codes,
    1 byte per weight, and row scales; NVFP4 its packed E2M1 codes, half a byte, and group scales),
    decoded by table lookup with the same arithmetic as ``unpack``. The decoded tensor is checked
    bit for bit against ``fmt.fake_quant(W)`` when the cache is built; a format without a compact
    encoding, or a mismatch, keeps the fp32 tensor itself.
    """

    __slots__ = ("_fp32", "_compact")

    def __init__(self, fp32: torch.Tensor | None = None, compact: CompactWeight | None = None) -> None:
        self._fp32 = fp32
        self._compact = compact

    @classmethod
    def build(cls, fmt: QuantFormat, w: torch.Tensor, compact: bool = True) -> _QuantizedWeight:
        ref = fmt.fake_quant(w).float()
        cw = fmt.compact_weight(w) if compact and fmt.quantizes_weights else None
        if cw is not None and torch.equal(cw.decode(), ref):
            return cls(compact=cw)
        return cls(fp32=ref)

    def decode(self) -> torch.Tensor:
        return self._fp32 if self._fp32 is not None else self._compact.decode()

    def nbytes(self) -> int:
        if self._fp32 is not None:
            return self._fp32.numel() * self._fp32.element_size()
        return self._compact.nbytes()
