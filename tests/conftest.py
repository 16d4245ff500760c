"""Shared fixtures: real fundus photographs (../shared, or scikit-image's CC0 retina) and the CLI."""

from __future__ import annotations

import multiprocessing.process
import os
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from collections.abc import Generator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner, Result

# Test modules sit in folders that mirror the package's; the modules they share sit in tests/helpers and
# are imported by name (`from tiny_runs import short`), as are this file's (`from conftest import CLI`).
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GRADED = SHARED / "data" / "fundus" / "graded"
UNLABELLED = SHARED / "data" / "fundus" / "unlabelled"
CLI = Path(sys.executable).with_name("ssit-dist")
# rich wraps output at the terminal's width (80 where there is none), and file names and tables in the
# tests' output must stay on one line: the command and its consoles, in this process or launched, see 200.
os.environ["COLUMNS"] = "200"
# The tiers (README, "Tests"): `make test-fast` runs what carries none of these marks.
NOT_FAST = ("slow", "multiprocess", "slurm")


# `make test` hands whole modules to two workers in collection order (--dist loadscope): the longest go
# first, so that none of them starts last while the other worker idles (order only; seconds measured
# 2026-12-07 on 2 cores, each module beside one other: test_stop 491, test_gpu_run 330, test_pretrain 329,
# test_slurm 253, test_resume_safety 228, test_demo 192, test_finetune 174, test_host_sync 152,
# test_reshard 91, test_shard 89, test_stop_launchers 73, test_segment 71, test_zero_parameters 70,
# test_runtime 48, test_stream 47; `make test` prints the slowest tests of every run).
LONGEST_FIRST = (
    "test_stop",
    "test_gpu_run",
    "test_pretrain",
    "test_slurm",
    "test_resume_safety",
    "test_demo",
    "test_finetune",
    "test_host_sync",
    "test_reshard",
    "test_shard",
    "test_stop_launchers",
    "test_segment",
    "test_zero_parameters",
    "test_runtime",
    "test_stream",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    position = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: position.get(item.path.stem, len(position)))  # stable: the rest keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """A test that starts a process (a command, a rank, a loader worker, a compiler), its fixtures included,
    must carry a mark of NOT_FAST: unmarked, the start fails the test, so the fast tier stays free of them."""
    if any(item.get_closest_marker(mark) for mark in NOT_FAST):
        yield
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(
            f"{item.nodeid} starts a process: mark it (or its module) multiprocess, so that `make test-fast` "
            "leaves it out"
        )

    saved = subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start
    subprocess.Popen._execute_child = refuse
    multiprocessing.process.BaseProcess.start = refuse
    try:
        yield
    finally:
        subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start = saved


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
    result = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"ssit-dist {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def tar_samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples, {key: {ext: bytes}}, read with the standard library, not with our own code."""
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out[key][ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return out


def invoke_cli(*args: object, check: bool = True) -> Result:
    """Run the `ssit-dist` app in this process (typer's CliRunner), for commands that start nothing."""
    from ssit_dist.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if check and result.exit_code != 0:
        raise AssertionError(
            f"ssit-dist {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}{result.exception or ''}"
        )
    return result


def pack_real_subset(
    graded_dir: Path, tmp_factory: pytest.TempPathFactory, count: int, size: int, shard_size: int
) -> Path:
    """Shards of the first `count` graded photographs (linked, never copied), unlabelled, packed in this
    process by the packer that `ssit-dist shard` runs (test_shard.py tests the command itself)."""
    from ssit_dist.data.packing.inputs import discover
    from ssit_dist.data.packing.options import ShardOptions
    from ssit_dist.data.packing.shard import pack

    src = tmp_factory.mktemp("src")
    for name in sorted(p.name for p in graded_dir.glob("*.jpeg"))[:count]:
        (src / name).symlink_to(graded_dir / name)
    out = tmp_factory.mktemp("shards") / f"real{count}"
    pack(src, out, discover(src), ShardOptions(size=size, shard_size=shard_size))
    return out


@pytest.fixture(scope="session")
def shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real photographs at 32 px in shards of 8, unlabelled: what the tiny trainer runs read (tests
    that need other shards define their own `shards`)."""
    return pack_real_subset(graded_dir, tmp_path_factory, 24, size=32, shard_size=8)


@pytest.fixture(scope="session")
def labelled_shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real graded photographs at 32 px with their grades, split train / val (linked, never copied)."""
    src = tmp_path_factory.mktemp("labelled_src")
    rows = (graded_dir / "labels.csv").read_text().splitlines()
    for row in rows[1:41]:
        (src / row.split(",")[0]).symlink_to(graded_dir / row.split(",")[0])
    (src / "labels.csv").write_text("\n".join(rows[:41]) + "\n")
    out = tmp_path_factory.mktemp("labelled") / "graded32"
    run_cli(
        "shard",
        src,
        out,
        "--size",
        32,
        "--shard-size",
        16,
        "--labels",
        src / "labels.csv",
        "--split",
        "train=0.7,val=0.3",
    )
    shutil.rmtree(src)
    return out


@pytest.fixture(scope="session")
def short_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of `tiny_runs.short(..., "run")` trained to its end on 2 ranks (ZeRO-2, 2 steps, a
    checkpoint after each). Tests that only resume from it, break it or export it copy this folder beside
    the same config of their own (a run folder holds no path of its own), instead of training again."""
    from tiny_runs import short, train

    folder = tmp_path_factory.mktemp("short_run")
    train(short(folder, shards, "run"))
    return folder / "run"
