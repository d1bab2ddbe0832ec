"""QuantEvaluator: plain-loop reference, the validate CLI, plans in memory, the reference cache, DDP."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from pq_lightning.data import EvalData, WindowDataset
from pq_lightning.evaluate import (
    QuantEvaluator,
    evaluate_checkpoint,
    evaluate_models,
    load_reference_cache,
    read_plan,
)
from pq_lightning.export import export_checkpoint
from pq_lightning.metrics import reference_cache_entries
from pq_lightning.served import load_quantized_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32  # BOS + 31 tokens per window
METRIC_KEYS = ("kl_all", "kl_conf", "kl_top20_conf", "top1_conf", "top1_all", "n_positions", "n_confident")
TOPK_KEYS = ("kl_top20_conf", "top1_conf", "top1_all", "n_positions", "n_confident")


pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def _reference(make_tiny_llama):
    # a wide init gives peaked distributions: confident and unconfident positions both occur;
    # bf16-exact fp32 weights, so that the export (which stores unplanned tensors in bf16) is lossless
    # (parameters only: rounding the rotary inv_freq buffer too would change the model)
    model = make_tiny_llama(initializer_range=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model.eval()


def _plan() -> dict[str, str]:
    plan = {}
    for i, (attn, o, mlp, down) in enumerate([("nvfp4", "bf16", "fp8", "nvfp4a16"), ("nvfp4a16", "fp8", "nvfp4", "nvfp4")]):
        p = f"model.layers.{i}."
        plan.update({p + f"self_attn.{x}_proj": attn for x in "qkv"})
        plan.update({p + "self_attn.o_proj": o, p + "mlp.gate_proj": mlp, p + "mlp.up_proj": mlp})
        plan[p + "mlp.down_proj"] = down
    return plan


def _amax(plan) -> dict[str, float]:
    return {name: 1.5 + 0.25 * i for i, name in enumerate(plan)}


def _windows(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(4, 128, (n, SEQ - 1), generator=g)
    return torch.cat([torch.ones(n, 1, dtype=torch.long), body], dim=1)  # BOS = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Reference folder (model + tokenizer), an exported mixed checkpoint of the plan, the plan file."""
    from conftest import build_tiny_llama, build_tiny_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    ref = _reference(build_tiny_llama)
    ref.save_pretrained(root / "ref")
    tok = build_tiny_tokenizer()
    tok.save_pretrained(root / "ref")
    plan, amax = _plan(), _amax(_plan())
    export_checkpoint(ref, plan, root / "ckpt", input_amax=amax, tokenizer=tok)
    plan_path = root / "plan.json"
    plan_path.write_text(
        json.dumps({"linears": {n: {"format": f, "bits": 0, "predicted_dloss": 0.0, "group": n} for n, f in plan.items()},
                    "input_amax": amax})
    )
    return {"root": root, "ref": ref, "tok": tok, "plan": plan, "amax": amax, "plan_path": plan_path}


def _plain_loop(ref_model, cand_model, windows: torch.Tensor, k: int = 20) -> dict[str, float]:
    """The protocol's metrics computed directly, window by window (positions 0..n-2)."""
    kl, conf, topk, match = [], [], [], []
    with torch.no_grad():
        for w in windows:
            r = ref_model(w[None]).logits[0, :-1].float()
            q = cand_model(w[None]).logits[0, :-1].float()
            lp, lq = torch.log_softmax(r, -1), torch.log_softmax(q, -1)
            kl.append((lp.exp() * (lp - lq)).sum(-1))
            conf.append(lp.exp().amax(-1) > 0.5)
            tl, ti = lp.topk(k, dim=-1)
            topk.append((tl.exp() * (tl - lq.gather(-1, ti))).sum(-1))
            match.append(r.argmax(-1) == q.argmax(-1))
    kl, conf, topk, match = (torch.cat(x).double() for x in (kl, conf, topk, match))
    c = conf.bool()
    return {
        "kl_all": float(kl.mean()),
        "kl_conf": float(kl[c].mean()),
        "kl_top20_conf": float(topk[c].mean()),
        "top1_conf": float(match[c].mean()),
        "top1_all": float(match.mean()),
        "n_positions": int(kl.numel()),
        "n_confident": int(c.sum()),
    }


