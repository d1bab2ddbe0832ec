"""Every format against compressed-tensors' own reference functions, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    generate_gparam,
)

from pq_lightning.formats import (
    FP8,
    NVFP4,
    NonFiniteTensorError,
    QuantFormat,
    available_formats,
    get_format,
    register_format,
)
from pq_lightning.formats.e2m1 import (
    E2M1_VALUES,
    E2M1Table,
    e2m1_codes,
    e2m1_decode,
    e2m1_round,
    pack_codes,
    unpack_codes,
)


def _weights(kind: str, shape=(48, 256), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g) * 0.02
    if kind == "student_t":
        df = 3.0
        z = torch.randn(shape, generator=g)
        chi = torch.distributions.Chi2(df).sample(shape)
        return z / torch.sqrt(chi / df) * 0.02
    if kind == "outliers":
        w = torch.randn(shape, generator=g) * 0.02
        idx = torch.randint(0, w.numel(), (20,), generator=g)
        w.view(-1)[idx] = torch.randn(20, generator=g) * 5.0
        w2 = w.reshape(-1, shape[-1])
        w2[1, 16:32] = 0.0  # an all-zero group
        w2[-1] = 0.0  # an all-zero row
        return w
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "bf16":
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    raise ValueError(kind)


KINDS = ["normal", "student_t", "outliers", "zeros", "bf16"]


def _ct_nvfp4_weight(w: torch.Tensor):
    """compressed-tensors' own NVFP4 weight path: global scale, group scales, fake-quant, pack."""
    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    gs = generate_gparam(w.float().amin(), w.float().amax())
    groups = w.float().unflatten(-1, (-1, 16))
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=gs)
    fq = fake_quantize(w.float(), scale, zp, args, global_scale=gs)
    q = quantize(w.float(), scale, zp, args, global_scale=gs)
    return gs, scale, fq, pack_fp4_to_uint8(q)


@pytest.mark.parametrize("kind", KINDS)
def test_nvfp4_weight_matches_compressed_tensors(kind):
    w = _weights(kind)
    nv = get_format("nvfp4")
    gs, scale, fq_ref, packed_ref = _ct_nvfp4_weight(w)

    assert torch.equal(nv.global_scale(w), gs)
    ours_scale = nv.group_scales(w, gs)
    assert ours_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(ours_scale.float(), scale.float())
    assert torch.equal(nv.fake_quant(w), fq_ref)

    tensors = nv.pack(w)
    assert torch.equal(tensors["weight_packed"], packed_ref)
    assert torch.equal(tensors["weight_scale"].float(), scale.float())
    assert torch.equal(tensors["weight_global_scale"], gs)
    assert torch.equal(nv.unpack(tensors), fq_ref)


def test_nvfp4_all_zero_tensor_has_unit_global_scale():
    nv = get_format("nvfp4")
    w = torch.zeros(16, 32)
    assert nv.global_scale(w).item() == 1.0
    t = nv.pack(w)
    # compressed-tensors replaces zero FP8 scales by FP8's eps, 0.125
    assert torch.all(t["weight_scale"].float() == 0.125)
    assert torch.count_nonzero(nv.unpack(t)) == 0


def test_e2m1_rounding_table_and_ties():
    # Hand-computed: ties go to the even mantissa.
    x = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, -0.1, -0.75, -6.0])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -1.0, -6.0])
    got = e2m1_decode(e2m1_codes(x))
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    fast = e2m1_round(x)
    assert torch.equal(fast, want) and torch.equal(torch.signbit(fast), torch.signbit(want))
    dense = torch.linspace(-8, 8, 100_001)
    assert torch.equal(e2m1_round(dense), e2m1_decode(e2m1_codes(dense)))
    assert e2m1_codes(torch.tensor([-0.1])).item() == 8  # negative zero keeps its sign bit
    assert torch.equal(e2m1_decode(torch.arange(8, dtype=torch.uint8)), torch.tensor(E2M1_VALUES))


