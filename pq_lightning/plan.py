"""From per-Linear costs to a plan: groups under serving constraints, a budget, ``plan.json``.

Budgets are either the average bits per parameter of the body (``target_bits``, e.g. "6.0 bpp") or
a checkpoint size in GB (``target_size_gb``, 1 GB = 10**9 bytes), which counts the bytes of every
tensor on disk: the body at its chosen formats plus every other tensor (embeddings, norms,
``lm_head``, vision tower, biases) at its stored dtype. The safetensors headers, config, tokenizer
and manifest files are not counted.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .allocate import Allocation, Group, Option, allocate, budget_from_bpp, fuse_options, min_feasible_bits
from .architectures import fused_groups, group_name
from .atomic import atomic_write_text
from .cost import LinearCost

GB = 10**9


@dataclass
class LinearPlan:
    format: str
    bits: int
    predicted_dloss: float
    group: str


@dataclass
class Plan:
    """The chosen format of every body Linear, with exact sizes and predicted Δloss."""

    linears: dict[str, LinearPlan]
    estimator: str
    target: dict
    total_bits: int
    body_params: int
    bpp_body: float
    predicted_dloss: float
    solver: dict = field(default_factory=dict)
    non_body_bytes: int | None = None

    @property
    def formats(self) -> dict[str, str]:
        return {n: lp.format for n, lp in self.linears.items()}

    @property
    def groups(self) -> list[list[str]]:
        """The serving groups (fused siblings together, in plan order): one format, shared NVFP4 scales."""
        by_name: dict[str, list[str]] = {}
        for n, lp in self.linears.items():
            by_name.setdefault(lp.group, []).append(n)
        return list(by_name.values())

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lp in self.linears.values():
            counts[lp.format] = counts.get(lp.format, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def checkpoint_bytes(self) -> int | None:
        if self.non_body_bytes is None:
            return None
        return self.non_body_bytes + math.ceil(self.total_bits / 8)

    def to_dict(self) -> dict:
        return {
            "estimator": self.estimator,
            "target": self.target,
            "bpp_body": self.bpp_body,
            "total_bits": self.total_bits,
            "body_params": self.body_params,
            "body_bytes": math.ceil(self.total_bits / 8),
            "non_body_bytes": self.non_body_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "predicted_dloss": self.predicted_dloss,
            "formats": self.format_counts(),
            "solver": self.solver,
            "linears": {n: asdict(lp) for n, lp in self.linears.items()},
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a ``plan.json`` (:meth:`save`); the one reader of the format."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        """A plan from :meth:`to_dict`'s mapping; only ``linears`` is required (sizes are then summed
        from it, the rest left empty)."""
        linears = {n: LinearPlan(**lp) for n, lp in d["linears"].items()}
        total_bits = d.get("total_bits", sum(lp.bits for lp in linears.values()))
        return cls(
            linears=linears,
            estimator=d.get("estimator", ""),
            target=d.get("target", {}),
            total_bits=total_bits,
            body_params=d.get("body_params", 0),
            bpp_body=d.get("bpp_body", math.nan),
            predicted_dloss=d.get("predicted_dloss", math.fsum(lp.predicted_dloss for lp in linears.values())),
            solver=d.get("solver", {}),
            non_body_bytes=d.get("non_body_bytes"),
        )


def build_groups(
    costs: Mapping[str, LinearCost],
    *,
    model_type: str | None,
    formats: Sequence[str],
    pins: Mapping[str, str] | None = None,
    bans: Mapping[str, Sequence[str]] | None = None,
) -> list[Group]:
    """Allocation groups: fused siblings priced together, pins and bans applied.

    ``formats`` is the menu (order breaks exact ties: earlier wins); ``bf16`` is always offered.
    ``pins`` maps a regex (``re.search`` on the Linear name) to the only format its Linears may
    take; ``bans`` maps a regex to formats its Linears may not take. A format name that is not
    registered, a pin naming a format a Linear cannot take, a Linear pinned and banned from the
    same format (or pinned to two), or a regex that matches nothing, is an error that says so.
    """
    from .checks import check_format_names, check_pins_bans, pin_of

    pins = dict(pins or {})
    bans = {k: list(v) for k, v in (bans or {}).items()}
    check_format_names(formats, pins, bans, pins_in_menu=False)  # a pin off the menu: said per Linear below
    menu = list(dict.fromkeys([*formats, "bf16"]))
    names = list(costs)
    check_pins_bans(names, pins, bans)

    def allowed(name: str) -> list[str]:
        c = costs[name]
        ok = [f for f in menu if f in c.bits]
        for rx, banned in bans.items():
            if re.search(rx, name):
                ok = [f for f in ok if f not in banned]
        pin = pin_of(name, pins)
        if pin is not None:
            rx, fmt = pin
            if fmt not in c.bits:
                why = c.unsupported.get(fmt, f"{fmt!r} is not in the cost menu {menu}")
                raise ValueError(f"pin {rx!r} -> {fmt!r} cannot apply to {name}: {why}")
            ok = [fmt]
        if not ok:
            raise ValueError(f"{name}: every format is banned or unsupported; allow at least bf16")
        return ok

    groups = []
    for members in fused_groups(names, model_type):
        per_member = [
            [Option(f, costs[m].bits[f], costs[m].dloss[f]) for f in allowed(m)] for m in members
        ]
        try:
            options = fuse_options(per_member)
        except ValueError:
            raise ValueError(
                f"fused siblings {list(members)} share no allowed format (pins/bans disagree); "
                "the serving engine gives them one scheme, so pin them alike"
            ) from None
        groups.append(
            Group(
                name=group_name(members),
                members=tuple(members),
                params=sum(costs[m].params for m in members),
                options=options,
            )
        )
    return groups


def non_body_bytes(model: torch.nn.Module, body_names: Sequence[str]) -> int:
    """Bytes on disk of every saved tensor that is not a body Linear's weight (ties counted once).

    Floating-point tensors count as BF16, the dtype the exporter writes them in, whatever dtype
    the model was loaded in; other tensors at their own size.
    """
    body = {f"{n}.weight" for n in body_names}
    seen: set[int] = set()
    total = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if name in body:
            continue
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    from .streaming import streamed_shapes

    for name, (shape, dtype) in streamed_shapes(model).items():  # decoder layers streamed from disk
        if name not in body:
            total += math.prod(shape) * (2 if dtype.is_floating_point else torch.empty((), dtype=dtype).element_size())
    return total


#: A bits target at most this fraction below the smallest feasible budget is read as that budget:
#: per-tensor global scales put an all-NVFP4 body a hair above its nominal 4.5 bpp (4.50013 on
#: SmolLM2-135M, more on tiny models), and "4.5" means that build.
NOMINAL_RATE_TOLERANCE = 0.01


def budget_label(target_bits: float | None, target_size_gb: float | None) -> str:
    """``6bpp`` / ``0.1GB``: the suffix of a budget's plan, checkpoint and figures."""
    return f"{target_bits:g}bpp" if target_bits is not None else f"{target_size_gb:g}GB"


