"""DR grading fine-tuning: `accelerate launch launch/finetune.py --config FILE [field=value ...]`,
or plain `python launch/finetune.py ...` (one process)."""

import sys

from ssit_dist.train.finetune import main

if __name__ == "__main__":
    sys.exit(main())