def test_fast_e2m1_rounding_is_bit_identical_to_e2m1_codes():
    """The key/table rounding (e2m1_round, GPTQ's column loop and sweep), on boundaries, their
    neighbours, signed zeros, infinities and random values."""
    b = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 3.0, 4.0])
    up, down = torch.nextafter(b, torch.tensor(100.0)), torch.nextafter(b, torch.tensor(-100.0))
    edge = torch.cat([b, up, down, torch.arange(-60, 61) / 8, torch.tensor([0.0, 7.0, 1e-45, 3e38, float("inf")])])
    x = torch.cat([edge, -edge, torch.randn(100_000) * 3, torch.randn(1000) * 1e-3])
    lut = E2M1Table.on(x.device)
    key = lut.key(8 * x)
    assert torch.equal(lut.codes(key, torch.signbit(x)), e2m1_codes(x))
    v = torch.copysign(lut.magnitude[key.long()], x)
    assert torch.equal(v.view(torch.int32), e2m1_decode(e2m1_codes(x)).view(torch.int32))  # -0 included
    assert torch.equal(e2m1_round(x).view(torch.int32), v.view(torch.int32))
    nan = e2m1_round(torch.tensor([float("nan"), 1.0, -float("inf")]))
    assert bool(nan[0].isnan()) and nan[1:].tolist() == [1.0, -6.0]


def test_nibble_packing_matches_compressed_tensors():
    codes = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    values = e2m1_decode(codes)
    assert torch.equal(pack_codes(codes), pack_fp4_to_uint8(values))
    assert torch.equal(unpack_codes(pack_codes(codes)), codes)
    ref = unpack_fp4_from_uint8(pack_codes(codes), 8, 32, dtype=torch.float32)
    assert torch.equal(ref, values)


def test_nvfp4_packs_given_scales_exactly():
    """GPTQ chooses codes and scales: the packer must not re-derive them."""
    nv = get_format("nvfp4")
    w = _weights("normal", (16, 64))
    gs = nv.global_scale(w)
    rtn_scale = nv.group_scales(w, gs)
    bigger = (rtn_scale.float() * 2).clamp(max=448).to(torch.float8_e4m3fn)
    q = nv.quantize(w, global_scale=gs, scale=bigger)
    t = nv.pack_quantized(q)
    assert torch.equal(t["weight_scale"].float(), bigger.float())
    assert torch.equal(unpack_codes(t["weight_packed"]), q.codes)
    assert torch.equal(nv.unpack(t), q.dequantize())


def test_nvfp4_code_grid_is_the_served_weight_and_repacks_moved_codes():
    """Tuning moves codes with the scales held: the grid decodes to compressed-tensors' dequantised weight,
    and moved values come back as compressed-tensors' packing of those values, scales untouched."""
    nv = get_format("nvfp4")
    w = _weights("student_t", (16, 64))
    _, scale, fq_ref, packed_ref = _ct_nvfp4_weight(w)
    tensors = nv.pack(w)
    grid = nv.code_grid(tensors)
    assert torch.equal(grid.weight(), fq_ref)
    assert torch.equal(grid.round(grid.values), grid.values)  # every value is a grid point
    assert torch.equal(nv.pack_grid(tensors, grid.values)["weight_packed"], packed_ref)
    moved = grid.values.clone()
    moved[0, :16] = torch.tensor([6.0, -6.0, 0.5, -0.5, 1.5, 3.0, -4.0, 0.0] * 2)  # one whole group, by hand
    moved[3, 17] = -moved[3, 17]
    new = nv.pack_grid(tensors, moved)
    assert torch.equal(new["weight_packed"], pack_fp4_to_uint8(moved))
    assert new["weight_scale"] is tensors["weight_scale"] and new["weight_global_scale"] is tensors["weight_global_scale"]
    eff = scale.float() / tensors["weight_global_scale"]
    by_hand = unpack_fp4_from_uint8(new["weight_packed"], 16, 64, torch.float32).unflatten(-1, (-1, 16))
    assert torch.equal(nv.unpack(new), (by_hand * eff.unsqueeze(-1)).flatten(-2))
    assert get_format("fp8").code_grid(get_format("fp8").pack(w)) is None  # its steps grow with the value
    with pytest.raises(ValueError, match="do not match"):
        nv.pack_grid(tensors, moved[:, :32])


