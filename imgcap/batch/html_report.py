"""The HTML contact sheet of a captioning run: one self-contained page to look at captions next to their images.

One row per image: its thumbnail, id, caption (or the error that left it without one), and, where references
exist, the reference captions and the image's sentence BLEU-4. With BLEU-4 the rows are ranked best first and
any column sorts on a click; without it they keep the input order, images with errors last.

The page is a single file that opens anywhere, offline, and never reaches the network: thumbnails are embedded
as ``data:`` URIs and the CSS and the few lines of JavaScript are inline. Its Content-Security-Policy allows
nothing else (only ``data:`` images, and only the page's own style and script, by hash), so even a caption
that slipped past escaping could neither run a script nor fetch anything. Everything is rendered server-side
in its final order: sorting is the only thing JavaScript adds.

A large run is truncated to `max_rows` rows: with BLEU-4 the best and the worst halves (what a reviewer wants
to see), without it the first rows. The Parquet outputs hold every image.

    rows = select_rows(table, max_rows)          # optional: pick the rows first, e.g. to fetch only their
    html = render_contact_sheet(rows, report,    # thumbnails; then pass the original row count
                                title=..., max_rows=max_rows, total_rows=table.num_rows)
"""

from __future__ import annotations

import base64
import hashlib
from html import escape

import pyarrow as pa
import pyarrow.compute as pc

from imgcap.metrics.evaluate import EvaluationReport

_CSS = """
body { font: 14px/1.35 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 18px; margin: 0 0 6px; word-break: break-all; }
h2 { font-size: 15px; margin: 18px 0 6px; }
table { border-collapse: collapse; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
th { background: #f6f6f6; font-weight: 600; white-space: nowrap; }
th[data-sort] { cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
.counts { color: #555; margin: 0 0 10px; }
.scores { margin-bottom: 14px; }
.scores td, .scores th { padding: 2px 10px; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.thumb { width: 96px; padding: 3px; }
.thumb img, .thumb .missing { display: block; width: 96px; height: 96px; object-fit: contain; background: #f2f2f2; }
.thumb .missing { box-sizing: border-box; border: 1px dashed #c8c8c8; color: #999; font-size: 12px;
                  display: flex; align-items: center; justify-content: center; }
.id { font-weight: 600; word-break: break-all; max-width: 14em; }
.refs { margin: 4px 0 0; padding-left: 16px; color: #666; font-size: 12px; }
.error { color: #b00020; }
tr.error-row { background: #fff5f5; }
.source { font: 12px ui-monospace, monospace; color: #555; word-break: break-all; max-width: 26em; }
.note { background: #fff8e1; border-left: 3px solid #f0b400; padding: 6px 10px; }
"""

# Sorts the rows of the clicked header's own table (best and worst sections sort apart). A cell's data-value,
# when present, is its sort key (numbers, and the rank that restores the original order).
_JS = """
document.querySelectorAll("table.sheet th[data-sort]").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var numeric = th.dataset.sort === "num", up = th.getAttribute("aria-sort") !== "ascending";
    var key = function (row) {
      var cell = row.cells[col], v = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent;
      return numeric ? parseFloat(v) : v.toLowerCase();
    };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
    rows.forEach(function (row) { body.appendChild(row); });
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
  });
});
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


_CSP = (f"default-src 'none'; img-src data:; style-src {_csp_hash(_CSS)}; script-src {_csp_hash(_JS)}; "
        "base-uri 'none'; form-action 'none'")


def _halves(max_rows: int) -> tuple[int, int]:
    """How many best and worst rows a truncated scored sheet shows (the best get the odd one)."""
    return (max_rows + 1) // 2, max_rows // 2


def select_rows(rows: pa.Table, max_rows: int) -> pa.Table:
    """The rows a contact sheet of `max_rows` shows, in display order.

    With a ``bleu4`` column: best first (ties keep their input order), rows without a score after every
    scored row (captions without references, then errors); beyond `max_rows`, the first and the last halves
    of that ranking. Without: the input order with errors last, cut to the first `max_rows`. Needs
    ``image_id`` and ``error``; other columns are carried along. Idempotent, so a caller may select first
    (to fetch thumbnails only for these rows) and render the selection.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    failed = pc.is_valid(rows["error"])
    if "bleu4" in rows.column_names:
        keys = pa.table({"bleu4": rows["bleu4"], "failed": failed})
        # Arrow's sort is stable, which keeps ties in input order and makes selecting twice a no-op.
        order = pc.sort_indices(keys, sort_keys=[("bleu4", "descending", "at_end"), ("failed", "ascending", "at_end")])
        if len(order) > max_rows:
            best, worst = _halves(max_rows)
            order = pa.concat_arrays([order[:best], order[len(order) - worst:]])
    else:
        ok = pc.indices_nonzero(pc.invert(failed))
        bad = pc.indices_nonzero(failed)
        order = pa.concat_arrays([ok, bad])[:max_rows]
    return rows.take(order)


