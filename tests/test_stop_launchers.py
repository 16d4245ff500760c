"""Stopping runs started by DeepSpeed's `deepspeed` runner and by torchrun (tests/test_stop.py has the
helpers and the runs `ssit-dist` starts; two modules, so that the tests' two workers share them)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from stopping import Started, assert_saved_where_it_stopped, run_config

from tiny_runs import ROOT, torchrun

pytestmark = pytest.mark.multiprocess


def _deepspeed(cfg: Path) -> list[str]:
    from ssit_dist.ports import free_port

    runner = Path(sys.executable).with_name("deepspeed")
    return [str(runner), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "pretrain.py")] + [
        "--config",
        str(cfg),
    ]


def test_sigterm_to_the_deepspeed_runner_alone_stops_its_ranks(shards: Path, tmp_path: Path) -> None:
    # The runner dies of SIGTERM (DeepSpeed installs no handler there) and its launch.py lives on: the
    # ranks see their launcher gone, save and end, and launch.py with them.
    run = Started(_deepspeed(run_config(tmp_path, shards, "orphaned")), tmp_path, "orphaned")
    run.wait_for_step(tmp_path / "orphaned", 2)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == -signal.SIGTERM
    assert run.left_behind(timeout=120) == []
    assert_saved_where_it_stopped(tmp_path / "orphaned")


def test_ctrl_c_under_deepspeed_saves_at_a_slow_step(shards: Path, tmp_path: Path) -> None:
    # Every process of the group gets SIGINT; DeepSpeed's launch.py also sends the ranks SIGTERM, and
    # exits 1 whatever they do (its own code): the ranks save all the same.
    run = Started(_deepspeed(run_config(tmp_path, shards, "ds_slow", slow=True)), tmp_path, "ds_slow")
    run.wait_for_step(tmp_path / "ds_slow", 2)
    run.signal_group(signal.SIGINT)
    run.wait()
    assert run.left_behind() == []
    stopped = assert_saved_where_it_stopped(tmp_path / "ds_slow")
    assert f"stopped at step {stopped}" in run.stderr()


def test_ctrl_c_under_torchrun_saves(shards: Path, tmp_path: Path) -> None:
    # torchrun's agent passes the SIGINT on to ranks that already had it from the terminal: the ranks
    # take the two as one press (stop.SAME_PRESS_S) and save.
    run = Started(torchrun(run_config(tmp_path, shards, "torchrun")), tmp_path, "torchrun")
    run.wait_for_step(tmp_path / "torchrun", 2)
    run.signal_group(signal.SIGINT)
    run.wait()
    assert run.left_behind() == []
    stopped = assert_saved_where_it_stopped(tmp_path / "torchrun")
    assert f"stopped at step {stopped}" in run.stderr()
