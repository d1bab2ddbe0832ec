"""Serve a pq-lightning checkpoint with vLLM in-process: greedy generations and prompt log-probs.

Needs a CUDA GPU and vLLM (``pip install vllm``); nothing else of this project is imported unless
``--compare-emulation`` is given::

    python scripts/vllm_smoke.py --checkpoint out/smollm2-135m/checkpoint-6bpp --out vllm_smoke.json

What it does:

1. ``vllm.LLM(model=CHECKPOINT, quantization="compressed-tensors", max_model_len=..., enforce_eager=True,
   gpu_memory_utilization=0.2)``: vLLM reads the mixed NVFP4 / FP8 / BF16 config groups itself
   (on Hopper NVFP4 runs through its emulation or Marlin weight-only kernels; on Blackwell natively).
2. Greedy generation (temperature 0) of ``--max-tokens`` tokens for two prompts; prints each text.
3. The top-20 prompt log-probabilities of the first prompt (``SamplingParams(prompt_logprobs=20)``):
   for every prompt position after the first, the actual token's log-prob and rank, and the top 20.
4. ``--compare-emulation``: the same prompt through :func:`pq_lightning.served.load_quantized_checkpoint`
   (this project's emulation of the served model, on the same GPU): top-1 agreement with vLLM's
   prompt top-1 and the largest |Δ log-prob| over vLLM's top-20 tokens.
5. Writes ``--out`` (JSON, atomically): texts, token ids, prompt log-probs, timings (engine start,
   generation, prompt log-probs) and versions.

Targets: the engine loads the checkpoint with no error, the texts are readable English for the
real SmolLM2 (a random-weight model gives noise), and with ``--compare-emulation`` top-1 agreement
is high (>= 0.9 for SmolLM2 at 6 bpp) and the log-prob gap small (bf16 rounding, < ~0.1 nats).
Exit code 0 when the engine ran; 2 with a message when vLLM is not importable or no GPU is present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Quantization makes large language models smaller by",
)
VLLM_MISSING = (
    "vllm is not importable ({err}). pip install vllm; needs a CUDA GPU (compressed-tensors NVFP4 and "
    "FP8 checkpoints are served on Hopper and Blackwell GPUs)."
)


class SmokeError(RuntimeError):
    """A condition the user must fix (no vLLM, no GPU, not a checkpoint folder)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a pq-lightning (compressed-tensors) checkpoint folder")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/vllm_smoke.json, else ./vllm_smoke.json)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: two built-in prompts); the first also gets prompt log-probs")
    p.add_argument("--max-tokens", type=int, default=24, help="greedy tokens generated per prompt")
    p.add_argument("--top-logprobs", type=int, default=20, help="k of the prompt log-probs")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-emulation", action="store_true",
                   help="also run pq_lightning's served emulation on the first prompt and compare")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not 1 <= args.top_logprobs <= 20:
        p.error(f"--top-logprobs must be in 1..20 (vLLM's default max_logprobs is 20), got {args.top_logprobs}")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        p.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    args.prompts = list(args.prompt) if args.prompt else list(DEFAULT_PROMPTS)
    if args.out is None:
        out_dir = os.environ.get("OUT")
        args.out = str(Path(out_dir) / "vllm_smoke.json") if out_dir else "vllm_smoke.json"
    return args


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder, after checking it holds a compressed-tensors ``config.json``."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise SmokeError(f"{path} is not a checkpoint folder (no config.json); pass the checkpoint-<budget> "
                         "folder that `pq-lightning quantize` wrote")
    qc = json.loads(cfg.read_text()).get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise SmokeError(f"{cfg} has no compressed-tensors quantization_config; this is not a quantized checkpoint")
    return path


def import_vllm() -> Any:
    """The vllm module, or :class:`SmokeError` saying how to get it."""
    try:
        import vllm
    except Exception as e:  # ImportError, or a broken install raising at import
        raise SmokeError(VLLM_MISSING.format(err=f"{type(e).__name__}: {e}")) from e
    return vllm


def _entry_items(entry: Any) -> list[tuple[int, Any]]:
    """(token id, Logprob) pairs of one position's log-prob mapping."""
    return list(entry.items()) if entry is not None else []


def prompt_logprob_rows(prompt_ids: list[int], prompt_logprobs: Any, k: int) -> list[dict[str, Any]]:
    """Per prompt position (from the second on): the actual token's log-prob / rank and the top ``k``.

    ``prompt_logprobs`` is vLLM's ``RequestOutput.prompt_logprobs``: one entry per prompt token, the
    first ``None``, each a mapping token id -> ``Logprob(logprob, rank, decoded_token)`` holding the
    top ``k`` and the actual token.
    """
    rows = []
    for pos in range(1, len(prompt_ids)):
        items = _entry_items(prompt_logprobs[pos])
        tok = prompt_ids[pos]
        actual = dict(items).get(tok)
        top = sorted(items, key=lambda kv: (kv[1].rank if kv[1].rank is not None else math.inf, -kv[1].logprob))
        rows.append({
            "position": pos,
            "token_id": tok,
            "logprob": None if actual is None else float(actual.logprob),
            "rank": None if actual is None else actual.rank,
            "top": [{"token_id": int(t), "logprob": float(lp.logprob), "rank": lp.rank,
                     "text": lp.decoded_token} for t, lp in top[:k]],
        })
    return rows


