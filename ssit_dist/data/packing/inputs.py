"""What to pack: find the images under an input folder, attach grades, assign splits.

Layouts understood (checked in this order):
- split folders `train/`, `val/`, `test/` at the top (each flat or with grade folders inside);
- grade folders `0/` ... `4/` at the top;
- any other tree: every image below the folder, unlabelled unless labels files are given.
Labels files (label_formats: this project's `image,grade` CSV or a public DR set's own files) override grade
folders; a row finds its photograph by path, file name, or name without extension. Problems in them are
collected with their file and line, never silently dropped; rows the dataset marks ungradable are excluded
and counted. Rows that name a photograph absent from the folder (a partial download: 971 photographs of
EyePACS's 35,126 rows) are no fault of the row: they are collected apart, for one list beside the shards.
A dataset's official splits (DDR, IDRiD) are kept; `--split` then divides its train split.

With `group_by` (a column of the labels, e.g. `patient`), each group's photographs go to one split: most DR
sets hold both eyes of a patient, and a split by image puts a test patient's other eye in training. Groups
are stratified by their highest grade (a patient is as sick as the worse eye) and dealt, in a seeded
order, to the split furthest below its share of the stratum's photographs: the grade proportions follow
the ratios as closely as whole groups allow.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ssit_dist.data.packing.label_formats import LabelFile, LabelFormatError, LabelRow, read_label_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
SPLIT_FOLDERS = ("train", "val", "test")
NUM_GRADES = 5  # DR grades 0 (none) to 4 (proliferative)


class InputError(ValueError):
    """The input as a whole cannot be packed; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    key: str  # stable sample id derived from the relative path
    rel: str  # path relative to the input folder, POSIX separators
    grade: int | None
    split: str
    group: str | None = None  # the labels CSV's `group_by` column (a patient): kept in one split


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    line: int | None = None  # line in the labels CSV, where the problem is a CSV row

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class Missing:
    """A labels row naming a photograph that is not under the input folder."""

    file: str  # the labels file's name
    line: int
    image: str  # as the row writes it


@dataclass
class Inputs:
    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)  # rows whose photograph is absent, in file order
    not_in_labels: int = 0  # images under the folder that no row of the labels files names
    refused: int = 0  # images under the folder named only by rows that are problems (bad grade, malformed)
    labelled: bool = False
    labels_format: str | None = None  # the labels files' format (label_formats.FORMATS), where given
    labels_files: list[str] = field(default_factory=list)  # their names
    ungradable: int = 0  # rows the labels mark ungradable (DDR grade 5, Messidor-2 gradable 0): excluded


def sample_key(rel: str) -> str:
    """A WebDataset-safe id: no dots (they start the extension) and no folders."""
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace("/", "__"))


def parse_split(spec: str) -> dict[str, float]:
    """`train=0.7,val=0.15,test=0.15` -> {"train": 0.7, ...}; ratios must be positive and sum to 1."""
    ratios: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise InputError(f"--split: {part!r} is not NAME=RATIO (for example train=0.8,val=0.2)")
        try:
            ratio = float(value)
        except ValueError:
            raise InputError(f"--split: ratio {value!r} for {name!r} is not a number") from None
        if not 0 < ratio <= 1 or name in ratios:
            raise InputError(f"--split: {name}={value} must be a new name with a ratio in (0, 1]")
        ratios[name] = ratio
    if abs(sum(ratios.values()) - 1) > 1e-6:
        raise InputError(f"--split: ratios sum to {sum(ratios.values()):g}, they must sum to 1")
    return ratios


def images_under(folder: Path) -> list[Path]:
    """Every file below `folder` with an image suffix (IMAGE_SUFFIXES, any case), sorted: what `ssit-dist
    shard` packs and `ssit-dist predict` grades."""
    # Dangling links are kept on purpose: they fail to read later and are reported, not lost.
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())
    )


def _grade_folder(rel_parts: tuple[str, ...]) -> int | None:
    if len(rel_parts) >= 2 and rel_parts[0].isdigit() and int(rel_parts[0]) < NUM_GRADES:
        return int(rel_parts[0])
    return None


