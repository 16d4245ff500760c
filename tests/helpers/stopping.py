"""Runs started and stopped as users stop them, for tests/test_stop.py and tests/test_stop_launchers.py:
a command in a session of its own (Ctrl-C at a terminal is SIGINT to that whole group), its output in
files, and every process it makes marked, so that a test can find any left behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import psutil

from tiny_runs import config, ds_config, env

MARK = "SSIT_STOP_TEST"
TOTAL_STEPS = 16  # 4 epochs of 4: a stop after the first logged steps comes well before the end
SLOW = {"img_size": 64, "timm_kwargs": {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}}


def run_config(tmp: Path, shards: Path, name: str, slow: bool = False) -> Path:
    model = {
        "arch": "vit_small_patch16_224",
        "img_size": 32,
        "proj_hidden": 64,
        "proj_dim": 32,
        "timm_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3},
    }
    if slow:
        model.update(SLOW)
    # Loader workers: no process of a stopped run, workers included, may be left behind.
    return config(tmp, shards, name, ds_config(tmp, 2), epochs=4, checkpoint_every=1000, model=model, data__workers=1)


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


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_saved_where_it_stopped(run_dir: Path) -> int:
    """Every step up to the stop reported, a complete checkpoint of exactly that step, before the end."""
    reported = steps(run_dir)
    stopped = reported[-1]
    assert reported == list(range(1, stopped + 1)) and stopped < TOTAL_STEPS, reported
    assert latest(run_dir) == f"step{stopped:08d}"
    return stopped
