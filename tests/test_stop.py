"""Stopping a run the ways users do (Ctrl-C, `kill`, `timeout`, a launcher killed on its own), for every
way a run is started on one machine: `ssit-dist pretrain` and `ssit-dist finetune` (our launcher), DeepSpeed's
`deepspeed` runner and torchrun. Real processes, real ranks; each case checks the checkpoint at the step
reached, the exit code, and that no process of the run (ranks, loader workers, their forkservers) is left.

Ctrl-C at a terminal is SIGINT to the command's whole process group: the tests start each command in a
session of its own and signal that group (`os.killpg`), or the command's process alone (`kill PID`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import CLI, invoke_cli
from tiny_runs import ROOT, config, ds_config, env, torchrun

pytestmark = pytest.mark.multiprocess

MARK = "SSIT_STOP_TEST"
TOTAL_STEPS = 16  # 4 epochs of 4: a stop after the first logged steps comes well before the end
SLOW = {"img_size": 64, "timm_kwargs": {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}}


def _config(tmp: Path, shards: Path, name: str, slow: bool = False) -> Path:
    model = {
        "arch": "vit_small_patch16_224",
        "img_size": 32,
        "proj_hidden": 64,
        "proj_dim": 32,
        "timm_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3},
    }
    if slow:
        model.update(SLOW)
    return config(tmp, shards, name, ds_config(tmp, 2), epochs=4, checkpoint_every=1000, model=model)


class Started:
    """A command started in a session of its own, its output in files, every process it makes marked."""

    def __init__(self, command: list[str], tmp: Path, name: str):
        self.tag, self.name, self.tmp = uuid.uuid4().hex, name, tmp
        self.stderr_path = tmp / f"{name}.stderr"
        with open(tmp / f"{name}.stdout", "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=err, env={**env(), MARK: self.tag}, start_new_session=True
            )

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 300) -> None:
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
        while not (metrics.is_file() and metrics.read_text().count("\n") >= step):
            assert self.proc.poll() is None, f"{self.name} ended before step {step}:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name} did not reach step {step}"
            time.sleep(0.1)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def left_behind(self, timeout: float = 30) -> list[str]:
        """The run's processes still alive after `timeout` seconds (none: every one ended). A loader worker
        still importing the trainer's modules when its rank ended notices a moment later (torch's
        worker watchdog checks every 5 s)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = []
            for p in psutil.process_iter(["pid", "cmdline", "environ"]):
                if (p.info["environ"] or {}).get(MARK) == self.tag:
                    alive.append(f"{p.info['pid']} {' '.join(p.info['cmdline'] or [])[:120]}")
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _assert_saved_where_it_stopped(run_dir: Path) -> int:
    """Every step up to the stop reported, a complete checkpoint of exactly that step, before the end."""
    steps = _steps(run_dir)
    stopped = steps[-1]
    assert steps == list(range(1, stopped + 1)) and stopped < TOTAL_STEPS, steps
    assert _latest(run_dir) == f"step{stopped:08d}"
    return stopped


def _pretrain_cli(cfg: Path) -> list[str]:
    return [str(CLI), "pretrain", "--config", str(cfg), "--nproc", "2"]


def _deepspeed(cfg: Path) -> list[str]:
    from ssit_dist.dist import free_port

    runner = Path(sys.executable).with_name("deepspeed")
    return [str(runner), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "pretrain.py")] + [
        "--config",
        str(cfg),
    ]


