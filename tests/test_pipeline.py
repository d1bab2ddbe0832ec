"""The quantize pipeline end to end on a tiny Llama saved as a Hugging Face folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pq_lightning.cli import main
from pq_lightning.export import checkpoint_tensor_bytes
from pq_lightning.formats import get_format
from pq_lightning.pipeline import (
    CalibrationConfig,
    EvalConfig,
    RefineConfig,
    TrainerConfig,
    TuneConfig,
    quantize,
)
from pq_lightning.plan import Plan
from pq_lightning.served import load_quantized_checkpoint
from pq_lightning.smooth import SmoothConfig

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def _settings(tmp_path):
    return dict(
        dtype="float32",
        calibration=CalibrationConfig(source=str(tmp_path / "text.txt"), seqlen=32, num_samples=8, batch_size=4,
                                      holdout_fraction=0.25),
        evaluation=EvalConfig(path=str(tmp_path / "text.txt"), window=31, max_windows=4, batch_size=2),
        refine=RefineConfig(dampening=[0.01, 0.1]),
        pareto_bits=[4.5, 5.0, 6.0, 7.0, 8.0],
        trainer=TrainerConfig(accelerator="cpu"),
    )


def test_quantize_end_to_end_and_reuse(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    cfg = {
        "model": str(tiny_model_dir),
        "output_dir": str(out),
        "target_bits": 6.0,
        "dtype": "float32",
        "trainer": {"accelerator": "cpu"},
        "pareto_bits": [4.5, 5.0, 6.0, 7.0, 8.0],
        "calibration": {"source": str(tmp_path / "text.txt"), "seqlen": 32, "num_samples": 8, "batch_size": 4,
                        "holdout_fraction": 0.25},
        "evaluation": {"path": str(tmp_path / "text.txt"), "window": 31, "max_windows": 4, "batch_size": 2},
        "refine": {"dampening": [0.01, 0.1]},
        "tune": {"enabled": False},  # the norms checked below are the folds alone (tuned ones: test_norm_tune)
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    main(["quantize", "--config", str(tmp_path / "cfg.yaml")])

    report = json.loads((out / "report.json").read_text())
    for key in ("bpp_body", "formats", "predicted_dloss", "eval", "timings_s", "gptq", "versions"):
        assert key in report, key
    for key in ("kl_all", "kl_conf", "kl_top20_conf", "top1_conf", "top1_all", "n_positions"):
        assert key in report["eval"], key
    assert report["eval"]["n_positions"] == 4 * 31
    assert report["eval"]["kl_all"] > 0 and 0 <= report["eval"]["top1_all"] <= 1

    plan = Plan.load(out / "plan-6bpp.json")
    assert plan.bpp_body <= 6.0
    # the bpp computed from the files on disk equals the plan's, exactly
    assert report["bpp_body"] == plan.bpp_body
    ckpt = out / "checkpoint-6bpp"
    sizes = checkpoint_tensor_bytes(ckpt)
    body_bytes = 0
    for name, lp in plan.linears.items():
        fmt = get_format(lp.format)
        body_bytes += sum(v for k, v in sizes.items() if k.startswith(name + ".") and not k.endswith(".bias"))
        assert lp.bits == fmt.bits(_shape(name))
    assert body_bytes * 8 == plan.total_bits
    model, info = load_quantized_checkpoint(ckpt, dtype=torch.float32)
    assert {n: i.format for n, i in info.items()} == {n: f for n, f in plan.formats.items() if f != "bf16"}
    for png in ("pareto.png", "sensitivity.png", "formats-6bpp.png"):
        assert (out / png).stat().st_size > 1000
    assert "vllm serve" in (out / "report.md").read_text()
    # smoothing (on by default) folds scales into a norm only where all its consumers took NVFP4 and the
    # search found a fold that pays; the checkpoint carries those norms (a power of two per channel off
    # the source's) and leaves every other norm as it was
    from safetensors.torch import load_file

    src = load_file(next(tiny_model_dir.glob("*.safetensors")))
    got = load_file(ckpt / "model-00001-of-00001.safetensors")
    alphas = report["smooth"]["alphas"]
    assert set(alphas.values()) <= {0.25, 0.5, 0.75} and len(alphas) == report["smooth"]["folded"]
    norms = 0
    for i in range(2):
        for norm, consumers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            name = f"model.layers.{i}.{norm}"
            ratio = src[f"{name}.weight"].float() / got[f"{name}.weight"].float()
            if name in alphas:
                assert all(plan.formats[f"model.layers.{i}.{c}"] == "nvfp4" for c in consumers), name
                assert torch.equal(torch.exp2(torch.log2(ratio).round()), ratio) and not torch.all(ratio == 1), name
                norms += 1
            else:
                assert torch.all(ratio == 1), name
    assert norms >= 1
    # the sweep's predicted Δloss falls as the budget grows; 4.5 is read as the all-NVFP4 build
    pareto = report["pareto"]
    assert [p["target_bits"] for p in pareto] == [4.5, 5.0, 6.0, 7.0, 8.0]
    assert all(a["predicted_dloss"] >= b["predicted_dloss"] for a, b in zip(pareto, pareto[1:], strict=False))
    assert pareto[0]["formats"] == {"nvfp4": 14}

    # second run, two other budgets: the probe is reused, not re-measured
    work = out / "work"
    sens_files = sorted(work.glob("sensitivity-*.safetensors"))
    assert len(sens_files) == 1
    mtime = sens_files[0].stat().st_mtime_ns
    report2 = quantize(model=str(tiny_model_dir), output_dir=str(out), target_bits=[5.0, 8.0], **_settings(tmp_path))
    assert sorted(work.glob("sensitivity-*.safetensors")) == sens_files
    assert sens_files[0].stat().st_mtime_ns == mtime
    for label in ("5bpp", "8bpp"):  # norm tuning is on by default
        tune = report2["targets"][label]["tune"]
        assert tune["norms"] == 5 and tune["kept"] == (tune["heldout_kl_after"] < tune["heldout_kl_before"])
    kl5 = report2["targets"]["5bpp"]["eval"]["kl_all"]
    kl8 = report2["targets"]["8bpp"]["eval"]["kl_all"]
    assert report2["targets"]["8bpp"]["predicted_dloss"] <= report2["targets"]["5bpp"]["predicted_dloss"]
    assert kl8 < kl5

    # a third run with the same budget reuses refine, export and evaluation too
    before = (out / "checkpoint-8bpp" / "pq_manifest.json").stat().st_mtime_ns
    report3 = quantize(model=str(tiny_model_dir), output_dir=str(out), target_bits=8.0, **_settings(tmp_path))
    assert (out / "checkpoint-8bpp" / "pq_manifest.json").stat().st_mtime_ns == before
    assert report3["eval"] == report2["targets"]["8bpp"]["eval"]


def test_reprice_plans_every_budget_on_what_refine_delivered(tmp_path, tiny_model_dir):
    """``refine.reprice``: the all-NVFP4 plan is refined once (the 4.5-bpp budget reads that walk from
    the cache), each NVFP4 Δloss is the probe's times the Linear's refine gain, and the 6.0-bpp plan is
    the allocator's optimum on those prices (no worse under them than the plan priced on RTN)."""
    from pq_lightning.config import TuneConfig
    from pq_lightning.errors import UserError
    from pq_lightning.refine import RefineOutput

    settings = {**_settings(tmp_path), "evaluation": EvalConfig(enabled=False), "tune": TuneConfig(enabled=False)}
    runs = {}
    for tag, reprice in (("rtn", False), ("refined", True)):
        out = tmp_path / tag
        quantize(model=str(tiny_model_dir), output_dir=str(out), target_bits=[4.5, 6.0],
                 **{**settings, "refine": RefineConfig(dampening=[0.01, 0.1], reprice=reprice)})
        runs[tag] = {b: Plan.load(out / f"plan-{b}bpp.json") for b in ("4.5", "6")}
    refines = sorted((tmp_path / "refined" / "work").glob("refine-*.safetensors"))
    assert len(refines) == 2  # the pricing walk is the 4.5-bpp budget's
    floor = next(o for o in map(RefineOutput.load, refines) if {d.format for d in o.decisions.values()} == {"nvfp4"})
    gains = {n: d.refine_gain for n, d in floor.decisions.items()}
    assert all(0 < g for g in gains.values()) and min(gains.values()) < 1
    rtn, refined = runs["rtn"], runs["refined"]
    for n, lp in refined["4.5"].linears.items():
        assert lp.predicted_dloss == pytest.approx(rtn["4.5"].linears[n].predicted_dloss * gains[n], rel=1e-12), n

    def repriced(n: str, fmt: str) -> float:  # the refined run's price of (Linear, format) from the RTN run's
        if fmt == "nvfp4":
            return rtn["4.5"].linears[n].predicted_dloss * gains[n]
        return next(p.linears[n].predicted_dloss for p in (rtn["6"], refined["6"]) if p.linears[n].format == fmt)

    assert refined["6"].total_bits <= refined["6"].target["max_bits"]
    assert refined["6"].predicted_dloss <= sum(repriced(n, lp.format) for n, lp in rtn["6"].linears.items()) + 1e-15
    with pytest.raises(UserError, match="estimator output"):
        quantize(model=str(tiny_model_dir), output_dir=str(tmp_path / "x"), estimator="trace",
                 **{**settings, "refine": RefineConfig(reprice=True)})
    with pytest.raises(ValueError, match="gptq"):
        RefineConfig(reprice=True, gptq=False)


