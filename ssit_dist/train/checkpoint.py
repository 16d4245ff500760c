"""Checkpoints of a DeepSpeed run: save, check, find the latest, resume, keep the last K, export.

Layout under RUN_DIR/checkpoints/: one folder per save (`step00001200/`, DeepSpeed's own files plus
our client state: the fp32 momentum network, step, config, RNG state), in it `ssit_meta.json`
(architecture, normalisation, the run's fingerprint, and every file of the checkpoint with its size,
written after every rank finished), and a `latest` file naming the newest complete one. `latest` is
replaced atomically last, so a kill at any moment leaves the previous checkpoint as the one a resume
loads; a `latest` that names a missing or incomplete checkpoint is an error, never a silent restart.

A resume onto another world size under ZeRO (`resume=reshard`) first converts the checkpoint with
DeepSpeed's universal checkpoint (ds_to_universal) into `universal/TAG/` beside it, loads that with
`load_universal`, and deletes the conversion once every rank has loaded it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ssit_dist import atomic
from ssit_dist.dist import (
    RankFailure,
    barrier,
    join_skipped_barrier,
    on_rank_zero,
    problems_on_ranks,
)
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.train.resume import ResumeError, ResumePlan, agree_on_plan, choose_plan

LATEST = "latest"
META = "ssit_meta.json"
MOMENTUM = "momentum.pt"  # the fp32 momentum network, written once (rank 0), not in every rank's DeepSpeed file
UNIVERSAL = "universal"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def publish(folder: Path, tag: str, prefix: str, keep: int) -> None:
    """Point `folder/latest` at the complete checkpoint `tag` (atomically: a reader sees the old name
    or the new, never half), then delete all but the newest `keep` checkpoints named `prefix*`. Used
    by pretraining (stepNNNNNNNN) and fine-tuning (epochNNNN) alike."""
    atomic.write_text(folder / LATEST, tag)
    tags = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix) and not p.name.endswith(".tmp")
    )
    for old in tags[: max(len(tags) - keep, 0)]:
        if old != tag:
            shutil.rmtree(folder / old, ignore_errors=True)


def latest_tag(run_dir: Path) -> str | None:
    """The checkpoint `latest` names, or None when there is no `latest`. A `latest` that names a folder
    that is not there is an error naming both."""
    path = checkpoint_dir(run_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag or not (checkpoint_dir(run_dir) / tag).is_dir():
        raise ResumeError(
            f"{path} names checkpoint {tag!r}, but {checkpoint_dir(run_dir) / tag} is missing; "
            "point it at a complete checkpoint folder beside it, or delete it to start from step 0"
        )
    return tag


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


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free on its file system"
    except OSError:
        return "free space unknown"


def failed_write(run_dir: Path, tag: str, problems: list[str]) -> str:
    """What to tell the user when writing checkpoint `tag` failed (its partial folder already removed):
    what failed where, that `latest` still names the previous checkpoint, and how to go on."""
    folder = checkpoint_dir(run_dir)
    previous = latest_tag(run_dir)
    return (
        f"writing checkpoint {folder / tag} failed:\n  " + "\n  ".join(problems) + "\nIts partial folder is "
        f"removed and nothing else is lost: {folder / LATEST} still names "
        + (f"{previous}, and a relaunch resumes from it" if previous else "no checkpoint, and a relaunch starts over")
        + ". Free space (or repair the file system) before relaunching."
    )


def write_problem(error: Exception, folder: Path) -> str:
    """One rank's failed write, with the free space where it wrote (a full disk is the usual cause)."""
    return f"{error} ({_free_space(folder)})"


