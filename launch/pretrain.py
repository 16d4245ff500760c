"""Launcher entry: `deepspeed --num_gpus N launch/pretrain.py --config run.yaml [field=value ...]`.

Also runs under `torchrun --nproc_per_node N`, `srun` and plain `python` (one process).
"""

import sys

from ssit_dist.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
