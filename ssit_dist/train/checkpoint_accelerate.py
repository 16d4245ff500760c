"""The Accelerate adapter of train/checkpoint.py: the checkpoints of fine-tuning and segmentation.

RUN_DIR/checkpoints/TAG/ holds the model (safetensors), the optimizer state (tensors and numbers only,
read back with weights_only=True) and state.json (where the run stands, its schedule, its history, the
run's fingerprint). The folder is written under a temporary name and renamed, then `publish` replaces
`latest` atomically and removes older checkpoints: a kill at any moment leaves a complete checkpoint to
resume from. Only the main process writes; every process reads.

Tags: fine-tuning `epochNNNN` (`epochNNNN-batchBBBBBB` for a stop within the next epoch), segmentation
`stepNNNNNNNN`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ssit_dist import atomic
from ssit_dist.train import checkpoint
from ssit_dist.train.checkpoint import (
    CheckpointWriteError,
    ResumeError,
    ResumePlan,
    checkpoint_dir,
    failed_write,
    publish,
    write_problem,
)

FILES = ("model.safetensors", "optimizer.pt", "state.json")


def save_state(
    run_dir: Path, tag: str, model: dict[str, torch.Tensor], optimizer: dict[str, Any], state: dict[str, Any]
) -> str:
    """Checkpoint `tag` (its letters before the digits name the run's kind of checkpoint; only the newest
    of them is kept); returns the tag. Raises CheckpointWriteError with `failed_write`'s message."""
    folder = checkpoint_dir(run_dir)
    tmp = folder / f"{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        atomic.replace_folder(tmp, folder / tag)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(failed_write(run_dir, tag, [write_problem(e, folder)])) from e
    publish(folder, tag, re.sub(r"\d.*", "", tag), keep=1)
    return tag


def read_state(run_dir: Path, tag: str) -> dict[str, Any]:
    """state.json of checkpoint `tag`; a checkpoint without one is an error naming it."""
    path = checkpoint_dir(run_dir) / tag / "state.json"
    if not path.is_file():
        raise ResumeError(
            f"checkpoint {path.parent} (named by {checkpoint_dir(run_dir) / 'latest'}) is incomplete: "
            "state.json is missing; delete the folder and `latest` to start again"
        )
    return json.loads(path.read_text())


def unreadable(run_dir: Path, tag: str) -> list[str]:
    """The files of checkpoint `tag` this process cannot read (missing, no permission): on node-local
    disks or a stale NFS view one process may not see what another wrote."""
    folder = checkpoint_dir(run_dir) / tag
    return [
        f"{folder / name} is {'missing' if not (folder / name).is_file() else 'not readable'}"
        for name in FILES
        if not ((folder / name).is_file() and os.access(folder / name, os.R_OK))
    ]


def load_state(run_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state, state.json) of checkpoint `tag`."""
    folder = checkpoint_dir(run_dir) / tag
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    return load_file(str(folder / "model.safetensors")), optimizer, read_state(run_dir, tag)


def plan_resume(
    run_dir: Path, fingerprint: dict[str, Any], mode: str, device: torch.device, position: str
) -> ResumePlan:
    """Collective: the resume plan of the run in `run_dir`, agreed on by every process; `position`: the
    key of state.json that says where the run stands ("epoch", "step")."""

    def stored(tag: str) -> tuple[int, dict[str, Any] | None]:
        state = read_state(run_dir, tag)
        return int(state.get(position, 0)), state.get("fingerprint")

    return checkpoint.plan_resume(run_dir, fingerprint, mode, device, stored, lambda tag: unreadable(run_dir, tag))
