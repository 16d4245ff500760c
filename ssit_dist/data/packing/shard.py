"""Pack fundus photographs into WebDataset tar shards with precomputed saliency maps.

One pass per image in worker processes: decode, crop to the disc, resize (shrink only: a photograph smaller
than `--size` keeps its own size), encode the JPEG that training will read, decode it again and compute the
saliency map from exactly those pixels. Results come back in
input order whatever the number of workers, and tar headers carry no time or owner, so the same inputs
and options always give byte-identical shards and index.

Sample layout (`<key>.<ext>` members of `<split>-NNNNNN.tar`):
    jpg      RGB JPEG of the (side, side) crop, side = --size or the photograph's own if smaller
    sal.png  uint8 saliency map, 0 outside the disc (absent with `--saliency none`: evaluation-only shards)
    cls      grade 0-4 as ASCII text (labelled sets only; timm reads it)
    json     source path, original size and mode, crop box
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import multiprocessing
import os
import shutil
import signal
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ssit_dist import __version__, atomic
from ssit_dist.data.decode import BadImage, decode_bgr
from ssit_dist.data.index import INFO_NAME, ShardIndex, ShardIndexError, SplitInfo, read_index, sha256_file, write_index
from ssit_dist.data.packing.fundus import packed_jpeg
from ssit_dist.data.packing.inputs import IMAGE_SUFFIXES, Inputs, Item, Missing
from ssit_dist.data.packing.options import ShardOptions
from ssit_dist.data.packing.saliency import saliency_map

SHARD_PATTERN = "{split}-{index:06d}.tar"
MISSING_NAME = "missing_photographs.csv"  # beside the shards: the labels rows whose photograph is absent
LISTED = 10  # bad rows an error message lists before it counts the rest


class ShardError(RuntimeError):
    """Packing cannot go on (refused output folder, crashed worker, nothing to pack)."""


@dataclass(frozen=True)
class Packed:
    """One processed sample, or the reason it was skipped."""

    item: Item
    members: dict[str, bytes] | None = None
    histogram: np.ndarray | None = None  # (3, 256) int64 counts of each RGB channel's values
    error: str | None = None
    source_size: tuple[int, int] | None = None  # the photograph's width, height
    side: int | None = None  # the packed crop's side


def process(root: Path, item: Item, opts: ShardOptions) -> Packed:
    """Turn one input file into the members of one sample. Never raises for a bad image."""
    path = root / item.rel
    try:
        data = path.read_bytes()
    except OSError as e:
        return Packed(item, error=f"cannot read: {e.strerror or e}")
    try:
        jpg, cropped = packed_jpeg(data, opts.size, opts.quality)
    except BadImage as e:
        return Packed(item, error=str(e))
    # Saliency and statistics from the decoded JPEG: the pixels training will see, decoded the way the
    # loader decodes them.
    seen = decode_bgr(jpg)
    assert seen is not None, "OpenCV decodes the JPEG Pillow just wrote"
    # Integer histograms, so that mean/std do not depend on the order sums are taken in.
    histogram = np.stack([cv2.calcHist([seen], [c], None, [256], [0, 256]).reshape(-1) for c in (2, 1, 0)])
    meta = {
        "source": item.rel,
        "original_size": list(cropped.original_size),
        "original_mode": cropped.original_mode,
        "crop_box": list(cropped.box),
    }
    if item.group is not None:
        meta["group"] = item.group
    members = {"jpg": jpg}
    if opts.saliency != "none":
        sal = saliency_map(seen, opts.saliency, opts.jpeg_roundtrip)
        # RLE strategy: as small as the best zlib setting on these maps, five times faster.
        png = cv2.imencode(".png", sal, [cv2.IMWRITE_PNG_COMPRESSION, 9, cv2.IMWRITE_PNG_STRATEGY, 3])[1]
        members["sal.png"] = png.tobytes()
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    if item.grade is not None:
        members["cls"] = str(item.grade).encode()
    side = len(cropped.image)
    return Packed(item, members, histogram.astype(np.int64), source_size=cropped.original_size, side=side)


def _init_worker() -> None:
    # One OpenCV thread per worker: the pool already uses the cores.
    cv2.setNumThreads(1)
    # Die with the parent: a killed `ssit-dist shard` must not leave workers behind (Linux only).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _results(root: Path, items: list[Item], opts: ShardOptions) -> Iterator[Packed]:
    """Packed samples in input order, from a bounded window of in-flight work."""
    workers = opts.workers or len(os.sched_getaffinity(0))
    if workers == 1:
        for item in items:
            yield process(root, item, opts)
        return
    # Spawned, not forked: a fork after OpenCV or torch started their thread pools can deadlock.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker) as pool:
        window: deque[Future[Packed]] = deque()
        pending = iter(items)
        try:  # a dead worker breaks the pool: the next result, or the next submit, raises
            for item in pending:
                window.append(pool.submit(process, root, item, opts))
                if len(window) >= 8 * workers:
                    break
            while window:
                packed = window.popleft().result()
                for item in pending:
                    window.append(pool.submit(process, root, item, opts))
                    break
                yield packed
        except BrokenProcessPool:
            raise ShardError(
                "a worker process died (out of memory or a crash in a native library); "
                "nothing was indexed. Re-run with fewer --workers; the run starts over."
            ) from None


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _SplitWriter:
    """Writes one split's shards under temporary names; `finish` renames them into place."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.lengths: list[int] = []
        self.offsets: list[list[int]] = []  # each sample's byte offset in its shard: readers seek there
        self.grades: Counter[int] = Counter()
        self.groups: set[str] = set()
        self.histogram = np.zeros((3, 256), np.int64)
        self._tar: tarfile.TarFile | None = None

    def _name(self, index: int) -> str:
        return SHARD_PATTERN.format(split=self.split, index=index)

    def add(self, packed: Packed) -> None:
        assert packed.members is not None and packed.histogram is not None
        if self._tar is None or self.lengths[-1] == self.shard_size:
            self._close()
            tmp = self.out / (self._name(len(self.lengths)) + ".tmp")
            self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            self.lengths.append(0)
            self.offsets.append([])
        self.offsets[-1].append(self._tar.fileobj.tell())
        for ext, data in packed.members.items():
            _tar_member(self._tar, f"{packed.item.key}.{ext}", data)
        self.lengths[-1] += 1
        self.histogram += packed.histogram
        if packed.item.group is not None:
            self.groups.add(packed.item.group)
        if packed.item.grade is not None:
            self.grades[packed.item.grade] += 1

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def abandon(self) -> None:
        self._close()
        for i in range(len(self.lengths)):
            (self.out / (self._name(i) + ".tmp")).unlink(missing_ok=True)

    def finish(self, labelled: bool) -> SplitInfo:
        self._close()
        names = [self._name(i) for i in range(len(self.lengths))]
        for name in names:
            os.replace(self.out / (name + ".tmp"), self.out / name)
        histogram = {str(g): self.grades[g] for g in range(5)} if labelled else None
        return SplitInfo(
            name=self.split,
            num_samples=sum(self.lengths),
            filenames=names,
            shard_lengths=list(self.lengths),
            sha256=[sha256_file(self.out / n) for n in names],
            label_histogram=histogram,
            sizes=[(self.out / n).stat().st_size for n in names],
            offsets=self.offsets,
            groups=len(self.groups) if self.groups else None,
        )


