"""Files and folders that are never seen half-written, whatever kills the process and when.

Everything is written under a temporary name beside its target (same file system), flushed to disk,
renamed over the target, and the folder is flushed so that the rename itself survives a power loss. A
reader sees the old content or the new, never a mix; a leftover `*.tmp` is the only trace of a kill.

Every file gets the mode a plain `open` gives under the process's umask (0644 under the usual 022):
some writers create theirs private (safetensors' save_file: 0600), and colleagues on a shared file
system could not read the weights.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_with(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to produce the file (safetensors' save_file, torch.save, ...), then put it at
    `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    _sync_folder(path.parent)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, value: Any, **dump_options: Any) -> Path:
    return write_text(path, json.dumps(value, indent=2, **dump_options) + "\n")


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` at `target` (removing an older one there), atomically for readers
    that look for `target`'s files after the rename."""
    mode = file_mode()
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(path, mode)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    _sync_folder(target.parent)


def file_mode() -> int:
    """0o666 less this process's umask: the mode `open` gives a new file. Read from /proc where it can
    be (os.umask can only be read by setting it, which races with any thread creating a file)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems (FUSE mounts, a few NFS servers) cannot sync a folder: best effort
        pass
