"""Audit reports: the result JSON rendered as one self-contained HTML page with plots.

Plots are drawn with matplotlib (Agg) and embedded as base64 PNG, so the page needs no
server and no network. A small script marks ``<body data-images-loaded>`` with the number
of images that decoded, which the headless-browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import time
from typing import Any


def _fig_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _axes() -> tuple[Any, Any]:
    """A new report-sized figure on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.5, 3.6))


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str) -> str:
    """The styling every report plot shares (a 0..1 mAP/precision axis); base64 PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _fig_png(fig)


def plots(result: dict[str, Any]) -> dict[str, str]:
    """mAP vs eps, top-N precision and PR curves (clean vs attacked) as base64 PNGs."""
    out: dict[str, str] = {}
    clean = result["clean"]
    k = result["protocol"]["map_k"]
    methods = result["methods"]
    eps_max = max(result["eps"])

    fig, ax = _axes()
    for m in methods:
        rows = sorted((r for r in result["attacks"] if r["method"] == m), key=lambda r: r["eps"])
        ax.plot([0] + [r["eps"] * 255 for r in rows], [clean["map_k"]] + [r["map_k"] for r in rows],
                marker="o", label=m)
    ax.axhline(clean["map_k"], color="grey", ls="--", lw=1, label="clean")
    out["map_vs_eps"] = _finish(fig, ax, "eps (grey levels of 255)", f"mAP@{k}",
                                "Retrieval mAP vs perturbation budget")

    last = [r for r in result["attacks"] if r["eps"] == eps_max]
    fig, ax = _axes()
    ax.plot(clean["top_n"]["n"], clean["top_n"]["precision"], "k--", marker=".", label="clean")
    for r in last:
        ax.plot(r["top_n"]["n"], r["top_n"]["precision"], marker=".", label=r["method"])
    ax.set_xscale("log")
    out["top_n"] = _finish(fig, ax, "N (top-N retrieved)", "precision@N",
                           f"Top-N precision, eps = {eps_max * 255:.0f}/255")

    fig, ax = _axes()
    ax.plot(clean["pr_curve"]["recall"], clean["pr_curve"]["precision"], "k--", marker=".",
            label="clean")
    for r in last:
        ax.plot(r["pr_curve"]["recall"], r["pr_curve"]["precision"], marker=".",
                label=r["method"])
    ax.set_xlim(0, 1)
    out["pr"] = _finish(fig, ax, "recall (Hamming radius 0..K)", "precision",
                        f"PR curve by Hamming radius, eps = {eps_max * 255:.0f}/255")
    return out


def _f(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _img(b64: str, title: str = "", cls: str = "") -> str:
    return (f'<img class="{cls}" title="{html.escape(title)}" alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{b64}">')


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right;font-size:13px}th{background:#f3f3f3}td.l,th.l{text-align:left}
.plots img{margin:4px;border:1px solid #ddd}.strip img{width:56px;height:56px;
image-rendering:pixelated;margin:1px;border:3px solid transparent}
.strip img.rel{border-color:#2a2}.strip img.irr{border-color:#d22}
.strip td{vertical-align:middle}.meta{color:#555;font-size:13px}code{font-size:12px}
"""


