"""Audit reports: the result JSON as one self-contained HTML page.

The page (heading, style, the image-count script) is the same for every audit type; what is
under the heading is the type's ``report_body`` (the attack audit: verdict, figures, plots,
examples, glossary; the backdoor audit: trigger, t-MAP vs poisons) or, while the audit runs,
its ``progress_text``. The shared pieces are in ``service.jobs.audit_types.html``.
"""

from __future__ import annotations

import html
from typing import Any

from service.jobs.audit_types import audit_type
from service.jobs.audit_types.html import SCRIPT, STYLE


def render_html(status: dict[str, Any], json_href: str = "report.json") -> str:
    """The audit (``AuditQueue.status``) as HTML; unfinished audits show their progress.

    ``json_href`` links the JSON report: the default suits the CLI, which writes
    ``report.json`` beside ``report.html``; the API passes ``?format=json``.
    """
    kind = audit_type(status["type"])
    r = status.get("result")
    title = f"HashAudit report {status['id']}"
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body data-images-loaded='pending'>"
            f"<h1>{html.escape(kind.title)} of <code>{html.escape(status['model'])}</code></h1>")
    if r is None:
        body = (f"<p>State: <b>{html.escape(status['state'])}</b>. "
                f"{kind.progress_text(status['progress'])}."
                + (f" Error: {html.escape(status['error'])}" if status.get("error") else "")
                + "</p>")
    else:
        body = kind.report_body(status["id"], r, json_href)
    return head + body + SCRIPT + "</body></html>"
