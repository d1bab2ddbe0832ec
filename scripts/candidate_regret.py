"""What would each GPTQ candidate cost to drop? Read from saved refine decisions.

The refiner records every candidate's held-out output error for each measured Linear
(``work/refine-*.safetensors`` of a ``quantize`` output folder). For the candidate sets given
(the full set with one candidate dropped, by default), this prints how often each candidate won
and the regret of the reduced set: the summed held-out error of the best remaining candidate per
Linear over that of the best of all, in percent (0 = the same decisions). A candidate whose
removal costs nothing on every model and budget can leave the default set.

    python scripts/candidate_regret.py out/run/work/refine-*.safetensors
    python scripts/candidate_regret.py /tmp/peers/ours --drop gptq@0.03 --drop gptq@0.03,sweep+gptq@0.03
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def heldout_rows(decisions: Mapping[str, object], fmt: str = "nvfp4") -> list[dict[str, float]]:
    """Per measured Linear of ``fmt``: candidate -> held-out error (the refit's in-sample one left out)."""
    rows = []
    for d in decisions.values():
        if d.format == fmt and d.errors:
            rows.append({k: v["heldout"] for k, v in d.errors.items() if k != "refit"})
    return rows


def wins(rows: Sequence[Mapping[str, float]]) -> Counter:
    """How many Linears each candidate has the least held-out error on (the first listed wins ties)."""
    return Counter(min(r, key=r.get) for r in rows)


def regret(rows: Sequence[Mapping[str, float]], drop: Iterable[str]) -> float:
    """Summed best held-out error without the ``drop`` candidates over that with all, minus one."""
    drop = set(drop)
    full = sum(min(r.values()) for r in rows)
    kept = 0.0
    for r in rows:
        left = [v for k, v in r.items() if k not in drop]
        if not left:
            raise ValueError(f"dropping {sorted(drop)} leaves no candidate for a Linear with {sorted(r)}")
        kept += min(left)
    return kept / full - 1.0 if full > 0 else 0.0


def _files(paths: Sequence[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += sorted(p.rglob("refine-*.safetensors")) if p.is_dir() else [p]
    if not out:
        raise SystemExit(f"no refine-*.safetensors under {list(paths)}: pass a quantize output folder or its files")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="refine-*.safetensors files or folders holding them")
    p.add_argument("--format", default="nvfp4", help="the format whose decisions to read")
    p.add_argument("--drop", action="append", default=[],
                   help="candidates to drop together, comma separated (repeatable; default: each one alone)")
    args = p.parse_args(argv)
    from pq_lightning.refine import RefineOutput

    for path in _files(args.paths):
        rows = heldout_rows(RefineOutput.load(path).decisions, args.format)
        print(f"{path}: {len(rows)} measured {args.format} Linears, wins {dict(wins(rows))}")
        if not rows:
            continue
        sets = [d.split(",") for d in args.drop] or [[k] for k in sorted(set().union(*rows)) if k != "rtn"]
        for drop in sets:
            print(f"  drop {','.join(drop):36s} regret {100 * regret(rows, drop):8.4f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
