"""What makes the host wait for the device, counted inside one training function.

Every way a tensor's value reaches the host (`item`, `tolist`, `bool`, `float`, `int`, `cpu`, `numpy`) and
every explicit synchronisation a run can ask for (DeepSpeed's `get_accelerator().synchronize()`,
`torch.cuda.synchronize`, `torch.accelerator.synchronize`, `synchronize` of a CUDA stream or event) is
wrapped, and each call made inside the function (the pretraining loop, a fine-tuning epoch) is counted by
the package that made it. On a GPU each one blocks the host until the device has caught up; on a CPU
nothing blocks, so the count is what tests/train/test_host_sync.py can hold there, on the same code.

On CUDA, `python -m bench.checks.sync_count --config RUN.yaml [field=value ...]` trains one rank with the
count on, and with torch's sync debug mode, which also sees the syncs torch makes inside its operators
(a boolean mask, `nonzero`) that no wrapper can: the per-step numbers `make gpu-run` records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

TRANSFERS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class Scope:
    """Which calls count: those made (at any depth) inside `function` of the package file `path`, except
    inside the functions named in `off_the_hot_path` (a checkpoint, a view retrieval: sync points only)."""

    def __init__(self, path: str, function: str, off_the_hot_path: frozenset[str] = frozenset()):
        self.path, self.function, self.off_the_hot_path = path, function, off_the_hot_path

    def where(self, frame) -> str | None:  # type: ignore[no-untyped-def]
        """Who asked: 'ssit_dist', 'deepspeed', 'accelerate' or 'torch' (the caller's package), or None
        outside the scope."""
        caller, inside = frame.f_code.co_filename, False
        while frame is not None:
            if frame.f_code.co_filename.endswith(self.path):
                if frame.f_code.co_name in self.off_the_hot_path:
                    return None
                inside = inside or frame.f_code.co_name == self.function
            frame = frame.f_back
        if not inside:
            return None
        for package in ("ssit_dist", "deepspeed", "accelerate", "torch"):
            if f"{os.sep}{package}{os.sep}" in caller:
                return package
        return "other"


PRETRAIN_LOOP = Scope(
    os.path.join("ssit_dist", "train", "pretrain_loop.py"), "train", frozenset({"save", "_view_retrieval"})
)
FINETUNE_EPOCH = Scope(os.path.join("ssit_dist", "train", "finetune_loop.py"), "train_one_epoch")


def synchronizers() -> list[tuple[object, str, str]]:
    """(owner, attribute, counted name) of every device synchronisation a training run can ask for.
    torch's device-generic `torch.Stream` and `torch.Event` are C types that cannot be wrapped; the
    package uses torch.cuda's (tests/train/test_host_sync.py holds it to that)."""
    from deepspeed.accelerator import get_accelerator

    return [
        (type(get_accelerator()), "synchronize", "accelerator.synchronize"),
        (torch.cuda, "synchronize", "cuda.synchronize"),
        (torch.cuda.Stream, "synchronize", "stream.synchronize"),
        (torch.cuda.Event, "synchronize", "event.synchronize"),
        (torch.accelerator, "synchronize", "torch.accelerator.synchronize"),
        (torch.cpu, "synchronize", "cpu.synchronize"),
    ]


def count(counts: Counter, scope: Scope) -> None:
    """Wrap every read and synchronisation so that each call inside `scope` adds to `counts`."""
    targets = [(torch.Tensor, name, name) for name in TRANSFERS] + synchronizers()
    for owner, attribute, label in targets:
        original = getattr(owner, attribute)

        def counted(*args, _original=original, _label=label, **kwargs):  # type: ignore[no-untyped-def]
            where = scope.where(sys._getframe(1))
            if where is not None:
                counts[f"{where}:{_label}"] += 1
            return _original(*args, **kwargs)

        setattr(owner, attribute, counted)


def syncs(counts: dict) -> dict:
    """The explicit synchronisations among `counts`."""
    return {key: n for key, n in counts.items() if key.split(":", 1)[1] not in TRANSFERS}


def _count_torch_syncs(counts: Counter, scope: Scope) -> None:
    """CUDA: every synchronisation torch itself detects (`torch.cuda.set_sync_debug_mode`: it warns at each),
    counted as `<package>:torch_detected` where `scope` holds; reads counted above are among them."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if "synchronizing" in str(message):
            frame = sys._getframe(1)
            while frame.f_back is not None and frame.f_code.co_filename == warnings.__file__:
                frame = frame.f_back  # from the warnings module's own frames to the op's caller
            where = scope.where(frame)
            if where is not None:
                counts[f"{where}:torch_detected"] += 1
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.filterwarnings("always", message=".*synchronizing.*")
    torch.cuda.set_sync_debug_mode("warn")


def main() -> int:
    parser = argparse.ArgumentParser(description="host waits per step of one pretraining run (one rank)")
    parser.add_argument("--config", required=True, help="a run config, as ssit-dist pretrain takes it")
    parser.add_argument("overrides", nargs="*", help="field=value")
    args = parser.parse_args()
    from ssit_dist.config import load_config
    from ssit_dist.dist import free_port, shutdown
    from ssit_dist.train.pretrain import pretrain

    os.environ.setdefault("MASTER_PORT", str(free_port()))  # one rank; not the default 29500 a neighbour may hold
    cfg = load_config(args.config, args.overrides)
    counts: Counter = Counter()
    count(counts, PRETRAIN_LOOP)
    if torch.cuda.is_available():
        _count_torch_syncs(counts, PRETRAIN_LOOP)
    try:
        pretrain(cfg)
    finally:
        shutdown()
    steps = len(Path(cfg.run_dir, "metrics.jsonl").read_text().splitlines())
    per_step = {key: round(n / steps, 3) for key, n in sorted(counts.items())}
    print(json.dumps({"steps": steps, "log_every": cfg.log_every, "per_step": per_step, "syncs": syncs(counts)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