def render_html(status: dict[str, Any]) -> str:
    """The audit (``AuditQueue.status``) as HTML; unfinished audits show their progress."""
    r = status.get("result")
    title = f"HashAudit report {status['id']}"
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body data-images-loaded='pending'>"
            f"<h1>Robustness audit of <code>{html.escape(status['model'])}</code></h1>")
    if status.get("type") == "backdoor":
        head = head.replace("<h1>Robustness audit of", "<h1>Backdoor audit of")
    if r is None:
        p = status["progress"]
        done = (f"{p['done_epochs']} / {p['total_epochs']} training epochs done"
                if "done_epochs" in p else f"{p['done_images']} / {p['total_images']} images done")
        body = (f"<p>State: <b>{html.escape(status['state'])}</b>. {done}."
                + (f" Error: {html.escape(status['error'])}" if status.get("error") else "")
                + "</p>")
        return head + body + _SCRIPT + "</body></html>"
    if r.get("type") == "backdoor":
        return head + _backdoor_body(status["id"], r) + _SCRIPT + "</body></html>"
    k = r["protocol"]["map_k"]
    clean = r["clean"]
    parts = [head, _provenance(status["id"], r,
                               f"{r['queries']['audited']} queries "
                               f"({html.escape(r['queries']['source'])}) vs {r['gallery_size']} "
                               f"gallery items, {r['bits']} bits")]
    parts.append("<h2>Figures</h2><table><tr><th class='l'>method</th><th>eps</th>"
                 f"<th>mAP@{k} clean</th><th>mAP@{k} attacked</th><th>drop %</th>"
                 "<th>t-MAP</th><th>t-MAP ceiling (anchor)</th><th>P@r≤2</th>"
                 "<th>mean Hamming moved</th><th>codes changed %</th>"
                 "<th>L∞ max</th><th>RMSE</th><th>PSNR dB</th><th>ms / image</th></tr>")
    for a in r["attacks"]:
        parts.append(
            f"<tr><td class='l'>{html.escape(a['method'])}</td><td>{a['eps_levels']}/255</td>"
            f"<td>{_f(clean['map_k'])}</td><td>{_f(a['map_k'])}</td>"
            f"<td>{_f(a['drop_pct'], '.1f')}</td><td>{_f(a.get('t_map'))}</td>"
            f"<td>{_f(a.get('t_map_ceiling_anchor'))}</td>"
            f"<td>{_f(a['p_r2'])}</td><td>{_f(a['mean_hamming'], '.2f')}</td>"
            f"<td>{_f(a['flipped_any_pct'], '.1f')}</td><td>{_f(a['linf_max'] * 255, '.0f')}/255"
            f"</td><td>{_f(a['rmse_mean'])}</td><td>{_f(a['psnr_mean_db'], '.1f')}</td>"
            f"<td>{_f(a['ms_per_image'], '.2f')}</td></tr>")
    parts.append("</table>")
    if r.get("transfer_to"):
        names = r["transfer_to"]
        parts.append("<h2>Transfer</h2><p class='meta'>mAP@" + str(k) + " of other hashers on "
                     "the same adversarial queries (made against " + html.escape(r["model"]) +
                     ").</p><table><tr><th class='l'>method</th><th>eps</th>"
                     f"<th>{html.escape(r['model'])} (white-box)</th>"
                     + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>")
        first = r["attacks"][0].get("transfer", [])
        parts.append("<tr><td class='l'>clean</td><td>-</td>"
                     f"<td>{_f(clean['map_k'])}</td>"
                     + "".join(f"<td>{_f(t['map_clean'])}</td>" for t in first) + "</tr>")
        for a in r["attacks"]:
            parts.append(f"<tr><td class='l'>{html.escape(a['method'])}</td>"
                         f"<td>{a['eps_levels']}/255</td><td>{_f(a['map_k'])}</td>"
                         + "".join(f"<td>{_f(t['map_k'])}</td>" for t in a.get("transfer", []))
                         + "</tr>")
        parts.append("</table>")
    pl = plots(r)
    parts.append("<h2>Plots</h2><div class='plots'>" + "".join(
        _img(v, name) for name, v in pl.items()) + "</div>")
    if r["examples"]:
        parts.append("<h2>Examples</h2><p class='meta'>query · adversarial · perturbation "
                     "(stretched) · top-5 hits clean · top-5 hits attacked; green = relevant, "
                     "red = not.</p><table class='strip'>")
        for ex in r["examples"]:
            def hits(rows: list[dict[str, Any]]) -> str:
                return "".join(_img(h["png"], f"id {h['id']} {','.join(h['labels'])} "
                                    f"d={h['hamming']}", "rel" if h["relevant"] else "irr")
                               for h in rows)
            parts.append(
                f"<tr><td class='l'>{html.escape(ex['method'])}<br>{ex['eps'] * 255:.0f}/255"
                f"<br>{html.escape(', '.join(ex['labels']))}<br>Hamming {ex['hamming']}</td>"
                f"<td>{_img(ex['query_png'], 'query')}{_img(ex['adversarial_png'], 'adv')}"
                f"{_img(ex['perturbation_png'], 'perturbation')}</td>"
                f"<td>{hits(ex['hits_clean'])}</td><td>{hits(ex['hits_adversarial'])}</td></tr>")
        parts.append("</table>")
    parts.append(_protocol_table(r["protocol"]))
    parts.append(_SCRIPT + "</body></html>")
    return "".join(parts)


def _provenance(audit_id: str, r: dict[str, Any], details: str) -> str:
    """The report's first line: which audit, bundle and code made it; ``details`` (HTML) in
    the middle."""
    return (f"<p class='meta'>audit <code>{audit_id}</code> · bundle "
            f"<code>{html.escape(r['model'])}</code> v{html.escape(str(r['bundle_version']))} "
            f"sha <code>{r['bundle_sha'][:16]}…</code> · hashaudit {r['package_version']} · "
            f"seed {r['seed']} · {details} · generated "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>")


def _protocol_table(protocol: dict[str, Any]) -> str:
    return "<h2>Protocol</h2><table>" + "".join(
        f"<tr><th class='l'>{html.escape(str(key))}</th><td class='l'>"
        f"{html.escape(str(val))}</td></tr>" for key, val in protocol.items()) + "</table>"


def _backdoor_plot(r: dict[str, Any]) -> str:
    rows = r["rows"]
    xs = [row["poisons"] for row in rows]
    fig, ax = _axes()
    ax.plot(xs, [row["t_map_triggered"] for row in rows], "o-", label="t-MAP, triggered")
    ax.plot(xs, [row["t_map_untriggered"] for row in rows], "s:", label="t-MAP, no trigger")
    ax.plot(xs, [row["clean_map"] for row in rows], "^-", color="grey", label="clean mAP")
    ax.axhline(r["baseline"]["t_map_triggered"], color="k", ls="--", lw=1,
               label="t-MAP triggered, clean model")
    return _finish(fig, ax, "poisoned training images", "mAP",
                   f"Backdoor toward {r['target_name']!r}")


def _backdoor_body(audit_id: str, r: dict[str, Any]) -> str:
    """Trigger, t-MAP vs poisons table and plot, poisoned examples, frozen bundles."""
    parts = [_provenance(audit_id, r,
                         f"target <b>{html.escape(r['target_name'])}</b> · trigger "
                         f"{r['patch_side']} px bottom-right · confusing perturbations "
                         f"{r['perturb_eps'] * 255:.0f}/255 · retrained {r['epochs']} epochs on "
                         f"{r['train_images']} images ({r['target_train_images']} of the "
                         f"target class) · {r['queries']} queries")]
    sur = r["surrogate"]
    parts.append("<h2>Trigger</h2><p class='strip'>"
                 + _img(r["trigger_png"], "trigger") + " on queries: "
                 + "".join(_img(x, "triggered query") for x in r["triggered_examples"])
                 + f"</p><p class='meta'>On the surrogate (the bundle's own hasher) the trigger "
                 f"alone gives t-MAP {_f(sur['t_map_triggered'])} (no trigger "
                 f"{_f(sur['t_map_untriggered'])}).</p>")
    parts.append("<h2>t-MAP vs poisoned images</h2><table><tr><th>poisons</th>"
                 "<th>clean mAP</th><th>change vs clean model</th><th>t-MAP triggered</th>"
                 "<th>gain vs clean model</th><th>t-MAP no trigger</th><th>train s</th>"
                 "<th class='l'>poisoned bundle</th></tr>")
    for row in r["rows"]:
        b = row.get("bundle")
        link = (f"<a href='/audit/{audit_id}/bundles/{html.escape(b['name'])}'>"
                f"{html.escape(b['name'])}</a>" if b else
                ("clean baseline" if row["poisons"] == 0 else "-"))
        parts.append(
            f"<tr><td>{row['poisons']}</td><td>{_f(row['clean_map'])}</td>"
            f"<td>{_f(row['clean_map_change'], '+.4f')}</td><td>{_f(row['t_map_triggered'])}"
            f"</td><td>{_f(row['t_map_gain'], '+.4f')}</td>"
            f"<td>{_f(row['t_map_untriggered'])}</td><td>{_f(row['train_seconds'], '.0f')}</td>"
            f"<td class='l'>{link}</td></tr>")
    parts.append("</table>")
    parts.append("<div class='plots'>" + _img(_backdoor_plot(r), "t-MAP vs poisons")
                 + "</div>")
    if r["examples"]:
        parts.append("<h2>Poisoned training images</h2><p class='meta'>original · poisoned "
                     "(confusing perturbation + trigger; label unchanged)</p><p class='strip'>"
                     + " ".join(_img(e["original_png"], "original")
                                + _img(e["poisoned_png"], "poisoned") for e in r["examples"])
                     + "</p>")
    parts.append(_protocol_table(r["protocol"]))
    return "".join(parts)


_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>"""
