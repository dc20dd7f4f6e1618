"""Audit reports: the result JSON rendered as one self-contained HTML page with plots.

Plots are drawn with matplotlib (Agg) and embedded as base64 PNG, so the page needs no
server and no network. A small script marks ``<body data-images-loaded>`` with the number
of images that decoded, which the headless-browser test reads.

The page opens with a verdict (worst attack, how the query set compares with the bundle's
own evaluation), a link to the JSON it was made from, then clean and attacked figures side
by side, plots, examples (click a thumbnail to enlarge it; CSS only) and a glossary.
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
    """mAP vs eps, top-N precision and PR curves (clean vs attacked) as base64 PNGs.

    With a single eps the first plot is a bar per method (``map_by_method``) instead of
    lines from eps 0 (``map_vs_eps``), which would suggest values between 0 and that eps.
    """
    out: dict[str, str] = {}
    clean = result["clean"]
    k = result["protocol"]["map_k"]
    methods = result["methods"]
    eps_max = max(result["eps"])

    fig, ax = _axes()
    if len(result["eps"]) == 1:  # one budget: a bar per method, not a line from eps 0
        rows = [next(r for r in result["attacks"] if r["method"] == m) for m in methods]
        bars = ax.bar(["clean", *methods], [clean["map_k"]] + [r["map_k"] for r in rows],
                      color=["grey"] + [f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.axhline(clean["map_k"], color="grey", ls="--", lw=1, label="clean")
        out["map_by_method"] = _finish(fig, ax, "method", f"mAP@{k}",
                                       f"Retrieval mAP at eps = {eps_max * 255:.0f}/255")
    else:
        for m in methods:
            rows = sorted((r for r in result["attacks"] if r["method"] == m),
                          key=lambda r: r["eps"])
            ax.plot([0] + [r["eps"] * 255 for r in rows],
                    [clean["map_k"]] + [r["map_k"] for r in rows], marker="o", label=m)
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


def _img(b64: str, title: str = "", cls: str = "", plot: str | None = None) -> str:
    data = f' data-plot="{plot}"' if plot else ""
    return (f'<img class="{cls}" title="{html.escape(title)}" alt="{html.escape(title)}"{data} '
            f'src="data:image/png;base64,{b64}">')


def _zoom(b64: str, title: str = "", cls: str = "") -> str:
    """A thumbnail that a click enlarges (centred over a dimmed page) and a second click
    shrinks back: a hidden checkbox inside a label, styled by ``:checked``; no script, and the
    image data appears once."""
    return f"<label class='zoom'><input type='checkbox'>{_img(b64, title, cls)}</label>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1280px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right;font-size:13px}th{background:#f3f3f3}td.l,th.l{text-align:left}
th.grp{text-align:center}td.att{font-weight:600}
.plots img{margin:4px;border:1px solid #ddd}.strip img{width:64px;height:64px;
image-rendering:pixelated;margin:1px;border:3px solid transparent;cursor:zoom-in}
.strip td{white-space:nowrap}.strip td.ex img{width:96px;height:96px}
.strip img.rel{border-color:#2a2}.strip img.irr{border-color:#d22}
.strip td{vertical-align:middle}.meta{color:#555;font-size:13px}code{font-size:12px}
.zoom input{display:none}.zoom input:checked+img{position:fixed;z-index:10;top:50%;left:50%;
transform:translate(-50%,-50%);width:min(80vmin,560px);height:min(80vmin,560px);
box-shadow:0 0 0 100vmax rgba(0,0,0,.65);cursor:zoom-out}
.verdict{background:#f6f8fa;border-left:4px solid #b33;padding:10px 14px;font-size:15px;
line-height:1.45}dl.gloss dt{font-weight:600;margin-top:6px}dl.gloss dd{margin-left:18px;
font-size:13px;color:#333}
"""

