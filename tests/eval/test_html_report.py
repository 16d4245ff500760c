"""The page of `ssit-dist predict --html` (ssit_dist.eval.html_report): its HTML as written (escaping,
self-containedness, problem rows, order, metrics, size), and the page in a real headless Chromium (one row
per photograph, no console error, a screenshot that is not blank, sorting and filtering from the URL).

The photographs are real (the graded set, cropped by the packer's own crop_to_disc); the predictions and
attention maps are made up: the renderer is under test, not a model."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path

import chromium
import numpy as np
import pytest
from PIL import Image

from ssit_dist.data.decode import BadImage
from ssit_dist.data.packing.fundus import crop_to_disc
from ssit_dist.eval.html_report import ReportRow, attention_heat, write_html_report
from ssit_dist.eval.metrics import confusion_matrix, quadratic_weighted_kappa

CROP_PX, GRID = 224, 14  # what a ViT-S/16 at 224 sees, and its patch grid
PER_GRADE = 3
HOSTILE = '"><img src=x onerror="document.body.dataset.pwned=1">\'<script>alert(1)</script>.jpeg'


def _prediction(index: int, truth: int) -> tuple[int, list[float]]:
    """Every third photograph one grade off its truth; probabilities peaked at the predicted grade."""
    grade = truth if index % 3 else (truth + 1) % 5
    logits = -1.5 * (np.arange(5) - grade) ** 2 + 0.1 * np.cos(index + np.arange(5))
    p = np.exp(logits) / np.exp(logits).sum()
    return grade, [float(v) for v in p]


def _attention(index: int) -> np.ndarray:
    """A blob of attention that moves from photograph to photograph, in [0, 1] over the patch grid."""
    y, x = np.mgrid[0:GRID, 0:GRID]
    cy, cx = 3 + (index * 5) % 8, 3 + (index * 3) % 8
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 8.0)
    return blob / blob.max()


def _graded_row(path: Path, index: int, truth: int, name: str | None = None) -> ReportRow:
    grade, p = _prediction(index, truth)
    photo = crop_to_disc(path.read_bytes(), CROP_PX).image
    referable = sum(p[2:])
    return ReportRow(name or str(path), grade, p, referable, grade >= 2, "", truth, photo, _attention(index))


def _problem_row(folder: Path, source: Path) -> ReportRow:
    """A real truncated JPEG, and the message the packer's decoding gives for it."""
    broken = folder / "truncated.jpeg"
    broken.write_bytes(source.read_bytes()[:300])
    try:
        crop_to_disc(broken.read_bytes(), CROP_PX)
    except BadImage as error:
        return ReportRow(str(broken), None, [], None, None, f"unreadable: {error}", truth=1)
    raise AssertionError(f"{broken} decoded; a problem row needs a photograph that does not")


