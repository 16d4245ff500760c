"""The DR grading sets' label files, as their datasets ship them, read into one kind of row.

`ssit-dist shard --labels FILE --labels-format NAME` (NAME `auto`, the default, recognises the file by
its header). The formats, and where their files come from:

- plain: this project's CSV, `image,grade`, image paths relative to the input folder; other columns
  are kept (`--group-by` names one of them).
- eyepacs: Kaggle "Diabetic Retinopathy Detection" (2015), trainLabels.csv: `image,level`, names
  without an extension (`10_left` is 10_left.jpeg); the patient is the number before _left/_right,
  a column `patient` for `--group-by patient`.
- aptos: Kaggle "APTOS 2019 Blindness Detection", train.csv: `id_code,diagnosis`; images `<id_code>.png`.
- ddr: DDR (Li et al. 2019), DR_grading/train.txt, valid.txt and test.txt: no header, lines `name grade`
  separated by a space; grade 5 is ungradable; the file's name is its official split.
- messidor2: Kaggle "Messidor-2 DR grades" (Krause et al. 2018 adjudication), messidor_data.csv:
  `image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable`; adjudicated_gradable 0 is ungradable.
- idrid: IDRiD (ISBI 2018) "B. Disease Grading" label CSVs: `Image name,Retinopathy grade,Risk of macular
  edema`, names without an extension (.jpg on disk); "Training"/"Testing" in the file's name is its
  official split.

Rows come back as written (names may lack extensions or folders; the caller finds the image); rows the
dataset marks ungradable come back marked, for the caller to exclude and count.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


class LabelFormatError(ValueError):
    """A labels file that is none of the known formats, or not the one named; the message says which."""


@dataclass(frozen=True)
class LabelFormat:
    name: str
    columns: tuple[str, ...]  # header cells that identify the format, lower case; () for no header
    image: str  # the column naming the photograph
    grade: str  # the column with the ICDR grade 0-4
    source: str  # where the file comes from, for help and errors
    splits: dict[str, str] | None = None  # fragment of the file's name (lower case) -> official split
    ungradable: tuple[str, str] | None = None  # (column, value) that marks a row ungradable
    patient: str | None = None  # regex on the image name; its first group is the `patient` column


FORMATS: dict[str, LabelFormat] = {
    f.name: f
    for f in (
        LabelFormat("plain", ("image", "grade"), "image", "grade", "CSV image,grade, paths relative to INPUT"),
        LabelFormat(
            "eyepacs", ("image", "level"), "image", "level", "EyePACS (Kaggle 2015) trainLabels.csv",
            patient=r"^(\d+)_(?:left|right)$",
        ),
        LabelFormat("aptos", ("id_code", "diagnosis"), "id_code", "diagnosis", "APTOS 2019 (Kaggle) train.csv"),
        LabelFormat(
            "ddr", (), "image", "grade", "DDR DR_grading train.txt/valid.txt/test.txt, lines 'name grade'",
            splits={"train": "train", "valid": "val", "test": "test"}, ungradable=("grade", "5"),
        ),
        LabelFormat(
            "messidor2",
            ("image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"),
            "image_id", "adjudicated_dr_grade", "Messidor-2 (Kaggle) messidor_data.csv",
            ungradable=("adjudicated_gradable", "0"),
        ),
        LabelFormat(
            "idrid", ("image name", "retinopathy grade", "risk of macular edema"), "image name",
            "retinopathy grade", "IDRiD Disease Grading Training/Testing Labels.csv",
            splits={"training": "train", "testing": "test"},
        ),
    )
}  # fmt: skip
LABEL_FORMAT_NAMES = ("auto", *FORMATS)
_HEADERLESS_LINE = re.compile(r"^\S+\s+-?\d+\s*$")  # a ddr line: `name grade`


@dataclass(frozen=True)
class LabelRow:
    line: int
    image: str  # as the file writes it: perhaps without an extension or folders
    grade: str  # as written; the caller checks it
    columns: dict[str, str]  # every cell by lower-case column name, with `patient` where the format derives it
    ungradable: bool = False


@dataclass
class LabelFile:
    path: Path
    format: LabelFormat
    split: str | None  # the official split the file holds, where its dataset defines them
    split_word: str | None = None  # the word of the file's name that gave it (`training`): its folder has it too
    rows: list[LabelRow] = field(default_factory=list)
    # (line, why, the cell where the header has the image column, if the row reaches it): a refused row still
    # names its photograph, which is then not "a photograph the labels do not name"
    malformed: list[tuple[int, str, str | None]] = field(default_factory=list)


def known_formats() -> str:
    """The formats as a user reads them in an error: `plain (image,grade), ..., ddr (no header: name grade)`."""
    return ", ".join(f"{f.name} ({','.join(f.columns) or 'no header: name grade'})" for f in FORMATS.values())


def read_label_file(path: Path, format_name: str = "auto") -> LabelFile:
    """Read one labels file as `format_name` (or the format its header shows, with `auto`)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LabelFormatError(f"cannot read labels file {path}: {e}") from None
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise LabelFormatError(f"{path} is empty: a labels file needs a header and a row per photograph")
    header = _cells(next(csv.reader([first])))
    fmt = _detect(path, first, header) if format_name == "auto" else _named(path, format_name, first, header)
    split_word = _split_word(path, fmt)
    out = LabelFile(path, fmt, fmt.splits[split_word] if fmt.splits and split_word else None, split_word)
    if fmt.columns:
        _read_rows(out, [h.lower() for h in header], csv.reader(lines), skip_header=True)
    else:
        _read_rows(out, [fmt.image, fmt.grade], (line.split() for line in lines), skip_header=False)
    return out


