"""Stopping a run the ways users do (Ctrl-C, `kill`, `timeout`, a launcher killed on its own), for every
way a run is started on one machine: `ssit-dist pretrain` and `ssit-dist finetune` (our launcher), DeepSpeed's
`deepspeed` runner and torchrun. Real processes, real ranks; each case checks the checkpoint at the step
reached, the exit code, and that no process of the run (ranks, loader workers, their forkservers) is left.

Ctrl-C at a terminal is SIGINT to the command's whole process group: the tests start each command in a
session of its own and signal that group (`os.killpg`), or the command's process alone (`kill PID`)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from stopping import TOTAL_STEPS, Started, assert_saved_where_it_stopped, run_config, steps

from conftest import CLI
from tiny_runs import assert_same_encoders

pytestmark = pytest.mark.multiprocess


def _pretrain_cli(cfg: Path) -> list[str]:
    return [str(CLI), "pretrain", "--config", str(cfg), "--nproc", "2"]


def test_ctrl_c_to_ssit_dist_pretrain_saves_exits_0_and_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    whole = Started(_pretrain_cli(run_config(tmp_path, shards, "whole")), tmp_path, "whole")
    assert whole.wait(timeout=400) == 0, whole.stderr()[-3000:]

    cfg = run_config(tmp_path, shards, "stopped")
    run = Started(_pretrain_cli(cfg), tmp_path, "stopped")
    run.wait_for_step(tmp_path / "stopped", 2)
    run.signal_group(signal.SIGINT)
    assert run.wait() == 0, run.stderr()[-3000:]
    stopped = assert_saved_where_it_stopped(tmp_path / "stopped")
    assert f"stopped at step {stopped}; relaunch to resume" in run.stderr()
    assert "Traceback" not in run.stderr()
    assert run.left_behind() == []

    resumed = Started(_pretrain_cli(cfg), tmp_path, "resumed")
    assert resumed.wait(timeout=400) == 0, resumed.stderr()[-3000:]
    assert steps(tmp_path / "stopped") == list(range(1, TOTAL_STEPS + 1))
    assert_same_encoders(tmp_path, "whole", "stopped")


def test_sigterm_to_ssit_dist_pretrain_alone_saves_at_a_slow_step(shards: Path, tmp_path: Path) -> None:
    # `kill PID` or `timeout`: the command alone gets SIGTERM and passes it on to every rank.
    run = Started(_pretrain_cli(run_config(tmp_path, shards, "slow", slow=True)), tmp_path, "slow")
    run.wait_for_step(tmp_path / "slow", 2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stderr()[-3000:]
    stopped = assert_saved_where_it_stopped(tmp_path / "slow")
    assert f"stopped at step {stopped}" in run.stderr()
    assert run.left_behind() == []


def test_a_second_ctrl_c_stops_at_once_without_saving(shards: Path, tmp_path: Path) -> None:
    run = Started(_pretrain_cli(run_config(tmp_path, shards, "twice", slow=True)), tmp_path, "twice")
    run.wait_for_step(tmp_path / "twice", 2)
    run.signal_group(signal.SIGINT)
    time.sleep(0.2)
    run.signal_group(signal.SIGINT)
    assert run.wait() == 128 + signal.SIGINT, run.stderr()[-3000:]
    assert "stopped at once, without saving" in run.stderr()
    assert not (tmp_path / "twice" / "checkpoints" / "latest").exists()  # checkpoint_every is far away
    assert run.left_behind() == []


def test_sigterm_to_ssit_dist_finetune_ends_the_epoch_unsaved_and_exits_0(
    labelled_shards: Path, tmp_path: Path
) -> None:
    # Fine-tuning checkpoints at epoch ends: a stop in an epoch keeps the last one and says so.
    run_dir = tmp_path / "finetune"
    tiny = {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}
    command = [str(CLI), "finetune", "--nproc", "2", "--train", f"{labelled_shards}:train"]
    command += ["--val", f"{labelled_shards}:val", "--init", "random", "--run-dir", str(run_dir)]
    command += ["img_size=32", "epochs=50", "global_batch=4", "workers=1", f"timm_kwargs={json.dumps(tiny)}"]
    run = Started(command, tmp_path, "finetune")
    run.wait_for_step(run_dir, 1)  # one epoch ended
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stderr()[-3000:]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stopped_in = epochs[-1] + 1
    assert f"stopped in epoch {stopped_in} after batch" in run.stderr()
    assert f"the checkpoint of epoch {epochs[-1]} is kept" in run.stderr()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("epoch"))[-1] == (
        f"epoch{epochs[-1]:04d}"
    )
    assert run.left_behind() == []
