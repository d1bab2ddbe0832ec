"""Export of mixed-precision compressed-tensors checkpoints, checked against transformers,
compressed-tensors' own decompression and our served loader."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import pq_lightning.export as export_mod
from pq_lightning.export import body_bpp_from_checkpoint, export_checkpoint
from pq_lightning.formats import get_format
from pq_lightning.formats.nvfp4 import global_scale_from_amax
from pq_lightning.served import apply_fake_quant, load_quantized_checkpoint


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    kw.update(overrides)
    # built the way from_pretrained builds it (bf16 params, fp32 rotary buffers)
    return LlamaForCausalLM._from_config(LlamaConfig(**kw), dtype=torch.bfloat16).eval()


def mixed_plan() -> dict[str, str]:
    plan = {}
    for i, (o_fmt, mlp_fmt, down_fmt) in enumerate(
        [("bf16", "fp8", "fp8"), ("nvfp4a16", "nvfp4", "fp8_w8a16")]
    ):
        p = f"model.layers.{i}."
        plan.update(
            {
                p + "self_attn.q_proj": "nvfp4",
                p + "self_attn.k_proj": "nvfp4",
                p + "self_attn.v_proj": "nvfp4",
                p + "self_attn.o_proj": o_fmt,
                p + "mlp.gate_proj": mlp_fmt,
                p + "mlp.up_proj": mlp_fmt,
                p + "mlp.down_proj": down_fmt,
            }
        )
    return plan


def amax_for(plan) -> dict[str, float]:
    return {name: 2.0 + 0.25 * i for i, name in enumerate(plan)}


def disk_tensors(out_dir, prefix: str) -> dict[str, torch.Tensor]:
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for key, shard in index.items():
        if key.startswith(prefix + ".") and "." not in key[len(prefix) + 1 :]:
            with safe_open(str(out_dir / shard), "pt") as f:
                out[key[len(prefix) + 1 :]] = f.get_tensor(key)
    return out


def ct_global_scale(amax: float) -> torch.Tensor:
    """compressed-tensors' own NVFP4 global scale for an amax (448*6/amax in its fp32 maths)."""
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    a = torch.tensor(amax, dtype=torch.float32)
    return generate_gparam(-a, a)


def served_reference(model, plan, amax):
    """Served fp32 weights computed independently: fmt.fake_quant with the siblings' shared scale."""
    ref = {}
    lin = dict(model.named_modules())
    for name, fmt_name in plan.items():
        fmt = get_format(fmt_name)
        w = lin[name].weight
        if not fmt.quantizes_weights:
            ref[name] = w.float()
            continue
        if fmt_name.startswith("nvfp4"):
            parent, _, leaf = name.rpartition(".")
            sibs = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}
            group = [f"{parent}.{s}" for s, g in sibs.items() if g == sibs.get(leaf)] or [name]
            gmax = max(float(lin[g].weight.detach().float().abs().amax()) for g in group)
            ref[name] = fmt.fake_quant(w, global_scale=global_scale_from_amax(gmax))
        else:
            ref[name] = fmt.fake_quant(w)
    return ref


@pytest.fixture(scope="module")
def mixed_ckpt(tmp_path_factory):
    model = tiny_llama()
    plan = mixed_plan()
    amax = amax_for(plan)
    out = tmp_path_factory.mktemp("ck") / "mixed"
    result = export_checkpoint(model, plan, out, input_amax=amax, max_shard_bytes=60_000)
    return model, plan, amax, out, result


def test_config_is_compressed_tensors_mixed(mixed_ckpt):
    model, plan, _, out, result = mixed_ckpt
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "mixed-precision"
    assert qc["quantization_status"] == "compressed"
    by_fmt = {}
    for g in qc["config_groups"].values():
        by_fmt.setdefault(g["format"], []).extend(g["targets"])
    assert sorted(by_fmt) == ["float-quantized", "naive-quantized", "nvfp4-pack-quantized"]
    targeted = sorted(t for ts in by_fmt.values() for t in ts)
    assert targeted == sorted(n for n, f in plan.items() if f != "bf16")
    assert sorted(qc["ignore"]) == sorted(["lm_head", "model.layers.0.self_attn.o_proj"])
    assert result.n_shards > 1
    assert (out / "pq_manifest.json").exists()
    manifest = json.loads((out / "pq_manifest.json").read_text())
    assert manifest["plan_summary"]["format_counts"] == {
        "nvfp4": 8,
        "bf16": 1,
        "fp8": 3,
        "nvfp4a16": 1,
        "fp8_w8a16": 1,
    }
    assert manifest["bpp_body"] == result.bpp_body


