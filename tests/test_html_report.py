"""The HTML contact sheet, rendered by a real headless Chromium (`imgcap.testing.browser`): the tests read the
rendered DOM, whether each embedded JPEG decoded (``naturalWidth``), the laid-out size, what the page tried to
load, console errors, click the sort headers, and check the thumbnail's pixels in a screenshot. Skipped only
when no Chromium is installed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from _imaging import jpeg_bytes
from PIL import Image

from imgcap.batch.html_report import render_contact_sheet, select_rows
from imgcap.metrics.evaluate import EvaluationReport
from imgcap.testing.browser import Browser, Page

EVIL_SOURCE = "/data/a&b/<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">.jpg"
EVIL_ID = "tom&jerry\"<i>"
EVIL_CAPTION = "a <b>bold</b> dog & a cat"
REPORT = EvaluationReport(split="dev", text_mode="keras", decoding="beam-3", num_images=5,
                          nltk_bleu=[0.61234, 0.41, 0.27, 0.18765], coco={"bleu1": 0.6, "bleu2": 0.4, "bleu3": 0.26,
                                                                           "bleu4": 0.17, "cider": 0.45678})


def _table(rows: list[dict], scored: bool) -> pa.Table:
    schema = [("image_id", pa.string()), ("source", pa.string()), ("caption", pa.string()), ("error", pa.string()),
              ("thumbnail", pa.binary())]
    if scored:
        schema += [("references", pa.list_(pa.string())), ("bleu4", pa.float32())]
    return pa.Table.from_pylist(rows, pa.schema(schema))


def _scored_rows() -> list[dict]:
    """Five scored images in shuffled BLEU order (each thumbnail a different width), hostile text, one error."""
    bleu = {"img_c": 0.31, EVIL_ID: 0.87, "img_a": 0.05, "img_e": 0.52, "img_b": 0.12}
    rows = []
    for n, (image_id, score) in enumerate(bleu.items()):
        source = EVIL_SOURCE if image_id == EVIL_ID else f"s3://bucket/{image_id}.jpg"
        rows.append({"image_id": image_id, "source": source,
                     "caption": EVIL_CAPTION if image_id == EVIL_ID else f"caption of {image_id}",
                     "error": None, "thumbnail": jpeg_bytes(seed=n, width=40 + 8 * n, height=48),
                     "references": [f"reference one of {image_id}", f"reference <two> of {image_id}"], "bleu4": score})
    rows.insert(2, {"image_id": "broken", "source": "s3://bucket/broken.jpg", "caption": None,
                    "error": "corrupt image: truncated", "thumbnail": None, "references": None, "bleu4": None})
    return rows


ROWS_JS = """Array.from(document.querySelectorAll('tr.image-row')).map(r => r.dataset.imageId)"""


def _section_ids(page: Page, section: str) -> list[str]:
    return page.eval(f"Array.from(document.querySelectorAll('table.sheet[data-section={section}] tr.image-row'))"
                     ".map(r => r.dataset.imageId)")


def _click(page: Page, header: str) -> list[str]:
    page.eval("Array.from(document.querySelectorAll('table.sheet th'))"
              f".find(th => th.textContent.startsWith({header!r})).click()")
    return page.eval(ROWS_JS)


# --- tests ---------------------------------------------------------------------------------------------------

def test_scored_sheet_renders_every_row_best_first_with_decoded_thumbnails(browser: Browser, tmp_path: Path) -> None:
    rows = _scored_rows()
    path = tmp_path / "report.html"
    path.write_text(render_contact_sheet(_table(rows, scored=True), REPORT, title="run <1> & co"), encoding="utf-8")
    best_first = [EVIL_ID, "img_e", "img_c", "img_b", "img_a", "broken"]  # unscored error row last

    page = browser.open(path)
    assert page.eval(ROWS_JS) == best_first
    assert page.eval("document.title") == "run <1> & co"

    # Hostile text is shown as text: nothing ran, no element was injected, the exact strings are on the page.
    assert page.eval("window.pwned === undefined && document.scripts.length === 1")
    assert page.eval("document.querySelectorAll('main b, main i, main img:not(.thumb img), main script').length") == 0
    evil = f"document.querySelector('tr.image-row[data-image-id=\"' + CSS.escape({json.dumps(EVIL_ID)}) + '\"]')"
    assert page.eval(f"{evil}.querySelector('.source').textContent") == EVIL_SOURCE
    assert page.eval(f"{evil}.querySelector('.id').textContent") == EVIL_ID
    assert page.eval(f"{evil}.querySelector('.caption .text').textContent") == EVIL_CAPTION
    assert page.eval(f"Array.from({evil}.querySelectorAll('.refs li')).map(li => li.textContent)") == [
        f"reference one of {EVIL_ID}", f"reference <two> of {EVIL_ID}"]
    assert page.eval(f"{evil}.querySelector('.bleu4').textContent") == "0.870"

    # Every thumbnail decoded to its JPEG's own size and is laid out in the 96 px box; the error row has the
    # placeholder and its error, styled as one.
    decoded = page.eval("Array.from(document.querySelectorAll('tr.image-row')).map(r => { const i = r.querySelector"
                        "('.thumb img'); return i && [i.complete, i.naturalWidth, i.naturalHeight,"
                        " i.getBoundingClientRect().width, i.getBoundingClientRect().height]; })")
    widths = {r["image_id"]: Image.open(io.BytesIO(r["thumbnail"])).width for r in rows if r["thumbnail"]}
    assert decoded[:-1] == [[True, widths[i], 48, 96, 96] for i in best_first[:-1]]
    assert decoded[-1] is None
    broken = "document.querySelector('tr.image-row[data-image-id=broken]')"
    assert page.eval(f"{broken}.classList.contains('error-row') && !!{broken}.querySelector('.thumb .missing')")
    assert page.eval(f"{broken}.querySelector('.caption .error').textContent") == "error: corrupt image: truncated"
    assert page.eval(f"getComputedStyle({broken}.querySelector('.caption .error')).color") == "rgb(176, 0, 32)"

    # The corpus scores, with what they were measured on.
    scores = page.eval("Array.from(document.querySelectorAll('table.scores tbody tr'))"
                       ".map(r => Array.from(r.cells).map(c => c.textContent))")
    assert scores == [["nltk", "0.6123", "0.4100", "0.2700", "0.1877", "\u2013", "dev", "keras", "beam-3", "5"],
                      ["coco", "0.6000", "0.4000", "0.2600", "0.1700", "0.4568", "dev", "keras", "beam-3", "5"]]

    # Sorting by a click (inline script allowed by the page's CSP): BLEU-4 ascending, back, by id, by rank.
    assert _click(page, "BLEU-4") == best_first[::-1]
    assert _click(page, "BLEU-4") == best_first
    assert _click(page, "image id") == sorted(best_first, key=str.lower)
    assert _click(page, "#") == best_first

    # Self-contained: nothing fetched, nothing blocked, no script error.
    assert page.requests() == []
    assert page.errors() == []

    # The pixels: the best row's thumbnail, as painted, has the colours of its JPEG (not the grey placeholder).
    shot = page.screenshot(tmp_path / "report.png")
    box = page.eval(f"(r => [r.x, r.y, r.width, r.height])({evil}.querySelector('.thumb img').getBoundingClientRect())")
    x, y, w, h = (round(v) for v in box)
    thumb = Image.open(io.BytesIO(rows[1]["thumbnail"])).convert("RGB")
    scale = min(w / thumb.width, h / thumb.height)  # object-fit: contain, centred
    shown_w, shown_h = round(thumb.width * scale), round(thumb.height * scale)
    left, top = x + (w - shown_w) // 2, y + (h - shown_h) // 2
    painted = np.asarray(shot.crop((left + 4, top + 4, left + shown_w - 4, top + shown_h - 4)), dtype=float)
    expected = np.asarray(thumb.resize((shown_w, shown_h)).crop((4, 4, shown_w - 4, shown_h - 4)), dtype=float)
    assert painted.std() > 10  # a picture, not a flat box
    assert np.abs(painted - expected).mean() < 12
    page.close()

    # Without JavaScript the page shows the same rows in the same order.
    static = browser.open(path, javascript=False)
    assert static.eval(ROWS_JS) == best_first
    assert static.eval("document.querySelectorAll('.thumb img').length") == 5
    static.close()


def test_large_scored_run_shows_the_best_and_worst_halves(browser: Browser, tmp_path: Path) -> None:
    # 30 images with distinct BLEU-4 in scrambled order; img_i scores i / 100.
    order = [(7 * i) % 30 for i in range(30)]
    table = _table([{"image_id": f"img_{i:02d}", "source": f"/photos/{i}.jpg", "caption": f"caption {i}",
                     "error": None, "thumbnail": jpeg_bytes(seed=i, width=32, height=24),
                     "references": [f"ref {i}"], "bleu4": i / 100} for i in order], scored=True)
    path = tmp_path / "report.html"
    html = render_contact_sheet(table, REPORT, title="big run", max_rows=10)
    path.write_text(html, encoding="utf-8")

    page = browser.open(path)
    assert page.eval(ROWS_JS) == [f"img_{i:02d}" for i in (29, 28, 27, 26, 25, 4, 3, 2, 1, 0)]
    assert _section_ids(page, "best") == [f"img_{i:02d}" for i in (29, 28, 27, 26, 25)]
    assert _section_ids(page, "worst") == [f"img_{i:02d}" for i in (4, 3, 2, 1, 0)]
    assert page.eval("Array.from(document.querySelectorAll('table.sheet[data-section=worst] .rank'))"
                     ".map(c => c.textContent)") == ["26", "27", "28", "29", "30"]
    note = page.eval("document.querySelector('.note').textContent")
    assert "20 of 30 images are left out" in note and "report.parquet" in note
    assert page.eval("Array.from(document.querySelectorAll('.thumb img')).every(i => i.naturalWidth === 32)")
    # Sorting stays within a section.
    page.eval("document.querySelector('table.sheet[data-section=worst] th[aria-sort]').click()")
    assert _section_ids(page, "worst") == [f"img_{i:02d}" for i in (0, 1, 2, 3, 4)]
    assert _section_ids(page, "best") == [f"img_{i:02d}" for i in (29, 28, 27, 26, 25)]
    assert page.errors() == [] and page.requests() == []
    page.close()

    # The job selects first (to read only the thumbnails shown) and passes the full count: the same page.
    assert render_contact_sheet(select_rows(table, 10), REPORT, title="big run", max_rows=10, total_rows=30) == html


def test_unscored_sheet_keeps_input_order_with_errors_last(browser: Browser, tmp_path: Path) -> None:
    rows = [{"image_id": f"p{i}", "source": f"/in/p{i}.jpg", "caption": None if i in (1, 4) else f"caption {i}",
             "error": "not an image" if i in (1, 4) else None,
             "thumbnail": None if i in (1, 4) else jpeg_bytes(seed=i)} for i in range(6)]
    table = _table(rows, scored=False)
    path = tmp_path / "all.html"
    path.write_text(render_contact_sheet(table, None, title="no references"), encoding="utf-8")

    page = browser.open(path)
    assert page.eval(ROWS_JS) == ["p0", "p2", "p3", "p5", "p1", "p4"]
    assert page.eval("document.querySelectorAll('table.scores, .note, td.bleu4, .refs').length") == 0
    assert page.eval("Array.from(document.querySelectorAll('table.sheet th')).map(th => th.textContent)") == [
        "#", "thumbnail", "image id", "caption", "source"]
    assert page.eval("Array.from(document.querySelectorAll('.thumb img')).map(i => i.naturalWidth)") == [64] * 4
    assert page.eval("document.querySelectorAll('tr.error-row .thumb .missing').length") == 2
    assert page.eval("document.querySelector('.counts').textContent") == "6 images: 4 captioned, 2 with errors"
    assert page.errors() == [] and page.requests() == []
    page.close()

    truncated = tmp_path / "first.html"
    truncated.write_text(render_contact_sheet(table, None, title="no references", max_rows=4), encoding="utf-8")
    page = browser.open(truncated)
    assert page.eval(ROWS_JS) == ["p0", "p2", "p3", "p5"]
    assert "2 of 6 images are left out" in page.eval("document.querySelector('.note').textContent")
    page.close()


# --- without a browser ---------------------------------------------------------------------------------------

def test_page_is_self_contained_and_escaped() -> None:
    html = render_contact_sheet(_table(_scored_rows(), scored=True), REPORT, title="<t>")
    assert html.startswith("<!DOCTYPE html>")
    assert "<script>window.pwned" not in html and "<b>bold" not in html and "<title><t>" not in html
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in html and "tom&amp;jerry&quot;&lt;i&gt;" in html
    assert html.count("<script>") == 1 and html.count("data:image/jpeg;base64,") == 5
    assert "http://" not in html and "https://" not in html and "href=" not in html


def test_select_rows_orders_and_validates() -> None:
    table = _table(_scored_rows(), scored=True)
    picked = select_rows(table, 4)
    assert picked["image_id"].to_pylist() == [EVIL_ID, "img_e", "img_a", "broken"]  # 2 best, 2 last
    assert select_rows(picked, 4).equals(picked)
    assert select_rows(table, 100).num_rows == 6
    with pytest.raises(ValueError, match="max_rows"):
        select_rows(table, 0)
    with pytest.raises(ValueError, match="total_rows"):
        render_contact_sheet(table, None, title="t", total_rows=3)