@pytest.mark.parametrize("kind", ["normal", "student_t", "outliers"])
def test_nvfp4_activation_matches_compressed_tensors(kind):
    x = _weights(kind, (2, 5, 64)) * 50
    nv = get_format("nvfp4")
    args = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    igs = nv.calibrate_input_global_scale(x.abs().amax())
    assert torch.equal(igs, generate_gparam(x.amin(), x.amax()))
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=igs)
    ref = fake_quantize(x, scale, zp, args, global_scale=igs)
    assert torch.equal(nv.fake_quant_activation(x, igs), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_fp8_weight_matches_compressed_tensors(kind):
    w = _weights(kind).float()
    fp8 = get_format("fp8")
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    # our scale is compressed-tensors' fp32 scale rounded to the nearest BF16 value, so that
    # transformers (which keeps scales in BF16) and vLLM (FP32) decode the same weights
    scale = scale.to(torch.bfloat16).float()
    ref_fq = fake_quantize(w, scale, zp, args)
    ref_q = quantize(w, scale, zp, args, dtype=torch.float8_e4m3fn)
    t = fp8.pack(w)
    assert t["weight_scale"].dtype == torch.float32
    assert torch.equal(t["weight_scale"], scale)
    assert torch.equal(t["weight"].float(), ref_q.float())
    assert torch.equal(fp8.fake_quant(w), ref_fq)


def test_fp8_weight_scale_is_what_compressed_tensors_computes_for_a_bf16_model():
    w = _weights("bf16", (64, 96))
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights
    scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    assert scale.dtype == torch.bfloat16
    assert torch.equal(get_format("fp8").pack(w)["weight_scale"], scale.float())


def test_fp8_weights_decode_identically_with_bf16_or_fp32_scales():
    w = _weights("student_t", (40, 64)).float()
    t = get_format("fp8").pack(w)
    s = t["weight_scale"]
    assert torch.equal(s.to(torch.bfloat16).float(), s)  # every scale is a BF16 value
    # transformers' decompression: fp8 -> bf16 times a bf16 scale, in bf16 arithmetic
    as_bf16 = t["weight"].to(torch.bfloat16) * s.to(torch.bfloat16)
    exact = t["weight"].float() * s  # exact in fp32 (4 + 8 significant bits)
    assert torch.equal(as_bf16, exact.to(torch.bfloat16))
    # a hand value: amax 1.0 -> 1/448 rounded to BF16 is 0.0022277832 (= 73 * 2^-15)
    one = torch.zeros(1, 16)
    one[0, 3] = 1.0
    s1 = get_format("fp8").pack(one)["weight_scale"]
    assert float(s1) == 73 * 2.0**-15
    assert float(get_format("fp8").fake_quant(one)[0, 3]) == 448 * 73 * 2.0**-15  # clamped at 448


def test_fp8_activation_per_token_matches_compressed_tensors():
    x = _weights("outliers", (3, 7, 256)) * 10
    x[0, 1] = 0.0  # an all-zero token
    fp8 = get_format("fp8")
    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).input_activations
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    ref = fake_quantize(x, scale, zp, args)
    assert torch.equal(fp8.fake_quant_activation(x), ref)


def test_weight_only_variants_leave_activations_alone():
    x = torch.randn(4, 32)
    assert torch.equal(get_format("nvfp4a16").fake_quant_activation(x), x)
    assert torch.equal(get_format("fp8_w8a16").fake_quant_activation(x), x)
    assert get_format("nvfp4a16").scheme(["Linear"]).input_activations is None
    assert get_format("fp8_w8a16").scheme(["Linear"]).input_activations is None
    assert get_format("nvfp4").scheme(["Linear"]).input_activations.dynamic == "local"


def test_bits_equal_packed_bytes():
    shape = (48, 256)
    w = _weights("normal", shape)
    for name in ("nvfp4", "nvfp4a16", "fp8", "fp8_w8a16", "bf16"):
        fmt = get_format(name)
        t = fmt.pack(w)
        nbytes = sum(v.numel() * v.element_size() for v in t.values())
        if fmt.quantizes_activations and name.startswith("nvfp4"):
            nbytes += 4  # input_global_scale, fp32 [1], written beside the weight at export
        assert fmt.bits(shape) == nbytes * 8, name
    # hand-computed: 4096x4096 NVFP4 = 4 bits/weight + 8 bits per 16 weights + two fp32 scalars
    assert get_format("nvfp4").bits((4096, 4096)) == 4096 * 4096 * 4 + 4096 * 256 * 8 + 64


def test_unsupported_shapes_are_reported():
    nv = get_format("nvfp4")
    assert nv.supports((64, 64))
    reason = nv.unsupported_reason((64, 40))
    assert reason is not None and "divisible by 16" in reason
    with pytest.raises(ValueError, match="divisible by 16"):
        nv.pack(torch.randn(8, 40))
    assert get_format("fp8").supports((3, 5))


@pytest.mark.parametrize("name", ["nvfp4", "fp8", "bf16"])
def test_non_finite_weights_raise_and_name_the_tensor(name):
    w = torch.randn(16, 32)
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteTensorError, match="weight"):
        get_format(name).pack(w)
    for bad in (float("inf"), float("nan")):
        x = torch.randn(4, 32)
        x[3, 17] = bad
        if get_format(name).quantizes_activations:
            with pytest.raises(NonFiniteTensorError, match="activation"):
                get_format(name).fake_quant_activation(x)
            with pytest.raises(NonFiniteTensorError, match="activation"):
                get_format(name).fake_quant_activation(x, torch.tensor([100.0]))


