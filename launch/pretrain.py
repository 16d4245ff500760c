"""Launcher entry: `deepspeed --num_gpus N launch/pretrain.py --config run.yaml [field=value ...]`.

Also runs under `torchrun --nproc_per_node N`, `srun` and plain `python` (one process).
"""

import sys

if __name__ == "__main__":
    # Imported here, not above: every loader worker runs this script again (as __mp_main__), and a
    # worker needs none of the trainer.
    from ssit_dist.train.pretrain import main

    sys.exit(main())
