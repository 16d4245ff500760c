"""Decoding, mode conversion and the disc crop, on the CC0 retina photograph."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ssit_dist.data.decode import BadImage, decode_rgb
from ssit_dist.data.packing.fundus import crop_to_disc, disc_box, fundus_doubt


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_wide_camera_frame_is_cropped_to_the_disc(retina: Image.Image) -> None:
    small = retina.resize((400, 400))
    frame = Image.new("RGB", (700, 400))
    frame.paste(small, (150, 0))
    left, upper, right, lower = disc_box(frame)
    # The disc occupies x 150..550; the crop must hug it, not take the centred square (150..550 too,
    # so shift the disc off-centre to tell the two apart).
    frame = Image.new("RGB", (700, 400))
    frame.paste(small, (60, 0))
    left, upper, right, lower = disc_box(frame)
    assert abs(left - 60) <= 12 and abs(right - 460) <= 12, (left, right)
    assert upper <= 12 and lower >= 388


def test_square_photograph_keeps_the_centred_square(retina: Image.Image) -> None:
    assert disc_box(retina) == (0, 0, retina.width, retina.height)
    tall = Image.new("RGB", (300, 400))
    assert disc_box(tall) == (0, 0, 300, 400)


def test_dark_wide_image_falls_back_to_the_centred_square() -> None:
    black = Image.new("RGB", (800, 400))
    assert disc_box(black) == (200, 0, 600, 400)


def test_crop_resizes_and_reports_provenance(retina: Image.Image) -> None:
    out = crop_to_disc(encode(retina, "JPEG", quality=90), 128)
    assert out.image.shape == (128, 128, 3) and out.image.dtype == np.uint8
    assert out.original_size == retina.size and out.original_mode == "RGB"


def test_a_crop_smaller_than_the_size_is_not_enlarged_where_asked(retina: Image.Image) -> None:
    small = encode(retina.resize((200, 200)), "PNG")
    assert crop_to_disc(small, 512, enlarge=False).image.shape == (200, 200, 3)
    assert np.array_equal(crop_to_disc(small, 512, enlarge=False).image, np.asarray(Image.open(io.BytesIO(small))))
    assert crop_to_disc(small, 512).image.shape == (512, 512, 3)  # enlarged: the default of other callers
    large = encode(retina, "JPEG", quality=90)  # 1411 px: shrunk to the size either way
    assert crop_to_disc(large, 512, enlarge=False).image.shape == crop_to_disc(large, 512).image.shape == (512, 512, 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_other_modes_are_converted_not_skipped(retina: Image.Image, mode: str) -> None:
    small = retina.resize((96, 96))
    if mode == "I;16":
        arr = (np.asarray(small.convert("L"), np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)
        data = encode(img, "PNG")
    else:
        data = encode(small.convert(mode), "TIFF" if mode == "CMYK" else "PNG")
    rgb, original_mode = decode_rgb(data)
    assert rgb.mode == "RGB" and rgb.size == (96, 96)
    assert original_mode.startswith(mode[0])
    # The anatomy survives the conversion: bright disc, dark background.
    arr = np.asarray(rgb).astype(float).mean(axis=2)
    assert arr[40:56, 40:56].mean() > arr[:4, :4].mean() + 20


def test_sixteen_bit_uses_the_full_eight_bit_range() -> None:
    arr = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data in 16 bits
    rgb, _ = decode_rgb(encode(Image.fromarray(arr), "PNG"))
    assert np.asarray(rgb).max() == 255


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"patient notes, not a photograph\n", "not an image"),
    ],
)
def test_bad_bytes_raise_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage, match=reason):
        decode_rgb(data)


def test_truncated_jpeg_is_an_error_not_a_grey_image(retina: Image.Image) -> None:
    data = encode(retina, "JPEG", quality=90)
    with pytest.raises(BadImage, match="cannot decode"):
        decode_rgb(data[: len(data) // 2])


@pytest.mark.slow  # 4,038 photographs cropped: about 15 s
def test_every_real_fundus_photograph_looks_like_one(retina: Image.Image) -> None:
    """fundus_doubt must never refuse a real photograph: the CC0 retina as a camera frame and each of the
    real photographs of ../shared (graded, graded_natural and unlabelled, 4,038), cropped as packing crops."""
    from conftest import SHARED

    assert fundus_doubt(crop_to_disc(encode(retina, "JPEG", quality=92), 256).image) is None
    folders = [SHARED / "data" / "fundus" / name for name in ("graded", "graded_natural", "unlabelled")]
    photographs = [p for folder in folders if folder.is_dir() for p in sorted(folder.glob("*.jpeg"))]
    if not photographs:
        pytest.skip(f"real fundus photographs not found under {SHARED} (../shared is absent here)")
    doubted = {p.name: fundus_doubt(crop_to_disc(p.read_bytes(), 128).image) for p in photographs}
    # Two of unlabelled/ show no fundus (looked at): a black frame crossed by a stripe of noise, and an
    # over-exposed close-up without a disc. Every other photograph passes.
    assert {name for name, why in doubted.items() if why} <= {"15222_left.jpeg", "1557_left.jpeg"}


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("astronaut", "its corners are bright"),
        ("coffee", "its corners are bright"),
        ("chelsea", "its corners are bright"),
        ("camera", "its corners are bright"),
        ("rocket", "its corners are bright"),
        ("hubble_deep_field", "no bright disc on a dark field"),
    ],
)
def test_photographs_of_other_things_are_doubted(name: str, reason: str) -> None:
    """scikit-image's photographs of other things (a person, a cup, a cat, a camera man, a rocket, the night
    sky), cropped as a fundus photograph would be."""
    from skimage import data

    image = Image.fromarray(getattr(data, name)())
    doubt = fundus_doubt(crop_to_disc(encode(image, "PNG"), 128).image)
    assert doubt is not None and doubt.startswith(reason)