@dataclass
class Labels:
    """Labels files read: grades, groups and official splits by relative path, and what could not be used."""

    format: str | None = None  # the files' format (label_formats.FORMATS)
    files: list[str] = field(default_factory=list)  # their names, for the index
    grades: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # only with `group_by`
    splits: dict[str, str] = field(default_factory=dict)  # official splits, where the dataset defines them
    ungradable: set[str] = field(default_factory=set)  # photographs a row marks ungradable: excluded
    ungradable_rows: int = 0  # such rows, counted whether or not their photograph is under the folder
    problems: list[Problem] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)  # rows naming no photograph under the folder
    refused: set[str] = field(default_factory=set)  # photographs named only by rows that are problems


class _ImageNames:
    """Find the photograph a labels row names: its path relative to the input folder, else its file
    name, else (for formats that write none) its name without extension; a name two images share is
    refused, not guessed."""

    def __init__(self, rels: list[str], root: Path) -> None:
        self.rels, self.root = set(rels), root
        self.by_name: dict[str, list[str]] = defaultdict(list)
        self.by_stem: dict[str, list[str]] = defaultdict(list)
        for rel in rels:
            name = rel.rsplit("/", 1)[-1].lower()
            self.by_name[name].append(rel)
            self.by_stem[name.rsplit(".", 1)[0]].append(rel)

    def find(self, name: str, split_word: str | None = None) -> tuple[str | None, str | None]:
        """(relative path, None); (None, why not) for a name several images share; (None, None) for a name
        no image has. `split_word`: a name two images share is the one in a folder named like the official
        split (IDRiD numbers its training and testing sets alike)."""
        if name in self.rels:
            return name, None
        base = name.rsplit("/", 1)[-1].lower()
        found = self.by_name.get(base) or ([] if Path(base).suffix in IMAGE_SUFFIXES else self.by_stem.get(base, []))
        if len(found) > 1 and split_word:
            found = [rel for rel in found if split_word in rel.rsplit("/", 1)[0].lower()] or found
        if len(found) == 1:
            return found[0], None
        if found:
            return None, f"names {name}, which matches {len(found)} images ({', '.join(found[:3])}); give its path"
        return None, None


def read_labels(
    files: Sequence[Path],
    root: Path,
    group_by: str | None = None,
    labels_format: str = "auto",
    images: list[str] | None = None,
) -> Labels:
    """Grades (groups, official splits) by relative path from labels files of one format; bad rows become
    Problems with their file and line. `images`: the relative paths under `root`, where already listed."""
    try:
        read = [read_label_file(f, labels_format) for f in files]
    except LabelFormatError as e:
        raise InputError(str(e)) from None
    formats = {f.format.name: f.path.name for f in read}
    if len(formats) > 1:
        raise InputError(f"labels files of different formats ({formats}): pack one dataset at a time")
    names = _ImageNames(
        [p.relative_to(root).as_posix() for p in images_under(root)] if images is None else images, root
    )
    labels = Labels(format=read[0].format.name if read else None, files=[f.path.name for f in read])
    first: dict[str, tuple[str, int]] = {}
    for label_file in read:
        _check_group_column(label_file, group_by)
        before = len(labels.problems)
        for line, why, image in label_file.malformed:
            labels.problems.append(Problem(label_file.path.name, why, line))
            rel = names.find(image, label_file.split_word)[0] if image else None
            labels.refused |= {rel} if rel else set()
        for row in label_file.rows:
            _add_row(labels, label_file, row, names, first, group_by)
        labels.problems[before:] = sorted(labels.problems[before:], key=lambda p: p.line or 0)  # file order
    return labels


def _check_group_column(label_file: LabelFile, group_by: str | None) -> None:
    columns = list(label_file.rows[0].columns) if label_file.rows else [label_file.format.image]
    if group_by is not None and group_by.lower() not in columns:
        raise InputError(f"{label_file.path}: no column {group_by!r} to group by (found {columns}); name one of them")


