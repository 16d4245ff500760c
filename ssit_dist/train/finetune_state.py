"""Resumable state of a fine-tuning run, saved after every epoch and where a stop came within one.

RUN_DIR/checkpoints/epochNNNN/ (epochNNNN-batchBBBBBB/ for a stop: NNNN epochs and BBBBBB batches of the
next) holds the model (safetensors), the optimizer state (tensors and numbers only, read back with
weights_only=True) and state.json (epoch, batch, schedule, best score so far, the per-epoch history).
The folder is written under a temporary name and renamed, then `latest` is replaced atomically, then
older checkpoints are removed: a kill at any moment leaves a complete checkpoint to resume from. Only
the main process writes; every process reads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ssit_dist import atomic
from ssit_dist.train.checkpoint import checkpoint_dir, failed_write, latest_tag, publish, write_problem
from ssit_dist.train.resume import ResumeError, ResumePlan, agree_on_plan, choose_plan

FILES = ("model.safetensors", "optimizer.pt", "state.json")


class CheckpointWriteError(RuntimeError):
    """A fine-tuning checkpoint could not be written; the message says what `latest` still names."""


def save_state(
    run_dir: Path,
    epoch: int,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    batch: int = 0,
) -> str:
    """Checkpoint `epoch` complete epochs (and `batch` batches of the next one); returns its tag."""
    folder = checkpoint_dir(run_dir)
    tag = f"epoch{epoch:04d}" + (f"-batch{batch:06d}" if batch else "")
    tmp = folder / f"{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch, "batch": batch}, indent=2) + "\n")
        atomic.replace_folder(tmp, folder / tag)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(failed_write(run_dir, tag, [write_problem(e, folder)])) from e
    publish(folder, tag, "epoch", keep=1)
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


def plan_resume(run_dir: Path, fingerprint: dict[str, Any], mode: str, device: torch.device) -> ResumePlan:
    """Collective: the resume plan of the fine-tuning run in `run_dir`, agreed on by every process
    (train/resume.py)."""

    def choose() -> ResumePlan:
        tag = latest_tag(run_dir)
        state = read_state(run_dir, tag) if tag else {}
        return choose_plan(tag, int(state.get("epoch", 0)), state.get("fingerprint"), fingerprint, mode, run_dir, 0)

    return agree_on_plan(choose, lambda tag: unreadable(run_dir, tag), checkpoint_dir(run_dir), device)
