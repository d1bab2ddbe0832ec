"""Calibration windows sampled from the model itself (``calibration.source: generated``).

The quantity the pipeline minimises and reports is how far the quantized model's next-token
distribution moves from the model's. Text the model itself writes is a sample of exactly the contexts
that distribution is defined on: no corpus to ship or license, no download, the model's own languages
and, for an instruct model whose BOS opens a chat turn (SmolLM2's ``<|im_start|>``), chat-shaped text.

Each window is ``[BOS, t_1 … t_{seqlen-1}]``, drawn at temperature 1 from the full distribution (no
top-k / top-p: those would move the sample away from the model), EOS excluded so that a window is one
continuous text. Window ``i`` draws its tokens by inverse-CDF from its own uniforms (a generator
seeded by ``seed`` and ``i``), so a window does not depend on how many are drawn nor on how they are
batched, up to the float rounding of a batched forward pass.

No Lightning here: :func:`pq_lightning.stages.calibration` calls :func:`sample_windows` and caches the
windows under ``work/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

#: Bumped when the sampler's output for the same model and settings changes (it is in the cache key).
SAMPLER_VERSION = 1


def window_uniforms(seed: int, index: int, steps: int) -> Tensor:
    """The ``steps`` uniforms in ``[0, 1)`` (float64) that pick window ``index``'s tokens."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))
    return torch.rand(steps, generator=g, dtype=torch.float64)


def inverse_cdf(logits: Tensor, uniforms: Tensor, banned: Sequence[int] | Tensor = ()) -> Tensor:
    """One token per row of ``logits`` ``[rows, vocab]``: the first whose cumulative probability
    (float64, banned tokens at zero) exceeds ``uniforms[row]`` times the total."""
    z = logits.double()
    if len(banned):
        z[:, banned] = float("-inf")
    cdf = torch.softmax(z, dim=-1).cumsum(-1)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(z.shape[-1] - 1)


@torch.no_grad()
def _sample_batch(model: nn.Module, bos_id: int, uniforms: Tensor, banned: Sequence[int]) -> Tensor:
    device = next(model.parameters()).device
    banned_ids = torch.tensor(banned, dtype=torch.long, device=device)  # indexed once per step, built once
    uniforms = uniforms.to(device)
    token = torch.full((uniforms.shape[0], 1), bos_id, dtype=torch.long, device=device)
    tokens, past = [token], None
    for step in range(uniforms.shape[1]):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = inverse_cdf(out.logits[:, -1], uniforms[:, step], banned_ids).unsqueeze(1)
        tokens.append(token)
    return torch.cat(tokens, dim=1).cpu()


def sample_windows(model: nn.Module, *, bos_id: int, count: int, seqlen: int, seed: int = 0,
                   banned: Iterable[int] = (), batch_size: int = 32,
                   track: Callable[[Iterable[int], str], Iterable[int]] | None = None) -> Tensor:
    """``count`` windows of ``seqlen`` tokens (BOS first) sampled from ``model`` with a KV cache.

    Args:
        model: a causal LM taking ``input_ids``, ``past_key_values`` and ``use_cache``; put in eval mode.
        bos_id: the first token of every window.
        banned: token ids never drawn (the EOS tokens; ids the tokenizer does not have).
        batch_size: windows sampled together (memory: their KV cache and one row of logits each).
        track: wraps the batch loop for progress (``StageRunner.track``).

    Returns:
        LongTensor ``[count, seqlen]`` on the CPU.
    """
    if count < 1 or seqlen < 2 or batch_size < 1:
        raise ValueError(f"sample_windows: count >= 1, seqlen >= 2 and batch_size >= 1 needed, got {count}, "
                         f"{seqlen} and {batch_size}")
    if bos_id is None:
        raise ValueError("sample_windows: the tokenizer has no BOS token to start the windows from; use a text "
                         "source (--calibration.source FILE.txt) for this model")
    banned = sorted({int(t) for t in banned})
    was_training = model.training
    model.eval()
    starts = range(0, count, batch_size)
    out = []
    try:
        for start in (track(starts, "sampling calibration windows") if track else starts):
            rows = range(start, min(count, start + batch_size))
            uniforms = torch.stack([window_uniforms(seed, i, seqlen - 1) for i in rows])
            out.append(_sample_batch(model, bos_id, uniforms, banned))
    finally:
        model.train(was_training)
    return torch.cat(out)


def banned_tokens(tokenizer, vocab_size: int) -> list[int]:
    """Ids a calibration window should not contain: the EOS tokens (one continuous text per window)
    and the model's rows beyond the tokenizer's vocabulary (padding of the embedding)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return sorted(ids | set(range(len(tokenizer), vocab_size)))
