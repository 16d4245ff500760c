"""SSiT's pair augmentation applied to a whole batch of decoded images on any device (`augment_on: gpu`).

The loader workers of this path only read the shards, decode the small saliency PNG and draw each view's
parameters with the CPU path's own `draw_view` (so a seed gives the same draws on both paths, and resuming
stays exact); the JPEGs are decoded as one batch on the device (`decode.decode_jpegs`) and everything
else happens here on batched tensors, one kernel sequence for the whole batch:
- geometry: each sample's crop, resize, rotation and flips composed into one affine map, the image and
  its saliency map warped together by one bilinear `grid_sample`. Crops larger than twice the view are
  first box-filtered by the integer factor the CPU path shrinks them by, so they do not alias;
- colour jitter in each sample's drawn order, greyscale, Gaussian blur (a grouped separable convolution
  with each sample's sigma, OpenCV's kernel size and border) and solarisation, each switched per sample
  by masks and factors, on float values clamped to [0, 255] after every op as the uint8 CPU path
  saturates;
- the pixels the rotation brings in from outside the crop black in image and map, as on the CPU path.
Where it differs from the CPU path, by construction: one bilinear warp where the CPU path resizes
bilinearly and then rotates by nearest neighbour; no rounding between ops and a continuous hue shift
(OpenCV's is in 1/256 turns); the photometric ops run after the warp: the same per pixel, but the blur near
the rotated crop's edges sees the photograph beyond the crop instead of its reflection, and the contrast
mean is taken over the visible pixels, which are the CPU path's pixels before its rotation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssit_dist.data.augment import BLUR_SIGMA, ViewParams, ViewRows, unpack_rows

Rows = torch.Tensor | np.ndarray  # (B, ViewParams.ROW) float64, as the loader collates them
LUMA = (0.299, 0.587, 0.114)  # R, G, B weights of OpenCV's greyscale
BLUR_TAPS = round(BLUR_SIGMA[1] * 6 + 1) | 1  # OpenCV's 8-bit kernel size at the largest sigma


class BatchedPairAugment:
    """Decoded uint8 RGB images (B, 3, H, W) and saliency maps (B, 1, H, W) on one device, with both
    views' parameter rows (B, ViewParams.ROW) -> x1, x2 (B, 3, S, S) normalised RGB and s1, s2
    (B, 1, S, S) in [0, 1], float32, as PairAugment gives them sample by sample.

    Pass the rows on the host (tensors or arrays), as the loader yields them: which samples share a shrink factor is read
    from them there, so nothing waits for the device (rows on the device cost one synchronisation)."""

    def __init__(self, size: int, mean: list[float], std: list[float]):
        if size <= BLUR_TAPS // 2:
            raise ValueError(
                f"views of {size} px are too small for the blur's reflected border: at least {BLUR_TAPS // 2 + 1}"
            )
        self.size = size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(
        self, images: torch.Tensor, saliency: torch.Tensor, view1: Rows, view2: Rows
    ) -> tuple[torch.Tensor, ...]:
        view1, view2 = torch.as_tensor(view1).cpu(), torch.as_tensor(view2).cpu()
        _check_batch(images, saliency, (view1, view2))
        pixels = torch.cat([images, saliency], 1)  # one warp moves image and map alike
        x1, s1 = self.view(pixels, view1)
        x2, s2 = self.view(pixels, view2)
        return x1, x2, s1, s2

    def view(self, pixels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One view of each sample of `pixels` (B, 4, H, W) uint8, RGB and saliency map stacked, with
        host-side parameter `rows`: (B, 3, S, S) normalised RGB and (B, 1, S, S) saliency."""
        params = unpack_rows(rows.to(pixels.device, non_blocking=True))
        to_crop = view_to_crop(params, self.size)
        warped = warp(pixels, params, to_crop, shrink_groups(rows, self.size), self.size)
        visible = visible_mask(to_crop, self.size)
        image = photometric(warped[:, :3], params, visible) * visible
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (image / 255 - mean) / std, warped[:, 3:] * visible / 255


def _check_batch(images: torch.Tensor, saliency: torch.Tensor, views: tuple[torch.Tensor, ...]) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if saliency.shape != (images.shape[0], 1, *images.shape[2:]) or saliency.dtype != torch.uint8:
        raise ValueError(
            f"saliency maps {saliency.dtype} {tuple(saliency.shape)} do not match images {tuple(images.shape)}: "
            "expected uint8 (B, 1, H, W) of the images' sizes"
        )
    height, width = images.shape[2:]
    for rows in views:
        if rows.shape != (images.shape[0], ViewParams.ROW):
            raise ValueError(f"expected view parameter rows ({images.shape[0]}, {ViewParams.ROW}), got {rows.shape}")
        params = unpack_rows(rows)
        if not ((params.top + params.height <= height) & (params.left + params.width <= width)).all():
            raise ValueError(f"view parameters with crops beyond the {height} x {width} images: drawn for other sizes")


