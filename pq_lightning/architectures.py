"""Serving constraints per architecture, as data: which Linears the serving engine fuses.

vLLM fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj`` (or the
architecture's spelling of them). A fused Linear has one quantization scheme, and its NVFP4
siblings share one weight global scale and one input global scale, so fused siblings take one
format together: the allocator treats each fused set as one group.

Add an architecture by adding an entry to :data:`FUSED_SIBLINGS` (keyed by ``config.model_type``);
unknown types fall back to :data:`DEFAULT_FUSED`, which covers Llama-style names. This module is the
one table of these facts: the allocator, the refiner, the export, smoothing and the in-memory
evaluation all ask it (or take the plan's groups, which come from it).
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

#: Gated MLPs ``down(act(gate(x)) * up(x))`` as (gate, up, down) suffixes: ``down``'s input is linear in
#: ``up``'s output rows, so a scale on it folds into ``up``'s rows (activation smoothing).
GATED_MLP: dict[str, tuple[str, str, str] | None] = {"phi3": None}
DEFAULT_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

#: Attention as (v, o) suffixes: ``o``'s input is softmax-weighted sums of ``v``'s output rows, so a scale
#: per (kv head, head dim) folds into ``v``'s rows (activation smoothing; exact only when nothing between
#: them acts across a head's channels, which smoothing checks on the logits).
ATTENTION_VO: dict[str, tuple[str, str] | None] = {"phi3": None}
DEFAULT_ATTENTION_VO = ("self_attn.v_proj", "self_attn.o_proj")


def fused_siblings(model_type: str | None) -> tuple[tuple[str, ...], ...]:
    return FUSED_SIBLINGS.get((model_type or "").lower(), DEFAULT_FUSED)


def gated_mlp(model_type: str | None) -> tuple[str, str, str] | None:
    return GATED_MLP.get((model_type or "").lower(), DEFAULT_GATED_MLP)


def attention_vo(model_type: str | None) -> tuple[str, str] | None:
    return ATTENTION_VO.get((model_type or "").lower(), DEFAULT_ATTENTION_VO)


def model_type_of(model) -> str | None:
    """The language model's ``model_type`` (the text config's, for multimodal models)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "model_type", None) or getattr(cfg, "model_type", None)


def whole_fused_sets(
    body: Sequence[str], all_linears: Sequence[str], model_type: str | None
) -> tuple[list[str], dict[str, list[str]]]:
    """``body`` without the members of fused sets it holds only in part, and those members keyed by
    the missing sibling: a fused set has one scheme in vLLM, so one BF16 member keeps the set BF16."""
    in_body = set(body)
    left: dict[str, list[str]] = {}
    for members in fused_groups(all_linears, model_type):
        inside = [m for m in members if m in in_body]
        if inside and len(inside) < len(members):
            missing = next(m for m in members if m not in in_body)
            left[missing] = inside
    dropped = {m for ms in left.values() for m in ms}
    return [n for n in body if n not in dropped], left


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
