"""resume=reshard: a ZeRO-2 run continued on another world size (2 ranks -> 1 -> 2) through DeepSpeed's
universal checkpoint. The restored state (fp32 master weights, both Adam moments, Adam's step count,
the fp32 momentum network with its compensation) must equal, bit for bit, what a resume on the original
world size restores: the conversion re-partitions values, it computes nothing. Real DeepSpeed engines on
CPU ranks (gloo), real photographs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssit_dist.dist import free_port
from tiny_runs import ROOT, TORCHRUN, env, launch, rows, short

pytestmark = pytest.mark.multiprocess


def restored(cfg: Path, tag: str, step: int, mode: str, nproc: int, out: Path) -> dict[str, torch.Tensor]:
    """What `pretrain.build_and_restore` restores on `nproc` ranks, gathered whole (tests/helpers/restore_probe.py)."""
    command = [
        str(TORCHRUN),
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "helpers" / "restore_probe.py"),
        str(cfg),
        tag,
        str(step),
        mode,
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out)


def assert_same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], step: int) -> None:
    assert before.keys() == after.keys()
    different = [k for k in before if not torch.equal(before[k], after[k])]
    assert not different, f"changed by the reshard: {different[:8]}"
    assert torch.all(before["adam_step"] == step)
    # Not a vacuous comparison: the optimizer state is trained and the momentum network moved.
    assert all(before[k].abs().sum() > 0 for k in before if k.startswith("exp_avg_sq/"))
    assert any(k.startswith("momentum/") for k in before)


def test_reshard_continues_a_zero2_run_on_fewer_then_more_ranks(shards: Path, short_run: Path, tmp_path: Path) -> None:
    cfg = short(tmp_path, shards, "run")  # ZeRO-2, global batch 8, 2 steps per epoch
    run_dir = tmp_path / "run"
    shutil.copytree(short_run, run_dir)  # trained on 2 ranks, steps 1-2
    checkpoints = run_dir / "checkpoints"

    # 2 -> 1: what a 1-rank reshard restores equals what the 2 ranks themselves restore.
    before = restored(cfg, "step00000002", 2, "resume", 2, tmp_path / "two.safetensors")
    after = restored(cfg, "step00000002", 2, "reshard", 1, tmp_path / "one.safetensors")
    assert_same_state(before, after, step=2)
    assert not (checkpoints / "universal").exists()  # the conversion is removed once loaded

    result = launch(cfg, "epochs=2", "resume=reshard", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume=reshard" in result.stderr and "world_size: 2 -> 1" in result.stderr
    assert "resumed (reshard) from step00000002 at step 2" in result.stderr
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4]
    assert json.loads((run_dir / "fingerprint.json").read_text())["world_size"] == 1
    assert len(list((checkpoints / "step00000004").glob("*optim_states.pt"))) == 1  # now one partition
    assert not (checkpoints / "universal").exists()

    # 1 -> 2, from the checkpoint the 1-rank run wrote.
    before = restored(cfg, "step00000004", 4, "resume", 1, tmp_path / "one4.safetensors")
    after = restored(cfg, "step00000004", 4, "reshard", 2, tmp_path / "two4.safetensors")
    assert_same_state(before, after, step=4)

    result = launch(cfg, "epochs=3", "resume=reshard", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size: 1 -> 2" in result.stderr and "at step 4" in result.stderr
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor([r["contrastive_loss"], r["saliency_loss"]])).all() for r in metrics)
    assert len(list((checkpoints / "step00000006").glob("*optim_states.pt"))) == 2
