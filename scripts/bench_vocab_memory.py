"""Peak host memory (RSS) of one probe step and one evaluation batch, full logits against logits made a
chunk of positions at a time (:mod:`pq_lightning.lm_head`).

Each measurement runs in its own process (peak RSS only grows), on the same model and tokens:

* ``probe-full``: the next-token loss from the model's full ``[batch, seq, vocab]`` logits, then its
  backward (probe-only: activation gradients, no weight gradient);
* ``probe-chunked``: ``CausalLM.next_token_loss`` and its backward;
* ``eval-full``: both models' full logits, then the metrics window by window;
* ``eval-chunked``: ``QuantEvaluator.validation_step`` (logits a chunk at a time).

The candidate of the evaluation is an in-memory RTN copy (every body Linear FP8). Prints one line per
measurement: peak RSS, RSS after loading, their difference, the loss or kl_all, and the wall time.

    python scripts/bench_vocab_memory.py --model gemma3-270m --batch 4 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("probe-full", "probe-chunked", "eval-full", "eval-chunked")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _probe(model, ids, chunked: bool) -> float:
    import torch.nn.functional as F

    from pq_lightning.causal_lm import CausalLM

    module = CausalLM.from_model(model, probe_only=True)
    if chunked:
        loss = module.next_token_loss(ids)
    else:
        logits = module(ids)
        shift = logits[:, :-1].float()
        loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), ids[:, 1:].reshape(-1), reduction="mean")
    loss.backward()
    return float(loss)


def _evaluate(model, ids, chunked: bool) -> float:
    import torch

    from pq_lightning.evaluate import QuantEvaluator, fake_quant_candidate
    from pq_lightning.models import find_body_linears

    candidate = fake_quant_candidate(model, {name: "fp8" for name in find_body_linears(model)})
    ev = QuantEvaluator.from_models(model, candidate)
    if chunked:
        ev.validation_step({"input_ids": ids}, 0)
    else:
        with torch.inference_mode():
            q = candidate(input_ids=ids, use_cache=False).logits
            ref = model(input_ids=ids, use_cache=False).logits
            for b in range(ids.shape[0]):
                ev.metrics.update(ref[b, :-1], q[b, :-1])
    return float(ev.metrics.compute()["kl_all"])


def run_one(args) -> dict:
    import torch

    from pq_lightning.data import EvalData
    from pq_lightning.models import load_causal_lm

    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model, dtype=args.dtype)
    ids = EvalData.from_tokenizer(tokenizer, path=args.text, window=args.seqlen - 1, max_windows=args.batch).windows
    loaded = _rss_mib()
    t0 = time.perf_counter()
    value = (_probe if args.mode.startswith("probe") else _evaluate)(model, ids, args.mode.endswith("chunked"))
    return {"mode": args.mode, "peak_mib": _rss_mib(), "loaded_mib": loaded, "value": value,
            "seconds": time.perf_counter() - t0, "tokens": list(ids.shape)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--text", default="../shared/data/wikitext-2-raw-test.txt")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=MODES, help="one measurement in this process (default: each in its own)")
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(run_one(args)))
        return
    for mode in MODES:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{mode:14s} peak {r['peak_mib']:8.0f} MiB  after load {r['loaded_mib']:7.0f} MiB  "
              f"step {r['peak_mib'] - r['loaded_mib']:7.0f} MiB  value {r['value']:.6f}  {r['seconds']:.1f}s  "
              f"tokens {r['tokens']}", flush=True)


if __name__ == "__main__":
    main()
