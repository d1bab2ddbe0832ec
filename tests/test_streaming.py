"""Decoder layers streamed from disk / host memory under a memory cap smaller than the model: the
probe, the refiner and the export give exactly what the in-memory model gives."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_gemma4, build_tiny_llama, quiet_trainer
from pq_lightning.callbacks import FisherProbe
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pq_lightning.causal_lm import CausalLM
from pq_lightning.export import export_checkpoint
from pq_lightning.gptq import GPTQConfig
from pq_lightning.models import find_body_linears, model_fingerprint
from pq_lightning.refine import refine_model
from pq_lightning.streaming import GIB, HostWeights, LayerStreamer, load_streamed_model, streamer_of

pytestmark = pytest.mark.usefixtures("quiet_single_thread")
N_LAYERS = 4


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture
def saved_llama(tmp_path) -> tuple[torch.nn.Module, Path, float]:
    """A 4-layer tiny Llama, its safetensors folder, and a cap of 60 % of its weights (in GiB)."""
    model = build_tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, initializer_range=0.2)
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    return model, folder, 0.6 * _model_bytes(model) / GIB


def _ids(n: int, seq: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(4, 128, (n, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def test_cap_holds_fewer_layers_than_the_model_and_forward_is_exact(saved_llama):
    model, folder, cap_gb = saved_llama
    streamed = load_streamed_model(folder, dtype="float32", memory_cap_gb=cap_gb)
    st = streamer_of(streamed)
    # non-layer weights: embeddings + lm_head (128 x 64 each, fp32) + final norm (64)
    params = (2 * 128 * 64 + 64) * 4
    assert sum(p.numel() for p in streamed.parameters()) * 4 == params  # layers are not parameters
    other = params + sum(b.numel() * b.element_size() for b in streamed.buffers())  # + rotary tables
    layer = st.layer_bytes[0]
    assert layer == (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) * 4
    assert st.max_resident_layers == int((int(cap_gb * GIB) - other) // layer) == 2 < N_LAYERS
    assert model_fingerprint(streamed) == model_fingerprint(model)  # sampled from disk, not loaded
    assert st.loads == 0
    ids = _ids(3, 16)
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, model(input_ids=ids).logits)
    assert st.loads == N_LAYERS and st.resident_layers() == [2, 3]
    assert st.peak_resident_bytes == other + 2 * layer <= int(cap_gb * GIB) < _model_bytes(model)


def test_backward_keeps_no_streamed_weight_alive_and_gradients_are_exact(saved_llama):
    model, folder, cap_gb = saved_llama
    streamed = load_streamed_model(folder, dtype="float32", memory_cap_gb=cap_gb)
    st = streamer_of(streamed)
    seen: list[weakref.ref] = []
    q0 = streamed.model.layers[0].self_attn.q_proj
    handle = q0.register_forward_pre_hook(lambda m, a: seen.append(weakref.ref(m.weight)))

    def embed_grad(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        x = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        ctx = streamer_of(m).autograd_context() if streamer_of(m) else torch.enable_grad()
        with ctx:
            logits = m(inputs_embeds=x).logits
        return logits, x

    ids = _ids(2, 16, seed=1)
    logits, x = embed_grad(streamed)
    handle.remove()
    gc.collect()
    # layer 0 was evicted during the forward; autograd kept a reference to it, not the tensor
    assert 0 not in st.resident_layers() and seen[0]() is None
    logits.float().square().sum().backward()
    ref_logits, ref_x = embed_grad(model)
    ref_logits.float().square().sum().backward()
    assert torch.equal(logits, ref_logits)
    assert torch.equal(x.grad, ref_x.grad)
    assert st.loads == N_LAYERS + 2  # layers 1 and 0 came back for the backward pass


def _probe_windows(seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, 128, (12,), generator=gen)} for _ in range(4)]


def _in_memory_probe(model: torch.nn.Module, data: list, path: Path) -> FisherProbe:
    probe = FisherProbe(output_path=str(path), output_error_tokens=None)
    quiet_trainer([probe]).fit(CausalLM.from_model(copy.deepcopy(model), probe_only=True), DataLoader(data, batch_size=2))
    return probe


def test_probe_from_disk_equals_in_memory(saved_llama, tmp_path):
    model, folder, cap_gb = saved_llama
    data = _probe_windows(0)
    whole = _in_memory_probe(model, data, tmp_path / "whole.safetensors")
    module = CausalLM(model=str(folder), dtype="float32", probe_only=True, memory_cap_gb=cap_gb)
    probe = FisherProbe(output_path=str(tmp_path / "streamed.safetensors"), output_error_tokens=None)
    quiet_trainer([probe]).fit(module, DataLoader(data, batch_size=2))

    st = streamer_of(module.model)
    assert st.peak_resident_bytes <= int(cap_gb * GIB) < _model_bytes(model)
    # step 1: 4 loads forward, 2 reloads backward; step 2 starts with layers 0, 1 resident: 2 + 2
    assert st.loads == 10
    assert st.resident_layers() == []  # released at the Trainer's teardown (they stay where they were read)
    a, b = whole.sensitivity, probe.sensitivity
    assert a.n_tokens == b.n_tokens == 4 * 11
    assert a.meta["model_fingerprint"] == b.meta["model_fingerprint"] == model_fingerprint(model)
    for name in find_body_linears(model):
        assert torch.equal(torch.as_tensor(a[name].h_trace), torch.as_tensor(b[name].h_trace)), name
        assert torch.equal(a[name].diag_out, b[name].diag_out) and torch.equal(a[name].diag_in, b[name].diag_in)
        assert a[name].output_error == b[name].output_error and len(a[name].output_error) == 2


@pytest.mark.parametrize("offload", ["disk", "host"])
def test_refine_and_export_streamed_equal_in_memory(saved_llama, tmp_path, offload):
    model, folder, cap_gb = saved_llama
    streamed = load_streamed_model(folder, dtype="float32", memory_cap_gb=cap_gb, offload=offload)
    st = streamer_of(streamed)
    assert isinstance(st.store, HostWeights) == (offload == "host")
    ids = _ids(8, 32, seed=2)
    fit, held = [ids[i : i + 2] for i in range(0, 6, 2)], [ids[6:8]]
    names = find_body_linears(model)
    plan = {n: ("fp8" if n.endswith("down_proj") else "nvfp4") for n in names}
    plan["model.layers.1.self_attn.o_proj"] = "bf16"
    config = GPTQConfig(dampening=(0.01,))
    ref = refine_model(model, plan, fit, held, config=config)
    loads_before = st.loads
    out = refine_model(streamed, plan, fit, held, config=config)
    # the capture forwards run no layer (nothing loaded); the walk loads each of the 4 layers once
    assert st.loads - loads_before == 4 and not st.resident_layers()
    assert st.peak_resident_bytes <= int(cap_gb * GIB)
    assert out.input_amax == ref.input_amax
    assert out.packed.keys() == ref.packed.keys() and len(out.packed) == len(names) - 1
    for name, tensors in ref.packed.items():
        for key, t in tensors.items():
            assert torch.equal(_bytes(out.packed[name][key]), _bytes(t)), (name, key)
    assert {n: d.method for n, d in out.decisions.items()} == {n: d.method for n, d in ref.decisions.items()}

    for tag, m, res in (("ref", model, ref), ("streamed", streamed, out)):
        export_checkpoint(m, plan, tmp_path / tag, quantized=res.packed, input_amax=res.input_amax)
    # RTN export (no given tensors): global scales from the streamed weights
    export_checkpoint(model, plan, tmp_path / "rtn-ref", input_amax=ref.input_amax)
    export_checkpoint(streamed, plan, tmp_path / "rtn-streamed", input_amax=ref.input_amax)
    assert st.peak_resident_bytes <= int(cap_gb * GIB)
    for a, b in (("ref", "streamed"), ("rtn-ref", "rtn-streamed")):
        A, B = load_file(tmp_path / a / "model-00001-of-00001.safetensors"), load_file(tmp_path / b / "model-00001-of-00001.safetensors")
        assert A.keys() == B.keys()
        assert all(torch.equal(_bytes(A[k]), _bytes(B[k])) for k in A)
        assert (tmp_path / a / "config.json").read_text() == (tmp_path / b / "config.json").read_text()


def test_gemma4_language_layers_stream_and_the_vision_tower_stays(tmp_path):
    model = build_tiny_gemma4()
    model.save_pretrained(tmp_path / "g4")
    streamed = load_streamed_model(tmp_path / "g4", dtype="float32", memory_cap_gb=None)
    st = streamer_of(streamed)
    assert st.layers_name == "model.language_model.layers" and st.max_resident_layers == 1
    assert any(n.startswith("model.vision_tower.") for n, _ in streamed.named_parameters())
    assert model_fingerprint(streamed) == model_fingerprint(model)
    ids = _ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_resident_layer_follows_the_model_to_another_device(saved_llama):
    """Lightning moves the model (not the streamed layers, which are no parameters) between Trainer calls:
    a layer resident on the old device is read again onto the new one, with the stored values."""
    model, folder, _ = saved_llama
    streamed = load_streamed_model(folder, dtype="float32", memory_cap_gb=10.0)  # every layer fits
    st = streamer_of(streamed)
    ids = _ids(2, 8)
    with torch.no_grad():
        streamed(input_ids=ids)
    assert st.resident_layers() == list(range(N_LAYERS)) and st.loads == N_LAYERS
    q = streamed.model.layers[1].self_attn.q_proj
    st.device = torch.device("meta")  # stands for the GPU Lightning's setup moves the model to
    st.load(1)
    assert q.weight.device.type == "meta" and st.loads == N_LAYERS + 1
    st.load(1)
    assert st.loads == N_LAYERS + 1  # already there: not read again
    st.device = None  # back to the embeddings' device (the CPU), as after Lightning's teardown
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=ids).logits, model(input_ids=ids).logits)
    assert q.weight.device.type == "cpu" and torch.equal(q.weight, model.model.layers[1].self_attn.q_proj.weight)
    assert st.loads == N_LAYERS + 2  # only layer 1 was on another device


def test_detach_puts_the_weights_back(saved_llama):
    model, folder, cap_gb = saved_llama
    streamed = load_streamed_model(folder, dtype="float32", memory_cap_gb=cap_gb)
    streamer_of(streamed).detach()
    assert streamer_of(streamed) is None
    ref, got = model.state_dict(), streamed.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_bad_input_is_a_clear_error(saved_llama, tmp_path):
    model, folder, _ = saved_llama
    layer = 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64)
    with pytest.raises(ValueError, match="cannot hold the model's non-layer weights .* plus one decoder layer"):
        load_streamed_model(folder, dtype="float32", memory_cap_gb=layer / GIB)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_streamed_model(tmp_path, dtype="float32", memory_cap_gb=1.0)
    with pytest.raises(ValueError, match="probe_only=True"):
        CausalLM(model=str(folder), memory_cap_gb=1.0)
    with pytest.raises(ValueError, match="GGUF"):
        CausalLM(model="model.gguf", probe_only=True, memory_cap_gb=1.0)
    with pytest.raises(KeyError, match="not in the weight store"):
        LayerStreamer(copy.deepcopy(model), HostWeights({}))


@pytest.mark.distributed
def test_probe_streamed_under_ddp_equals_one_process(saved_llama, tmp_path, monkeypatch):
    """Two ddp_spawn processes, each streaming the layers from disk, give the one-process sums."""
    from pq_lightning.sensitivity import load_sensitivity

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks single-threaded like this process,
    # whatever the caller exported: the test compares summation over ranks, not threaded reductions

    model, folder, cap_gb = saved_llama
    data = _probe_windows(5)
    single = _in_memory_probe(model, data, tmp_path / "single.safetensors")
    path = tmp_path / "ddp.safetensors"
    probe = FisherProbe(output_path=str(path), output_error_tokens=None)
    module = CausalLM(model=str(folder), dtype="float32", probe_only=True, memory_cap_gb=cap_gb)
    quiet_trainer([probe], devices=2, strategy="ddp_spawn").fit(module, DataLoader(data, batch_size=1))
    ddp = load_sensitivity(path, model_fingerprint=model_fingerprint(model))
    assert ddp.meta["world_size"] == 2 and ddp.n_tokens == single.sensitivity.n_tokens == 4 * 11
    for name, a in single.sensitivity.linears.items():
        b = ddp[name]
        assert abs(b.h_trace - a.h_trace) <= 1e-6 * abs(a.h_trace), name
        assert torch.allclose(b.diag_out, a.diag_out, rtol=1e-6) and torch.allclose(b.diag_in, a.diag_in, rtol=1e-6)
        for f, v in a.output_error.items():
            assert abs(b.output_error[f] - v) <= 1e-6 * abs(v), (name, f)
