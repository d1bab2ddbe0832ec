"""The GPTQ refiner's layer walk: tiny random Llama (hidden 64) and Gemma-4, random token windows."""

from __future__ import annotations

import copy
import socket

import pytest
import torch

from pq_lightning import refine as refine_module
from pq_lightning.flops import FlopTally
from pq_lightning.formats import get_format
from pq_lightning.formats.nvfp4 import global_scale_from_amax
from pq_lightning.gptq import GPTQConfig, gptq_fp8, gptq_nvfp4, output_error, scale_sweep_nvfp4
from pq_lightning.models import find_body_linears
from pq_lightning.refine import refine_model
from pq_lightning.served import apply_fake_quant

N_FIT, N_HELD, SEQ, BATCH = 12, 4, 64, 2
NVFP4 = get_format("nvfp4")
CONFIG = GPTQConfig(dampening=(0.01, 0.1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine is shared: intra-op threads only oversubscribe it (25x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _llama():
    from conftest import build_tiny_llama

    return build_tiny_llama(hidden_size=64, intermediate_size=128)


def _windows(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ids = torch.randint(4, 128, (N_FIT + N_HELD, SEQ), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1  # BOS
    fit = [ids[i : i + BATCH] for i in range(0, N_FIT, BATCH)]
    held = [ids[i : i + BATCH] for i in range(N_FIT, N_FIT + N_HELD, BATCH)]
    return fit, held


def _plan(model) -> dict[str, str]:
    """Layer 0 all NVFP4; layer 1: q/k/v NVFP4, o BF16, gate/up NVFP4, down FP8."""
    plan = {}
    for name in find_body_linears(model):
        if name.endswith("layers.1.self_attn.o_proj"):
            plan[name] = "bf16"
        elif name.endswith("layers.1.mlp.down_proj"):
            plan[name] = "fp8"
        else:
            plan[name] = "nvfp4"
    return plan


QKV0 = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")


@pytest.fixture(scope="module")
def refined():
    model = _llama()
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    fit, held = _windows()
    plan = _plan(model)
    out = refine_model(model, plan, fit, held, config=CONFIG, keep_hessians=True)
    return model, plan, out, before


def _hook_inputs(module: torch.nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- the caller's model -----------------------------------------------------------------------
def test_model_comes_back_bit_identical(refined):
    model, _, _, before = refined
    after = model.state_dict()
    assert set(after) == set(before)
    for k, (v, ptr) in before.items():
        assert torch.equal(after[k], v), k
        assert after[k].data_ptr() == ptr, k  # same storage, not a copy
    assert not model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ---- decisions -----------------------------------------------------------------------------------
def test_gate_never_worse_than_rtn_and_gptq_helps(refined):
    _, plan, out, _ = refined
    nv = [d for d in out.decisions.values() if d.format == "nvfp4"]
    assert len(nv) == 12
    for d in nv:
        assert d.heldout_chosen <= d.heldout_rtn, d.name
        assert d.errors["rtn"]["heldout"] == d.heldout_rtn
    assert out.decisions["model.layers.1.self_attn.o_proj"].method == "bf16"
    assert "model.layers.1.self_attn.o_proj" not in out.packed
    assert out.decisions["model.layers.1.mlp.down_proj"].method == "rtn"  # FP8 without fp8_gptq
    tot = out.totals["by_format"]["nvfp4"]
    assert tot["n_refined"] >= 8
    # on this model and data GPTQ / the sweep cut the held-out output error by a clear margin
    assert out.totals["heldout_chosen"] < 0.9 * out.totals["heldout_rtn"]
    assert out.totals["heldout_rtn"] == pytest.approx(sum(d.heldout_rtn for d in out.decisions.values()))


def test_packed_decodes_to_the_decided_weight(refined):
    """The decision's held-out error is that of the packed weight, recomputed from the Hessian."""
    model, plan, out, _ = refined
    linears = dict(model.named_modules())
    groups = {m: g for g in out.hessians for m in g}
    for name, packed in out.packed.items():
        fmt = get_format(plan[name])
        assert set(packed) == set(fmt.tensor_names)
        h = out.hessians[groups[name]]
        W = linears[name].weight.detach().float()
        w_hat = fmt.unpack(packed)
        d = out.decisions[name]
        # the packed weight is the refit of the chosen recipe (GPTQConfig.refit) unless RTN was kept
        assert d.refit == (d.method != "rtn")
        key = "refit" if d.refit else (d.method if d.damp is None else f"{d.method}@{d.damp:g}")
        assert output_error(W, w_hat, h["heldout"] / h["n_heldout"]) == pytest.approx(d.errors[key]["heldout"], rel=1e-12)
        assert output_error(W, w_hat, h["fit"] / h["n_fit"]) == pytest.approx(d.errors[key]["fit"], rel=1e-12)
        if d.refit:  # the recipe solved again on every calibration token, bit for bit
            H_all = (h["fit"] + h["heldout"]) / (h["n_fit"] + h["n_heldout"])
            gs = packed["weight_global_scale"]
            swept = scale_sweep_nvfp4(W, H_all, global_scale=gs, grid=CONFIG.sweep_grid)
            scale = swept.scale if d.method.startswith("sweep") else None
            want = (swept if d.method == "sweep" else
                    gptq_nvfp4(W, H_all, global_scale=gs, damp=d.damp, scale=scale, act_order=CONFIG.act_order,
                               search_grid=CONFIG.sweep_grid if CONFIG.scale_search else None))
            assert torch.equal(w_hat, want.dequantize()), name
        else:
            assert output_error(W, w_hat, h["heldout"] / h["n_heldout"]) == pytest.approx(d.heldout_chosen, rel=1e-12)
    n_tokens = (N_FIT * SEQ, N_HELD * SEQ)
    assert all((h["n_fit"], h["n_heldout"]) == n_tokens for h in out.hessians.values())


def test_fused_siblings_share_scales(refined):
    model, _, out, _ = refined
    linears = dict(model.named_modules())
    for layer in (0, 1):
        for sibs in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            names = [f"model.layers.{layer}.{s}" for s in sibs]
            w_amax = max(float(linears[n].weight.detach().abs().max()) for n in names)
            expected = global_scale_from_amax(w_amax) / CONFIG.scale_headroom  # 448·6 / (2·amax)
            for n in names:
                assert torch.equal(out.packed[n]["weight_global_scale"], expected), n
            assert len({out.input_amax[n] for n in names}) == 1
    assert out.input_amax["model.layers.0.self_attn.q_proj"] != out.input_amax["model.layers.0.self_attn.o_proj"]


# ---- Hessians against a plain forward ------------------------------------------------------------
def test_layer0_qproj_hessian_equals_plain_forward(refined):
    model, _, out, _ = refined
    fit, held = _windows()
    xs: dict[str, list] = {"fit": [], "held": []}
    q = dict(model.named_modules())[QKV0[0]]
    with torch.no_grad():
        for split, batches in (("fit", fit), ("held", held)):
            h = _hook_inputs(q, xs[split])
            for b in batches:
                model(input_ids=b, use_cache=False)
            h.remove()
    amax = max(float(x.abs().max()) for x in xs["fit"] + xs["held"])
    assert out.input_amax[QKV0[0]] == amax
    igs = NVFP4.calibrate_input_global_scale(amax)
    xq = torch.cat([NVFP4.fake_quant_activation(x, igs).reshape(-1, 64) for x in xs["fit"]]).double()
    H = out.hessians[QKV0]
    assert H["n_fit"] == xq.shape[0]
    assert _rel(H["fit"], xq.T @ xq) < 1e-5


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                                  "model.layers.1.mlp.down_proj"])
def test_downstream_hessians_equal_the_served_model(refined, name):
    """Inputs seen with upstream quantized = those of the served model built from the refiner's output."""
    model, plan, out, _ = refined
    served = copy.deepcopy(model)
    apply_fake_quant(served, plan, quantized=out.packed, input_amax=out.input_amax)
    fit, held = _windows()
    xs: dict[str, list] = {"fit": [], "held": []}
    lin = dict(served.named_modules())[name]
    with torch.no_grad():
        for split, batches in (("fit", fit), ("held", held)):
            h = _hook_inputs(lin, xs[split])
            for b in batches:
                served(input_ids=b, use_cache=False)
            h.remove()
    amax = max(float(x.abs().max()) for x in xs["fit"] + xs["held"])
    assert out.input_amax[name] == pytest.approx(amax, rel=1e-6)
    fmt = get_format(plan[name])
    igs = fmt.calibrate_input_global_scale(out.input_amax[name])
    group = next(g for g in out.hessians if name in g)
    for split, key in (("fit", "fit"), ("held", "heldout")):
        x = torch.cat([fmt.fake_quant_activation(x, igs).reshape(-1, x.shape[-1]) for x in xs[split]]).double()
        assert _rel(out.hessians[group][key], x.T @ x) < 1e-5, split


# ---- RTN mode -----------------------------------------------------------------------------------
def test_rtn_mode_packs_like_the_format(refined):
    model, plan, gptq_out, _ = refined
    fit, held = _windows()
    out = refine_model(model, plan, fit, held, gptq=False)
    linears = dict(model.named_modules())
    for name, packed in out.packed.items():
        fmt = get_format(plan[name])
        W = linears[name].weight.detach()
        if plan[name] == "nvfp4":
            parent = name.rsplit(".", 1)[0]
            sibs = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
            leaf = name.rsplit(".", 1)[1]
            members = [f"{parent}.{s}" for s in sibs[parent.rsplit('.', 1)[1]]] if leaf in sum(sibs.values(), ()) else [name]
            gs = global_scale_from_amax(max(float(linears[m].weight.abs().max()) for m in members))
            ref = fmt.pack(W, global_scale=gs)
        else:
            ref = fmt.pack(W)
        assert set(packed) == set(ref)
        for k in ref:
            assert torch.equal(packed[k].view(torch.uint8), ref[k].view(torch.uint8)), (name, k)
        assert out.decisions[name].method == "rtn"
        assert out.decisions[name].errors == {} and out.decisions[name].heldout_rtn is None  # nothing measured
    # the amax the export needs (W4A4 NVFP4) is calibrated, the FP8 input (dynamic scales) is not observed
    assert set(out.input_amax) == {n for n, f in plan.items() if f == "nvfp4"}
    # nothing upstream of layer 0's q/k/v is quantized: same amax in both modes
    assert out.input_amax[QKV0[0]] == gptq_out.input_amax[QKV0[0]]
    # RTN upstream changes what later Linears see
    assert out.input_amax["model.layers.1.mlp.gate_proj"] != gptq_out.input_amax["model.layers.1.mlp.gate_proj"]
    # rtn_errors measures them all, for the same bits
    measured = refine_model(model, plan, fit, held, gptq=False, rtn_errors=True)
    assert set(measured.input_amax) == set(out.packed)
    for name, packed in out.packed.items():
        assert all(torch.equal(v.view(torch.uint8), measured.packed[name][k].view(torch.uint8)) for k, v in packed.items())
        d = measured.decisions[name]
        assert d.heldout_rtn is not None and d.heldout_chosen == d.heldout_rtn == d.errors["rtn"]["heldout"]


def test_rtn_by_rule_groups_are_not_measured(refined, monkeypatch):
    """Without keep_hessians, the FP8 down_proj (RTN by rule) gets no Hessian and no pass of its own:
    the same bits as the measured walk, no errors, and fewer counted FLOPs."""
    model, plan, measured, _ = refined
    fit, held = _windows()
    monkeypatch.setattr(refine_module, "FLOP_SAMPLE_STRIDE", 1)  # count both layers
    lean_flops, full_flops = FlopTally(), FlopTally()
    lean = refine_model(model, plan, fit, held, config=CONFIG, count_flops_into=lean_flops)
    refine_model(model, plan, fit, held, config=CONFIG, rtn_errors=True, count_flops_into=full_flops)
    fp8 = "model.layers.1.mlp.down_proj"
    assert lean.decisions[fp8].errors == {} and lean.decisions[fp8].heldout_rtn is None
    assert fp8 not in lean.input_amax
    for name, packed in measured.packed.items():
        assert all(torch.equal(v.view(torch.uint8), lean.packed[name][k].view(torch.uint8)) for k, v in packed.items())
        if name != fp8:
            assert lean.decisions[name].errors == measured.decisions[name].errors
    by_fmt = lean.totals["by_format"]
    assert by_fmt["fp8"]["n_linears"] == 1 and by_fmt["fp8"]["n_measured"] == 0 and by_fmt["fp8"]["heldout_rtn"] == 0.0
    assert lean.totals["heldout_chosen"] == pytest.approx(
        sum(d.heldout_chosen for n, d in measured.decisions.items() if n != fp8 and n in measured.packed), rel=1e-12)
    # the down_proj Hessians of the fit and held-out tokens: 2 * in^2 per token, upper blocks only
    # (the tiny model's 128-wide input is one panel: the whole Hessian is summed), and its pass
    n_tokens = (N_FIT + N_HELD) * SEQ
    down_in = dict(model.named_modules())[fp8].in_features
    assert full_flops.flops - lean_flops.flops >= 2 * n_tokens * down_in * down_in


# ---- Gemma-4: per-layer masks and rotary tables (sliding, then full attention) ----------------------
def test_gemma4_layer1_hessian_equals_the_served_model(make_tiny_gemma4):
    model = make_tiny_gemma4()
    plan = {n: "nvfp4" for n in find_body_linears(model)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit, held = _windows(seed=3)
    seen_layers: list[int] = []

    def progress(it):
        for i in it:
            seen_layers.append(i)
            yield i

    out = refine_model(model, plan, fit[:3], held[:1], config=GPTQConfig(dampening=(0.01,)), keep_hessians=True,
                       progress=progress)
    assert seen_layers == [0, 1]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    served = copy.deepcopy(model)
    apply_fake_quant(served, plan, quantized=out.packed, input_amax=out.input_amax)
    # o_proj's input is layer 1's attention output: it depends on the full-attention mask and rotary
    # table that layer 1 (not layer 0, sliding) gets
    name = "model.language_model.layers.1.self_attn.o_proj"
    xs: list = []
    h = _hook_inputs(dict(served.named_modules())[name], xs)
    with torch.no_grad():
        for b in fit[:3]:
            served(input_ids=b, use_cache=False)
    h.remove()
    igs = NVFP4.calibrate_input_global_scale(out.input_amax[name])
    x = torch.cat([NVFP4.fake_quant_activation(x, igs).reshape(-1, x.shape[-1]) for x in xs]).double()
    group = next(g for g in out.hessians if name in g)
    assert _rel(out.hessians[group]["fit"], x.T @ x) < 1e-5


# ---- Lightning adapter --------------------------------------------------------------------------
class _Windows(torch.utils.data.Dataset):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.rows = torch.cat(batches)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


def _trainer():
    import lightning

    return lightning.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_lightning_predict_equals_direct_call(refined):
    from pq_lightning.refiner_module import GPTQRefiner

    model, plan, out, _ = refined
    fit, held = _windows()
    loaders = [torch.utils.data.DataLoader(_Windows(b), batch_size=BATCH) for b in (fit, held)]
    refiner = GPTQRefiner(model, plan, CONFIG, rtn_errors=True)  # the fixture kept Hessians: every group measured
    _trainer().predict(refiner, dataloaders=loaders, return_predictions=False)
    got = refiner.output
    assert got.input_amax == out.input_amax
    assert {n: d.method for n, d in got.decisions.items()} == {n: d.method for n, d in out.decisions.items()}
    for name, packed in out.packed.items():
        for k, v in packed.items():
            assert torch.equal(got.packed[name][k].view(torch.uint8), v.view(torch.uint8)), (name, k)


def test_lightning_single_loader_holds_out_every_nth_batch(refined):
    from pq_lightning.refiner_module import GPTQRefiner

    model, plan, _, _ = refined
    fit, held = _windows()
    batches = fit + held  # 8 batches: with heldout_every=4, batches 3 and 7 are held out
    refiner = GPTQRefiner(model, plan, gptq=False, heldout_every=4)
    _trainer().validate(refiner, dataloaders=torch.utils.data.DataLoader(_Windows(batches), batch_size=BATCH))
    direct = refine_model(model, plan, [b for i, b in enumerate(batches) if i % 4 != 3],
                          [batches[3], batches[7]], gptq=False)
    assert refiner.output.input_amax == direct.input_amax
    assert refiner.output.totals == direct.totals


# ---- two gloo processes -------------------------------------------------------------------------
def _gloo_worker(rank: int, world: int, port: int, out_path: str) -> None:
    from conftest import gloo_group

    with gloo_group(rank, world, port):
        model = _llama()
        fit, held = _windows()
        out = refine_model(model, _plan(model), fit[rank::world], held[rank::world], config=CONFIG, keep_hessians=True)
        torch.save({"packed": out.packed, "amax": out.input_amax, "hessians": out.hessians,
                    "decisions": {n: (d.method, d.heldout_chosen) for n, d in out.decisions.items()}},
                   f"{out_path}.{rank}")


@pytest.mark.distributed
def test_two_gloo_processes_equal_one(refined, tmp_path):
    import torch.multiprocessing as mp

    _, _, out, _ = refined
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "rank")
    mp.spawn(_gloo_worker, args=(2, port, path), nprocs=2, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]
    for got in ranks:
        assert got["amax"] == out.input_amax
        for g, h in out.hessians.items():
            assert got["hessians"][g]["n_fit"] == h["n_fit"] and got["hessians"][g]["n_heldout"] == h["n_heldout"]
            assert _rel(got["hessians"][g]["fit"], h["fit"]) < 1e-6
            assert _rel(got["hessians"][g]["heldout"], h["heldout"]) < 1e-6
        for name, packed in out.packed.items():
            for k, v in packed.items():
                assert torch.equal(got["packed"][name][k].view(torch.uint8), v.view(torch.uint8)), (name, k)
            # decided by one rank (its owner), broadcast to the other: the same record everywhere
            method, heldout_chosen = got["decisions"][name]
            assert method == out.decisions[name].method, name
            assert heldout_chosen == pytest.approx(out.decisions[name].heldout_chosen, rel=1e-5), name


def test_decisions_are_balanced_over_ranks_by_gptq_cost():
    from pq_lightning.refine import _Owners

    owners = _Owners(2)
    # q (64x64), k and v (16x64): costs 64·64² + 64³ = 524288 and 16·64² + 64³ = 327680
    got = owners.assign({"q": (64, 64), "k": (16, 64), "v": (16, 64)})
    assert got == {"q": 0, "k": 1, "v": 1}
    assert owners.load == [524288.0, 655360.0]
    # the next group starts from those loads: the lighter rank 0 takes the first (largest) Linear
    assert owners.assign({"o": (64, 64)}) == {"o": 0}
    assert owners.load == [1048576.0, 655360.0]


def test_fp8_gptq_is_gated_and_bf16_models_work():
    model = _llama().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = {n: "fp8" for n in find_body_linears(model)}
    fit, held = _windows(seed=5)
    out = refine_model(model, plan, fit[:3], held[:1], config=GPTQConfig(dampening=(0.01,)), fp8_gptq=True,
                       keep_hessians=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    linears = dict(model.named_modules())
    fp8 = get_format("fp8")
    for name, d in out.decisions.items():
        assert set(d.errors) == {"rtn", "gptq@0.01"} | ({"refit"} if d.refit else set())
        assert d.refit == (d.method == "gptq") and d.heldout_chosen <= d.heldout_rtn
        h = next(v for g, v in out.hessians.items() if name in g)
        W = linears[name].weight.detach().float()
        err = output_error(W, fp8.unpack(out.packed[name]), h["heldout"] / h["n_heldout"])
        assert err == pytest.approx(d.errors["refit" if d.refit else d.method if d.damp is None else
                                             f"{d.method}@{d.damp:g}"]["heldout"], rel=1e-12)
        if d.refit:  # FP8 GPTQ refitted on every calibration token
            H_all = (h["fit"] + h["heldout"]) / (h["n_fit"] + h["n_heldout"])
            want = fp8.unpack(gptq_fp8(W, H_all, damp=d.damp, act_order=True))
            assert torch.equal(fp8.unpack(out.packed[name]), want), name
    assert sum(d.method == "gptq" for d in out.decisions.values()) >= 1


def test_kept_inputs_give_the_same_hessians_and_decisions_as_a_second_pass(refined):
    """Building the Hessians from the inputs the amax pass kept == running the group a second time."""
    model, plan, out, _ = refined
    fit, held = _windows()
    again = refine_model(model, plan, fit, held, config=CONFIG, keep_hessians=True, max_kept_input_bytes=0)
    assert again.hessians.keys() == out.hessians.keys()
    for group, h in out.hessians.items():
        assert torch.equal(again.hessians[group]["fit"], h["fit"]) and torch.equal(again.hessians[group]["heldout"], h["heldout"])
        assert again.hessians[group]["n_fit"] == h["n_fit"] > 0
    assert again.input_amax == out.input_amax
    for name, tensors in out.packed.items():
        for key, t in tensors.items():
            assert torch.equal(again.packed[name][key].view(torch.uint8), t.view(torch.uint8)), (name, key)


@pytest.mark.parametrize("n", [64, 192, 400])
def test_hessian_upper_panels_equal_the_full_gram(n):
    """The refiner sums only the panel blocks on and above the diagonal, then mirrors them: the
    result equals xᵀx summed batch by batch (fp64 reference), and is exactly symmetric."""
    from pq_lightning.refine import _add_gram_upper_, _mirror_upper_

    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(37, n, generator=g) * torch.linspace(0.1, 3, n) for _ in range(3)]
    H = torch.zeros(n, n)
    for x in xs:
        _add_gram_upper_(H, x)
    _mirror_upper_(H)
    ref = sum(x.double().T @ x.double() for x in xs)
    assert torch.equal(H, H.T)
    assert (H.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_complete_blocks_are_replayed_bit_for_bit(refined, monkeypatch):
    """Once o_proj is decided, later passes of the layer replay the attention block's recorded
    outputs instead of computing them: the same bits, errors and amax as computing them every time,
    for fewer FLOPs (three passes of layer 0 skip q/k/v, attention and o_proj)."""
    model, plan, _, _ = refined
    fit, held = _windows()
    monkeypatch.setattr(refine_module, "FLOP_SAMPLE_STRIDE", 1)
    replayed_flops, computed_flops = FlopTally(), FlopTally()
    replayed = refine_model(model, plan, fit, held, config=CONFIG, count_flops_into=replayed_flops)
    monkeypatch.setattr(refine_module._LayerStep, "_complete_blocks", lambda self: [])
    computed = refine_model(model, plan, fit, held, config=CONFIG, count_flops_into=computed_flops)
    assert replayed.input_amax == computed.input_amax
    for name, packed in computed.packed.items():
        assert all(torch.equal(v.view(torch.uint8), replayed.packed[name][k].view(torch.uint8)) for k, v in packed.items())
        assert replayed.decisions[name].errors == computed.decisions[name].errors
    attn = dict(model.named_modules())["model.layers.0.self_attn"]
    hidden = attn.q_proj.in_features
    n_tokens = (N_FIT + N_HELD) * SEQ
    # at least q_proj and o_proj (hidden x hidden each) skipped in layer 0's gate/up, down and output passes
    assert computed_flops.flops - replayed_flops.flops >= 3 * 2 * 2 * n_tokens * hidden * hidden


def _same_bits(a, b) -> None:
    assert a.input_amax == b.input_amax and a.decisions == b.decisions
    for name, packed in b.packed.items():
        assert all(torch.equal(v.view(torch.uint8), a.packed[name][k].view(torch.uint8)) for k, v in packed.items())


def test_block_ended_by_a_decided_linear_is_computed_from_its_kept_input(refined, monkeypatch):
    """Layer 0's down_proj (NVFP4) ends its MLP and its inputs were kept for its Hessians: the output
    pass computes the MLP as down_proj(kept input) and skips gate, up and the activation, with the
    same bits as running the MLP."""
    model, plan, _, _ = refined
    fit, held = _windows()
    monkeypatch.setattr(refine_module, "FLOP_SAMPLE_STRIDE", 1)
    tail_flops, whole_flops = FlopTally(), FlopTally()
    tail = refine_model(model, plan, fit, held, config=CONFIG, count_flops_into=tail_flops)
    with monkeypatch.context() as m:
        m.setattr(refine_module._LayerStep, "block_ended_by", lambda self, group: None)
        whole = refine_model(model, plan, fit, held, config=CONFIG, count_flops_into=whole_flops)
    _same_bits(tail, whole)
    mlp = dict(model.named_modules())["model.layers.0.mlp"]
    n_tokens = (N_FIT + N_HELD) * SEQ
    gate_up = 2 * 2 * n_tokens * mlp.gate_proj.in_features * mlp.gate_proj.out_features
    # layer 1's down_proj is FP8 (no kept input) and layer 1 has no output pass: only layer 0 saves
    # (its attention, ended by o_proj, is also computed from o_proj's kept input in the gate/up pass)
    assert whole_flops.flops - tail_flops.flops >= gate_up


def test_block_that_does_more_than_its_last_linear_runs_whole(refined, monkeypatch):
    """An MLP whose output is not down_proj's own tensor fails the first-window check: it runs whole
    on every window (same bits and FLOPs as without tail replays), and the model comes back as it was."""
    model, plan, _, _ = refined
    fit, held = _windows()
    mlp = dict(model.named_modules())["model.layers.0.mlp"]
    wrapper = lambda x: type(mlp).forward(mlp, x) * 1.0  # noqa: E731
    monkeypatch.setattr(mlp, "forward", wrapper, raising=False)
    monkeypatch.setattr(refine_module, "FLOP_SAMPLE_STRIDE", 1)
    ended_by = refine_module._LayerStep.block_ended_by
    monkeypatch.setattr(refine_module._LayerStep, "block_ended_by",  # the MLP's tail only
                        lambda self, group: "mlp" if ended_by(self, group) == "mlp" else None)
    verdicts = []
    check = refine_module._TailReplay._check

    def spy(self, *args):
        out = check(self, *args)
        verdicts.append(self.ok)
        return out

    monkeypatch.setattr(refine_module._TailReplay, "_check", spy)
    checked_flops, whole_flops = FlopTally(), FlopTally()
    checked = refine_model(model, plan, fit, held, config=CONFIG, count_flops_into=checked_flops)
    assert verdicts == [False] and mlp.forward is wrapper
    with monkeypatch.context() as m:
        m.setattr(refine_module._LayerStep, "block_ended_by", lambda self, group: None)
        whole = refine_model(model, plan, fit, held, config=CONFIG, count_flops_into=whole_flops)
    _same_bits(checked, whole)
    assert checked_flops.flops == whole_flops.flops
