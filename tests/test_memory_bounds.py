"""What a stage keeps does not grow with the calibration data: run on N and on 4N windows, the tensor
storage reachable from its result is the same (a kept view of a batch would pin the whole batch and
show up here), and the refiner's resident activations stay under their budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_tiny_llama

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def retained_bytes(obj) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` (dataclasses, mappings, sequences)."""
    seen: dict[int, int] = {}

    def walk(o) -> None:
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                walk(getattr(o, f.name))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return sum(seen.values())


def _windows(n: int, t: int = 32) -> torch.Tensor:
    ids = torch.randint(4, 128, (n, t), generator=torch.Generator().manual_seed(n))
    ids[:, 0] = 1
    return ids


def test_smoothing_statistics_keep_the_same_bytes_for_4x_the_windows():
    from pq_lightning.smooth import find_mappings

    model = build_tiny_llama(hidden_size=64, intermediate_size=128).eval()
    sizes = [retained_bytes(find_mappings(model, _windows(n), keep_tokens=48)) for n in (4, 16)]
    assert sizes[0] == sizes[1] > 0


def test_probe_keeps_the_same_bytes_for_4x_the_windows(tmp_path):
    from conftest import quiet_trainer
    from pq_lightning.callbacks import FisherProbe, SmoothingStatistics

    from pq_lightning.causal_lm import CausalLM

    sizes = []
    for n in (4, 16):
        model = build_tiny_llama(hidden_size=64, intermediate_size=128)
        probe = FisherProbe(output_path=str(tmp_path / f"s{n}.safetensors"))
        stats = SmoothingStatistics(keep_tokens=48)
        loader = torch.utils.data.DataLoader([{"input_ids": w} for w in _windows(n)], batch_size=2)
        quiet_trainer([probe, stats]).fit(CausalLM.from_model(model, probe_only=True), train_dataloaders=loader)
        sizes.append((retained_bytes(probe.sensitivity), retained_bytes(stats.stats)))
    assert sizes[0] == sizes[1]


def test_refiner_output_and_resident_activations_do_not_grow_with_the_windows():
    from pq_lightning.gptq import GPTQConfig
    from pq_lightning.models import find_body_linears
    from pq_lightning.refine import refine_model

    model = build_tiny_llama(hidden_size=64, intermediate_size=128)
    plan = {n: "fp8" if n.endswith("down_proj") else "nvfp4" for n in find_body_linears(model)}
    budget = 2 * 2 * 32 * 128 * 4  # two batches of the widest input (down_proj's 128 channels) in fp32
    sizes, peaks = [], []
    for n in (4, 16):
        w = _windows(n + 2)
        fit, held = list(torch.split(w[:n], 2)), [w[n:]]
        out = refine_model(model, plan, fit, held, config=GPTQConfig(dampening=(0.01,)),
                           max_resident_activation_bytes=budget)
        sizes.append(retained_bytes(out.packed))
        peaks.append(out.totals["resident_activation_peak_bytes"])
    assert sizes[0] == sizes[1]
    assert max(peaks) <= budget


def test_heap_trim_every_n_batches_and_at_loop_end(monkeypatch):
    import pq_lightning.callbacks.heap_trim as heap_trim

    calls: list[str] = []
    monkeypatch.setattr(heap_trim, "trim_heap", lambda: calls.append("trim") or True)
    cb = heap_trim.HeapTrim(every_n_batches=2)
    for i in range(5):
        calls.append(f"batch {i}")
        cb.on_train_batch_end(None, None, None, None, i)
    cb.on_train_end(None, None)
    assert calls == ["batch 0", "batch 1", "trim", "batch 2", "batch 3", "trim", "batch 4", "trim"]
    assert cb.trims == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_batches"):
            heap_trim.HeapTrim(every_n_batches=bad)


def test_trim_heap_runs_where_the_c_library_has_it():
    import platform

    from pq_lightning.heap import trim_heap

    assert trim_heap() is (platform.libc_ver()[0] == "glibc")
