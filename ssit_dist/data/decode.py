"""Decoding, in one place: input photographs of any format as they are packed (PIL), the images in
shards (JPEG views, PNG saliency maps; OpenCV), and batches of JPEGs on the training device (torchvision).

torch and torchvision are imported where a batch is decoded on a device, not at the top: packing shards
decodes with PIL and OpenCV alone, and importing torch would add about 3 s to every `ssit-dist shard` process
and each of its workers."""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# A truncated JPEG must be an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Fundus cameras write up to ~24 MP; anything far above that is a broken or hostile file.
Image.MAX_IMAGE_PIXELS = 200_000_000

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which is not a dependency (yet):
# until it is, this one warning is silenced where decode_jpegs calls them, and nowhere else.
_TORCHVISION_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


class BadImage(ValueError):
    """An input that cannot be used as a fundus photograph; the message is the one-line reason."""


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


def decode_bgr(data: bytes) -> np.ndarray | None:
    """An encoded colour image as an (H, W, 3) uint8 BGR array (OpenCV's order), or None where the
    bytes do not decode."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def decode_gray(data: bytes) -> np.ndarray | None:
    """An encoded single-channel image (a saliency map PNG) as (H, W), or None where it does not decode."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def _decode_jpeg_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHVISION_CODEC_DEPRECATION, category=DeprecationWarning)
        if device.type != "cuda":
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        # torchvision allocates the images on the current stream but nvjpeg writes them from a stream of
        # its own, not ordered after the work queued before: memory that queued kernels still use (freed
        # by Python, handed out again by the caching allocator) would be overwritten under them (seen on
        # an H200 as garbage indices in the next augmentation). Decoded under a stream of its own, the
        # images come from memory only ever used by the decoder and, recorded, by the current stream.
        current = torch.cuda.current_stream(device)
        with torch.cuda.stream(_decode_stream(device)):
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        current.wait_stream(_decode_stream(device))
        for image in images:
            image.record_stream(current)
        return images


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    import torch

    return torch.cuda.Stream(device)


def decode_jpegs(
    data: Sequence[torch.Tensor], device: torch.device | str, keys: Sequence[str] | None = None
) -> torch.Tensor:
    """JPEGs (1-D uint8 CPU tensors of their bytes) as one (B, 3, H, W) uint8 RGB batch on `device`:
    one batched nvjpeg call on CUDA, libjpeg on the CPU.

    The loader workers check only each JPEG's start and end markers (a truncated file, which nvjpeg would
    decode to garbage without a word, fails there), and a batched decode fails whole on one bad image: a
    failed batch is decoded again image by image with libjpeg, and an image that still fails is logged
    (with its key from `keys`) and comes back black, the batch keeping its size, since every rank must
    step on equally large batches. Images of different sizes raise ValueError naming them: the shards
    are packed at one size."""
    import torch

    device = torch.device(device)
    try:
        images: list[torch.Tensor | None] = list(_decode_jpeg_batch(list(data), device))
    except RuntimeError as e:
        log.warning("a batch of %d JPEGs did not decode together (%s); decoding them one by one", len(data), e)
        images = [_decode_one(jpeg, device, keys[i] if keys else f"#{i}") for i, jpeg in enumerate(data)]
    decoded = [image for image in images if image is not None]
    if not decoded:
        raise ValueError(f"none of the {len(data)} JPEGs of the batch decode")
    sizes = sorted({tuple(image.shape[1:]) for image in decoded})
    if len(sizes) > 1:
        raise ValueError(f"JPEGs of different sizes (H, W) in one batch: {sizes}; pack the shards at one size")
    return torch.stack([torch.zeros_like(decoded[0]) if image is None else image for image in images])


def _decode_one(jpeg: torch.Tensor, device: torch.device, key: str) -> torch.Tensor | None:
    """One JPEG decoded by libjpeg and moved to `device`, or None (logged) where it does not decode."""
    import torch

    try:
        return _decode_jpeg_batch([jpeg], torch.device("cpu"))[0].to(device)
    except RuntimeError as e:
        log.warning("JPEG %s does not decode (%s); a black image stands in for it", key, e)
        return None
