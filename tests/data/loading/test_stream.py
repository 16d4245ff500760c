"""Streaming pretraining pairs from real shards: shapes, exact resume, ranks, uneven shards, bad samples."""

from __future__ import annotations

import itertools
import logging
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from webdataset.tariterators import base_plus_ext

from conftest import pack_real_subset
from ssit_dist.data.index import ShardIndexError
from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.sources import ShardSet, open_shards, verify_shards
from ssit_dist.data.loading.stream import PairStream, pair_loader
from ssit_dist.data.loading.tar_reader import read_shard


@pytest.fixture(scope="module")
def shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """23 real photographs at 64 px in uneven shards of 5 (5, 5, 5, 5, 3)."""
    return pack_real_subset(graded_dir, tmp_path_factory, 23, size=64, shard_size=5)


def make_stream(
    folder: Path, rank: int = 0, workers: int = 0, world: int = 2, micro: int = 4, encoded: bool = False
) -> PairStream:
    """Rank `rank` of `world`, epochs of as many batches of `micro` as the 23 samples fill."""
    shard_set = open_shards([folder])
    batches = 23 // (world * micro)
    plan = EpochPlan(tuple(shard_set.lengths), world, workers, micro, batches, piece_size=2, shuffle_buffer=8)  # type: ignore[arg-type]
    return PairStream(shard_set, PairAugment(32, shard_set.mean, shard_set.std), plan, rank=rank, encoded=encoded)


def take(stream: PairStream, n: int) -> list:
    return list(itertools.islice(iter(pair_loader(stream)), n))


