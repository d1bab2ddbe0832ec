"""Print a pip constraints file that pins every dependency of pyproject.toml at its lower bound.

    python .ci/lower_bounds.py --extras dev --skip torch > lower-bounds.txt

Each requirement ``name>=X`` (or ``name==X``) of ``[project].dependencies`` and of the named extras
becomes ``name==X`` (extras dropped, environment marker kept), so installing with ``-c`` this file
tests exactly the lower bounds that pyproject.toml declares. A requirement without a lower bound is
an error: CI could not tell which release to test. ``--skip`` leaves packages out (torch: setup.sh
installs the CPU build before everything else, and pip cannot replace it with an older one here).
Standard library only, so it runs before any virtual environment exists (Python >= 3.11: tomllib).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    sys.exit("lower_bounds.py needs Python >= 3.11 (tomllib); run it with python3.11 or newer")

REQ = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*(;\s*(?P<marker>.*))?$")
LOWER = re.compile(r"(>=|==)\s*([0-9][A-Za-z0-9.+!-]*)")


def lower_bound_pins(requirements: list[str], skip: set[str]) -> list[str]:
    """``name==lower`` (plus the marker) for each requirement; ValueError when one has no lower bound."""
    out = []
    for req in requirements:
        m = REQ.match(req)
        if m is None:
            raise ValueError(f"cannot parse the requirement {req!r}; write it as name>=X[,<Y][; marker]")
        name = m["name"]
        if name.lower() in skip:
            continue
        bound = LOWER.search(m["spec"])
        if bound is None:
            raise ValueError(
                f"{req!r} has no lower bound (>= or ==); add one to pyproject.toml so CI can test it"
            )
        out.append(f"{name}=={bound[2]}" + (f"; {m['marker']}" if m["marker"] else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyproject", default=str(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    p.add_argument("--extras", default="", help="comma-separated optional-dependency groups to include")
    p.add_argument("--skip", default="", help="comma-separated package names to leave out")
    args = p.parse_args(argv)
    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in filter(None, args.extras.split(",")):
        if extra not in optional:
            p.error(f"no extra {extra!r} in {args.pyproject} (it has: {', '.join(sorted(optional))})")
        reqs += optional[extra]
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    print("\n".join(lower_bound_pins(reqs, skip)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
