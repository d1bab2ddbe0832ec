"""How ``quantize`` grows with the calibration data: wall time, CPU time, peak memory and counted work
per stage at several calibration sizes, on one or more models.

Every run is a fresh ``pq-lightning quantize`` process (no stage caches) at one budget with the
evaluation off, the method settings of ``--config``. Each stage reports its wall and CPU seconds, its
peak resident memory and its counted forward-equivalents per calibration token (``report.json``:
``stages``). Per model this prints the table, a least-squares fit ``seconds = fixed + per_1k * tokens/1000``
per stage, and the peak-RSS ratio of the largest size over the smallest (target <= 1.15). With
``--sweep-budgets`` it also times a Pareto sweep of several budgets at the largest size against the
single-budget run at that size (target <= 2x); ``--sweep-walk shared`` refines the sweep's budgets in one
shared walk (``--refine.walk``), the single-budget runs keep the config's walk.

Example::

    python scripts/bench_scaling.py --tokens 4096 16384 32768 --threads 2
    python scripts/bench_scaling.py --models smollm2-135m gemma3-270m --tokens 4096 32768 --sweep-budgets 4.5 5 6 7
    python scripts/bench_scaling.py --tokens 32768 --sweep-budgets 4.5 5 5.5 6 --sweep-walk shared
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=[None], help="--model values (default: the embedded SmolLM2)")
    p.add_argument("--config", default=str(REPO / "configs" / "smollm2-135m-wikitext.yaml"))
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--budget", type=float, default=6.0)
    p.add_argument("--sweep-budgets", type=float, nargs="*", default=[])
    p.add_argument("--sweep-walk", choices=("sequential", "shared"), default=None,
                   help="--refine.walk of the sweep run (default: the config's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more quantize arguments, last")
    p.add_argument("--output", default="out/bench-scaling")
    return p.parse_args(argv)


def run_quantize(args, model: str | None, tokens: int, budgets: list[float], out: Path, walk: str | None = None) -> dict:
    """One fresh ``quantize`` process; returns its report's stages, wall time and command."""
    n = max(1, round(tokens / args.seqlen))
    cmd = [sys.executable, "-m", "pq_lightning.cli", "quantize", "--config", args.config,
           "--output_dir", str(out), "--target_bits", json.dumps(budgets), "--pareto_bits", json.dumps(budgets),
           "--calibration.num_samples", str(n), "--calibration.seqlen", str(args.seqlen),
           "--evaluation.enabled", "false", *(["--refine.walk", walk] if walk else []), *args.extra]
    if model is not None:
        cmd += ["--model", model]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"quantize failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"tokens": n * args.seqlen, "windows": n, "wall_s": wall, "stages": report["stages"], "cmd": cmd}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; with one point, ``a = 0``."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def summarize(runs: list[dict]) -> dict:
    """Per stage: seconds fitted against tokens, counted work per token; the peak-RSS ratio."""
    stages = [s for s in runs[0]["stages"] if s != "report"]
    fits = {}
    for s in stages:
        xs = [r["tokens"] / 1000 for r in runs]
        a, b = fit_line(xs, [r["stages"][s]["wall_s"] for r in runs])
        ac, bc = fit_line(xs, [r["stages"][s]["cpu_s"] for r in runs])
        fe = [r["stages"][s].get("fe_per_token") for r in runs]
        fits[s] = {"fixed_s": a, "per_1k_tokens_s": b, "cpu_fixed_s": ac, "cpu_per_1k_tokens_s": bc,
                   "fe_per_token": fe[-1]}
    peaks = [max(st["peak_rss_gib"] for st in r["stages"].values()) for r in runs]
    return {"fits": fits, "peak_rss_gib": peaks, "peak_ratio_last_over_first": peaks[-1] / peaks[0]}


def print_model(model: str, runs: list[dict], summary: dict) -> None:
    print(f"\n## {model or 'SmolLM2-135M-Instruct'}\n")
    stages = list(summary["fits"])
    print("| tokens | total s | " + " | ".join(f"{s} s" for s in stages) + " | peak RSS GiB |")
    print("|---|---|" + "---|" * len(stages) + "---|")
    for r, peak in zip(runs, summary["peak_rss_gib"], strict=True):
        print(f"| {r['tokens']} | {r['wall_s']:.1f} | " + " | ".join(f"{r['stages'][s]['wall_s']:.1f}" for s in stages)
              + f" | {peak:.2f} |")
    print("\n| stage | fixed s | s per 1k tokens | CPU s per 1k tokens | fwd-equivalents per token |")
    print("|---|---|---|---|---|")
    for s, f in summary["fits"].items():
        fe = "-" if f["fe_per_token"] is None else f"{f['fe_per_token']:.2f}"
        print(f"| {s} | {f['fixed_s']:.1f} | {f['per_1k_tokens_s']:.2f} | {f['cpu_per_1k_tokens_s']:.2f} | {fe} |")
    ratio = summary["peak_ratio_last_over_first"]
    print(f"\npeak RSS {runs[-1]['tokens']} / {runs[0]['tokens']} tokens: {ratio:.3f}x "
          f"(target <= 1.15: {'PASS' if ratio <= 1.15 else 'FAIL'})")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in args.models:
        tag = Path(model).name if model else "smollm2-135m"
        runs = [run_quantize(args, model, t, [args.budget], out / f"{tag}-{t}") for t in sorted(args.tokens)]
        summary = summarize(runs)
        print_model(model, runs, summary)
        entry = {"runs": runs, **summary}
        if args.sweep_budgets:
            sweep = run_quantize(args, model, max(args.tokens), list(args.sweep_budgets), out / f"{tag}-sweep",
                                 walk=args.sweep_walk)
            ratio = sweep["wall_s"] / runs[-1]["wall_s"]
            print(f"Pareto sweep of {args.sweep_budgets} ({args.sweep_walk or 'config'} walk): {sweep['wall_s']:.1f} s = "
                  f"{ratio:.2f}x one budget "
                  f"(target <= 2: {'PASS' if ratio <= 2 else 'FAIL'})")
            entry["sweep"] = {**sweep, "ratio_to_one_budget": ratio}
        results[tag] = entry
    (out / "bench_scaling.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nwritten: {out / 'bench_scaling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