def test_bpp_from_disk_equals_format_bits(mixed_ckpt):
    model, plan, _, out, result = mixed_ckpt
    mods = dict(model.named_modules())
    bits = {n: get_format(f).bits(tuple(mods[n].weight.shape)) for n, f in plan.items()}
    params = sum(mods[n].weight.numel() for n in plan)
    assert result.bpp_body == sum(bits.values()) / params
    assert body_bpp_from_checkpoint(out, list(plan)) == sum(bits.values()) / params
    for n in plan:
        assert result.linear_bytes[n] * 8 == bits[n], n


def test_fused_siblings_share_scales_on_disk(mixed_ckpt):
    _, plan, amax, out, _ = mixed_ckpt
    for group in (
        ["model.layers.0.self_attn." + s for s in ("q_proj", "k_proj", "v_proj")],
        ["model.layers.1.self_attn." + s for s in ("q_proj", "k_proj", "v_proj")],
        ["model.layers.1.mlp." + s for s in ("gate_proj", "up_proj")],
    ):
        t = [disk_tensors(out, n) for n in group]
        assert all(torch.equal(x["weight_global_scale"], t[0]["weight_global_scale"]) for x in t)
        assert all(torch.equal(x["input_global_scale"], t[0]["input_global_scale"]) for x in t)
        expect = ct_global_scale(max(amax[n] for n in group))
        assert torch.equal(t[0]["input_global_scale"], expect)
        assert t[0]["weight_packed"].dtype == torch.uint8
        assert t[0]["weight_scale"].dtype == torch.float8_e4m3fn


def test_transformers_loads_and_decompresses_exactly(mixed_ckpt):
    model, plan, amax, out, _ = mixed_ckpt
    ref = served_reference(model, plan, amax)
    tf = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        tf(ids)  # first forward decompresses (compressed-tensors' hook)
    mods = dict(tf.named_modules())
    for name, fmt_name in plan.items():
        w = mods[name].weight
        if fmt_name.startswith("fp8"):
            # transformers keeps FP8 weight_scale in the model dtype (BF16); ours are BF16 values
            scale = disk_tensors(out, name)["weight_scale"]
            assert scale.dtype == torch.float32
            assert torch.equal(scale.to(torch.bfloat16).float(), scale), name
        assert torch.equal(w, ref[name].to(w.dtype)), name
    assert torch.equal(mods["lm_head"].weight, model.lm_head.weight)


def test_compressed_tensors_decompression_agrees(mixed_ckpt):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, plan, amax, out, _ = mixed_ckpt
    ref = served_reference(model, plan, amax)
    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    )
    seen = 0
    for scheme in qc.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            w = compressor.decompress(disk_tensors(out, name), scheme)["weight"]
            # NVFP4 decompresses to bf16, FP8 (fp32 scale) to fp32: our served value in that dtype
            assert torch.equal(w, ref[name].to(w.dtype)), name
            seen += 1
    assert seen == sum(f != "bf16" for f in plan.values())


def test_served_loader_matches_fake_quant_and_in_memory(mixed_ckpt):
    model, plan, amax, out, _ = mixed_ckpt
    ref = served_reference(model, plan, amax)
    served, infos = load_quantized_checkpoint(out)
    mods = dict(served.named_modules())
    for name, fmt_name in plan.items():
        assert torch.equal(mods[name].weight.float(), ref[name]), name
        if fmt_name != "bf16":
            assert infos[name].format == fmt_name
    qkv_amax = max(amax[f"model.layers.0.self_attn.{s}"] for s in ("q_proj", "k_proj", "v_proj"))
    expect = float(ct_global_scale(qkv_amax))
    assert infos["model.layers.0.self_attn.q_proj"].input_global_scale == expect
    mem = copy.deepcopy(model)
    apply_fake_quant(mem, plan, input_amax=amax)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b, c = served(ids).logits, mem(ids).logits, model(ids).logits
    assert torch.equal(a, b)
    assert 0 < float((a.float() - c.float()).abs().max()) < 1.0


def test_given_packed_tensors_written_exactly(tmp_path):
    model = tiny_llama(1)
    plan = {"model.layers.0.mlp.down_proj": "nvfp4a16", "model.layers.1.mlp.down_proj": "fp8"}
    fmt = get_format("nvfp4a16")
    w = model.model.layers[0].mlp.down_proj.weight
    gs = fmt.global_scale(w) * 0.5  # a non-RTN choice that re-quantization would not reproduce
    given = {"model.layers.0.mlp.down_proj": fmt.pack(w, global_scale=gs)}
    export_checkpoint(model, plan, tmp_path / "ck", quantized=given)
    disk = disk_tensors(tmp_path / "ck", "model.layers.0.mlp.down_proj")
    for k, v in given["model.layers.0.mlp.down_proj"].items():
        assert torch.equal(disk[k].view(torch.uint8), v.view(torch.uint8)), k
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"


