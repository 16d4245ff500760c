"""Shard sources: the shard URLs a run reads (folders from `ssit-dist shard`, brace patterns of local
tars or remote URLs), their sample counts and statistics from the index beside them (for a remote shard,
the `_info.json` beside it, fetched the same way), their check against that index before training, and
reading one shard's samples.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ssit_dist.data.index import INFO_NAME, ShardIndex, ShardIndexError, SplitInfo, parse_index, read_index, sha256_file
from ssit_dist.data.loading.tar_reader import ShardReader, is_remote, open_url, scan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs with their sample counts (None where no index says) and the packed images' mean/std
    (None when the shards came without an index)."""

    paths: list[str]
    lengths: list[int | None]
    mean: list[float] | None
    std: list[float] | None
    sizes: list[int | None]  # bytes, as the index recorded them
    sha256: list[str | None]
    offsets: list[list[int] | None]  # byte offset of each sample in its local shard, where known

    @property
    def num_samples(self) -> int | None:
        return None if None in self.lengths else sum(self.lengths)  # type: ignore[arg-type]

    @property
    def sequential(self) -> tuple[bool, ...]:
        """Per shard: readable only from its start (a remote source), as the epoch plan takes it."""
        return tuple(map(is_remote, self.paths))

    def reader(self, keys_only: bool = False) -> ShardReader:
        """Reads samples by global id; see data/loading/tar_reader.py."""
        self.check_counted()
        return ShardReader(self.paths, self.lengths, self.offsets, keys_only)  # type: ignore[arg-type]

    def check_counted(self) -> None:
        """Raise ShardIndexError where a shard's sample count is unknown."""
        if self.num_samples is None:
            unknown = self.paths[self.lengths.index(None)]
            raise ShardIndexError(
                f"the sample count of {unknown} is unknown (a remote shard without an _info.json beside it "
                f"that lists it, at {index_url(unknown) or 'no URL: it names no .tar file'}): an epoch reads "
                "every sample once and must know how many there are; copy the shards locally, or put the "
                "_info.json `ssit-dist shard` wrote beside them"
            )


def is_pattern(source: str) -> bool:
    """A shard URL or brace pattern (`/data/train-{000000..000099}.tar`, `pipe:...`, `https://...`)
    rather than a folder written by `ssit-dist shard`."""
    return source.endswith(".tar") or "{" in source or is_remote(source)


@dataclass(frozen=True)
class _Entry:
    """What is known about one shard."""

    length: int | None
    size: int | None = None
    sha256: str | None = None
    offsets: list[int] | None = None


def _has_saliency_maps(index: ShardIndex, where: str | Path) -> None:
    if index.parameters.get("saliency") == "none":
        raise ShardIndexError(
            f"{where} was packed with --saliency none: its samples have no saliency maps, which pretraining "
            "needs; pack the photographs again with --saliency fine_grained (the default)"
        )


def open_shards(sources: Sequence[str | Path], split: str = "train") -> ShardSet:
    """The shards named by `sources`: folders written by `ssit-dist shard` (their `split`), or brace
    patterns of tar URLs. A shard listed in an `_info.json` beside it (a remote one's fetched the same
    way) takes its sample count and mean/std from there; another local tar is counted from its headers;
    a remote one without an index has no count (`ShardSet.reader` refuses it) and no statistics. Mean/std
    of several sources are the sample-weighted average."""
    if not sources:
        raise ShardIndexError("no shard sources given")
    paths: list[str] = []
    entries: list[_Entry] = []
    stats: list[tuple[list[float], list[float], int] | None] = []
    indexes: dict[str, ShardIndex | None] = {}
    for source in map(str, sources):
        if not is_pattern(source):
            folder = Path(source)
            index = read_index(folder)
            _has_saliency_maps(index, folder)
            paths += [str(p) for p in index.shard_paths(folder, split)]
            entries += [_entry(index.splits[split], i) for i in range(len(index.splits[split].filenames))]
            stats.append((index.mean, index.std, index.splits[split].num_samples))
            continue
        urls = list(braceexpand(source))
        missing = [u for u in urls if not (is_remote(u) or Path(u).is_file())]
        if missing:
            raise ShardIndexError(
                f"{len(missing)} of the {len(urls)} shards of {source} are missing, "
                f"the first is {missing[0]}; check the pattern in data.shards"
            )
        found = [_indexed(url, indexes) for url in urls]
        paths += urls
        entries += [entry for _, entry in found]
        first = found[0][0]  # the pattern's statistics are those of its first shard's folder
        if first is not None:
            _has_saliency_maps(first, (index_url(urls[0]) or urls[0]) if is_remote(urls[0]) else Path(urls[0]).parent)
        indexed = first is not None and all(entry.sha256 is not None for _, entry in found)
        stats.append((first.mean, first.std, sum(e.length for _, e in found)) if indexed else None)  # type: ignore[union-attr, misc]
    lengths = [e.length for e in entries]
    sizes, hashes, offsets = [e.size for e in entries], [e.sha256 for e in entries], [e.offsets for e in entries]
    if any(s is None for s in stats):
        return ShardSet(paths, lengths, None, None, sizes, hashes, offsets)
    w = np.array([n for _, _, n in stats], np.float64)  # type: ignore[misc]
    w /= w.sum()
    mean = (w[:, None] * np.array([m for m, _, _ in stats])).sum(0).round(6).tolist()  # type: ignore[misc]
    std = (w[:, None] * np.array([s for _, s, _ in stats])).sum(0).round(6).tolist()  # type: ignore[misc]
    return ShardSet(paths, lengths, mean, std, sizes, hashes, offsets)


