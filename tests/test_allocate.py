"""Tests of the exact multiple-choice knapsack allocator against exhaustive enumeration."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from pq_lightning.allocate import (
    Allocation,
    Group,
    InfeasibleBudgetError,
    Option,
    allocate,
    budget_from_bpp,
    fuse_options,
    min_feasible_bits,
    pareto_sweep,
)


def brute_force(groups: list[Group], max_bits: int) -> tuple[dict[str, str], int, Fraction] | None:
    """Plain enumeration: least exact Δloss, then fewest bits, then smallest option-index vector."""
    best = None
    for combo in itertools.product(*(range(len(g.options)) for g in groups)):
        opts = [g.options[i] for g, i in zip(groups, combo, strict=True)]
        bits = sum(o.bits for o in opts)
        if bits > max_bits:
            continue
        key = (sum((Fraction(o.dloss) for o in opts), Fraction(0)), bits, combo)
        if best is None or key < best:
            best = key
    if best is None:
        return None
    d, bits, combo = best
    return {g.name: g.options[i].format for g, i in zip(groups, combo, strict=True)}, bits, d


FORMATS = ("bf16", "fp8", "nvfp4", "nvfp4a16", "mxfp6")


def random_groups(rng: random.Random, *, big: bool = False, fused: bool = False) -> list[Group]:
    n = rng.randint(2, 7)
    unit = rng.choice([1, 1, 8, 64, 3 * 128]) if not big else rng.choice([8, 1])
    pool_d = [0.0, 0.0, 0.5, 1.0, 1.25, 2.0]  # repeated values make exact ties likely
    groups = []
    for gi in range(n):
        k = rng.randint(1, 4)
        fmts = rng.sample(FORMATS, k)
        n_members = rng.randint(2, 3) if fused else 1
        per_member = []
        for _ in range(n_members):
            opts = []
            for f in fmts:
                if big:
                    b = rng.randint(10**8, 2 * 10**9) // unit * unit
                    if unit == 1:
                        b |= 1  # odd values: no useful common divisor
                else:
                    b = rng.randint(0, 40) * unit
                if rng.random() < 0.4:
                    d = rng.choice(pool_d)
                else:
                    d = rng.random() * rng.choice([1e-6, 1.0, 1e3])
                opts.append(Option(f, b, d))
            per_member.append(opts)
        members = tuple(f"layers.{gi}.m{j}" for j in range(n_members))
        options = fuse_options(per_member) if fused else tuple(per_member[0])
        groups.append(Group(f"g{gi}", members, rng.randint(1, 10**6), options))
    return groups


def random_budget(rng: random.Random, groups: list[Group]) -> int:
    lo = min_feasible_bits(groups)
    hi = sum(max(o.bits for o in g.options) for g in groups)
    r = rng.random()
    if r < 0.25:
        return lo + rng.randint(0, 2)  # tight
    if r < 0.35:
        return hi + rng.randint(0, 5)  # everything fits
    return rng.randint(lo, hi)


def check_against_brute(groups: list[Group], budget: int) -> Allocation:
    ref = brute_force(groups, budget)
    assert ref is not None
    ref_choice, ref_bits, ref_d = ref
    a = allocate(groups, max_bits=budget)
    assert a.total_bits <= budget
    assert a.stats["exact"] is True
    assert a.choice == ref_choice, (groups, budget)
    assert a.total_bits == ref_bits
    assert a.total_dloss == float(ref_d)  # exact sum rounded once
    assert a.total_dloss == math.fsum(g.option(a.choice[g.name]).dloss for g in groups)
    assert a.stats["lower_bound"] <= a.total_dloss * (1 + 1e-12) + 1e-300
    return a


@pytest.mark.parametrize("seed", range(3))
def test_random_small_instances_match_enumeration(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(100):
        groups = random_groups(rng)
        check_against_brute(groups, random_budget(rng, groups))


def test_fused_groups_match_enumeration() -> None:
    rng = random.Random(7)
    for _ in range(60):
        groups = random_groups(rng, fused=True)
        for g in groups:
            assert len(g.members) >= 2
        check_against_brute(groups, random_budget(rng, groups))


def test_large_bits_match_enumeration() -> None:
    rng = random.Random(11)
    units = set()
    for _ in range(60):
        groups = random_groups(rng, big=True)
        a = check_against_brute(groups, random_budget(rng, groups))
        units.add(a.stats["bits_unit"])
    assert any(u % 8 == 0 for u in units)  # instances with gcd 8 (or a multiple)
    assert 1 in units  # and instances without a useful common divisor


def exact_bits_dp(groups: list[Group], unit: int, max_bits: int) -> tuple[float, int]:
    """Reference DP over every bit total (in ``unit``s): least Δloss, then fewest bits.

    Δlosses are multiples of 1/1024 below 2**30, so float sums are exact."""
    cap = max_bits // unit
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0  # best[c]: least Δloss with exactly c units
    for g in groups:
        new = np.full(cap + 1, np.inf)
        for o in g.options:
            b = o.bits // unit
            if b <= cap:
                new[b:] = np.minimum(new[b:], best[: cap + 1 - b] + o.dloss)
        best = new
    opt = float(best.min())
    return opt, int(np.flatnonzero(best == opt)[0]) * unit


def test_medium_near_degenerate_instances_match_bits_dp() -> None:
    """40 groups whose options all save Δloss at nearly the same rate per bit: the LP bound is
    weak and the dynamic programme does real work; checked against a DP over every bit total."""
    rng = random.Random(17)
    worked = 0
    for _ in range(12):
        unit = 8
        groups = []
        for gi in range(40):
            k = rng.randint(2, 4)
            bits = sorted(rng.sample(range(1, 80), k))
            rate = 1.0 + rng.random() * 0.02
            opts = [
                Option(f"f{j}", b * unit, round((80 - b) * rate * 64 + rng.randint(0, 3)) / 1024)
                for j, b in enumerate(bits)
            ]
            rng.shuffle(opts)
            groups.append(Group(f"g{gi}", (f"w{gi}",), 100, tuple(opts)))
        lo = min_feasible_bits(groups)
        hi = sum(max(o.bits for o in g.options) for g in groups)
        budget = rng.randint(lo, hi)
        opt, opt_bits = exact_bits_dp(groups, unit, budget)
        a = allocate(groups, max_bits=budget)
        assert a.stats["exact"] and a.total_bits <= budget
        assert a.total_dloss == opt and a.total_bits == opt_bits
        worked += a.stats["dp_work"] > 100
        # Any work limit: a feasible answer whose certified interval holds the optimum.
        for max_work in (0, 10, 200):
            b = allocate(groups, max_bits=budget, max_work=max_work)
            assert b.total_bits <= budget
            assert b.stats["lower_bound"] <= opt <= b.total_dloss
            assert b.total_dloss - opt <= b.stats["gap"] + 1e-12
            assert b.stats["exact"] or b.stats["dp_work"] <= max_work
    assert worked >= 6


def test_extreme_dloss_magnitudes_match_enumeration() -> None:
    """Δlosses from subnormal to 1e300 in one instance: exact integer arithmetic, no overflow."""
    rng = random.Random(23)
    values = [0.0, 5e-324, 1e-300, 3e-17, 0.1, 1.0, 7.5, 1e12, 1e300]
    for _ in range(40):
        groups = []
        for gi in range(rng.randint(2, 5)):
            opts = tuple(
                Option(f"f{j}", rng.randint(1, 50) * 16, rng.choice(values) * (1 + rng.random()))
                for j in range(rng.randint(1, 4))
            )
            groups.append(Group(f"g{gi}", (f"w{gi}",), 10, opts))
        check_against_brute(groups, random_budget(rng, groups))


def test_fuse_options_sums_members_and_drops_missing_formats() -> None:
    q = [Option("bf16", 160, 0.0), Option("fp8", 80, 0.25), Option("nvfp4", 45, 1.5)]
    k = [Option("fp8", 40, 0.5), Option("bf16", 80, 0.0)]
    fused = fuse_options([q, k])
    assert fused == (Option("bf16", 240, 0.0), Option("fp8", 120, 0.75))


def test_hand_computed_example() -> None:
    a = Group("a", ("a",), 10, (Option("bf16", 160, 0.0), Option("fp8", 80, 1.0), Option("nvfp4", 45, 3.0)))
    b = Group("b", ("b",), 10, (Option("bf16", 160, 0.0), Option("fp8", 80, 2.0), Option("nvfp4", 45, 2.5)))
    # 200 bits: bf16+nvfp4 = 205 does not fit; fp8+fp8 = 160 bits, Δloss 3.0 beats
    # fp8+nvfp4 (125 bits, 3.5) and nvfp4+fp8 (125, 5.0).
    r = allocate([a, b], max_bits=200)
    assert r.choice == {"a": "fp8", "b": "fp8"}
    assert (r.total_bits, r.total_dloss, r.bpp) == (160, 3.0, 8.0)
    # LP relaxation by hand: start at nvfp4+nvfp4 (90 bits, 5.5). Hull steps by Δloss saved per bit:
    # a nvfp4->fp8 2/35, b nvfp4->bf16 2.5/115 (b's fp8 lies above that chord), a fp8->bf16 1/80.
    # a's first step fits (125 bits, 3.5); b's does not (75 bits left): λ = 2.5/115, so the bound is
    # 3.5 - 75 * 2.5/115 = 43/23, and the greedy incumbent (a fp8->bf16 needs 80 > 75) is 3.5.
    assert r.stats["lower_bound"] == float(Fraction(43, 23))
    assert r.stats["greedy_dloss"] == 3.5
    assert r.stats["lambda"] == float(Fraction(25, 1150))
    r = allocate([a, b], max_bits=240)
    assert r.choice == {"a": "fp8", "b": "bf16"} and r.total_dloss == 1.0
    assert r.per_linear() == {"a": "fp8", "b": "bf16"}


def test_infeasible_budget_reports_smallest_feasible() -> None:
    rng = random.Random(3)
    for _ in range(20):
        groups = random_groups(rng)
        lo = min_feasible_bits(groups)
        assert lo == sum(min(o.bits for o in g.options) for g in groups)
        params = sum(g.params for g in groups)
        if lo == 0:
            continue
        with pytest.raises(InfeasibleBudgetError) as info:
            allocate(groups, max_bits=lo - 1)
        err = info.value
        assert err.min_bits == lo and err.max_bits == lo - 1
        assert f"{lo} bits" in str(err)
        assert err.min_bpp in str(err)
        assert float(err.min_bpp) >= lo / params and float(err.min_bpp) - lo / params < 1.01e-6
        # The advertised bpp is enough: it converts back to a feasible budget.
        assert budget_from_bpp(groups, float(err.min_bpp)) >= lo
        allocate(groups, max_bits=lo)  # and the bits figure itself is feasible


def test_infeasible_error_is_value_error_with_hand_numbers() -> None:
    g = Group("g", ("w",), 1000, (Option("bf16", 16000, 0.0), Option("nvfp4", 4532, 2.0)))
    with pytest.raises(ValueError, match=r"4532 bits \(4.532000 bpp"):
        allocate([g], max_bits=4000)


def test_budget_above_everything_takes_min_dloss_ties_to_fewer_bits() -> None:
    g1 = Group("g1", ("x",), 4, (Option("a", 64, 0.0), Option("b", 32, 0.0), Option("c", 16, 1.0)))
    g2 = Group("g2", ("y",), 4, (Option("a", 64, 0.5), Option("b", 64, 0.5), Option("c", 16, 0.25)))
    r = allocate([g1, g2], max_bits=10**12)
    assert r.choice == {"g1": "b", "g2": "c"}
    assert r.total_bits == 48 and r.total_dloss == 0.25 and r.bpp == 6.0


def test_exact_ties_prefer_earlier_option() -> None:
    g1 = Group("g1", ("x",), 1, (Option("p", 10, 1.0), Option("q", 10, 1.0)))
    g2 = Group("g2", ("y",), 1, (Option("p", 5, 0.0), Option("q", 5, 0.0), Option("r", 1, 0.0)))
    r = allocate([g1, g2], max_bits=20)
    assert r.choice == {"g1": "p", "g2": "r"}


def test_deterministic() -> None:
    rng = random.Random(5)
    for _ in range(10):
        groups = random_groups(rng, fused=True)
        budget = random_budget(rng, groups)
        runs = [allocate(groups, max_bits=budget) for _ in range(2)]
        # Equal inputs rebuilt from scratch give the same answer too.
        rebuilt = [
            Group(g.name, g.members, g.params, tuple(Option(o.format, o.bits, o.dloss) for o in g.options))
            for g in groups
        ]
        runs.append(allocate(rebuilt, max_bits=budget))
        for r in runs[1:]:
            assert (r.choice, r.total_bits, r.total_dloss) == (
                runs[0].choice,
                runs[0].total_bits,
                runs[0].total_dloss,
            )
            assert r.stats["lower_bound"] == runs[0].stats["lower_bound"]


def test_pareto_sweep_monotone_and_exact() -> None:
    rng = random.Random(21)
    strictly_improving = 0
    for _ in range(10):
        groups = random_groups(rng)
        params = sum(g.params for g in groups)
        lo = min_feasible_bits(groups) / params
        hi = sum(max(o.bits for o in g.options) for g in groups) / params
        budgets = [math.ceil((lo + (hi - lo) * t / 7) * 1e4) / 1e4 for t in range(8)]
        rev = list(reversed(budgets))  # any order in, same order out
        sweep = pareto_sweep(groups, rev)
        assert len(sweep) == len(rev)
        for bpp, a in zip(rev, sweep, strict=True):
            bits = budget_from_bpp(groups, bpp)
            assert a.total_bits <= bits
            ref = brute_force(groups, bits)
            assert ref is not None and a.total_dloss == float(ref[2])
        d = [a.total_dloss for _, a in sorted(zip(rev, sweep, strict=True), key=lambda t: t[0])]
        assert all(x >= y for x, y in zip(d, d[1:], strict=False))
        strictly_improving += d[0] > d[-1]
    assert strictly_improving >= 5


def test_budget_from_bpp_is_exact_decimal() -> None:
    g = Group("g", ("w",), 10, (Option("bf16", 160, 0.0),))
    # 6.1 * 10 is 60.99999999999999 in binary floating point; the budget is the decimal 61.
    assert budget_from_bpp([g], 6.1) == 61
    assert budget_from_bpp([g], Fraction(13, 3)) == 43
    assert budget_from_bpp([g], 0) == 0
    with pytest.raises(ValueError):
        budget_from_bpp([g], -1.0)


def test_work_limit_falls_back_to_certified_incumbent() -> None:
    rng = random.Random(4)
    seen_fallback = 0
    for _ in range(80):
        groups = random_groups(rng)
        budget = random_budget(rng, groups)
        ref = brute_force(groups, budget)
        assert ref is not None
        a = allocate(groups, max_bits=budget, max_work=0)
        assert a.total_bits <= budget
        lb, gap = a.stats["lower_bound"], a.stats["gap"]
        opt = float(ref[2])
        assert lb <= opt * (1 + 1e-12) + 1e-300
        assert a.total_dloss >= opt
        if not a.stats["exact"]:
            seen_fallback += 1
            assert a.total_dloss - opt <= gap * (1 + 1e-9) + 1e-300
            assert abs((a.total_dloss - lb) - gap) <= 1e-12 * max(abs(a.total_dloss), abs(lb)) + 1e-300
        else:
            assert a.total_dloss == opt
    assert seen_fallback > 0


def test_dominated_options_dropped_and_counted() -> None:
    g = Group(
        "g",
        ("w",),
        8,
        (Option("bf16", 128, 0.0), Option("bad", 130, 0.5), Option("fp8", 64, 0.1), Option("same", 64, 0.1)),
    )
    r = allocate([g], max_bits=200)
    assert r.stats["n_options"] == 4 and r.stats["n_options_kept"] == 2
    assert r.choice == {"g": "bf16"}
    r = allocate([g], max_bits=100)
    assert r.choice == {"g": "fp8"}


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="no groups"):
        allocate([], max_bits=10)
    with pytest.raises(ValueError, match="no options"):
        Group("g", ("w",), 4, ())
    with pytest.raises(ValueError, match="bits must be >= 0"):
        Option("fp8", -8, 0.0)
    with pytest.raises(ValueError, match="integer"):
        Option("fp8", 8.0, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        Option("fp8", 8, float("nan"))
    with pytest.raises(ValueError, match="twice"):
        Group("g", ("w",), 4, (Option("fp8", 8, 0.0), Option("fp8", 16, 0.0)))
    a = Group("g", ("w",), 4, (Option("fp8", 8, 0.0),))
    with pytest.raises(ValueError, match="unique"):
        allocate([a, a], max_bits=100)
    b = Group("h", ("w",), 4, (Option("fp8", 8, 0.0),))
    with pytest.raises(ValueError, match="two groups"):
        allocate([a, b], max_bits=100)
    with pytest.raises(ValueError, match="integer number of bits"):
        allocate([a], max_bits=10.5)  # type: ignore[arg-type]