def _add_row(
    labels: Labels,
    label_file: LabelFile,
    row: LabelRow,
    names: _ImageNames,
    first: dict[str, tuple[str, int]],
    group_by: str | None,
) -> None:
    """One row's grade (group, split) under its photograph's path, or its Problem."""
    found = names.find(row.image, label_file.split_word) if row.image else (None, "malformed row: empty image name")
    rel, problem = found
    if row.ungradable:
        labels.ungradable_rows += 1
        labels.ungradable |= {rel} if rel else set()
        return
    if rel is None and problem is None:
        labels.missing.append(Missing(label_file.path.name, row.line, row.image))
        return
    group = row.columns.get(group_by.lower(), "") if group_by is not None else None
    if rel is not None:
        problem = _row_problem(rel, row.grade, first, label_file.path.name)
    if problem is None and group == "":
        problem = f"empty {group_by} for {rel}: every photograph needs its group"
    if problem is not None or rel is None:
        labels.problems.append(Problem(label_file.path.name, str(problem), row.line))
        labels.refused |= {rel} if rel else set()
        return
    labels.grades[rel] = int(float(row.grade))  # _row_problem accepted it: an integer, perhaps written 2.0
    if group is not None:
        labels.groups[rel] = group
    if label_file.split is not None:
        labels.splits[rel] = label_file.split
    first[rel] = (label_file.path.name, row.line)


def _row_problem(rel: str, grade_text: str, first: dict[str, tuple[str, int]], file: str) -> str | None:
    """Why a row's grade cannot be used for `rel`, or None. `2.0` is grade 2: a spreadsheet or pandas
    that saw an empty cell in the column writes every grade as a float."""
    try:
        value = float(grade_text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        return f"grade {grade_text!r} of {rel} is not an integer 0-4"
    grade = int(value)
    if not 0 <= grade < NUM_GRADES:
        return f"grade {grade} of {rel} is outside 0-4"
    if rel in first:
        where, line = first[rel]
        return f"duplicate row for {rel} (first on line {line}{'' if where == file else f' of {where}'})"
    return None


def _stratified(items: list[Item], ratios: dict[str, float], seed: int) -> list[Item]:
    """Assign splits per grade with largest-remainder rounding, so every grade follows the ratios."""
    by_grade: dict[int | None, list[Item]] = defaultdict(list)
    for item in items:
        by_grade[item.grade].append(item)
    out: list[Item] = []
    names = list(ratios)
    for grade in sorted(by_grade, key=lambda g: -1 if g is None else g):
        group = sorted(by_grade[grade], key=lambda i: i.key)
        random.Random(f"{seed}-{grade}").shuffle(group)
        exact = [ratios[n] * len(group) for n in names]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(names)), key=lambda k: (counts[k] - exact[k], k))
        for k in by_remainder[: len(group) - sum(counts)]:
            counts[k] += 1
        start = 0
        for name, count in zip(names, counts, strict=True):
            out += [replace(i, split=name) for i in group[start : start + count]]
            start += count
    return out


