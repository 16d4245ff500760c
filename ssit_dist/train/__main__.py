"""`python -m ssit_dist.train TASK [--config FILE] [field=value ...]`: one rank of a trainer (TASK:
pretrain, finetune or segment), as `ssit-dist TASK --nproc N` and the SLURM scripts start their ranks.

The same trainer as `python -m ssit_dist.train.TASK`, with lighter loader workers: multiprocessing runs
the main module again in every worker it starts unless the module is a `__main__`, so under this entry a
worker's forkserver imports only the data side of the package (ssit_dist/data/loading/workers.py), not
the model, DeepSpeed and torch's compiler, nor holds their memory, once per rank (docs/pretrain.md).
"""

import importlib
import sys

TASKS = {
    "pretrain": "ssit_dist.train.pretrain",
    "finetune": "ssit_dist.train.finetune",
    "segment": "ssit_dist.train.segment",
}

if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
    named = f"{sys.argv[1]!r} is not a task; " if len(sys.argv) > 1 else ""
    sys.exit(f"{named}usage: python -m ssit_dist.train {{{','.join(TASKS)}}} [--config FILE] [field=value ...]")
sys.exit(importlib.import_module(TASKS[sys.argv[1]]).main(sys.argv[2:]))
