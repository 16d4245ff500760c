"""Shard sources: the shard URLs a run reads (folders from `ssit-dist shard`, brace patterns of local
tars or remote URLs), their sample counts and statistics from the index beside them, their check
against that index before training, and reading one shard's samples.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from braceexpand import braceexpand
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from ssit_dist.data.index import ShardIndex, ShardIndexError, read_index, sha256_file

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

    @property
    def num_samples(self) -> int | None:
        return None if None in self.lengths else sum(self.lengths)  # type: ignore[arg-type]

    def weights(self) -> np.ndarray:
        """Draw probability per shard: by sample count, uniform when any count is unknown."""
        if None in self.lengths:
            return np.full(len(self.lengths), 1.0 / len(self.lengths))
        p = np.array(self.lengths, np.float64)
        return p / p.sum()


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def is_pattern(source: str) -> bool:
    """A shard URL or brace pattern (`/data/train-{000000..000099}.tar`, `pipe:...`, `https://...`)
    rather than a folder written by `ssit-dist shard`."""
    return source.endswith(".tar") or "{" in source or _is_remote(source)


def open_shards(sources: Sequence[str | Path], split: str = "train") -> ShardSet:
    """The shards named by `sources`: folders written by `ssit-dist shard` (their `split`), or brace
    patterns of tar URLs. A local shard listed in an `_info.json` beside it takes its sample count and
    mean/std from there; other URLs are drawn uniformly and carry no statistics. Mean/std of several
    sources are the sample-weighted average."""
    if not sources:
        raise ShardIndexError("no shard sources given")
    paths: list[str] = []
    lengths: list[int | None] = []
    sizes: list[int | None] = []
    hashes: list[str | None] = []
    stats: list[tuple[list[float], list[float], int] | None] = []
    indexes: dict[Path, ShardIndex | None] = {}
    for source in map(str, sources):
        if not is_pattern(source):
            folder = Path(source)
            index = read_index(folder)
            paths += [str(p) for p in index.shard_paths(folder, split)]
            info = index.splits[split]
            lengths += info.shard_lengths
            sizes += info.sizes or [None] * len(info.filenames)
            hashes += info.sha256
            stats.append((index.mean, index.std, index.splits[split].num_samples))
            continue
        urls = list(braceexpand(source))
        missing = [u for u in urls if not (_is_remote(u) or Path(u).is_file())]
        if missing:
            raise ShardIndexError(
                f"{len(missing)} of the {len(urls)} shards of {source} are missing, "
                f"the first is {missing[0]}; check the pattern in data.shards"
            )
        found = [_indexed(url, indexes) for url in urls]
        counts = [n for _, n, _, _ in found]
        paths += urls
        lengths += counts
        sizes += [size for _, _, size, _ in found]
        hashes += [digest for _, _, _, digest in found]
        first = found[0][0]  # the pattern's statistics are those of its first shard's folder
        stats.append((first.mean, first.std, sum(counts)) if first is not None and None not in counts else None)  # type: ignore[arg-type]
    if any(s is None for s in stats):
        return ShardSet(paths, lengths, None, None, sizes, hashes)
    w = np.array([n for _, _, n in stats], np.float64)  # type: ignore[misc]
    w /= w.sum()
    mean = (w[:, None] * np.array([m for m, _, _ in stats])).sum(0).round(6).tolist()  # type: ignore[misc]
    std = (w[:, None] * np.array([s for _, s, _ in stats])).sum(0).round(6).tolist()  # type: ignore[misc]
    return ShardSet(paths, lengths, mean, std, sizes, hashes)


def _indexed(
    url: str, indexes: dict[Path, ShardIndex | None]
) -> tuple[ShardIndex | None, int | None, int | None, str | None]:
    """The `_info.json` beside a local shard (read once per folder) and the shard's sample count, size
    and sha256 in it."""
    if _is_remote(url):
        return None, None, None, None
    path = Path(url)
    if path.parent not in indexes:
        try:
            indexes[path.parent] = read_index(path.parent)
        except ShardIndexError:
            indexes[path.parent] = None
    index = indexes[path.parent]
    for split in index.splits.values() if index else []:
        if path.name in split.filenames:
            i = split.filenames.index(path.name)
            return index, split.shard_lengths[i], split.sizes[i] if split.sizes else None, split.sha256[i]
    return index, None, None, None


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
        if mode == "sha256" and digest is not None and not _is_remote(url)
    ]
    total = sum(os.path.getsize(shards.paths[i]) for i in hashed)
    if hashed:
        log.info("verifying the sha256 of %d shards (%.2f GB)", len(hashed), total / 1e9)
    columns = (TextColumn("sha256"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not (show_progress and hashed), transient=True) as progress:
        bar = progress.add_task("sha256", total=total)
        for i, (url, size, digest) in enumerate(zip(shards.paths, shards.sizes, shards.sha256, strict=True)):
            if _is_remote(url):
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
        with _open_url(url) as stream:
            head = stream.read(512)
    except Exception as e:  # gopen raises whatever its transport raises (IOError, HTTP errors, ...)
        raise ShardIndexError(f"shard source {url} cannot be read: {e}") from None
    if len(head) < 512:
        raise ShardIndexError(f"shard source {url} gave {len(head)} bytes, not a tar file; check the URL or command")


class SourceError(RuntimeError):
    """The shard sources gave no usable sample for `empty_timeout_s`: the run stops naming them."""


def read_shard(path: str) -> Generator[dict, None, None]:
    """Samples of one WebDataset tar, members grouped by key as webdataset does. The file closes when
    the generator does (webdataset's own reader leaves that to the garbage collector); a damaged tar is
    logged and read up to the damage."""
    sample: dict = {}
    try:
        with _open_url(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                split = base_plus_ext(member.name) if member.isfile() else None
                if split is None or split[0] is None:
                    continue
                key, ext = split
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample["__url__"] = path
                sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as e:
        log.warning("shard %s is damaged, reading stopped there: %s", path, e)
    if sample:
        yield sample


def _open_url(url: str) -> BinaryIO:
    """A local path opens directly; `pipe:`, `http(s)://`, `s3://` ... through webdataset's gopen."""
    if _is_remote(url):
        return gopen(url, "rb")
    return open(url, "rb")
