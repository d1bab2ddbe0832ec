"""Evaluation: a quantized candidate against its reference, as a LightningModule over torchmetrics.

The candidate runs as served. It is one of:

* a compressed-tensors checkpoint (ours or any other tool's, e.g. llm-compressor's), loaded with
  :func:`pq_lightning.served.load_quantized_checkpoint`: weights decoded exactly from disk,
  activations quantized as its config says;
* a plan (``plan.json`` as :meth:`pq_lightning.plan.Plan.save` writes it, or a plain
  ``{linear name: format}`` mapping) applied in memory to a copy of the reference with
  :func:`pq_lightning.served.apply_fake_quant` (RTN, the same tensors the export would write).

Each window is teacher-forced through both models; the distributions at positions ``0 … n-2`` (those
that predict a token of the window) are compared with :class:`pq_lightning.metrics.QuantEvalMetrics`.
Under DDP each rank takes its share of the windows and torchmetrics sums the states exactly.

Reference cache: when the reference and the candidate cannot both be held, run once with the
reference and ``reference_cache=path``: the reference's top-k log-probabilities, top-1 probability
and argmax per position (:func:`pq_lightning.metrics.reference_cache_entries`) are written to a
safetensors file, keyed by the windows' token ids. Later runs with the same path load it and never
load the reference model; they report the top-k KL and top-1 metrics, and ``kl_all`` / ``kl_conf``
are ``nan`` (the full reference distribution is not in the cache), which ``eval.md`` says.

``pq-lightning validate --config configs/eval-smollm2.yaml`` runs it from the CLI.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from .atomic import atomic_file, atomic_write_text
from .lm_head import LOGIT_CHUNK_BYTES, ChunkedLogits, chunked_logits
from .metrics import QuantEvalMetrics, ReferenceCache, reference_cache_entries

REPORT_KEYS = (
    "kl_all", "kl_conf", "kl_top20_conf", "top1_conf", "top1_all", "n_positions", "n_confident",
)
COUNT_KEYS = ("n_positions", "n_confident")
CACHE_FORMAT = "pq-lightning-reference-cache-v1"
FULL_KL_NOTE = (
    "kl_all and kl_conf are nan: the reference came from a top-k cache ({path}), which does not hold "
    "the full reference distribution. Evaluate with the reference model loaded for them."
)


# --------------------------------------------------------------------------------------------
# Plans applied in memory
# --------------------------------------------------------------------------------------------


def read_plan(path: str | Path) -> tuple[dict[str, str], dict[str, float]]:
    """Formats and (optional) calibrated input amax of a plan file.

    Accepts what :meth:`pq_lightning.plan.Plan.save` writes (``{"linears": {name: {"format": ...}}}``)
    or a plain ``{name: format}`` mapping. An optional top-level ``"input_amax": {name: float}``
    gives the static activation amax that W4A4 NVFP4 Linears need.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {path} does not exist; pass the plan-<label>.json a run wrote") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a plan file holds a JSON object, got {type(d).__name__}")
    amax = {str(k): float(v) for k, v in (d.get("input_amax") or {}).items()}
    if isinstance(d.get("linears"), dict):
        from .plan import Plan

        try:
            formats = Plan.from_dict(d).formats
        except (TypeError, KeyError) as err:
            raise ValueError(f"{path} has 'linears' but they are not a plan's ({err}); write it with Plan.save") from None
    else:
        formats = {k: v for k, v in d.items() if k != "input_amax"}
    bad = [k for k, v in formats.items() if not isinstance(v, str)]
    if bad or not formats:
        raise ValueError(
            f"{path} is not a plan: expected {{'linears': {{name: {{'format': ...}}}}}} or {{name: format}}"
            + (f"; entries without a format name: {bad[:5]}" if bad else "; it names no Linear")
        )
    return formats, amax