def resolve_budget(
    groups: Sequence[Group],
    *,
    target_bits: float | None = None,
    target_size_gb: float | None = None,
    non_body: int | None = None,
) -> tuple[int, str | None]:
    """The body's budget in bits, and a note when a nominal rate was read as the smallest feasible budget.

    Raises:
        InfeasibleBudgetError: the budget is below the smallest feasible one (the message says it).
    """
    from .allocate import InfeasibleBudgetError, total_params

    bits = budget_bits(groups, target_bits=target_bits, target_size_gb=target_size_gb, non_body=non_body)
    floor, params = min_feasible_bits(groups), total_params(groups)
    if bits >= floor:
        return bits, None
    if target_bits is not None and floor / params <= target_bits * (1 + NOMINAL_RATE_TOLERANCE):
        return floor, (
            f"{target_bits} bpp is the nominal rate of the smallest build; its per-tensor scales take it to "
            f"{floor / params:.6f} bpp, which is used"
        )
    raise InfeasibleBudgetError(bits, floor, params)


def budget_bits(
    groups: Sequence[Group],
    *,
    target_bits: float | None = None,
    target_size_gb: float | None = None,
    non_body: int | None = None,
) -> int:
    """The body's bit budget from exactly one of ``target_bits`` and ``target_size_gb``."""
    if (target_bits is None) == (target_size_gb is None):
        raise ValueError("give exactly one budget: target_bits (bits per body parameter) or target_size_gb")
    if target_bits is not None:
        if not target_bits > 0:
            raise ValueError(f"target_bits must be > 0, got {target_bits}")
        return budget_from_bpp(groups, target_bits)
    if non_body is None:
        raise ValueError("target_size_gb needs the bytes of the non-body tensors (non_body_bytes(model, ...))")
    body_bytes = int(target_size_gb * GB) - non_body
    if body_bytes <= 0:
        least = non_body + math.ceil(min_feasible_bits(groups) / 8)
        raise ValueError(
            f"target_size_gb={target_size_gb} ({int(target_size_gb * GB):,} B) leaves no room for the body: the "
            f"tensors outside it already take {non_body:,} B; raise it to at least {least / GB:.9g} ({least:,} B)"
        )
    return body_bytes * 8