@pytest.fixture(scope="module")
def rows(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[ReportRow]:
    """PER_GRADE real photographs of each grade, one of them under a hostile name, and a truncated file."""
    lines = [line.split(",") for line in (graded_dir / "labels.csv").read_text().splitlines()[1:]]
    chosen: list[tuple[str, int]] = []
    for g in range(5):
        chosen += [(name, g) for name, grade, *_ in lines if int(grade) == g][:PER_GRADE]
    out = [_graded_row(graded_dir / name, i, g) for i, (name, g) in enumerate(chosen)]
    out.append(_graded_row(graded_dir / chosen[0][0], len(out), 0, name=HOSTILE))
    out.append(_problem_row(tmp_path_factory.mktemp("photographs"), graded_dir / chosen[0][0]))
    return out


def _metrics(rows: list[ReportRow]) -> tuple[dict, np.ndarray]:
    """QWK and accuracy of the made-up grades (eval/metrics.py), intervals made up: metrics.json's shape."""
    graded = [r for r in rows if r.grade is not None and r.truth is not None]
    truth, grade = np.array([r.truth for r in graded]), np.array([r.grade for r in graded])
    qwk = quadratic_weighted_kappa(truth, grade, 5)
    metrics = {
        "qwk": {"value": qwk, "ci95": [qwk - 0.1, min(qwk + 0.1, 1.0)]},
        "accuracy": {"value": float((truth == grade).mean()), "ci95": [0.41, 0.83]},
        "referable_auc": {"value": 0.9123, "ci95": [0.8, 0.99]},
        "sensitivity": {"value": 0.75, "ci95": None},  # an interval that could not be formed
        "samples": len(graded),
        "unmatched_rows": 285,
        "label_problems": ["labels.csv row 7: grade '<9>' is not 0-4"],
        "bootstrap": {"resamples": 1000, "seed": 0, "unit": "patient"},
        "labels": {"file": "labels.csv", "format": "eyepacs"},  # neither an endpoint nor a count: not shown
    }
    return metrics, confusion_matrix(truth, grade, 5)


@pytest.fixture(scope="module")
def page(rows: list[ReportRow], tmp_path_factory: pytest.TempPathFactory) -> Path:
    metrics, confusion = _metrics(rows)
    path = tmp_path_factory.mktemp("report") / "report.html"
    return write_html_report(path, rows, metrics, confusion, "Grades of <the clinic's> photographs")


class _Dom(HTMLParser):
    """The attributes of <html>, <body> and of each photograph's row, in document order."""

    def __init__(self, text: str):
        super().__init__()
        self.root: dict[str, str] = {}
        self.body: dict[str, str] = {}
        self.rows: list[dict[str, str]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "html":
            self.root = found
        elif tag == "body":
            self.body = found
        elif tag == "tr" and "row" in found.get("class", "").split():
            self.rows.append(found)


def _errors(visit: chromium.Visit) -> list[str]:
    """Everything that says the page's script went wrong: a console line (the page writes none), the
    error the page recorded on <html>, a script that did not reach its end."""
    dom = _Dom(visit.dom)
    found = [f"console: {line}" for line in visit.console]
    if "data-error" in dom.root:
        found.append(f"page error: {dom.root['data-error']}")
    if dom.body.get("data-status") != "ready":
        found.append(f"script did not finish (body data-status={dom.body.get('data-status')!r})")
    return found


# ----- the HTML as written -----------------------------------------------------------------------------


def test_a_hostile_file_name_is_escaped(page: Path) -> None:
    text = page.read_text()
    assert HOSTILE not in text and "<script>alert" not in text and "<img src=x" not in text
    assert html.escape(HOSTILE, quote=True) in text
    assert text.count("<script>") == 2  # the page's own two, nothing from a file name
    assert "&lt;the clinic&#x27;s&gt;" in text  # the title too


def test_the_page_is_self_contained(page: Path) -> None:
    text = page.read_text()
    for reference in ("http://", "https://", 'src="/', 'href="', "url(/", "@import"):
        assert reference not in text, f"the page refers to {reference}..."
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 2 * 16  # a thumbnail and an attention map for each of the 16 readable photographs
    assert all(s.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")) for s in sources)


def test_every_photograph_has_a_row_and_problems_are_listed(page: Path, rows: list[ReportRow]) -> None:
    dom = _Dom(page.read_text())
    assert len(dom.rows) == len(rows)
    problems = [r for r in dom.rows if "problem" in r["class"].split()]
    assert [p["data-name"] for p in problems] == [rows[-1].image]
    assert problems[0]["data-grade"] == "" and problems[0]["data-referable"] == ""
    assert html.escape(rows[-1].problem) in page.read_text() and "1 with a problem" in page.read_text()


def test_with_true_grades_disagreements_come_first_and_metrics_sit_on_top(page: Path, rows: list[ReportRow]) -> None:
    text = page.read_text()
    flags = [r["data-disagree"] for r in _Dom(text).rows]
    disagreeing = sum(r.disagrees for r in rows)
    assert disagreeing >= 5 and flags == ["1"] * disagreeing + ["0"] * (len(rows) - disagreeing)
    metrics, confusion = _metrics(rows)
    top = text[: text.index('<table id="rows">')]
    assert f"<td>{metrics['qwk']['value']:.3f}</td>" in top and "0.912" in top and "0.410 &ndash; 0.830" in top
    assert "Sensitivity (referable)</th><td>0.750</td><td></td>" in top  # no interval: left empty
    assert "285</td>" in top and "1000 bootstrap resamples of patients" in top
    assert "<li>labels.csv row 7: grade &#x27;&lt;9&gt;&#x27; is not 0-4</li>" in top and "eyepacs" not in top
    cells = re.findall(r'<td style="background:rgb\((\d+),\d+,255\)"[^>]*>(\d+)<small>', top)
    assert [int(count) for _, count in cells] == confusion.ravel().tolist()
    darkest = max(cells, key=lambda c: int(c[1]))
    assert int(darkest[0]) == 55  # the largest count takes the darkest blue


def test_missing_metrics_and_labels_are_tolerated(tmp_path: Path, rows: list[ReportRow]) -> None:
    unlabelled = [ReportRow(r.image, r.grade, r.probabilities, r.referable_probability, r.referable) for r in rows[:3]]
    for metrics in (None, {}, {"qwk": {"value": None}, "samples": 3}, {"other_endpoint": {"value": 0.5}}):
        text = write_html_report(tmp_path / "r.html", unlabelled, metrics, None, "t").read_text()
        assert len(_Dom(text).rows) == 3 and "Confusion matrix" not in text and 'data-sort="truth"' not in text
    assert "other_endpoint</th><td>0.500" in text
    assert len(_Dom(write_html_report(tmp_path / "r.html", [], None, None, "t").read_text()).rows) == 0
    assert not list(tmp_path.glob("*.tmp"))  # written through atomic.py: no leftover


def test_a_regression_graders_scores_are_not_called_probabilities(tmp_path: Path, rows: list[ReportRow]) -> None:
    """A regression grader's referable value is its output on the grade scale and its per-grade values are
    closeness, not probabilities: the page says so and shows no percentage beside the grade."""
    classifier = write_html_report(tmp_path / "c.html", rows, None, None, "t").read_text()
    regression = write_html_report(tmp_path / "r.html", rows, None, None, "t", regression=True).read_text()
    assert "referable probability" in classifier and "%)</small>" in classifier
    assert "referable probability" not in regression and "%)</small>" not in regression
    assert "referable score (grade scale)" in regression and "closeness per grade" in regression


def test_the_attention_heat_is_brighter_where_the_encoder_looked() -> None:
    grid = np.zeros((4, 6))
    grid[1, 2], grid[3, 5] = 0.5, 0.25
    heat = attention_heat(grid).astype(int).sum(-1)
    assert heat.shape == (4, 6) and heat[1, 2] > heat[3, 5] > heat[0, 0]
    assert attention_heat(np.full((2, 2), np.nan)).shape == (2, 2, 3)  # a degenerate map draws, dark


def test_the_page_stays_small_enough_for_two_thousand_photographs(page: Path, rows: list[ReportRow]) -> None:
    per_photograph = page.stat().st_size / len(rows)
    # Measured 2026-12-07: ~8.5 kB per photograph at 224 px crops, so ~17 MB for 2,000 photographs.
    assert per_photograph < 16_000, f"{per_photograph:.0f} bytes per photograph: {2000 * per_photograph / 1e6:.0f} MB"


# ----- the page in a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> None:
    reason = chromium.unavailable()
    if reason:
        pytest.skip(f"headless Chromium: {reason}")


@pytest.mark.multiprocess
def test_chromium_shows_one_row_per_photograph_without_errors(browser: None, page: Path, rows: list[ReportRow]) -> None:
    visit = chromium.dump_dom(page)
    dom = _Dom(visit.dom)
    assert _errors(visit) == []
    assert len(dom.rows) == len(rows) and not any("hidden" in r for r in dom.rows)
    assert dom.body["data-shown"] == str(len(rows))
    assert "data-pwned" not in dom.body  # the hostile name's onerror never ran
    assert f"{len(rows)} of {len(rows)} photographs shown" in visit.dom


@pytest.mark.multiprocess
def test_chromium_screenshot_is_not_blank(browser: None, page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    assert chromium.screenshot(page, shot).console == []
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 30  # not one flat colour
    distinct = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert distinct > 5000, f"{distinct} colours: the photographs and heat maps did not render"


@pytest.mark.multiprocess
def test_chromium_sorts_and_filters_as_the_url_asks(browser: None, page: Path, rows: list[ReportRow]) -> None:
    visit = chromium.dump_dom(page, "sort=referable&order=desc")
    order = [r["data-referable"] for r in _Dom(visit.dom).rows]
    assert _errors(visit) == []
    expected = sorted((r.referable_probability for r in rows if r.referable_probability is not None), reverse=True)
    assert [float(v) for v in order[:-1]] == pytest.approx(expected, abs=1e-6) and order[-1] == ""  # problem last

    visit = chromium.dump_dom(page, "grade=2&referable=1")
    shown = [r for r in _Dom(visit.dom).rows if "hidden" not in r]
    assert _errors(visit) == [] and len(shown) == sum(r.grade == 2 for r in rows) > 0
    assert {r["data-grade"] for r in shown} == {"2"}

    visit = chromium.dump_dom(page, "disagree=1&min=0.5")
    shown = [r for r in _Dom(visit.dom).rows if "hidden" not in r]
    wanted = [r for r in rows if r.disagrees and (r.referable_probability or 0) >= 0.5]
    assert _errors(visit) == [] and 0 < len(shown) == len(wanted) < sum(r.disagrees for r in rows)
    assert _Dom(visit.dom).body["data-shown"] == str(len(wanted))

    visit = chromium.dump_dom(page, "grade=problem")
    shown = [r for r in _Dom(visit.dom).rows if "hidden" not in r]
    assert _errors(visit) == [] and [r["data-name"] for r in shown] == [rows[-1].image]


@pytest.mark.multiprocess
def test_a_script_error_fails_the_check(browser: None, page: Path, tmp_path: Path) -> None:
    """The check above is not blind: the same page with its script broken at the start reports the
    uncaught error three ways (console, the page's record, the script's end never reached)."""
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace('"use strict";', '"use strict"; null.sort();', 1))
    found = _errors(chromium.dump_dom(broken))
    assert len(found) == 3, found
    assert all("null" in line for line in found[:2]) and "did not finish" in found[2]
