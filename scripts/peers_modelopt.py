"""Run NVIDIA ModelOpt's ``auto_quantize`` (gradient scores, NVFP4 / FP8 / no-quant menu) at a body bpp.

A peer runner for ``scripts/bench_vs_peers.py``, like ``peers_llmcompressor.py``: it runs under an
interpreter that has ``nvidia-modelopt`` (its own virtual environment, see below) and reports the
per-Linear format ModelOpt chose; the bench materialises that allocation with our quantizers and
evaluates it like every other row.

What it does:

1. loads ``--model`` (a Hugging Face folder, or a GGUF file / a folder with ``--gguf-file``, which
   needs the ``gguf`` package) in ``--dtype`` (default: as stored);
2. reads the calibration windows of ``--tokens`` (``input_ids [N, seqlen]`` int64, the file the bench
   writes), each window one batch with ``labels = input_ids`` (the next-token loss of the documented
   gradient usage);
3. calls ``mtq.auto_quantize(method="gradient")`` with ``quantization_formats = [NVFP4_DEFAULT_CFG,
   FP8_DEFAULT_CFG]`` (ModelOpt always adds "no quantization"), ``num_calib_steps`` and
   ``num_score_steps`` = every window (unless given), every quantizable Linear outside the body
   (``lm_head``) in ``disabled_layers`` (kept BF16, as ours keeps it), and ``constraints =
   {"effective_bits": E}`` converted from ``--target-bpp`` (below); the wall time of that call
   alone is ``auto_quantize_s``;
4. writes ``--output`` (JSON): the format of every quantizable Linear (``{name: "nvfp4" | "fp8" |
   "bf16"}``, names as in ``model.named_modules()``), ModelOpt's own effective bits, the body bpp of
   that choice in ModelOpt's accounting and in ours, the conversion, the times and the versions.

**Effective bits vs body bpp.** ModelOpt's ``effective_bits`` (cost model ``"weight"``) is
``16 * sum(c_m * n_m) / sum(n_m)`` over every module it can quantize (each ``QuantLinear``; ``n_m``
its weight's element count; ``c_m`` the chosen format's compression: NVFP4 4.5/16 and FP8 (E4M3,
``(4 + 3 + 1)/16``) 8/16 from its configs, no-quant 1). A disabled module stays in the sum at 16
bits. So besides the decoder-layer Linears (our "body", ``N_body`` weights) it counts ``lm_head``
(``N_other`` weights, at 16 bits); with tied embeddings that is the embedding matrix itself, so the
embeddings are in its denominator. Norms, biases and a non-tied embedding are not. Hence::

    E = (B * N_body + 16 * N_other) / (N_body + N_other)      B = body bpp in ModelOpt's accounting
    B = (E * (N_body + N_other) - 16 * N_other) / N_body

Our accounting of the same choice counts the exact bits on disk (NVFP4: 4 per weight + one FP8
scale per 16 + two fp32 global scales per Linear; FP8: 8 per weight + one fp32 scale per output
channel; BF16: 16), slightly more than ModelOpt's nominal 4.5 / 8. With ``--exact-bpp`` (default)
the search's stored scores are re-solved by ModelOpt's own LP solver (no new scoring) at a lower
``E`` (bisection) until our exact body bpp of the choice is <= ``--target-bpp``; both ``E`` and both
bpp figures are printed and recorded.

**CPU.** ModelOpt's NVFP4 fake-quant (``tensorrt::dynamic_block_quantize_op``) asserts CUDA (its
kernels are a CUDA extension or Triton). On CPU this script replaces the op ModelOpt's quantizer
calls with pq-lightning's NVFP4 format (``pq_lightning.formats.get_format("nvfp4")``, installed in
this environment with ``pip install -e <repo> --no-deps``): global scale ``448 * 6 / amax`` from
ModelOpt's calibrated per-tensor ``amax``, FP8 E4M3 scale per 16 along the last dimension, E2M1
round-to-nearest-even; the same maths as ModelOpt's kernel. Every other op (FP8, calibration, the
LP) is ModelOpt's own. The record says which kernel ran (``nvfp4_kernel``).

Environment (its pins need not match ours)::

    .venv/bin/python -m venv /work/venvs/modelopt
    /work/venvs/modelopt/bin/pip install torch==2.13.0            # first: keeps the CPU build
    /work/venvs/modelopt/bin/pip install transformers==5.17.0 nvidia-modelopt==0.47.0 requests
    /work/venvs/modelopt/bin/pip install -e . --no-deps            # the NVFP4 CPU kernel

    /work/venvs/modelopt/bin/python scripts/peers_modelopt.py --model out/peers/reference \\
        --tokens out/peers/calibration.safetensors --target-bpp 6.0 --output out/peers/modelopt-6bpp.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# the llm-compressor runner beside this file: the same windows file format, version record and atomic writer
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_llmcompressor import load_atomic, load_windows  # noqa: E402
from peers_llmcompressor import versions as llmc_versions  # noqa: E402

#: ModelOpt's nominal weight bits per format (its configs' effective_bits; FP8 from E4M3's 1+4+3 bits).
NOMINAL_BITS = {"nvfp4": 4.5, "fp8": 8.0, "bf16": 16.0}
#: the preset configs searched, in ModelOpt's names, and our format name of each
MENU = {"NVFP4_DEFAULT_CFG": "nvfp4", "FP8_DEFAULT_CFG": "fp8"}
#: a decoder-layer Linear (the body), when the bench does not pass the names
BODY_RE = re.compile(r"(^|\.)layers\.\d+\.")
NVFP4_GROUP = 16


# --------------------------------------------------------------------------------------------------
# Pure parts (no torch model, no modelopt)
# --------------------------------------------------------------------------------------------------


def effective_bits_for_body_bpp(body_bpp: float, n_body: int, n_other: int, other_bits: float = 16.0) -> float:
    """ModelOpt's ``effective_bits`` whose body share is ``body_bpp`` (the others at ``other_bits``)."""
    if n_body <= 0 or n_other < 0:
        raise ValueError(f"need n_body > 0 and n_other >= 0, got {n_body}, {n_other}")
    return (body_bpp * n_body + other_bits * n_other) / (n_body + n_other)


