"""Checkpoints of every trainer, and whether a relaunch resumes from one: the part pretraining (DeepSpeed),
fine-tuning and segmentation (Accelerate) share. How each engine writes and reads its own files is its
adapter's: train/checkpoint_deepspeed.py and train/checkpoint_accelerate.py.

Layout: RUN_DIR/checkpoints/TAG/ per save (pretraining and segmentation `stepNNNNNNNN`, fine-tuning
`epochNNNN`), and `latest` naming the newest complete one. A save is written completely first, then
`latest` is replaced atomically (`publish`), then older saves beyond the run's keep are removed: a kill at
any moment leaves the previous checkpoint as the one a resume loads. A `latest` that names a missing or
incomplete checkpoint is an error, never a silent restart. A failed write removes its partial folder and
says what `latest` still names (`failed_write`).

The resume decision: one plan, taken on rank 0 and agreed on by every rank (`agree_on_plan`), that can
never silently resume the wrong thing. A run records a fingerprint of everything a resume depends on
(train/run.py builds it; world size, batch layout, schedule length, model, data with checksums, ...). A
relaunch compares its own fingerprint with the one stored with the latest checkpoint:
- unchanged: resume (mode "resume");
- changed, with `resume=auto`: refuse, naming every changed field with both values;
- changed, with `resume=force`: resume anyway. Kept from the checkpoint: weights, optimizer state, the
  fp32 momentum network, the step count. Re-derived from the new config: the schedules and the data
  position (the stream is drawn anew from the new data and batch layout);
- a changed world size under ZeRO (DeepSpeed's partitions fit one data-parallel size) is refused even
  with force; `resume=reshard` resumes it through DeepSpeed's universal checkpoint
  (train/checkpoint_deepspeed.py converts it), keeping what force keeps, optimizer state included;
- changed optimizer groups (`optimizer_groups`: pretraining checkpoints written before the momentum
  network's parameters had a group of their own hold one group) are refused in every mode: DeepSpeed
  loads the optimizer state group by group and fails deep inside, so the refusal says what to do instead.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssit_dist import atomic
from ssit_dist.dist import broadcast_from_zero, problems_on_ranks, rank

LATEST = "latest"
FINGERPRINT = "fingerprint.json"


class ResumeError(ValueError):
    """A relaunch that cannot resume as asked; the message names the fields, paths and what to do."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says what `latest` still names."""


