"""NVFP4 / FP8 fake-quant and pack: ours against compressed-tensors' reference path, same run.

    .venv/bin/python scripts/bench_formats.py [--size 4096] [--repeats 5] [--device cpu|cuda]

Prints the median wall time of each path and the ratio (reference / ours); target: ours >= 2x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from pq_lightning.formats import get_format


def _time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ct_nvfp4(w: torch.Tensor, pack: bool) -> torch.Tensor:
    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    gs = generate_gparam(w.amin(), w.amax())
    g = w.unflatten(-1, (-1, 16))
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
    if pack:
        return pack_fp4_to_uint8(quantize(w, scale, zp, args, global_scale=gs))
    return fake_quantize(w, scale, zp, args, global_scale=gs)


def _ct_fp8(w: torch.Tensor, pack: bool) -> torch.Tensor:
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    if pack:
        return quantize(w, scale, zp, args, dtype=torch.float8_e4m3fn)
    return fake_quantize(w, scale, zp, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    w = torch.randn(a.size, a.size, device=a.device) * 0.02
    nv, fp8 = get_format("nvfp4"), get_format("fp8")
    rows = [
        ("nvfp4 fake_quant", lambda: nv.fake_quant(w), lambda: _ct_nvfp4(w, False)),
        ("nvfp4 pack", lambda: nv.pack(w), lambda: _ct_nvfp4(w, True)),
        ("fp8 fake_quant", lambda: fp8.fake_quant(w), lambda: _ct_fp8(w, False)),
        ("fp8 pack", lambda: fp8.pack(w), lambda: _ct_fp8(w, True)),
    ]
    print(f"{a.size}x{a.size} fp32 weight on {a.device}, torch threads={torch.get_num_threads()}")
    print(f"{'op':<18}{'ours (ms)':>12}{'compressed-tensors (ms)':>26}{'speed-up':>10}")
    for name, ours, ref in rows:
        t_ours = _time(ours, a.repeats, a.device)
        t_ref = _time(ref, a.repeats, a.device)
        print(f"{name:<18}{t_ours * 1e3:>12.1f}{t_ref * 1e3:>26.1f}{t_ref / t_ours:>9.2f}x")
    if a.device == "cpu":
        import os

        os.environ["PQ_COMPILE"] = "1"
        t0 = time.perf_counter()
        nv.fake_quant(w)
        compile_s = time.perf_counter() - t0
        t_comp = _time(lambda: nv.fake_quant(w), a.repeats, a.device)
        t_ref = _time(lambda: _ct_nvfp4(w, False), a.repeats, a.device)
        print(f"{'nvfp4 fake_quant':<18}{t_comp * 1e3:>12.1f}{t_ref * 1e3:>26.1f}{t_ref / t_comp:>9.2f}x"
              f"  (PQ_COMPILE=1, first call incl. compile {compile_s:.1f} s)")
    print("target: nvfp4 speed-up >= 2x")


if __name__ == "__main__":
    main()