def test_ctrl_c_to_ssit_dist_pretrain_saves_exits_0_and_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    whole = Started(_pretrain_cli(_config(tmp_path, shards, "whole")), tmp_path, "whole")
    assert whole.wait(timeout=400) == 0, whole.stderr()[-3000:]

    cfg = _config(tmp_path, shards, "stopped")
    run = Started(_pretrain_cli(cfg), tmp_path, "stopped")
    run.wait_for_step(tmp_path / "stopped", 2)
    run.signal_group(signal.SIGINT)
    assert run.wait() == 0, run.stderr()[-3000:]
    stopped = _assert_saved_where_it_stopped(tmp_path / "stopped")
    assert f"stopped at step {stopped}; relaunch to resume" in run.stderr()
    assert "Traceback" not in run.stderr()
    assert run.left_behind() == []

    resumed = Started(_pretrain_cli(cfg), tmp_path, "resumed")
    assert resumed.wait(timeout=400) == 0, resumed.stderr()[-3000:]
    assert _steps(tmp_path / "stopped") == list(range(1, TOTAL_STEPS + 1))
    for name in ("whole", "stopped"):
        invoke_cli("export", tmp_path / name, "-o", tmp_path / f"{name}_export" / "encoder")
    a = load_file(str(tmp_path / "whole_export" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "stopped_export" / "encoder.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_sigterm_to_ssit_dist_pretrain_alone_saves_at_a_slow_step(shards: Path, tmp_path: Path) -> None:
    # `kill PID` or `timeout`: the command alone gets SIGTERM and passes it on to every rank.
    run = Started(_pretrain_cli(_config(tmp_path, shards, "slow", slow=True)), tmp_path, "slow")
    run.wait_for_step(tmp_path / "slow", 2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0, run.stderr()[-3000:]
    stopped = _assert_saved_where_it_stopped(tmp_path / "slow")
    assert f"stopped at step {stopped}" in run.stderr()
    assert run.left_behind() == []


def test_a_second_ctrl_c_stops_at_once_without_saving(shards: Path, tmp_path: Path) -> None:
    run = Started(_pretrain_cli(_config(tmp_path, shards, "twice", slow=True)), tmp_path, "twice")
    run.wait_for_step(tmp_path / "twice", 2)
    run.signal_group(signal.SIGINT)
    time.sleep(0.2)
    run.signal_group(signal.SIGINT)
    assert run.wait() == 128 + signal.SIGINT, run.stderr()[-3000:]
    assert "stopped at once, without saving" in run.stderr()
    assert not (tmp_path / "twice" / "checkpoints" / "latest").exists()  # checkpoint_every is far away
    assert run.left_behind() == []


def test_sigterm_to_the_deepspeed_runner_alone_stops_its_ranks(shards: Path, tmp_path: Path) -> None:
    # The runner dies of SIGTERM (DeepSpeed installs no handler there) and its launch.py lives on: the
    # ranks see their launcher gone, save and end, and launch.py with them.
    run = Started(_deepspeed(_config(tmp_path, shards, "orphaned")), tmp_path, "orphaned")
    run.wait_for_step(tmp_path / "orphaned", 2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == -signal.SIGTERM
    assert run.left_behind(timeout=120) == []
    _assert_saved_where_it_stopped(tmp_path / "orphaned")


def test_ctrl_c_under_deepspeed_saves_at_a_slow_step(shards: Path, tmp_path: Path) -> None:
    # Every process of the group gets SIGINT; DeepSpeed's launch.py also sends the ranks SIGTERM, and
    # exits 1 whatever they do (its own code): the ranks save all the same.
    run = Started(_deepspeed(_config(tmp_path, shards, "ds_slow", slow=True)), tmp_path, "ds_slow")
    run.wait_for_step(tmp_path / "ds_slow", 2)
    run.signal_group(signal.SIGINT)
    run.wait()
    assert run.left_behind() == []
    stopped = _assert_saved_where_it_stopped(tmp_path / "ds_slow")
    assert f"stopped at step {stopped}" in run.stderr()


def test_ctrl_c_under_torchrun_saves(shards: Path, tmp_path: Path) -> None:
    # torchrun's agent passes the SIGINT on to ranks that already had it from the terminal: the ranks
    # take the two as one press (stop.SAME_PRESS_S) and save.
    run = Started(torchrun(_config(tmp_path, shards, "torchrun")), tmp_path, "torchrun")
    run.wait_for_step(tmp_path / "torchrun", 2)
    run.signal_group(signal.SIGINT)
    run.wait()
    assert run.left_behind() == []
    stopped = _assert_saved_where_it_stopped(tmp_path / "torchrun")
    assert f"stopped at step {stopped}" in run.stderr()


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
