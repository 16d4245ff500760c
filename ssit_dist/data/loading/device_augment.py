"""SSiT's pair augmentation on batches on the training device (`data.augment_on: gpu`).

At about 100 pairs/s per CPU core, the per-photograph OpenCV path (data/loading/augment.py) needs 30-60 cores to
feed one GPU. Here the loader workers only read the tar bytes, decode the 8-bit saliency PNG and draw
each view's parameters (`draw_view`, the same draws as the CPU path for the same seed), and hand the batch
over as one buffer (`EncodedBatch`); the device then decodes the JPEGs as one batch (nvjpeg on CUDA) and
applies the recipe to the whole batch:
- geometry: each sample's crop, resize, rotation and flips composed into one affine map, and image and
  saliency map warped together by one `grid_sample` (bilinear). Large crops are first box-filtered by
  the integer factor the CPU path shrinks them by, so they do not alias;
- colour jitter in each sample's drawn order, greyscale, Gaussian blur (a grouped separable convolution
  with each sample's sigma, OpenCV's kernel size and reflect-101 border) and solarisation, each on the
  samples that drew it, on float values clamped to [0, 255] after every op as uint8 saturates;
- the rotation's corners black in image and map alike, as the CPU path leaves them; normalisation.
Where it differs from the CPU path, by construction: one bilinear warp instead of a resize and a
nearest-neighbour rotation; no rounding to integers between ops; photometric ops after the warp (they
are per pixel, except the blur near the rotation's corners and the contrast mean, taken over the
visible pixels). Everything per sample that decides which samples an op touches is read from the
parameters on the host, so nothing here waits for the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from ssit_dist.data.decode import decode_jpegs

LUMA = (0.299, 0.587, 0.114)  # R, G, B weights of OpenCV's (and torchvision's) greyscale
BLUR_TAPS = 13  # OpenCV's 8-bit kernel size at the largest sigma, 2: round(2 * 6 + 1) | 1

# Columns of a ViewParams row (data/loading/augment.py).
TOP, LEFT, HEIGHT, WIDTH, ORDER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4, 8, 9, 10, 11
GREY, SIGMA, SOLARIZE, ANGLE, HFLIP, VFLIP = 12, 13, 14, 15, 16, 17


class EncodedBatch(NamedTuple):
    """What the loader workers hand over on the GPU path: the batch's bytes in one buffer. A tensor crosses
    from a worker to the trainer as a shared-memory segment of its own with a file-descriptor handoff, so a
    list of one tensor per JPEG costs the trainer one handoff per sample (bench/perf/pretrain.py measures
    both). The JPEGs and maps are views into the buffer, made where they are used, after the loader has
    pinned it (data.pin_memory): the decoder reads the JPEGs in place, and the maps copy to the device
    asynchronously."""

    data: torch.Tensor  # 1-D uint8: the JPEGs end to end, then the saliency maps (B, 1, H, W)
    ends: np.ndarray  # (B,) int64: where each JPEG ends in `data`; the maps start at ends[-1]
    map_size: tuple[int, int]  # (H, W) of the saliency maps
    view1: np.ndarray  # (B, ViewParams.ROW) float64, the first view's parameters: host-side numbers, not a
    view2: np.ndarray  # tensor, so that nothing decided from them ever waits for a device
    names: list[str]  # url:key of each sample, for messages

    def jpegs(self) -> list[torch.Tensor]:
        """Each sample's encoded JPEG, a 1-D view into `data` (no copy)."""
        starts = np.concatenate([[0], self.ends[:-1]])
        return [self.data[int(a) : int(b)] for a, b in zip(starts, self.ends, strict=True)]

    def saliency(self) -> torch.Tensor:
        """The (B, 1, H, W) uint8 saliency maps, a view into `data`."""
        return self.data[int(self.ends[-1]) :].view(len(self.ends), 1, *self.map_size)


def collate_encoded(samples: Sequence[tuple[bytes, np.ndarray, np.ndarray, np.ndarray, str]]) -> EncodedBatch:
    """Loader samples (JPEG bytes, (H, W) uint8 saliency map, view 1's and view 2's parameter rows, name)
    -> one EncodedBatch. In a loader worker the buffer is made in shared memory from the start, as torch's
    own collate does, so that handing it over copies nothing more."""
    jpegs, maps, view1, view2, names = zip(*samples, strict=True)
    sizes = sorted({m.shape for m in maps})
    if len(sizes) > 1:
        raise ValueError(f"saliency maps of different sizes (H, W) in one batch: {sizes}; pack the shards at one size")
    lengths = np.array([len(j) for j in jpegs], dtype=np.int64)
    ends = np.cumsum(lengths)
    data = _uint8_buffer(int(ends[-1]) + sum(m.size for m in maps))
    out = data.numpy()
    for jpeg, start, end in zip(jpegs, ends - lengths, ends, strict=True):
        out[start:end] = np.frombuffer(jpeg, np.uint8)  # straight into the buffer: no joined copy first
    np.stack(maps, out=out[ends[-1] :].reshape(len(maps), *sizes[0]))
    return EncodedBatch(data, ends, sizes[0], np.stack(view1), np.stack(view2), list(names))