def shrink_groups(rows: torch.Tensor, size: int) -> list[tuple[int, torch.Tensor]]:
    """(factor, sample indices) per integer shrink factor min(h, w) // size (1 where below 2) of the
    crops in host-side `rows`, the CPU path's INTER_AREA step: a handful of groups, each one warp."""
    params = unpack_rows(rows)
    factors = (torch.minimum(params.height, params.width) // size).clamp(min=1).long()
    return [(factor, (factors == factor).nonzero().flatten()) for factor in factors.unique().tolist()]


def _affine(*entries: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) homogeneous maps (x, y) -> (xx x + xy y + x0, yx x + yy y + y0) from the six entries
    xx, xy, x0, yx, yy, y0, each (n,) or a number, on `like`'s device and dtype."""
    rows = [e if isinstance(e, torch.Tensor) else torch.full_like(like, e) for e in (*entries, 0.0, 0.0, 1.0)]
    return torch.stack(rows, 1).view(-1, 3, 3)


def _grid_to_pixels(like: torch.Tensor, size: int) -> torch.Tensor:
    """affine_grid's output coordinates (align_corners=False, -1 and 1 the outer pixel edges) to pixel
    centres 0 .. size - 1 of a size x size view, one per entry of `like`."""
    return _affine(size / 2, 0.0, (size - 1) / 2, 0.0, size / 2, (size - 1) / 2, like=like)


def _pixels_to_grid(like: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel centres of a height x width image to grid_sample's coordinates (align_corners=False)."""
    return _affine(2 / width, 0.0, 1 / width - 1, 0.0, 2 / height, 1 / height - 1, like=like)


def view_to_crop(params: ViewRows, size: int) -> torch.Tensor:
    """(B, 3, 3) float64 maps from a view's pixel to the pixel of the resized (size x size) crop that
    it shows: the flips undone, then the rotation, inverse of OpenCV's getRotationMatrix2D(centre
    ((size - 1) / 2, (size - 1) / 2), angle) as the CPU path rotates."""
    like = params.top
    hflip, vflip = params.hflip.to(like.dtype), params.vflip.to(like.dtype)
    unflip = _affine(1 - 2 * hflip, 0.0, hflip * (size - 1), 0.0, 1 - 2 * vflip, vflip * (size - 1), like=like)
    angle = torch.deg2rad(torch.nan_to_num(params.angle, nan=0.0))
    cos, sin, centre = torch.cos(angle), torch.sin(angle), (size - 1) / 2
    # OpenCV rotates by [[cos, sin], [-sin, cos]] about the centre; its inverse is the transpose.
    unrotate = _affine(cos, -sin, centre * (1 - cos + sin), sin, cos, centre * (1 - sin - cos), like=like)
    return unrotate @ unflip


def _crop_to_source(params: ViewRows, picked: torch.Tensor, factor: int, size: int) -> torch.Tensor:
    """(n, 3, 3) maps from a pixel of the resized crop to the pixel of the photograph shrunk by `factor`
    that it samples: pixel centres x -> left + (x + 0.5) w / size - 0.5 (OpenCV's resize), and a full
    resolution pixel X lies at (X + 0.5) / factor - 0.5 in the box-filtered image."""
    top, left = params.top[picked], params.left[picked]
    height, width = params.height[picked], params.width[picked]
    return _affine(
        width / (size * factor),
        0.0,
        (left + 0.5 * width / size) / factor - 0.5,
        0.0,
        height / (size * factor),
        (top + 0.5 * height / size) / factor - 0.5,
        like=top,
    )


def warp(
    pixels: torch.Tensor, params: ViewRows, to_crop: torch.Tensor, groups: list[tuple[int, torch.Tensor]], size: int
) -> torch.Tensor:
    """Each sample of `pixels` (B, C, H, W) uint8 cropped, resized to `size`, rotated and flipped in one
    bilinear warp: (B, C, size, size) float32 on 0-255. Sampling is clamped to the photograph's edge
    (OpenCV's resize replicates it); what the rotation brings in from outside the crop is for
    `visible_mask` to blank."""
    height, width = pixels.shape[2:]
    out = torch.empty(len(pixels), pixels.shape[1], size, size, device=pixels.device, dtype=torch.float32)
    for factor, picked_host in groups:
        picked = picked_host.to(pixels.device, non_blocking=True)
        source = pixels.index_select(0, picked).float()
        if factor > 1:
            source = F.avg_pool2d(source, factor)  # the CPU path's integer INTER_AREA shrink
        to_grid = _pixels_to_grid(params.top[picked], height // factor, width // factor)
        to_source = _crop_to_source(params, picked, factor, size)
        theta = to_grid @ to_source @ to_crop[picked] @ _grid_to_pixels(params.top[picked], size)
        grid = F.affine_grid(theta[:, :2].float(), [len(picked), pixels.shape[1], size, size], align_corners=False)
        warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out.index_copy_(0, picked, warped)
    return out


def visible_mask(to_crop: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, size, size) float32, 1 where the view shows a pixel of the crop and 0 in the corners a
    rotation brings in from outside it: the CPU path's nearest-neighbour rotation shows crop pixel
    round(x), so x in [-0.5, size - 0.5) in both coordinates."""
    like = to_crop[:, 0, 0]
    theta = _pixels_to_grid(like, size, size) @ to_crop @ _grid_to_pixels(like, size)
    grid = F.affine_grid(theta[:, :2].float(), [len(to_crop), 1, size, size], align_corners=False)
    return ((grid >= -1) & (grid < 1)).all(-1).unsqueeze(1).float()


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) grey of (B, 3, H, W) RGB."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def photometric(x: torch.Tensor, params: ViewRows, visible: torch.Tensor) -> torch.Tensor:
    """The CPU path's photometric ops in its order, each on the samples that drew it."""
    x = color_jitter(x, params.jitter_order, params.jitter.to(x.dtype), visible)
    x = torch.where(params.grey.view(-1, 1, 1, 1), luma(x).expand_as(x), x)
    x = gaussian_blur(x, params.blur_sigma)
    return torch.where(params.solarize.view(-1, 1, 1, 1) & (x >= 128), 255 - x, x)


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in each sample's own order: `order` (B, 4) op numbers
    (-1: none), `factors` (B, 4) by op. Slot by slot, the first three are one blend a x + b grey + c per
    sample, (1, 0, 0) where the slot holds another op, so an op never drawn leaves values exactly as
    they were; the hue shift replaces only the samples whose slot holds it."""
    for slot in range(order.shape[1]):
        op = order[:, slot]
        factor = factors.gather(1, op.clamp(min=0).unsqueeze(1)).view(-1, 1, 1, 1)
        brightness, contrast, saturation, hue = (op == k for k in range(4))
        grey = luma(x)
        mean = (grey * visible).sum((1, 2, 3)) / visible.sum((1, 2, 3)).clamp(min=1)
        a = torch.where((brightness | contrast | saturation).view(-1, 1, 1, 1), factor, 1.0)
        b = torch.where(saturation.view(-1, 1, 1, 1), 1 - factor, 0.0)
        c = torch.where(contrast.view(-1, 1, 1, 1), (1 - factor) * mean.view(-1, 1, 1, 1), 0.0)
        x = (a * x + b * grey + c).clamp(0, 255)
        x = torch.where(hue.view(-1, 1, 1, 1), shift_hue(x, torch.where(hue.view(-1, 1, 1, 1), factor, 0.0)), x)
    return x


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (B, 3, H, W) RGB on 0-255 by `shift` turns (broadcast (B, 1, 1, 1)): RGB to
    HSV's hue sextant, shifted, and back by the closed form c = v - (v - min) clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6 with n = 5, 3, 1 for R, G, B. Value and saturation stay."""
    r, g, b = x.unbind(1)
    value, low = x.amax(1), x.amin(1)
    delta = value - low
    safe = torch.where(delta > 0, delta, 1.0)  # grey pixels: any hue, delta 0 keeps them grey
    sextant = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    sextant = torch.remainder(sextant + 6 * shift.view(-1, 1, 1), 6)
    channels = []
    for n in (5, 3, 1):
        k = torch.remainder(sextant + n, 6)
        channels.append(value - delta * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels, 1).clamp(0, 255)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each sample of `x` (B, C, H, W) blurred with its own sigma (B,), 0 for none: OpenCV's 8-bit
    kernel of round(6 sigma + 1) | 1 taps (taps beyond a sample's own size are 0) and its reflect-101
    border (F.pad's "reflect"), as two grouped convolutions, one per direction."""
    n, c, height, width = x.shape
    offsets = torch.arange(BLUR_TAPS, device=x.device, dtype=torch.float64) - BLUR_TAPS // 2
    blurred = (sigma > 0).view(-1, 1)
    sigma = torch.where(blurred, sigma.view(-1, 1).double(), 1.0)
    radius = torch.floor(torch.round(sigma * 6 + 1) / 2)  # (taps | 1 - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2)) * (offsets.abs() <= radius)
    kernel = torch.where(blurred, kernel, (offsets == 0).double())
    weights = (kernel / kernel.sum(1, keepdim=True)).float().repeat_interleave(c, 0)  # (n * c, taps)
    pad = BLUR_TAPS // 2
    flat = x.reshape(1, n * c, height, width)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), weights.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), weights.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, height, width)