def unsupported_note(costs: Mapping[str, LinearCost], formats: Sequence[str]) -> str:
    """Which menu formats cannot take some body Linears, and why (e.g. NVFP4 on ``in_features % 16 != 0``)."""
    notes = []
    for fmt in formats:
        names = [n for n, c in costs.items() if fmt in c.unsupported]
        if names:
            notes.append(f"{fmt} cannot take {len(names)} of {len(costs)} body Linears "
                         f"({costs[names[0]].unsupported[fmt]}, e.g. {names[0]})")
    return "; ".join(notes)


def make_plan(
    costs: Mapping[str, LinearCost],
    groups: Sequence[Group],
    *,
    max_bits: int,
    estimator: str,
    target: dict,
    non_body: int | None = None,
    allocation: Allocation | None = None,
) -> Plan:
    """Run the allocator (unless ``allocation`` is given) and spell the result out per Linear."""
    alloc = allocation if allocation is not None else allocate(groups, max_bits=max_bits)
    linears: dict[str, LinearPlan] = {}
    for g in groups:
        fmt = alloc.choice[g.name]
        for m in g.members:
            linears[m] = LinearPlan(
                format=fmt, bits=costs[m].bits[fmt], predicted_dloss=costs[m].dloss[fmt], group=g.name
            )
    params = sum(g.params for g in groups)
    total_bits = sum(lp.bits for lp in linears.values())
    return Plan(
        linears=dict(sorted(linears.items(), key=lambda kv: list(costs).index(kv[0]))),
        estimator=estimator,
        target={**target, "max_bits": max_bits},
        total_bits=total_bits,
        body_params=params,
        bpp_body=total_bits / params,
        predicted_dloss=math.fsum(lp.predicted_dloss for lp in linears.values()),
        solver=alloc.stats,
        non_body_bytes=non_body,
    )


def write_pareto_csv(plans: Sequence[Plan], path: str | Path) -> None:
    """One row per plan: target, achieved bpp, bytes, predicted Δloss, format counts."""
    fmts = sorted({f for p in plans for f in p.format_counts()})
    rows = [["target_bits", "target_size_gb", "bpp_body", "body_bytes", "predicted_dloss", *fmts]]
    for p in plans:
        counts = p.format_counts()
        rows.append(
            [
                p.target.get("target_bits", ""),
                p.target.get("target_size_gb", ""),
                f"{p.bpp_body:.6f}",
                math.ceil(p.total_bits / 8),
                f"{p.predicted_dloss:.9g}",
                *[counts.get(f, 0) for f in fmts],
            ]
        )
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    atomic_write_text(path, buf.getvalue())
