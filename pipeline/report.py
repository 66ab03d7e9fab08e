"""A single-file HTML report of a label dataset: totals, errors, per-class charts, sample overlays.

Why one self-contained file: it gets attached to tickets, mailed, opened on air-gapped machines.
So: inline CSS, images as base64 data URIs, charts as inline SVG, no JavaScript, no CDN.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ebseg_core.storage import write_bytes_atomic
from pipeline import curate as C
from pipeline.overlay import class_color

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px} .muted{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 16px;min-width:120px}
.card .v{font-size:22px;font-weight:600} .card .k{font-size:12px;color:#666;text-transform:uppercase}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f0f0f0} td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:24px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.grid figure{margin:0;background:#fff;border:1px solid #ddd;padding:4px;max-width:420px}
.grid img{display:block;max-width:410px;height:auto}
figcaption{font-size:11px;color:#555;word-break:break-all;margin-top:2px}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #555;vertical-align:middle;margin-right:4px}
.err{color:#a00}
"""


@dataclass
class ReportOptions:
    """Bounds that keep the report small enough to mail: classes shown, overlays per class, thumb size."""

    max_classes: int = 12
    samples_per_class: int = 4
    max_side: int = 320
    min_side: int = 200
    seed: int = 0
    min_pixel_confidence: float | None = None
    errors_listed: int = 5


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def svg_bar_chart(title: str, items: Sequence[tuple[str, float, str]], fmt=lambda v: f"{v:,.0f}",
                  width: int = 520) -> str:
    """Horizontal bar chart as inline SVG; ``items`` are (label, value, css colour)."""
    row_h, label_w, value_w, top = 20, 150, 90, 26
    height = top + row_h * max(len(items), 1) + 8
    vmax = max((v for _, v, _ in items), default=0) or 1
    bar_w = width - label_w - value_w - 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}" style="background:#fff;border:1px solid #ddd">',
             f'<text x="8" y="17" font-size="13" font-weight="600">{html.escape(title)}</text>']
    for i, (label, value, colour) in enumerate(items):
        y = top + i * row_h
        w = max(0.0, bar_w * value / vmax)
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" font-size="12" text-anchor="end">'
                     f'{html.escape(label[:22])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{colour}" '
                     'stroke="#555" stroke-width="0.5"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 14}" font-size="11">{html.escape(fmt(value))}</text>')
    if not items:
        parts.append(f'<text x="8" y="{top + 14}" font-size="12" fill="#666">no data</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(counts: Sequence[int], colour: str, width: int = 120, height: int = 28) -> str:
    """Tiny histogram (confidence 0..1 left to right) as inline SVG."""
    top = max(counts) or 1
    bw = width / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - height * c / top:.1f}" width="{bw - 1:.1f}" '
        f'height="{height * c / top:.1f}" fill="{colour}"/>'
        for i, c in enumerate(counts)
    )
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'style="background:#f4f4f4">{bars}</svg>')


def _data_uri(img) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_report(labels_url: str, opts: ReportOptions | None = None) -> str:
    """The report HTML for a label dataset (local or s3://)."""
    opts = opts or ReportOptions()
    ds = C.open_labels(labels_url)
    st = C.stats(ds)
    e = html.escape
    out: list[str] = []
    out.append(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>EBSeg labels: "
               f"{e(labels_url)}</title><style>{CSS}</style></head><body>")
    out.append("<h1>EBSeg pseudo-label report</h1>")
    model = ds.meta.model or {}
    out.append(f'<div class="muted">{e(labels_url)} &middot; schema v{ds.meta.schema_version} &middot; '
               f'vocabulary {e(ds.meta.vocabulary_id or "?")} ({len(ds.names)} classes) &middot; model '
               f'{e(str(model.get("preset") or model.get("name") or model.get("model_id") or "?"))} &middot; '
               f'generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}</div>')
    _totals(out, ds, st)
    _errors(out, ds, st, opts)
    classes = sorted([c for c in st.classes if c.images], key=lambda c: (-c.images, c.id))
    shown = classes[:opts.max_classes]
    colour = {c.id: _hex(class_color(c.id)) for c in classes}
    _classes(out, ds, st, classes, shown, colour)
    _samples(out, ds, shown, colour, opts)
    out.append("</body></html>")
    return "".join(out)


def _totals(out: list[str], ds, st) -> None:
    e = html.escape
    seen = sum(1 for c in st.classes if c.images)
    cards = [("rows", st.rows), ("labelled", st.ok), ("errors", st.errors),
             ("megapixels", round(st.pixels / 1e6, 2)), ("classes seen", f"{seen} / {len(ds.names)}")]
    out.append('<h2>Totals</h2><div class="cards" id="totals">')
    for k, v in cards:
        out.append(f'<div class="card"><div class="v" data-key="{e(k)}">{e(str(v))}</div>'
                   f'<div class="k">{e(k)}</div></div>')
    out.append("</div>")