def body_bpp_for_effective_bits(effective_bits: float, n_body: int, n_other: int, other_bits: float = 16.0) -> float:
    """The inverse of :func:`effective_bits_for_body_bpp`."""
    if n_body <= 0 or n_other < 0:
        raise ValueError(f"need n_body > 0 and n_other >= 0, got {n_body}, {n_other}")
    return (effective_bits * (n_body + n_other) - other_bits * n_other) / n_body


def exact_bits(fmt: str, shape: Sequence[int]) -> int:
    """Our exact bits on disk of one ``[out, in]`` Linear (pq-lightning's ``QuantFormat.bits``)."""
    out, inp = int(shape[0]), int(shape[1])
    if fmt == "nvfp4":  # E2M1 codes + FP8 group scales + fp32 weight and input global scales
        return out * inp * 4 + out * (inp // NVFP4_GROUP) * 8 + 32 + 32
    if fmt == "fp8":  # E4M3 weights + one fp32 scale per output channel
        return out * inp * 8 + out * 32
    if fmt == "bf16":
        return out * inp * 16
    raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(NOMINAL_BITS)}")


def body_bpp(choice: Mapping[str, str], shapes: Mapping[str, Sequence[int]], body: Sequence[str], *,
             exact: bool = True) -> float:
    """Bits per body weight of ``choice``: exact (ours) or nominal (ModelOpt's 4.5 / 8 / 16)."""
    missing = [n for n in body if n not in choice]
    if missing:
        raise KeyError(f"no format for body Linears {missing[:3]}{'...' if len(missing) > 3 else ''}")
    bits = weights = 0.0
    for n in body:
        numel = int(shapes[n][0]) * int(shapes[n][1])
        weights += numel
        bits += exact_bits(choice[n], shapes[n]) if exact else NOMINAL_BITS[choice[n]] * numel
    return bits / weights


def format_of_bits(effective_bits: float) -> str:
    """Our format name of a ModelOpt recipe from its effective bits (4.5, 8 or 16)."""
    for name, b in NOMINAL_BITS.items():
        if abs(effective_bits - b) < 1e-6:
            return name
    raise ValueError(f"no format of this menu has {effective_bits} effective bits ({NOMINAL_BITS})")