def render_contact_sheet(rows: pa.Table, scores: EvaluationReport | None, *, title: str, max_rows: int = 2000,
                         total_rows: int | None = None) -> str:
    """The contact sheet of `rows` as one self-contained HTML5 page (see the module docstring).

    `rows`: ``image_id``, ``source``, ``caption`` (null without a caption), ``error`` (null when fine),
    ``thumbnail`` (JPEG bytes or null) and, only where references exist, ``references`` (list of strings) and
    ``bleu4`` (per-image sentence BLEU-4). `scores`: the corpus scores shown in the header, if any. At most
    `max_rows` rows are shown (see `select_rows`). `total_rows`: how many rows there were when the caller
    passes rows it already selected with `select_rows` (default: ``rows.num_rows``), for the "left out" note.
    All text is HTML-escaped: ids, sources and captions are untrusted.
    """
    total = rows.num_rows if total_rows is None else total_rows
    if total < rows.num_rows:
        raise ValueError(f"total_rows={total} is less than the {rows.num_rows} rows given")
    scored = "bleu4" in rows.column_names
    shown = select_rows(rows, max_rows).to_pylist()
    truncated = total > len(shown)

    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<header>\n",
        f"<h1>{escape(title)}</h1>\n",
        f"<p class=\"counts\">{_counts(shown, total)}</p>\n",
    ]
    if scores is not None:
        parts.append(_scores_table(scores))
    parts.append("</header>\n<main>\n")

    if not truncated:
        parts.append(_sheet(shown, scored, first_rank=1, section="all"))
    elif scored:
        best, _ = _halves(max_rows)
        top, bottom = shown[:best], shown[best:]
        parts.append(f"<p class=\"note\">{total - len(shown)} of {total} images are left out: this page shows the "
                     f"{len(top)} best and the {len(bottom)} worst by BLEU-4. "
                     "The Parquet report (report.parquet) holds every image.</p>\n")
        parts.append(f"<h2>Best {len(top)} by BLEU-4</h2>\n")
        parts.append(_sheet(top, scored, first_rank=1, section="best"))
        parts.append(f"<h2>Worst {len(bottom)} by BLEU-4</h2>\n")
        parts.append(_sheet(bottom, scored, first_rank=total - len(bottom) + 1, section="worst"))
    else:
        parts.append(f"<p class=\"note\">{total - len(shown)} of {total} images are left out: this page shows the "
                     f"first {len(shown)}. The captions Parquet files hold every image.</p>\n")
        parts.append(_sheet(shown, scored, first_rank=1, section="first"))
    parts.append(f"</main>\n<script>{_JS}</script>\n</body>\n</html>\n")
    return "".join(parts)


def _counts(shown: list[dict], total: int) -> str:
    if total > len(shown):
        return f"{len(shown)} of {total} images shown"
    failed = sum(1 for r in shown if r.get("error") is not None)
    captioned = sum(1 for r in shown if r.get("caption") is not None)
    return f"{total} images: {captioned} captioned, {failed} with errors"