def _assert_metrics(got, want, rel: float, keys=METRIC_KEYS):
    for k in keys:
        if isinstance(want[k], int):
            assert got[k] == want[k], k
        elif math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-12), k


# ---- metrics against a plain loop ---------------------------------------------------------------


def test_evaluator_equals_plain_loop(setup):
    ref = setup["ref"]
    cand, _ = load_quantized_checkpoint(setup["root"] / "ckpt", dtype=torch.float32)
    windows = _windows(5)
    got = evaluate_models(ref, cand, windows, batch_size=2)
    want = _plain_loop(ref, cand, windows)
    assert 0 < want["n_confident"] < want["n_positions"] == 5 * (SEQ - 1)
    assert want["kl_all"] > 0 and want["top1_all"] < 1
    _assert_metrics(got, want, rel=1e-5)

    same = evaluate_models(ref, ref, windows, batch_size=3)
    assert same["kl_all"] == same["kl_conf"] == same["kl_top20_conf"] == 0.0
    assert same["top1_all"] == same["top1_conf"] == 1.0
    assert same["n_confident"] == want["n_confident"]


# ---- the validate CLI ---------------------------------------------------------------------------


def test_config_parses():
    from lightning.pytorch.cli import LightningCLI

    from pq_lightning.data import EvalData as _EvalData

    cli = LightningCLI(
        model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
        args=["--config", str(ROOT / "configs" / "eval-smollm2.yaml")], run=False, auto_configure_optimizers=False,
    )
    assert isinstance(cli.model, QuantEvaluator) and isinstance(cli.datamodule, _EvalData)
    assert cli.model.hparams.reference is None
    assert cli.model.hparams.candidate == "out/smollm2-135m/checkpoint-6bpp"
    assert cli.model.hparams.top_k == 20 and cli.model.hparams.dtype == "float32"
    assert cli.model.reference_model is None and cli.model.candidate_model is None  # nothing loaded yet
    assert cli.datamodule.path == "../shared/data/wikitext-2-raw-test.txt"
    assert cli.datamodule.window == 511 and cli.datamodule._windows is None
    assert type(cli.trainer.logger).__name__ == "CSVLogger"


def _text_file(path: Path) -> Path:
    words = "the quick brown fox jumps over lazy dog return number of items in sequence raise error".split()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(words), (400,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in idx) + ".\n")
    return path


def _cli_yaml(path: Path, setup, out: Path, **model_args) -> Path:
    root = setup["root"]
    cfg = {
        "model": {
            "class_path": "pq_lightning.evaluate.QuantEvaluator",
            "init_args": {"reference": str(root / "ref"), "dtype": "float32", "output_dir": str(out), **model_args},
        },
        "data": {
            "class_path": "pq_lightning.data.EvalData",
            "init_args": {
                "path": str(_text_file(root / "text.txt")), "tokenizer": str(root / "ref"),
                "window": SEQ - 1, "max_windows": 4, "batch_size": 2,
            },
        },
        "trainer": {
            "accelerator": "cpu", "devices": 1, "enable_checkpointing": False, "enable_model_summary": False,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(out), "name": "logs"}},
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_validate_cli_end_to_end(setup, tmp_path):
    from pq_lightning.cli import main

    out = tmp_path / "out"
    cfg = _cli_yaml(tmp_path / "eval.yaml", setup, out, candidate=str(setup["root"] / "ckpt"))
    main(["validate", "--config", str(cfg)])

    data = EvalData(path=str(setup["root"] / "text.txt"), tokenizer=str(setup["root"] / "ref"), window=SEQ - 1,
                    max_windows=4)
    windows = data.windows
    assert windows.shape == (4, SEQ) and bool((windows[:, 0] == 1).all())
    want = evaluate_checkpoint(setup["ref"], setup["root"] / "ckpt", windows, batch_size=2)
    got = json.loads((out / "eval.json").read_text())
    _assert_metrics(got, want, rel=0.0)
    assert got["candidate"] == str(setup["root"] / "ckpt")
    assert (out / "eval.md").read_text().startswith("| kl_all | kl_conf | kl_top20_conf |")
    # the same numbers went through the Lightning logger
    (metrics_csv,) = (out / "logs").glob("version_*/metrics.csv")
    row = next(csv.DictReader(metrics_csv.open()))
    for k in METRIC_KEYS:
        assert float(row[k]) == pytest.approx(want[k], rel=1e-6), k


