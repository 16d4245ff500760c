"""Failing safely on 2 CPU ranks (gloo): resumes that refuse a changed run, dangling and incomplete
checkpoints, a rank 0 that cannot write, sources that yield nothing, and CLI commands that must not
destroy other files. Real DeepSpeed runs of a tiny ViT on real photographs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import invoke_cli
from ssit_dist.dist import free_port
from ssit_dist.models.ssit import OnlineNetwork
from ssit_dist.train.checkpoint import ResumeError, choose_plan
from tiny_runs import ROOT, env, launch, rows, short, torchrun

pytestmark = pytest.mark.multiprocess


def test_a_changed_run_is_refused_by_name_and_force_resumes(shards: Path, short_run: Path, tmp_path: Path) -> None:
    cfg = short(tmp_path, shards, "run")
    shutil.copytree(short_run, tmp_path / "run")
    run_dir = tmp_path / "run"
    assert (run_dir / "fingerprint.json").is_file()

    # torchrun itself exits 1 whatever its ranks' code; theirs is 2 (a config problem) and it says so.
    result = launch(cfg, "global_batch=4", "epochs=2")
    assert result.returncode != 0 and "(exitcode: 2)" in result.stderr, result.stderr[-2000:]
    assert (
        "global_batch: 8 -> 4" in result.stderr
        and "epochs: 1 -> 2" in result.stderr
        and "resume=force" in result.stderr
    )

    result = launch(cfg, nproc=1)  # a requeue onto fewer ranks
    assert result.returncode != 0 and "(exitcode: 2)" in result.stderr, result.stderr[-2000:]
    assert "world_size: 2 -> 1" in result.stderr and "resume=reshard" in result.stderr

    # Forced: weights, optimizer and momentum network from step 2; schedule and data re-derived.
    result = launch(cfg, "global_batch=4", "epochs=2", "resume=force")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume=force" in result.stderr and "global_batch: 8 -> 4" in result.stderr
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4]  # no duplicate rows, continued at 3
    assert json.loads((run_dir / "fingerprint.json").read_text())["global_batch"] == 4


@pytest.mark.parametrize("mode", ["auto", "force", "reshard"])
def test_a_checkpoint_with_other_optimizer_groups_is_refused_in_every_mode(tmp_path: Path, mode: str) -> None:
    # As a checkpoint written before the momentum network's parameters had a group of their own records
    # it: no `optimizer_groups`. DeepSpeed would fail deep inside its load (ZeRO 1/2: "parameter-alignment").
    current = {"world_size": 2, "optimizer_groups": list(OnlineNetwork.OPTIMIZER_GROUPS)}
    old = {"world_size": 4 if mode == "reshard" else 2}
    with pytest.raises(ResumeError) as refused:
        choose_plan("step-000002", 2, old, current, mode, tmp_path, zero_stage=2)
    message = str(refused.value)
    assert "one group of every parameter" in message and "encoder+projector" in message, message
    assert "ssit-dist export" in message and "model.init=" in message, message
    assert choose_plan("step-000002", 2, current, current, mode, tmp_path, zero_stage=2).mode == "resume"


def test_a_dangling_latest_or_a_missing_rank_file_stops_every_rank(
    shards: Path, short_run: Path, tmp_path: Path
) -> None:
    cfg = short(tmp_path, shards, "run")
    shutil.copytree(short_run, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    assert (folder / "latest").read_text() == "step00000002"
    (folder / "latest").write_text("step00000009")
    result = launch(cfg)
    assert result.returncode != 0
    assert (
        f"{folder / 'latest'} names checkpoint 'step00000009'" in result.stderr
        and str(folder / "step00000009") in result.stderr
    )

    (folder / "latest").write_text("step00000002")
    rank1 = next((folder / "step00000002").glob("*rank_1*optim_states.pt"))  # one rank's ZeRO partition
    rank1.unlink()
    started = time.monotonic()
    result = launch(cfg)
    assert result.returncode != 0 and time.monotonic() - started < 120
    assert f"{rank1} is missing" in result.stderr and "rank 0 on" in result.stderr and "rank 1 on" in result.stderr
    assert [r["step"] for r in rows(tmp_path / "run")] == [1, 2]  # nothing appended


def test_rank_zero_failing_to_write_stops_every_rank(shards: Path, tmp_path: Path) -> None:
    cfg = short(tmp_path, shards, "run", steps_per_epoch=4)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step00000002").write_text("a file where the step-2 checkpoint folder must go")
    started = time.monotonic()
    result = launch(cfg)
    assert result.returncode != 0 and time.monotonic() - started < 120  # within the timeout, no hang
    assert f"creating checkpoint {folder / 'step00000002'} failed on rank 0" in result.stderr
    assert result.stderr.count("failed on rank 0") >= 2  # both ranks stopped with the named error
    assert (folder / "latest").read_text() == "step00000001"


def _python(cfg: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    e = env()
    e.update(MASTER_PORT=str(free_port()))
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )


def test_a_source_that_yields_nothing_ends_the_run_naming_it(shards: Path, tmp_path: Path) -> None:
    stats = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "workers": 0}
    result = _python(short(tmp_path, shards, "pipe", data={"shards": ["pipe:false"], **stats}))
    assert result.returncode == 2 and "pipe:false" in result.stderr  # opened at start-up: fails fast

    # A tar of samples without jpg / sal.png: every sample is skipped, the run stops after the bound.
    empty = tmp_path / "nosal-000000.tar"
    with tarfile.open(empty, "w") as tar:
        for i in range(4):
            info = tarfile.TarInfo(f"s{i}.txt")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    cfg = short(tmp_path, shards, "nosal", data={"shards": [str(empty)], "empty_timeout_s": 3, **stats})
    started = time.monotonic()
    result = _python(cfg)
    assert result.returncode == 1 and time.monotonic() - started < 120
    assert "no usable sample for 3 s" in result.stderr and str(empty) in result.stderr


def test_a_hung_read_stops_every_rank_at_the_stall_timeout(shards: Path, tmp_path: Path) -> None:
    # Once the run trains, every shard is swapped for a named pipe nobody writes to: the loader workers'
    # next open blocks, as a read on a hung NFS mount does.
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    # 10 s: more than a loaded machine takes to start the workers and bring the first batch (3 s was not).
    cfg = short(
        tmp_path, copy, "hung", steps_per_epoch=400, checkpoint_every=1000, data__stall_timeout_s=10, data__workers=1
    )
    trainer = subprocess.Popen(torchrun(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        metrics = tmp_path / "hung" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().strip()):
            if time.monotonic() > deadline or trainer.poll() is not None:
                raise AssertionError(f"the run never reached its first step: {trainer.communicate()[1][-3000:]}")
            time.sleep(0.2)
        for tar in copy.glob("*.tar"):
            os.mkfifo(tmp_path / "fifo")
            os.replace(tmp_path / "fifo", tar)
        started = time.monotonic()
        _, stderr = trainer.communicate(timeout=120)
    finally:
        trainer.kill()
    assert trainer.returncode != 0 and "(exitcode: 1)" in stderr, stderr[-3000:]
    assert "the data loader delivered no batch for 10 s (data.stall_timeout_s)" in stderr, stderr[-4000:]
    assert time.monotonic() - started < 55  # the stall timeout, not the 60 s collective timeout


def test_a_changed_shard_stops_every_rank_naming_it(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = sorted(copy.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = launch(short(tmp_path, copy, "run", data={"shards": [str(copy)], "verify": "sha256", "workers": 1}))
    assert result.returncode != 0 and "(exitcode: 2)" in result.stderr, result.stderr[-2000:]
    assert (
        "rank 0 on" in result.stderr
        and "rank 1 on" in result.stderr
        and f"{shard}: sha256 does not match" in result.stderr
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_shard_overwrite_keeps_foreign_files_and_export_keeps_names(
    graded_dir: Path, short_run: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in sorted(p.name for p in graded_dir.glob("*.jpeg"))[:4]:
        (src / name).symlink_to(graded_dir / name)
    out = tmp_path / "out"
    invoke_cli("shard", src, out, "--size", 32)
    (out / "mine.tar").write_bytes(b"not ours")
    (out / "notes.txt").write_text("mine")
    invoke_cli("shard", src, out, "--size", 32, "--overwrite")
    assert (out / "mine.tar").read_bytes() == b"not ours" and (out / "notes.txt").read_text() == "mine"
    assert (out / "train-000000.tar").is_file() and (out / "_info.json").is_file()

    shutil.copytree(short_run, tmp_path / "run")
    target = tmp_path / "exp" / "run1.5"
    invoke_cli("export", tmp_path / "run", "-o", target)
    assert (tmp_path / "exp" / "run1.5.safetensors").is_file() and (tmp_path / "exp" / "run1.5.json").is_file()
    before = (tmp_path / "exp" / "run1.5.safetensors").read_bytes()
    refused = invoke_cli("export", tmp_path / "run", "-o", target, "--tag", "step00000001", check=False)
    assert refused.exit_code != 0 and "--overwrite" in refused.stderr
    assert (tmp_path / "exp" / "run1.5.safetensors").read_bytes() == before
    invoke_cli("export", tmp_path / "run", "-o", target, "--tag", "step00000001", "--overwrite")
    assert (tmp_path / "exp" / "run1.5.safetensors").read_bytes() != before
    (tmp_path / "run" / "checkpoints" / "step00000001" / "ssit_meta.json").unlink()  # as an interrupted save leaves it
    refused = invoke_cli(
        "export", tmp_path / "run", "-o", tmp_path / "exp" / "other", "--tag", "step00000001", check=False
    )
    assert refused.exit_code != 0 and "incomplete" in refused.stderr


def test_tensorboard_holds_each_step_once_after_a_resume(shards: Path, short_run: Path, tmp_path: Path) -> None:
    # A run killed after it logged step 2 and before that step's checkpoint was complete: `latest` names
    # step 1, and the relaunch trains and logs step 2 again, beside the killed run's event file.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = short(tmp_path, shards, "run")
    shutil.copytree(short_run, tmp_path / "run")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "latest").write_text("step00000001")
    result = launch(cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = rows(run_dir)
    assert [r["step"] for r in logged] == [1, 2]  # metrics.jsonl was trimmed to step 1, then step 2 appended

    def points(purge: bool) -> dict[str, list[tuple[int, float]]]:
        board = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=purge).Reload()
        return {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}

    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [step for step, _ in points(purge=False)["contrastive_loss"]] == [1, 2, 2]  # both runs wrote step 2
    shown = points(purge=True)  # what TensorBoard shows: the killed run's step 2 purged by the relaunch
    assert "contrastive_loss" in shown and all([step for step, _ in p] == [1, 2] for p in shown.values()), shown
    for step, value in shown["contrastive_loss"]:
        assert value == pytest.approx(logged[step - 1]["contrastive_loss"], rel=1e-6)  # stored as float32


def test_deepspeeds_zero_to_fp32_gives_the_exports_weights(short_run: Path, tmp_path: Path) -> None:
    # The tool DeepSpeed users know, as DeepSpeed leaves it beside ZeRO 1-3 checkpoints (under ZeRO-0
    # it leaves none, and its module fails): the same encoder as `ssit-dist export`, under the online
    # network's key names ("encoder." before timm's).
    from safetensors.torch import load_file

    shutil.copytree(short_run, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    tool = [sys.executable, str(folder / "zero_to_fp32.py"), str(folder), str(tmp_path / "fp32")]
    result = subprocess.run(
        [*tool, "--tag", "step00000002", "--safe_serialization"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    invoke_cli("export", tmp_path / "run", "-o", tmp_path / "encoder", "--tag", "step00000002")
    ours = load_file(str(tmp_path / "encoder.safetensors"))
    encoder = {k.removeprefix("encoder."): v for k, v in theirs.items() if k.startswith("encoder.")}
    assert encoder.keys() == ours.keys() and len(ours) > 10
    for key in ours:
        assert torch.equal(encoder[key], ours[key]), key


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_exported_files_follow_the_umask(short_run: Path, tmp_path: Path, umask: int, mode: int) -> None:
    # safetensors creates its files 0600; colleagues on a shared file system must read what the umask lets them.
    shutil.copytree(short_run, tmp_path / "run")
    before = os.umask(umask)
    try:
        invoke_cli("export", tmp_path / "run", "-o", tmp_path / "files" / "encoder")
        invoke_cli("export", tmp_path / "run", "-o", tmp_path / "timm", "--format", "timm")
    finally:
        os.umask(before)
    written = [*(tmp_path / "files").iterdir(), *(tmp_path / "timm").iterdir()]
    assert {p.name for p in written} >= {"encoder.safetensors", "encoder.json", "model.safetensors", "config.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 3 MB file system (tmpfs) at tmp_path/run/checkpoints: room for one tiny checkpoint, not two."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): needs root")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)  # unless the test did


def test_a_full_disk_says_what_failed_and_what_latest_still_names(
    shards: Path, tmp_path: Path, small_disk: Path
) -> None:
    # Each checkpoint of this run takes about 2 MB: the first fits, the second fills the disk.
    cfg = short(tmp_path, shards, "run", steps_per_epoch=3, keep_checkpoints=1)
    result = launch(cfg)
    assert result.returncode != 0 and "(exitcode: 1)" in result.stderr, result.stderr[-3000:]
    assert f"writing checkpoint {small_disk / 'step00000002'} failed" in result.stderr, result.stderr[-3000:]
    assert "rank " in result.stderr and "GB free on its file system" in result.stderr
    assert f"{small_disk / 'latest'} still names step00000001, and a relaunch resumes from it" in result.stderr
    assert sorted(p.name for p in small_disk.glob("step*")) == ["step00000001"]  # the partial one removed