def _entry(split: SplitInfo, i: int) -> _Entry:
    return _Entry(
        split.shard_lengths[i],
        split.sizes[i] if split.sizes else None,
        split.sha256[i],
        split.offsets[i] if split.offsets else None,
    )


_TAR_NAME = re.compile(r"[^/\s'\"=]+\.tar(?=$|[\s'\"?#;|])")  # a shard's file name inside a URL or command


def index_url(url: str) -> str | None:
    """Where the `_info.json` beside a remote shard is, read the same way: the URL or `pipe:` command with
    the shard's file name (its last `*.tar`) replaced, e.g. `pipe:aws s3 cp s3://b/d/_info.json -`; None
    where it names no tar."""
    found = list(_TAR_NAME.finditer(url))
    return None if not found else url[: found[-1].start()] + INFO_NAME + url[found[-1].end() :]


def _indexed(url: str, indexes: dict[str, ShardIndex | None]) -> tuple[ShardIndex | None, _Entry]:
    """The `_info.json` beside a shard (read once per folder) and what it says of the shard; a local tar
    it does not list is counted from its headers."""
    if is_remote(url):
        where, name = index_url(url), (_TAR_NAME.findall(url) or [""])[-1]
        if where is not None and where not in indexes:
            indexes[where] = _remote_index(where)
        index = indexes.get(where or "")
    else:
        path = Path(url)
        where, name = str(path.parent), path.name
        if where not in indexes:
            try:
                indexes[where] = read_index(path.parent)
            except ShardIndexError:
                indexes[where] = None
        index = indexes[where]
    for split in index.splits.values() if index else []:
        if name in split.filenames:
            entry = _entry(split, split.filenames.index(name))
            return index, _Entry(entry.length, entry.size, entry.sha256) if is_remote(url) else entry
    if is_remote(url):
        return index, _Entry(None)
    offsets = scan(url)
    return index, _Entry(len(offsets), offsets=offsets)


def _remote_index(url: str) -> ShardIndex | None:
    """The index at `url` (`pipe:`, `https://`, ...), or None (logged) where there is none to read."""
    try:
        with open_url(url) as stream:
            text = stream.read().decode()
        return parse_index(text, url)
    except Exception as e:  # gopen raises whatever its transport raises; a missing index is no error yet
        log.info("no shard index at %s: %s", url, e)
        return None


def verify_shards(shards: ShardSet, mode: str, show_progress: bool = False) -> None:
    """Check every local shard against its index before training: `size` (bytes, fast), `sha256`
    (reads every byte; a progress bar on a terminal where `show_progress`) or `none`. A mismatch names
    the shard and what to do. Remote sources are opened once instead, so that a failing `pipe:` or a
    404 stops the run now rather than after hours."""
    if mode == "none":
        return
    hashed = [
        i
        for i, (url, digest) in enumerate(zip(shards.paths, shards.sha256, strict=True))
        if mode == "sha256" and digest is not None and not is_remote(url)
    ]
    total = sum(os.path.getsize(shards.paths[i]) for i in hashed)
    if hashed:
        log.info("verifying the sha256 of %d shards (%.2f GB)", len(hashed), total / 1e9)
    columns = (TextColumn("sha256"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not (show_progress and hashed), transient=True) as progress:
        bar = progress.add_task("sha256", total=total)
        for i, (url, size, digest) in enumerate(zip(shards.paths, shards.sizes, shards.sha256, strict=True)):
            if is_remote(url):
                _probe(url)
            elif mode == "size" and size is not None and (actual := os.path.getsize(url)) != size:
                raise ShardIndexError(
                    f"{url} has {actual} bytes, its _info.json says {size}: the shard "
                    "changed or was cut short; re-copy it or re-run `ssit-dist shard`"
                )
            elif i in hashed:
                if sha256_file(Path(url)) != digest:
                    raise ShardIndexError(
                        f"{url}: sha256 does not match its _info.json: the shard changed or is "
                        "corrupt; re-copy it or re-run `ssit-dist shard`"
                    )
                progress.advance(bar, os.path.getsize(url))


def _probe(url: str) -> None:
    """Read the first tar header of a remote shard, or fail naming it."""
    try:
        with open_url(url) as stream:
            head = stream.read(512)
    except Exception as e:  # gopen raises whatever its transport raises (IOError, HTTP errors, ...)
        raise ShardIndexError(f"shard source {url} cannot be read: {e}") from None
    if len(head) < 512:
        raise ShardIndexError(f"shard source {url} gave {len(head)} bytes, not a tar file; check the URL or command")


class SourceError(RuntimeError):
    """The shard sources gave no usable sample for `empty_timeout_s`: the run stops naming them."""
