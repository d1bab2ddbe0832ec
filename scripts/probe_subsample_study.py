"""Does a subsample of the probe's tokens keep the allocator's decisions?

Two subsamples, each unbiased: ``--tokens``, the positions of every window on which the output-space
error is measured (``ProbeConfig.output_error_tokens``; the ``output`` estimator costs one extra matmul
per Linear and format on every token it covers), and ``--windows``, how many of the calibration windows
the probe reads at all (``ProbeConfig.num_samples``; the windows are drawn in random order, so the first
``k`` are a uniform subset). This script runs the pipeline's probe stage on every window with the exact
output error (the reference), then with each subsample, and per subsample prints:

* Spearman of the per-Linear output error against the exact one (per format);
* per budget, the Linears whose format differs from the exact plan's, and the regret: the exact
  predicted Δloss of the subsample's plan over the exact plan's (1.0 = the same quality of decision);
* the probe's wall and CPU seconds and its counted forward-equivalents per token.

Example::

    python scripts/probe_subsample_study.py --num-samples 64 --seqlen 512 --tokens 0.25 --windows 8 16 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--calibration", default=str(REPO.parent / "shared" / "data" / "wikitext-2-valid-tokenized.txt"))
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokens", type=float, nargs="*", default=[0.125, 0.25],
                   help="output-error positions per window, fractions (or counts), every window read")
    p.add_argument("--windows", type=int, nargs="*", default=[],
                   help="windows the probe reads (output error on --window-tokens of their positions)")
    p.add_argument("--window-tokens", type=float, default=0.25, help="output-error positions with --windows")
    p.add_argument("--budgets", type=float, nargs="+", default=[4.5, 5.0, 5.5, 6.0, 7.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="out/probe-subsample")
    return p.parse_args(argv)


def _spearman(a: list[float], b: list[float]) -> float:
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))


def main(argv=None) -> int:
    from pq_lightning import stages
    from pq_lightning.config import CalibrationConfig, ProbeConfig, TrainerConfig
    from pq_lightning.smooth import SmoothConfig
    from pq_lightning.stage_runner import StageRunner

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = ["nvfp4", "fp8"]
    out = Path(args.output)
    run = StageRunner(out)
    run.work.mkdir(parents=True, exist_ok=True)
    loaded = stages.load(run, model=args.model, gguf_file=None, dtype=args.dtype, memory_cap_gb=None, offload="disk")
    cal = stages.calibration(run, loaded, CalibrationConfig(source=args.calibration, seqlen=args.seqlen,
                                                            num_samples=args.num_samples, batch_size=args.batch_size,
                                                            holdout_fraction=0.0))
    body = stages.body(run, loaded, include=None, exclude=None)
    def positions(t: float | None) -> int | float | None:
        return None if t is None else (int(t) if t >= 1 else t)

    variants = {"exact": ProbeConfig(None, num_samples=None)}
    variants |= {f"tokens={t:g}": ProbeConfig(positions(t), num_samples=None) for t in args.tokens}
    variants |= {f"windows={w}": ProbeConfig(positions(args.window_tokens), num_samples=w) for w in args.windows}
    results = {}
    for label, cfg in variants.items():
        run.records.pop("probe", None)
        probed = stages.probe(run, loaded, cal, body, formats=formats, output_error=True, cfg=cfg,
                              smooth=SmoothConfig(enabled=False), trainer=TrainerConfig(accelerator="cpu"))
        costs = stages.cost(run, loaded, body, probed, cal, formats=formats, estimator="output",
                            smooth=SmoothConfig(enabled=False))
        plans = stages.plan(run, loaded, costs, targets=[(b, None) for b in args.budgets], formats=formats,
                            estimator="output", pins=None, bans=None, sweep_bits=[])
        rec = run.records["probe"]
        results[label] = {"costs": costs, "plans": plans.budgets, "wall_s": rec.wall_s, "cpu_s": rec.cpu_s,
                           "cached": rec.cached, "fe_per_token": rec.notes.get("fe_per_token")}
    exact = results["exact"]
    table = []
    for label in list(variants)[1:]:
        r = results[label]
        row = {"subsample": label, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "fe_per_token": r["fe_per_token"],
               "exact_wall_s": exact["wall_s"], "exact_fe_per_token": exact["fe_per_token"]}
        for f in formats:
            names = [n for n in exact["costs"] if f in exact["costs"][n].dloss]
            row[f"spearman_{f}"] = _spearman([exact["costs"][n].dloss[f] for n in names],
                                             [r["costs"][n].dloss[f] for n in names])
        for label, plan in r["plans"].items():
            ref = exact["plans"][label]
            changed = sum(plan.formats[n] != ref.formats[n] for n in ref.formats)
            true_dloss = sum(exact["costs"][n].dloss[f] for n, f in plan.formats.items())
            row[f"{label}_changed"] = changed
            row[f"{label}_regret"] = true_dloss / ref.predicted_dloss
        table.append(row)
    print(json.dumps(table, indent=1))
    (out / "probe_subsample.json").write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
