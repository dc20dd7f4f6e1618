"""An attack audit with ``worst_case`` and ``frontier``: the headline row, what it used, and
the strength-vs-time plot with its PGD-k reference curve (issue 20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_worst_case_heads_the_report_and_the_frontier_is_drawn(tiny_store: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "service.cli", "audit", "run", "--bundle", "tiny", "--store",
           str(tiny_store), "--methods", "pgd", "worst_case", "--eps", "8/255", "--count", "12",
           "--frontier", "--device", "cpu", "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "report.json").read_text())
    page = (out / "report.html").read_text()
    rows = {a["method"]: a for a in res["attacks"]}
    assert set(rows) == {"pgd", "worst_case"}  # the reference runs are not audit rows
    wc = rows["worst_case"]
    assert wc["map_all"] <= rows["pgd"]["map_all"] + 1e-9
    assert sum(u["won"] for u in wc["used"]) == 12
    assert any(u["member"].startswith("hag") for u in wc["used"])
    assert any(u["member"] == "untargeted_gan_plus" for u in wc["used"])
    assert [p["steps"] for p in res["reference"]] == [1, 2, 5, 10, 20, 50]
    assert all(p["ms_per_image"] > 0 for p in res["reference"])
    # more PGD steps never cost less time per image by an order of magnitude
    assert res["reference"][-1]["ms_per_image"] > res["reference"][0]["ms_per_image"]
    assert "Worst case: <b>worst_case at eps 8/255</b>" in page
    assert "Headline: worst_case" in page and 'data-plot="frontier"' in page
