"""Labelled samples of packed shards, with random access, for fine-tuning and evaluation.

Fine-tuning sets are small (1k-13k images), epochs are many and evaluation must count every sample
exactly once, so this is a map-style dataset rather than a stream: opening a split reads the tar headers
and the grades once and remembers where each JPEG lies; a sample is then one seek and one read.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ssit_dist.data.decode import decode_bgr
from ssit_dist.data.index import ShardIndex, ShardIndexError, read_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSource:
    """`FOLDER` or `FOLDER:SPLIT` as given on the command line."""

    folder: Path
    split: str

    @classmethod
    def parse(cls, text: str, default_split: str) -> SplitSource:
        folder, sep, split = str(text).rpartition(":")
        if not sep or "/" in split:  # no split given (or the colon belongs to the path)
            return cls(Path(text), default_split)
        return cls(Path(folder), split)

    def __str__(self) -> str:
        return f"{self.folder}:{self.split}"


def check_labels(source: SplitSource, num_classes: int) -> ShardIndex:
    """The folder's index, after checking that `source.split` exists, is labelled, and holds only
    grades a head with `num_classes` outputs can learn: before any training starts."""
    index = read_index(source.folder)
    index.shard_paths(source.folder, source.split)  # names a missing split
    histogram = index.splits[source.split].label_histogram
    if histogram is None:
        raise ShardIndexError(f"{source}: the shards carry no grades; pack them with `ssit-dist shard --labels CSV`")
    outside = sorted(int(g) for g, n in histogram.items() if n and not 0 <= int(g) < num_classes)
    if outside:
        raise ShardIndexError(
            f"{source}: grade {outside[0]} ({histogram[str(outside[0])]} samples) is outside "
            f"the head's range 0..{num_classes - 1}; set num_classes"
        )
    return index


class LabelledShards(Dataset):
    """(image tensor, grade, index) for every sample of one split. `transform` maps an RGB uint8
    (3, H, W) tensor to the model's input. A sample whose JPEG does not decode comes back with image
    None (logged with its key); `collate_labelled` leaves it out of the batch and callers report it.

    `augment_seed` (seed, epoch), where set, makes each sample's random transform a function of (seed,
    epoch, index) alone: whichever worker or process draws it, however many came before, so that an
    epoch resumed in the middle gives the samples the same augmentation as the uninterrupted one."""

    def __init__(self, source: SplitSource, transform: Callable[[torch.Tensor], torch.Tensor], num_classes: int = 5):
        self.source, self.transform = source, transform
        self.augment_seed: tuple[int, int] | None = None
        self.index = check_labels(source, num_classes)
        self.keys: list[str] = []
        self.grades: list[int] = []
        self.groups: list[str | None] = []  # each sample's patient, where packed with --group-by
        self._where: list[tuple[str, int, int]] = []  # (shard, offset of the jpg bytes, size)
        split = self.index.splits[source.split]
        for i, shard in enumerate(self.index.shard_paths(source.folder, source.split)):
            if split.sizes is not None and shard.stat().st_size != split.sizes[i]:
                raise ShardIndexError(
                    f"{shard} has {shard.stat().st_size} bytes, {source.folder / '_info.json'} says "
                    f"{split.sizes[i]}: a truncated or changed copy; copy the shard again or re-run "
                    "`ssit-dist shard`"
                )
            self._scan(shard)
        if len(self.keys) != self.index.splits[source.split].num_samples:
            raise ShardIndexError(
                f"{source}: found {len(self.keys)} labelled samples, the index says "
                f"{self.index.splits[source.split].num_samples}; re-run `ssit-dist shard`"
            )

    def _scan(self, shard: Path) -> None:
        found: dict[str, dict] = {}
        size, key = shard.stat().st_size, None
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if member.offset_data + member.size > size:
                        raise ShardIndexError(
                            f"{shard} is truncated inside sample {key} ({member.name} ends at byte "
                            f"{member.offset_data + member.size}, the file has {size}); copy the "
                            "shard again or re-run `ssit-dist shard`"
                        )
                    entry = found.setdefault(key, {})
                    if ext == "jpg":
                        entry["jpg"] = (member.offset_data, member.size)
                    elif ext == "cls":
                        entry["cls"] = _grade(tar.extractfile(member).read(), shard, key)  # type: ignore[union-attr]
                    elif ext == "json":
                        entry["group"] = _group(tar.extractfile(member).read())  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError, OSError) as e:
            after = f"after sample {key}" if key else "at its start"
            raise ShardIndexError(
                f"{shard} is damaged {after} ({e}); copy the shard again or re-run `ssit-dist shard`"
            ) from None
        for key, entry in found.items():
            if "jpg" not in entry or "cls" not in entry:
                raise ShardIndexError(
                    f"{shard}: sample {key} lacks its {'jpg' if 'jpg' not in entry else 'cls'} member"
                )
            self.keys.append(key)
            self.grades.append(entry["cls"])
            self.groups.append(entry.get("group"))
            self._where.append((str(shard), *entry["jpg"]))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int]:
        shard, offset, size = self._where[i]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        rgb = rgb_tensor(data)
        if rgb is None:
            log.warning("sample %s in %s does not decode; left out", self.keys[i], shard)
            return None, self.grades[i], i
        if self.augment_seed is None:
            return self.transform(rgb), self.grades[i], i
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([*self.augment_seed, i]).generate_state(1)[0]))
            return self.transform(rgb), self.grades[i], i


def rgb_tensor(jpeg: bytes) -> torch.Tensor | None:
    """A packed sample's JPEG as the RGB uint8 (3, H, W) tensor the grading transforms take, decoded by
    OpenCV as everywhere a packed JPEG is read; None where it does not decode. Shared with `ssit-dist
    predict` (data/loading/photographs.py), which must see the pixels evaluation sees."""
    bgr = decode_bgr(jpeg)
    if bgr is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)


def _grade(raw: bytes, shard: Path, key: str) -> int:
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ShardIndexError(
            f"{shard}: sample {key} has grade {text[:40]!r} in its cls member, not an integer; "
            "fix the labels CSV and re-run `ssit-dist shard`"
        ) from None


def _group(raw: bytes) -> str | None:
    """The sample's group (its patient) from its json member; None where it has none or is unreadable (the
    group only pairs a patient's photographs in bootstrap intervals: no reason to refuse the sample)."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    group = meta.get("group") if isinstance(meta, dict) else None
    return None if group is None else str(group)


def collate_labelled(
    batch: list[tuple[torch.Tensor | None, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a batch, leaving out samples that did not decode (they were logged by the dataset)."""
    kept = [b for b in batch if b[0] is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    images, grades, indices = zip(*kept, strict=True)
    return torch.stack(images), torch.tensor(grades), torch.tensor(indices)