def read_input_amax(path: str | Path) -> dict[str, float]:
    """``{linear name: amax}`` from a JSON file (or its ``"input_amax"`` entry)."""
    d = json.loads(Path(path).read_text())
    d = d.get("input_amax", d) if isinstance(d, dict) else d
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object {{linear name: amax}}")
    return {str(k): float(v) for k, v in d.items()}


def fake_quant_candidate(
    reference_model: torch.nn.Module,
    plan: Mapping[str, str],
    input_amax: Mapping[str, float] | None = None,
    *,
    in_place: bool = False,
) -> torch.nn.Module:
    """The served form of ``plan`` on (a deep copy of) ``reference_model``, RTN weights."""
    from .served import apply_fake_quant

    model = reference_model if in_place else copy.deepcopy(reference_model)
    apply_fake_quant(model, plan, input_amax=input_amax)
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# Reference cache file
# --------------------------------------------------------------------------------------------


def save_reference_cache(path: str | Path, windows: Tensor, cache: ReferenceCache, meta: Mapping[str, Any]) -> None:
    """Write the cache of ``windows`` ``[n, T]`` (entries ``[n, T-1, k]``) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        "windows": windows.to(torch.int64).contiguous(),
        "topk_logprobs": cache.topk_logprobs.contiguous(),
        "topk_ids": cache.topk_ids.to(torch.int32).contiguous(),
        "top1_prob": cache.top1_prob.contiguous(),
        "argmax": cache.argmax.to(torch.int32).contiguous(),
    }
    metadata = {"format": CACHE_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_file(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_reference_cache(path: str | Path) -> tuple[Tensor, ReferenceCache, dict[str, Any]]:
    """``(windows [n, T], cache with entries [n, T-1, k], metadata)`` of a file written by :func:`save_reference_cache`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw_meta = f.metadata() or {}
        if raw_meta.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{path} is not a pq-lightning reference cache (format {raw_meta.get('format')!r}); "
                "delete it or point reference_cache at another path to write a new one"
            )
        t = {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: json.loads(v) for k, v in raw_meta.items() if k != "format"}
    cache = ReferenceCache(
        topk_logprobs=t["topk_logprobs"],
        topk_ids=t["topk_ids"].to(torch.int64),
        top1_prob=t["top1_prob"],
        argmax=t["argmax"].to(torch.int64),
    )
    return t["windows"], cache, meta


class _CacheLookup:
    """Cache entries of a batch of windows, found by the windows' token ids."""

    def __init__(self, windows: Tensor, cache: ReferenceCache) -> None:
        self.cache = cache
        self.row_of = {_window_key(w): i for i, w in enumerate(windows)}

    def rows(self, ids: Tensor) -> Tensor:
        rows = []
        for w in ids:
            i = self.row_of.get(_window_key(w))
            if i is None:
                raise ValueError(
                    "a window is not in the reference cache: it was written for other windows (another "
                    "text, window length or tokenizer). Delete the cache file to rebuild it with the reference."
                )
            rows.append(i)
        return torch.tensor(rows, dtype=torch.long)


def _window_key(w: Tensor) -> bytes:
    return w.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes()


def _cache_row(cache: ReferenceCache, i: int, device: torch.device) -> ReferenceCache:
    return ReferenceCache(
        cache.topk_logprobs[i], cache.topk_ids[i], cache.top1_prob[i], cache.argmax[i]
    ).to(device)


def _cache_slice(cache: ReferenceCache, start: int, stop: int) -> ReferenceCache:
    """Positions ``start … stop-1`` of a one-window cache (entries ``[T-1, k]``)."""
    return ReferenceCache(
        cache.topk_logprobs[start:stop], cache.topk_ids[start:stop], cache.top1_prob[start:stop],
        cache.argmax[start:stop],
    )


def _cat_caches(parts: Sequence[ReferenceCache]) -> ReferenceCache:
    """One window's cache from the caches of its consecutive position chunks."""
    return ReferenceCache(
        torch.cat([p.topk_logprobs for p in parts]), torch.cat([p.topk_ids for p in parts]),
        torch.cat([p.top1_prob for p in parts]), torch.cat([p.argmax for p in parts]),
    )


