"""SSiT's asymmetric pair augmentation, applied jointly to an image and its saliency map.

The two views follow the reference recipe (BYOL-style asymmetry) by default; every value is a config
field (`augment.view1.*`, `augment.view2.*`):
- view 1: random resized crop, scale (0.08, 0.8); colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8; greyscale
  p 0.2; Gaussian blur (sigma 0.1-2) p 1.0; rotation within +-180 deg p 0.8; horizontal and vertical flips.
- view 2: crop scale (0.8, 1.0); the same jitter and greyscale; blur p 0.1; solarize p 0.2; rotation; flips.
Every geometric op (crop, rotation, flips) hits the saliency map with the same parameters; photometric
ops touch the image only. A view's random parameters are drawn (`draw_view`, one random generator per
pair, so a seeded generator gives the same pair every time) apart from their application: `apply_view`
on uint8 numpy arrays with OpenCV here, or the device path on a whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np
import torch

from ssit_dist.data.loading.view_recipe import VIEW1, VIEW2, ViewRecipe


def crop_box(
    rng: np.random.Generator, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in `scale` and aspect ratio in `ratio`
    (log-uniform), with a centre-crop fallback after 10 tries (torchvision's RandomResizedCrop rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(region: np.ndarray, size: int) -> np.ndarray:
    """Antialiased shrink, bilinear enlarge. Shrinking first averages whole-pixel blocks (OpenCV's fast
    integer INTER_AREA path), then finishes bilinearly: ~7x faster than a fractional INTER_AREA."""
    h, w = region.shape[:2]
    factor = min(h, w) // size
    if factor >= 2:
        region = cv2.resize(region, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_LINEAR)


def _grey(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


BLUR_SIGMA = (0.1, 2.0)  # a Gaussian blur's sigma range, pixels of the output view
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # colour jitter's ops by number


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one view. `draw_view` draws them and `apply_view` applies them on the CPU;
    the device path applies a batch of them (`row` packs one for a DataLoader). Splitting the two lets a
    loader worker draw the parameters (cheap) and leave the pixels to the device, with the same draws
    for the same seed on either path. The defaults are a view of the crop with nothing else done."""

    top: int
    left: int
    height: int
    width: int
    jitter_order: tuple[int, ...] = ()  # the colour jitter ops drawn (JITTER_OPS numbers), in their order
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # a shift, in turns
    grey: bool = False
    blur_sigma: float = 0.0  # 0: no blur
    solarize: bool = False
    angle: float | None = None  # degrees, counter-clockwise (cv2.getRotationMatrix2D's sign)
    hflip: bool = False
    vflip: bool = False

    ROW: ClassVar[int] = 18  # length of `row()`

    def row(self) -> list[float]:
        """The parameters as ROW floats, for a float64 array that a DataLoader collates (float64 holds
        each exactly): crop (4), jitter order padded with -1 (4), the four jitter factors, grey, blur
        sigma, solarize, angle (NaN for none), hflip, vflip."""
        order = [*self.jitter_order, *[-1] * (4 - len(self.jitter_order))]
        angle = math.nan if self.angle is None else self.angle
        return [
            *map(float, (self.top, self.left, self.height, self.width, *order)),
            *(self.brightness, self.contrast, self.saturation, self.hue),
            *map(float, (self.grey, self.blur_sigma, self.solarize, angle, self.hflip, self.vflip)),
        ]


def draw_jitter(rng: np.random.Generator, strength: Sequence[float]) -> dict[str, Any]:
    """Colour jitter's fields of ViewParams: a random op order, and a factor (torchvision's ranges) per
    op of strength > 0, drawn in that order."""
    fields: dict[str, Any] = {"jitter_order": ()}
    for op in rng.permutation(4):
        s = strength[op]
        if s > 0:
            fields[JITTER_OPS[op]] = rng.uniform(-s, s) if op == 3 else rng.uniform(max(0, 1 - s), 1 + s)
            fields["jitter_order"] += (int(op),)
    return fields


def draw_view(rng: np.random.Generator, recipe: ViewRecipe, height: int, width: int) -> ViewParams:
    """The random parameters of one view of a `height` x `width` image. The order in which this uses
    the generator is what keeps a seed's views the same on every path and across versions: crop box,
    jitter (test, order, factors), greyscale, blur (test, sigma), solarize, rotation (test, angle),
    horizontal flip, vertical flip."""
    top, left, h, w = crop_box(rng, height, width, recipe.scale, recipe.ratio)
    jitter = draw_jitter(rng, recipe.jitter) if rng.random() < recipe.jitter_p else {}
    grey = rng.random() < recipe.grey_p
    blur_sigma = rng.uniform(*BLUR_SIGMA) if rng.random() < recipe.blur_p else 0.0
    solarize = rng.random() < recipe.solarize_p
    angle = rng.uniform(-recipe.rotation, recipe.rotation) if rng.random() < recipe.rotate_p else None
    hflip = rng.random() < 0.5
    vflip = rng.random() < 0.5
    return ViewParams(
        top,
        left,
        h,
        w,
        grey=grey,
        blur_sigma=blur_sigma,
        solarize=solarize,
        angle=angle,
        hflip=hflip,
        vflip=vflip,
        **jitter,
    )


