"""Reading WebDataset tars: a whole shard in order (`read_shard`), where each sample starts (`scan`), and
one sample by its index (`ShardReader`) with as few bytes as the source allows.

A sample is the run of consecutive members that share a key (`0001.jpg`, `0001.sal.png`), as webdataset
groups them. A local tar is read by seeking: to the sample's byte offset where the shard's index records
it, else by hopping over tar headers from the last sample this process found (each shard once). A remote
source (`pipe:`, `http(s)://`, ...) cannot seek: it is read on from where it is, passing over the
samples before the one asked for, and reopened only to go back; the epoch plan (epoch.py) gives each
stream its part of a remote shard as one run, so that the stream reads it in one pass. The reader
counts the bytes it reads and the bytes of the samples it returns (their extent in the tar, headers
included; member bytes for a remote source, whose headers it does not see), for `ssit-dist data-plan`.
"""

from __future__ import annotations

import bisect
import logging
import tarfile
from collections.abc import Generator, Sequence
from typing import BinaryIO

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def open_url(url: str) -> BinaryIO:
    """A local path opens directly; `pipe:`, `http(s)://`, `s3://` ... through webdataset's gopen."""
    if is_remote(url):
        return gopen(url, "rb")
    return open(url, "rb")


def read_shard(path: str) -> Generator[dict, None, None]:
    """Samples of one WebDataset tar in order, members grouped by key as webdataset does. The file closes
    when the generator does (webdataset's own reader leaves that to the garbage collector); a damaged tar
    is logged and read up to the damage."""
    sample: dict = {}
    try:
        with open_url(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
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


class _LocalTar:
    """One open local tar, read member by member from any byte offset."""

    def __init__(self, path: str):
        self.file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.tar = tarfile.TarFile(fileobj=self.file, mode="r")
        self.bytes_read = 0

    def close(self) -> None:
        self.file.close()

    def sample(self, start: int, keep: bool, count: bool, end: int | None = None) -> tuple[dict, int] | None:
        """The sample whose first header is at byte `start` (member bytes read where `keep`, else their
        sizes; counted as read where `count`, as a dry run does) and the offset of the next sample's first
        header; None at the end of the archive. `end`, the next sample's offset where known, saves
        reading that sample's header to find where this one ends."""
        sample: dict = {}
        position = start
        while end is None or position < end:
            self.file.seek(position)
            try:
                info = tarfile.TarInfo.fromtarfile(self.tar)  # follows pax and GNU long-name headers
            except tarfile.HeaderError:  # the end-of-archive blocks, or the end of a cut file
                break
            self.bytes_read += info.offset_data - position
            split = base_plus_ext(info.name) if info.isfile() else None
            if split is not None and split[0] is not None:
                key, ext = split
                if sample and sample["__key__"] != key:
                    break
                sample.setdefault("__key__", key)
                if keep:
                    self.file.seek(info.offset_data)
                    sample[ext] = self.file.read(info.size)
                else:
                    sample[ext] = info.size
                if keep or count:  # data blocks as the disk serves them
                    self.bytes_read += self.tar.offset - info.offset_data
            position = self.tar.offset  # the next header, past this member's data blocks
        return (sample, position) if sample else None


class ShardReader:
    """Samples of a list of shards by global id (shard offset + index in shard); see the module docstring.
    `keys_only`: read headers only and return member sizes in place of their bytes (a dry run)."""

    def __init__(
        self,
        paths: Sequence[str],
        lengths: Sequence[int],
        offsets: Sequence[Sequence[int] | None],
        keys_only: bool = False,
    ):
        self.paths, self.keys_only = list(paths), keys_only
        self.starts = [0]
        for n in lengths:
            self.starts.append(self.starts[-1] + n)
        self.offsets = [list(o) if o else [0] for o in offsets]  # sample start offsets known so far
        self.bytes_used = 0
        self._local: tuple[int, _LocalTar] | None = None
        self._remote: tuple[int, int, Generator[dict, None, None]] | None = None  # shard, next index, samples
        self._done_bytes = 0  # read through sources since closed, and through remote ones

    @property
    def bytes_read(self) -> int:
        return self._done_bytes + (self._local[1].bytes_read if self._local else 0)

    def read(self, global_id: int) -> dict | None:
        """The sample, with `__key__` and `__url__`; None (logged) where the shard ends before it."""
        shard = bisect.bisect_right(self.starts, global_id) - 1
        index = global_id - self.starts[shard]
        url = self.paths[shard]
        try:
            sample = self._read_remote(shard, index) if is_remote(url) else self._read_local(shard, index)
        except (tarfile.TarError, OSError) as e:
            log.warning("shard %s cannot be read at its sample %d: %s", url, index, e)
            self.close()
            return None
        if sample is None:
            log.warning(
                "shard %s ends before its sample %d that its index counts; re-run `ssit-dist shard`", url, index
            )
            return None
        sample["__url__"] = url
        return sample

    def _read_local(self, shard: int, index: int) -> dict | None:
        if self._local is None or self._local[0] != shard:
            self.close()
            self._local = (shard, _LocalTar(self.paths[shard]))
        tar, known = self._local[1], self.offsets[shard]
        while len(known) <= index:  # hop to it over whole samples, headers only, recording where each starts
            found = tar.sample(known[-1], keep=False, count=False)
            if found is None:
                return None
            known.append(found[1])
        end = known[index + 1] if index + 1 < len(known) else None
        found = tar.sample(known[index], keep=not self.keys_only, count=True, end=end)
        if found is None:
            return None
        if len(known) == index + 1:
            known.append(found[1])
        self.bytes_used += found[1] - known[index]  # the sample's whole extent in the tar, headers included
        return found[0]

    def _read_remote(self, shard: int, index: int) -> dict | None:
        if self._remote is None or self._remote[0] != shard or self._remote[1] > index:
            self.close()
            self._remote = (shard, 0, read_shard(self.paths[shard]))
        _, position, samples = self._remote
        for sample in samples:
            self._done_bytes += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
            position += 1
            if position - 1 == index:
                self._remote = (shard, position, samples)
                self.bytes_used += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
                if self.keys_only:
                    return {k: v if k.startswith("__") else len(v) for k, v in sample.items()}
                return sample
        self._remote = None
        return None

    def close(self) -> None:
        if self._local is not None:
            self._done_bytes += self._local[1].bytes_read
            self._local[1].close()
            self._local = None
        if self._remote is not None:
            self._remote[2].close()
            self._remote = None


def scan(path: str) -> list[int]:
    """Byte offset of every sample of a local tar, read from its headers alone."""
    tar, offsets = _LocalTar(path), [0]
    try:
        while (found := tar.sample(offsets[-1], keep=False, count=False)) is not None:
            offsets.append(found[1])
    finally:
        tar.close()
    return offsets[:-1]
