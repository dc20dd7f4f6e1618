"""Audit rows say which precision their chunks were computed in (``hashaudit audit run``,
the workers' task code inline, on the shipped bundle)."""

from __future__ import annotations

import json

import pytest

from helpers import REPO


@pytest.mark.parametrize("flag,expected", [([], "fp32"), (["--precision", "bf16"], "bf16")])
def test_audit_rows_record_the_precision(tmp_path, flag, expected) -> None:
    from service.cli import main

    out = tmp_path / "out"
    assert main(["audit", "run", "--store", str(REPO / "model_store"), "--methods", "pgd",
                 "--eps", "8/255", "--count", "16", "--device", "cpu", "--no-progress",
                 "--out", str(out), *flag]) == 0
    rows = json.loads((out / "report.json").read_text())["attacks"]
    assert [r["precision"] for r in rows] == [expected]
    assert rows[0]["linf_max"] <= 8 / 255 + 1e-6  # stored as float32
