"""Helpers shared by the benchmark scripts: machine description, table printing, JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

import service

RESULTS = Path(__file__).resolve().parent / "results"


def add_device_arg(parser: Any) -> None:
    """``--device``: where the benchmark runs (recorded with its figures)."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N "
                             "(default: %(default)s)")


def pick_device(name: str) -> str:
    """The torch device string for ``--device`` (a clear error for CUDA without a GPU)."""
    from service.device import resolve_device

    return str(resolve_device(name))


def add_precision_arg(parser: Any) -> None:
    """``--precision``: forward precision of the benchmarked models (recorded with the figures)."""
    parser.add_argument("--precision", default="auto",
                        help="auto (bf16 autocast + channels-last on CUDA, fp32 on CPU), fp32 "
                             "or bf16 (default: %(default)s)")


def pick_precision(name: str, device: str) -> str:
    """``fp32`` or ``bf16`` for ``--precision`` on ``device`` (a clear error for a bad name)."""
    from service.precision import resolve_precision

    return resolve_precision(name, device)


def machine(device: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """What the figures were measured on: the device they ran on (``device``; by default the
    one ``auto`` would pick), the forward precision (``precision``; by default what ``auto``
    gives on that device) and the host."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else "cpu"
    return {
        "device": dev,
        "precision": precision or pick_precision("auto", dev),
        "device_name": name,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hashaudit": service.__version__,
    }


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Print rows as a Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, spec) if spec else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def wait_ready(url: str, proc: Any, timeout: float = 120.0) -> None:
    """Wait until ``url``/health/ready answers 200; stop ``proc`` and exit if it never does."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"server at {url} did not become ready in {timeout:.0f} s")
