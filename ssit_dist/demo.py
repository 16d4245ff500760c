"""`ssit-dist demo`: pack a handful of real fundus photographs and write the saliency preview.

The images are variations of scikit-image's retina photograph (CC0, shipped inside its wheel, no
download): the photograph itself, mirrored (a right eye), rotated, darker, greyscale, and placed on a
wide black canvas as fundus cameras write them, so the disc crop has something to find.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageEnhance

from ssit_dist.data.inputs import discover
from ssit_dist.data.shard import ShardOptions, pack


def retina_photograph() -> Image.Image:
    try:
        from skimage import data
    except ImportError:
        raise RuntimeError(
            "the demo needs scikit-image for its CC0 retina photograph: pip install scikit-image"
        ) from None
    return Image.fromarray(data.retina())


def write_demo_images(folder: Path) -> list[Path]:
    """Write the demo's variations of the retina photograph as JPEGs under `folder`."""
    base = retina_photograph()
    wide = Image.new("RGB", (base.width * 3 // 2, base.height), (0, 0, 0))
    wide.paste(base, (base.width // 4, 0))
    variants = {
        "left_eye": base,
        "right_eye": base.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "rotated": base.rotate(25, resample=Image.Resampling.BILINEAR),
        "dark": ImageEnhance.Brightness(base).enhance(0.6),
        "greyscale": base.convert("L"),
        "wide_camera_frame": wide,
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in variants.items():
        path = folder / f"{name}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    return paths


def run_demo(out: Path, log: Callable[[str], None] = print) -> Path:
    """Write the images, pack them at 256 px with 2 workers, and return the preview's path."""
    images = out / "images"
    write_demo_images(images)
    log(f"wrote {len(list(images.glob('*.jpg')))} fundus photographs to {images}")
    inputs = discover(images)
    index = pack(
        images,
        out / "shards",
        inputs,
        ShardOptions(size=256, shard_size=4, workers=2, overwrite=True, preview=len(inputs.items)),
    )
    log(f"packed {index.num_samples} samples into {out / 'shards'} (mean {index.mean}, std {index.std})")
    return out / "shards" / "preview.png"
