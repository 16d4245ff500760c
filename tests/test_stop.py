"""Stopping a run the ways users do (Ctrl-C, `kill`, `timeout`, a launcher killed on its own), for every
way a run is started on one machine: `ssit-dist pretrain` and `ssit-dist finetune` (our launcher), DeepSpeed's
`deepspeed` runner and torchrun. Real processes, real ranks; each case checks the checkpoint at the step
reached, the exit code, and that no process of the run (ranks, loader workers, their forkservers) is left.

Ctrl-C at a terminal is SIGINT to the command's whole process group: the tests start each command in a
session of its own and signal that group (`os.killpg`), or the command's process alone (`kill PID`)."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stopping import TOTAL_STEPS, Started, assert_saved_where_it_stopped, latest, run_config, steps

from conftest import CLI
from tiny_runs import assert_same_encoders
from tiny_runs import rows as metrics

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


def test_sigterm_to_ssit_dist_finetune_saves_in_the_epoch_and_resumes_exactly(
    labelled_shards: Path, tmp_path: Path
) -> None:
    tiny = {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}

    def finetune(run_dir: Path) -> list[str]:
        command = [str(CLI), "finetune", "--nproc", "2", "--train", f"{labelled_shards}:train"]
        command += ["--val", f"{labelled_shards}:val", "--init", "random", "--run-dir", str(run_dir)]
        return command + ["img_size=32", "epochs=3", "global_batch=4", "workers=1", f"timm_kwargs={json.dumps(tiny)}"]

    whole = Started(finetune(tmp_path / "whole"), tmp_path, "whole")
    assert whole.wait(timeout=400) == 0, whole.stderr()[-3000:]
    run = Started(finetune(tmp_path / "stopped"), tmp_path, "stopped")
    run.wait_for_step(tmp_path / "stopped", 1)  # one epoch ended: the stop comes within a later one
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stderr()[-3000:]
    stop = re.search(r"stopped in epoch (\d+) after batch (\d+) of \d+; relaunch to resume", run.stderr())
    assert stop, run.stderr()[-3000:]
    epoch, batch = int(stop[1]), int(stop[2])
    assert latest(tmp_path / "stopped") == f"epoch{epoch - 1:04d}-batch{batch:06d}"
    assert run.left_behind() == []

    resumed = Started(finetune(tmp_path / "stopped"), tmp_path, "resumed")
    assert resumed.wait(timeout=400) == 0, resumed.stderr()[-3000:]
    rows = [metrics(tmp_path / "whole"), metrics(tmp_path / "stopped")]
    assert [r["epoch"] for r in rows[1]] == list(range(1, 4))
    for a, b in zip(*rows, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6) and b["val_qwk"] == a["val_qwk"]
    final = [load_file(str(tmp_path / name / "final.safetensors")) for name in ("whole", "stopped")]
    for key in final[0]:
        torch.testing.assert_close(final[0][key], final[1][key], rtol=0, atol=0, msg=key)


def test_ctrl_c_to_ssit_dist_segment_saves_the_step_and_resumes_exactly(tmp_path: Path) -> None:
    tiny = 'timm_kwargs={"patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3}'

    def segment(out: Path) -> list[str]:
        command = [str(CLI), "segment", "--nproc", "2", "--synthetic", "--init", "random", "--out", str(out)]
        return command + ["iterations=30", "warmup=5", "eval_every=10", "img_size=64", "resize=128", "workers=1", tiny]

    whole = Started(segment(tmp_path / "whole"), tmp_path, "whole")
    assert whole.wait(timeout=400) == 0, whole.stderr()[-3000:]
    run = Started(segment(tmp_path / "stopped"), tmp_path, "stopped")
    run.wait_for_step(tmp_path / "stopped", 1)  # the first validation is written
    run.signal_group(signal.SIGINT)
    assert run.wait() == 0, run.stderr()[-3000:]
    stop = re.search(r"stopped at step (\d+); relaunch to resume", run.stderr())
    assert stop and 10 <= int(stop[1]) < 30, run.stderr()[-3000:]
    assert latest(tmp_path / "stopped") == f"step{int(stop[1]):08d}"
    assert run.left_behind() == []

    resumed = Started(segment(tmp_path / "stopped"), tmp_path, "resumed")
    assert resumed.wait(timeout=400) == 0, resumed.stderr()[-3000:]
    rows = [metrics(tmp_path / "whole"), metrics(tmp_path / "stopped")]
    assert [r["step"] for r in rows[1]] == list(range(10, 31, 10))
    for a, b in zip(*rows, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5) and b["val_dice"] == a["val_dice"]
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("whole", "stopped")]
    assert reports[1]["test"] == reports[0]["test"]
