"""Layer streaming on a real model: probe and refine with a memory cap, against the in-memory run.

    .venv/bin/python scripts/bench_streaming.py [--model FOLDER] [--cap-fraction 0.4] [--windows 4]

Saves SmolLM2-135M-Instruct (the embedded GGUF) once as a BF16 safetensors folder unless ``--model``
names one, then in the same run, on the same calibration windows:

* probe (FisherProbe, trace + diagonals + two-format output error) with the whole model in memory,
  and with its decoder layers streamed from disk under a cap of ``--cap-fraction`` of the model's
  weight bytes;
* GPTQ refine (every body Linear NVFP4, one damping) both ways.

Prints the wall times and their ratios, the peak bytes of weights resident (against the cap and
the model), the layer loads, and whether the sensitivities and the packed tensors are bit-identical.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def _probe(module, windows, out: Path):
    from lightning import Trainer
    from pq_lightning.callbacks import FisherProbe
    from torch.utils.data import DataLoader

    probe = FisherProbe(output_path=str(out), output_error_tokens=None)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    t0 = time.perf_counter()
    trainer.fit(module, DataLoader([{"input_ids": w} for w in windows], batch_size=2))
    return probe.sensitivity, time.perf_counter() - t0


def _same_sensitivity(a, b) -> bool:
    for name, x in a.linears.items():
        y = b[name]
        if not (torch.equal(torch.as_tensor(x.h_trace), torch.as_tensor(y.h_trace))
                and torch.equal(x.diag_out, y.diag_out) and torch.equal(x.diag_in, y.diag_in)
                and x.output_error == y.output_error):
            return False
    return a.n_tokens == b.n_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a HF folder with safetensors weights (default: SmolLM2 saved)")
    p.add_argument("--cap-fraction", type=float, default=0.4, help="memory cap as a fraction of the weight bytes")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from pq_lightning.causal_lm import CausalLM
    from pq_lightning.data import CalibrationData
    from pq_lightning.gptq import GPTQConfig
    from pq_lightning.models import find_body_linears, load_causal_lm, load_tokenizer, save_reference
    from pq_lightning.refine import refine_model
    from pq_lightning.streaming import GIB, load_streamed_model, streamer_of

    tmp = Path(tempfile.mkdtemp(prefix="pq-stream-"))
    folder = Path(a.model) if a.model else None
    if folder is None:
        hf, tok = load_causal_lm(None, dtype="bfloat16")
        folder = save_reference(hf, tok, tmp / "smollm2-bf16")
        del hf
    tokenizer = load_tokenizer(str(folder))
    whole, _ = load_causal_lm(str(folder), dtype=a.dtype)
    unique = {t.untyped_storage().data_ptr(): t for t in whole.state_dict().values()}  # tied weights once
    model_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    cap_gb = a.cap_fraction * model_bytes / GIB
    data = CalibrationData.from_tokenizer(tokenizer, source="builtin", seqlen=a.seqlen, num_samples=a.windows + 2,
                                          seed=0, batch_size=2, holdout_fraction=0.0)
    windows = [w for w in data.windows]
    fit = [torch.stack(windows[i : i + 2]) for i in range(0, a.windows, 2)]
    held = [torch.stack(windows[a.windows : a.windows + 2])]

    print(f"model {folder}: {model_bytes / GIB:.3f} GiB of weights ({a.dtype}); cap {cap_gb:.3f} GiB "
          f"({a.cap_fraction:.0%})")
    sens_whole, t_probe_whole = _probe(CausalLM.from_model(copy.deepcopy(whole), probe_only=True),
                                       windows[: a.windows], tmp / "whole.safetensors")
    module = CausalLM(model=str(folder), dtype=a.dtype, probe_only=True, memory_cap_gb=cap_gb)
    st = streamer_of(module.model)
    sens_stream, t_probe_stream = _probe(module, windows[: a.windows], tmp / "streamed.safetensors")
    print(f"probe   in memory {t_probe_whole:7.1f} s | streamed {t_probe_stream:7.1f} s "
          f"({t_probe_stream / t_probe_whole:.2f}x) | {st.max_resident_layers} of {len(st.layers)} layers "
          f"resident, {st.loads} layer loads, peak {st.peak_resident_bytes / GIB:.3f} GiB "
          f"({st.peak_resident_bytes / model_bytes:.2f}x the model) | identical: "
          f"{_same_sensitivity(sens_whole, sens_stream)}")

    plan = {n: "nvfp4" for n in find_body_linears(whole)}
    config = GPTQConfig(dampening=(0.01,))
    t0 = time.perf_counter()
    ref = refine_model(whole, plan, fit, held, config=config)
    t_ref = time.perf_counter() - t0
    streamed = load_streamed_model(folder, dtype=a.dtype, memory_cap_gb=cap_gb)
    st = streamer_of(streamed)
    t0 = time.perf_counter()
    out = refine_model(streamed, plan, fit, held, config=config)
    t_out = time.perf_counter() - t0
    same = all(
        torch.equal(out.packed[n][k].view(torch.uint8), t.view(torch.uint8))
        for n, tensors in ref.packed.items() for k, t in tensors.items()
    )
    print(f"refine  in memory {t_ref:7.1f} s | streamed {t_out:7.1f} s ({t_out / t_ref:.2f}x) | "
          f"{st.loads} layer loads, peak {st.peak_resident_bytes / GIB:.3f} GiB "
          f"({st.peak_resident_bytes / model_bytes:.2f}x the model) | identical: {same}")


if __name__ == "__main__":
    main()
