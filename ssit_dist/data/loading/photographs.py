"""Photograph files as a grader sees them: the inputs of `ssit-dist predict`, preprocessed as packing does.

Each photograph goes through exactly the steps of a packed sample: cropped to the disc and JPEG-encoded at
the size and quality the model's shards were packed with (data/packing/fundus.py `packed_jpeg`, the
function the packer calls), decoded as the labelled loader decodes (data/loading/labelled.py `rgb_tensor`),
then the grading transform. The crop and decode run in the DataLoader's workers. A file that cannot be used
(unreadable, truncated, not an image) comes back as a sample with a `problem` and no image: one bad file
never stops a batch. So does, unless `check_fundus` is off, a photograph whose crop does not look like a
fundus photograph (data/packing/fundus.py `fundus_doubt`: bright corners, or no bright disc): a DR grade of
a photograph of something else would mean nothing.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ssit_dist.data.decode import BadImage
from ssit_dist.data.loading.labelled import rgb_tensor
from ssit_dist.data.packing.fundus import fundus_doubt, packed_jpeg
from ssit_dist.data.packing.inputs import IMAGE_SUFFIXES, images_under


class PhotographsError(ValueError):
    """The inputs as a whole name no photograph to grade; the message names the input."""


def find_photographs(inputs: Sequence[str | Path]) -> list[str]:
    """The photographs INPUT... names, as POSIX paths sorted by name, each once: a file (any suffix: a file
    named on purpose is graded, or reported as a problem), a folder (every image below it, recursively) or
    a glob (`**` recursive; its folders recursively, its files with an image suffix)."""
    found: set[str] = set()
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            images = images_under(path)
            if not images:
                raise PhotographsError(f"no images under {given} (looked for {suffixes} in every folder below it)")
        elif path.is_file() or path.is_symlink():
            images = [path]
        elif glob.has_magic(str(given)):
            images = _glob_images(str(given))
            if not images:
                raise PhotographsError(f"{given} matches no images (looked for {suffixes})")
        else:
            raise PhotographsError(f"{given} does not exist: give photographs, folders or a glob")
        found.update(p.as_posix() for p in images)
    return sorted(found)


def _glob_images(pattern: str) -> list[Path]:
    images: list[Path] = []
    for match in map(Path, sorted(glob.glob(pattern, recursive=True))):
        if match.is_dir():
            images += images_under(match)
        elif match.suffix.lower() in IMAGE_SUFFIXES:
            images.append(match)
    return images


@dataclass(frozen=True)
class Sample:
    index: int  # the photograph's position in the dataset
    image: torch.Tensor | None  # the model's input (3, img_size, img_size) float, None with a problem
    problem: str | None  # why the photograph has no image
    view: torch.Tensor | None = None  # uint8 RGB (3, img_size, img_size): what the model saw, before normalising


class PhotographFiles(Dataset):
    """The photographs at `paths`, each preprocessed as a sample packed at `crop_size` px and JPEG `quality`
    and read through `transform` (grading_transforms.eval_transform with the model's size and
    normalisation). With `view_size`, each sample also carries the uint8 image resized as the transform
    resizes it (for pictures of what the model saw). `check_fundus`: refuse crops that do not look like a
    fundus photograph (module docstring)."""

    def __init__(
        self,
        paths: Sequence[str],
        crop_size: int,
        quality: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        view_size: int | None = None,
        check_fundus: bool = True,
    ):
        self.paths, self.crop_size, self.quality, self.transform = list(paths), crop_size, quality, transform
        self.resize = v2.Resize((view_size, view_size), antialias=True) if view_size else None
        self.check_fundus = check_fundus

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        try:
            data = Path(self.paths[i]).read_bytes()
        except OSError as e:
            return Sample(i, None, f"cannot read: {e.strerror or e}")
        try:
            jpeg, cropped = packed_jpeg(data, self.crop_size, self.quality)
        except BadImage as e:
            return Sample(i, None, str(e))
        except Exception as e:  # noqa: BLE001 - a decoder's unforeseen failure is this file's problem, not the batch's
            return Sample(i, None, f"cannot process: {type(e).__name__}: {e}")
        doubt = fundus_doubt(cropped.image) if self.check_fundus else None
        if doubt:
            return Sample(i, None, f"does not look like a fundus photograph: {doubt}; --no-fundus-check grades it")
        rgb = rgb_tensor(jpeg)
        if rgb is None:  # never seen: OpenCV decodes what Pillow just encoded
            return Sample(i, None, "its packed JPEG does not decode")
        return Sample(i, self.transform(rgb), None, self.resize(rgb) if self.resize else None)


@dataclass(frozen=True)
class PhotographBatch:
    indices: torch.Tensor  # (n,) dataset indices of the photographs with an image, in batch order
    images: torch.Tensor  # (n, 3, H, W); (0,) where none has one
    views: torch.Tensor | None  # (n, 3, H, W) uint8 where the dataset keeps views
    problems: list[tuple[int, str]]  # (dataset index, problem) of the others


def collate_photographs(batch: list[Sample]) -> PhotographBatch:
    """Stack the samples with an image; keep the others' problems apart."""
    kept = [s for s in batch if s.image is not None]
    problems = [(s.index, str(s.problem)) for s in batch if s.image is None]
    if not kept:
        return PhotographBatch(torch.empty(0, dtype=torch.long), torch.empty(0), None, problems)
    views = torch.stack([s.view for s in kept]) if kept[0].view is not None else None  # type: ignore[misc]
    images = torch.stack([s.image for s in kept])  # type: ignore[misc]
    return PhotographBatch(torch.tensor([s.index for s in kept]), images, views, problems)