def _prepare_output(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in out.iterdir() if p.name == INFO_NAME or p.name.endswith((".tar", ".tar.tmp")))
    if existing and not overwrite:
        raise ShardError(f"{out} already holds shards ({existing[0].name}, ...); pass --overwrite to replace them")
    # Only what the old index named, our own temporary files and its preview: other files stay. The
    # index goes first: an interrupted overwrite must not leave an index that names deleted shards.
    named: list[Path] = []
    if (out / INFO_NAME).is_file():
        try:
            old = read_index(out)
            named = [out / INFO_NAME] + [out / f for split in old.splits.values() for f in split.filenames]
        except ShardIndexError:
            named = [out / INFO_NAME]  # unreadable: replace the index, leave the tars we cannot attribute
        named.append(out / "preview.png")
    # The list of absent photographs is ours by its name: a stale one must not outlive the run that wrote it.
    for path in named + sorted(out.glob("*.tar.tmp")) + [out / MISSING_NAME]:
        path.unlink(missing_ok=True)


def _mean_std(histogram: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units from (3, 256) value counts."""
    values = np.arange(256) / 255.0
    counts = histogram / histogram.sum(axis=1, keepdims=True)
    mean = counts @ values
    std = np.sqrt(np.maximum(counts @ np.square(values) - np.square(mean), 0))
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


def pack(
    root: Path,
    out: Path,
    inputs: Inputs,
    opts: ShardOptions,
    on_sample: Callable[[Packed], None] | None = None,
) -> ShardIndex:
    """Pack `inputs` (from `inputs.discover`) into shards under `out` and write its `_info.json`. A run that
    fails (--strict, every photograph skipped, an interrupt) removes the folders it created."""
    _check_inputs(root, inputs, opts.strict)
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        return _pack(root, out, inputs, opts, on_sample)
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)  # the outermost: everything below is this run's
        raise


def _pack(
    root: Path, out: Path, inputs: Inputs, opts: ShardOptions, on_sample: Callable[[Packed], None] | None
) -> ShardIndex:
    _prepare_output(out, opts.overwrite)
    splits, ordered = _packing_order(inputs.items, opts.seed)
    writers = {s: _SplitWriter(out, s, opts.shard_size) for s in splits}
    failed, previews, sizes = _write_samples(root, ordered, opts, writers, on_sample)
    split_infos = {s: w.finish(inputs.labelled) for s, w in writers.items() if w.lengths}
    if not split_infos:
        reasons = "; ".join(f"{p.item.rel}: {p.error}" for p in failed[:3]) + ("; ..." if len(failed) > 3 else "")
        raise ShardError(f"none of the {len(failed)} photographs under {root} could be packed ({reasons})")
    index = _index(inputs, opts, writers, split_infos, failed, sizes)
    if previews:
        from ssit_dist.data.packing.preview import (
            write_preview,  # needs torch: imported only when a preview is asked for
        )

        write_preview(out / "preview.png", [p.members for p in previews if p.members], Path(root).resolve().name)
    if inputs.missing:
        write_missing(out / MISSING_NAME, inputs.missing)
    write_index(out, index)
    return index


def write_missing(path: Path, missing: list[Missing]) -> Path:
    """The labels rows whose photograph is absent, as CSV `labels,line,image`, atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("labels", "line", "image"))
    writer.writerows((m.file, m.line, m.image) for m in missing)
    return atomic.write_text(path, text.getvalue())


