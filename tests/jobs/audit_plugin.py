"""A throwaway audit type kept outside the package: one module, registered when imported.

``code_balance`` cuts the bundle's query split into ``parts`` chunks; each chunk encodes its
queries with the bundle's hasher (on whichever worker takes it) and the reduce reports how
balanced the code bits are and the queries' mAP@all. Servers and workers load it with
``HASHAUDIT_PLUGINS=audit_plugin`` and this folder on ``PYTHONPATH``
(tests/jobs/test_audit_plugin.py); no module of the package names it.
"""

from __future__ import annotations

import argparse
import html
import os
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.errors import BadInput
from service.evaluation import retrieval_figures
from service.jobs.audit_store import pack_arrays, unpack_arrays
from service.jobs.audit_types import AuditType, Cancelled, check_bundle, register_audit_type
from service.jobs.audit_types.base import SEED_MAX, SpecInputs, int_in
from service.jobs.audit_types.html import json_link, provenance
from service.jobs.context import JobContext
from service.nets.hasher import encode_uint8
from service.retrieval.codes import pack_bits, unpack_bits

MAX_PARTS = 8


class CodeBalanceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parts: int = Field(2, ge=1, le=MAX_PARTS, description="chunks the query split is cut into")


def _parts(spec: dict[str, Any]) -> int:
    return spec["code_balance"]["parts"]


@register_audit_type
class CodeBalanceAudit(AuditType):
    name = "code_balance"
    title = "Code balance audit"
    summary = "how balanced the hasher's code bits are on the query split (a test plugin)"
    chunk_function = "audit_plugin:encode_part"
    request_fields = {
        "code_balance": (CodeBalanceSpec | None, Field(None, description="code_balance audits "
                                                       "only")),
    }
    example = {"model": "fmnist-dpsh-32", "type": "code_balance", "code_balance": {"parts": 4}}
    cli_action = "balance"
    cli_help = "bit balance of the codes of the query split (a test plugin)"
    cli_out = "balance_out"

    def normalize(self, raw: dict[str, Any], inputs: SpecInputs) -> dict[str, Any]:
        b = raw.get("code_balance") or {}
        parts = int_in(b.get("parts", 2), 1, MAX_PARTS, "code_balance.parts")
        bundle = inputs.svc.bundle
        if parts > len(bundle.queries):
            raise BadInput(f"code_balance.parts: at most {len(bundle.queries)} (the queries)",
                           field="code_balance.parts")
        m = bundle.manifest
        return {"type": self.name, "model": m.name, "bundle_version": m.version,
                "bundle_sha": bundle.sha, "seed": int_in(raw.get("seed", 0), 0, SEED_MAX, "seed"),
                "code_balance": {"parts": parts}}

    def chunk_keys(self, spec: dict[str, Any]) -> list[str]:
        return [f"code_balance|{i}" for i in range(_parts(spec))]

    def progress(self, spec: dict[str, Any], done: list[str],
                 inside: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"done_parts": len(done), "total_parts": _parts(spec)}

    def progress_text(self, progress: dict[str, Any]) -> str:
        return f"{progress['done_parts']} / {progress['total_parts']} parts encoded"

    def reduce(self, ctx: JobContext, audit_id: str, spec: dict[str, Any],
               chunks: dict[str, bytes]) -> dict[str, Any]:
        bundle = ctx.models.get(spec["model"])
        bits = bundle.manifest.bits
        parts = [unpack_arrays(chunks[k]) for k in self.chunk_keys(spec)]
        codes = np.concatenate([unpack_bits(a["codes"], bits) for a, _ in parts])
        labels = np.concatenate([a["labels"] for a, _ in parts])
        fig = retrieval_figures(codes, labels, bundle.gallery.codes(bits),
                                bundle.gallery.labels, curves=False)
        balance = (codes > 0).mean(axis=0)
        return {"type": self.name, "audit_id": audit_id, "model": spec["model"],
                "bundle_version": spec["bundle_version"], "bundle_sha": spec["bundle_sha"],
                "package_version": "test", "seed": spec["seed"], "bits": bits,
                "queries": int(len(codes)), "bit_balance": balance.tolist(),
                "max_imbalance": float(np.abs(balance - 0.5).max()),
                "distinct_codes": int(len(np.unique(codes, axis=0))),
                "map_all": fig["map_all"], "pids": [m["pid"] for _, m in parts]}

    def report_body(self, audit_id: str, result: dict[str, Any], json_href: str) -> str:
        rows = "".join(f"<tr><td>{i}</td><td>{v:.3f}</td></tr>"
                       for i, v in enumerate(result["bit_balance"]))
        return (json_link(json_href)
                + provenance(audit_id, result, f"{result['queries']} queries")
                + f"<p id='balance'>mAP@all {result['map_all']:.4f}; "
                f"{result['distinct_codes']} distinct codes; largest imbalance "
                f"{result['max_imbalance']:.3f}</p><table><tr><th>bit</th><th>share of +1</th>"
                f"</tr>{rows}</table><p>{html.escape(result['model'])}</p>")

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--parts", type=int, default=2, help="chunks of the query split")

    def cli_request(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"type": self.name, "code_balance": {"parts": args.parts}}

    def cli_summary(self, result: dict[str, Any]) -> list[str]:
        return [f"mAP@all {result['map_all']:.4f}, largest bit imbalance "
                f"{result['max_imbalance']:.3f}"]


def encode_part(ctx: JobContext, audit_id: str, spec: dict[str, Any], chunk: str,
                progress: Any = None) -> bytes:
    """Encode one part of the query split; the chunk records the process that ran it."""
    bundle = check_bundle(ctx, spec)
    if ctx.audits.stopped(audit_id):
        raise Cancelled(audit_id)
    i = int(chunk.split("|")[1])
    q = bundle.queries
    idx = np.array_split(np.arange(len(q)), _parts(spec))[i]
    codes = encode_uint8(bundle.hasher, q.images[idx])
    if progress is not None:
        progress(1)
    return pack_arrays({"codes": pack_bits(codes), "labels": q.labels[idx]},
                       {"pid": os.getpid(), "n": int(len(idx))})
