"""The signals that ask a run to stop, in a module without torch: Ctrl-C (SIGINT), `kill`, `timeout` and
`scancel` (SIGTERM), and SLURM's warning before a time limit or preemption (SIGUSR1, `--signal`).
ssit_dist/stop.py handles them in a rank; the local launcher and the loader workers, which import no
model, pass them on or hold them."""

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