def _stratified_groups(items: list[Item], ratios: dict[str, float], seed: int) -> list[Item]:
    """Whole groups to splits: strata by the group's highest grade; each stratum's groups, in a seeded
    order, each to the split furthest below its share of the stratum's photographs."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[str(item.group)].append(item)
    strata: dict[int, list[str]] = defaultdict(list)
    for name, members in groups.items():
        strata[max(-1 if i.grade is None else i.grade for i in members)].append(name)
    names = list(ratios)
    out: list[Item] = []
    for stratum in sorted(strata):
        order = sorted(strata[stratum])
        random.Random(f"{seed}-group-{stratum}").shuffle(order)
        total = sum(len(groups[g]) for g in order)
        placed = dict.fromkeys(names, 0)
        for group in order:
            split = max(names, key=lambda n: (ratios[n] * total - placed[n], -names.index(n)))
            placed[split] += len(groups[group])
            out += [replace(i, split=split) for i in groups[group]]
    return out


def _one_split_per_group(items: list[Item]) -> None:
    """Split folders given by the user must keep each group together too; say which group they break."""
    where: dict[str, Item] = {}
    for item in items:
        first = where.setdefault(str(item.group), item)
        if first.split != item.split:
            raise InputError(
                f"group {item.group!r} is in two splits: {first.rel} ({first.split}) and {item.rel} "
                f"({item.split}); move its photographs into one split folder"
            )


def discover(
    root: Path,
    labels: Sequence[Path] = (),
    split: str | None = None,
    seed: int = 0,
    group_by: str | None = None,
    labels_format: str = "auto",
) -> Inputs:
    """Everything to pack under `root`, with grades, groups and splits (see the module docstring)."""
    if not root.is_dir():
        raise InputError(f"input folder {root} does not exist or is not a folder")
    if group_by is not None and not labels:
        raise InputError(f"--group-by {group_by} names a column of the labels file: give --labels too")
    images = [p.relative_to(root).as_posix() for p in images_under(root)]
    read = read_labels(labels, root, group_by, labels_format, images) if labels else Labels()
    # A dataset's official splits (DDR's files, IDRiD's train/test) win over folders named like splits.
    split_dirs = [] if read.splits else [d for d in SPLIT_FOLDERS if (root / d).is_dir()]
    if split_dirs and split:
        raise InputError(f"{root} already has split folders ({', '.join(split_dirs)}); drop --split")
    items, not_in_labels, refused = _items(images, bool(labels), read, split_dirs)
    _check_keys_and_grades(root, items, bool(labels))
    if split:
        items = _assign_splits(items, parse_split(split), seed, group_by, read)
    if group_by:
        _one_split_per_group(items)
    labelled = bool(labels) or any(i.grade is not None for i in items)
    return Inputs(
        items,
        problems=read.problems,
        missing=read.missing,
        not_in_labels=not_in_labels,
        refused=refused,
        labelled=labelled,
        labels_format=read.format,
        labels_files=read.files,
        ungradable=read.ungradable_rows,
    )


def _check_keys_and_grades(root: Path, items: list[Item], labelled: bool) -> None:
    """Refuse two images with one sample key, and grade folders mixed with loose images."""
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise InputError(f"{item.rel} and {seen[item.key]} map to the same sample key {item.key!r}; rename one")
        seen[item.key] = item.rel
    in_grade_folders = [i for i in items if i.grade is not None]
    if not labelled and in_grade_folders and len(in_grade_folders) != len(items):
        stray = next(i.rel for i in items if i.grade is None)
        raise InputError(
            f"{root} mixes grade folders 0-4 with images outside them (for example {stray}); "
            "move those images into a grade folder or give --labels"
        )


def _assign_splits(
    items: list[Item], ratios: dict[str, float], seed: int, group_by: str | None, read: Labels
) -> list[Item]:
    """`--split` ratios over the items; with official splits, over the official train split only (IDRiD's
    train into train and val), the others kept as the dataset defines them."""
    official = sorted(set(read.splits.values()))
    kept = [i for i in items if i.split != "train"] if official else []
    clash = sorted(set(ratios) & {i.split for i in kept})
    if clash:
        raise InputError(
            f"--split names {', '.join(clash)}, an official split of these {read.format} labels: with official "
            f"splits ({', '.join(official)}) --split divides the train split only, e.g. train=0.85,val=0.15"
        )
    to_split = [i for i in items if i.split == "train"] if official else items
    assign = _stratified_groups if group_by else _stratified
    return assign(to_split, ratios, seed) + kept


def _items(images: list[str], labelled: bool, read: Labels, split_dirs: list[str]) -> tuple[list[Item], int, int]:
    """Every image with its grade, group and split (official, else its split folder, else train); how many
    no row of the labels names, and how many only refused rows name (the ones they mark ungradable are
    counted apart)."""
    items: list[Item] = []
    not_in_labels = refused = 0
    for rel in images:
        parts = Path(rel).parts
        folder_split = parts[0] if split_dirs and parts[0] in split_dirs else "train"
        in_split = parts[1:] if split_dirs and parts[0] in split_dirs else parts
        if rel in read.ungradable:
            continue
        if labelled and rel not in read.grades:
            refused += rel in read.refused
            not_in_labels += rel not in read.refused
            continue
        grade = read.grades[rel] if labelled else _grade_folder(in_split)
        split = read.splits.get(rel, folder_split)
        items.append(Item(sample_key(rel), rel, grade, split, read.groups.get(rel)))
    return items, not_in_labels, refused
