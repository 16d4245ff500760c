"""Shared fixtures: real fundus photographs (../shared, or scikit-image's CC0 retina) and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
GRADED = SHARED / "data" / "fundus" / "graded"
UNLABELLED = SHARED / "data" / "fundus" / "unlabelled"
CLI = Path(sys.executable).with_name("ssit-dist")


@pytest.fixture(scope="session")
def graded_dir() -> Path:
    if not (GRADED / "labels.csv").is_file():
        pytest.skip(f"real graded fundus photographs not found at {GRADED} (../shared is absent here)")
    return GRADED


@pytest.fixture(scope="session")
def retina() -> Image.Image:
    """scikit-image's CC0 fundus photograph (a normal left eye, 1411x1411 RGB)."""
    from skimage import data

    return Image.fromarray(data.retina())


def run_cli(*args: object, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the installed `ssit-dist` console script, as a user would."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["COLUMNS"] = "200"  # keep rich from wrapping file names in the summary
    result = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"ssit-dist {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def pack_real_subset(
    graded_dir: Path, tmp_factory: pytest.TempPathFactory, count: int, size: int, shard_size: int
) -> Path:
    """Shards of the first `count` graded photographs (linked, never copied), unlabelled."""
    src = tmp_factory.mktemp("src")
    for name in sorted(p.name for p in graded_dir.glob("*.jpeg"))[:count]:
        (src / name).symlink_to(graded_dir / name)
    out = tmp_factory.mktemp("shards") / f"real{count}"
    run_cli("shard", src, out, "--size", size, "--shard-size", shard_size)
    return out