# --------------------------------------------------------------------------------------------
# LightningModule
# --------------------------------------------------------------------------------------------


class QuantEvaluator(L.LightningModule):
    """KL divergence and top-1 agreement of a candidate against ``reference``.

    Args:
        candidate: a compressed-tensors checkpoint folder (ours, llm-compressor's, ...). Exactly one
            of ``candidate`` and ``plan``.
        reference: the unquantized model: Hugging Face folder, hub id, ``.gguf`` file, or None
            for the embedded SmolLM2-135M-Instruct.
        reference_gguf_file: GGUF file name inside ``reference`` when it is a folder.
        plan: a plan JSON applied in memory (RTN) to a copy of the reference with
            :func:`pq_lightning.served.apply_fake_quant`, instead of a checkpoint.
        input_amax: JSON file ``{linear: amax}`` for the plan's W4A4 NVFP4 Linears (also read from
            the plan file's own ``"input_amax"`` entry).
        reference_cache: safetensors file of the reference's top-k entries. Exists: it replaces
            the reference model (``kl_all`` / ``kl_conf`` are then nan). Missing: written at the end
            of a run with the reference model.
        dtype: dtype both models run in.
        top_k: k of the top-k KL (vLLM's top-k logprobs; 20 by default); also the cache's k.
        confidence_threshold: reference top-1 probability above which a position is confident.
        output_dir: where ``eval.json`` and ``eval.md`` are written at the end (None: not written).
    """

    def __init__(
        self,
        candidate: str | None = None,
        reference: str | None = None,
        reference_gguf_file: str | None = None,
        plan: str | None = None,
        input_amax: str | None = None,
        reference_cache: str | None = None,
        dtype: str = "float32",
        top_k: int = 20,
        confidence_threshold: float = 0.5,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
        if candidate is not None and plan is not None:
            raise ValueError("pass either candidate (a checkpoint folder) or plan (a plan JSON), not both")
        self.save_hyperparameters()
        self.reference_model: Any = None
        self.candidate_model: Any = None
        self.metrics = QuantEvalMetrics(top_k=top_k, confidence_threshold=confidence_threshold)
        self.results: dict[str, float] = {}
        self.notes: list[str] = []
        self._lookup: _CacheLookup | None = None
        self._cache_rows: list[tuple[Tensor, ReferenceCache]] = []
        self._writes_cache = False
        self.logit_chunk_bytes = LOGIT_CHUNK_BYTES  # logits are made this many bytes of positions at a time

    @classmethod
    def from_models(cls, reference_model, candidate_model=None, **kwargs) -> QuantEvaluator:
        """Evaluate already-built models; ``candidate_model=None`` with ``plan=`` builds it from the reference."""
        ev = cls(**kwargs)
        ev.reference_model = reference_model
        ev.candidate_model = candidate_model
        return ev

    # ---- models ---------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the models (once): the reference unless a cache replaces it, and the candidate."""
        from .checks import candidate_problem, check_model_path
        from .errors import UserError
        from .models import load_model, resolve_dtype
        from .served import load_quantized_checkpoint

        hp = self.hparams
        if self.candidate_model is None and hp.candidate is not None and (problem := candidate_problem(hp.candidate)):
            raise UserError(problem)
        cache_path = hp.reference_cache
        if self._lookup is None and cache_path is not None and Path(cache_path).is_file():
            windows, cache, meta = load_reference_cache(cache_path)
            if cache.k < hp.top_k:
                raise ValueError(
                    f"the reference cache {cache_path} holds the top {cache.k} tokens, top_k={hp.top_k} needs "
                    f"at least that many; lower top_k or delete the cache to rebuild it"
                )
            self._lookup = _CacheLookup(windows, cache)
            self.notes = [FULL_KL_NOTE.format(path=cache_path)]
        use_cache = self._lookup is not None
        dtype = resolve_dtype(hp.dtype)
        need_ref = not use_cache or (self.candidate_model is None and hp.plan is not None)
        if self.reference_model is None and need_ref:
            check_model_path(hp.reference, "reference")
            self.reference_model = load_model(hp.reference, gguf_file=hp.reference_gguf_file, dtype=dtype)
        if self.candidate_model is None:
            if hp.plan is not None:
                formats, amax = read_plan(hp.plan)
                if hp.input_amax is not None:
                    amax.update(read_input_amax(hp.input_amax))
                # with a cache the reference is not needed afterwards: quantize it in place
                self.candidate_model = fake_quant_candidate(
                    self.reference_model, formats, amax, in_place=use_cache
                )
            elif hp.candidate is not None:
                self.candidate_model, _ = load_quantized_checkpoint(hp.candidate, dtype=dtype)
            else:
                raise ValueError(
                    "QuantEvaluator needs a candidate: candidate=<compressed-tensors checkpoint folder> or "
                    "plan=<plan.json> (applied as fake-quant to the reference)"
                )
        if use_cache:
            self.reference_model = None
        self._writes_cache = cache_path is not None and not use_cache
        for m in (self.reference_model, self.candidate_model):
            if m is not None:
                m.eval()
                m.requires_grad_(False)

    def _logits(self, model, input_ids: Tensor) -> ChunkedLogits:
        return chunked_logits(model, input_ids, chunk_bytes=self.logit_chunk_bytes)

    # ---- loop -----------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self.metrics.reset()
        self._cache_rows = []

    def validation_step(self, batch, batch_idx: int) -> None:
        ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise ValueError(f"batches must be token windows [batch, T >= 2], got shape {tuple(ids.shape)}")
        stop = ids.shape[1] - 1  # positions that predict a token of the window
        with torch.inference_mode():
            q = self._logits(self.candidate_model, ids)
            if self._lookup is not None:
                rows = self._lookup.rows(ids)
                for b in range(ids.shape[0]):
                    cache = _cache_row(self._lookup.cache, int(rows[b]), ids.device)
                    for start, q_part in q.rows(b, stop):
                        self.metrics.update(_cache_slice(cache, start, start + q_part.shape[0]), q_part)
                return
            ref = self._logits(self.reference_model, ids)
            for b in range(ids.shape[0]):
                entries = []
                for (_, r_part), (_, q_part) in zip(ref.rows(b, stop), q.rows(b, stop), strict=True):
                    self.metrics.update(r_part, q_part)
                    if self._writes_cache:
                        entries.append(reference_cache_entries(r_part, self.hparams.top_k).to("cpu"))
                if self._writes_cache:
                    self._cache_rows.append((ids[b].cpu(), _cat_caches(entries)))

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        with warnings.catch_warnings():
            # from a cache, kl_all / kl_conf get no update and compute() to nan, as documented
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            values = {k: float(v) for k, v in self.metrics.compute().items()}
        self.metrics.reset()
        for k in COUNT_KEYS:
            if k in values:
                values[k] = int(values[k])
        self.results = values
        # the values are already reduced over ranks (torchmetrics); sync_dist averages identical values
        self.log_dict({k: float(v) for k, v in values.items() if not math.isnan(v)}, sync_dist=True)
        if self._writes_cache:
            self._write_cache()
        if self.hparams.output_dir and self.trainer.is_global_zero:
            meta = {
                "reference": "cache" if self._lookup is not None else (self.hparams.reference or "embedded SmolLM2"),
                "candidate": self.hparams.candidate or self.hparams.plan or "in-memory model",
            }
            write_eval(Path(self.hparams.output_dir), values, notes=self.notes, meta=meta)

    on_test_epoch_end = on_validation_epoch_end

    def _write_cache(self) -> None:
        rows = self._cache_rows
        self._cache_rows = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero or not rows:
            return
        seen: dict[bytes, int] = {}
        kept = []
        for w, entry in rows:  # DistributedSampler may repeat windows to even out the ranks
            key = _window_key(w)
            if key not in seen:
                seen[key] = len(kept)
                kept.append((w, entry))
        windows = torch.stack([w for w, _ in kept])
        cache = ReferenceCache(
            torch.stack([e.topk_logprobs for _, e in kept]),
            torch.stack([e.topk_ids for _, e in kept]),
            torch.stack([e.top1_prob for _, e in kept]),
            torch.stack([e.argmax for _, e in kept]),
        )
        meta = {"k": cache.k, "reference": self.hparams.reference, "dtype": self.hparams.dtype}
        save_reference_cache(self.hparams.reference_cache, windows, cache, meta)


# --------------------------------------------------------------------------------------------
# Reports and functional entry points
# --------------------------------------------------------------------------------------------


def write_eval(
    out_dir: Path,
    values: Mapping[str, float],
    *,
    notes: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> None:
    """``eval.json`` (metrics, then ``meta`` and ``notes``) and a markdown table ``eval.md``, atomically."""
    out_dir = Path(out_dir)
    record: dict[str, Any] = dict(values)
    record.update(meta or {})
    if notes:
        record["notes"] = list(notes)
    atomic_write_text(out_dir / "eval.json", json.dumps(record, indent=1) + "\n")
    keys = [k for k in REPORT_KEYS if k in values] + [k for k in values if k not in REPORT_KEYS]

    def fmt(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:.6g}"

    lines = [
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        "| " + " | ".join(fmt(values[k]) for k in keys) + " |",
    ]
    if meta:
        lines += [""] + [f"- {k}: {v}" for k, v in meta.items()]
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    atomic_write_text(out_dir / "eval.md", "\n".join(lines) + "\n")


def _trainer(trainer_kwargs: Mapping[str, Any] | None = None) -> L.Trainer:
    from .callbacks import HeapTrim

    kwargs = {"accelerator": "cpu", "devices": 1, **(trainer_kwargs or {})}
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), HeapTrim()]
    return L.Trainer(**kwargs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=False)


