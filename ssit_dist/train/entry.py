"""The trainers' command line, once for both: `--config FILE field=value ...`, the run, and what its end
means as an exit code, the same for pretraining and fine-tuning:

- 0: done, or stopped (Ctrl-C, SIGTERM, SLURM's SIGUSR1; ssit_dist/stop.py) where it saved or said why:
  relaunch to resume;
- 2: the run as given cannot start (a config field, the shards, a resume that would be wrong, where the
  process sits in the job, the initial weights): the message names what to change;
- 1: it started and failed (a non-finite loss, a rank's failed work, a data source that gave up).
- 130: Ctrl-C before the run had started, or a second Ctrl-C: stopped at once, nothing saved.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssit_dist.config import ConfigError, FinetuneConfig, PretrainConfig, SegmentConfig, load_config
from ssit_dist.data.index import ShardIndexError
from ssit_dist.data.loading.sources import SourceError
from ssit_dist.dist import PlacementError, RankFailure, shutdown
from ssit_dist.models.pretrained import EncoderInitError
from ssit_dist.runtime import apply_process_defaults
from ssit_dist.stop import StopRequested
from ssit_dist.train.finetune_state import CheckpointWriteError
from ssit_dist.train.resume import ResumeError

CANNOT_START = (ConfigError, ShardIndexError, ResumeError, PlacementError, EncoderInitError)
FAILED = (FloatingPointError, RankFailure, SourceError, CheckpointWriteError)


def run_trainer(
    train: Callable[[Any], Any],
    kind: type[PretrainConfig] | type[FinetuneConfig] | type[SegmentConfig],
    description: str,
    argv: list[str] | None = None,
) -> int:
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
