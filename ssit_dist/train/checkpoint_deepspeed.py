"""The DeepSpeed adapter of train/checkpoint.py: pretraining's checkpoints.

RUN_DIR/checkpoints/stepNNNNNNNN/ holds DeepSpeed's own files plus our client state (step, config, RNG
state), the fp32 momentum network (momentum.pt, written once by rank 0) and `ssit_meta.json`
(architecture, normalisation, the run's fingerprint, and every file of the checkpoint with its size,
written after every rank finished); `publish` then points `latest` at it.

A resume onto another world size under ZeRO (`resume=reshard`) first converts the checkpoint with
DeepSpeed's universal checkpoint (ds_to_universal) into `universal/TAG/` beside it, loads that with
`load_universal`, and deletes the conversion once every rank has loaded it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ssit_dist import atomic
from ssit_dist.dist import RankFailure, barrier, join_skipped_barrier, on_rank_zero, problems_on_ranks
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.train import checkpoint
from ssit_dist.train.checkpoint import (
    LATEST,
    ResumeError,
    ResumePlan,
    checkpoint_dir,
    failed_write,
    publish,
    write_problem,
)

META = "ssit_meta.json"
MOMENTUM = "momentum.pt"  # the fp32 momentum network, written once (rank 0), not in every rank's DeepSpeed file
UNIVERSAL = "universal"


def read_meta(run_dir: Path, tag: str) -> dict[str, Any]:
    path = checkpoint_dir(run_dir) / tag / META
    if not path.is_file():
        raise ResumeError(
            f"checkpoint {checkpoint_dir(run_dir) / tag} is incomplete: {META} is missing (the save "
            f"was interrupted); point {checkpoint_dir(run_dir) / LATEST} at an earlier checkpoint"
        )
    return json.loads(path.read_text())


def unreadable_files(run_dir: Path, tag: str) -> list[str]:
    """Files of checkpoint `tag` that this process cannot read as they were written (missing, other
    size, no permission): on a node-local disk or a stale NFS view, one rank may see what another does
    not. Empty when the checkpoint is complete here."""
    folder = checkpoint_dir(run_dir) / tag
    problems = []
    for name, size in read_meta(run_dir, tag).get("files", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, {size} were written")
        elif not os.access(path, os.R_OK):
            problems.append(f"{path} is not readable")
    return problems


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META
    }


def save(
    engine: Any,
    run_dir: Path,
    step: int,
    client_state: dict[str, Any],
    meta: EncoderMeta,
    keep: int,
    device: torch.device,
    momentum: dict[str, Any] | None = None,
) -> str:
    """Collective: every rank calls it. `meta` (architecture, sizes, normalisation, zero stage,
    fingerprint) is written beside DeepSpeed's files with the list of files; `momentum` (the momentum
    network's state, the same on every rank) by rank 0 alone into MOMENTUM: as client state, ZeRO-3,
    where every rank writes its own model-states file, would store it once per rank. Rank 0's own work (the
    folder, the meta, the `latest` swap, pruning) is agreed on: if it fails, every rank raises
    RankFailure naming the file and the OS error, and the previous checkpoint stays `latest`."""
    tag = f"step{step:08d}"
    folder = checkpoint_dir(run_dir)
    on_rank_zero(
        lambda: (folder / tag).mkdir(parents=True, exist_ok=True), device, f"creating checkpoint {folder / tag}"
    )
    try:
        engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
        problem = None
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
        problem = write_problem(e, folder)
        join_skipped_barrier()
    failed = problems_on_ranks(problem, device)
    if failed:
        on_rank_zero(lambda: shutil.rmtree(folder / tag, ignore_errors=True), device, f"removing {folder / tag}")
        raise RankFailure(failed_write(run_dir, tag, failed))

    def finish() -> None:
        try:
            if momentum is not None:
                atomic.write_with(folder / tag / MOMENTUM, lambda tmp: torch.save(momentum, tmp))
            atomic.write_json(folder / tag / META, {**meta.to_json(), "files": _files(folder / tag)})
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            shutil.rmtree(folder / tag, ignore_errors=True)
            raise RankFailure(failed_write(run_dir, tag, [write_problem(e, folder)])) from e
        publish(folder, tag, "step", keep)

    on_rank_zero(finish, device, f"finishing checkpoint {folder / tag}")
    return tag


def plan_resume(
    run_dir: Path, fingerprint: dict[str, Any], mode: str, zero_stage: int, device: torch.device
) -> ResumePlan:
    """Collective: the resume plan of the pretraining run in `run_dir`, agreed on by every rank."""

    def stored(tag: str) -> tuple[int, dict[str, Any] | None]:
        meta = read_meta(run_dir, tag)
        return int(meta["step"]), meta.get("fingerprint")

    return checkpoint.plan_resume(
        run_dir, fingerprint, mode, device, stored, lambda tag: unreadable_files(run_dir, tag), zero_stage
    )


def to_universal(run_dir: Path, tag: str, device: torch.device) -> None:
    """Collective. Rank 0 converts checkpoint `tag` into DeepSpeed's universal format (one file per
    parameter and optimizer state, free of any data-parallel partitioning) under
    checkpoints/universal/TAG, written under a temporary name and renamed when complete; every rank
    then checks that it sees the result (a shared file system is needed, as for any resume)."""
    universal = checkpoint_dir(run_dir) / UNIVERSAL
    target = universal / tag

    def convert() -> None:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        if target.is_dir():
            return  # converted by an earlier launch that failed later
        tmp = universal / f"{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # One worker each: the conversion runs inside a training process, where forking a pool is unsafe.
        # The checkpoint read is this run's own (its pickled optimizer state is DeepSpeed's format).
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(checkpoint_dir(run_dir) / tag),
                output_folder=str(tmp),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )
        atomic.replace_folder(tmp, target)

    on_rank_zero(convert, device, f"converting {checkpoint_dir(run_dir) / tag} to a universal checkpoint in {target}")
    missing = problems_on_ranks(None if target.is_dir() else f"{target} is not there", device)
    if missing:
        raise ResumeError(
            f"{target}, written by rank 0, is not visible on every rank:\n  "
            + "\n  ".join(missing)
            + "\nresume=reshard needs the run folder on a file system every node shares"
        )


def load(engine: Any, run_dir: Path, plan: ResumePlan, device: torch.device) -> dict[str, Any]:
    """Collective. Load the checkpoint `plan` names into `engine` on every rank (from its universal
    conversion for a reshard, made by `to_universal` and deleted here once loaded); returns the
    client state (step, momentum network, RNG)."""
    assert plan.tag is not None
    folder = checkpoint_dir(run_dir) / (UNIVERSAL if plan.mode == "reshard" else "")
    _, client_state = engine.load_checkpoint(str(folder), tag=plan.tag)
    if client_state is None:
        raise ResumeError(f"checkpoint {folder / plan.tag} could not be loaded by DeepSpeed")
    momentum = checkpoint_dir(run_dir) / plan.tag / MOMENTUM
    if momentum.is_file():  # older checkpoints kept it in the client state
        client_state["momentum"] = torch.load(momentum, map_location="cpu", weights_only=True)
    if plan.mode == "reshard":
        barrier(device)
        on_rank_zero(lambda: shutil.rmtree(folder, ignore_errors=True), device, f"removing {folder}")
    return client_state
