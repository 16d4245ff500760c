"""A free TCP port for a rendezvous, in a module without torch: the local launcher, which imports no
torch, picks its ranks' port with it."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on this machine now: several runs on one machine must not collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
