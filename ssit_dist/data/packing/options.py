"""How `ssit-dist shard` packs: the options, checked when built. Apart from the packer (cv2, numpy) so
that the command line reads its defaults and help without loading them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ssit_dist.configclass import configclass, require
from ssit_dist.data.packing.label_formats import LABEL_FORMAT_NAMES

# "none": shards for fine-tuning and evaluation only, without maps (at 256 px a fine-grained map is about
# three quarters of a sample's bytes); pretraining refuses them.
SaliencyMethod = Literal["fine_grained", "spectral_residual", "none"]


@configclass(frozen=True)
class ShardOptions:
    """How `pack` writes shards; `ssit-dist shard` takes its options' defaults and help from here. The
    recorded ones (all but workers, overwrite and preview) go into `_info.json`'s parameters."""

    size: int = Field(
        default=512,
        description="side of the square crop in pixels, a multiple of 16 of at least 32; a smaller photograph "
        "keeps its own size (none is enlarged)",
    )
    shard_size: int = Field(default=512, description="samples per shard (about 100 MB at 512 px)", ge=1)
    workers: int = Field(default=1, description="worker processes (0: one per available core)", ge=0)
    saliency: SaliencyMethod = Field(
        default="fine_grained",
        description="saliency detector: fine_grained (the paper's), spectral_residual, or none (shards for fine-tuning "
        "and evaluation only, a quarter of the bytes; pretraining refuses them)",
    )
    jpeg_roundtrip: bool = Field(
        default=True, description="JPEG round trip of the enhanced image before saliency, as the paper did"
    )
    quality: int = Field(default=95, description="JPEG quality of the packed images (1-100)", ge=1, le=100)
    seed: int = Field(default=0, description="seed for the split and the order inside shards", ge=0)
    labels_format: str = Field(
        default="auto",
        description=f"format of the labels files: {', '.join(LABEL_FORMAT_NAMES)} (auto: recognised by the header)",
    )
    split: str | None = Field(
        default=None,
        description="ratios, stratified by grade, e.g. train=0.7,val=0.15,test=0.15 (official splits: divides train)",
    )
    group_by: str | None = Field(
        default=None, description="labels column whose photographs stay in one split, e.g. patient (both eyes together)"
    )
    overwrite: bool = Field(default=False, description="replace shards already in OUTPUT")
    preview: int = Field(
        default=0, description="write OUTPUT/preview.png with this many images beside their saliency", ge=0
    )
    strict: bool = Field(
        default=False, description="stop with a non-zero exit at the first skipped input or bad label row"
    )

    def validate(self) -> None:
        known = ", ".join(LABEL_FORMAT_NAMES)
        require(self.labels_format in LABEL_FORMAT_NAMES, "labels_format", self.labels_format, f"one of {known}")
        ok = self.size >= 32 and self.size % 16 == 0
        require(ok, "size", self.size, "use a multiple of 16 of at least 32 (default 512)")
        no_maps = self.preview and self.saliency == "none"
        require(not no_maps, "preview", self.preview, "a preview shows saliency maps: leave it out with saliency none")
