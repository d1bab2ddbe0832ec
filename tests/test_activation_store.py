"""The refiner's activation store: values back bit for bit from memory or the scratch file, the budget
held, and a walk that spills everything deciding exactly as one that keeps everything."""

from __future__ import annotations

import pytest
import torch

from pq_lightning.activation_store import ActivationStore, ResidentBudget


def test_tensors_come_back_bit_for_bit_and_the_budget_is_held():
    budget = ResidentBudget(3 * 4 * 8)  # room for one [3, 8] fp32 tensor
    store = ActivationStore(budget)
    g = torch.Generator().manual_seed(0)
    items = [torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g).to(torch.bfloat16),
             torch.randn(2, 3, 8, generator=g)[:, 1], torch.randn(5, generator=g).to(torch.float8_e4m3fn)]
    for t in items:
        store.append(t)
    assert budget.used == budget.peak == 96 and store.spilled_bytes == 3 * 8 * 2 + 2 * 8 * 4 + 5
    for want, got in zip(items, store, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
    assert torch.equal(store[2], items[2])  # random access reads the right record
    store.close()
    assert budget.used == 0 and len(store) == 0
    with pytest.raises(ValueError, match=">= 0"):
        ResidentBudget(-1)


def test_a_walk_that_spills_everything_decides_as_one_that_keeps_everything():
    from conftest import build_tiny_llama

    from pq_lightning.gptq import GPTQConfig
    from pq_lightning.models import find_body_linears
    from pq_lightning.refine import refine_model

    torch.manual_seed(0)
    model = build_tiny_llama(hidden_size=64, intermediate_size=128)
    plan = {n: "fp8" if n.endswith("down_proj") else "nvfp4" for n in find_body_linears(model)}
    ids = torch.randint(4, 128, (6, 32), generator=torch.Generator().manual_seed(1))
    fit, held = [ids[:2], ids[2:4]], [ids[4:]]
    config = GPTQConfig(dampening=(0.01,))
    kept = refine_model(model, plan, fit, held, config=config)
    spilled = refine_model(model, plan, fit, held, config=config, max_resident_activation_bytes=0)
    assert spilled.totals["resident_activation_peak_bytes"] == 0
    assert kept.totals["resident_activation_peak_bytes"] > 0
    assert kept.input_amax == spilled.input_amax
    for name, packed in kept.packed.items():
        for k, v in packed.items():
            assert torch.equal(v.view(torch.uint8), spilled.packed[name][k].view(torch.uint8)), (name, k)
    assert {n: d.method for n, d in kept.decisions.items()} == {n: d.method for n, d in spilled.decisions.items()}