def color_jitter(bgr: np.ndarray, params: ViewParams) -> np.ndarray:
    """Brightness, contrast, saturation and hue changes in the drawn order (torchvision's definitions)."""
    out = bgr
    for op in params.jitter_order:
        if op == 0:
            out = cv2.convertScaleAbs(out, alpha=params.brightness)
        elif op == 1:
            mean = float(_grey(out).mean())
            out = cv2.addWeighted(out, params.contrast, np.full_like(out, 0), 0, (1 - params.contrast) * mean)
        elif op == 2:
            grey = cv2.cvtColor(_grey(out), cv2.COLOR_GRAY2BGR)
            out = cv2.addWeighted(out, params.saturation, grey, 1 - params.saturation, 0)
        else:
            hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV_FULL)  # hue in 0-255 for a full turn
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(params.hue * 256)) % 256
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR_FULL)
    return out


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate about the centre, nearest neighbour, black outside (as torchvision's default)."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)


def apply_view(bgr: np.ndarray, saliency: np.ndarray, params: ViewParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One view with drawn parameters: (size, size, 3) uint8 BGR image and (size, size) uint8 saliency map."""
    crop = slice(params.top, params.top + params.height), slice(params.left, params.left + params.width)
    image, sal = _resize(bgr[crop], size), _resize(saliency[crop], size)
    image = color_jitter(image, params)
    if params.grey:
        image = cv2.cvtColor(_grey(image), cv2.COLOR_GRAY2BGR)
    if params.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), params.blur_sigma)
    if params.solarize:
        image = np.where(image >= 128, 255 - image, image).astype(np.uint8)
    if params.angle is not None:
        image, sal = rotate(image, params.angle), rotate(sal, params.angle)
    if params.hflip:
        image, sal = image[:, ::-1], sal[:, ::-1]
    if params.vflip:
        image, sal = image[::-1], sal[::-1]
    return image, sal


def augment_view(
    bgr: np.ndarray, saliency: np.ndarray, recipe: ViewRecipe, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One view: (size, size, 3) uint8 BGR image and (size, size) uint8 saliency map."""
    return apply_view(bgr, saliency, draw_view(rng, recipe, bgr.shape[0], bgr.shape[1]), size)


class PairAugment:
    """(image, saliency) uint8 arrays -> normalised RGB view tensors x1, x2 (3, S, S) and saliency maps
    s1, s2 (1, S, S) in [0, 1]. Images come in OpenCV's BGR order, as cv2.imdecode gives them; they stay
    BGR through the augmentation (cheaper than swapping the full-size image) and leave as RGB."""

    def __init__(
        self, size: int, mean: list[float], std: list[float], view1: ViewRecipe = VIEW1, view2: ViewRecipe = VIEW2
    ):
        self.size, self.view1, self.view2 = size, view1, view2
        # Normalisation folded into one multiply-add on the uint8 values.
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(3, 1, 1)

    def draw(self, rng: np.random.Generator, height: int, width: int) -> tuple[ViewParams, ViewParams]:
        """Both views' parameters for a `height` x `width` image, as `__call__` draws them."""
        return draw_view(rng, self.view1, height, width), draw_view(rng, self.view2, height, width)

    def _tensors(self, image: np.ndarray, sal: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = torch.from_numpy(np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)))
        s = torch.from_numpy(np.ascontiguousarray(sal)).unsqueeze(0).float() / 255
        return rgb.float() * self.scale + self.shift, s

    def __call__(self, bgr: np.ndarray, saliency: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        if bgr.shape[:2] != saliency.shape:
            raise ValueError(f"saliency map {saliency.shape} does not match image {bgr.shape[:2]}")
        params1, params2 = self.draw(rng, *saliency.shape)
        i1, m1 = apply_view(bgr, saliency, params1, self.size)
        i2, m2 = apply_view(bgr, saliency, params2, self.size)
        x1, s1 = self._tensors(i1, m1)
        x2, s2 = self._tensors(i2, m2)
        return x1, x2, s1, s2
