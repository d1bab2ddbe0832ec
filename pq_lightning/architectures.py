"""Serving constraints per architecture, as data: which Linears the serving engine fuses.

vLLM fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj`` (or the
architecture's spelling of them). A fused Linear has one quantization scheme, and its NVFP4
siblings share one weight global scale and one input global scale, so fused siblings take one
format together: the allocator treats each fused set as one group.

Add an architecture by adding an entry to :data:`FUSED_SIBLINGS` (keyed by ``config.model_type``);
unknown types fall back to :data:`DEFAULT_FUSED`, which covers Llama-style names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_LLAMA = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)

#: Sibling sets (name suffixes inside one decoder layer) the serving engine fuses.
FUSED_SIBLINGS: dict[str, tuple[tuple[str, ...], ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3": _LLAMA,
    "gemma3_text": _LLAMA,
    "gemma4": _LLAMA,
    "gemma4_text": _LLAMA,
    # Phi-3 ships q/k/v and gate/up already fused into one Linear each.
    "phi3": (),
}
DEFAULT_FUSED = _LLAMA


def fused_siblings(model_type: str | None) -> tuple[tuple[str, ...], ...]:
    return FUSED_SIBLINGS.get((model_type or "").lower(), DEFAULT_FUSED)


def fused_groups(linear_names: Iterable[str], model_type: str | None) -> list[tuple[str, ...]]:
    """Partition ``linear_names`` into fused sets (in sibling order) and singletons.

    A fused set is formed only when every sibling is present (a sibling excluded from the body
    breaks the set, and the rest are priced alone). Order follows the first member's position in
    ``linear_names``, so the result is deterministic.
    """
    names = list(linear_names)
    present = set(names)
    sets = fused_siblings(model_type)
    taken: dict[str, tuple[str, ...]] = {}
    for name in names:
        for sibs in sets:
            for suffix in sibs:
                if name.endswith("." + suffix) or name == suffix:
                    prefix = name[: len(name) - len(suffix)]
                    members = tuple(prefix + s for s in sibs)
                    if all(m in present for m in members):
                        for m in members:
                            taken[m] = members
    groups: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    for name in names:
        g = taken.get(name, (name,))
        if g not in seen:
            seen.add(g)
            groups.append(g)
    return groups


def group_name(members: Sequence[str]) -> str:
    """A readable name for a fused set: ``model.layers.0.self_attn.q_proj+k_proj+v_proj``."""
    if len(members) == 1:
        return members[0]
    head, _, _ = members[0].rpartition(".")
    return head + "." + "+".join(m.rpartition(".")[2] for m in members)
