"""`_info.json`: the one place that writes, reads and validates the index of a packed dataset.

The layout follows timm's WebDataset info schema (`splits.<name>.name / num_samples / filenames /
shard_lengths`), so `timm.data.create_dataset("wds/<name>", root=folder, split=...)` reads our shards,
extended with what ssit-dist needs: format and tool versions, packing parameters, sha256 per shard, the
label histogram per split, per-channel mean/std of the packed images, every skipped input, and the count of
labels rows whose photograph is absent (their list is a file beside the index).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssit_dist import atomic

INFO_NAME = "_info.json"
FORMAT_VERSION = 1


class ShardIndexError(ValueError):
    """A shard folder whose index is missing, malformed or does not match its shards."""


@dataclass
class SplitInfo:
    name: str
    num_samples: int
    filenames: list[str]
    shard_lengths: list[int]
    sha256: list[str]
    label_histogram: dict[str, int] | None = None  # grade (as a string key) -> count
    sizes: list[int] | None = None  # bytes per shard (absent in indexes of ssit-dist 0.1.0 before sizes)
    offsets: list[list[int]] | None = None  # per shard, each sample's byte offset (absent in older indexes)
    groups: int | None = None  # distinct groups (patients) in the split, where packed with group_by


@dataclass
class ShardIndex:
    tool_version: str
    parameters: dict[str, Any]
    splits: dict[str, SplitInfo]
    mean: list[float]  # per channel RGB in [0, 1], over the train split (all samples if none)
    std: list[float]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"path", "reason"[, "line"]}
    not_in_labels: int = 0  # images under the input that no labels row names, skipped rows included
    # Labels rows naming a photograph absent from the input (a partial download): the count here, every row
    # in the file beside the shards that `missing_photographs_file` names (tens of thousands of rows would
    # make an index of megabytes that every reader parses).
    missing_photographs: int = 0
    missing_photographs_file: str | None = None
    # The sizes seen (packing.shard.photograph_sizes): source [width, height] and packed side, min, median
    # and max, and how many photographs smaller than --size kept their own size (absent in older indexes).
    photograph_sizes: dict[str, Any] | None = None
    ungradable: int = 0  # labels rows marked ungradable (DDR grade 5, Messidor-2 gradable 0), not packed
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.splits.values())

    def shard_paths(self, folder: Path, split: str) -> list[Path]:
        if split not in self.splits:
            raise ShardIndexError(
                f"{folder / INFO_NAME} has no split {split!r} (it has: {', '.join(self.splits) or 'none'})"
            )
        return [folder / f for f in self.splits[split].filenames]


def split_sources(folder: Path, split: str) -> list[str]:
    """The photograph each sample of `split` was packed from (its path under the packed input folder), in
    shard order: what to hand `ssit-dist predict` to grade a held-out split from its original files."""
    import tarfile

    sources = []
    for shard in read_index(folder).shard_paths(folder, split):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    sources.append(json.loads(tar.extractfile(member).read())["source"])  # type: ignore[union-attr]
    return sources


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index(folder: Path, index: ShardIndex) -> Path:
    """Write atomically: a reader sees the old index, or the complete new one, never half of one."""
    body = asdict(index)
    body["num_samples"] = index.num_samples
    return atomic.write_json(folder / INFO_NAME, body, sort_keys=True)


def read_index(folder: Path, verify: bool = False) -> ShardIndex:
    """Load and validate `folder/_info.json`; with verify, also check every shard's sha256."""
    path = folder / INFO_NAME
    if not path.is_file():
        raise ShardIndexError(f"{path} not found: is {folder} a folder written by `ssit-dist shard`?")
    try:
        text = path.read_text()
    except OSError as e:
        raise ShardIndexError(f"{path} cannot be read: {e}") from None
    index = parse_index(text, str(path))
    for split in index.splits.values():
        for name, expected in zip(split.filenames, split.sha256, strict=True):
            shard = folder / name
            if not shard.is_file():
                raise ShardIndexError(f"{path} lists {name}, which is missing from {folder}")
            if verify and sha256_file(shard) != expected:
                raise ShardIndexError(f"{shard}: sha256 does not match {path}; the shard changed or is corrupt")
    return index


def parse_index(text: str, path: str) -> ShardIndex:
    """The index in `text` (read from `path`, named in errors), validated in itself: a remote index is
    read this way, its shards not being files to look at."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardIndexError(f"{path} is not valid JSON: {e}") from None
    version = body.get("format_version") if isinstance(body, dict) else None
    if version != FORMAT_VERSION:
        raise ShardIndexError(f"{path}: format_version {version!r}, this ssit-dist reads {FORMAT_VERSION}")
    try:
        splits = {k: SplitInfo(**v) for k, v in body["splits"].items()}
        body.pop("num_samples", None)
        index = ShardIndex(**{**body, "splits": splits})
    except (KeyError, TypeError) as e:
        raise ShardIndexError(f"{path}: missing or unexpected field ({e}); re-run `ssit-dist shard`") from None
    for split in index.splits.values():
        if len(split.filenames) != len(split.shard_lengths) or len(split.filenames) != len(split.sha256):
            raise ShardIndexError(f"{path}: split {split.name!r} lists shards, lengths and hashes of unequal count")
        if sum(split.shard_lengths) != split.num_samples:
            raise ShardIndexError(f"{path}: split {split.name!r} num_samples != sum of shard_lengths")
        if split.offsets is not None and [len(o) for o in split.offsets] != split.shard_lengths:
            raise ShardIndexError(f"{path}: split {split.name!r} has sample offsets that disagree with shard_lengths")
    return index
