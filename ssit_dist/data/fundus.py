"""Fundus photograph geometry: decode to RGB, crop to the disc, resize, circle masks.

The crop reproduces the preprocessing the SSiT authors used (itself from the Kaggle DR 2015 winning
solution): blur, take the brightest value of the left and right 1/32 strips as the background level,
box the pixels brighter than background + 10, and fall back to a centred square where the photograph is
not clearly wider than tall or the box is implausibly small.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageFilter, UnidentifiedImageError

# A truncated JPEG must be an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Fundus cameras write up to ~24 MP; anything far above that is a broken or hostile file.
Image.MAX_IMAGE_PIXELS = 200_000_000

Box = tuple[int, int, int, int]  # left, upper, right, lower (PIL convention)


class BadImage(ValueError):
    """An input that cannot be used as a fundus photograph; the message is the one-line reason."""


@dataclass(frozen=True)
class Cropped:
    image: np.ndarray  # (size, size, 3) uint8 RGB
    box: Box  # crop box in the original image
    original_size: tuple[int, int]  # width, height
    original_mode: str  # PIL mode before conversion to RGB


def decode_rgb(data: bytes) -> tuple[Image.Image, str]:
    """Decode image bytes to an 8-bit RGB PIL image, converting any other mode.

    Greyscale, RGBA, palette, 16-bit and CMYK inputs are converted; empty, truncated and non-image
    data raise BadImage with the reason.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        mode = img.mode
        img.load()
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode: {e}") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"refused: {e}") from None
    if img.width < 8 or img.height < 8:
        raise BadImage(f"too small ({img.width}x{img.height} px)")
    return _to_rgb(img), mode


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the used range to 8 bits rather than clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max()
        arr = arr * (255.0 / hi) if hi > 0 else arr
        img = Image.fromarray(np.round(arr).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black: fundus backgrounds are black, transparency means "not retina".
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _square_box(width: int, height: int) -> Box:
    left = max((width - height) // 2, 0)
    right = min(width - (width - height) // 2, width)
    return left, 0, right, height


def disc_box(img: Image.Image) -> Box:
    """The crop box around the fundus disc (reference semantics, see the module docstring)."""
    width, height = img.size
    if width <= 1.2 * height:
        return _square_box(width, height)
    blurred = np.asarray(img.filter(ImageFilter.BLUR))
    strip = width // 32
    background = np.maximum(blurred[:, :strip].max(axis=(0, 1)), blurred[:, -strip:].max(axis=(0, 1))).astype(np.int32)
    foreground = (blurred > background + 10).any(axis=2)
    rows, cols = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
    if rows.size == 0:
        return _square_box(width, height)
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    if box[2] - box[0] < 0.8 * height or box[3] - box[1] < 0.8 * height:
        return _square_box(width, height)
    return box


def crop_to_disc(data: bytes, size: int) -> Cropped:
    """Decode, crop to the fundus disc and resize to (size, size) with Lanczos."""
    img, mode = decode_rgb(data)
    box = disc_box(img)
    resized = img.crop(box).resize((size, size), Image.Resampling.LANCZOS)
    return Cropped(np.asarray(resized), box, img.size, mode)


def circle_mask(size: int, radius: float) -> np.ndarray:
    """(size, size) float64 mask, 1 inside a filled circle centred on the image, as OpenCV draws it."""
    mask = np.zeros((size, size), np.float64)
    cv2.circle(mask, (size // 2, size // 2), int(radius), 1.0, thickness=-1)
    return mask