def _check_inputs(root: Path, inputs: Inputs, strict: bool) -> None:
    """Refuse a run with nothing to pack, or (strict) with bad rows in the labels or rows naming absent
    photographs, each list cut after its first LISTED rows."""
    if strict and (inputs.problems or inputs.missing):
        said = []
        if inputs.problems:
            lines = "".join(f"\n  {p}" for p in inputs.problems[:LISTED])
            more = f"\n  ... and {len(inputs.problems) - LISTED} more" if len(inputs.problems) > LISTED else ""
            said.append(f"the labels have {len(inputs.problems)} bad rows:{lines}{more}")
        if inputs.missing:
            first = ", ".join(f"{m.image} ({m.file}:{m.line})" for m in inputs.missing[:LISTED])
            said.append(
                f"{len(inputs.missing)} labels rows name a photograph that is not under {root}, first {first}: "
                "add the photographs, or leave out --strict to pack those present"
            )
        raise ShardError("--strict: " + "\n".join(said))
    if inputs.items:
        return
    labels = " ".join(inputs.labels_files)
    if inputs.missing and not (inputs.not_in_labels or inputs.refused):
        raise ShardError(
            f"{labels} names {len(inputs.missing)} photographs and none is under {root}: is it the folder that "
            f"holds them? (first named: {inputs.missing[0].image})"
        )
    if inputs.not_in_labels or inputs.refused:
        raise ShardError(f"no row of {labels} gives a usable grade to any of the images under {root}")
    raise ShardError(f"no images to pack under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")