def _errors(out: list[str], ds, st, opts: ReportOptions) -> None:
    e = html.escape
    out.append('<h2>Errors by kind</h2>')
    if not st.errors:
        out.append('<p class="muted">No errors: every input was labelled.</p>')
        return
    kinds = sorted(st.errors_by_kind.items(), key=lambda kv: -kv[1])
    out.append(svg_bar_chart("errors by kind", [(k, v, "#d9534f") for k, v in kinds]))
    out.append('<table id="errors"><tr><th>kind</th><th>rows</th><th>examples</th></tr>')
    for kind, n in kinds:
        ex = C.query(ds, C.Query(status="error", error_kinds=[kind], limit=opts.errors_listed),
                     columns=["uri", "error"]).to_pylist()
        items = "<br>".join(f"{e(r['uri'])} &mdash; <span class=\"err\">{e((r['error'] or '')[:160])}</span>"
                            for r in ex)
        out.append(f"<tr><td>{e(kind)}</td><td class=\"n\">{n}</td><td>{items}</td></tr>")
    out.append("</table>")


def _classes(out: list[str], ds, st, classes: list, shown: list, colour: dict[int, str]) -> None:
    """Per-class charts (the ``shown`` classes) and the table of every class present."""
    e = html.escape
    out.append("<h2>Classes</h2>")
    if len(classes) > len(shown):
        out.append(f'<p class="muted">Charts show the {len(shown)} classes in most images '
                   f'(of {len(classes)} present); the table lists all.</p>')
    out.append('<div class="charts">')
    out.append(svg_bar_chart("images per class", [(c.name, c.images, colour[c.id]) for c in shown]))
    total_px = st.pixels or 1
    out.append(svg_bar_chart("area per class (% of labelled pixels)",
                             [(c.name, 100.0 * c.pixels / total_px, colour[c.id]) for c in shown],
                             fmt=lambda v: f"{v:.1f}%"))
    out.append("</div>")
    out.append('<table id="classes"><tr><th>id</th><th>class</th><th>synonyms</th><th>images</th>'
               '<th>pixels</th><th>area %</th><th>mean conf.</th><th>confidence (0&rarr;1)</th></tr>')
    syns = ds.meta.synonyms or [[n] for n in ds.names]
    for c in classes:
        mc = c.mean_confidence
        out.append(
            f'<tr data-class="{e(c.name)}"><td class="n">{c.id}</td><td><span class="swatch" '
            f'style="background:{colour[c.id]}"></span>{e(c.name)}</td><td>{e(", ".join(syns[c.id][1:]))}</td>'
            f'<td class="n">{c.images}</td><td class="n">{c.pixels:,}</td>'
            f'<td class="n">{100.0 * c.pixels / total_px:.2f}</td>'
            f'<td class="n">{"" if math.isnan(mc) else f"{mc:.3f}"}</td>'
            f'<td>{svg_histogram(c.confidence_hist, colour[c.id])}</td></tr>'
        )
    out.append("</table>")
    absent = [n for n, c in zip(ds.names, st.classes) if not c.images]
    if absent:
        out.append(f'<p class="muted">Never predicted ({len(absent)}): {e(", ".join(absent[:60]))}'
                   f'{" ..." if len(absent) > 60 else ""}</p>')


def _samples(out: list[str], ds, shown: list, colour: dict[int, str], opts: ReportOptions) -> None:
    """Up to ``opts.samples_per_class`` overlays per shown class; each image is rendered once."""
    e = html.escape
    out.append("<h2>Samples</h2>")
    if not shown or opts.samples_per_class <= 0:
        out.append('<p class="muted">No labelled images.</p>')
        return
    out.append(f'<p class="muted">Up to {opts.samples_per_class} random images per class (seed {opts.seed}), '
               'class colours blended over the image, legend on the right.</p>')
    ok = C.query(ds, C.Query(status="ok"), columns=["image_id", "status", "uri", "classes"])
    lf = C.make_label_filter(ds, min_confidence=opts.min_pixel_confidence) \
        if opts.min_pixel_confidence is not None else None
    cache: dict[str, str] = {}
    for c in shown:
        picked = C.stratified_sample(ok, opts.samples_per_class, seed=opts.seed, class_ids=[c.id])
        ids = picked.column("image_id").to_pylist()
        out.append(f'<h3 id="samples-{c.id}"><span class="swatch" style="background:{colour[c.id]}"></span>'
                   f'{e(c.name)}</h3><div class="grid">')
        for row in ds.fetch(ids).to_pylist():
            frac = next((x["pixel_fraction"] for x in row["classes"] or [] if x["id"] == c.id), 0.0)
            if row["image_id"] not in cache:
                try:
                    cache[row["image_id"]] = _data_uri(C.overlay_for_row(ds, row, lf, max_side=opts.max_side,
                                                                       min_side=opts.min_side))
                except Exception as ex:  # noqa: BLE001 - a vanished source image must not kill the report
                    cache[row["image_id"]] = ""
                    out.append(f'<figure><figcaption class="err">{e(row["uri"])}: '
                               f'{e(type(ex).__name__)}: {e(str(ex)[:120])}</figcaption></figure>')
                    continue
            if cache[row["image_id"]]:
                out.append(f'<figure><img alt="{e(row["uri"])}" src="{cache[row["image_id"]]}">'
                           f'<figcaption>{e(row["uri"].rsplit("/", 1)[-1])} &middot; {e(c.name)} '
                           f'{100 * frac:.1f}%</figcaption></figure>')
        out.append("</div>")


def write_report(labels_url: str, out_url: str, opts: ReportOptions | None = None) -> int:
    """Build the report and write it (local path or s3://); returns its size in bytes."""
    data = build_report(labels_url, opts).encode("utf-8")
    write_bytes_atomic(out_url, data)
    return len(data)