def export_encoder(
    run_dir: Path,
    out: Path,
    tag: str | None = None,
    overwrite: bool = False,
    encoder: str = "query",
    layout: str = "files",
) -> list[Path]:
    """An encoder of a checkpoint (default: the latest; `encoder` "query" or "momentum", the reference's
    two) with timm key names. `layout` "files": OUT.safetensors and OUT.json (a suffix of OUT other than
    those two is part of the name); "timm": the folder OUT that timm loads as it is, with a model card
    (models/timm_folder.py). Returns the paths written."""
    from safetensors.torch import save_file

    from ssit_dist.models.timm_folder import save_timm_folder
    from ssit_dist.train.model_card import model_card

    if encoder not in ("query", "momentum"):
        raise ValueError(f"--encoder {encoder!r}: expected query or momentum")
    if layout not in ("files", "timm"):
        raise ValueError(f"--format {layout!r}: expected files or timm")
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)}")
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag} under {checkpoint_dir(run_dir)}")
    problems = unreadable_files(run_dir, tag)  # also names a missing meta: an interrupted save
    if problems:
        raise ResumeError(f"checkpoint {checkpoint_dir(run_dir) / tag} is incomplete: {'; '.join(problems)}")
    stem = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
    targets = [out] if layout == "timm" else [Path(f"{stem}.safetensors"), Path(f"{stem}.json")]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it, or choose another -o")
    body = read_meta(run_dir, tag)
    body.pop("files", None)
    meta = EncoderMeta.from_json(body, str(checkpoint_dir(run_dir) / tag / META))
    meta = meta.with_provenance(checkpoint=str(checkpoint_dir(run_dir) / tag), encoder=encoder)
    weights = _encoder_state(run_dir, tag, int(meta.provenance.get("zero_stage", 0)), encoder)
    if layout == "timm":
        return [save_timm_folder(out, weights, meta, model_card(meta, run_dir, tag, encoder))]
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    # The weights first, then the JSON that describes them: a reader that finds the JSON finds its weights.
    atomic.write_with(targets[0], lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    atomic.write_json(targets[1], meta.to_json())
    return targets


def _encoder_state(run_dir: Path, tag: str, zero_stage: int, encoder: str) -> dict[str, torch.Tensor]:
    """The query encoder from the engine's (ZeRO-gathered) fp32 weights, or the momentum encoder from the
    momentum network the checkpoint keeps beside them; timm key names, fp32, contiguous."""
    folder = checkpoint_dir(run_dir)
    if encoder == "momentum":
        if not (folder / tag / MOMENTUM).is_file():
            raise FileNotFoundError(f"{folder / tag} keeps no {MOMENTUM}: an older checkpoint, from before it was kept")
        state = torch.load(folder / tag / MOMENTUM, map_location="cpu", weights_only=True)
    else:
        state = _full_fp32_state(folder, tag, zero_stage)
    weights = {k[len("encoder.") :]: v.float().contiguous() for k, v in state.items() if k.startswith("encoder.")}
    if not weights:
        raise ValueError(f"checkpoint {tag} under {run_dir} holds no {encoder} encoder weights")
    return weights


def _full_fp32_state(folder: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    model_states = folder / tag / "mp_rank_00_model_states.pt"
    if zero_stage > 0 and any((folder / tag).glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its progress; stdout stays the caller's
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return torch.load(model_states, map_location="cpu", weights_only=True)["module"]


def plan_resume(
    run_dir: Path, fingerprint: dict[str, Any], mode: str, zero_stage: int, device: torch.device
) -> ResumePlan:
    """Collective: the resume plan of the pretraining run in `run_dir`, agreed on by every rank
    (train/resume.py)."""

    def choose() -> ResumePlan:
        tag = latest_tag(run_dir)
        if tag is None:
            return choose_plan(None, 0, None, fingerprint, mode, run_dir, zero_stage)
        meta = read_meta(run_dir, tag)
        return choose_plan(tag, int(meta["step"]), meta.get("fingerprint"), fingerprint, mode, run_dir, zero_stage)

    return agree_on_plan(choose, lambda tag: unreadable_files(run_dir, tag), checkpoint_dir(run_dir), device)


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