def compare_with_emulation(checkpoint: Path, prompt_ids: list[int], rows: list[dict[str, Any]], dtype: str) -> dict:
    """pq_lightning's served emulation of the checkpoint against vLLM's prompt top-k, same positions."""
    import torch

    from pq_lightning.models import resolve_dtype
    from pq_lightning.served import load_quantized_checkpoint

    model, _ = load_quantized_checkpoint(checkpoint, dtype=resolve_dtype(dtype), device="cuda")
    with torch.no_grad():
        ids = torch.tensor([prompt_ids], device="cuda")
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1).cpu()
    del model
    torch.cuda.empty_cache()
    agree, gaps = 0, []
    for r in rows:
        pred = logp[r["position"] - 1]  # logits at position p-1 predict token p
        top_vllm = [t["token_id"] for t in r["top"]]
        agree += int(int(pred.argmax()) == top_vllm[0])
        gaps += [abs(float(pred[t["token_id"]]) - t["logprob"]) for t in r["top"]]
    return {"positions": len(rows), "top1_agreement": agree / max(1, len(rows)),
            "max_abs_logprob_gap_top_k": max(gaps) if gaps else None,
            "mean_abs_logprob_gap_top_k": sum(gaps) / len(gaps) if gaps else None}


def _write_json(path: str | Path, obj: Any) -> None:
    """Atomically, through pq_lightning/atomic.py loaded by path: it needs only the standard
    library, so this works where the pq_lightning package is not installed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_pq_atomic", Path(__file__).resolve().parents[1] / "pq_lightning" / "atomic.py"
    )
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    atomic.atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = check_checkpoint(args.checkpoint)
    vllm = import_vllm()
    import torch

    if not torch.cuda.is_available():
        raise SmokeError("no CUDA GPU visible: vLLM serves compressed-tensors NVFP4 / FP8 checkpoints on a GPU")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    llm = vllm.LLM(
        model=str(checkpoint), quantization="compressed-tensors", dtype=args.dtype, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True, seed=args.seed,
    )
    timings["engine_start_s"] = time.perf_counter() - t0

    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    outs = llm.generate(args.prompts, greedy)
    timings["generate_s"] = time.perf_counter() - t0
    generations = []
    for o in outs:
        c = o.outputs[0]
        generations.append({"prompt": o.prompt, "text": c.text, "token_ids": list(c.token_ids)})
        print(f"--- {o.prompt!r}\n{o.prompt}{c.text}", flush=True)

    lp_params = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=args.top_logprobs)
    t0 = time.perf_counter()
    (lp_out,) = llm.generate([args.prompts[0]], lp_params)
    timings["prompt_logprobs_s"] = time.perf_counter() - t0
    prompt_ids = list(lp_out.prompt_token_ids)
    rows = prompt_logprob_rows(prompt_ids, lp_out.prompt_logprobs, args.top_logprobs)
    print(f"--- prompt log-probs (top {args.top_logprobs}) of {args.prompts[0]!r}", flush=True)
    for r in rows:
        best = r["top"][0] if r["top"] else {}
        print(f"  pos {r['position']:3d} token {r['token_id']:6d}: logprob {r['logprob']:.4f} rank {r['rank']}; "
              f"top-1 {best.get('text')!r} {best.get('logprob', float('nan')):.4f}", flush=True)

    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "vllm": getattr(vllm, "__version__", "?"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "settings": {k: getattr(args, k) for k in ("max_tokens", "top_logprobs", "max_model_len",
                                                    "gpu_memory_utilization", "dtype", "seed")},
        "generations": generations,
        "prompt_logprobs": {"prompt": args.prompts[0], "prompt_token_ids": prompt_ids, "positions": rows},
        "timings": timings,
    }
    if args.compare_emulation:
        del llm
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        result["emulation"] = compare_with_emulation(checkpoint, prompt_ids, rows, args.dtype)
        timings["emulation_s"] = time.perf_counter() - t0
        print(f"--- emulation vs vLLM: {result['emulation']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except SmokeError as e:
        print(f"vllm_smoke: {e}", file=sys.stderr)
        return 2
    _write_json(args.out, result)
    print(f"vllm_smoke: wrote {args.out}; timings {json.dumps({k: round(v, 2) for k, v in result['timings'].items()})}")
    return 0


if __name__ == "__main__":  # vLLM starts worker processes: keep the engine behind this guard
    sys.exit(main())
