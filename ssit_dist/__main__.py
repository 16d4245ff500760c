"""`python -m ssit_dist ARGS` is `ssit-dist ARGS`, for a venv whose console scripts are not on PATH."""

from ssit_dist.cli import app

app(prog_name="ssit-dist")
