"""Folders of some of the real photographs in ../shared, linked, never copied."""

from __future__ import annotations

import csv
from pathlib import Path


def link_subset(src: Path, dst: Path, names: list[str], grades: dict[str, int] | None = None) -> Path:
    """A folder of symlinks to some real photographs (never copies), with a labels CSV if grades given."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst / name).symlink_to(src / name)
    if grades is not None:
        with open(dst / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "grade"), *((n, grades[n]) for n in names)])
    return dst


def read_grades(folder: Path) -> dict[str, int]:
    """image -> grade from the folder's labels.csv."""
    with open(folder / "labels.csv") as f:
        return {row["image"]: int(row["grade"]) for row in csv.DictReader(f)}