def _packing_order(items: list[Item], seed: int) -> tuple[list[str], list[Item]]:
    """The splits (train, val, test, then any other by name) and the items in the order they are packed:
    split after split, each in a seeded shuffle, so that shards mix grades and folders yet are reproducible."""
    order = {name: i for i, name in enumerate(("train", "val", "test"))}
    splits = sorted({i.split for i in items}, key=lambda s: (order.get(s, 99), s))
    rng = np.random.default_rng(seed)
    ordered: list[Item] = []
    for split in splits:
        members = sorted((i for i in items if i.split == split), key=lambda i: i.key)
        ordered += [members[k] for k in rng.permutation(len(members))]
    return splits, ordered


def _write_samples(
    root: Path,
    items: list[Item],
    opts: ShardOptions,
    writers: dict[str, _SplitWriter],
    on_sample: Callable[[Packed], None] | None,
) -> tuple[list[Packed], list[Packed], list[tuple[int, int, int]]]:
    """Process `items` and add each to its split's writer; the samples that failed, the first `opts.preview`
    that did not, and each packed photograph's (width, height, packed side). Interrupted or failed, it
    removes the partial shards before raising."""
    failed: list[Packed] = []
    previews: list[Packed] = []
    sizes: list[tuple[int, int, int]] = []
    try:
        for packed in _results(root, items, opts):
            if packed.error is not None:
                if opts.strict:
                    raise ShardError(f"--strict: {root / packed.item.rel}: {packed.error}")
                failed.append(packed)
            else:
                writers[packed.item.split].add(packed)
                assert packed.source_size is not None and packed.side is not None
                sizes.append((*packed.source_size, packed.side))
                if len(previews) < opts.preview:
                    previews.append(packed)
            if on_sample:
                on_sample(packed)
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        raise
    return failed, previews, sizes


def photograph_sizes(sizes: list[tuple[int, int, int]], size: int) -> dict[str, Any]:
    """The sizes seen, for the index and the summary: the photographs' smallest, median and largest
    [width, height] (ordered by shorter side, then area), the packed sides' smallest, median and largest,
    and how many photographs were smaller than `size` and kept their own size."""
    by_side = sorted(sizes, key=lambda s: (min(s[0], s[1]), s[0] * s[1]))
    sides = sorted(s[2] for s in sizes)
    middle = len(sizes) // 2
    return {
        "source": {name: list(by_side[k][:2]) for name, k in (("min", 0), ("median", middle), ("max", -1))},
        "packed_side": {"min": sides[0], "median": sides[middle], "max": sides[-1]},
        "kept_own_size": sum(side < size for side in sides),
    }


def _index(
    inputs: Inputs,
    opts: ShardOptions,
    writers: dict[str, _SplitWriter],
    split_infos: dict[str, SplitInfo],
    failed: list[Packed],
    sizes: list[tuple[int, int, int]],
) -> ShardIndex:
    """The `_info.json` of a finished run: options, splits, normalisation statistics, what was skipped and
    the sizes seen."""
    # Normalisation statistics come from the training split, like everything else that is fitted.
    stats_from = [writers["train"]] if "train" in split_infos else list(writers.values())
    mean, std = _mean_std(np.sum([w.histogram for w in stats_from], axis=0))
    params = {k: v for k, v in asdict(opts).items() if k not in ("workers", "overwrite", "preview")}
    params["labels"] = inputs.labels_files or None
    params["labels_format"] = inputs.labels_format  # the one `auto` recognised
    skipped = [{"path": p.path, "line": p.line, "reason": p.reason} for p in inputs.problems]
    skipped += [{"path": p.item.rel, "line": None, "reason": p.error} for p in failed]
    return ShardIndex(
        tool_version=__version__,
        parameters=params,
        splits=split_infos,
        mean=mean,
        std=std,
        skipped=sorted(skipped, key=lambda s: (s["path"], s["line"] or 0)),
        not_in_labels=inputs.not_in_labels,
        ungradable=inputs.ungradable,
        missing_photographs=len(inputs.missing),
        missing_photographs_file=MISSING_NAME if inputs.missing else None,
        photograph_sizes=photograph_sizes(sizes, opts.size),
    )
