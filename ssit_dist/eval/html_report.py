"""The page of `ssit-dist predict --html`: every photograph with its grade, probabilities, referable flag
and the grader's attention over it, as one self-contained HTML file a clinician can look through.

Self-contained: CSS and a few lines of vanilla JS inline, pictures as data: URIs, nothing fetched, so the
file can be mailed or opened offline. Every string from the user (file names, problems, the title) goes
through html.escape. Size: a JPEG thumbnail (~5-9 kB at THUMB_PX, quality 80) and the attention map at its
own patch-grid resolution as a small PNG (the browser upsamples it over the thumbnail), so 2,000
photographs make a page of some 20 MB.

The page honours a URL fragment on load, e.g. `report.html#sort=referable&order=desc&grade=2&min=0.5`
(keys: sort=name|grade|truth|referable, order=asc|desc, grade=0..4|problem, referable=1, disagree=1,
min=threshold on the referable probability), and keeps it current as the reader sorts and filters, so a
view can be shared as a link. It records its own errors on <html data-error> and sets <body
data-status="ready"> when its script has finished, for a headless browser to read back.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ssit_dist.atomic import write_text
from ssit_dist.eval.report import confusion_cells

THUMB_PX = 160  # thumbnail side, in pixels as stored and as shown
JPEG_QUALITY = 80
# The endpoints of metrics.json in the order a reader looks for them; any other {"value": ...} entry follows.
METRIC_NAMES = {
    "qwk": "Quadratic weighted kappa",
    "accuracy": "Accuracy",
    "referable_auc": "Referable DR AUC",
    "sensitivity": "Sensitivity (referable)",
    "specificity": "Specificity (referable)",
}
COUNT_NAMES = {
    "samples": "photographs scored",
    "patients": "patients",
    "unmatched_rows": "label rows without a photograph (ignored)",
    "unlabelled_photographs": "photographs without a label",
    "ungradable_photographs": "photographs the labels call ungradable",
    "unreadable_photographs": "labelled photographs that could not be graded",
}


@dataclass(frozen=True)
class ReportRow:
    """One photograph as the page shows it."""

    image: str  # the photograph's path as given
    grade: int | None  # predicted grade; None when `problem`
    probabilities: list[float]  # per grade (empty when problem)
    referable_probability: float | None
    referable: bool | None
    problem: str = ""  # "" when the photograph was graded
    truth: int | None = None  # with --labels
    photo: np.ndarray | None = None  # (H, W, 3) uint8 RGB: the preprocessed crop the model saw
    attention: np.ndarray | None = None  # (h, w) float in [0, 1]: CLS attention over the patch grid

    @property
    def disagrees(self) -> bool:
        """Graded, with a true grade, and the two differ."""
        return self.grade is not None and self.truth is not None and self.grade != self.truth


# What the scores are called: a classifier's softmax is a probability; a regression grader's output is a
# score on the grade scale (models/grader.py), and its per-grade values say how close it lies to each grade.
WORDING = {
    False: {"referable": "referable probability", "per_grade": "probability per grade", "min_max": ' max="1"'},
    True: {"referable": "referable score (grade scale)", "per_grade": "closeness per grade", "min_max": ""},
}


def write_html_report(
    path: Path,
    rows: list[ReportRow],
    metrics: dict | None,
    confusion: np.ndarray | None,
    title: str,
    regression: bool = False,
) -> Path:
    """Write the page to `path` atomically; with true grades the disagreements come first (each group in the
    order given), and `metrics` (metrics.json's shape, any key may be missing) and `confusion` (rows: true
    grade, columns: predicted) are shown above the photographs. `regression`: the rows' scores are a
    regression grader's (WORDING), not probabilities."""
    labelled = any(r.truth is not None for r in rows)
    ordered = sorted(rows, key=lambda r: not r.disagrees) if labelled else list(rows)
    grades = max((len(r.probabilities) for r in rows), default=0) or 5
    parts = [
        f"<h1>{_e(title)}</h1>",
        _summary(rows, labelled),
        _metrics_table(metrics or {}),
        _confusion_table(confusion),
        _controls(grades, labelled, WORDING[regression]),
        _photo_table(ordered, grades, labelled, WORDING[regression]),
    ]
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
        f"<style>{_CSS}</style>\n<script>{_ERRORS_JS}</script>\n</head>\n<body>\n"
        + "\n".join(p for p in parts if p)
        + f"\n<script>{_PAGE_JS}</script>\n</body>\n</html>\n"
    )
    return write_text(Path(path), page)