def test_batches_have_the_right_shapes(shards: Path) -> None:
    shard_set = open_shards([shards])
    assert shard_set.num_samples == 23 and shard_set.lengths == [5, 5, 5, 5, 3]
    x1, x2, s1, s2 = take(make_stream(shards), 1)[0]
    assert x1.shape == x2.shape == (4, 3, 32, 32) and s1.shape == s2.shape == (4, 1, 32, 32)
    assert s1.max() <= 1 and s1.min() >= 0 and s1.max() > 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_replays_the_same_batches(shards: Path, workers: int) -> None:
    # One rank of one, batches of 2: an epoch of 11 batches, resumed at its 4th.
    stream = make_stream(shards, workers=workers, world=1, micro=2)
    stream.set_position(epoch=3)
    full = take(stream, 7)
    stream.set_position(epoch=3, skip_batches=4)
    resumed = take(stream, 3)
    for a, b in zip(full[4:], resumed, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    stream.set_position(epoch=4)
    assert not torch.equal(take(stream, 1)[0][0], full[0][0])  # a new epoch, new data


@pytest.mark.multiprocess
def test_an_epoch_through_real_loader_workers_reads_every_sample_once(shards: Path) -> None:
    # 2 ranks x 2 workers, batches of 2 over 23 samples in 5 uneven shards: 5 batches per rank, 20
    # samples per epoch, counted by the names the workers read; then a rank resumed at its 3rd batch.
    def epoch(epoch: int, rank: int, skip: int = 0) -> list[list[str]]:
        stream = make_stream(shards, rank=rank, workers=2, micro=2, encoded=True)
        stream.set_position(epoch, skip)
        return [batch.names for batch in take(stream, 5 - skip)]

    first = [epoch(0, rank) for rank in (0, 1)]
    names = [name for rank in first for batch in rank for name in batch]
    assert len(names) == len(set(names)) == 20 and all(len(b) == 2 for rank in first for b in rank)
    assert epoch(0, 1, skip=3) == first[1][3:]
    second = [name for rank in (0, 1) for batch in epoch(1, rank) for name in batch]
    assert len(set(second)) == 20 and second != names  # each epoch a pass, in another order


@pytest.mark.multiprocess
def test_ranks_see_different_data_and_never_run_dry(shards: Path) -> None:
    # 2 ranks x 2 workers = 4 streams over 5 uneven shards: past the epoch's 2 batches a rank reads on.
    a = take(make_stream(shards, rank=0, workers=2), 12)
    b = take(make_stream(shards, rank=1, workers=2), 12)
    assert len(a) == len(b) == 12
    assert not torch.equal(a[0][0], b[0][0])


def with_bad_jpegs(folder: Path, copy: Path, keys: set[str]) -> Path:
    """A copy of the shard folder in which the JPEGs of samples `keys` are overwritten with as many zero
    bytes: undecodable, while every tar header, sample offset and size the index records stays true."""
    shutil.copytree(folder, copy)
    for shard in copy.glob("train-*.tar"):
        with tarfile.open(shard) as tar:
            named = [(base_plus_ext(member.name), member) for member in tar.getmembers()]
            spans = [(member.offset_data, member.size) for (key, ext), member in named if ext == "jpg" and key in keys]
        data = bytearray(shard.read_bytes())
        for offset, size in spans:
            data[offset : offset + size] = bytes(size)
        shard.write_bytes(bytes(data))
    return copy


def key_of(name: str) -> str:
    return name.rsplit(":", 1)[1]  # names are url:key


def same_batch(a: tuple, b: tuple) -> bool:
    """Equal batches, field by field: tensors, host arrays and names (the CPU path's and the GPU path's)."""
    same = [
        torch.equal(u, v)
        if isinstance(u, torch.Tensor)
        else bool(np.array_equal(u, v, equal_nan=True))
        if isinstance(u, np.ndarray)
        else u == v
        for u, v in zip(a, b, strict=True)
    ]
    return all(same)


def bad_copy(shards: Path, tmp_path: Path, epoch: int, batches: int, workers: int) -> tuple[Path, set[str]]:
    """The shards with the JPEGs of the samples of the first `batches` batches of `epoch` (1 rank of 1,
    `workers` loader workers, batches of 2) made undecodable, and those samples' keys."""
    clean = make_stream(shards, workers=workers, world=1, micro=2, encoded=True)
    clean.set_position(epoch)
    keys = {key_of(name) for batch in take(clean, batches) for name in batch.names}
    assert len(keys) == 2 * batches
    return with_bad_jpegs(shards, tmp_path / "bad", keys), keys


@pytest.mark.multiprocess
@pytest.mark.parametrize("encoded", [True, False], ids=["gpu-path", "cpu-path"])
def test_a_resume_after_bad_samples_reads_what_the_uninterrupted_epoch_reads(
    shards: Path, tmp_path: Path, encoded: bool
) -> None:
    # One rank, two loader workers, batches of 2: epoch 3 has 11 batches. The 4 samples of its first two
    # batches do not decode; a run stopped after batch 4 resumes there (as the trainer does:
    # set_position(epoch, skip_batches)) and must read from batch 4 on what the uninterrupted epoch read,
    # in the same order, the bad samples' places included.
    folder, bad_keys = bad_copy(shards, tmp_path, epoch=3, batches=2, workers=2)
    stream = make_stream(folder, workers=2, world=1, micro=2, encoded=encoded)
    stream.set_position(epoch=3)
    uninterrupted = take(stream, 11)
    stream.set_position(epoch=3, skip_batches=4)
    resumed = take(stream, 7)
    if encoded:  # the sample keys, batch by batch
        assert [batch.names for batch in resumed] == [batch.names for batch in uninterrupted[4:]]
    assert all(same_batch(a, b) for a, b in zip(uninterrupted[4:], resumed, strict=True))
    if encoded:
        keys = [key_of(name) for batch in uninterrupted for name in batch.names]
        assert len(keys) == len(set(keys)) == 22  # still a pass over the data
        assert set(keys[:4]) == bad_keys  # the bad samples kept their places: the first two batches
    else:
        x1, _, s1, _ = uninterrupted[0]  # batch 0: stand-ins, black with empty saliency maps
        assert x1.flatten(2).std(2).max() == 0 and s1.max() == 0
        assert all(x.flatten(2).std(2).min() > 0 for batch in uninterrupted[2:] for x in batch[:2])


def test_a_bad_sample_is_named_and_a_black_stand_in_keeps_its_place(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, bad_keys = bad_copy(shards, tmp_path, epoch=0, batches=1, workers=0)
    stream = make_stream(folder, world=1, micro=2)  # in this process, where its log is seen
    with caplog.at_level(logging.WARNING):
        batches = take(stream, 3)
    assert len(batches) == 3 and all(len(x) == 2 for batch in batches for x in batch)
    assert batches[0][0].flatten(2).std(2).max() == 0  # the two bad samples, black
    for key in bad_keys:
        assert f"skipping sample {key}" in caplog.text and f"stand-in takes the place of sample {key}" in caplog.text


def test_missing_folder_and_split_are_named(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardIndexError, match="not found"):
        open_shards([tmp_path / "nowhere"])
    with pytest.raises(ShardIndexError, match="no split 'val'"):
        open_shards([shards], split="val")


def test_brace_patterns_name_the_same_shards_as_their_folder(shards: Path) -> None:
    from_folder = open_shards([shards])
    from_pattern = open_shards([f"{shards}/train-{{000000..000004}}.tar"])
    assert from_pattern == from_folder  # counts and mean/std come from the _info.json beside them


def test_shards_without_an_index_stream_with_given_statistics(shards: Path, tmp_path: Path) -> None:
    for tar in shards.glob("train-*.tar"):
        (tmp_path / tar.name).symlink_to(tar)
    bare = open_shards([f"{tmp_path}/train-{{000000..000004}}.tar"])
    indexed = open_shards([shards])
    # Counted from their headers: the counts and sample offsets `ssit-dist shard` wrote into the index.
    assert bare.lengths == [5, 5, 5, 5, 3] and bare.offsets == indexed.offsets and bare.mean is None
    plan = EpochPlan(tuple(bare.lengths), 1, 0, 4, 5, shuffle_buffer=8)  # type: ignore[arg-type]
    stream = PairStream(bare, PairAugment(32, [0.5] * 3, [0.25] * 3), plan, rank=0)
    assert len(take(stream, 3)) == 3
    with pytest.raises(ShardIndexError, match=r"5 of the 10 shards .* missing, the first is .*train-000005\.tar"):
        open_shards([f"{tmp_path}/train-{{000000..000009}}.tar"])


@pytest.mark.multiprocess
def test_pipe_urls_read_the_same_samples_as_files(shards: Path) -> None:
    local = str(shards / "train-000004.tar")
    from_file = list(read_shard(local))
    from_pipe = list(read_shard(f"pipe:cat {local}"))
    assert [s["__key__"] for s in from_pipe] == [s["__key__"] for s in from_file] and len(from_file) == 3
    assert all(a["jpg"] == b["jpg"] and a["sal.png"] == b["sal.png"] for a, b in zip(from_file, from_pipe, strict=True))
    # By index, in any order: a remote source reads on, and reopens to go back.
    indexed = open_shards([shards])
    remote = ShardSet([f"pipe:cat {p}" for p in indexed.paths], indexed.lengths, None, None, *[[None] * 5] * 3)
    local_reader, pipe_reader = indexed.reader(), remote.reader()
    for global_id in (22, 3, 4, 9, 0, 21, 22):
        a, b = local_reader.read(global_id), pipe_reader.read(global_id)
        assert a is not None and b is not None and a["__key__"] == b["__key__"] and a["jpg"] == b["jpg"]
    local_reader.close()
    pipe_reader.close()


@pytest.mark.multiprocess
def test_loader_workers_survive_a_preemption_signal_while_starting(shards: Path) -> None:
    # srun and scancel signal every process of a job step, loader workers included, at any moment;
    # a worker signalled before its initialisation ran must not die (the trainer saves, then stops),
    # nor may the forkserver or multiprocessing's resource tracker.
    # A fresh interpreter, as a trainer is: the forkserver starts with the loader.
    script = f"""
import itertools, os, signal
from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.sources import open_shards
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.stream import PairStream, pair_loader
from ssit_dist.data.loading.workers import start_batches
shards = open_shards([{str(shards)!r}])
plan = EpochPlan(tuple(shards.lengths), 1, 2, 4, 5, shuffle_buffer=8)
stream = PairStream(shards, PairAugment(32, shards.mean, shards.std), plan, rank=0)
batches = start_batches(pair_loader(stream))
import psutil
helpers = psutil.Process().children(recursive=True)  # workers, forkserver, resource tracker
for helper in helpers:
    helper.send_signal(signal.SIGTERM)
    helper.send_signal(signal.SIGUSR1)
loaded = len(list(itertools.islice(batches, 4)))
print(loaded, all(h.is_running() and h.status() != "zombie" for h in helpers), flush=True)
print(" ".join(str(p.pid) for p in helpers), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # then the trainer dies without any cleanup
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    loaded, helpers = result.stdout.splitlines()
    assert loaded == "4 True" and len(helpers.split()) >= 4  # two workers, the forkserver, the tracker
    # Its loader workers and their forkserver must not outlive it.
    deadline = time.monotonic() + 20
    while any(
        psutil.pid_exists(int(pid)) and psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
        for pid in helpers.split()
    ):
        assert time.monotonic() < deadline, f"loader processes {helpers} outlived the trainer"
        time.sleep(0.2)


@pytest.mark.multiprocess
def test_each_epochs_workers_start_with_what_they_need_already_imported(shards: Path, tmp_path: Path) -> None:
    # Every epoch starts new workers, and each one runs the trainer's main module again; forked from a
    # forkserver that holds the data modules, that costs a fork, not seconds of imports per worker per
    # epoch. The model side (timm, and torch's compiler under it) is the trainer's alone.
    log = tmp_path / "starts.log"
    trainer = tmp_path / "trainer.py"
    trainer.write_text(f"""
import itertools, sys
with open({str(log)!r}, "a") as f:
    print(__name__, "ssit_dist.data.loading.stream" in sys.modules, "timm" in sys.modules, file=f)
from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.sources import open_shards
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.stream import PairStream, pair_loader
from ssit_dist.data.loading.workers import start_batches, stop_batches
if __name__ == "__main__":
    from ssit_dist.models.ssit import SSiT  # the trainer builds its model
    shards = open_shards([{str(shards)!r}])
    plan = EpochPlan(tuple(shards.lengths), 1, 2, 4, 5, shuffle_buffer=8)
    loader = pair_loader(PairStream(shards, PairAugment(32, shards.mean, shards.std), plan, rank=0))
    for epoch in range(3):
        batches = start_batches(loader)
        assert len(list(itertools.islice(batches, 5))) == 5
        stop_batches(batches)
""")
    result = subprocess.run([sys.executable, str(trainer)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    starts = log.read_text().splitlines()
    assert starts == ["__main__ False False"] + ["__mp_main__ True False"] * 6, starts  # 3 epochs of 2 workers


@pytest.mark.multiprocess
def test_a_worker_running_launch_pretrain_again_imports_none_of_the_trainer() -> None:
    # What multiprocessing does with the main script in each new loader worker.
    script = Path(__file__).resolve().parents[3] / "launch" / "pretrain.py"
    probe = f"import runpy, sys; runpy.run_path({str(script)!r}, run_name='__mp_main__'); "
    probe += "print(sorted(m for m in ('ssit_dist.train.pretrain', 'timm', 'deepspeed') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_verify_names_a_changed_or_cut_shard(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit inside a JPEG: same size, other content
    shard.write_bytes(bytes(data))
    verify_shards(open_shards([copy]), "size")  # size cannot see it
    with pytest.raises(ShardIndexError, match=rf"{shard}: sha256 does not match"):
        verify_shards(open_shards([copy]), "sha256", show_progress=True)
    verify_shards(open_shards([copy]), "none")

    shard.write_bytes(bytes(data[:-512]))
    with pytest.raises(ShardIndexError, match=rf"{shard} has {len(data) - 512} bytes, its _info.json says {len(data)}"):
        verify_shards(open_shards([copy]), "size")
