"""scripts/fuzz_cli.py --quick: a few of its bad-input and interruption cases, each in its own process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fuzz_cli_quick_cases_all_pass(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "fuzz_cli.py"), "--quick", "--keep", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.endswith(("  pass",)) or "  FAIL" in line]
    assert len(rows) == 5 and all(row.endswith("pass") for row in rows), r.stdout
    assert re.search(r"^5 cases, 5 pass, 0 fail, \d+ s$", r.stdout, re.M), r.stdout
    # the refusals say what to do in one line; the kill left a rerun that built what a fresh run builds
    assert "pq-lightning: error: --bans 'q_proj': unknown format 'NVFP4'" in r.stdout
    assert re.search(r"^SIGKILL in export\s+-9\s+stopped in export; rerun exit 0\s+pass$", r.stdout, re.M)