@dataclass(frozen=True)
class ResumePlan:
    tag: str | None  # checkpoint to load, None for a fresh start
    step: int  # where it stands: the step (pretraining, segmentation) or the epochs done (fine-tuning)
    mode: str  # fresh | resume | force | reshard
    changed: tuple[str, ...] = ()


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def publish(folder: Path, tag: str, prefix: str, keep: int) -> None:
    """Point `folder/latest` at the complete checkpoint `tag` (atomically: a reader sees the old name
    or the new, never half), then delete all but the newest `keep` checkpoints named `prefix*`."""
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


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def normalised(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as JSON would give it back (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field: old -> new` for every field that differs (dotted names; lists compared whole)."""
    a, b = _flat(normalised(old)), _flat(normalised(new))
    return [
        f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 160 else text[:150] + f"... ({len(text)} chars)"


def write_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    atomic.write_json(folder / FINGERPRINT, normalised(fingerprint), sort_keys=True)


def choose_plan(
    tag: str | None,
    step: int,
    stored: dict[str, Any] | None,
    current: dict[str, Any],
    mode: str,
    where: Path,
    zero_stage: int = 0,
) -> ResumePlan:
    """The plan for a checkpoint `tag` at `step` (None: nothing to resume) whose fingerprint is
    `stored`, relaunched with `current` and `resume=mode`. Raises ResumeError to refuse."""
    if tag is None:
        return ResumePlan(None, 0, "fresh")
    if stored is not None and stored.get("optimizer_groups") != current.get("optimizer_groups"):
        raise ResumeError(_groups_changed(tag, stored, current, where))
    changed = changed_fields(stored, current) if stored is not None else ["fingerprint: missing -> recorded"]
    if not changed:
        return ResumePlan(tag, step, "resume")
    world_changed = stored is not None and stored.get("world_size") != current.get("world_size")
    if mode == "reshard":
        return ResumePlan(tag, step, "reshard" if world_changed and zero_stage > 0 else "force", tuple(changed))
    if mode == "force" and not (world_changed and zero_stage > 0):
        return ResumePlan(tag, step, "force", tuple(changed))
    lines = "\n  ".join(changed)
    if world_changed and stored is not None:
        hint = (
            f"the world size changed from {stored['world_size']} to {current['world_size']}: DeepSpeed's ZeRO "
            f"checkpoints hold one partition per rank; pass resume=reshard to convert the checkpoint to the new "
            f"world size (DeepSpeed's universal checkpoint), or relaunch on {stored['world_size']} ranks"
        )
    else:
        hint = "pass resume=force to resume anyway (the README says what it keeps), or choose another run folder"
    raise ResumeError(f"{where}: checkpoint {tag} was written by a run that differs from this one:\n  {lines}\n{hint}")


def _groups_changed(tag: str, stored: dict[str, Any], current: dict[str, Any], where: Path) -> str:
    written = stored.get("optimizer_groups") or "one group of every parameter"
    return (
        f"{where}: checkpoint {tag} holds its optimizer state in the parameter groups {written}; this version "
        f"of ssit-dist builds {current.get('optimizer_groups')}, and DeepSpeed loads optimizer state group by "
        "group, so no resume mode can continue it. Finish the run with the ssit-dist version that wrote it, "
        "or start a new run from its weights: `ssit-dist export` the checkpoint and pass model.init=<the export>"
    )


def plan_resume(
    run_dir: Path,
    fingerprint: dict[str, Any],
    mode: str,
    device: torch.device,
    stored: Callable[[str], tuple[int, dict[str, Any] | None]],
    unreadable: Callable[[str], list[str]],
    zero_stage: int = 0,
) -> ResumePlan:
    """Collective: the resume plan of the run in `run_dir`, agreed on by every rank. The adapter says
    what checkpoint TAG holds (`stored(tag)`: its step and fingerprint) and which of its files this
    process cannot read (`unreadable(tag)`)."""

    def choose() -> ResumePlan:
        tag = latest_tag(run_dir)
        step, recorded = stored(tag) if tag is not None else (0, None)
        return choose_plan(tag, step, recorded, fingerprint, mode, run_dir, zero_stage)

    return agree_on_plan(choose, unreadable, checkpoint_dir(run_dir), device)


def agree_on_plan(
    choose: Callable[[], ResumePlan], unreadable: Callable[[str], list[str]], folder: Path, device: torch.device
) -> ResumePlan:
    """Collective. Rank 0 alone runs `choose` (it reads `latest` and the stored fingerprint, then
    `choose_plan`); every rank gets the plan, checks with `unreadable(tag)` that it can read every file of
    that checkpoint itself (a node-local disk or a stale NFS view may show one rank what another does not
    see), and all agree before any loads it, or all raise ResumeError naming each rank, host and path.
    `folder`: where the checkpoints and their `latest` live, for the message."""

    def decision() -> ResumePlan | ResumeError:
        try:
            return choose()
        except ResumeError as e:  # raised on every rank, not only on rank 0
            return e

    plan = broadcast_from_zero(decision() if rank() == 0 else None, device)
    if isinstance(plan, ResumeError):
        raise plan
    assert isinstance(plan, ResumePlan)
    try:
        problems = unreadable(plan.tag) if plan.tag else []
    except ResumeError as e:
        problems = [str(e)]
    failed = problems_on_ranks("; ".join(problems) or None, device)
    if failed:
        raise ResumeError(
            f"checkpoint {folder / str(plan.tag)} (named by {folder / LATEST}) cannot be read on every rank:\n  "
            + "\n  ".join(failed)
        )
    return plan
