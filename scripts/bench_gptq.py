"""Micro benchmark of GPTQ refinement on synthetic Linears (no model needed).

For each weight shape, draws correlated inputs ``x = z @ A`` (4096 tokens by default, half for
fitting and half held out when ``--refine`` is on), then times the Hessian accumulation,
``gptq_nvfp4`` (one damping), ``scale_sweep_nvfp4`` and, optionally, the whole ``refine_nvfp4``,
and prints the output error of each against RTN.

    python scripts/bench_gptq.py                      # CUDA when available, else CPU
    python scripts/bench_gptq.py --device cpu --refine
"""

from __future__ import annotations

import argparse
import time

import torch

from pq_lightning.formats import get_format
from pq_lightning.gptq import (
    GPTQConfig,
    accumulate_hessian,
    gptq_nvfp4,
    output_error,
    refine_nvfp4,
    scale_sweep_nvfp4,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int):
    fn()  # warm-up (kernel compilation, allocator)
    _sync(device)
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_shape(out: int, inp: int, tokens: int, device: torch.device, repeats: int, refine: bool) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    W = torch.randn(out, inp, generator=g).to(device) * 0.02
    A = (torch.randn(inp, inp, generator=g) / inp**0.5).to(device)
    x = torch.randn(tokens, inp, generator=g).to(device) @ A
    fmt = get_format("nvfp4")
    gs = fmt.global_scale(W)

    def hessian(xs: torch.Tensor) -> torch.Tensor:
        H, n = None, 0
        for b in xs.split(512):
            H, n = accumulate_hessian(H, b, n)
        return H / n

    t_h, H = _timed(lambda: hessian(x), device, repeats)
    t_gptq, q = _timed(lambda: gptq_nvfp4(W, H, global_scale=gs, damp=0.01), device, repeats)
    t_sweep, sw = _timed(lambda: scale_sweep_nvfp4(W, H, global_scale=gs), device, repeats)
    e_rtn = output_error(W, fmt.quantize(W, global_scale=gs).dequantize(), H)
    e_gptq = output_error(W, q.dequantize(), H)
    e_sweep = output_error(W, sw.dequantize(), H)
    print(
        f"[{out}x{inp}, {tokens} tok, {device}] hessian {t_h * 1e3:8.1f} ms | gptq_nvfp4 {t_gptq * 1e3:8.1f} ms"
        f" | sweep {t_sweep * 1e3:7.1f} ms | fit error vs RTN: gptq {e_gptq / e_rtn:.3f}, sweep {e_sweep / e_rtn:.3f}"
    )
    if refine:
        half = tokens // 2
        H_fit, H_held = hessian(x[:half]), hessian(x[half:])
        t_ref, res = _timed(
            lambda: refine_nvfp4(W, H_fit, H_held, global_scale=gs, config=GPTQConfig()), device, 1
        )
        errs = ", ".join(
            f"{k} {v.heldout / res.candidates['rtn'].heldout:.3f}" for k, v in res.candidates.items()
        )
        print(f"    refine_nvfp4 {t_ref:.2f} s -> {res.key} | held-out error / RTN: {errs}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--refine", action="store_true", help="also time the whole refine_nvfp4 (fit/held-out split)"
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--shapes", default="2048x2048,576x1536", help="comma-separated OUTxIN weight shapes")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    for shape in args.shapes.split(","):
        out, inp = (int(v) for v in shape.lower().split("x"))
        bench_shape(out, inp, args.tokens, device, args.repeats, args.refine)


if __name__ == "__main__":
    main()
