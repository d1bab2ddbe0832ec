"""GPTQ refinement of a whole model: wall time, peak memory and held-out error against RTN.

    .venv/bin/python scripts/bench_refine_model.py [--windows 16] [--seqlen 256] [--model PATH]

Refines SmolLM2-135M-Instruct (the embedded GGUF unless ``--model``) with every body Linear in
NVFP4 (the plan llm-compressor's NVFP4 recipe makes), on calibration windows of the built-in
corpus or ``--source FILE``, a quarter of them held out, and prints the wall time, the peak
resident memory and the summed held-out output error of the chosen weights against RTN's.

When ``llmcompressor`` is importable (an optional peer, not a dependency), its ``GPTQModifier``
NVFP4 oneshot runs on the same fit windows in the same run; the script prints the wall-time ratio
(target: ours <= 0.5x) and llm-compressor's held-out output error on the same Hessians (target:
ours equal or lower). Install the peer with ``pip install -e .[peers]``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _heldout_error(model, hessians, weights_by_name) -> float:
    """Summed per-token held-out error tr(ΔW H ΔWᵀ)/n of ``weights_by_name`` against the source."""
    from pq_lightning.gptq import output_error

    modules = dict(model.named_modules())
    total = 0.0
    for group, h in hessians.items():
        H = h["heldout"] / max(h["n_heldout"], 1)
        for name in group:
            if name in weights_by_name:
                total += output_error(modules[name].weight.detach().float(), weights_by_name[name], H)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--source", default="builtin")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dampening", type=float, nargs="+", default=None,
                   help="GPTQ dampings tried (default: GPTQConfig's)")
    p.add_argument("--no-sweep-then-gptq", action="store_true", help="skip GPTQ under the swept scales")
    p.add_argument("--no-peer", action="store_true", help="skip llm-compressor even when installed")
    p.add_argument("--refit", action="store_true",
                   help="refit the chosen recipes on the held-out windows too (GPTQConfig.refit); off by default "
                        "here: the held-out error against the peer must stay out of sample")
    p.add_argument("--decisions", default=None, help="write every Linear's candidate errors to this JSON")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from pq_lightning.data import CalibrationData
    from pq_lightning.formats import get_format
    from pq_lightning.models import find_body_linears, load_causal_lm
    from pq_lightning.refine import refine_model

    model, tok = load_causal_lm(a.model, dtype="float32")
    data = CalibrationData.from_tokenizer(tok, source=a.source, seqlen=a.seqlen, num_samples=a.windows,
                                          holdout_fraction=0.25, batch_size=4)
    fit = list(torch.split(data.windows, 4))
    held = list(torch.split(data.holdout_windows, 4))
    plan = {n: "nvfp4" for n in find_body_linears(model)}
    rss0 = _peak_rss_gib()
    t0 = time.perf_counter()
    from pq_lightning.gptq import GPTQConfig

    cfg = GPTQConfig(**({"dampening": tuple(a.dampening)} if a.dampening else {}),
                     sweep_then_gptq=not a.no_sweep_then_gptq, refit=a.refit)
    out = refine_model(model, plan, fit, held, config=cfg, gptq=True, model_type=model.config.model_type,
                       keep_hessians=True)
    ours_s = time.perf_counter() - t0
    nv = get_format("nvfp4")
    chosen = {n: nv.unpack(t) for n, t in out.packed.items()}
    ours_err = _heldout_error(model, out.hessians, chosen)
    print(f"model: {a.model or 'SmolLM2-135M-Instruct'}, {len(plan)} NVFP4 Linears, "
          f"{a.windows} windows x {a.seqlen} tokens ({len(held)} held-out batches), threads={torch.get_num_threads()}")
    print(f"pq-lightning refine: {ours_s:.1f} s, peak RSS {_peak_rss_gib():.2f} GiB (before: {rss0:.2f} GiB)")
    print(f"held-out output error: RTN {out.totals['heldout_rtn']:.6g}, chosen {out.totals['heldout_chosen']:.6g} "
          f"({out.totals['heldout_chosen'] / out.totals['heldout_rtn']:.3f}x), recomputed {ours_err:.6g}")
    methods: dict[str, int] = {}
    for d in out.decisions.values():
        methods[d.method] = methods.get(d.method, 0) + 1
    print(f"decisions: {methods}  (GPTQ dampings {cfg.dampening}, sweep then GPTQ {cfg.sweep_then_gptq}, "
          f"refit {cfg.refit})")
    if a.decisions:
        import dataclasses
        import json

        with open(a.decisions, "w") as f:
            json.dump({n: dataclasses.asdict(d) for n, d in out.decisions.items()}, f, indent=1)
    if a.no_peer:
        return

    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        print("llmcompressor is not installed: peer comparison skipped (pip install llmcompressor)")
        return
    import copy
    import tempfile

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    peer = copy.deepcopy(model)
    ds = Dataset.from_dict({"input_ids": [w.tolist() for w in data.windows]})
    with tempfile.TemporaryDirectory() as cfg_dir:
        # oneshot re-reads the model's config from name_or_path (a GGUF source has no config.json)
        # and refuses a model that says it is GGUF-quantized: the weights are plain floats by now
        if getattr(peer.config, "quantization_config", None) is not None:
            del peer.config.quantization_config
        peer.hf_quantizer = None
        peer.config.save_pretrained(cfg_dir)
        peer.config.name_or_path = cfg_dir
        t0 = time.perf_counter()
        oneshot(model=peer, dataset=ds, processor=tok,
                recipe=GPTQModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
                num_calibration_samples=len(data.windows), max_seq_length=a.seqlen)
        peer_s = time.perf_counter() - t0
    peer_modules = dict(peer.named_modules())
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    peer_w = {}
    for n in plan:
        m = peer_modules[n]
        args = m.quantization_scheme.weights
        peer_w[n] = fake_quantize(m.weight.detach().float(), m.weight_scale, None, args,
                                  global_scale=getattr(m, "weight_global_scale", None)).float()
    peer_err = _heldout_error(model, out.hessians, peer_w)
    print(f"llm-compressor GPTQ NVFP4: {peer_s:.1f} s; ours/peer wall time {ours_s / peer_s:.2f}x (target <= 0.5x)")
    print(f"held-out output error: peer {peer_err:.6g}, ours {ours_err:.6g} ({ours_err / peer_err:.3f}x, target <= 1)")


if __name__ == "__main__":
    main()
