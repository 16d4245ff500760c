"""One view's augmentation recipe, a config section (`augment.view1.*`, `augment.view2.*`), and the
reference's two: in a module of its own, without OpenCV or torch, so that reading a config needs neither
(data/loading/augment.py applies them)."""

from __future__ import annotations

from pydantic import Field

from ssit_dist.configclass import configclass, require


@configclass
class ViewRecipe:
    """One view's augmentation; the defaults are the reference's view 1 (`VIEW2` holds its view 2)."""

    scale: list[float] = Field(
        default_factory=lambda: [0.08, 0.8], description="random resized crop: area fraction (min, max)"
    )
    ratio: list[float] = Field(
        default_factory=lambda: [3 / 4, 4 / 3], description="random resized crop: aspect ratio (min, max)"
    )
    rotation: float = Field(default=180.0, description="largest rotation either way, degrees", ge=0, le=180)
    rotate_p: float = Field(default=0.8, description="probability of a rotation", ge=0, le=1)
    jitter: list[float] = Field(
        default_factory=lambda: [0.4, 0.4, 0.2, 0.1],
        description="colour jitter strength: brightness, contrast, saturation, hue",
    )
    jitter_p: float = Field(default=0.8, description="probability of colour jitter", ge=0, le=1)
    grey_p: float = Field(default=0.2, description="probability of greyscale", ge=0, le=1)
    blur_p: float = Field(default=1.0, description="probability of a Gaussian blur (sigma 0.1-2)", ge=0, le=1)
    solarize_p: float = Field(default=0.0, description="probability of solarisation", ge=0, le=1)

    def validate(self) -> None:
        for name in ("scale", "ratio"):
            low_high = getattr(self, name)
            require(
                len(low_high) == 2 and 0 < low_high[0] <= low_high[1],
                name,
                low_high,
                "expected (min, max), 0 < min <= max",
            )
        require(self.scale[1] <= 1, "scale", self.scale, "area fractions are at most 1")
        require(
            len(self.jitter) == 4 and all(v >= 0 for v in self.jitter) and self.jitter[3] <= 0.5,
            "jitter",
            self.jitter,
            "expected four strengths >= 0 (brightness, contrast, saturation, hue <= 0.5)",
        )


VIEW1 = ViewRecipe()
VIEW2 = ViewRecipe(scale=[0.8, 1.0], blur_p=0.1, solarize_p=0.2)
