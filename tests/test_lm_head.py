"""Logits a chunk of positions at a time: the loss and its gradients equal the full-logits computation,
the evaluation's metrics equal those of full logits, and a head it cannot reproduce keeps the full path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pq_lightning.causal_lm import CausalLM
from pq_lightning.lm_head import logit_chunks, positions_per_chunk, split_head

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def _batch(seed: int = 0, b: int = 3, t: int = 17) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 128, (b, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # a padded tail: its targets are not counted
    return {"input_ids": ids, "attention_mask": mask}


def _plain_loss(model, batch) -> torch.Tensor:
    """The textbook loss: full logits, shifted, fp32 cross-entropy averaged over counted targets."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    total, count = torch.zeros(()), 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                total = total - F.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
                count += 1
    return total / count


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_chunked_loss_and_gradients_equal_the_full_logits(arch, make_tiny_llama, make_tiny_gemma3):
    """5 positions per chunk (48 predicted positions): loss and every parameter's gradient as with full logits."""
    model = make_tiny_llama() if arch == "llama" else make_tiny_gemma3()
    module = CausalLM.from_model(model)  # fine-tune mode: every weight (lm_head / tied embedding too) gets a grad
    module.logit_chunk_bytes = 5 * 4 * 128
    batch = _batch()
    chunked = module.next_token_loss(batch)
    chunked.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    want_loss = _plain_loss(model, batch)
    want_loss.backward()
    want = _grads(model)
    assert module.last_token_count == 2 * 16 + 10
    assert chunked.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert set(got) == set(want) and len(got) > 10
    for name, g in want.items():
        scale = float(g.abs().max())
        assert torch.allclose(got[name], g, rtol=1e-5, atol=1e-6 * scale), (name, float((got[name] - g).abs().max()))


def test_probe_mode_activation_gradients_equal_the_full_logits(make_tiny_gemma3):
    """Probe-only mode (no weight grads): the gradient reaching each body Linear's output is unchanged."""
    model = make_tiny_gemma3()
    module = CausalLM.from_model(model, probe_only=True)
    batch = _batch(1)
    outs: dict[str, list[torch.Tensor]] = {"chunked": [], "full": []}
    key = ["chunked"]

    def hook(mod, args, out):
        out.register_hook(lambda g: outs[key[0]].append(g.clone()))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("down_proj")]
    module.logit_chunk_bytes = 7 * 4 * 128
    module.next_token_loss(batch).backward()
    key[0] = "full"
    module.logit_chunk_bytes = 10**12  # one chunk: the same code path, no split
    full = _plain_loss(model, batch)
    full.backward()
    for h in handles:
        h.remove()
    assert len(outs["chunked"]) == len(outs["full"]) == 2
    for a, b in zip(outs["chunked"], outs["full"], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * float(b.abs().max()))
    assert all(p.grad is None for p in model.parameters())


def test_logit_chunks_are_the_models_logits(make_tiny_gemma3):
    model = make_tiny_gemma3()
    ids = _batch(2)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits

        def run(i, m):
            return model(input_ids=i, attention_mask=m, use_cache=False)

        split = split_head(model, run, ids)
        assert split is not None and split.vocab_size == 128
        parts = list(logit_chunks(split, 1, 16, chunk=6))
    assert [s for s, _ in parts] == [0, 6, 12]
    got = torch.cat([c for _, c in parts])
    assert torch.allclose(got, full[1, :16], rtol=1e-6, atol=1e-6)  # soft-capped, as the model's
    assert positions_per_chunk(262144) == 64 and positions_per_chunk(10**9) == 1


def test_a_head_it_cannot_reproduce_keeps_the_full_logits(make_tiny_llama):
    """An unknown post-processing (here: a logit bias added after lm_head) is detected: full logits instead."""
    model = make_tiny_llama()
    bias = torch.linspace(-1, 1, 128)
    inner = model.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        out.logits = out.logits + bias
        return out

    model.forward = forward
    module = CausalLM.from_model(model)
    module.logit_chunk_bytes = 5 * 4 * 128
    batch = _batch(3)

    def run(i, m):
        return model(input_ids=i, attention_mask=m, use_cache=False)

    with pytest.warns(UserWarning, match="full logits are used"):
        assert module.next_token_loss(batch).item() == pytest.approx(_plain_loss(model, batch).item(), rel=1e-6)
    assert split_head(model, run, batch["input_ids"]) is None  # remembered: no second warning, no run