# ---- a plan applied in memory -------------------------------------------------------------------


def test_plan_in_memory_equals_exported_checkpoint(setup):
    formats, amax = read_plan(setup["plan_path"])
    assert formats == setup["plan"] and amax == setup["amax"]
    windows = _windows(4, seed=5)
    ref_before = copy.deepcopy(setup["ref"].state_dict())
    from_plan = evaluate_models(setup["ref"], None, windows, plan=str(setup["plan_path"]))
    from_ckpt = evaluate_checkpoint(setup["ref"], setup["root"] / "ckpt", windows)
    assert from_plan["kl_all"] > 0
    _assert_metrics(from_plan, from_ckpt, rel=1e-6)
    assert all(torch.equal(v, setup["ref"].state_dict()[k]) for k, v in ref_before.items())  # a copy was quantized

    with pytest.raises(ValueError, match="input_amax has no calibrated amax"):
        plan_only = setup["root"] / "plan-no-amax.json"
        plan_only.write_text(json.dumps(setup["plan"]))
        evaluate_models(setup["ref"], None, windows, plan=str(plan_only))
    with pytest.raises(ValueError, match="either candidate"):
        QuantEvaluator(candidate="x", plan="y")


# ---- the reference cache ------------------------------------------------------------------------


def test_reference_cache_serves_the_topk_metrics(setup, tmp_path):
    ref = setup["ref"]
    cand, _ = load_quantized_checkpoint(setup["root"] / "ckpt", dtype=torch.float32)
    windows = _windows(5, seed=7)
    cache_path = tmp_path / "ref-cache.safetensors"
    direct = evaluate_models(ref, cand, windows, reference_cache=str(cache_path))  # writes the cache
    assert direct == evaluate_models(ref, cand, windows)

    cached_windows, cache, meta = load_reference_cache(cache_path)
    assert torch.equal(cached_windows, windows) and meta["k"] == 20
    with torch.no_grad():
        want = reference_cache_entries(ref(windows).logits[:, :-1], 20)
    assert torch.equal(cache.topk_ids, want.topk_ids) and torch.equal(cache.argmax, want.argmax)
    assert torch.allclose(cache.topk_logprobs, want.topk_logprobs, rtol=0, atol=1e-6)

    out = tmp_path / "out"
    cached = evaluate_models(None, cand, windows.flip(0), reference_cache=str(cache_path), output_dir=str(out))
    _assert_metrics(cached, direct, rel=1e-12, keys=TOPK_KEYS)
    assert math.isnan(cached["kl_all"]) and math.isnan(cached["kl_conf"])
    report = json.loads((out / "eval.json").read_text())
    assert report["reference"] == "cache" and "kl_all and kl_conf are nan" in report["notes"][0]
    assert "top-k cache" in (out / "eval.md").read_text()

    # a plan with a cache: the reference model is loaded only to build the candidate
    ev = QuantEvaluator(reference=str(setup["root"] / "ref"), plan=str(setup["plan_path"]),
                        reference_cache=str(cache_path))
    ev.configure_model()
    assert ev.reference_model is None and ev.candidate_model is not None

    with pytest.raises(ValueError, match="not in the reference cache"):
        evaluate_models(None, cand, _windows(2, seed=8), reference_cache=str(cache_path))


