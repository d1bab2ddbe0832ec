"""Exact format allocation: a multiple-choice knapsack over groups of Linears.

Problem
-------
A *group* is a set of Linears that must share one format (fused siblings such as q/k/v or
gate/up; a lone Linear is a group of one). Group ``g`` offers options ``k`` (formats), each with
an exact integer size on disk ``b[g,k] >= 0`` bits and a predicted loss increase ``d[g,k]``
(any finite float; the cost model gives ``>= 0``). Given a budget ``B`` bits, :func:`allocate`
picks one option per group so that ``sum b <= B`` and ``sum d`` is minimal. Among minimisers it
takes the one with the fewest total bits, and among those the one whose vector of option indices
(position of the option in ``Group.options``, groups in input order) is lexicographically
smallest. That rule makes the answer a function of the input alone.

What is exact, and why
----------------------
*Arithmetic.* Every float is a dyadic rational ``m / 2**e``. With ``2**s`` the largest
denominator among all ``d``, the integers ``D = d * 2**s`` represent every Δloss exactly, so sums,
comparisons and ties are exact integer operations (no rounding anywhere in the search). Bits are
divided by ``u = gcd`` of all option bits and the budget becomes ``floor(B / u)``; since every
total is a multiple of ``u``, ``sum b <= B`` iff ``sum b/u <= floor(B/u)``: same problem, smaller
numbers. ``Allocation.total_dloss`` is the exact sum rounded once to the nearest float (equal to
``math.fsum`` of the chosen Δlosses).

*Step 1, dominance.* An option with at least the bits and at least the Δloss of another option
of the same group (and not identical in both, or identical but listed later) never appears in the
answer under the order above: swapping it for the other one keeps feasibility and does not make
(Δloss, bits, index vector) worse. It is dropped.

*Step 2, bound and incumbent.* For any ``λ >= 0`` and any feasible choice ``x``,

    sum_g d[g,x_g]  >=  sum_g min_k (d[g,k] + λ b[g,k])  -  λ B  =:  L(λ)          (weak duality)

because ``λ (B - sum b) >= 0``. ``L`` is maximised at the break efficiency of the greedy that
walks every group's lower convex hull in decreasing order of Δloss saved per bit (the LP optimum
of the multiple-choice knapsack; Sinha and Zoltners 1979, Dyer 1984, Zemel 1984). That greedy,
continued past the break with every later step that still fits, also yields a feasible
*incumbent* ``x^`` of value ``U``. The exactness argument below holds for *any* ``λ >= 0``; the
greedy's ``λ* = p/q`` (a ratio of integers) only makes the bound tight.

*Step 3, reduced-cost fixing.* Let ``r[g,k] = d[g,k] + λ b[g,k] - min_j (d[g,j] + λ b[g,j]) >= 0``.
For feasible ``x``: ``sum d(x) >= L(λ) + sum_g r[g,x_g]``. Hence every ``x`` with
``sum d(x) <= U`` (the optimum is one, since ``x^`` is feasible) has ``sum_g r[g,x_g] <= Γ := U -
L(λ)``, so each of its options has ``r <= Γ``. Options with ``r > Γ`` are removed; a group left
with one option is fixed. All of this is computed in integers (``q·D + p·b``).

*Step 4, Pareto dynamic programme over the free groups.* Write ``deficit(x) = q·(Δloss(x) -
L(λ)) = R(x) + p·slack(x)`` with ``R`` the sum of reduced costs (integers, ``λ = p/q``): only
choices with ``deficit <= Γ`` matter. Let ``o0`` be a group's fewest-bits option of reduced cost 0.
A state is a choice for the first ``k`` free groups, summarised by (bits ``b``, Δloss, ``R``). Let
``E`` be the budget left if every remaining group takes ``o0``. Moving a remaining group ``Δ``
bits up costs at least ``α·Δ`` and ``Δ`` bits down at least ``β·Δ`` in reduced cost, where ``α``
(capped at ``p``, the price of an unused bit) and ``β`` are the least such rates among the
remaining groups. Since the final slack plus the net bits moved equals ``E``, every completion
has ``deficit >= R + α·E`` if ``E >= 0`` and ``>= R + β·(-E)`` otherwise (no completion at all
if no group can move down). A state is dropped when (a) that bound exceeds ``Γ``, (b) its bits
plus the fewest bits of the remaining groups exceed the budget, or (c) another state on the same
groups has no more bits and no more Δloss (equal in both: the one with the larger index vector
goes). (a) and (b) only drop states with no feasible completion of deficit ``<= Γ``; (c) only
drops a state whose every completion is matched, under the full (Δloss, bits, index) order, by
the same completion of the state that dominates it. By induction over the groups the optimum's
prefix (or a state dominating it) survives every layer, so the best final state *is* the
optimum: exact, never above the budget, certified. Two accelerations keep that argument intact:
a state with ``E >= 0`` completes feasibly with the remaining groups at ``o0``, so ``Γ`` is
lowered on the fly to ``R + p·E`` (the optimum still has ``deficit <= Γ``); and groups are
processed in increasing order of their least rate, so the rates of the groups still to come,
hence the bound, grow as the programme advances (Pisinger's core idea). The states of one layer
are at most the distinct bit totals in the slack window, ``(B - minimal bits)/u + 1``; on
realistic instances they number in the hundreds (``scripts/bench_allocate.py``).

*Fallback.* Each layer's work (states times options, plus the steps spent breaking exact ties)
is known before the layer runs. If the total would pass ``max_work`` (a deterministic limit, not
a clock, so the output never depends on machine load; it also caps memory), the best complete
solution seen is returned (the greedy incumbent, or a better completion found by the programme)
with ``stats["exact"] = False`` and its certified gap: the optimum lies in
``[stats["lower_bound"], total_dloss]``. The default (2e6, a few seconds here) is about 30 times
what 10,000 realistic Linears need; it is reached only on near-degenerate instances (every
format saving Δloss at almost exactly the same rate per bit), where the gap is then tiny.

API
---
:class:`Option`, :class:`Group`, :class:`Allocation`, :func:`allocate`, :func:`budget_from_bpp`,
:func:`min_feasible_bits`, :func:`total_params`, :func:`pareto_sweep`, :func:`fuse_options`,
:class:`InfeasibleBudgetError`.
"""

