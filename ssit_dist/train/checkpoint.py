"""Checkpoints of a DeepSpeed run: save, find the latest, resume, keep the last K, export the encoder.

Layout under RUN_DIR/checkpoints/: one folder per save (`step00001200/`, DeepSpeed's own files plus
our client state: the fp32 momentum network, step, config, RNG state) and a `latest` file naming the
newest complete one. `latest` is replaced atomically only after every rank finished writing, so a kill
at any moment leaves the previous checkpoint as the one a resume loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from ssit_dist.dist import is_distributed, rank

LATEST = "latest"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_tag(run_dir: Path) -> str | None:
    path = checkpoint_dir(run_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (checkpoint_dir(run_dir) / tag).is_dir() else None


def save(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any],
         keep: int) -> str:
    """Collective: every rank calls it. `meta` (architecture, sizes, normalisation, zero stage) is
    written beside DeepSpeed's files for `export_encoder`. Returns the tag written."""
    tag = f"step{step:08d}"
    folder = checkpoint_dir(run_dir)
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
    if is_distributed():
        torch_dist.barrier()
    if rank() == 0:
        (folder / tag / "ssit_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp = folder / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, folder / LATEST)
        tags = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: max(len(tags) - keep, 0)]:
            if old != tag:
                shutil.rmtree(folder / old, ignore_errors=True)
    if is_distributed():
        torch_dist.barrier()
    return tag


def load_latest(engine: Any, run_dir: Path) -> dict[str, Any] | None:
    """Load the newest complete checkpoint into `engine`; returns its client state, or None."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if client_state is None:
        raise RuntimeError(f"checkpoint {checkpoint_dir(run_dir) / tag} could not be loaded")
    return client_state


def export_encoder(run_dir: Path, out: Path, tag: str | None = None) -> tuple[Path, Path]:
    """The query encoder of a checkpoint (default: the latest) as timm-keyed safetensors plus a JSON."""
    from safetensors.torch import save_file

    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)}")
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag} under {checkpoint_dir(run_dir)}")
    state = _full_fp32_state(checkpoint_dir(run_dir), tag)
    encoder = {k[len("encoder."):]: v.float().contiguous() for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError(f"checkpoint {tag} under {run_dir} holds no encoder weights")
    meta_path = checkpoint_dir(run_dir) / tag / "ssit_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Each file under a temporary name, then renamed: a reader never sees half of one.
    weights, description = out.with_suffix(".safetensors"), out.with_suffix(".json")
    save_file(encoder, str(weights) + ".tmp", metadata={"format": "pt"})
    Path(str(description) + ".tmp").write_text(json.dumps({**meta, "checkpoint": str(checkpoint_dir(run_dir) / tag)}, indent=2) + "\n")
    os.replace(str(description) + ".tmp", description)
    os.replace(str(weights) + ".tmp", weights)
    return weights, description


def _full_fp32_state(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    model_states = folder / tag / "mp_rank_00_model_states.pt"
    if any((folder / tag).glob("*optim_states.pt")) and _zero_stage(model_states) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return torch.load(model_states, map_location="cpu", weights_only=True)["module"]


def _zero_stage(model_states: Path) -> int:
    meta = model_states.parent / "ssit_meta.json"
    return int(json.loads(meta.read_text()).get("zero_stage", 0)) if meta.is_file() else 0