def evaluate_models(
    reference_model, candidate_model, windows: Tensor, *, batch_size: int = 2, top_k: int = 20,
    accelerator: str = "cpu", output_dir: str | None = None, trainer_kwargs: Mapping[str, Any] | None = None,
    **evaluator_kwargs: Any,
) -> dict[str, float]:
    """Run :class:`QuantEvaluator` through ``Trainer.validate`` over ``windows`` ``[n, T]``.

    ``trainer_kwargs`` (accelerator, devices, strategy...) override ``accelerator``; ``evaluator_kwargs``
    go to :class:`QuantEvaluator` (e.g. ``plan=``, ``reference_cache=``; then ``candidate_model`` /
    ``reference_model`` may be None).
    """
    from torch.utils.data import DataLoader

    from .data import WindowDataset

    ev = QuantEvaluator.from_models(
        reference_model, candidate_model, top_k=top_k, output_dir=output_dir, **evaluator_kwargs
    )
    loader = DataLoader(WindowDataset(windows), batch_size=batch_size, shuffle=False)
    _trainer({"accelerator": accelerator, **(trainer_kwargs or {})}).validate(ev, dataloaders=loader, verbose=False)
    return dict(ev.results)


def evaluate_checkpoint(
    reference_model, checkpoint: str | Path, windows: Tensor, *, batch_size: int = 2, top_k: int = 20,
    accelerator: str = "cpu", output_dir: str | None = None, trainer_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Load ``checkpoint`` as served and evaluate it against the in-memory ``reference_model``."""
    from .served import load_quantized_checkpoint

    dtype = next(reference_model.parameters()).dtype
    candidate, _ = load_quantized_checkpoint(checkpoint, dtype=dtype)
    try:
        return evaluate_models(
            reference_model, candidate, windows, batch_size=batch_size, top_k=top_k, accelerator=accelerator,
            output_dir=output_dir, trainer_kwargs=trainer_kwargs,
        )
    finally:
        del candidate
