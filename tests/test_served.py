"""The served model: activation fake-quant against compressed-tensors, foreign checkpoints, errors."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import (
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pq_lightning.formats import get_format
from pq_lightning.served import ServedLinear, format_for_scheme, load_quantized_checkpoint


def _ct_linear(preset: str, in_features: int = 64) -> nn.Linear:
    model = nn.Sequential(nn.Linear(in_features, 32))
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"g": preset_name_to_scheme(preset, ["Linear"])})
    )
    return model[0]


@pytest.mark.parametrize("preset,fmt_name", [("NVFP4", "nvfp4"), ("FP8_DYNAMIC", "fp8")])
def test_activation_fake_quant_matches_compressed_tensors(preset, fmt_name):
    torch.manual_seed(0)
    lin = _ct_linear(preset)
    fmt = get_format(fmt_name)
    x = torch.randn(3, 5, 64) * torch.logspace(-2, 1, 64)  # wide per-channel range
    igs = None
    if fmt_name == "nvfp4":
        a = x.abs().amax() * 0.7  # a calibrated scale that clips the largest inputs
        igs = generate_gparam(-a, a)
        lin.input_global_scale.data.copy_(igs)
    args = lin.quantization_scheme.input_activations
    ref = forward_quantize(lin, x, "input", args)  # compressed-tensors' dynamic-scale path, fp32
    assert torch.equal(fmt.fake_quant_activation(x, igs), ref)
    assert not torch.equal(ref, x)
    if fmt_name == "nvfp4":  # bf16 input: same maths (compressed-tensors upcasts to fp32)
        xb = x.to(torch.bfloat16)
        assert torch.equal(fmt.fake_quant_activation(xb, igs), forward_quantize(lin, xb, "input", args))


def test_served_linear_forward_by_hand():
    torch.manual_seed(1)
    fmt = get_format("nvfp4")
    w = torch.randn(32, 64)
    packed = fmt.pack(w)
    igs = fmt.calibrate_input_global_scale(3.0)
    bias = torch.randn(32).to(torch.bfloat16)
    lin = ServedLinear(fmt.unpack(packed), bias, fmt, igs)
    x = torch.randn(2, 7, 64).to(torch.bfloat16)
    y = lin(x)
    # by hand: quantize each 16-input group of every token, matmul in fp32, cast back
    wq = fmt.unpack(packed)
    xq = fmt.fake_quant_activation(x.float(), igs)
    expect = torch.empty(2, 7, 32)
    for b in range(2):
        for t in range(7):
            expect[b, t] = wq @ xq[b, t] + bias.float()
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expect.to(torch.bfloat16))


def test_format_for_scheme():
    assert format_for_scheme(preset_name_to_scheme("NVFP4", ["x"])).name == "nvfp4"
    assert format_for_scheme(preset_name_to_scheme("NVFP4A16", ["x"])).name == "nvfp4a16"
    assert format_for_scheme(preset_name_to_scheme("FP8_DYNAMIC", ["x"])).name == "fp8"
    with pytest.raises(ValueError, match="no registered format serves"):
        format_for_scheme(preset_name_to_scheme("W4A16", ["x"]))


def _calibrate_with_compressed_tensors(lin: nn.Linear, x: torch.Tensor) -> None:
    """Fill the module's qparams with compressed-tensors' own helpers (what an observer does)."""
    scheme = lin.quantization_scheme
    w = lin.weight.detach()
    wargs = scheme.weights
    if wargs.strategy == "tensor_group":
        gs = generate_gparam(w.amin(), w.amax())
        lin.weight_global_scale.data.copy_(gs)
        g = w.unflatten(-1, (-1, wargs.group_size))
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), wargs, global_scale=gs)
        lin.weight_scale.data.copy_(scale)
        a = x.abs().amax()
        lin.input_global_scale.data.copy_(generate_gparam(-a, a))
    else:  # per output channel
        scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), wargs)
        lin.weight_scale.data.copy_(scale)


def test_foreign_checkpoint_from_compressed_tensors_compressors(tmp_path):
    """A checkpoint written by compressed-tensors' own compressors (llm-compressor's path) loads."""
    from compressed_tensors.compressors import ModelCompressor

    torch.manual_seed(2)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.float32).eval()
    qconfig = QuantizationConfig(
        config_groups={
            "group_0": preset_name_to_scheme("NVFP4", [r"re:.*self_attn\.(q|k|v|o)_proj$"]),
            "group_1": preset_name_to_scheme("FP8_DYNAMIC", [r"re:.*mlp\.(gate|up|down)_proj$"]),
        },
        ignore=["lm_head", "model.layers.1.mlp.down_proj"],
    )
    apply_quantization_config(model, qconfig)
    x = torch.randn(4, 64) * 2
    quantized = {
        n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None
    }
    assert len(quantized) == 13
    expected = {}
    for name, lin in quantized.items():
        _calibrate_with_compressed_tensors(lin, x)
        # compressed-tensors' own weight fake-quant, fp32: the value the checkpoint encodes
        expected[name] = forward_quantize(lin, lin.weight.detach(), "weight", lin.quantization_scheme.weights)
    igs = {
        n: lin.input_global_scale.detach().clone()
        for n, lin in quantized.items()
        if hasattr(lin, "input_global_scale")
    }

    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(tmp_path / "ct"))
    compressor.update_config(str(tmp_path / "ct"))
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"

    served, infos = load_quantized_checkpoint(tmp_path / "ct", dtype=torch.float32)
    assert sorted(infos) == sorted(quantized)
    mods = dict(served.named_modules())
    for name in quantized:
        assert isinstance(mods[name], ServedLinear)
        assert torch.equal(mods[name].weight, expected[name]), name
        if name in igs:
            assert infos[name].format == "nvfp4"
            assert infos[name].input_global_scale == float(igs[name])
        else:
            assert infos[name].format == "fp8"
    assert not isinstance(mods["model.layers.1.mlp.down_proj"], ServedLinear)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(served(ids).logits).all()


def test_unknown_scheme_is_a_clear_error(tmp_path):
    torch.manual_seed(3)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path / "m"))
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    scheme = preset_name_to_scheme("W4A16", ["re:.*mlp\\.down_proj$"])
    data["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme.model_dump(mode="json")},
        "ignore": ["lm_head"],
    }
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no registered format serves"):
        load_quantized_checkpoint(tmp_path / "m")
