"""Calibration windows sampled from the model: against a plain loop (no KV cache, explicit CDF walk)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pq_lightning.data import GENERATED, CalibrationData, load_texts
from pq_lightning.pipeline import EvalConfig, RefineConfig, quantize
from pq_lightning.self_generated import banned_tokens, inverse_cdf, sample_windows, window_uniforms

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def _reference_windows(model, bos_id, count, seqlen, seed, banned):
    """Each window alone: the whole prefix through the model at every step, the token found by walking
    the probabilities in order until their running sum passes u."""
    out = []
    for i in range(count):
        u = window_uniforms(seed, i, seqlen - 1)
        ids = [bos_id]
        for step in range(seqlen - 1):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            logits[banned] = float("-inf")
            p = torch.softmax(logits, -1).tolist()
            target, acc, token = float(u[step]) * sum(p), 0.0, len(p) - 1
            for j, pj in enumerate(p):
                acc += pj
                if acc > target:
                    token = j
                    break
            ids.append(token)
        out.append(ids)
    return torch.tensor(out)


def test_inverse_cdf_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]))
    assert inverse_cdf(logits, torch.tensor([0.05, 0.35])).tolist() == [0, 2]
    # token 0 banned: the rest renormalised to (2, 3, 4) / 9; u 0.05 -> token 1, u 0.6 -> 3 (cdf 5/9 < 0.6)
    assert inverse_cdf(logits.clone(), torch.tensor([0.05, 0.6]), banned=[0]).tolist() == [1, 3]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_batched_sampler_equals_plain_loop(family, make_tiny_llama, make_tiny_gemma3):
    model = make_tiny_llama() if family == "llama" else make_tiny_gemma3()
    banned = [2]
    got = sample_windows(model, bos_id=1, count=5, seqlen=12, seed=3, banned=banned, batch_size=2)
    want = _reference_windows(model, 1, 5, 12, 3, banned)
    assert torch.equal(got, want)
    assert (got[:, 0] == 1).all() and not (got[:, 1:] == 2).any()
    # a window does not depend on how many are drawn nor on the batching
    assert torch.equal(sample_windows(model, bos_id=1, count=3, seqlen=12, seed=3, banned=banned, batch_size=3),
                       got[:3])
    assert not torch.equal(sample_windows(model, bos_id=1, count=5, seqlen=12, seed=4, banned=banned), got)


def test_sample_follows_the_model_distribution(make_tiny_llama):
    """First sampled token of 4000 windows: its frequencies against the model's probabilities after BOS."""
    model = make_tiny_llama(initializer_range=0.5)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([[1]])).logits[0, -1].double(), -1)
    p[2] = 0.0
    p /= p.sum()
    windows = sample_windows(model, bos_id=1, count=4000, seqlen=2, seed=0, banned=[2], batch_size=4000)
    freq = torch.bincount(windows[:, 1], minlength=p.numel()).double() / 4000
    assert freq[2] == 0
    # total variation of a 4000-draw histogram: ~0.5 * sum sqrt(p(1-p)/n) * sqrt(2/pi); far below a wrong model's
    assert 0.5 * (freq - p).abs().sum() < 0.12


def test_banned_tokens(tiny_tokenizer):
    assert banned_tokens(tiny_tokenizer, len(tiny_tokenizer) + 3) == [
        tiny_tokenizer.eos_token_id, len(tiny_tokenizer), len(tiny_tokenizer) + 1, len(tiny_tokenizer) + 2]


def test_from_windows_splits_fit_and_heldout_and_refuses_a_wrong_count():
    windows = torch.arange(10 * 4).view(10, 4)
    data = CalibrationData.from_windows(windows, num_samples=8, holdout_fraction=0.25, batch_size=4)
    assert torch.equal(data.windows, windows[:8]) and torch.equal(data.holdout_windows, windows[8:])
    assert data.seqlen == 4 and data.source == GENERATED
    with pytest.raises(ValueError, match=r"expected \[9, seqlen\]"):
        CalibrationData.from_windows(windows, num_samples=8, holdout_fraction=0.1)
    with pytest.raises(ValueError, match="sampled from the model"):
        load_texts(GENERATED)
    with pytest.raises(ValueError, match="no BOS"):
        sample_windows(torch.nn.Linear(2, 2), bos_id=None, count=1, seqlen=2)


def test_quantize_calibrates_on_generated_windows_and_caches_them(tmp_path, tiny_model_dir):
    from test_pipeline import _settings

    settings = _settings(tmp_path)
    settings["calibration"] = dataclasses.replace(settings["calibration"], source=GENERATED)
    kwargs = dict(model=str(tiny_model_dir), target_bits=6.0, **{**settings, "evaluation": EvalConfig(enabled=False),
                                                                 "refine": RefineConfig(gptq=False)})
    out = tmp_path / "out"
    quantize(output_dir=str(out), **kwargs)
    (cache,) = (out / "work").glob("generated-*.safetensors")
    windows = load_file(str(cache))["windows"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert windows.shape == (10, 32)  # 8 fit + 2 held out
    assert torch.equal(windows[:2], _reference_windows(model, 1, 2, 32, 0, [2]))
    stamp = cache.stat().st_mtime_ns
    report = quantize(output_dir=str(out), **kwargs)
    assert cache.stat().st_mtime_ns == stamp
    assert report["stages"]["calibration"]["cached"] == 1
