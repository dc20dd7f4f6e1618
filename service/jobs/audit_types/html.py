"""Pieces every audit report shares: style, images, plots, the provenance line, the JSON link,
the protocol table and the image-count script.

Plots are drawn with matplotlib (Agg) and embedded as base64 PNG, so a page needs no server
and no network. The script marks ``<body data-images-loaded>`` with the number of images
that decoded, which the headless-browser tests read.
"""

from __future__ import annotations

import base64
import html
import io
import time
from typing import Any


def b64png(chw: Any) -> str:
    """A (C, H, W) uint8 image as base64 PNG."""
    from service.images import encode_png

    return base64.b64encode(encode_png(chw)).decode()


def fig_png(fig: Any) -> str:
    """A matplotlib figure as base64 PNG (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def axes() -> tuple[Any, Any]:
    """A new report-sized figure on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.5, 3.6))


def finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str) -> str:
    """The styling every report plot shares (a 0..1 mAP/precision axis); base64 PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig_png(fig)


def fmt(v: Any, spec: str = ".4f") -> str:
    """A figure for a table cell; ``-`` for None."""
    return "-" if v is None else format(v, spec)


def img(b64: str, title: str = "", cls: str = "", plot: str | None = None) -> str:
    data = f' data-plot="{plot}"' if plot else ""
    return (f'<img class="{cls}" title="{html.escape(title)}" alt="{html.escape(title)}"{data} '
            f'src="data:image/png;base64,{b64}">')


def zoom(b64: str, title: str = "", cls: str = "") -> str:
    """A thumbnail that a click enlarges (centred over a dimmed page) and a second click
    shrinks back: a hidden checkbox inside a label, styled by ``:checked``; no script, and the
    image data appears once."""
    return f"<label class='zoom'><input type='checkbox'>{img(b64, title, cls)}</label>"


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

SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>"""


def json_link(href: str) -> str:
    return (f"<p class='meta'>Data: <a id='json-link' href='{html.escape(href)}'>this report as "
            "JSON</a> (every figure, curve and example) · <a href='#glossary'>glossary</a></p>")


def provenance(audit_id: str, r: dict[str, Any], details: str) -> str:
    """The report's first line: which audit, bundle and code made it; ``details`` (HTML) in
    the middle."""
    return (f"<p class='meta'>audit <code>{audit_id}</code> · bundle "
            f"<code>{html.escape(r['model'])}</code> v{html.escape(str(r['bundle_version']))} "
            f"sha <code>{r['bundle_sha'][:16]}…</code> · hashaudit {r['package_version']} · "
            f"seed {r['seed']} · {details} · generated "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>")


def protocol_table(protocol: dict[str, Any]) -> str:
    return "<h2>Protocol</h2><table>" + "".join(
        f"<tr><th class='l'>{html.escape(str(key))}</th><td class='l'>"
        f"{html.escape(str(val))}</td></tr>" for key, val in protocol.items()) + "</table>"


def frontier_points(rows: list[dict[str, Any]], map_key: str = "map_all") -> list[dict[str, Any]]:
    """(method, eps, ms/image, mAP) points of attack rows for :func:`frontier_plot`.

    A row whose ``base_method`` is ``pgd`` and that names its ``steps`` joins the PGD-k
    reference curve; ``worst_case`` is marked; every other row is one point.
    """
    out = []
    for r in rows:
        if r.get("ms_per_image") is None or r.get(map_key) is None:
            continue
        base = r.get("base_method", r["method"])
        kind = ("reference" if base == "pgd" and r.get("steps") is not None
                else "worst_case" if base == "worst_case" else "method")
        out.append({"name": r["method"], "eps": float(r["eps"]), "ms": float(r["ms_per_image"]),
                    "map": float(r[map_key]), "kind": kind, "steps": r.get("steps")})
    return out


def frontier_plot(points: list[dict[str, Any]], clean_map: float, subtitle: str = "",
                  map_label: str = "mAP@all") -> str:
    """Attacked mAP against ms/image (log x), one panel per eps; PGD-k as the reference
    curve, every other method a labelled point, worst_case a star. Base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps_list = sorted({p["eps"] for p in points})
    fig, axs = plt.subplots(1, max(1, len(eps_list)), figsize=(5.2 * max(1, len(eps_list)), 4),
                            squeeze=False)
    for ax, eps in zip(axs[0], eps_list, strict=False):
        pts = [p for p in points if p["eps"] == eps]
        ref = sorted((p for p in pts if p["kind"] == "reference"), key=lambda p: p["steps"])
        if ref:
            ax.plot([p["ms"] for p in ref], [p["map"] for p in ref], "k-o", ms=4,
                    label="PGD-k (reference)")
            for p in ref:
                ax.annotate(str(p["steps"]), (p["ms"], p["map"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        for i, p in enumerate(q for q in pts if q["kind"] != "reference"):
            star = p["kind"] == "worst_case"
            ax.plot([p["ms"]], [p["map"]], "*" if star else "o", ms=12 if star else 6,
                    color="crimson" if star else f"C{i % 10}", label=p["name"])
        ax.axhline(clean_map, color="grey", ls="--", lw=1, label="clean")
        ax.set_xscale("log")
        ax.set_xlabel("ms / image (log scale)")
        ax.set_ylabel(f"attacked {map_label}")
        ax.set_ylim(0, 1)
        ax.set_title(f"eps = {eps * 255:.0f}/255" + (f"\n{subtitle}" if subtitle else ""),
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig_png(fig)
