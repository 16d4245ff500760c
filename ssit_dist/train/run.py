"""The skeleton every trainer runs on: pretraining (DeepSpeed), fine-tuning and segmentation (Accelerate).

Each task (train/pretrain.py, train/finetune.py, train/segment.py) calls, in this order:
1. `stop.install()` (ssit_dist/stop.py): a signal from here on stops the run where every rank agrees;
2. `start_deepspeed` or `start_accelerate`: the process group and this rank's device;
3. its own set-up (data checked before anything trains, model, optimizer);
4. `fingerprint`: everything a resume of the run depends on;
5. `agree_on_resume`: the resume plan every rank follows (train/checkpoint.py, through the engine's
   adapter), the config and the fingerprint recorded in the run folder, `metrics_from` trims the metrics
   to where the run resumes (train/report.py);
6. its loop, checkpointing through its adapter (train/checkpoint_deepspeed.py, checkpoint_accelerate.py);
7. its evaluation and report.
`main` is every trainer's command line, `--config FILE field=value ...`, and turns the run's end into the
exit code, the same for all three:

- 0: done, or stopped (Ctrl-C, SIGTERM, SLURM's SIGUSR1; ssit_dist/stop.py) where it saved or said why:
  relaunch to resume;
- 2: the run as given cannot start (a config field, the shards, a resume that would be wrong, where the
  process sits in the job, the initial weights): the message names what to change;
- 1: it started and failed (a non-finite loss, a rank's failed work, a data source that gave up);
- 130: Ctrl-C before the run had started, or a second Ctrl-C: stopped at once, nothing saved.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, is_dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ssit_dist.config import ConfigError, FinetuneConfig, PretrainConfig, SegmentConfig, load_config, save_config
from ssit_dist.data.index import ShardIndexError
from ssit_dist.data.loading.sources import SourceError
from ssit_dist.dist import RankFailure, init_process_group, on_rank_zero, release_shared_memory_names, shutdown
from ssit_dist.models.pretrained import EncoderInitError
from ssit_dist.placement import PlacementError, adopt_srun_environment, bind_gpu
from ssit_dist.runtime import apply_process_defaults
from ssit_dist.stop import StopRequested
from ssit_dist.train.checkpoint import CheckpointWriteError, ResumeError, ResumePlan, normalised, write_fingerprint

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("ssit_dist.train")
CANNOT_START = (ConfigError, ShardIndexError, ResumeError, PlacementError, EncoderInitError)
FAILED = (FloatingPointError, RankFailure, SourceError, CheckpointWriteError)
Config = PretrainConfig | FinetuneConfig | SegmentConfig


def start_deepspeed(timeout_s: float) -> torch.device:
    """The process group (ours and DeepSpeed's view of it); returns this rank's device."""
    import deepspeed
    import torch.distributed as torch_dist

    device = init_process_group(timeout_s)
    deepspeed.init_distributed(dist_backend=torch_dist.get_backend(), timeout=timedelta(seconds=timeout_s))
    release_shared_memory_names(device)
    return device


def start_accelerate(mixed_precision: str, timeout_s: float, seed: int, accumulation: int = 1) -> Accelerator:
    """Accelerate's process group, on srun's environment where there is no launcher, and every generator
    (Python, NumPy, torch) seeded with `seed`."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    # cpu=True without CUDA: Accelerate then forms a gloo group from the launcher's environment (or
    # srun's). Every collective of ours goes through dist.py on accelerator.device, with the timeout below.
    adopt_srun_environment()
    bind_gpu()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
    )
    set_seed(seed)
    return accelerator


def fingerprint(cfg: Any, fields: Iterable[str | tuple[str, str]], **inputs: Any) -> dict[str, Any]:
    """Everything a resume of the run depends on (train/checkpoint.py compares it with the one stored
    with the checkpoint): the config values named in `fields` ("epochs"; "model" for a whole section;
    ("batch", "global_batch") to store a field under the key earlier runs recorded, so that they still
    resume), then `inputs`, what the run derived or read (world size, the data with its checksums, ...).
    As JSON gives it back: this is what is stored and compared."""
    picked = {}
    for spec in fields:
        key, path = (spec, spec) if isinstance(spec, str) else spec
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        picked[key] = asdict(value) if is_dataclass(value) and not isinstance(value, type) else value
    return normalised({**picked, **inputs})


def agree_on_resume(
    cfg: Config, fingerprint: dict[str, Any], plan: Callable[[], ResumePlan], device: torch.device
) -> ResumePlan:
    """Collective: the resume plan every rank follows (`plan`: the engine adapter's `plan_resume`, which
    refuses a changed run naming the changed fields unless cfg.resume says otherwise); then rank 0
    records the run's config and fingerprint in its folder."""
    run_dir = Path(cfg.run_dir)
    decided = plan()
    if decided.mode in ("force", "reshard"):
        log.warning(
            "resume=%s: resuming %s although the run changed:\n  %s",
            cfg.resume,
            decided.tag,
            "\n  ".join(decided.changed),
        )

    def record_run() -> None:
        save_config(cfg, run_dir)
        write_fingerprint(run_dir, fingerprint)

    on_rank_zero(record_run, device, f"writing {run_dir / 'config.yaml'}")
    return decided


def main(train: Callable[[Any], Any], kind: type[Config], description: str, argv: list[str] | None = None) -> int:
    """Parse the command line into a `kind` config, call `train(cfg)` and return the exit code."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None)
    # DeepSpeed's launcher passes --local_rank; the environment's LOCAL_RANK is what counts.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="field=value (section.field=value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    apply_process_defaults()  # threads per rank and DeepSpeed's build folder, before anything runs
    try:
        train(load_config(args.config, args.overrides, kind))
    except StopRequested as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped at the same place: say it once
            print(e, file=sys.stderr)
        return 0
    except KeyboardInterrupt:  # Ctrl-C before the stop handlers were installed: nothing ran yet
        print("stopped during start-up; nothing to save", file=sys.stderr)
        return 128 + signal.SIGINT
    except FAILED as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CANNOT_START as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0
