"""Would an NVFP4 activation global scale chosen by held-out error beat the calibration amax (issue 18, lever 5)?

NVFP4 W4A4 quantizes a Linear's input per 16 values with a dynamic FP8 (E4M3) scale under one static
``input_global_scale = 448·6 / amax``. A larger global scale (``--multipliers`` above 1) clips: blocks
whose scale would pass 448 saturate. A smaller one leaves headroom, and costs resolution only where
block scales fall into E4M3's subnormals. For some Linears of the model this script takes ``amax``
over the fit windows, quantizes the held-out windows' inputs under ``multiplier × input_global_scale``
(weights RTN NVFP4) and prints the held-out output error ``E‖W x − Q(W) Q(x)‖²`` relative to the
amax rule's, and which Linears' held-out inputs exceed the fit amax.

Example::

    python scripts/activation_scale_study.py --num-samples 24 --seqlen 256 --holdout 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import linear_study_inputs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    linear_study_inputs.add_arguments(p)
    p.add_argument("--multipliers", type=float, nargs="+", default=[1 / 256, 1 / 16, 0.5, 1.0, 1.25, 1.5, 2.0])
    return p.parse_args(argv)


def capture_inputs(model, windows: torch.Tensor, names: list[str], batch_size: int = 4) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    xs = {n: [] for n in names}
    handles = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for n in names]
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                model(input_ids=windows[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def held_out_errors(W: torch.Tensor, x: torch.Tensor, n_fit: int, multipliers: list[float]) -> list[float]:
    """Held-out output error of ``W`` (RTN NVFP4) under each multiple of the fit amax's input global scale."""
    from pq_lightning.formats.nvfp4 import NVFP4

    fmt = NVFP4()
    igs = fmt.calibrate_input_global_scale(x[:n_fit].abs().max())
    xh = x[n_fit:]
    y, w_hat = xh @ W.T, fmt.fake_quant(W)
    return [float((y - fmt.fake_quant_activation(xh, igs * m) @ w_hat.T).pow(2).sum(1).mean()) for m in multipliers]


def main(argv=None) -> int:
    args = parse_args(argv)
    if 1.0 not in args.multipliers:
        raise SystemExit("--multipliers must include 1.0 (the amax rule the others are compared with)")
    model, windows, names, n_fit = linear_study_inputs.load(args)
    xs = capture_inputs(model, windows, names)
    base = args.multipliers.index(1.0)
    mean = [0.0] * len(args.multipliers)
    mods = dict(model.named_modules())
    for name in names:
        x = xs[name]
        errs = held_out_errors(mods[name].weight.detach(), x, n_fit, args.multipliers)
        rel = [e / errs[base] for e in errs]
        mean = [a + r / len(names) for a, r in zip(mean, rel, strict=True)]
        over = float(x[n_fit:].abs().max() / x[:n_fit].abs().max())
        print(f"{name}: held-out amax / fit amax {over:.3f} | " +
              " ".join(f"{m:g}:{r:.5f}" for m, r in zip(args.multipliers, rel, strict=True)), flush=True)
    print("mean held-out error relative to the amax rule: " +
          " ".join(f"{m:g}:{r:.5f}" for m, r in zip(args.multipliers, mean, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