# ---- DDP ----------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_processes_equal_one(setup, tmp_path):
    """Two CPU ranks (forked; ddp_spawn works the same, slower), DistributedSampler halves of 6 windows.

    The window count is even: DistributedSampler pads an odd count by repeating windows, which
    would count them twice.
    """
    import lightning as L

    ref = setup["ref"]
    cand, _ = load_quantized_checkpoint(setup["root"] / "ckpt", dtype=torch.float32)
    windows = _windows(6, seed=9)
    single = evaluate_models(ref, cand, windows, batch_size=1, reference_cache=str(tmp_path / "one.safetensors"))

    ev = QuantEvaluator.from_models(ref, cand, output_dir=str(tmp_path / "ddp"),
                                    reference_cache=str(tmp_path / "two.safetensors"))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.validate(ev, dataloaders=DataLoader(WindowDataset(windows), batch_size=1), verbose=False)
    got = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    _assert_metrics(got, single, rel=1e-12)

    w1, c1, _ = load_reference_cache(tmp_path / "one.safetensors")
    w2, c2, _ = load_reference_cache(tmp_path / "two.safetensors")
    order = [next(j for j in range(len(w2)) if torch.equal(w2[j], w)) for w in w1]  # ranks interleave windows
    assert len(w2) == 6
    assert torch.equal(c2.topk_logprobs[order], c1.topk_logprobs) and torch.equal(c2.topk_ids[order], c1.topk_ids)


# ---- llm-compressor --------------------------------------------------------------------------------


def test_llmcompressor_nvfp4_checkpoint(setup, tmp_path):
    """An NVFP4 checkpoint written by llm-compressor's oneshot loads as served and evaluates.

    Skipped where llm-compressor is not installed; tests/test_served.py covers checkpoints written by
    compressed-tensors' own compressors (llm-compressor's save path) without it.
    """
    pytest.importorskip("llmcompressor")
    datasets = pytest.importorskip("datasets")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = copy.deepcopy(setup["ref"])
    model.config.name_or_path = str(setup["root"] / "ref")  # oneshot re-reads the config from there
    calib = datasets.Dataset.from_dict({"input_ids": _windows(8, seed=11).tolist()})
    oneshot(
        model=model,
        dataset=calib,
        recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
        processor=setup["tok"],
        max_seq_length=SEQ,
        num_calibration_samples=8,
    )
    out = tmp_path / "llmc-nvfp4"
    model.save_pretrained(out, save_compressed=True)
    setup["tok"].save_pretrained(out)

    served, infos = load_quantized_checkpoint(out, dtype=torch.float32)
    assert {i.format for i in infos.values()} == {"nvfp4"} and len(infos) == 14
    windows = _windows(4, seed=12)
    got = evaluate_checkpoint(setup["ref"], out, windows)
    want = _plain_loop(setup["ref"], served, windows)
    _assert_metrics(got, want, rel=1e-5)
    assert got["kl_all"] > 0
    # llm-compressor's NVFP4 weights are our RTN NVFP4 of the source under the checkpoint's global scale
    from safetensors.torch import load_file

    from pq_lightning.formats import get_format

    disk = load_file(str(out / "model.safetensors"))
    src, mods = dict(setup["ref"].named_modules()), dict(served.named_modules())
    for name in infos:
        gs = disk[f"{name}.weight_global_scale"]
        ours = get_format("nvfp4").fake_quant(src[name].weight.detach(), global_scale=gs)
        assert torch.equal(mods[name].weight.float(), ours), name


# ---- logits a chunk of positions at a time -------------------------------------------------------


def test_chunked_logits_equal_the_plain_loop(setup, make_tiny_gemma3, monkeypatch):
    """Logits made 5 positions at a time (7 chunks per 31-position window), for the Llama checkpoint
    and for a tied, soft-capped Gemma-3 against an RTN copy of itself: the plain loop's metrics."""
    import pq_lightning.evaluate as evaluate

    monkeypatch.setattr(evaluate, "LOGIT_CHUNK_BYTES", 5 * 4 * 128)
    windows = _windows(3, seed=5)
    cand, _ = load_quantized_checkpoint(setup["root"] / "ckpt", dtype=torch.float32)
    _assert_metrics(evaluate_models(setup["ref"], cand, windows, batch_size=2),
                    _plain_loop(setup["ref"], cand, windows), rel=1e-5)

    gemma = make_tiny_gemma3(initializer_range=0.5)
    plan = {n: "nvfp4a16" for n, m in gemma.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    quantized = evaluate.fake_quant_candidate(gemma, plan)
    want = _plain_loop(gemma, quantized, windows)
    assert want["kl_all"] > 0 and 0 < want["n_confident"]
    _assert_metrics(evaluate_models(gemma, quantized, windows, batch_size=2), want, rel=1e-5)
