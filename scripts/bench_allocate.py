"""Benchmark the exact allocator on a realistic, large instance.

Builds ``--linears`` Linears (default 10,000) from Llama-like decoder shapes, grouped the way
they are served (q/k/v fused, gate/up fused, o and down alone), prices four formats with their
exact on-disk bits, draws random Δloss values with a realistic spread, allocates at ``--bpp``
and prints the wall time and the solver's statistics. Timing is printed, not asserted.
``--degenerate`` replaces the Δlosses by ones proportional to the bits saved (every format saving
Δloss at the same rate per bit, up to 1e-6 noise): a subset-sum-like worst case that shows the
work limit and the certified gap of the fallback.

    .venv/bin/python scripts/bench_allocate.py
    .venv/bin/python scripts/bench_allocate.py --bpp 5.0 6.0 8.0 --repeat 3
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from pq_lightning.allocate import Group, Option, allocate, budget_from_bpp, min_feasible_bits

# (hidden, kv_dim, intermediate) of a few Llama-like decoders.
SHAPES = {
    "llama3-8b": (4096, 1024, 14336),
    "llama2-7b": (4096, 4096, 11008),
    "small-1b": (2048, 512, 8192),
    "tiny": (576, 192, 1536),
}


def bits_bf16(out: int, inp: int) -> int:
    return out * inp * 16


def bits_fp8(out: int, inp: int) -> int:
    # float8 weight + one fp32 scale per output channel
    return out * inp * 8 + out * 32


def bits_nvfp4a16(out: int, inp: int) -> int:
    # 4-bit codes + one fp8 scale per 16 inputs + fp32 weight global scale
    return out * inp * 4 + out * (inp // 16) * 8 + 32


def bits_nvfp4(out: int, inp: int) -> int:
    # as nvfp4a16 plus the fp32 input global scale
    return bits_nvfp4a16(out, inp) + 32


FORMATS = {
    "bf16": (bits_bf16, 0.0),
    "fp8": (bits_fp8, 0.02),
    "nvfp4a16": (bits_nvfp4a16, 0.45),
    "nvfp4": (bits_nvfp4, 1.0),
}


def layer_linears(hidden: int, kv: int, inter: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """(group suffix, [(member suffix, out, in)]) of one decoder layer, in serving groups."""
    return [
        ("self_attn.qkv", [("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", kv, hidden),
                           ("self_attn.v_proj", kv, hidden)]),
        ("self_attn.o_proj", [("self_attn.o_proj", hidden, hidden)]),
        ("mlp.gate_up", [("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden)]),
        ("mlp.down_proj", [("mlp.down_proj", hidden, inter)]),
    ]  # fmt: skip


def build_groups(n_linears: int, seed: int) -> list[Group]:
    rng = np.random.default_rng(seed)
    configs = list(SHAPES.values())
    groups: list[Group] = []
    count = 0
    layer = 0
    while count < n_linears:
        hidden, kv, inter = configs[layer % len(configs)]
        for gname, members in layer_linears(hidden, kv, inter):
            members = members[: n_linears - count]
            if not members:
                break
            per_format_bits = {f: 0 for f in FORMATS}
            per_format_d = {f: [] for f in FORMATS}
            for _, out, inp in members:
                sens = float(rng.lognormal(mean=0.0, sigma=1.5)) * out * inp * 1e-9
                for f, (bits_fn, rel) in FORMATS.items():
                    per_format_bits[f] += bits_fn(out, inp)
                    noise = float(rng.lognormal(0.0, 0.3)) if rel else 0.0
                    per_format_d[f].append(sens * rel * noise)
            options = tuple(Option(f, per_format_bits[f], math.fsum(per_format_d[f])) for f in FORMATS)
            params = sum(out * inp for _, out, inp in members)
            groups.append(
                Group(
                    f"model.layers.{layer}.{gname}",
                    tuple(f"model.layers.{layer}.{m}" for m, _, _ in members),
                    params,
                    options,
                )
            )
            count += len(members)
        layer += 1
    return groups


def degenerate(groups: list[Group], seed: int) -> list[Group]:
    """Same groups, Δloss = bits saved against bf16 * 1e-12 * (1 + 1e-6 noise)."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for g in groups:
        top = max(o.bits for o in g.options)
        opts = tuple(
            Option(o.format, o.bits, (top - o.bits) * 1e-12 * (1 + 1e-6 * float(rng.random())))
            for o in g.options
        )
        out.append(Group(g.name, g.members, g.params, opts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--linears", type=int, default=10_000, help="number of Linears (default 10000)")
    ap.add_argument("--bpp", type=float, nargs="+", default=[6.0], help="budgets in bits per parameter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeat", type=int, default=1, help="allocations per budget (first and best time shown)"
    )
    ap.add_argument("--degenerate", action="store_true", help="equal-efficiency Δlosses (worst case)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    groups = build_groups(args.linears, args.seed)
    if args.degenerate:
        groups = degenerate(groups, args.seed)
    t_build = time.perf_counter() - t0
    params = sum(g.params for g in groups)
    n_lin = sum(len(g.members) for g in groups)
    print(f"instance: {n_lin} Linears in {len(groups)} groups, {params / 1e9:.3f} B params, "
          f"{len(next(iter(groups)).options)} formats; built in {t_build:.2f} s")  # fmt: skip
    print(f"smallest feasible: {min_feasible_bits(groups) / params:.4f} bpp")
    for bpp in args.bpp:
        budget = budget_from_bpp(groups, bpp)
        times = []
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            a = allocate(groups, max_bits=budget)
            times.append(time.perf_counter() - t0)
        counts: dict[str, int] = {}
        for f in a.choice.values():
            counts[f] = counts.get(f, 0) + 1
        st = a.stats
        print(f"\n--- budget {bpp} bpp = {budget} bits ---")
        print(f"allocate wall time: {times[0]:.3f} s first run, {min(times):.3f} s best of {len(times)}")
        print(f"result: {a.bpp:.6f} bpp ({a.total_bits} bits, slack {budget - a.total_bits}), "
              f"total dloss {a.total_dloss:.9g}")  # fmt: skip
        print(f"formats per group: {dict(sorted(counts.items()))}")
        print(f"method: {st['method']}; exact: {st['exact']}; certified gap: {st['gap']:.3g}")
        print(f"LP lower bound {st['lower_bound']:.9g}; greedy {st['greedy_dloss']:.9g} "
              f"(gap {st['greedy_gap']:.3g}); bits unit (gcd) {st['bits_unit']}")  # fmt: skip
        print(f"free groups after reduced-cost fixing: {st['n_free_groups']} "
              f"({st['n_free_options']} options); dp states max {st['dp_states_max']}, work {st['dp_work']}")  # fmt: skip


if __name__ == "__main__":
    main()
