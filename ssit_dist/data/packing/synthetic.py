"""Synthetic colour fundus photographs with diabetic-retinopathy lesions that follow a grade.

Generated, not photographed: free to ship and to share, for the demo and for tests. Each image has a
circular field of view on black, an orange-red retina with a soft choroidal texture and a darker macula,
a bright optic disc on the nasal side (left and right eyes mirror), four vessel arcades branching from the
disc, and lesions drawn after the ICDR scale (counts are ranges, drawn per image):

| grade | microaneurysms | haemorrhages | hard exudates | cotton-wool spots | new vessels / preretinal bleed |
|---|---|---|---|---|---|
| 0 none | - | - | - | - | - |
| 1 mild | 3-8 | - | - | - | - |
| 2 moderate | 8-16 | 2-6 | 1-3 clusters | - | - |
| 3 severe | 14-24 | 9-16 | 3-6 clusters | 2-4 | - |
| 4 proliferative | 14-24 | 9-16 | 3-6 clusters | 1-3 | a tangle at the disc, often a bleed |

Lesions are larger than life (a microaneurysm is a few pixels wide at 256 px) so that a model looking at
64-128 px inputs can see them. Camera variation: exposure, colour balance, focus blur, sensor noise, field
of view size and offset, and some frames on a wide black canvas as fundus cameras write them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GRADES = 5


@dataclass(frozen=True)
class LesionCounts:
    microaneurysms: tuple[int, int]
    haemorrhages: tuple[int, int]
    exudate_clusters: tuple[int, int]
    cotton_wool: tuple[int, int]
    proliferative: bool


LESIONS = {
    0: LesionCounts((0, 0), (0, 0), (0, 0), (0, 0), False),
    1: LesionCounts((3, 8), (0, 0), (0, 0), (0, 0), False),
    2: LesionCounts((8, 16), (2, 6), (1, 3), (0, 0), False),
    3: LesionCounts((14, 24), (9, 16), (3, 6), (2, 4), False),
    4: LesionCounts((14, 24), (9, 16), (3, 6), (1, 3), True),
}

VESSEL = np.array([115, 22, 18], np.float32)
BLOOD = np.array([105, 12, 10], np.float32)
EXUDATE = np.array([245, 225, 120], np.float32)
COTTON = np.array([235, 225, 200], np.float32)


def _paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, opacity: float = 1.0) -> None:
    """Blend `colour` into `image` (float32 RGB) where `mask` (float in [0, 1]) is set."""
    alpha = np.clip(mask * opacity, 0.0, 1.0)[..., None]
    image *= 1.0 - alpha
    image += alpha * colour


def _blob(size: int, centre: tuple[float, float], radius: float, soft: float) -> np.ndarray:
    """A filled disc with a soft edge (Gaussian-blurred by `soft` x radius)."""
    mask = np.zeros((size, size), np.float32)
    # Sub-pixel centre and radius: 4 fractional bits (shift 4, hence the x16).
    at = (round(centre[0] * 16), round(centre[1] * 16))
    cv2.circle(mask, at, max(1, round(radius * 16)), 1.0, -1, cv2.LINE_AA, 4)
    sigma = max(0.5, soft * radius)
    return cv2.GaussianBlur(mask, (0, 0), sigma)


def _vessel_tree(size: int, disc: tuple[float, float], side: int, rng: np.random.Generator) -> np.ndarray:
    """Vessel mask: four arcades leaving the disc (two temporal ones sweeping round the macula, two
    nasal), each a smooth random walk that thins and branches."""
    mask = np.zeros((size, size), np.float32)
    scale = size / 256

    def grow(x: float, y: float, angle: float, width: float, length: float, bend: float, depth: int) -> None:
        points = [(x, y)]
        step = 3.0 * scale
        for i in range(int(length / step)):
            angle += bend + rng.normal(0, 0.06)
            x, y = x + step * math.cos(angle), y + step * math.sin(angle)
            points.append((x, y))
            if depth < 3 and i > 6 and rng.random() < 0.035:
                turn = rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)
                grow(x, y, angle + turn, width * 0.65, length * rng.uniform(0.3, 0.6), bend * 0.5, depth + 1)
        pts = (np.array(points) * 16).round().astype(np.int32)
        thickness = max(1, round(width * scale))
        cv2.polylines(mask, [pts], False, 1.0, thickness, cv2.LINE_AA, 4)

    temporal = math.pi if side > 0 else 0.0  # the macula lies on the temporal side, away from the nose
    for vertical in (-1, 1):
        start = temporal + vertical * side * 0.35
        grow(disc[0], disc[1], start, 4.5, 260 * scale, -vertical * side * 0.022, 0)  # temporal arcade
        nasal = temporal + math.pi + vertical * side * 0.5
        grow(disc[0], disc[1], nasal, 3.5, 110 * scale, vertical * side * 0.01, 1)  # nasal vessels
    return cv2.GaussianBlur(mask, (0, 0), 0.6 * scale)


def _stretch(centre: tuple[float, float], angle: float, along: float, across: float) -> np.ndarray:
    """2x3 affine map that scales by `along` in direction `angle` and `across` perpendicular to it,
    about `centre` (as cv2.warpAffine's destination-from-source matrix)."""
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    linear = rotation @ np.diag([along, across]) @ rotation.T
    shift = np.asarray(centre) - linear @ np.asarray(centre)
    return np.hstack([linear, shift[:, None]]).astype(np.float32)


def _random_point(rng: np.random.Generator, centre: float, radius: float) -> tuple[float, float]:
    r = radius * math.sqrt(rng.uniform(0.0, 0.85))
    a = rng.uniform(0, 2 * math.pi)
    return centre + r * math.cos(a), centre + r * math.sin(a)


def _neovascular_tangle(size: int, disc: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Fine, tortuous new vessels looping over and around the disc."""
    mask = np.zeros((size, size), np.float32)
    scale = size / 256
    for _ in range(rng.integers(6, 11)):
        x, y = disc[0] + rng.normal(0, 6 * scale), disc[1] + rng.normal(0, 6 * scale)
        angle = rng.uniform(0, 2 * math.pi)
        points = []
        for _ in range(rng.integers(10, 20)):
            angle += rng.normal(0, 0.8)
            x, y = x + 2.5 * scale * math.cos(angle), y + 2.5 * scale * math.sin(angle)
            points.append((x, y))
        cv2.polylines(mask, [(np.array(points) * 16).round().astype(np.int32)], False, 1.0, 1, cv2.LINE_AA, 4)
    return mask


# What synthetic_fundus_with_masks outlines, IDRiD's lesion classes and the vessels of DRIVE / CHASE_DB1.
MASK_CLASSES = ("vessels", "microaneurysms", "haemorrhages", "hard_exudates", "soft_exudates")
Masks = dict[str, np.ndarray]  # class -> float32 (size, size) coverage in [0, 1], while painting


def synthetic_fundus(grade: int, seed: int, size: int = 256) -> np.ndarray:
    """One synthetic fundus photograph of DR `grade` (0-4) as uint8 RGB, (size, size x w, 3). The seed
    fixes the eye (anatomy, pigment) and the camera; the grade adds lesions to it. The same (grade, seed,
    size) always gives the same image."""
    return _photograph(grade, seed, size, None)[0]


def synthetic_fundus_with_masks(grade: int, seed: int, size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The same photograph as `synthetic_fundus`, and per MASK_CLASSES a uint8 mask of its frame (255 where
    that structure covers at least half a pixel, 0 elsewhere), and "fov": the field of view."""
    return _photograph(grade, seed, size, {name: np.zeros((size, size), np.float32) for name in MASK_CLASSES})


def _photograph(grade: int, seed: int, size: int, masks: Masks | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if grade not in LESIONS:
        raise ValueError(f"grade {grade} is not a DR grade: expected 0-4")
    rng = np.random.default_rng(seed)  # the eye and the camera, drawn in this order
    fov = size * rng.uniform(0.45, 0.49)
    side = 1 if rng.random() < 0.5 else -1  # +1: right eye, disc right of centre (as photographed)
    image = _retina(size, fov, rng)
    disc = _anatomy(image, fov, side, rng, masks)
    # Lesions from their own generator: the same seed at another grade is the same eye, same camera.
    _lesions(image, LESIONS[grade], fov, disc, np.random.default_rng([seed, grade]), masks)
    if masks is not None:
        masks["fov"] = _blob(size, (size / 2, size / 2), fov, 0.02)
    return _camera(image, fov, rng, masks)


def _mark(masks: Masks | None, name: str, coverage: np.ndarray) -> None:
    if masks is not None:
        np.maximum(masks[name], coverage, out=masks[name])


def _retina(size: int, fov: float, rng: np.random.Generator) -> np.ndarray:
    """Float32 RGB: pigment colour, exposure and a soft choroidal texture, darker towards the rim."""
    scale, c = size / 256, size / 2
    base = np.array([rng.uniform(185, 225), rng.uniform(70, 110), rng.uniform(25, 50)], np.float32)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 6 * scale)
    texture = noise / (noise.std() + 1e-6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rim = np.clip(1.0 - ((xx - c) ** 2 + (yy - c) ** 2) / fov**2, 0, 1) ** 0.35
    return base * (0.55 + 0.45 * rim)[..., None] * (1 + 0.06 * texture)[..., None]


def _anatomy(
    image: np.ndarray, fov: float, side: int, rng: np.random.Generator, masks: Masks | None = None
) -> tuple[float, float]:
    """Paint the macula, the vessel arcades and the optic disc; the disc's centre."""
    size = image.shape[0]
    c = size / 2
    disc = (c + side * fov * rng.uniform(0.45, 0.55), c + fov * rng.normal(0, 0.05))
    macula = (c - side * fov * rng.uniform(0.0, 0.08), c + fov * rng.normal(0, 0.04))
    _paint(image, _blob(size, macula, fov * 0.16, 0.6), np.array([120, 45, 20], np.float32), 0.55)
    vessels = _vessel_tree(size, disc, side, rng)
    _paint(image, vessels, VESSEL, 0.9)
    _mark(masks, "vessels", vessels)
    disc_radius = fov * rng.uniform(0.13, 0.16)
    _paint(image, _blob(size, disc, disc_radius, 0.25), np.array([250, 205, 140], np.float32), 0.95)
    _paint(image, _blob(size, disc, disc_radius * 0.45, 0.4), np.array([255, 240, 205], np.float32), 0.8)
    return disc


def _lesions(
    image: np.ndarray,
    lesions: LesionCounts,
    fov: float,
    disc: tuple[float, float],
    sick: np.random.Generator,
    masks: Masks | None = None,
) -> None:
    """Paint a grade's lesions, each kind in turn (the draws of `sick` follow this order)."""
    size = image.shape[0]
    scale, c = size / 256, size / 2

    def count(span: tuple[int, int]) -> int:
        return int(sick.integers(span[0], span[1] + 1))

    for _ in range(count(lesions.cotton_wool)):
        cotton = _blob(size, _random_point(sick, c, fov * 0.7), sick.uniform(5, 9) * scale, 0.8)
        _paint(image, cotton, COTTON, 0.75)
        _mark(masks, "soft_exudates", cotton)
    for _ in range(count(lesions.exudate_clusters)):
        centre = _random_point(sick, c, fov * 0.6)
        for _ in range(sick.integers(3, 8)):
            spot = (centre[0] + sick.normal(0, 5 * scale), centre[1] + sick.normal(0, 5 * scale))
            exudate = _blob(size, spot, sick.uniform(1.5, 3.0) * scale, 0.3)
            _paint(image, exudate, EXUDATE, 0.95)
            _mark(masks, "hard_exudates", exudate)
    for _ in range(count(lesions.haemorrhages)):
        spot = _random_point(sick, c, fov)
        radius = sick.uniform(4, 8) * scale
        mask = _blob(size, spot, radius, 0.35)
        if sick.random() < 0.4:  # flame-shaped: stretched along a random direction, squeezed across it
            mask = cv2.warpAffine(mask, _stretch(spot, sick.uniform(0, math.pi), 2.2, 0.45), (size, size))
        _paint(image, mask, BLOOD, 0.9)
        _mark(masks, "haemorrhages", mask)
    for _ in range(count(lesions.microaneurysms)):
        spot = _random_point(sick, c, fov)
        aneurysm = _blob(size, spot, sick.uniform(1.8, 2.8) * scale, 0.25)
        _paint(image, aneurysm, BLOOD, 0.95)
        _mark(masks, "microaneurysms", aneurysm)
    if lesions.proliferative:
        _proliferation(image, fov, disc, sick, masks)


def _proliferation(
    image: np.ndarray, fov: float, disc: tuple[float, float], sick: np.random.Generator, masks: Masks | None
) -> None:
    """New vessels at the disc and, often, a preretinal (boat-shaped) haemorrhage below the disc or arcade."""
    size = image.shape[0]
    scale, c = size / 256, size / 2
    tangle = _neovascular_tangle(size, disc, sick)
    _paint(image, tangle, VESSEL * 0.9, 0.9)
    _mark(masks, "vessels", tangle)
    if sick.random() < 0.6:
        spot = _random_point(sick, c, fov * 0.7)
        boat = np.zeros((size, size), np.float32)
        axes = (round(sick.uniform(14, 22) * scale * 16), round(sick.uniform(7, 11) * scale * 16))
        centre = (round(spot[0] * 16), round(spot[1] * 16))
        cv2.ellipse(boat, centre, axes, 0, 0, 180, 1.0, -1, cv2.LINE_AA, 4)
        bleed = cv2.GaussianBlur(boat, (0, 0), 1.5 * scale)
        _paint(image, bleed, BLOOD * 0.85, 0.95)
        _mark(masks, "haemorrhages", bleed)


def _camera(
    image: np.ndarray, fov: float, rng: np.random.Generator, masks: Masks | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The photograph: exposure and colour balance, focus, noise, then the round field of view on black,
    sometimes in a wide frame (the masks, binarised inside the field, get the same frame)."""
    size = image.shape[0]
    scale, c = size / 256, size / 2
    image *= rng.uniform(0.75, 1.15) * np.array([1.0, rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)], np.float32)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.0) * scale)
    image += rng.normal(0, 3.0, image.shape).astype(np.float32)
    field = _blob(size, (c, c), fov, 0.02)
    photo = np.clip(image * field[..., None], 0, 255).astype(np.uint8)
    binary: dict[str, np.ndarray] = {
        k: np.where((m * field >= 0.5), 255, 0).astype(np.uint8) for k, m in (masks or {}).items()
    }
    if rng.random() < 0.25:  # a wide camera frame: black margins left and right
        margin = int(size * rng.uniform(0.1, 0.25))
        photo = cv2.copyMakeBorder(photo, 0, 0, margin, margin, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        binary = {
            k: cv2.copyMakeBorder(m, 0, 0, margin, margin, cv2.BORDER_CONSTANT, value=0) for k, m in binary.items()
        }
    return photo, binary


def write_synthetic_segmentation(
    root: Path, counts: dict[str, int], size: int = 256, classes: tuple[str, ...] = ("vessels",), seed: int = 0
) -> Path:
    """A segmentation folder as `ssit-dist segment` reads it: ROOT/SPLIT/images/NAME.png, masks/CLASS/NAME.png
    (255 foreground) and fov/NAME.png, `counts` photographs per split, grades cycling 0-4 (lesion classes
    need grades above 0 to have any foreground)."""
    unknown = set(classes) - set(MASK_CLASSES)
    if unknown:
        raise ValueError(f"unknown mask classes {sorted(unknown)}: choose from {', '.join(MASK_CLASSES)}")
    index = 0
    for split, count in counts.items():
        for name in ("images", "fov", *(f"masks/{c}" for c in classes)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image, masks = synthetic_fundus_with_masks(index % GRADES, seed * 1_000_003 + index, size)
            name = f"synthetic_{index:05d}.png"
            cv2.imwrite(str(root / split / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / split / "fov" / name), masks["fov"])
            for c in classes:
                cv2.imwrite(str(root / split / "masks" / c / name), masks[c])
            index += 1
    return root