def test_registry_accepts_user_formats():
    class Int8PerTensor(QuantFormat):
        name = "test_int8"

        def bits(self, shape):
            return shape[0] * shape[1] * 8 + 32

        def pack(self, w):
            s = w.abs().amax() / 127
            return {"weight": torch.round(w / s).to(torch.int8), "weight_scale": s.reshape(1)}

        def unpack(self, t):
            return t["weight"].float() * t["weight_scale"]

        def scheme(self, targets):
            return None

    fmt = register_format(Int8PerTensor())
    assert "test_int8" in available_formats()
    assert get_format("TEST_INT8") is fmt
    w = torch.randn(4, 8)
    assert (fmt.fake_quant(w) - w).abs().max() < w.abs().max() / 127
    with pytest.raises(ValueError, match="already registered"):
        register_format(Int8PerTensor())
    with pytest.raises(KeyError, match="registered formats"):
        get_format("nope")


def test_nvfp4_siblings_share_compressed_tensors_global_scale_of_the_fused_weight():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, 64, generator=g) * s for n, s in ((32, 0.02), (16, 0.5), (16, 0.03)))
    fused = torch.cat([q, k, v])  # the one matmul vLLM runs
    gs = get_format("nvfp4").shared_global_scale([q, k, v])
    assert torch.equal(gs, generate_gparam(fused.amin(), fused.amax()))
    assert torch.equal(gs, get_format("nvfp4").global_scale(k))  # k holds the largest |w|


def test_capability_declarations_are_checked_at_registration():
    class Half(QuantFormat):
        name = "test_half_declared"
        quantizes_activations = True
        tensor_names = ("weight",)

        def bits(self, shape):
            return shape[0] * shape[1] * 16

        def pack(self, w):
            return {"weight": w.to(torch.bfloat16)}

        def unpack(self, t):
            return t["weight"].float()

        def scheme(self, targets):
            return None

        def calibrate_input_global_scale(self, amax):
            return torch.tensor([448.0 / float(amax)])

    with pytest.raises(ValueError, match="static_input_scale=False but calibrate_input_global_scale returns a scale"):
        register_format(Half())
    Half.static_input_scale = True
    Half.shares_global_scale = True
    with pytest.raises(ValueError, match="global_scale_tensor to name one of tensor_names"):
        register_format(Half())
    assert "test_half_declared" not in available_formats()
    for name, static, shares in [("nvfp4", True, True), ("nvfp4a16", False, True), ("fp8", False, False)]:
        fmt = get_format(name)
        assert (fmt.static_input_scale, fmt.shares_global_scale) == (static, shares), name
        assert (fmt.calibrate_input_global_scale(1.0) is not None) == static, name


def test_isinstance_of_registered_defaults():
    assert isinstance(get_format("nvfp4"), NVFP4)
    assert isinstance(get_format("fp8"), FP8)


_TRITON_SNIPPET = r"""
import torch
from pq_lightning.formats import get_format
from pq_lightning.kernels import triton_kernels_enabled
from pq_lightning.kernels.nvfp4_triton import nvfp4_quantize_triton
torch.manual_seed(0)
nv = get_format("nvfp4")
cases = [torch.randn(40, 96) * 0.02, torch.zeros(16, 32)]
t = torch.randn(24, 64)
t[0, :16] = 0
t[3, 5] = 80.0
cases.append(t / torch.rand(24, 64).clamp(min=0.05))  # heavy tails
assert triton_kernels_enabled(cases[0])
for w in cases:
    gs = nv.global_scale(w)
    q = nv.quantize(w, gs)  # torch reference path
    ref = nv.pack_quantized(q)
    packed, scale, deq = nvfp4_quantize_triton(w, gs)
    assert torch.equal(packed, ref["weight_packed"]), "packed"
    assert torch.equal(scale.float(), ref["weight_scale"].float()), "scale"
    assert torch.equal(deq.view(torch.int32), q.dequantize().view(torch.int32)), "dequant (sign of zero too)"
    assert torch.equal(nv.fake_quant(w), q.dequantize())  # dispatches to triton here
print("TRITON_OK")
"""


def test_triton_kernel_bit_exact_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PQ_TRITON="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_SNIPPET], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "TRITON_OK" in r.stdout, r.stderr[-3000:]


def test_compiled_cpu_path_is_bit_exact(monkeypatch):
    monkeypatch.setenv("PQ_COMPILE", "1")
    w = _weights("outliers", (32, 64))
    nv = get_format("nvfp4")
    assert torch.equal(nv.fake_quant(w), nv.quantize(w).dequantize())