def _cells(row: list[str], keep: int = 0) -> list[str]:
    """Cells stripped, trailing empty ones past the first `keep` dropped (IDRiD's CSVs end every line
    with a run of commas; an empty last column of a row is still a field)."""
    cells = [c.strip() for c in row]
    while len(cells) > keep and not cells[-1]:
        cells.pop()
    return cells


def _detect(path: Path, first: str, header: list[str]) -> LabelFormat:
    lower = {h.lower() for h in header}
    for fmt in FORMATS.values():
        if fmt.columns and set(fmt.columns) <= lower:
            return fmt
    if _HEADERLESS_LINE.match(first.strip()):
        return FORMATS["ddr"]
    raise LabelFormatError(
        f"{path}: its first line {header} is the header of no labels format ssit-dist knows: {known_formats()}. "
        "Rename its columns to one of these, or write it as image,grade with paths relative to INPUT"
    )


def _named(path: Path, name: str, first: str, header: list[str]) -> LabelFormat:
    if name not in FORMATS:
        raise LabelFormatError(f"--labels-format {name!r} is not a format ssit-dist knows: {known_formats()}")
    fmt = FORMATS[name]
    fits = set(fmt.columns) <= {h.lower() for h in header} if fmt.columns else bool(_HEADERLESS_LINE.match(first))
    if not fits:
        expected = ",".join(fmt.columns) if fmt.columns else "no header, lines 'name grade'"
        raise LabelFormatError(
            f"{path} is not a {name} labels file ({fmt.source}): expected {expected}, found {first.strip()!r}. "
            f"Formats known: {known_formats()}"
        )
    return fmt


def _split_word(path: Path, fmt: LabelFormat) -> str | None:
    """The word in the file's name that says which official split it holds; None for datasets without."""
    if fmt.splits is None:
        return None
    name = path.name.lower()
    found = {fragment for fragment in fmt.splits if fragment in name}
    if len(found) != 1:
        names = ", ".join(f"'{fragment}'" for fragment in fmt.splits)
        raise LabelFormatError(
            f"{path}: a {fmt.name} labels file names its official split ({names}); this name has "
            f"{'none' if not found else 'several'}: keep the dataset's file names ({fmt.source})"
        )
    return found.pop()


def _read_rows(out: LabelFile, header: list[str], rows: Iterable[list[str]], skip_header: bool) -> None:
    fmt = out.format
    for line, raw in enumerate(rows, start=1):
        cells = _cells(raw, len(header))
        if not any(cells):
            continue
        if skip_header:  # the first line with cells
            skip_header = False
            continue
        if len(cells) != len(header):
            at = header.index(fmt.image)
            image_cell = cells[at].replace("\\", "/") if len(cells) > at and cells[at] else None
            out.malformed.append(
                (line, f"malformed row: {len(cells)} fields, the header has {len(header)}", image_cell)
            )
            continue
        columns = dict(zip(header, cells, strict=True))
        image = columns[fmt.image].replace("\\", "/")
        if fmt.patient and (match := re.match(fmt.patient, Path(image).stem)):
            columns["patient"] = match.group(1)
        ungradable = fmt.ungradable is not None and columns[fmt.ungradable[0]] == fmt.ungradable[1]
        out.rows.append(LabelRow(line, image, columns[fmt.grade], columns, ungradable))
