"""Photograph files for `ssit-dist predict`: which files INPUT... names, each preprocessed as the packer packs
it, and bad files kept as problems, on real photographs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssit_dist.data.loading.grading_transforms import eval_transform
from ssit_dist.data.loading.labelled import rgb_tensor
from ssit_dist.data.loading.photographs import PhotographFiles, PhotographsError, collate_photographs, find_photographs
from ssit_dist.data.packing.inputs import Item
from ssit_dist.data.packing.options import ShardOptions
from ssit_dist.data.packing.shard import process

MEAN, STD = [0.4, 0.3, 0.2], [0.2, 0.2, 0.1]


@pytest.fixture(scope="module")
def photos(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real photographs linked in a tree: two at the top, one two folders down with an upper-case suffix,
    one PNG; and a text file beside them."""
    root = tmp_path_factory.mktemp("photos")
    names = sorted(p.name for p in graded_dir.glob("*.jpeg"))[:4]
    (root / "a" / "b").mkdir(parents=True)
    (root / names[0]).symlink_to(graded_dir / names[0])
    (root / names[1]).symlink_to(graded_dir / names[1])
    (root / "a" / "b" / names[2].replace(".jpeg", ".JPG")).symlink_to(graded_dir / names[2])
    from PIL import Image

    Image.open(graded_dir / names[3]).save(root / "a" / "other.png")
    (root / "notes.txt").write_text("not a photograph")
    return root


def test_inputs_are_files_folders_and_globs_each_once_sorted(photos: Path) -> None:
    found = find_photographs([photos])
    assert len(found) == 4 and found == sorted(found)
    assert not any(f.endswith(".txt") for f in found)
    assert any(f.endswith(".JPG") for f in found) and any(f.endswith(".png") for f in found)
    # A file named twice (directly and in its folder) and a glob over the same tree: still each once.
    again = find_photographs([found[-1], f"{photos}/**/*.JPG", photos])
    assert again == found
    assert find_photographs([f"{photos}/*.jpeg"]) == [f for f in found if f.endswith(".jpeg") and "/a/" not in f]
    # A file named on purpose is graded whatever its suffix (and reported if it is no photograph).
    assert find_photographs([photos / "notes.txt"]) == [(photos / "notes.txt").as_posix()]


def test_inputs_with_no_photograph_are_one_line_errors(photos: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "labels.csv").write_text("image,grade\n")
    cases = {
        tmp_path / "empty": "no images under",
        tmp_path / "texts": "no images under",
        tmp_path / "absent": "does not exist",
        f"{tmp_path}/*.png": "matches no images",
    }
    for given, said in cases.items():
        with pytest.raises(PhotographsError, match=said) as error:
            find_photographs([photos, given])
        assert str(given) in str(error.value) and "\n" not in str(error.value)


def test_a_photograph_is_preprocessed_as_the_packer_packs_it(photos: Path) -> None:
    """The sample's image is the evaluation transform of the JPEG `process` (the packer) writes, bit for bit."""
    found = find_photographs([photos])
    transform = eval_transform(32, MEAN, STD)
    dataset = PhotographFiles(found, 64, 90, transform, view_size=32)
    for i, path in enumerate(found):
        packed = process(Path("/"), Item("k", path.lstrip("/"), None, "train"), ShardOptions(size=64, quality=90))
        assert packed.members is not None
        rgb = rgb_tensor(packed.members["jpg"])
        assert rgb is not None and rgb.shape == (3, 64, 64)
        sample = dataset[i]
        assert sample.problem is None and sample.index == i
        assert torch.equal(sample.image, transform(rgb))  # type: ignore[arg-type]
        assert sample.view is not None and sample.view.dtype == torch.uint8 and sample.view.shape == (3, 32, 32)


def test_bad_files_become_problems_and_the_batch_goes_on(photos: Path, tmp_path: Path) -> None:
    good = find_photographs([photos])[0]
    data = Path(good).read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    bad = [tmp_path / n for n in ("empty.jpg", "truncated.jpg", "text.jpg", "gone.jpg")]
    dataset = PhotographFiles([good, *map(str, bad)], 64, 95, eval_transform(32, MEAN, STD))
    batch = collate_photographs([dataset[i] for i in range(len(dataset))])
    assert batch.indices.tolist() == [0] and batch.images.shape == (1, 3, 32, 32) and batch.views is None
    problems = dict(batch.problems)
    assert problems[1] == "empty file (0 bytes)"
    assert problems[2].startswith("cannot decode") and "truncated" in problems[2]
    assert problems[3] == "not an image (unrecognised format)"
    assert problems[4].startswith("cannot read: ") and "No such file" in problems[4]
    nothing = collate_photographs([dataset[1]])
    assert nothing.images.numel() == 0 and nothing.problems == [(1, "empty file (0 bytes)")]


def test_a_photograph_of_something_else_gets_a_problem_not_a_grade(photos: Path, tmp_path: Path) -> None:
    """A DR grade of a cat means nothing: without a fundus it is a problem row, unless the check is off."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.jpg")
    files = [find_photographs([photos])[0], str(tmp_path / "cat.jpg")]
    checked = collate_photographs(list(PhotographFiles(files, 64, 95, eval_transform(32, MEAN, STD))))
    assert checked.indices.tolist() == [0]
    assert [i for i, _ in checked.problems] == [1]
    assert checked.problems[0][1].startswith("does not look like a fundus photograph: its corners are bright")
    assert checked.problems[0][1].endswith("--no-fundus-check grades it")
    unchecked = PhotographFiles(files, 64, 95, eval_transform(32, MEAN, STD), check_fundus=False)
    assert collate_photographs(list(unchecked)).indices.tolist() == [0, 1]