GLOSSARY = [
    ("mAP@all, mAP@1000 (mAP@K)", "mean average precision of the Hamming ranking over the "
     "whole gallery or its first K items; an item is relevant when it shares a label with the "
     "query; 1 = every relevant item first, and a query with none in the top K scores 0. "
     "Clean = the untouched queries, attacked = the adversarial ones."),
    ("drop %", "how much of the clean mAP@all the attack removed: "
     "100 · (clean − attacked) / clean."),
    ("P@r≤2", "precision of the gallery items within Hamming radius 2 of the query code "
     "(hash-lookup retrieval); a query that finds nothing within the radius scores 0."),
    ("t-MAP", "targeted attacks: mAP when relevance means sharing the target label, so higher "
     "= the attack steered retrieval toward the target; clean = the same on the untouched "
     "queries. The ceiling is the t-MAP of the target label's anchor code itself, what a "
     "perfect targeted attack would reach."),
    ("mean Hamming moved", "average number of code bits that differ between the clean and "
     "the adversarial image."),
    ("codes changed %", "share of queries whose adversarial code differs from the clean code "
     "in at least one bit; 0 % means the attack did nothing at this budget, not that the model "
     "is robust (try a stronger method or a larger eps)."),
    ("eps, L∞ max", "the per-pixel budget in grey levels of 255, and the largest change "
     "actually made (after rounding to the uint8 image a user receives)."),
    ("RMSE, PSNR", "root mean square change in [0, 1] pixel units (how visible the "
     "perturbation is), and the same as peak signal-to-noise ratio in dB (higher = less "
     "visible)."),
    ("perturbation (stretched)", "adversarial − clean, drawn around mid-grey: grey = "
     "unchanged, lighter = brighter, darker = darker; scaled so that the largest change "
     "reaches white or black, so even a 1-level change is visible."),
    ("ms / image", "attack time per image on the worker, models loaded, at the audit's "
     "batch size."),
]