from __future__ import annotations

import gc
import math
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Integral, Real

__all__ = [
    "Allocation",
    "Group",
    "InfeasibleBudgetError",
    "Option",
    "allocate",
    "budget_from_bpp",
    "fuse_options",
    "min_feasible_bits",
    "pareto_sweep",
    "total_params",
]

DEFAULT_MAX_WORK = 2_000_000
_bits_and_d = operator.itemgetter(0, 1)


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One format choice for one group.

    Attributes:
        format: format name, e.g. ``"nvfp4"``, ``"fp8"``, ``"bf16"``; unique within its group.
        bits: exact total bits on disk of the whole group under this format (weights and every
            scale tensor of every member), a non-negative integer.
        dloss: predicted Δloss of the whole group under this format, a finite float.
    """

    format: str
    bits: int
    dloss: float

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or not self.format:
            raise ValueError(f"Option.format must be a non-empty string, got {self.format!r}.")
        if isinstance(self.bits, bool) or not isinstance(self.bits, Integral):
            raise ValueError(
                f"Option {self.format!r}: bits must be an integer count of bits on disk, got "
                f"{self.bits!r} ({type(self.bits).__name__}); compute it with the format's exact "
                "bits(shape) and pass an int."
            )
        if self.bits < 0:
            raise ValueError(f"Option {self.format!r}: bits must be >= 0, got {self.bits}.")
        if isinstance(self.dloss, bool) or not isinstance(self.dloss, Real):
            raise ValueError(f"Option {self.format!r}: dloss must be a real number, got {self.dloss!r}.")
        if not math.isfinite(float(self.dloss)):
            raise ValueError(
                f"Option {self.format!r}: dloss must be finite, got {self.dloss!r}; check the "
                "sensitivity estimate of this group (a NaN usually means an empty calibration pass)."
            )
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "dloss", float(self.dloss))


@dataclass(frozen=True)
class Group:
    """Linears that must take the same format, with the options offered to them.

    Attributes:
        name: unique group name, e.g. ``"model.layers.0.self_attn.qkv"``.
        members: names of the Linears in the group (at least one; no Linear in two groups).
        params: parameter count of the group's weights (used for bits per parameter), > 0.
        options: the formats allowed for the group, at least one; the order matters only to
            break exact ties (earlier wins).
    """

    name: str
    members: tuple[str, ...]
    params: int
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Group.name must be a non-empty string, got {self.name!r}.")
        members = (self.members,) if isinstance(self.members, str) else tuple(self.members)
        if not members:
            raise ValueError(f"Group {self.name!r} has no members; list the Linear names it holds.")
        if len(set(members)) != len(members):
            raise ValueError(f"Group {self.name!r} lists a member twice: {members}.")
        if isinstance(self.params, bool) or not isinstance(self.params, Integral) or self.params <= 0:
            raise ValueError(f"Group {self.name!r}: params must be a positive integer, got {self.params!r}.")
        options = tuple(self.options)
        if not options:
            raise ValueError(
                f"Group {self.name!r} has no options; give it at least one format (bf16 always fits)."
            )
        for o in options:
            if not isinstance(o, Option):
                raise ValueError(f"Group {self.name!r}: options must be Option objects, got {o!r}.")
        formats = [o.format for o in options]
        if len(set(formats)) != len(formats):
            raise ValueError(f"Group {self.name!r} offers a format twice: {formats}.")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "params", int(self.params))
        object.__setattr__(self, "options", options)

    def option(self, fmt: str) -> Option:
        """The option of format ``fmt`` (KeyError if the group does not offer it)."""
        for o in self.options:
            if o.format == fmt:
                return o
        raise KeyError(
            f"group {self.name!r} has no option {fmt!r}; it offers {[o.format for o in self.options]}"
        )


@dataclass
class Allocation:
    """The chosen format of every group.

    Attributes:
        choice: group name -> format, in input group order.
        total_bits: exact bits of the chosen options (``<= max_bits``).
        total_dloss: exact sum of the chosen Δlosses, rounded once to a float.
        bpp: ``total_bits / total params``.
        stats: solver statistics: ``method``; ``exact`` (bool: certified optimal); ``gap``
            (certified bound on ``total_dloss`` minus the optimum: 0.0 when exact);
            ``lower_bound`` (LP / Lagrangian bound on the optimum); ``greedy_dloss`` and
            ``greedy_gap`` (the hull greedy's answer and its gap to the bound); ``lambda`` (the
            LP's price of one bit, in Δloss); ``bits_unit`` (gcd the bits were divided by);
            ``budget_bits``; ``n_groups``, ``n_options``, ``n_options_kept`` (after dominance);
            ``greedy_steps_taken``; ``n_free_groups``, ``n_free_options`` (left after
            reduced-cost fixing); ``dp_states_max`` (largest layer), ``dp_work``; ``time_s``.
        members: group name -> its Linear names (for :meth:`per_linear`).
    """

    choice: dict[str, str]
    total_bits: int
    total_dloss: float
    bpp: float
    stats: dict
    members: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def per_linear(self) -> dict[str, str]:
        """Linear name -> format, every member of every group."""
        return {m: self.choice[g] for g, ms in self.members.items() for m in ms}


class InfeasibleBudgetError(ValueError):
    """The budget is below the bits of every group at its smallest option.

    Attributes ``max_bits`` (asked), ``min_bits`` and ``min_bpp`` (the smallest feasible budget,
    ``min_bpp`` rounded up to 6 decimals so that ``budget_from_bpp(groups, min_bpp) >= min_bits``).
    """

    def __init__(self, max_bits: int, min_bits: int, params: int) -> None:
        self.max_bits = int(max_bits)
        self.min_bits = int(min_bits)
        self.min_bpp = _ceil_decimal(min_bits, params, 6)
        super().__init__(
            f"budget of {max_bits} bits ({max_bits / params:.6f} bpp) is below the smallest feasible "
            f"budget of {min_bits} bits ({self.min_bpp} bpp: every group at its smallest format); "
            f"raise the budget to at least {min_bits} bits / {self.min_bpp} bpp, or offer a smaller "
            "format to the groups."
        )


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


def fuse_options(per_member: Sequence[Sequence[Option]]) -> tuple[Option, ...]:
    """Options of a fused group from its members' options.

    A format is offered to the group only if every member offers it; the group's bits are the
    members' bits summed (each member keeps its own tensors on disk) and its Δloss the members'
    Δlosses summed (``math.fsum``). Formats keep the first member's order.
    """
    if not per_member:
        raise ValueError("fuse_options needs the options of at least one member.")
    maps = [{o.format: o for o in opts} for opts in per_member]
    out = []
    for o in per_member[0]:
        if all(o.format in m for m in maps):
            out.append(
                Option(
                    o.format,
                    sum(m[o.format].bits for m in maps),
                    math.fsum(m[o.format].dloss for m in maps),
                )
            )
    if not out:
        raise ValueError(
            "the members of this fused group share no format; offer at least one common format (bf16)."
        )
    return tuple(out)


def total_params(groups: Sequence[Group]) -> int:
    """Sum of the groups' parameter counts."""
    _validate(groups)
    return sum(g.params for g in groups)


def min_feasible_bits(groups: Sequence[Group]) -> int:
    """The smallest budget with a solution: every group at its option of fewest bits."""
    _validate(groups)
    return sum(min(o.bits for o in g.options) for g in groups)


def budget_from_bpp(groups: Sequence[Group], bpp: float | Fraction | int) -> int:
    """``floor(bpp * total params)`` bits, computed exactly.

    A float ``bpp`` is read as its shortest decimal form (``6.1`` means 61/10, not the binary
    float just below it), so ``budget_from_bpp(groups, 6.1)`` is what a user typing 6.1 expects.
    """
    if isinstance(bpp, bool) or not isinstance(bpp, (Real, Fraction)):
        raise ValueError(f"bpp must be a number, got {bpp!r}.")
    if isinstance(bpp, float):
        if not math.isfinite(bpp):
            raise ValueError(f"bpp must be finite, got {bpp!r}.")
        frac = Fraction(repr(bpp))
    else:
        frac = Fraction(bpp)
    if frac < 0:
        raise ValueError(f"bpp must be >= 0, got {bpp!r}.")
    return math.floor(frac * total_params(groups))


def allocate(groups: Sequence[Group], *, max_bits: int, max_work: int = DEFAULT_MAX_WORK) -> Allocation:
    """Choose one option per group minimising total Δloss with total bits ``<= max_bits``.

    Exact (see the module docstring for the proof) unless the dynamic programme would need
    more than ``max_work`` units of work (states times options), in which case the best solution
    found is returned with ``stats["exact"] = False`` and its certified gap (the optimum lies in
    ``[stats["lower_bound"], total_dloss]``). A budget above every option's bits gives each
    group its least-Δloss option (ties to fewer bits, then to the earlier option). See
    :class:`Allocation` for the statistics.

    Raises:
        ValueError: invalid groups (empty list, duplicate names or members) or budget.
        InfeasibleBudgetError: ``max_bits`` below :func:`min_feasible_bits`.
    """
    t0 = time.perf_counter()
    _validate(groups)
    if isinstance(max_bits, bool) or not isinstance(max_bits, Integral):
        raise ValueError(
            f"max_bits must be an integer number of bits, got {max_bits!r}; "
            "use budget_from_bpp(groups, bpp) to convert bits per parameter."
        )
    max_bits = int(max_bits)
    if isinstance(max_work, bool) or not isinstance(max_work, Integral) or max_work < 0:
        raise ValueError(f"max_work must be a non-negative integer, got {max_work!r}.")
    n_params = sum(g.params for g in groups)
    min_bits = sum(min(o.bits for o in g.options) for g in groups)
    if max_bits < min_bits:
        raise InfeasibleBudgetError(max_bits, min_bits, n_params)

    # Exact integer Δloss: D = dloss * 2**s.
    s = 0
    for g in groups:
        for o in g.options:
            s = max(s, o.dloss.as_integer_ratio()[1].bit_length() - 1)

    def exact(x: float) -> int:
        num, den = x.as_integer_ratio()
        return num << (s - (den.bit_length() - 1))

    # Step 1: per group, non-dominated options sorted by bits ascending, D strictly descending.
    kept: list[list[tuple[int, int, int]]] = []  # (bits, D, original option index)
    for g in groups:
        cand = sorted((o.bits, exact(o.dloss), i) for i, o in enumerate(g.options))
        front: list[tuple[int, int, int]] = []
        for c in cand:
            if not front or c[1] < front[-1][1]:
                front.append(c)
        kept.append(front)

    unit = 0
    for front in kept:
        for b, _, _ in front:
            unit = math.gcd(unit, b)
    unit = unit or 1
    budget = max_bits // unit
    opts = [[(b // unit, d, i) for b, d, i in front] for front in kept]

    # Step 2: greedy on lower convex hulls -> LP break (lambda = p/q) and an incumbent.
    p, q, incumbent, greedy_pos = _hull_greedy(opts, budget, s)
    ub = sum(opts[gi][k][1] for gi, k in enumerate(incumbent))

    # Step 3: integer reduced costs q*D + p*b, and fixing.
    lag_sum = 0
    rcs: list[list[int]] = []
    for front in opts:
        w = [q * d + p * b for b, d, _ in front]
        m = min(w)
        lag_sum += m
        rcs.append([x - m for x in w])
    lb_scaled = lag_sum - p * budget  # q * L(lambda), in Δloss units of 2**-s
    gap = q * ub - lb_scaled
    if gap < 0:  # impossible by weak duality; guard against a logic error
        raise AssertionError("internal error: incumbent below the Lagrangian bound")

    choice_idx: list[int] = [-1] * len(groups)
    fixed_bits = 0
    free: list[_FreeGroup] = []
    for gi, front in enumerate(opts):
        surv = [(b, d, r, i) for (b, d, i), r in zip(front, rcs[gi], strict=True) if r <= gap]
        # o0: the Lagrangian minimiser (reduced cost 0) with fewest bits; it always survives.
        base = next(o for o in surv if o[2] == 0)
        if len(surv) == 1:
            fixed_bits += base[0]
            choice_idx[gi] = base[3]
        else:
            free.append(_FreeGroup(gi, surv, base[0], base[3]))

    # Step 4: Pareto DP over the free groups.
    # The DP allocates many small tuples and frees none until it returns: the cyclic garbage
    # collector would only rescan them (about half the run time), so it is paused meanwhile.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        dp = _pareto_dp(free, budget - fixed_bits, gap, p, max_work)
    finally:
        if gc_was_enabled:
            gc.enable()
    for fg, i in zip(free, dp.choice, strict=True):
        choice_idx[fg.index] = i
    if dp.exact:
        method = "lagrangian-bound + reduced-cost fixing" + (" + pareto-dp" if free else "")
    elif dp.improved:
        method = "best completion found by the dp (work limit reached)"
    else:
        for gi, k in enumerate(incumbent):
            choice_idx[gi] = opts[gi][k][2]
        method = "greedy incumbent (dp work limit reached)"
    exact_solution = dp.exact

    chosen = [groups[gi].options[i] for gi, i in enumerate(choice_idx)]
    total_bits = sum(o.bits for o in chosen)
    total_d = sum(exact(o.dloss) for o in chosen)
    if total_bits > max_bits:  # impossible by construction; never hand out an overshoot
        raise AssertionError(f"internal error: {total_bits} bits chosen for a {max_bits}-bit budget")
    scale = 1 << s
    lower_bound = lb_scaled / (q * scale)
    total_dloss = total_d / scale
    stats = {
        "method": method,
        "exact": exact_solution,
        "budget_bits": max_bits,
        "n_groups": len(groups),
        "n_options": sum(len(g.options) for g in groups),
        "n_options_kept": sum(len(f) for f in opts),
        "bits_unit": unit,
        "lambda": p / (q * scale) / unit,
        "lower_bound": lower_bound,
        "greedy_dloss": ub / scale,
        "greedy_gap": gap / (q * scale),
        "gap": 0.0 if exact_solution else (q * total_d - lb_scaled) / (q * scale),
        "greedy_steps_taken": greedy_pos,
        "n_free_groups": len(free),
        "n_free_options": sum(len(f.options) for f in free),
        "dp_states_max": dp.states_max,
        "dp_work": dp.work,
        "time_s": time.perf_counter() - t0,
    }
    return Allocation(
        choice={g.name: o.format for g, o in zip(groups, chosen, strict=True)},
        total_bits=total_bits,
        total_dloss=total_dloss,
        bpp=total_bits / n_params,
        stats=stats,
        members={g.name: g.members for g in groups},
    )


def pareto_sweep(
    groups: Sequence[Group], budgets_bpp: Sequence[float], *, max_work: int = DEFAULT_MAX_WORK
) -> list[Allocation]:
    """One :func:`allocate` per budget (in bits per parameter), returned in the given order.

    Exact allocations are monotone by construction (a larger budget admits every smaller
    budget's answer). Should the work limit make one inexact, a smaller budget's better answer
    is carried up so that Δloss never increases with the budget.

    Raises:
        InfeasibleBudgetError: if any budget is below :func:`min_feasible_bits`.
    """
    budgets = [budget_from_bpp(groups, b) for b in budgets_bpp]
    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    out: list[Allocation | None] = [None] * len(budgets)
    best: Allocation | None = None
    for i in order:
        a = allocate(groups, max_bits=budgets[i], max_work=max_work)
        if best is not None and best.total_dloss < a.total_dloss:
            a = Allocation(
                choice=dict(best.choice),
                total_bits=best.total_bits,
                total_dloss=best.total_dloss,
                bpp=best.bpp,
                stats={**a.stats, "method": a.stats["method"] + " (carried from a smaller budget)"},
                members=best.members,
            )
        best = a
        out[i] = a
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _validate(groups: Sequence[Group]) -> None:
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise ValueError(f"groups must be a sequence of Group, got {type(groups).__name__}.")
    if len(groups) == 0:
        raise ValueError("no groups to allocate; pass at least one Group (one per Linear or fused set).")
    names: set[str] = set()
    members: set[str] = set()
    for g in groups:
        if not isinstance(g, Group):
            raise ValueError(f"groups must hold Group objects, got {g!r}.")
        if g.name in names:
            raise ValueError(f"two groups are named {g.name!r}; group names must be unique.")
        names.add(g.name)
        for m in g.members:
            if m in members:
                raise ValueError(f"Linear {m!r} is in two groups; each Linear belongs to exactly one group.")
            members.add(m)


def _ceil_decimal(num: int, den: int, digits: int) -> str:
    """``num/den`` rounded up to ``digits`` decimals, as a string."""
    scale = 10**digits
    v = -(-num * scale // den)
    return f"{v // scale}.{v % scale:0{digits}d}"


def _hull_greedy(
    opts: list[list[tuple[int, int, int]]], budget: int, scale_bits: int
) -> tuple[int, int, list[int], int]:
    """Greedy on lower convex hulls (LP relaxation of the multiple-choice knapsack).

    ``opts[g]`` is the group's non-dominated options (bits ascending, D strictly descending);
    ``D = Δloss * 2**scale_bits``.
    Returns ``(p, q, incumbent, steps)``: the break efficiency ``p/q`` (Δloss units saved per
    bit unit; ``0/1`` when everything fits), the incumbent's option position per group, and the
    number of hull steps taken.
    """
    hulls: list[list[int]] = []
    for front in opts:
        h: list[int] = []
        for k, (b, d, _) in enumerate(front):
            # Keep the hull strictly convex: drop the middle point when it is on or above the
            # chord (slopes must strictly increase, i.e. savings per bit strictly decrease).
            while len(h) >= 2:
                b1, d1, _ = front[h[-2]]
                b2, d2, _ = front[h[-1]]
                if (d2 - d1) * (b - b1) >= (d - d1) * (b2 - b1):
                    h.pop()
                else:
                    break
            h.append(k)
        hulls.append(h)

    incs = []  # (-efficiency, group, step, dbits, dD)
    for gi, h in enumerate(hulls):
        front = opts[gi]
        for step in range(len(h) - 1):
            b1, d1, _ = front[h[step]]
            b2, d2, _ = front[h[step + 1]]
            # Δloss saved per bit unit as a float sort key (the int division is correctly
            # rounded; dividing by 2**scale_bits inside it keeps the value in float range).
            try:
                eff = (d1 - d2) / ((b2 - b1) << scale_bits)
            except OverflowError:
                eff = math.inf
            incs.append((-eff, gi, step, b2 - b1, d1 - d2))
    # Correctly rounded division is monotone, so float keys never invert two steps of one
    # group; exact ties fall back to (group, step), which keeps each group's steps in order.
    incs.sort()
    pos = [0] * len(opts)
    used = sum(front[0][0] for front in opts)
    rem = budget - used
    blocked = [False] * len(opts)
    p, q = 0, 1
    found_break = False
    taken = 0
    for _, gi, step, db, dd in incs:
        if blocked[gi] or pos[gi] != step:
            continue
        if db <= rem:
            rem -= db
            pos[gi] = step + 1
            taken += 1
        else:
            if not found_break:
                p, q = dd, db
                found_break = True
            blocked[gi] = True
    incumbent = [hulls[gi][pos[gi]] for gi in range(len(opts))]
    return p, q, incumbent, taken


@dataclass
class _FreeGroup:
    index: int  # position in the input
    options: list[tuple[int, int, int, int]]  # (bits, D, reduced cost, original index), bits ascending
    base_bits: int  # bits of o0, the fewest-bits option of reduced cost 0
    base_index: int  # original index of o0


@dataclass
class _DPResult:
    choice: list[int]  # original option index per free group, in the order given
    exact: bool
    improved: bool  # (inexact only) a completion better than the greedy incumbent was found
    states_max: int
    work: int


def _rate_bounds(fg: _FreeGroup) -> tuple[Fraction | None, Fraction | None]:
    """Least reduced cost per bit of moving this group up (more bits) and down from o0."""
    up = down = None
    for b, _, r, _ in fg.options:
        if b > fg.base_bits:
            v = Fraction(r, b - fg.base_bits)
            up = v if up is None or v < up else up
        elif b < fg.base_bits:
            v = Fraction(r, fg.base_bits - b)
            down = v if down is None or v < down else down
    return up, down


def _pareto_dp(free: list[_FreeGroup], budget: int, gap: int, p: int, max_work: int) -> _DPResult:
    """Exact Pareto DP over the free groups (Step 4 of the module docstring).

    Works in reduced-cost units: a complete choice ``x`` has *deficit* ``q·Δloss(x) - q·L(λ) =
    R(x) + p·slack(x) >= 0`` where ``R`` is the sum of reduced costs. Only choices of deficit
    ``<= gap`` (the incumbent's) can matter. For a partial state with reduced cost ``R`` and
    bits ``b``, let ``E`` be the budget left once every remaining group sits at ``o0``. Each
    remaining group moving up by ``Δ`` bits pays at least ``α·Δ`` and moving down pays at least
    ``β·Δ`` (``α``, ``β``: least rates among the remaining groups, ``α`` capped at ``p``, the
    price of a bit left unused), so any completion has deficit ``>= R + α·E`` if ``E >= 0`` and
    ``>= R + β·(-E)`` otherwise (infinite without a way down). States above ``gap`` are dropped.
    A state with ``E >= 0`` completes feasibly with the remaining groups at ``o0`` (deficit
    ``R + p·E``), which lowers ``gap`` on the fly. Groups are processed with the smallest rates
    first, so the rates of the remaining groups, hence the bound, grow as the DP advances.
    """
    n = len(free)
    if n == 0:
        return _DPResult([], True, False, 1, 0)
    rates = [_rate_bounds(fg) for fg in free]
    inf_key = Fraction(p + 1)

    def key(j: int) -> tuple[Fraction, int]:
        up, down = rates[j]
        cands = [v for v in (up, down) if v is not None]
        return (min(cands) if cands else inf_key, free[j].index)

    order = sorted(range(n), key=key)
    rank = {j: k for k, j in enumerate(order)}

    # Suffix data over the processing order (position n = nothing left).
    alpha: list[Fraction] = [Fraction(p)] * (n + 1)
    beta: list[Fraction | None] = [None] * (n + 1)
    base_suffix = [0] * (n + 1)
    min_suffix = [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        fg = free[order[k]]
        up, down = rates[order[k]]
        alpha[k] = alpha[k + 1] if up is None or up >= alpha[k + 1] else up
        beta[k] = beta[k + 1] if down is None or (beta[k + 1] is not None and down >= beta[k + 1]) else down
        base_suffix[k] = base_suffix[k + 1] + fg.base_bits
        min_suffix[k] = min_suffix[k + 1] + fg.options[0][0]
    if min_suffix[0] > budget:  # cannot happen: the incumbent is feasible
        raise AssertionError("internal error: free groups cannot fit the remaining budget")

    # Exact ties in (bits, Δloss) are broken by the option-index vector in input order. Nodes
    # are (option, parent, input rank of the group); two nodes of one layer are compared by
    # walking up to their common ancestor, and the walk counts as work.
    input_rank = {j: r for r, j in enumerate(sorted(range(n), key=lambda j: free[j].index))}
    walked = [0]

    def earlier(x: tuple, y: tuple) -> bool:
        """Whether node ``x`` precedes node ``y`` (same layer) in input-order lexicographic order."""
        best_rank = n
        result = False
        steps = 0
        while x is not y:
            if x[0] != y[0] and x[2] < best_rank:
                best_rank = x[2]
                result = x[0] < y[0]
            x, y = x[1], y[1]
            steps += 1
        walked[0] += steps
        return result

    states: list[tuple[int, int, int, tuple | None]] = [(0, 0, 0, None)]  # (bits, D, R, node)
    work = 0
    states_max = 1
    best_completion: tuple[int, tuple | None] | None = None  # (layer, node)
    for k in range(n):
        fg = free[order[k]]
        work += walked[0]
        walked[0] = 0
        layer_work = len(states) * len(fg.options)  # bounds this layer's candidates (and memory)
        if work + layer_work > max_work:
            return _fallback(free, order, best_completion, states_max, work)
        work += layer_work
        rank_k = input_rank[order[k]]
        cap = budget - min_suffix[k + 1]
        room = budget - base_suffix[k + 1]  # E = room - bits
        a_num, a_den = alpha[k + 1].numerator, alpha[k + 1].denominator
        can_down = beta[k + 1] is not None
        b_num, b_den = (beta[k + 1].numerator, beta[k + 1].denominator) if can_down else (0, 1)
        gap_at_start = gap
        gap_a, gap_b = gap * a_den, gap * b_den
        cand = []
        append = cand.append
        for b, d, r, node in states:
            for ob, od, orc, oi in fg.options:
                nb = b + ob
                if nb > cap:
                    break
                nr = r + orc
                if nr > gap:
                    continue
                e = room - nb
                if e >= 0:
                    if nr * a_den + a_num * e > gap_a:
                        continue
                    done = nr + p * e
                    if done < gap:
                        gap = done
                        gap_a, gap_b = gap * a_den, gap * b_den
                        best_completion = (k, (oi, node, rank_k))
                elif not can_down or nr * b_den - b_num * e > gap_b:
                    continue
                append((nb, d + od, nr, (oi, node, rank_k)))
        if gap < gap_at_start:  # the bound tightened during this layer: filter again
            cand = [
                c
                for c in cand
                if (
                    c[2] * a_den + a_num * (room - c[0]) <= gap_a
                    if room >= c[0]
                    else can_down and c[2] * b_den + b_num * (c[0] - room) <= gap_b
                )
            ]
        cand.sort(key=_bits_and_d)
        out: list[tuple[int, int, int, tuple | None]] = []
        for c in cand:
            if out and c[0] == out[-1][0] and c[1] == out[-1][1]:
                if earlier(c[3], out[-1][3]):
                    out[-1] = c
                continue
            if not out or c[1] < out[-1][1]:
                out.append(c)
        states = out
        states_max = max(states_max, len(states))
        if not states:  # cannot happen: the optimum's prefix (or a dominating one) survives
            raise AssertionError("internal error: dynamic programme lost every state")
    work += walked[0]
    best = states[-1]  # bits ascending, D strictly descending: the last has least D, then bits
    path = _path(best[3])
    choice = [path[rank[j]] for j in range(n)]
    return _DPResult(choice, True, False, states_max, work)


def _fallback(
    free: list[_FreeGroup],
    order: list[int],
    best: tuple[int, tuple | None] | None,
    states_max: int,
    work: int,
) -> _DPResult:
    """Inexact exit: the best completion seen (prefix from the DP, the rest at o0), if any."""
    if best is None:
        return _DPResult([fg.base_index for fg in free], False, False, states_max, work)
    choice = [fg.base_index for fg in free]
    for k, i in enumerate(_path(best[1])):
        choice[order[k]] = i
    return _DPResult(choice, False, True, states_max, work)


def _path(node: tuple | None) -> list[int]:
    out: list[int] = []
    while node is not None:
        out.append(node[0])
        node = node[1]
    out.reverse()
    return out