def format_of_quantizer(enabled: bool, num_bits: Any) -> str:
    """Our format name of a ModelOpt weight quantizer's state (E2M1 -> nvfp4, E4M3 -> fp8, off -> bf16)."""
    if not enabled:
        return "bf16"
    nb = tuple(num_bits) if isinstance(num_bits, (list, tuple)) else num_bits
    if nb == (2, 1):
        return "nvfp4"
    if nb == (4, 3):
        return "fp8"
    raise ValueError(f"weight quantizer with num_bits {num_bits!r} is outside the NVFP4 / FP8 menu")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face folder, .gguf file, or folder with --gguf-file")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--tokens", required=True, help="safetensors file with input_ids [N, seqlen] int64")
    p.add_argument("--target-bpp", type=float, required=True, help="body bits per weight, our accounting")
    p.add_argument("--output", required=True, help="JSON file for the per-Linear choice and the record")
    p.add_argument("--body-names", default=None,
                   help="JSON file with the list of body Linear names (default: every Linear under layers.<i>.)")
    p.add_argument("--dtype", default="auto", help="dtype the model is loaded in (default: as stored)")
    p.add_argument("--num-calib-steps", type=int, default=None, help="calibration batches (default: all windows)")
    p.add_argument("--num-score-steps", type=int, default=None, help="scoring batches (default: all windows)")
    p.add_argument("--exact-bpp", action=argparse.BooleanOptionalAction, default=True,
                   help="re-solve at a lower effective_bits until our exact body bpp is <= the target")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if not 4.5 <= args.target_bpp <= 16.0:
        p.error(f"--target-bpp {args.target_bpp} is outside [4.5, 16] (the NVFP4 .. BF16 menu)")
    for flag in ("threads", "num_calib_steps", "num_score_steps"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


# --------------------------------------------------------------------------------------------------
# The NVFP4 CPU kernel
# --------------------------------------------------------------------------------------------------


def install_cpu_nvfp4_kernel() -> str:
    """Route ModelOpt's NVFP4 fake-quant of CPU tensors to pq-lightning's NVFP4 format; returns a label.

    ModelOpt's quantizer calls ``tensor_quant.dynamic_block_quantize_op(inputs, block_size, amax,
    num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)``; for NVFP4 (E2M1 = 4 bits with
    2 exponent bits, E4M3 scales = 8 bits with 4, blocks of 16) on a CPU tensor this sends it to
    ``NVFP4.fake_quant_activation(inputs, 448 * 6 / amax)``: per 16 values along the last dimension
    an FP8 scale of ``gs * block_amax / 6``, then E2M1 round-to-nearest-even; the dtype is kept. Any
    other format or a CUDA tensor goes to ModelOpt's own op.
    """
    import torch
    from modelopt.torch.quantization import tensor_quant

    from pq_lightning.formats import get_format
    from pq_lightning.formats.nvfp4 import global_scale_from_amax

    fmt = get_format("nvfp4")
    original = tensor_quant.dynamic_block_quantize_op
    if getattr(original, "_pq_cpu_nvfp4", False):
        return "pq_lightning.formats nvfp4 (CPU)"

    def op(inputs: torch.Tensor, block_size: int, amax: torch.Tensor | None, num_bits: int, exponent_bits: int,
           scale_num_bits: int, scale_exponent_bits: int) -> torch.Tensor:
        nvfp4 = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        if inputs.is_cuda or not nvfp4:
            return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        if block_size != NVFP4_GROUP or amax is None:
            raise ValueError(f"CPU NVFP4 kernel: needs blocks of 16 and a calibrated amax, got {block_size}, {amax}")
        gs = global_scale_from_amax(amax.detach().float().abs().amax())
        return fmt.fake_quant_activation(inputs, gs)

    op._pq_cpu_nvfp4 = True  # type: ignore[attr-defined]
    tensor_quant.dynamic_block_quantize_op = op
    return "pq_lightning.formats nvfp4 (CPU)"


def check_cpu_nvfp4_kernel(seed: int = 0) -> dict[str, float]:
    """The installed CPU kernel against ModelOpt's own NVFP4 tensor (quantize, then dequantize) on one draw.

    Returns the largest absolute and relative deviation and the share of values that differ at
    all; both compute ``q * scale * scale_2`` in a different fp32 order, so a few ulps are expected.
    """
    import torch
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 3
    q, scale, scale_2 = NVFP4QTensor.quantize(x, NVFP4_GROUP)
    ref = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: NVFP4_GROUP})
    got = tensor_quant.dynamic_block_quantize_op(x, NVFP4_GROUP, x.abs().amax(), 4, 2, 8, 4)
    diff = (got - ref).abs()
    return {"max_abs_diff": float(diff.max()), "max_rel_diff": float((diff / ref.abs().clamp_min(1e-30)).max()),
            "share_differing": float((diff > 0).float().mean())}


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------