def _glossary() -> str:
    return ("<h2 id='glossary'>Glossary</h2><dl class='gloss'>" + "".join(
        f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>" for term, text in GLOSSARY)
        + "</dl>")


def worst_attack(r: dict[str, Any]) -> dict[str, Any]:
    """The attack row with the lowest attacked mAP@all (the first one on a tie)."""
    return min(r["attacks"], key=lambda a: a["map_all"])


def _verdict(r: dict[str, Any]) -> str:
    """One paragraph: the worst attack and its drop; what the query set is and how its clean
    mAP compares with the figure the bundle records for its full query split."""
    clean = r["clean"]["map_all"]
    w = worst_attack(r)
    drop = 100.0 * (clean - w["map_all"]) / clean if clean > 0 else None
    parts = [f"Worst attack: <b>{html.escape(w['method'])} at eps {w['eps_levels']}/255</b> "
             f"lowers mAP@all from {clean:.4f} to <b>{w['map_all']:.4f}</b>"
             + (f" (−{drop:.1f} %)" if drop is not None else "")
             + f"; it changed the code of {w['flipped_any_pct']:.0f} % of the queries."]
    if len(r["attacks"]) > 1:
        best = max(r["attacks"], key=lambda a: a["map_all"])
        parts.append(f"The mildest, {html.escape(best['method'])} at "
                     f"{best['eps_levels']}/255, leaves {best['map_all']:.4f}.")
    q = r["queries"]
    split = r.get("bundle_query_split") or q.get("total")
    if q["source"] == "upload":
        parts.append(f"The {q['audited']:,} queries were uploaded, not drawn from the "
                     f"bundle's query split of {split:,}.")
    elif split and q["audited"] < split:
        parts.append(f"The queries are a random subsample: {q['audited']:,} of the bundle's "
                     f"{split:,} query images (seed {q.get('seed')}), so each figure carries "
                     "sampling error (the standard error of a mAP is at most "
                     f"0.5/√{q['audited']} ≈ {0.5 / q['audited'] ** 0.5:.3f}).")
    else:
        parts.append(f"The queries are all {q['audited']:,} images of the bundle's query "
                     "split.")
    rec = (r.get("bundle_recorded") or {}).get("map_all")
    if rec is not None:
        parts.append(f"Clean mAP@all on this query set is {clean:.4f}; the bundle records "
                     f"{rec:.4f} on its {r['bundle_recorded'].get('num_queries') or split:,} "
                     f"queries ({clean - rec:+.4f}).")
    return "<p class='verdict' id='verdict'>" + " ".join(parts) + "</p>"


def _json_link(href: str) -> str:
    return (f"<p class='meta'>Data: <a id='json-link' href='{html.escape(href)}'>this report as "
            "JSON</a> (every figure, curve and example) · <a href='#glossary'>glossary</a></p>")


def _figure_tables(r: dict[str, Any]) -> str:
    """Retrieval (clean and attacked side by side) and perturbation/cost tables."""
    k = r["protocol"]["map_k"]
    clean = r["clean"]
    figs = [("map_all", "mAP@all"), ("map_1000", "mAP@1000"), ("p_r2", "P@r≤2")]
    if k not in ("all", 1000):
        figs.insert(2, ("map_k", f"mAP@{k}"))
    targeted = any(a.get("t_map") is not None for a in r["attacks"])
    head = ("<table id='figures'><tr><th class='l' rowspan='2'>method</th><th rowspan='2'>eps"
            "</th>" + "".join(f"<th class='grp' colspan='2'>{label}</th>" for _, label in figs)
            + "<th rowspan='2'>drop % (mAP@all)</th>"
            + ("<th class='grp' colspan='3'>t-MAP</th>" if targeted else "") + "</tr><tr>"
            + "<th>clean</th><th>attacked</th>" * len(figs)
            + ("<th>clean</th><th>attacked</th><th>ceiling (anchor)</th>" if targeted else "")
            + "</tr>")
    parts = ["<h2>Figures</h2>", head]
    for a in r["attacks"]:
        drop = (100.0 * (clean["map_all"] - a["map_all"]) / clean["map_all"]
                if clean["map_all"] > 0 else None)
        parts.append(
            f"<tr><td class='l'>{html.escape(a['method'])}</td><td>{a['eps_levels']}/255</td>"
            + "".join(f"<td>{_f(clean[key])}</td><td class='att'>{_f(a[key])}</td>"
                      for key, _ in figs)
            + f"<td>{_f(drop, '.1f')}</td>"
            + (f"<td>{_f(a.get('t_map_clean'))}</td><td class='att'>{_f(a.get('t_map'))}</td>"
               f"<td>{_f(a.get('t_map_ceiling_anchor'))}</td>" if targeted else "")
            + "</tr>")
    parts.append("</table><h3>Perturbation and cost</h3><table id='perturbation'><tr>"
                 "<th class='l'>method</th><th>eps</th><th>codes changed %</th>"
                 "<th>mean Hamming moved</th><th>L∞ max</th><th>RMSE</th><th>PSNR dB</th>"
                 "<th>ms / image</th></tr>")
    for a in r["attacks"]:
        parts.append(
            f"<tr><td class='l'>{html.escape(a['method'])}</td><td>{a['eps_levels']}/255</td>"
            f"<td>{_f(a['flipped_any_pct'], '.1f')}</td><td>{_f(a['mean_hamming'], '.2f')}</td>"
            f"<td>{_f(a['linf_max'] * 255, '.0f')}/255</td><td>{_f(a['rmse_mean'])}</td>"
            f"<td>{_f(a['psnr_mean_db'], '.1f')}</td><td>{_f(a['ms_per_image'], '.2f')}</td>"
            "</tr>")
    parts.append("</table>")
    return "".join(parts)


def render_html(status: dict[str, Any], json_href: str = "report.json") -> str:
    """The audit (``AuditQueue.status``) as HTML; unfinished audits show their progress.

    ``json_href`` links the JSON report: the default suits the CLI, which writes
    ``report.json`` beside ``report.html``; the API passes ``?format=json``.
    """
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
        return (head + _json_link(json_href) + _backdoor_body(status["id"], r) + _SCRIPT
                + "</body></html>")
    k = r["protocol"]["map_k"]
    clean = r["clean"]
    parts = [head, _verdict(r), _json_link(json_href),
             _provenance(status["id"], r,
                         f"{r['queries']['audited']} queries "
                         f"({html.escape(r['queries']['source'])}) vs {r['gallery_size']} "
                         f"gallery items, {r['bits']} bits")]
    parts.append(_figure_tables(r))
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
        _img(v, name, plot=name) for name, v in pl.items()) + "</div>")
    if r["examples"]:
        parts.append("<h2>Examples</h2><p class='meta'>query · adversarial · perturbation "
                     "(stretched) · top-5 hits clean · top-5 hits attacked; green = relevant, "
                     "red = not. Click an image to enlarge it.</p><table class='strip'>")
        for ex in r["examples"]:
            def hits(rows: list[dict[str, Any]]) -> str:
                return "".join(_zoom(h["png"], f"id {h['id']} {','.join(h['labels'])} "
                                     f"d={h['hamming']}", "rel" if h["relevant"] else "irr")
                               for h in rows)
            parts.append(
                f"<tr><td class='l'>{html.escape(ex['method'])}<br>{ex['eps'] * 255:.0f}/255"
                f"<br>{html.escape(', '.join(ex['labels']))}<br>Hamming {ex['hamming']}</td>"
                f"<td class='ex'>{_zoom(ex['query_png'], 'query')}"
                f"{_zoom(ex['adversarial_png'], 'adversarial')}"
                f"{_zoom(ex['perturbation_png'], 'perturbation (stretched)')}</td>"
                f"<td>{hits(ex['hits_clean'])}</td><td>{hits(ex['hits_adversarial'])}</td></tr>")
        parts.append("</table>")
    parts.append(_glossary())
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
                 + _zoom(r["trigger_png"], "trigger") + " on queries: "
                 + "".join(_zoom(x, "triggered query") for x in r["triggered_examples"])
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
                     + " ".join(_zoom(e["original_png"], "original")
                                + _zoom(e["poisoned_png"], "poisoned") for e in r["examples"])
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
