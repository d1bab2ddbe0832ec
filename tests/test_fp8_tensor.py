"""A format registered from outside the core, end to end: FP8 W8A8 with one weight scale per tensor.

Its numerics are checked against compressed-tensors' own functions; then, registered only here, it
goes through the probe, cost and allocation, the refiner, the export, the served loader and the
evaluation of a tiny random Llama, each checked against a plain computation.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp
from conftest import build_tiny_llama, build_tiny_tokenizer, quiet_trainer
from pq_lightning.callbacks import FisherProbe
from safetensors import safe_open
from torch.utils.data import DataLoader

from pq_lightning.causal_lm import CausalLM
from pq_lightning.cost import compute_costs
from pq_lightning.evaluate import evaluate_checkpoint
from pq_lightning.export import export_checkpoint, linear_bytes_from_checkpoint
from pq_lightning.formats import available_formats, get_format, register_format, unregister_format
from pq_lightning.formats.fp8_tensor import FP8PerTensor
from pq_lightning.gptq import GPTQConfig
from pq_lightning.models import find_body_linears
from pq_lightning.plan import budget_bits, build_groups, make_plan
from pq_lightning.refine import refine_model
from pq_lightning.served import apply_fake_quant, format_for_scheme, load_quantized_checkpoint

NAME = "fp8_tensor"
MENU = [NAME, "nvfp4", "fp8"]
#: the new format on both MLP inputs of every layer and on layer 1's q/k/v; the allocator picks the rest
PINS = {r"mlp\.(gate|up)_proj$": NAME, r"layers\.1\.self_attn\.[qkv]_proj$": NAME}
SEQ = 16
FP8 = torch.float8_e4m3fn


def _weights(kind: str, shape=(48, 256)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * 0.02
    if kind == "outliers":
        w[3, 7], w[-1] = 4.0, 0.0  # one large weight, one all-zero row
    elif kind == "zeros":
        w = torch.zeros(shape)
    elif kind == "bf16":
        w = w.to(torch.bfloat16)
    return w


# ---- numerics against compressed-tensors ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["normal", "outliers", "zeros", "bf16"])
def test_weight_matches_compressed_tensors(kind):
    w = _weights(kind)
    fmt = FP8PerTensor()
    args = fmt.scheme(["Linear"]).weights
    scale, zp = calculate_qparams(w.amin().reshape(1), w.amax().reshape(1), args)
    # compressed-tensors' scale rounded to BF16, so that transformers (BF16 scales) and vLLM (fp32) agree;
    # for a BF16 weight it is compressed-tensors' scale itself
    assert scale.dtype == (torch.bfloat16 if kind == "bf16" else torch.float32)
    scale = scale.to(torch.bfloat16).float()
    t = fmt.pack(w)
    assert t["weight"].dtype == FP8 and t["weight_scale"].shape == (1,)
    assert torch.equal(t["weight_scale"], scale)
    assert torch.equal(t["weight"].float(), quantize(w.float(), scale, zp, args, dtype=FP8).float())
    assert torch.equal(fmt.fake_quant(w), fake_quantize(w.float(), scale, zp, args))
    assert torch.equal(fmt.unpack(t), fmt.fake_quant(w))
    assert fmt.bits(tuple(w.shape)) == 8 * sum(v.numel() * v.element_size() for v in t.values())
    compact = fmt.compact_weight(w)  # the probe's cache: a byte per weight and one scale
    assert torch.equal(compact.decode(), fmt.fake_quant(w))
    assert compact.nbytes() == w.numel() + 4


def test_activation_per_token_matches_compressed_tensors():
    x = _weights("normal", (3, 7, 256)) * 10
    x[1, 2, 5] = 300.0  # an outlier token
    x[0, 1] = 0.0  # an all-zero token
    fmt = FP8PerTensor()
    args = fmt.scheme(["Linear"]).input_activations
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    assert torch.equal(fmt.fake_quant_activation(x), fake_quantize(x, scale, zp, args))
    assert not fmt.static_input_scale and fmt.calibrate_input_global_scale(1.0) is None


def test_siblings_share_the_largest_scale_by_hand():
    fmt = FP8PerTensor()
    small, large = torch.zeros(4, 16), torch.zeros(4, 16)
    small[1, 2], large[0, 0] = 0.5, 2.0
    # 2 / 448 rounded to BF16 is 73 * 2^-14 (1 / 448 is 73 * 2^-15)
    assert float(fmt.weight_scale(torch.ones(1, 1))) == 73 * 2.0**-15
    shared = fmt.shared_global_scale([small, large])
    assert float(shared) == 73 * 2.0**-14
    # 0.5 / (73 * 2^-14) = 112.2 rounds to the FP8 value 112, served as 112 * 73 * 2^-14
    assert float(fmt.fake_quant(small, global_scale=shared)[1, 2]) == 112 * 73 * 2.0**-14 == 0.4990234375


# ---- end to end -------------------------------------------------------------------------------------
def _reference_model():
    # BF16-exact fp32 parameters: the export stores the unplanned tensors in BF16 without loss
    model = build_tiny_llama(initializer_range=0.2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Probe -> cost -> allocate -> refine -> export with the new format in the menu."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's many small ops only oversubscribe a shared machine
    assert NAME not in available_formats()  # an example: registered by its user, not by the core
    fmt = register_format(FP8PerTensor())
    assert get_format("FP8_TENSOR") is fmt
    root = tmp_path_factory.mktemp("fp8_tensor")
    model = _reference_model()
    ids = torch.randint(4, 128, (8, SEQ), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1  # BOS
    probe = FisherProbe(output_path=str(root / "sens.safetensors"), formats=MENU, output_error_tokens=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|val_dataloader).*")
        quiet_trainer([probe]).fit(
            CausalLM.from_model(copy.deepcopy(model), probe_only=True),
            DataLoader([{"input_ids": r} for r in ids[:4]], batch_size=2),
        )
    costs = compute_costs(find_body_linears(model), probe.sensitivity, MENU, estimator="output")
    groups = build_groups(costs, model_type="llama", formats=MENU, pins=PINS)
    max_bits = budget_bits(groups, target_bits=7.0)
    plan = make_plan(costs, groups, max_bits=max_bits, estimator="output", target={"target_bits": 7.0})
    fit, held = [ids[0:2], ids[2:4], ids[4:6]], [ids[6:8]]
    out = refine_model(model, plan.formats, fit, held, config=GPTQConfig(dampening=(0.01,)), keep_hessians=True)
    ckpt = root / "ckpt"
    export_checkpoint(model, plan.formats, ckpt, quantized=out.packed, input_amax=out.input_amax,
                      tokenizer=build_tiny_tokenizer())
    yield {"fmt": fmt, "model": model, "ids": ids, "sens": probe.sensitivity, "costs": costs, "plan": plan,
           "max_bits": max_bits, "fit": fit, "held": held, "out": out, "ckpt": ckpt}
    unregister_format(NAME)
    torch.set_num_threads(threads)


def _ours(e2e) -> list[str]:
    return [n for n, f in e2e["plan"].formats.items() if f == NAME]


def _plain_output_error(model, ids: torch.Tensor, fmt) -> dict[str, float]:
    """``½ Σ_t Σ_o g² (W x − Q(W) Q_a(x))²`` per Linear, from autograd on the summed next-token loss (fp64)."""
    model = copy.deepcopy(model)
    linears = find_body_linears(model)
    seen = {}

    def hook(name):
        def fn(module, args, output):
            output.retain_grad()
            seen[name] = (args[0].detach(), output)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    logits = model(input_ids=ids, use_cache=False).logits
    for h in handles:
        h.remove()
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").backward()
    out = {}
    for name, (x, y) in seen.items():
        w = linears[name].weight.detach()
        err = x.double() @ w.double().T - fmt.fake_quant_activation(x).double() @ fmt.fake_quant(w).double().T
        out[name] = 0.5 * float((y.grad.double().pow(2) * err.pow(2)).sum()) / ids[:, 1:].numel()
    return out


def test_probe_measures_the_new_format(e2e):
    sens, fmt = e2e["sens"], e2e["fmt"]
    want = _plain_output_error(e2e["model"], e2e["ids"][:4], fmt)
    assert len(want) == 14
    for name, value in want.items():
        assert set(sens[name].output_error) == set(MENU)
        assert value > 0 and sens[name].output_error[NAME] == pytest.approx(value, rel=1e-5), name


def test_cost_and_allocation_price_the_new_format(e2e):
    costs, plan, sens = e2e["costs"], e2e["plan"], e2e["sens"]
    for name, c in costs.items():
        out_f, in_f = c.shape
        assert c.bits[NAME] == out_f * in_f * 8 + 32  # by hand: a byte per weight and one fp32 scale
        assert c.dloss[NAME] == sens[name].output_error[NAME]
    ours = _ours(e2e)
    assert len(ours) == 7 and all(n.endswith(("gate_proj", "up_proj")) or ".layers.1.self_attn." in n for n in ours)
    assert plan.total_bits == sum(lp.bits for lp in plan.linears.values()) <= e2e["max_bits"]
    assert plan.linears[ours[0]].bits == costs[ours[0]].bits[NAME]


def test_refiner_packs_the_new_format_under_shared_scales(e2e):
    model, out, fmt = e2e["model"], e2e["out"], e2e["fmt"]
    weights = {n: m.weight.detach() for n, m in find_body_linears(model).items()}
    for name in _ours(e2e):
        parent, leaf = name.rsplit(".", 1)
        sibs = ["q_proj", "k_proj", "v_proj"] if leaf in ("q_proj", "k_proj", "v_proj") else ["gate_proj", "up_proj"]
        amax = max(float(weights[f"{parent}.{s}"].abs().max()) for s in sibs)
        shared = torch.tensor([amax / 448]).to(torch.bfloat16).float()  # the largest sibling scale, by hand
        packed = out.packed[name]
        assert torch.equal(packed["weight_scale"], shared), name
        ref = fmt.pack(weights[name], global_scale=shared)
        assert torch.equal(packed["weight"].view(torch.uint8), ref["weight"].view(torch.uint8)), name
        assert out.decisions[name].method == "rtn"  # the format declares no refine: RTN, never an error
    # the Hessian of a new-format group is that of the served model's per-token FP8 inputs
    served = copy.deepcopy(model)
    apply_fake_quant(served, e2e["plan"].formats, quantized=out.packed, input_amax=out.input_amax)
    name = "model.layers.1.self_attn.q_proj"
    xs = []
    h = dict(served.named_modules())[name].register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for b in e2e["fit"]:
            served(input_ids=b, use_cache=False)
    h.remove()
    x = torch.cat([fmt.fake_quant_activation(x).reshape(-1, x.shape[-1]) for x in xs]).double()
    H = out.hessians[next(g for g in out.hessians if name in g)]["fit"].double()
    assert float((H - x.T @ x).norm() / (x.T @ x).norm()) < 1e-5


def _disk(ckpt) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return tensors


def test_export_writes_the_compressed_tensors_scheme_and_the_exact_tensors(e2e):
    from compressed_tensors.compressors import BaseCompressor

    ckpt, out, fmt, plan = e2e["ckpt"], e2e["out"], e2e["fmt"], e2e["plan"]
    qc = QuantizationConfig.model_validate(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    group = next(s for s in qc.config_groups.values() if set(s.targets) == set(_ours(e2e)))
    assert (group.weights.strategy, group.input_activations.strategy) == ("tensor", "token")
    assert group.input_activations.dynamic is True and group.format == "float-quantized"
    assert format_for_scheme(group) is fmt  # the served loader finds the format by its numerics
    disk = _disk(ckpt)
    for name in _ours(e2e):
        assert f"{name}.input_global_scale" not in disk  # dynamic activations: nothing calibrated on disk
        for k, v in out.packed[name].items():
            assert torch.equal(disk[f"{name}.{k}"].view(torch.uint8), v.view(torch.uint8)), (name, k)
        dense = BaseCompressor.get_value_from_registry(group.format).decompress(
            {k: disk[f"{name}.{k}"] for k in fmt.tensor_names}, group
        )["weight"]
        assert torch.equal(dense, fmt.unpack(out.packed[name])), name
    written = linear_bytes_from_checkpoint(ckpt, list(plan.linears))
    assert {n: 8 * b for n, b in written.items()} == {n: lp.bits for n, lp in plan.linears.items()}


def test_served_checkpoint_decodes_bit_exactly_and_runs_as_in_memory(e2e):
    model, out, fmt, plan = e2e["model"], e2e["out"], e2e["fmt"], e2e["plan"]
    served, infos = load_quantized_checkpoint(e2e["ckpt"], dtype=torch.float32)
    mods = dict(served.named_modules())
    for name in _ours(e2e):
        assert infos[name].format == NAME and infos[name].input_global_scale is None
        assert torch.equal(mods[name].weight, fmt.unpack(out.packed[name])), name
    mem = copy.deepcopy(model)
    apply_fake_quant(mem, plan.formats, quantized=out.packed, input_amax=out.input_amax)
    with torch.no_grad():
        assert torch.equal(served(e2e["ids"]).logits, mem(e2e["ids"]).logits)


def test_evaluation_of_the_checkpoint_equals_a_plain_loop(e2e):
    windows = torch.randint(4, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    windows[:, 0] = 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|sync_dist).*")
        got = evaluate_checkpoint(e2e["model"], e2e["ckpt"], windows)
    served, _ = load_quantized_checkpoint(e2e["ckpt"], dtype=torch.float32)
    kl, match = [], []
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(e2e["model"](w[None]).logits[0, :-1].float(), -1)
            lq = torch.log_softmax(served(w[None]).logits[0, :-1].float(), -1)
            kl.append((lp.exp() * (lp - lq)).sum(-1))
            match.append(lp.argmax(-1) == lq.argmax(-1))
    kl, match = torch.cat(kl).double(), torch.cat(match).double()
    assert got["n_positions"] == kl.numel() == 4 * 23
    assert got["kl_all"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert got["top1_all"] == pytest.approx(float(match.mean()), abs=1e-12)
    assert 0 < got["kl_all"] < 1.0