def _e(text: object) -> str:
    """Escaped for both element text and quoted attribute values."""
    return html.escape(str(text), quote=True)


def _summary(rows: list[ReportRow], labelled: bool) -> str:
    graded = [r for r in rows if r.problem == ""]
    facts = [
        f"{len(rows)} photographs",
        f"{len(graded)} graded",
        f"{len(rows) - len(graded)} with a problem",
        f"{sum(bool(r.referable) for r in graded)} referable (grade &ge; 2)",
    ]
    if labelled:
        facts.append(f"{sum(r.disagrees for r in rows)} disagree with the true grade (listed first)")
    return f'<p class="summary">{" &middot; ".join(facts)}</p>'


def _metrics_table(metrics: dict) -> str:
    """Each endpoint with its 95% interval, then the counts; whatever is missing is left out."""
    names = {**METRIC_NAMES, **{k: k for k, v in metrics.items() if isinstance(v, dict) and k not in METRIC_NAMES}}
    lines = []
    for key, name in names.items():
        entry = metrics.get(key)
        if not isinstance(entry, dict) or "value" not in entry:
            continue
        ci = entry.get("ci95")
        interval = (
            f"{_number(ci[0])} &ndash; {_number(ci[1])}" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
        )
        lines.append(f"<tr><th>{_e(name)}</th><td>{_number(entry['value'])}</td><td>{interval}</td></tr>")
    for key, name in COUNT_NAMES.items():
        if isinstance(metrics.get(key), (int, float)):
            lines.append(f'<tr><th>{_e(name)}</th><td>{_e(metrics[key])}</td><td class="muted">count</td></tr>')
    if not lines:
        return ""
    head = f"<tr><th>metric</th><th>value</th><th>95% interval ({_e(_bootstrap(metrics))})</th></tr>"
    problems = metrics.get("label_problems")
    listed = "".join(f"<li>{_e(p)}</li>" for p in problems) if isinstance(problems, list) else ""
    return f'<h2>Against the true grades</h2>\n<table class="metrics">{head}{"".join(lines)}</table>' + (
        f'<p>Label file problems:</p><ul class="label-problems">{listed}</ul>' if listed else ""
    )


def _bootstrap(metrics: dict) -> str:
    """How the intervals were formed, as far as metrics.json says."""
    spec = metrics.get("bootstrap")
    if isinstance(spec, dict) and "resamples" in spec:
        return f"{spec['resamples']} bootstrap resamples of {spec.get('unit', 'sample')}s"
    return "bootstrap"