def _shape(name: str) -> tuple[int, int]:
    if name.endswith(("q_proj", "o_proj")):
        return (64, 64)
    if name.endswith(("k_proj", "v_proj")):
        return (32, 64)
    if name.endswith(("gate_proj", "up_proj")):
        return (128, 64)
    return (64, 128)


def test_size_budget_fits_the_files(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from pq_lightning.models import find_body_linears
    from pq_lightning.plan import non_body_bytes

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    body = find_body_linears(model)
    params = sum(m.weight.numel() for m in body.values())
    size_gb = (non_body_bytes(model, list(body)) + params * 6 // 8) / 1e9  # the rest in fp32 + body at 6 bpp
    out = tmp_path / "out"
    report = quantize(model=str(tiny_model_dir), output_dir=str(out), target_size_gb=size_gb,
                      **{**_settings(tmp_path), "evaluation": EvalConfig(enabled=False)})
    (ckpt,) = out.glob("checkpoint-*GB")
    total = sum(checkpoint_tensor_bytes(ckpt).values())
    assert total <= size_gb * 1e9
    (plan_path,) = out.glob("plan-*GB.json")
    plan = Plan.load(plan_path)
    assert plan.checkpoint_bytes == total
    assert 5.5 < plan.bpp_body <= 6.0
    assert "eval" not in report


def test_infeasible_budget_says_the_smallest(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="smallest feasible budget"):
        quantize(model=str(tiny_model_dir), output_dir=str(tmp_path / "o"), target_bits=3.0,
                 **{**_settings(tmp_path), "evaluation": EvalConfig(enabled=False)})
    assert not any((tmp_path / "o").glob("checkpoint-*"))


def test_shapes_helper_matches_model(make_tiny_llama):
    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            assert tuple(mod.weight.shape) == _shape(name)


def test_output_estimator_measures_the_output_error(tmp_path, tiny_model_dir):
    from pq_lightning.sensitivity import load_sensitivity

    out = tmp_path / "out"
    quantize(model=str(tiny_model_dir), output_dir=str(out), target_bits=6.0, estimator="output",
             **{**_settings(tmp_path), "evaluation": EvalConfig(enabled=False), "refine": RefineConfig(gptq=False)})
    plan = Plan.load(out / "plan-6bpp.json")
    assert plan.estimator == "output"
    (sens_path,) = (out / "work").glob("sensitivity-*.safetensors")
    sens = load_sensitivity(sens_path)
    for name, lp in plan.linears.items():
        if lp.format != "bf16":
            assert lp.predicted_dloss == sens.linears[name].output_error[lp.format]


def test_streamed_layers_under_a_memory_cap_give_the_same_build(tmp_path, tiny_model_dir):
    """``memory_cap_gb`` smaller than the model: the same plan, packed tensors and evaluation."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cap_gb = 0.7 * sum(p.numel() * 4 for p in model.parameters()) / 2**30
    # norm tuning needs the whole model resident (a streamed build skips it): off in both builds here
    settings = {**_settings(tmp_path), "pareto_bits": [6.0], "tune": TuneConfig(enabled=False)}
    reports = {}
    # smoothing needs the layers in memory (streamed ones are re-read from disk): off in both builds here
    for tag, extra in (("whole", {}), ("streamed", {"memory_cap_gb": cap_gb})):
        reports[tag] = quantize(model=str(tiny_model_dir), output_dir=str(tmp_path / tag), target_bits=6.0,
                                smooth=SmoothConfig(enabled=False), **settings, **extra)
    a, b = reports["whole"], reports["streamed"]
    assert a["formats"] == b["formats"] and a["predicted_dloss"] == b["predicted_dloss"]
    assert a["bpp_body"] == b["bpp_body"] and a["eval"] == b["eval"]
    A = load_file(tmp_path / "whole" / "checkpoint-6bpp" / "model-00001-of-00001.safetensors")
    B = load_file(tmp_path / "streamed" / "checkpoint-6bpp" / "model-00001-of-00001.safetensors")
    assert A.keys() == B.keys()
    u8 = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    assert all(torch.equal(u8(A[k]), u8(B[k])) for k in A)
    with pytest.raises(ValueError, match="GGUF"):
        quantize(model="model.gguf", output_dir=str(tmp_path / "x"), memory_cap_gb=1.0, **settings)


def test_excluding_one_fused_sibling_keeps_its_set_bf16_before_the_probe(tmp_path, tiny_model_dir, capsys):
    """vLLM runs q/k/v as one matmul with one scheme: with k_proj excluded, q_proj and v_proj stay BF16
    too (said before the probe, which then never measures them), and the checkpoint is servable."""
    from pq_lightning.sensitivity import load_sensitivity

    out = tmp_path / "out"
    quantize(model=str(tiny_model_dir), output_dir=str(out), target_bits=6.0, exclude=[r"layers\.0\.self_attn\.k_proj"],
             **{**_settings(tmp_path), "evaluation": EvalConfig(enabled=False), "refine": RefineConfig(gptq=False)})
    err = capsys.readouterr().err
    assert "self_attn.q_proj, model.layers.0.self_attn.v_proj stay BF16 with model.layers.0.self_attn.k_proj" in " ".join(err.split())
    plan = Plan.load(out / "plan-6bpp.json")
    qkv0 = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert not set(qkv0) & set(plan.linears) and len(plan.linears) == 14 - 3
    (sens_path,) = (out / "work").glob("sensitivity-*.safetensors")
    assert not set(qkv0) & set(load_sensitivity(sens_path).linears)
    qc = json.loads((out / "checkpoint-6bpp" / "config.json").read_text())["quantization_config"]
    assert set(qkv0) <= set(qc["ignore"])
    # each config group holds whole fused sets only
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    for i in range(2):
        for sibs in (("q", "k", "v"), ("gate", "up")):
            names = {f"model.layers.{i}.{'self_attn' if len(sibs) == 3 else 'mlp'}.{p}_proj" for p in sibs}
            groups = [g for g in qc["config_groups"].values() if names & set(g["targets"])]
            assert len(groups) <= 1 and (not groups or names <= set(groups[0]["targets"])), names
    assert targets


def test_shared_walk_sweep_gives_each_budget_its_own_build(tmp_path, tiny_model_dir):
    """Two budgets in one shared walk: each checkpoint is the one a run of that budget alone writes (a budget's
    decisions depend on its own plan and folds only), and its smoothed norms are folded in."""
    from safetensors.torch import load_file

    settings = _settings(tmp_path)
    settings["refine"] = RefineConfig(dampening=[0.01, 0.1], walk="shared")
    settings["tune"] = TuneConfig(enabled=False)  # tuned norms would move more norms than the folds
    both = quantize(model=str(tiny_model_dir), output_dir=str(tmp_path / "both"), target_bits=[4.5, 6.0], **settings)
    one = quantize(model=str(tiny_model_dir), output_dir=str(tmp_path / "one"), target_bits=6.0, **settings)
    assert both["targets"]["6bpp"]["eval"] == one["eval"]
    name = "model-00001-of-00001.safetensors"
    a, b = (load_file(tmp_path / d / "checkpoint-6bpp" / name) for d in ("both", "one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    src = load_file(next(tiny_model_dir.glob("*.safetensors")))
    folded = [k for k in src if k.endswith("layernorm.weight") and not torch.equal(src[k], a[k])]
    alphas = both["targets"]["6bpp"]["smooth"]["alphas"]  # norms, and the Linears whose rows take the fold
    assert len(folded) == len(alphas) - sum(p.endswith(("mlp.up_proj", "self_attn.v_proj")) for p in alphas)
    assert both["targets"]["4.5bpp"]["gptq"]["walk"] == "shared"
    with pytest.raises(ValueError, match="'sequential' or 'shared'"):
        RefineConfig(walk="parallel")
