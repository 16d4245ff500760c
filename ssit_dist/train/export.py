"""`ssit-dist export`: an encoder of a pretraining checkpoint (train/checkpoint_deepspeed.py), or the
grader of a fine-tuning run (its best or final weights), as timm weights: safetensors and a JSON, or a
timm folder with a model card (train/model_card.py).

A grader exports for timm only where timm has its pooling (pool token or avg, models/grader.py): a
folder `timm.create_model("local-dir:OUT", pretrained=True)` turns into the same classifier, logits
included, with the preprocessing in its config.json."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ssit_dist import atomic
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.train.checkpoint import ResumeError, checkpoint_dir, latest_tag
from ssit_dist.train.checkpoint_deepspeed import META, MOMENTUM, read_meta, unreadable_files


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

    from ssit_dist.models.timm_folder import save_timm_folder, timm_config
    from ssit_dist.train.model_card import model_card

    if encoder not in ("query", "momentum"):
        raise ValueError(f"--encoder {encoder!r}: expected query or momentum")
    _check_layout(layout)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_dir(run_dir)}")
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag} under {checkpoint_dir(run_dir)}")
    problems = unreadable_files(run_dir, tag)  # also names a missing meta: an interrupted save
    if problems:
        raise ResumeError(f"checkpoint {checkpoint_dir(run_dir) / tag} is incomplete: {'; '.join(problems)}")
    targets = _targets(out, layout, overwrite)
    body = read_meta(run_dir, tag)
    body.pop("files", None)
    meta = EncoderMeta.from_json(body, str(checkpoint_dir(run_dir) / tag / META))
    meta = meta.with_provenance(checkpoint=str(checkpoint_dir(run_dir) / tag), encoder=encoder)
    weights = _encoder_state(run_dir, tag, int(meta.provenance.get("zero_stage", 0)), encoder)
    if layout == "timm":
        return [save_timm_folder(out, weights, timm_config(meta), model_card(meta, run_dir, tag, encoder))]
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    # The weights first, then the JSON that describes them: a reader that finds the JSON finds its weights.
    atomic.write_with(targets[0], lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    atomic.write_json(targets[1], meta.to_json())
    return targets


def export_grader(
    run_dir: Path, out: Path, tag: str | None = None, overwrite: bool = False, layout: str = "files"
) -> list[Path]:
    """The grader of a fine-tuning run (`tag` best, the default, or final). `layout` "files":
    OUT.safetensors and OUT.json as fine-tuning writes them (what `ssit-dist predict --model` and
    `open_grader` read), the JSON completed for older runs; "timm": the folder OUT with the head and a
    model card, for a grader whose pooling timm has. Returns the paths written."""
    from ssit_dist.models.grader import save_grader
    from ssit_dist.models.grader_files import GraderFileError, open_grader
    from ssit_dist.models.timm_folder import grader_timm_config, save_timm_folder
    from ssit_dist.train.model_card import grader_card

    _check_layout(layout)
    checkpoint = tag or "best"
    grader, info = open_grader(run_dir, checkpoint)
    if layout == "timm" and info.pool == "cls+avg":
        raise GraderFileError(
            f"{run_dir}: its head reads the CLS and mean patch tokens concatenated (pool cls+avg), and timm has no "
            "pooling that concatenates: fine-tune with pool=token or pool=avg to export for timm, or grade with "
            f"`ssit-dist predict --model {run_dir}` (or export without --format timm: grader files predict reads)"
        )
    targets = _targets(out, layout, overwrite)
    meta = {**info.to_json(), "run": str(run_dir), "checkpoint": checkpoint}
    if layout == "files":
        targets[0].parent.mkdir(parents=True, exist_ok=True)
        save_grader(grader, targets[0], meta)  # the weights, then the JSON that describes them
        return targets
    state = {k.removeprefix("encoder."): v.detach().float().contiguous() for k, v in grader.state_dict().items()}
    config = grader_timm_config(meta, grader.encoder.embed_dim)
    return [save_timm_folder(out, state, config, grader_card(meta, run_dir, checkpoint))]


def _check_layout(layout: str) -> None:
    if layout not in ("files", "timm"):
        raise ValueError(f"--format {layout!r}: expected files or timm")


def _targets(out: Path, layout: str, overwrite: bool) -> list[Path]:
    """What OUT names: the folder OUT (timm), or OUT.safetensors and OUT.json (a suffix of OUT other than
    those two is part of the name); refused where one exists, unless `overwrite`."""
    stem = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
    targets = [out] if layout == "timm" else [Path(f"{stem}.safetensors"), Path(f"{stem}.json")]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it, or choose another -o")
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