def load_model(model: str, gguf_file: str | None, dtype: str) -> Any:
    """A Hugging Face causal LM from a folder or a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def versions() -> dict[str, str]:
    """Versions of the packages this run depends on."""
    return llmc_versions(("nvidia-modelopt", "transformers", "torch", "pq-lightning"))


def _choice_from_recipes(recipes: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, str]:
    """``{module name: format}`` from ModelOpt's ``{hparam name: QuantRecipe}`` and its candidate stats."""
    choice: dict[str, str] = {}
    for hp, recipe in recipes.items():
        fmt = format_of_bits(float(recipe.compression) * 16)
        for name in stats[hp]["module_names"]:
            choice[name] = fmt
    return choice


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, run ``auto_quantize`` (timed alone), read its choice; return the record written to ``--output``."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import modelopt.torch.quantization as mtq

    kernel = "modelopt (CUDA)"
    kernel_check: dict[str, float] | None = None
    if not torch.cuda.is_available():
        kernel = install_cpu_nvfp4_kernel()
        kernel_check = check_cpu_nvfp4_kernel()
        print(f"[modelopt] NVFP4 on CPU: {kernel}; vs ModelOpt's NVFP4QTensor: {kernel_check}", flush=True)

    windows = load_windows(args.tokens)
    t0 = time.perf_counter()
    model = load_model(args.model, args.gguf_file, args.dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    load_s = time.perf_counter() - t0
    device = next(model.parameters()).device

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
    if args.body_names:
        body = list(json.loads(Path(args.body_names).read_text()))
        unknown = [n for n in body if n not in linears]
        if unknown:
            raise ValueError(f"--body-names lists {unknown[:3]}, not nn.Linear modules of the model")
    else:
        body = [n for n in linears if BODY_RE.search(n)]
    if not body:
        raise ValueError("no body Linears (none under layers.<i>.): pass --body-names")
    others = [n for n in linears if n not in set(body)]
    n_body = sum(shapes[n][0] * shapes[n][1] for n in body)
    n_other = sum(shapes[n][0] * shapes[n][1] for n in others)  # ModelOpt counts every QuantLinear's weight
    e_bits = effective_bits_for_body_bpp(args.target_bpp, n_body, n_other)
    print(f"[modelopt] target body bpp {args.target_bpp:g} -> effective_bits {e_bits:.6f} "
          f"(N_body {n_body}, N_other {n_other} at 16 bits: {others})", flush=True)

    batches = [{"input_ids": w[None].to(device), "attention_mask": torch.ones_like(w[None]).to(device),
                "labels": w[None].to(device)} for w in windows]
    n_calib = min(args.num_calib_steps or len(batches), len(batches))
    n_score = min(args.num_score_steps or len(batches), len(batches))

    t0 = time.perf_counter()
    model, state = mtq.auto_quantize(
        model,
        constraints={"effective_bits": e_bits},
        quantization_formats=list(MENU),
        data_loader=batches,
        forward_step=lambda m, batch: m(**batch),
        loss_func=lambda output, batch: output.loss,
        disabled_layers=others or None,
        num_calib_steps=n_calib,
        num_score_steps=n_score,
        method="gradient",
        verbose=False,
    )
    auto_quantize_s = time.perf_counter() - t0

    # the choice, read from the quantized model's weight quantizers (checked against the search's record)
    choice: dict[str, str] = {}
    for name, module in model.named_modules():
        if name in linears and hasattr(module, "weight_quantizer"):
            wq = module.weight_quantizer
            choice[name] = format_of_quantizer(bool(wq.is_enabled), wq.num_bits)
    from_search = _choice_from_recipes(state["best"]["recipe"], state["candidate_stats"])
    if from_search != {n: choice.get(n) for n in from_search}:
        raise AssertionError("ModelOpt's recorded best recipe and its quantizers' states differ")
    mo_bits = float(state["best"]["constraints"]["effective_bits"])
    first = {"effective_bits_constraint": e_bits, "effective_bits": mo_bits,
             "body_bpp_modelopt": body_bpp(choice, shapes, body, exact=False),
             "body_bpp_ours": body_bpp(choice, shapes, body)}
    print(f"[modelopt] auto_quantize {auto_quantize_s:.1f} s: effective bits {mo_bits:.4f} "
          f"(constraint {e_bits:.4f}); body bpp {first['body_bpp_modelopt']:.4f} ModelOpt's accounting, "
          f"{first['body_bpp_ours']:.4f} ours", flush=True)

    resolves: list[dict[str, float]] = []
    e_final = e_bits
    if args.exact_bpp and first["body_bpp_ours"] > args.target_bpp * (1 + 1e-9):
        from modelopt.torch.quantization.algorithms import _resolve_best_recipe

        def solve(e: float) -> dict[str, str]:
            c = _choice_from_recipes(_resolve_best_recipe(state, {"effective_bits": e}), state["candidate_stats"])
            return {**choice, **c}

        # largest E (to ~1e-4 bits) whose choice fits our exact accounting; the E for 4.5 body bpp always fits
        lo = effective_bits_for_body_bpp(NOMINAL_BITS["nvfp4"], n_body, n_other)
        hi = e_bits
        best = solve(lo)
        e_final = lo
        for _ in range(40):
            if hi - lo < 1e-5:
                break
            mid = 0.5 * (lo + hi)
            c = solve(mid)
            bpp = body_bpp(c, shapes, body)
            resolves.append({"effective_bits": mid, "body_bpp_ours": bpp})
            if bpp <= args.target_bpp * (1 + 1e-9):
                lo, best, e_final = mid, c, mid
            else:
                hi = mid
        choice = best
        print(f"[modelopt] re-solved at effective_bits {e_final:.6f} ({len(resolves)} LP solves): body bpp "
              f"{body_bpp(choice, shapes, body, exact=False):.4f} ModelOpt's accounting, "
              f"{body_bpp(choice, shapes, body):.4f} ours", flush=True)

    counts: dict[str, int] = {}
    for n in body:
        counts[choice[n]] = counts.get(choice[n], 0) + 1
    final_nominal = body_bpp(choice, shapes, body, exact=False)
    record: dict[str, Any] = {
        "tool": "nvidia-modelopt",
        "method": "gradient",
        "menu": [*MENU, "no-quant"],
        "target_bpp": args.target_bpp,
        "choice": choice,
        "body": body,
        "format_counts": counts,
        "n_body": n_body,
        "n_other": n_other,
        "other_linears": others,
        "effective_bits_formula": "E = (B * N_body + 16 * N_other) / (N_body + N_other)",
        "effective_bits_constraint": e_final,
        "effective_bits": (final_nominal * n_body + 16.0 * n_other) / (n_body + n_other),
        "body_bpp_modelopt": final_nominal,
        "body_bpp_ours": body_bpp(choice, shapes, body),
        "first_solve": first,
        "resolves": resolves,
        "auto_quantize_s": auto_quantize_s,
        "load_s": load_s,
        "num_windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "num_calib_steps": n_calib,
        "num_score_steps": n_score,
        "nvfp4_kernel": kernel,
        "nvfp4_kernel_check": kernel_check,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; writes ``--output`` and prints a one-line summary."""
    args = parse_args(argv)
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as err:
        print(
            f"nvidia-modelopt is not importable from {sys.executable} ({err}). Install it in a separate "
            "environment (see this script's docstring) and run this script with that interpreter.",
            file=sys.stderr,
        )
        return 2
    record = run(args)
    load_atomic().atomic_write_text(args.output, json.dumps(record, indent=1, default=str) + "\n")
    summary = {k: record[k] for k in ("target_bpp", "effective_bits_constraint", "effective_bits",
                                       "body_bpp_modelopt", "body_bpp_ours", "format_counts", "auto_quantize_s")}
    print(json.dumps(summary))
    return 0 if not math.isnan(record["body_bpp_ours"]) else 1


if __name__ == "__main__":
    sys.exit(main())
