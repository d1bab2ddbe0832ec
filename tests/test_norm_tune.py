"""Norm tuning: the gain parametrization, the chunked KL against the full-logit KL, the served student, the
straight-through gradient, the Lightning loop and the pipeline stage (checkpoint norms, cache)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pq_lightning.config import TuneConfig
from pq_lightning.formats import get_format
from pq_lightning.formats.e2m1 import e2m1_decode, unpack_codes
from pq_lightning.norm_tune import (
    CodeShift,
    GainScale,
    attach_code_shifts,
    attach_gains,
    kl_to_reference,
    norms_feeding_linears,
    served_student,
    swapped_weights,
    tunable_norms,
    tuned_codes,
    tuned_weights,
)
from pq_lightning.served import ServedLinear

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def _plan(model, fmt="nvfp4"):
    return {n: fmt for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _input_amax(model, ids):
    """Per planned Linear, the amax of its input over ``ids`` (what refine calibrates)."""
    amax, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in n:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, n=n: amax.__setitem__(n, max(amax.get(n, 0.0), float(args[0].abs().amax()))))
            )
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return amax


def _ids(n=2, t=24, seed=0):
    return torch.randint(4, 120, (n, t), generator=torch.Generator().manual_seed(seed))


def test_gain_scale_is_the_weight_at_zero_and_a_relative_step_after(make_tiny_gemma3):
    w = torch.tensor([0.5, -0.25, 2.0])
    for offset in (0.0, 1.0):
        g = GainScale(3, offset)
        assert torch.equal(g(w), w)
        with torch.no_grad():
            g.theta.copy_(torch.tensor([0.1, -0.2, 0.0]))
        want = (offset + w) * torch.exp(torch.tensor([0.1, -0.2, 0.0])) - offset  # gain c + w scaled by exp(θ)
        torch.testing.assert_close(g(w), want, rtol=0, atol=1e-7)
    # the offset is read from the norm: Gemma-3's (1 + w), Llama's w
    gemma = make_tiny_gemma3()
    norms = tunable_norms(gemma, "model.layers", "model.norm")
    assert set(norms.values()) == {1.0} and "model.norm" in norms
    assert sum(k.startswith("model.layers.0.") for k in norms) >= 4  # input, post-attention, pre/post MLP, q/k norms


def test_tunable_norms_of_llama_are_the_layer_norms_and_the_final_one(tiny_llama):
    norms = tunable_norms(tiny_llama, "model.layers", "model.norm")
    want = {f"model.layers.{i}.{k}" for i in range(2) for k in ("input_layernorm", "post_attention_layernorm")}
    assert norms == dict.fromkeys(want | {"model.norm"}, 0.0)


def test_norms_feeding_linears_are_the_linear_inputs(tiny_llama, make_tiny_gemma3):
    """By hand from the two architectures: Llama's norms all feed a Linear (the final one the head, through
    the head's slice); Gemma-3's post-attention / post-feed-forward norms feed the residual, its q/k norms
    the attention scores."""
    llama = tunable_norms(tiny_llama, "model.layers", "model.norm")
    assert norms_feeding_linears(tiny_llama, llama, _ids(1, 6)) == set(llama)
    gemma = make_tiny_gemma3()
    norms = tunable_norms(gemma, "model.layers", "model.norm")
    want = {f"model.layers.{i}.{k}" for i in range(2) for k in ("input_layernorm", "pre_feedforward_layernorm")}
    assert norms_feeding_linears(gemma, norms, _ids(1, 6)) == want | {"model.norm"}
    assert len(norms) == 13  # 6 per layer and the final one


def test_chunked_kl_equals_the_full_logit_kl_and_its_gradient(tiny_llama):
    """The chunked loss (split head, grads taken chunk by chunk) against KL computed on the full logits."""
    ids = _ids()
    student = served_student(tiny_llama, _plan(tiny_llama), {}, _input_amax(tiny_llama, ids), ())
    gains = attach_gains(student, tunable_norms(student, "model.layers", "model.norm"))
    with torch.no_grad():
        for g in gains.values():
            g.theta.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))

    def grads(loss):
        return [p.detach().clone() for p in torch.autograd.grad(loss, [g.theta for g in gains.values()])]

    with torch.no_grad():
        log_t = F.log_softmax(tiny_llama(input_ids=ids).logits.float(), -1)
    log_s = F.log_softmax(student(input_ids=ids).logits.float(), -1)
    plain = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    want = grads(plain)
    chunked = kl_to_reference(tiny_llama, student, ids, chunk=5)  # 48 positions: ten chunks
    got = grads(chunked)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert float(plain.detach()) > 0


def test_served_student_shares_the_model_and_runs_as_served(tiny_llama):
    ids = _ids()
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    amax = _input_amax(tiny_llama, ids)
    student = served_student(tiny_llama, _plan(tiny_llama), {}, amax, ())
    assert student.model.embed_tokens.weight is tiny_llama.model.embed_tokens.weight  # no copy
    assert isinstance(student.model.layers[0].self_attn.q_proj, ServedLinear)
    assert type(tiny_llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before[k]), k
    # one layer's q_proj output: the format's RTN weight and activation fake-quant, by hand
    fmt = get_format("nvfp4")
    lin = tiny_llama.model.layers[1].self_attn.q_proj
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(2))
    igs = fmt.calibrate_input_global_scale(amax["model.layers.1.self_attn.q_proj"])
    want = F.linear(fmt.fake_quant_activation(x, igs), fmt.fake_quant(lin.weight.float()))
    torch.testing.assert_close(student.model.layers[1].self_attn.q_proj(x), want, rtol=1e-6, atol=1e-6)


def test_served_linear_passes_gradients_straight_through_the_activation_rounding():
    fmt = get_format("nvfp4")
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    lin = ServedLinear(fmt.fake_quant(w), None, fmt, fmt.calibrate_input_global_scale(3.0))
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = lin(x)
    with torch.no_grad():
        assert torch.equal(y, lin(x))  # same value with and without the gradient path
    g = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    (x_grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(x_grad, g @ lin.weight, rtol=0, atol=1e-6)  # d(x̂ Wᵀ)/dx with dx̂/dx = 1


def test_code_shift_starts_at_the_served_weight_and_moves_codes_past_the_midpoint():
    fmt = get_format("nvfp4")
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    tensors = fmt.pack(w)
    shift = CodeShift(fmt.code_grid(tensors))
    served = fmt.unpack(tensors)
    assert torch.equal(shift(served), served)
    # the gradient of the values is the weight's times each group's scale (rounding passed straight through)
    g = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((shift(served) * g).sum(), shift.values)
    eff = tensors["weight_scale"].float() / tensors["weight_global_scale"]
    torch.testing.assert_close(grad, g * eff.repeat_interleave(16, dim=1), rtol=0, atol=0)
    # a value of 1.0 stays below the midpoint to 1.5 (1.25 ties to 1.0) and moves past it
    with torch.no_grad():
        shift.values[0, 0] = 1.0 + 0.25
        shift.values[0, 1] = 1.0 + 0.26
        shift.values[0, 2] = -4.0 - 1.01
    out = shift(served)
    assert [float(v) for v in shift.rounded()[0, :3]] == [1.0, 1.5, -6.0]
    assert torch.equal(out[0, :3], shift.rounded()[0, :3] * eff[0, 0])
    moved, n = tuned_codes({"lin": shift}, {"lin": tensors}, {"lin": fmt})
    assert n == int((shift.rounded() != fmt.code_grid(tensors).values).sum()) and set(moved) == {"lin"}
    assert torch.equal(fmt.unpack(moved["lin"]), out.detach())
    assert tuned_codes({"lin": CodeShift(fmt.code_grid(tensors))}, {"lin": tensors}, {"lin": fmt}) == ({}, 0)


def test_swapped_weights_restores_even_on_error(tiny_llama):
    name = "model.norm.weight"
    old = tiny_llama.model.norm.weight.detach().clone()
    with pytest.raises(RuntimeError), swapped_weights(tiny_llama, {name: old * 3}):
        assert torch.equal(tiny_llama.model.norm.weight, old * 3)
        raise RuntimeError
    assert torch.equal(tiny_llama.model.norm.weight, old)
    with pytest.raises(KeyError, match="no parameter"), swapped_weights(tiny_llama, {"model.nope.weight": old}):
        pass


def test_norm_tuner_lowers_the_kl_on_its_windows(make_tiny_llama):
    """Trainer.fit over fixed windows: the KL measured on them by a plain forward falls; θ = 0 is the identity."""
    from conftest import quiet_trainer
    from torch.utils.data import DataLoader

    from pq_lightning.data import WindowDataset
    from pq_lightning.norm_tuner_module import NormTuner

    tiny_llama = make_tiny_llama(hidden_size=64, intermediate_size=128, initializer_range=0.2)
    ids = _ids(8, 24)
    student = served_student(tiny_llama, _plan(tiny_llama), {}, _input_amax(tiny_llama, ids), ())
    norms = tunable_norms(tiny_llama, "model.layers", "model.norm")
    tuner = NormTuner(tiny_llama, student, norms, lr=3e-2)
    untouched = tuned_weights(student, {k: None for k in norms})
    for k in norms:
        assert torch.equal(untouched[f"{k}.weight"], tiny_llama.get_submodule(k).weight)
    loader = DataLoader(WindowDataset(ids), batch_size=4)
    trainer = quiet_trainer(max_epochs=8)
    trainer.validate(tuner, dataloaders=loader, verbose=False)
    before = tuner.heldout_kl
    with torch.no_grad():
        plain_before = float(kl_to_reference(tiny_llama, student, ids))
    trainer.fit(tuner, train_dataloaders=loader)
    trainer.validate(tuner, dataloaders=loader, verbose=False)
    with torch.no_grad():
        plain_after = float(kl_to_reference(tiny_llama, student, ids))
    assert before == pytest.approx(plain_before, rel=1e-6) and tuner.heldout_kl == pytest.approx(plain_after, rel=1e-6)
    assert plain_after < 0.9 * plain_before
    weights = tuner.weights()
    assert set(weights) == {f"{k}.weight" for k in norms}
    assert all(not torch.equal(weights[k], tiny_llama.get_parameter(k)) for k in weights)


def test_code_tuning_lowers_the_kl_further_and_keeps_the_scales(make_tiny_llama):
    """Norms and NVFP4 codes tuned together (scales held) fit the windows better than the norms alone."""
    from conftest import quiet_trainer
    from torch.utils.data import DataLoader

    from pq_lightning.data import WindowDataset
    from pq_lightning.norm_tuner_module import NormTuner

    tiny_llama = make_tiny_llama(hidden_size=64, intermediate_size=128, initializer_range=0.2)
    ids = _ids(8, 24)
    plan, amax = _plan(tiny_llama), _input_amax(tiny_llama, ids)
    fmt = get_format("nvfp4")
    packed = {n: fmt.pack(tiny_llama.get_submodule(n).weight.detach()) for n in plan}
    formats = {n: fmt for n in plan}
    results = {}
    for codes_lr in (0.0, 0.1):
        student = served_student(tiny_llama, plan, packed, amax, ())
        shifts = attach_code_shifts(student, packed, formats) if codes_lr else {}
        tuner = NormTuner(tiny_llama, student, tunable_norms(tiny_llama, "model.layers", "model.norm"), lr=3e-2,
                          codes=shifts, codes_lr=codes_lr)
        quiet_trainer(max_epochs=8).fit(tuner, train_dataloaders=DataLoader(WindowDataset(ids), batch_size=4))
        with torch.no_grad():
            results[codes_lr] = float(kl_to_reference(tiny_llama, student, ids))
        if codes_lr:
            moved, n = tuned_codes(shifts, packed, formats)
            assert n > 0
            for name, tensors in moved.items():
                assert torch.equal(tensors["weight_scale"].float(), packed[name]["weight_scale"].float())
                torch.testing.assert_close(fmt.unpack(tensors), student.get_submodule(name).weight, rtol=0, atol=0)
    assert results[0.1] < 0.9 * results[0.0]
    with pytest.raises(ValueError, match="codes_lr"):
        NormTuner(tiny_llama, student, {"model.norm": 0.0}, lr=1e-2, codes=shifts, codes_lr=0.0)


def test_tune_config_refuses_bad_values():
    for bad in (dict(epochs=0), dict(lr=0.0), dict(lr=float("nan")), dict(keep="sometimes"), dict(batch_size=0),
                dict(norms="some"), dict(codes_lr=-1.0), dict(codes_lr=float("inf"))):
        with pytest.raises(ValueError, match="tune"):
            TuneConfig(**bad)


def test_quantize_writes_the_kept_norms_and_reuses_the_tune(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from pq_lightning.pipeline import CalibrationConfig, EvalConfig, SmoothConfig, TrainerConfig, quantize

    settings = dict(
        model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), target_bits=4.5, dtype="float32",
        calibration=CalibrationConfig(source=str(tmp_path / "text.txt"), seqlen=32, num_samples=8, batch_size=4,
                                      holdout_fraction=0.25),
        evaluation=EvalConfig(path=str(tmp_path / "text.txt"), window=31, max_windows=4, batch_size=2),
        trainer=TrainerConfig(accelerator="cpu"), smooth=SmoothConfig(enabled=False),
        tune=TuneConfig(enabled=True, epochs=2, lr=2e-2, keep="always"),
    )
    report = quantize(**settings)
    tune = report["tune"]
    assert tune["kept"] and tune["norms"] == 5
    work = tmp_path / "out" / "work"
    (cache,) = work.glob("tune-*.safetensors")
    tuned = load_file(cache)
    got = load_file(tmp_path / "out" / "checkpoint-4.5bpp" / "model-00001-of-00001.safetensors")
    src = load_file(next(tiny_model_dir.glob("*.safetensors")))
    for k, v in tuned.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k  # the checkpoint carries the tuned norms (in BF16)
        assert not torch.equal(got[k], src[k].to(got[k].dtype)), k
    assert torch.equal(got["model.embed_tokens.weight"], src["model.embed_tokens.weight"].to(torch.bfloat16))
    # the evaluation's reference is the untouched model: its KL equals one of the checkpoint against the source
    from pq_lightning.data import eval_windows
    from pq_lightning.evaluate import evaluate_checkpoint
    from pq_lightning.models import load_causal_lm

    ref, tok = load_causal_lm(str(tiny_model_dir), dtype="float32")
    windows = eval_windows((tmp_path / "text.txt").read_text(), tok, window=31, max_windows=4)
    again = evaluate_checkpoint(ref, tmp_path / "out" / "checkpoint-4.5bpp", windows, batch_size=2)
    assert again["kl_all"] == pytest.approx(report["eval"]["kl_all"], rel=1e-6)
    mtime = cache.stat().st_mtime_ns
    assert quantize(**settings)["tune"] == tune and cache.stat().st_mtime_ns == mtime  # cached
    # keep: better, with a step so large that the held-out KL rises: the refined norms are written
    bad = quantize(**{**settings, "output_dir": str(tmp_path / "bad"), "tune": TuneConfig(enabled=True, lr=5.0, keep="better")})
    assert not bad["tune"]["kept"] and not bad["tune"]["heldout_kl_after"] < bad["tune"]["heldout_kl_before"]
    got = load_file(tmp_path / "bad" / "checkpoint-4.5bpp" / "model-00001-of-00001.safetensors")
    for k in tuned:
        assert torch.equal(got[k], src[k].to(got[k].dtype)), k


def test_quantize_writes_the_tuned_codes_with_the_refined_scales(tmp_path, tiny_model_dir):
    """With ``codes_lr`` the checkpoint's NVFP4 codes are the tune's (some moved), its scales the refiner's."""
    from safetensors.torch import load_file

    from pq_lightning.pipeline import CalibrationConfig, EvalConfig, SmoothConfig, TrainerConfig, quantize

    def run(out, tune):
        return quantize(
            model=str(tiny_model_dir), output_dir=str(tmp_path / out), target_bits=4.5, dtype="float32",
            calibration=CalibrationConfig(source=str(tmp_path / "text.txt"), seqlen=32, num_samples=8, batch_size=4,
                                          holdout_fraction=0.25),
            evaluation=EvalConfig(enabled=False), trainer=TrainerConfig(accelerator="cpu"),
            smooth=SmoothConfig(enabled=False), tune=tune)

    run("plain", TuneConfig(enabled=False))
    report = run("codes", TuneConfig(enabled=True, epochs=2, lr=2e-2, codes_lr=0.5, keep="always"))
    assert report["tune"]["codes_moved"] > 0 and report["tune"]["kept"]
    shard = "model-00001-of-00001.safetensors"
    before = load_file(tmp_path / "plain" / "checkpoint-4.5bpp" / shard)
    after = load_file(tmp_path / "codes" / "checkpoint-4.5bpp" / shard)
    (cache,) = (tmp_path / "codes" / "work").glob("tune-*.safetensors")
    tuned = load_file(cache)
    packed = [k for k in tuned if k.endswith(".weight_packed")]
    assert len(packed) == report["tune"]["linears_moved"] > 0
    moved = 0
    for k in packed:
        assert torch.equal(after[k], tuned[k]) and not torch.equal(after[k], before[k]), k
        stem = k.removesuffix("weight_packed")
        for t in ("weight_scale", "weight_global_scale", "input_global_scale"):
            assert torch.equal(after[stem + t].float(), before[stem + t].float()), stem + t
        moved += int((e2m1_decode(unpack_codes(after[k])) != e2m1_decode(unpack_codes(before[k]))).sum())  # -0 == 0
    assert moved == report["tune"]["codes_moved"]
    assert f"{moved} NVFP4 codes moved in {len(packed)} Linears" in (tmp_path / "codes" / "report.md").read_text()