def _number(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and np.isfinite(value) else "n/a"


def _confusion_table(confusion: np.ndarray | None) -> str:
    """Rows: true grade, columns: predicted; each cell its count and share of its row, coloured by count
    over the whole matrix (the cells of eval/report.py's confusion picture)."""
    if confusion is None or np.asarray(confusion).size == 0:
        return ""
    cells = confusion_cells(np.asarray(confusion))
    head = "".join(f"<th>{j}</th>" for j in range(len(cells[0])))
    lines = [f'<tr><th class="corner">true \\ predicted</th>{head}</tr>']
    for i, row in enumerate(cells):
        tds = []
        for c in row:
            count, share = c.texts
            shade = int(255 - 200 * c.strength)
            ink = ' class="dark"' if c.strength > 0.6 else ""
            tds.append(f'<td style="background:rgb({shade},{shade},255)"{ink}>{count}<small>{share}</small></td>')
        lines.append(f"<tr><th>{i}</th>{''.join(tds)}</tr>")
    return f'<h2>Confusion matrix</h2>\n<table class="confusion">{"".join(lines)}</table>'


def _controls(grades: int, labelled: bool, wording: dict[str, str]) -> str:
    options = "".join(f'<option value="{g}">grade {g}</option>' for g in range(grades))
    disagree = (
        '<label><input type="checkbox" id="f-disagree"> disagreements only</label>'
        if labelled
        else '<input type="checkbox" id="f-disagree" hidden>'
    )
    return (
        '<div class="controls">'
        f'<label>show <select id="f-grade"><option value="">every grade</option>{options}'
        '<option value="problem">problems</option></select></label>'
        '<label><input type="checkbox" id="f-referable"> referable only</label>'
        f"{disagree}"
        f'<label>{wording["referable"]} &ge; <input type="number" id="f-min" min="0"{wording["min_max"]} step="0.05">'
        "</label>"
        '<span id="shown"></span> <span class="muted">click a column header to sort</span></div>'
    )


def _photo_table(rows: list[ReportRow], grades: int, labelled: bool, wording: dict[str, str]) -> str:
    truth = '<th data-sort="truth">true grade</th>' if labelled else ""
    head = (
        '<tr><th>photograph</th><th>attention</th><th data-sort="name">name</th><th data-sort="grade">grade</th>'
        f"{truth}<th>{wording['per_grade']}</th>"
        f'<th data-sort="referable">{wording["referable"]}</th><th>referable</th><th>problem</th></tr>'
    )
    percent = wording is WORDING[False]
    body = "\n".join(_photo_row(r, grades, labelled, percent) for r in rows)
    return f'<table id="rows">\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def _photo_row(row: ReportRow, grades: int, labelled: bool, percent: bool = True) -> str:
    referable = row.referable_probability
    classes = "row" + (" disagree" if row.disagrees else "") + (" problem" if row.problem else "")
    data = (
        f'data-name="{_e(row.image)}" data-grade="{_optional(row.grade)}" data-truth="{_optional(row.truth)}" '
        f'data-referable="{"" if referable is None else f"{referable:.6f}"}" data-flag="{int(bool(row.referable))}" '
        f'data-disagree="{int(row.disagrees)}"'
    )
    grade = "&ndash;" if row.grade is None else str(row.grade)
    if percent and row.grade is not None and row.grade < len(row.probabilities):
        grade += f" <small>({100 * row.probabilities[row.grade]:.0f}%)</small>"
    flag = {None: "&ndash;", True: '<b class="yes">referable</b>', False: "not referable"}[row.referable]
    cells = [
        f'<td class="pic">{_photo_img(row.photo)}</td>',
        f'<td class="pic">{_attention_img(row.attention, overlay=row.photo is not None)}</td>',
        f'<td class="name" title="{_e(row.image)}">{_e(row.image)}</td>',
        f'<td class="num graded">{grade}</td>',
        f'<td class="num graded">{_optional(row.truth) or "&ndash;"}</td>' if labelled else "",
        f"<td>{_bars(row.probabilities, row.grade, grades)}</td>",
        f'<td class="num">{"&ndash;" if referable is None else f"{referable:.3f}"}</td>',
        f"<td>{flag}</td>",
        f'<td class="problem-text">{_e(row.problem)}</td>',
    ]
    return f'<tr class="{classes}" {data}>{"".join(cells)}</tr>'


def _optional(value: int | None) -> str:
    return "" if value is None else str(value)


def _bars(probabilities: list[float], grade: int | None, grades: int) -> str:
    """One bar per grade, its height the probability; the exact values in each bar's tooltip."""
    if not probabilities:
        return "&ndash;"
    bars = "".join(
        f'<span class="bar{" pred" if g == grade else ""}" title="grade {g}: {p:.3f}">'
        f'<i style="height:{100 * min(max(p, 0.0), 1.0):.0f}%"></i><em>{g}</em></span>'
        for g, p in enumerate(probabilities[:grades])
    )
    return f'<span class="bars">{bars}</span>'


def _photo_img(photo: np.ndarray | None) -> str:
    """The crop the model saw as a JPEG thumbnail (never enlarged: a 64 px crop stays 64 px, shown larger)."""
    if photo is None:
        return '<span class="muted">&ndash;</span>'
    height, width = photo.shape[:2]
    scale = min(1.0, THUMB_PX / max(height, width))
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    small = cv2.resize(photo, size, interpolation=cv2.INTER_AREA) if scale < 1 else photo
    bgr = cv2.cvtColor(np.ascontiguousarray(small, dtype=np.uint8), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"could not encode a thumbnail of a {photo.shape} photograph as JPEG")
    return f'<img class="photo" alt="" loading="lazy" src="{_data_uri("image/jpeg", data)}">'


def _data_uri(media_type: str, encoded: np.ndarray) -> str:
    """OpenCV's encoded bytes as a data: URI, the page's only way to hold a picture."""
    return f"data:{media_type};base64,{base64.b64encode(encoded.tobytes()).decode()}"


def attention_heat(attention: np.ndarray) -> np.ndarray:
    """The attention map as an RGB heat picture at its own grid resolution: scaled to its own maximum
    (as eval/attention.py draws it), OpenCV's inferno colour map (dark: little attention, bright: much)."""
    grid = np.nan_to_num(np.asarray(attention, dtype=np.float64), nan=0.0).clip(min=0.0)
    scaled = (255 * grid / max(float(grid.max(initial=0.0)), 1e-12)).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def _attention_img(attention: np.ndarray | None, overlay: bool) -> str:
    """The heat picture as a PNG of the patch grid, which the browser upsamples smoothly over the
    thumbnail (the page's script lays the photograph under it); a few hundred bytes, not a second JPEG."""
    if attention is None:
        return '<span class="muted">&ndash;</span>'
    ok, data = cv2.imencode(".png", cv2.cvtColor(attention_heat(attention), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a {np.shape(attention)} attention map as PNG")
    img = f'<img class="heat" alt="" loading="lazy" src="{_data_uri("image/png", data)}">'
    return f'<span class="att">{img}</span>' if overlay else f'<span class="att alone">{img}</span>'


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 16px; margin: 18px 0 6px; }
.muted { color: #888; } .summary { color: #444; }
table { border-collapse: collapse; }
.metrics th, .metrics td { border: 1px solid #ddd; padding: 3px 10px; text-align: left; }
.confusion th, .confusion td { border: 1px solid #ccc; width: 56px; height: 40px; text-align: center; }
.confusion th.corner { width: auto; font-weight: normal; color: #666; padding: 0 8px; }
.confusion td small { display: block; font-size: 11px; } .confusion td.dark { color: #fff; }
.controls { margin: 16px 0 8px; display: flex; gap: 18px; align-items: center; flex-wrap: wrap; }
.controls input[type=number] { width: 64px; }
#rows th { background: #f2f2f2; position: sticky; top: 0; padding: 6px; text-align: left; z-index: 1; }
#rows th[data-sort] { cursor: pointer; text-decoration: underline dotted; }
#rows th[aria-sort=ascending]::after { content: " \\25B2"; }
#rows th[aria-sort=descending]::after { content: " \\25BC"; }
#rows td { border-top: 1px solid #e4e4e4; padding: 4px 8px; vertical-align: middle; }
#rows tr.disagree { background: #fff3e0; } #rows tr.disagree td.graded { color: #b34700; font-weight: bold; }
#rows tr.problem { background: #fdecea; } .problem-text { color: #b00020; }
td.pic { width: 160px; height: 160px; padding: 2px; }
img.photo, .att { width: 160px; height: 160px; display: block; }
.att { position: relative; background: #000 center / cover no-repeat; }
.att img.heat { width: 100%; height: 100%; opacity: 0.6; image-rendering: auto; }
.att.alone img.heat { opacity: 1; }
td.name { max-width: 260px; word-break: break-all; font-family: ui-monospace, monospace; font-size: 12px; }
td.num { text-align: center; }
.bars { display: inline-flex; gap: 3px; align-items: flex-end; height: 56px; }
.bar { width: 16px; height: 44px; display: flex; flex-direction: column; justify-content: flex-end;
       background: #f4f4f4; position: relative; }
.bar i { display: block; background: #8aa6c8; } .bar.pred i { background: #1f4e8c; }
.bar em { position: absolute; bottom: -15px; width: 100%; text-align: center; font-size: 10px;
          font-style: normal; color: #666; }
b.yes { color: #b00020; }
"""

# First thing on the page: any uncaught error lands on <html data-error>, where a reader's tools (and the
# browser test) find it even when the browser's console is out of sight.
_ERRORS_JS = """
window.addEventListener("error", function (e) { document.documentElement.dataset.error = String(e.message); });
"""

_PAGE_JS = """
(function () {
  "use strict";
  const byId = (id) => document.getElementById(id);
  const body = byId("rows").tBodies[0], all = Array.from(body.rows);
  const grade = byId("f-grade"), referable = byId("f-referable"), disagree = byId("f-disagree"), min = byId("f-min");
  let sort = "", order = "asc";

  // The photograph under its attention map: the thumbnail's data URI, shared rather than stored twice.
  for (const row of all) {
    const photo = row.querySelector("img.photo"), att = row.querySelector(".att");
    if (photo && att) att.style.backgroundImage = "url(" + photo.src + ")";
  }

  function value(row, key) {
    const v = row.dataset[key];
    return key === "name" ? v : (v === "" ? NaN : Number(v));
  }
  function compare(a, b) {  // missing values (problem rows, no truth) last in either order
    const x = value(a, sort), y = value(b, sort), sign = order === "desc" ? -1 : 1;
    if (sort === "name") return sign * x.localeCompare(y);
    if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
    return sign * (x - y);
  }
  function visible(row) {
    const g = grade.value, threshold = parseFloat(min.value);
    return (g === "" || (g === "problem" ? row.classList.contains("problem") : row.dataset.grade === g))
      && (!referable.checked || row.dataset.flag === "1")
      && (!disagree.checked || row.dataset.disagree === "1")
      && (isNaN(threshold) || value(row, "referable") >= threshold);
  }
  function apply() {
    const rows = sort ? all.slice().sort(compare) : all;
    let shown = 0;
    for (const row of rows) {
      row.hidden = !visible(row);
      shown += row.hidden ? 0 : 1;
      body.appendChild(row);
    }
    for (const th of document.querySelectorAll("th[data-sort]")) {
      if (th.dataset.sort === sort) th.setAttribute("aria-sort", order === "asc" ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    byId("shown").textContent = shown + " of " + all.length + " photographs shown";
    document.body.dataset.shown = String(shown);
    const state = new URLSearchParams();
    if (sort) { state.set("sort", sort); state.set("order", order); }
    if (grade.value) state.set("grade", grade.value);
    if (referable.checked) state.set("referable", "1");
    if (disagree.checked) state.set("disagree", "1");
    if (min.value) state.set("min", min.value);
    history.replaceState(null, "", state.toString() ? "#" + state : location.pathname + location.search);
  }

  const wanted = new URLSearchParams(location.hash.slice(1));
  if (document.querySelector('th[data-sort="' + wanted.get("sort") + '"]')) sort = wanted.get("sort");
  order = wanted.get("order") === "desc" ? "desc" : "asc";
  grade.value = wanted.get("grade") || "";
  referable.checked = wanted.get("referable") === "1";
  disagree.checked = wanted.get("disagree") === "1";
  min.value = wanted.get("min") || "";

  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", function () {
      order = sort === th.dataset.sort && order === "asc" ? "desc" : "asc";
      sort = th.dataset.sort;
      apply();
    });
  }
  for (const control of [grade, referable, disagree, min]) control.addEventListener("input", apply);
  apply();
  document.body.dataset.status = "ready";
})();
"""
