"""Decoding the encoded images in shards (JPEG views, PNG saliency maps), in one place.

torch and torchvision are imported where a batch is decoded on a device, not at the top: packing shards
decodes with OpenCV alone, and importing torch would add about 3 s to every `ssit-dist shard` process
and each of its workers."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which is not a dependency (yet):
# until it is, this one warning is silenced where decode_jpegs calls them, and nowhere else.
_TORCHVISION_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def decode_bgr(data: bytes) -> np.ndarray | None:
    """An encoded colour image as an (H, W, 3) uint8 BGR array (OpenCV's order), or None where the
    bytes do not decode."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def decode_gray(data: bytes) -> np.ndarray | None:
    """An encoded single-channel image (a saliency map PNG) as (H, W), or None where it does not decode."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def _decode_rgb(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
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
        images: list[torch.Tensor | None] = list(_decode_rgb(list(data), device))
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
        return _decode_rgb([jpeg], torch.device("cpu"))[0].to(device)
    except RuntimeError as e:
        log.warning("JPEG %s does not decode (%s); a black image stands in for it", key, e)
        return None