def _uint8_buffer(size: int) -> torch.Tensor:
    """An uninitialised 1-D uint8 tensor; in a loader worker, in shared memory (torch would otherwise copy it
    there to send it)."""
    if get_worker_info() is None:
        return torch.empty(size, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))


class DevicePairAugment:
    """EncodedBatch -> (x1, x2, s1, s2) on `device`, as PairAugment's output: normalised RGB float32
    views (B, 3, S, S) and saliency maps (B, 1, S, S) in [0, 1]."""

    def __init__(self, size: int, mean: list[float], std: list[float]):
        self.size = size
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1)

    def __call__(
        self, batch: EncodedBatch, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = batch.saliency().to(device, non_blocking=True)
        images = decode_jpegs(batch.jpegs(), device, batch.names)
        if images.shape[-2:] != maps.shape[-2:]:
            raise ValueError(
                f"JPEGs of {tuple(images.shape[-2:])} px with saliency maps of {tuple(maps.shape[-2:])} px "
                f"({batch.names[0]}, ...): the shards were not written by `ssit-dist shard`; repack them"
            )
        pixels = torch.cat([images, maps], 1)  # image and map travel through one warp
        x1, s1 = self.view(pixels, batch.view1)
        x2, s2 = self.view(pixels, batch.view2)
        return x1, x2, s1, s2

    def view(self, pixels: torch.Tensor, params: np.ndarray) -> tuple[torch.Tensor, ...]:
        """One view of each sample: `pixels` (B, 4, H, W) uint8, RGB and saliency map, `params` (B, ROW)
        float64."""
        warped, visible = warp(pixels, params, self.size)
        x, s = warped[:, :3], warped[:, 3:]
        device = x.device
        for slot in range(4):  # colour jitter, each sample in its own order
            for op, column in enumerate((BRIGHTNESS, CONTRAST, SATURATION, HUE)):
                drew = params[:, ORDER + slot] == op
                if (rows := _rows(drew, device)) is not None:
                    factor = _to(params[drew, column], device)
                    x[rows] = JITTER[op](x[rows], factor.view(-1, 1, 1, 1), visible[rows])
        if (rows := _rows(params[:, GREY] > 0, device)) is not None:
            x[rows] = _grey(x[rows]).expand(-1, 3, -1, -1)
        if (rows := _rows(params[:, SIGMA] > 0, device)) is not None:
            x[rows] = gaussian_blur(x[rows], params[params[:, SIGMA] > 0, SIGMA])
        if (rows := _rows(params[:, SOLARIZE] > 0, device)) is not None:
            x[rows] = torch.where(x[rows] >= 128, 255 - x[rows], x[rows])
        x, s = x * visible, s * visible
        if self.scale.device != device:  # once: a copy from pageable host memory makes the host wait
            self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return x * self.scale + self.shift, s / 255


def _rows(mask: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """The indices where the host-side `mask` holds, on `device`; None where it holds nowhere."""
    rows = np.flatnonzero(mask)
    return torch.from_numpy(rows).to(device, non_blocking=True) if len(rows) else None


def _to(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(device, non_blocking=True)


def warp(pixels: torch.Tensor, params: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop, resize to `size`, rotate and flip each sample of `pixels` (B, C, H, W) uint8 in one bilinear
    warp. Returns the (B, C, size, size) float views and the (B, 1, size, size) mask of pixels inside the
    rotated crop (the CPU path's nearest-neighbour rotation leaves the rest black)."""
    device = pixels.device
    to_crop = _view_to_crop(params, size)  # (B, 3, 3): output pixel -> pixel of the resized, unrotated crop
    out = torch.empty(len(params), pixels.shape[1], size, size, device=device)
    # The CPU path shrinks a crop by the integer factor min(h, w) // size with INTER_AREA first: a box filter
    # of that factor, then bilinear sampling of the filtered image, so that large crops do not alias.
    factors = np.maximum(np.minimum(params[:, HEIGHT], params[:, WIDTH]) // size, 1).astype(int)
    for factor in np.unique(factors):
        picked = np.flatnonzero(factors == factor)
        rows = torch.from_numpy(picked).to(device, non_blocking=True)
        source = pixels[rows].float()
        if factor > 1:
            source = F.avg_pool2d(source, int(factor))
        crop_to_source = np.zeros((len(picked), 3, 3))
        crop_to_source[:, 2, 2] = 1
        for axis, start, extent in ((0, LEFT, WIDTH), (1, TOP, HEIGHT)):
            # Pixel centres: crop x -> image x = left + (x + 0.5) w / size - 0.5; pooled q = (x - (f - 1) / 2) / f.
            crop_to_source[:, axis, axis] = params[picked, extent] / size / factor
            centre = params[picked, start] + 0.5 * params[picked, extent] / size - 0.5
            crop_to_source[:, axis, 2] = (centre - (factor - 1) / 2) / factor
        height, width = source.shape[-2:]
        theta = _pixels_to_normalised(width, height) @ crop_to_source @ to_crop[picked] @ _normalised_to_pixels(size)
        grid = F.affine_grid(_to(theta[:, :2], device), [len(picked), 1, size, size], align_corners=False)
        # Border padding: at the photograph's edge a crop's last pixels repeat, as OpenCV's resize does.
        out[rows] = F.grid_sample(source, grid, "bilinear", "border", align_corners=False)
    # Visible: the rotated pixel's source lies in the crop, [-0.5, size - 0.5) in both coordinates.
    view_to_crop = (to_crop @ _normalised_to_pixels(size))[:, :2]
    in_crop = F.affine_grid(_to(view_to_crop, device), [len(params), 1, size, size], align_corners=False)
    visible = ((in_crop >= -0.5) & (in_crop < size - 0.5)).all(-1).unsqueeze(1)
    return out, visible.float()


def _view_to_crop(params: np.ndarray, size: int) -> np.ndarray:
    """(B, 3, 3) maps from a view's pixel to the pixel of the resized crop it shows: the flips undone,
    then the rotation (OpenCV's getRotationMatrix2D about ((size - 1) / 2, ...), counter-clockwise)."""
    n, centre = len(params), (size - 1) / 2
    flip = np.tile(np.eye(3), (n, 1, 1))
    for axis, column in ((0, HFLIP), (1, VFLIP)):
        flipped = params[:, column] > 0
        flip[flipped, axis, axis] = -1
        flip[flipped, axis, 2] = size - 1
    angle = np.radians(np.nan_to_num(params[:, ANGLE], nan=0.0))
    cos, sin = np.cos(angle), np.sin(angle)
    unrotate = np.tile(np.eye(3), (n, 1, 1))  # the inverse of OpenCV's [[c, s], [-s, c]] about the centre
    unrotate[:, 0, 0], unrotate[:, 0, 1], unrotate[:, 1, 0], unrotate[:, 1, 1] = cos, -sin, sin, cos
    unrotate[:, 0, 2] = centre - cos * centre + sin * centre
    unrotate[:, 1, 2] = centre - sin * centre - cos * centre
    return unrotate @ flip


def _normalised_to_pixels(size: int) -> np.ndarray:
    """affine_grid's output coordinates (align_corners=False) to pixel indices of a size x size view."""
    return np.array([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]])


def _pixels_to_normalised(width: int, height: int) -> np.ndarray:
    return np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _brightness(x: torch.Tensor, factor: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    return (x * factor).clamp(0, 255)


def _contrast(x: torch.Tensor, factor: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Blend with the mean grey level, over the pixels the CPU path had before its rotation."""
    mean = (_grey(x) * visible).sum((1, 2, 3), keepdim=True) / visible.sum((1, 2, 3), keepdim=True).clamp(min=1)
    return (x * factor + (1 - factor) * mean).clamp(0, 255)


def _saturation(x: torch.Tensor, factor: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    return (x * factor + (1 - factor) * _grey(x)).clamp(0, 255)


def _hue(x: torch.Tensor, shift: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns: RGB -> HSV, shift, back (HSV -> RGB by the k = (n + 6h) mod 6 form)."""
    value, _ = x.max(1, keepdim=True)
    low, _ = x.min(1, keepdim=True)
    delta = value - low
    r, g, b = x.unbind(1)
    safe = delta.squeeze(1).clamp(min=1e-12)
    hue = torch.where(
        value.squeeze(1) == r,
        (g - b) / safe,
        torch.where(value.squeeze(1) == g, 2 + (b - r) / safe, 4 + (r - g) / safe),
    )
    hue = torch.where(delta.squeeze(1) > 0, hue / 6, torch.zeros_like(hue)).unsqueeze(1)
    hue = torch.remainder(hue + shift, 1.0)
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-12), torch.zeros_like(value))
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = torch.remainder(n + 6 * hue, 6)
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.cat(channels, 1).clamp(0, 255)


JITTER = (_brightness, _contrast, _saturation, _hue)


def gaussian_blur(x: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Each sample of `x` (n, C, H, W) blurred with its own sigma (n host numbers): OpenCV's 8-bit
    kernel size round(6 sigma + 1) | 1, taps beyond it zero, reflect-101 border, one grouped
    convolution per direction."""
    n, c = x.shape[:2]
    taps = np.arange(BLUR_TAPS) - BLUR_TAPS // 2
    sigmas = np.asarray(sigmas, np.float64).reshape(-1, 1)
    radius = ((np.round(sigmas * 6 + 1).astype(int) | 1) - 1) // 2
    kernel = np.exp(-(taps**2) / (2 * sigmas**2)) * (np.abs(taps) <= radius)
    weights = _to(np.repeat(kernel / kernel.sum(1, keepdims=True), c, 0), x.device)  # (n * C, taps)
    pad = BLUR_TAPS // 2
    flat = F.pad(x.reshape(1, n * c, *x.shape[-2:]), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weights.view(n * c, 1, 1, BLUR_TAPS), groups=n * c)
    flat = F.conv2d(flat, weights.view(n * c, 1, BLUR_TAPS, 1), groups=n * c)
    return flat.view_as(x)