def test_tied_embeddings_written_once(tmp_path):
    model = tiny_llama(2, tie_word_embeddings=True)
    plan = {"model.layers.0.mlp.down_proj": "fp8"}
    export_checkpoint(model, plan, tmp_path / "ck")
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"  # one format: its name, as compressed-tensors writes it
    served, _ = load_quantized_checkpoint(tmp_path / "ck")
    assert served.lm_head.weight is served.model.embed_tokens.weight
    tf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"))
    assert torch.equal(tf.lm_head.weight, model.model.embed_tokens.weight)


def test_errors_are_clear(tmp_path):
    model = tiny_llama(3, intermediate_size=120)  # down_proj in_features 120 % 16 != 0
    with pytest.raises(ValueError, match="divisible by 16"):
        export_checkpoint(model, {"model.layers.0.mlp.down_proj": "nvfp4a16"}, tmp_path / "a")
    with pytest.raises(ValueError, match="input_amax"):
        export_checkpoint(model, {"model.layers.0.self_attn.o_proj": "nvfp4"}, tmp_path / "b")
    with pytest.raises(ValueError, match="share one format"):
        export_checkpoint(
            model,
            {"model.layers.0.self_attn.q_proj": "fp8", "model.layers.0.self_attn.k_proj": "nvfp4a16"},
            tmp_path / "c",
        )
    with pytest.raises(ValueError, match="not an nn.Linear"):
        export_checkpoint(model, {"model.layers.0.mlp": "fp8"}, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_refuse_overwrite_and_failure(tmp_path, monkeypatch):
    model = tiny_llama(4)
    out = tmp_path / "ck"
    # half a fused set (gate_proj stays BF16): vLLM's one gate_up_proj matmul cannot take two schemes
    with pytest.raises(ValueError, match="gate_proj=bf16, model.layers.0.mlp.up_proj=fp8"):
        export_checkpoint(model, {"model.layers.0.mlp.up_proj": "fp8"}, out)
    assert not out.exists()
    export_checkpoint(model, {"model.layers.0.mlp.down_proj": "fp8"}, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_checkpoint(model, {"model.layers.0.mlp.down_proj": "fp8_w8a16"}, out)

    def boom(tensors, path):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export_mod, "_save_shard", boom)
    with pytest.raises(OSError, match="simulated"):
        export_checkpoint(model, {"model.layers.0.mlp.down_proj": "fp8_w8a16"}, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folder left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old checkpoint intact
    monkeypatch.undo()

    export_checkpoint(model, {"model.layers.0.mlp.down_proj": "fp8_w8a16"}, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "naive-quantized"


def tiny_gemma4():
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    cfg = Gemma4Config(
        text_config=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=16,
            vocab_size_per_layer_input=512,
            hidden_size_per_layer_input=16,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
        ),
        audio_config=None,
        image_token_id=500,
        boi_token_id=501,
        eoi_token_id=502,
        video_token_id=503,
        boa_token_id=504,
        eoa_token_index=505,
        audio_token_id=506,
    )
    torch.manual_seed(5)
    return Gemma4ForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval()


def test_gemma4_vision_tower_untouched(tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    model = tiny_gemma4()
    body = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and ".language_model.layers." in n
        and n.rsplit(".", 1)[1]
        in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ]
    plan = {n: ("nvfp4" if "self_attn" in n else "fp8") for n in body}
    amax = {n: 4.0 for n in plan}
    out = tmp_path / "g4"
    export_checkpoint(model, plan, out, input_amax=amax)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    vision = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "vision" in n]
    assert vision and set(vision) <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    src = model.state_dict()
    n_vision = 0
    for key, shard in index.items():
        if "vision" in key:
            with safe_open(str(out / shard), "pt") as f:
                t = f.get_tensor(key)
            assert t.dtype == src[key].dtype and torch.equal(
                t.view(torch.uint8), src[key].contiguous().view(torch.uint8)
            )
            n_vision += 1
    assert n_vision == sum("vision" in k for k in src)
    for n in plan:
        assert f"{n}.weight_packed" in index if "self_attn" in n else index[f"{n}.weight"]

    tf = Gemma4ForConditionalGeneration.from_pretrained(str(out))
    ids = torch.tensor([[2, 10, 20, 30]])
    gen = tf.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)

    served, infos = load_quantized_checkpoint(out)
    assert type(served).__name__ == "Gemma4ForConditionalGeneration"
    assert sorted(infos) == sorted(plan)
    mem = copy.deepcopy(model)
    apply_fake_quant(mem, plan, input_amax=amax)
    with torch.no_grad():
        assert torch.equal(served(ids).logits, mem(ids).logits)
    assert served.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)
