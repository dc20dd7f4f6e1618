"""The attack audit's report section: verdict, figure tables, transfer, plots, examples and
the glossary, drawn from the result JSON alone."""

from __future__ import annotations

import html
from typing import Any

from service.jobs.audit_types.html import (
    axes,
    finish,
    fmt,
    frontier_plot,
    frontier_points,
    img,
    json_link,
    protocol_table,
    provenance,
    zoom,
)


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

    fig, ax = axes()
    if len(result["eps"]) == 1:  # one budget: a bar per method, not a line from eps 0
        rows = [next(r for r in result["attacks"] if r["method"] == m) for m in methods]
        bars = ax.bar(["clean", *methods], [clean["map_k"]] + [r["map_k"] for r in rows],
                      color=["grey"] + [f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.axhline(clean["map_k"], color="grey", ls="--", lw=1, label="clean")
        out["map_by_method"] = finish(fig, ax, "method", f"mAP@{k}",
                                      f"Retrieval mAP at eps = {eps_max * 255:.0f}/255")
    else:
        for m in methods:
            rows = sorted((r for r in result["attacks"] if r["method"] == m),
                          key=lambda r: r["eps"])
            ax.plot([0] + [r["eps"] * 255 for r in rows],
                    [clean["map_k"]] + [r["map_k"] for r in rows], marker="o", label=m)
        ax.axhline(clean["map_k"], color="grey", ls="--", lw=1, label="clean")
        out["map_vs_eps"] = finish(fig, ax, "eps (grey levels of 255)", f"mAP@{k}",
                                   "Retrieval mAP vs perturbation budget")

    last = [r for r in result["attacks"] if r["eps"] == eps_max]
    fig, ax = axes()
    ax.plot(clean["top_n"]["n"], clean["top_n"]["precision"], "k--", marker=".", label="clean")
    for r in last:
        ax.plot(r["top_n"]["n"], r["top_n"]["precision"], marker=".", label=r["method"])
    ax.set_xscale("log")
    out["top_n"] = finish(fig, ax, "N (top-N retrieved)", "precision@N",
                          f"Top-N precision, eps = {eps_max * 255:.0f}/255")

    fig, ax = axes()
    ax.plot(clean["pr_curve"]["recall"], clean["pr_curve"]["precision"], "k--", marker=".",
            label="clean")
    for r in last:
        ax.plot(r["pr_curve"]["recall"], r["pr_curve"]["precision"], marker=".",
                label=r["method"])
    ax.set_xlim(0, 1)
    out["pr"] = finish(fig, ax, "recall (Hamming radius 0..K)", "precision",
                       f"PR curve by Hamming radius, eps = {eps_max * 255:.0f}/255")
    untargeted = [a for a in result["attacks"] if not a.get("targeted")]
    if untargeted:  # strength vs time: every method a point, PGD-k the reference curve
        out["frontier"] = frontier_plot(
            frontier_points(untargeted + list(result.get("reference", []))),
            clean["map_all"], "PGD-k: audit with frontier=true" if not result.get("reference")
            else "")
    return out


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
    ("worst_case", "a fixed ensemble with nothing to tune: DHTA and PGD from the label's "
     "centre code (two random starts each), PGD from the query's own code, HAG, and every "
     "generator or stored pattern the bundle serves; per query it keeps the candidate whose "
     "code retrieves worst (lowest AP over the gallery). It is the report's headline when run."),
    ("strength vs time", "attacked mAP@all against attack time per image on a log scale: "
     "one point per method; with frontier=true the PGD-k curve (k = 1, 2, 5, 10, 20, 50 steps) "
     "shows what plain PGD reaches for the same time, so a point below the curve is an attack "
     "that buys more strength per millisecond."),
]


def glossary() -> str:
    return ("<h2 id='glossary'>Glossary</h2><dl class='gloss'>" + "".join(
        f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>" for term, text in GLOSSARY)
        + "</dl>")


def worst_attack(r: dict[str, Any]) -> dict[str, Any]:
    """The headline row: ``worst_case`` at the largest eps when the audit ran it, else the
    attack row with the lowest attacked mAP@all (the first one on a tie)."""
    wc = [a for a in r["attacks"] if a["method"] == "worst_case"]
    if wc:
        return max(wc, key=lambda a: a["eps"])
    return min(r["attacks"], key=lambda a: a["map_all"])


def worst_case_note(r: dict[str, Any]) -> str:
    """What the headline stands for: the worst_case ensemble and what it used, or a warning
    that the audit did not run it."""
    wc = [a for a in r["attacks"] if a["method"] == "worst_case"]
    if not wc:
        return ("<p class='meta' id='worst-case'>This audit did not run <b>worst_case</b> "
                "(the fixed ensemble: iterative attacks with restarts, HAG and every generator "
                "or pattern the bundle serves, strongest per query), so the worst attack "
                "above may under-state what an attacker can do; add it to "
                "<code>methods</code>.</p>")
    a = max(wc, key=lambda x: x["eps"])
    used = ", ".join(f"{html.escape(u['member'])} ({u['won']})" for u in a.get("used", []))
    return ("<p class='meta' id='worst-case'><b>Headline: worst_case</b>, a fixed ensemble "
            "that keeps per query the candidate with the lowest AP (in the spirit of "
            "AutoAttack). Members (queries won at "
            f"{a['eps_levels']}/255): {used or 'not recorded'}; "
            f"{fmt(a['ms_per_image'], '.2f')} ms / image.</p>")


def verdict(r: dict[str, Any]) -> str:
    """One paragraph: the worst attack and its drop; what the query set is and how its clean
    mAP compares with the figure the bundle records for its full query split."""
    clean = r["clean"]["map_all"]
    w = worst_attack(r)
    drop = 100.0 * (clean - w["map_all"]) / clean if clean > 0 else None
    label = "Worst case" if w["method"] == "worst_case" else "Worst attack"
    parts = [f"{label}: <b>{html.escape(w['method'])} at eps {w['eps_levels']}/255</b> "
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


def figure_tables(r: dict[str, Any]) -> str:
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
            + "".join(f"<td>{fmt(clean[key])}</td><td class='att'>{fmt(a[key])}</td>"
                      for key, _ in figs)
            + f"<td>{fmt(drop, '.1f')}</td>"
            + (f"<td>{fmt(a.get('t_map_clean'))}</td><td class='att'>{fmt(a.get('t_map'))}</td>"
               f"<td>{fmt(a.get('t_map_ceiling_anchor'))}</td>" if targeted else "")
            + "</tr>")
    parts.append("</table><h3>Perturbation and cost</h3><table id='perturbation'><tr>"
                 "<th class='l'>method</th><th>eps</th><th>codes changed %</th>"
                 "<th>mean Hamming moved</th><th>L∞ max</th><th>RMSE</th><th>PSNR dB</th>"
                 "<th>ms / image</th></tr>")
    for a in r["attacks"]:
        parts.append(
            f"<tr><td class='l'>{html.escape(a['method'])}</td><td>{a['eps_levels']}/255</td>"
            f"<td>{fmt(a['flipped_any_pct'], '.1f')}</td><td>{fmt(a['mean_hamming'], '.2f')}</td>"
            f"<td>{fmt(a['linf_max'] * 255, '.0f')}/255</td><td>{fmt(a['rmse_mean'])}</td>"
            f"<td>{fmt(a['psnr_mean_db'], '.1f')}</td><td>{fmt(a['ms_per_image'], '.2f')}</td>"
            "</tr>")
    parts.append("</table>")
    return "".join(parts)


def report_body(audit_id: str, r: dict[str, Any], json_href: str) -> str:
    """Everything below the heading of a finished attack audit's page."""
    k = r["protocol"]["map_k"]
    clean = r["clean"]
    parts = [verdict(r), worst_case_note(r), json_link(json_href),
             provenance(audit_id, r,
                        f"{r['queries']['audited']} queries "
                        f"({html.escape(r['queries']['source'])}) vs {r['gallery_size']} "
                        f"gallery items, {r['bits']} bits")]
    parts.append(figure_tables(r))
    if r.get("transfer_to"):
        names = r["transfer_to"]
        parts.append("<h2>Transfer</h2><p class='meta'>mAP@" + str(k) + " of other hashers on "
                     "the same adversarial queries (made against " + html.escape(r["model"]) +
                     ").</p><table><tr><th class='l'>method</th><th>eps</th>"
                     f"<th>{html.escape(r['model'])} (white-box)</th>"
                     + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>")
        first = r["attacks"][0].get("transfer", [])
        parts.append("<tr><td class='l'>clean</td><td>-</td>"
                     f"<td>{fmt(clean['map_k'])}</td>"
                     + "".join(f"<td>{fmt(t['map_clean'])}</td>" for t in first) + "</tr>")
        for a in r["attacks"]:
            parts.append(f"<tr><td class='l'>{html.escape(a['method'])}</td>"
                         f"<td>{a['eps_levels']}/255</td><td>{fmt(a['map_k'])}</td>"
                         + "".join(f"<td>{fmt(t['map_k'])}</td>" for t in a.get("transfer", []))
                         + "</tr>")
        parts.append("</table>")
    pl = plots(r)
    parts.append("<h2>Plots</h2><div class='plots'>" + "".join(
        img(v, name, plot=name) for name, v in pl.items()) + "</div>")
    if r["examples"]:
        parts.append("<h2>Examples</h2><p class='meta'>query · adversarial · perturbation "
                     "(stretched) · top-5 hits clean · top-5 hits attacked; green = relevant, "
                     "red = not. Click an image to enlarge it.</p><table class='strip'>")
        for ex in r["examples"]:
            def hits(rows: list[dict[str, Any]]) -> str:
                return "".join(zoom(h["png"], f"id {h['id']} {','.join(h['labels'])} "
                                    f"d={h['hamming']}", "rel" if h["relevant"] else "irr")
                               for h in rows)
            parts.append(
                f"<tr><td class='l'>{html.escape(ex['method'])}<br>{ex['eps'] * 255:.0f}/255"
                f"<br>{html.escape(', '.join(ex['labels']))}<br>Hamming {ex['hamming']}</td>"
                f"<td class='ex'>{zoom(ex['query_png'], 'query')}"
                f"{zoom(ex['adversarial_png'], 'adversarial')}"
                f"{zoom(ex['perturbation_png'], 'perturbation (stretched)')}</td>"
                f"<td>{hits(ex['hits_clean'])}</td><td>{hits(ex['hits_adversarial'])}</td></tr>")
        parts.append("</table>")
    parts.append(glossary())
    parts.append(protocol_table(r["protocol"]))
    return "".join(parts)