def _scores_table(report: EvaluationReport) -> str:
    def cell(value: float | None) -> str:
        return f"<td class=\"num\">{value:.4f}</td>" if value is not None else "<td class=\"num\">&ndash;</td>"

    context = (f"<td>{escape(report.split)}</td><td>{escape(report.text_mode)}</td>"
               f"<td>{escape(report.decoding)}</td><td class=\"num\">{report.num_images}</td>")
    lines = ["<table class=\"scores\">\n<thead><tr><th>scorer</th><th>BLEU-1</th><th>BLEU-2</th><th>BLEU-3</th>"
             "<th>BLEU-4</th><th>CIDEr</th><th>split</th><th>text mode</th><th>decoding</th><th>images</th>"
             "</tr></thead>\n<tbody>\n"]
    bleu = list(report.nltk_bleu) + [None] * (4 - len(report.nltk_bleu))
    lines.append("<tr class=\"scorer\" data-scorer=\"nltk\"><td>nltk</td>" + "".join(cell(b) for b in bleu[:4])
                 + cell(None) + context + "</tr>\n")
    if report.coco:
        coco = [report.coco.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")]
        lines.append("<tr class=\"scorer\" data-scorer=\"coco\"><td>coco</td>" + "".join(cell(v) for v in coco)
                     + context + "</tr>\n")
    lines.append("</tbody>\n</table>\n")
    return "".join(lines)


def _sheet(rows: list[dict], scored: bool, *, first_rank: int, section: str) -> str:
    head = ["<th data-sort=\"num\"" + ("" if scored else " aria-sort=\"ascending\"") + ">#</th>",
            "<th>thumbnail</th>", "<th data-sort=\"text\">image id</th>",
            "<th data-sort=\"text\">caption" + (" / references" if scored else "") + "</th>"]
    if scored:
        head.append("<th data-sort=\"num\" aria-sort=\"descending\">BLEU-4</th>")
    head.append("<th data-sort=\"text\">source</th>")
    out = [f"<table class=\"sheet\" data-section=\"{section}\">\n<thead><tr>{''.join(head)}</tr></thead>\n<tbody>\n"]
    for rank, row in enumerate(rows, first_rank):
        out.append(_row(row, rank, scored))
    out.append("</tbody>\n</table>\n")
    return "".join(out)


def _row(row: dict, rank: int, scored: bool) -> str:
    image_id = escape(str(row["image_id"]))
    error = row.get("error")
    cells = [f"<td class=\"num rank\" data-value=\"{rank}\">{rank}</td>", f"<td class=\"thumb\">{_thumb(row)}</td>",
             f"<td class=\"id\">{image_id}</td>"]
    if error is not None:
        text = f"<span class=\"error\">error: {escape(str(error))}</span>"
    elif row.get("caption") is not None:
        text = f"<span class=\"text\">{escape(str(row['caption']))}</span>"
    else:
        text = "<span class=\"error\">no caption</span>"
    references = row.get("references") or []
    if references:
        text += "<ul class=\"refs\">" + "".join(f"<li>{escape(str(r))}</li>" for r in references) + "</ul>"
    cells.append(f"<td class=\"caption\">{text}</td>")
    if scored:
        bleu4 = row.get("bleu4")
        # -1 sorts unscored rows below every real score (BLEU is in [0, 1]).
        cells.append(f"<td class=\"num bleu4\" data-value=\"{-1 if bleu4 is None else round(bleu4, 6)}\">"
                     + ("&ndash;" if bleu4 is None else f"{bleu4:.3f}") + "</td>")
    cells.append(f"<td class=\"source\">{escape(str(row.get('source') or ''))}</td>")
    css = "image-row error-row" if error is not None else "image-row"
    return f"<tr class=\"{css}\" data-image-id=\"{image_id}\">{''.join(cells)}</tr>\n"


def _thumb(row: dict) -> str:
    data = row.get("thumbnail")
    if not data:
        return "<div class=\"missing\" role=\"img\" aria-label=\"no thumbnail\">no image</div>"
    # The thumbnail is the image's own downscaled JPEG (imgcap.vision.imaging.thumbnail_jpeg); embedding it keeps
    # the page one file that works offline. Its size is left to CSS (96px box, aspect ratio kept).
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    return f"<img src=\"{uri}\" alt=\"{escape(str(row['image_id']))}\" loading=\"eager\">"
