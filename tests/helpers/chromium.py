"""A real browser for the tests: Debian's headless Chromium (installed here when missing, as slurm.py
installs SLURM), driven from the command line, no Python package in between.

Chromium 150 (bookworm), measured: `--dump-dom` prints the DOM after the page's inline scripts have run
and the load event fired; `--screenshot` writes a PNG of the window; with `--enable-logging=stderr` every
console message and uncaught exception is one stderr line `...:INFO:CONSOLE:<line>] "<message>", source:
...`, at whatever level it was written (console.log and console.error read the same), so a page under
test must write nothing to the console at all. Each run gets its own profile folder: two Chromiums on
one profile refuse each other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "chromium"
# As root (the containers here) Chromium refuses to start without --no-sandbox; no GPU in a container.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0")
CONSOLE = re.compile(r":CONSOLE[:(]\d+\)?\] (.*)$", re.MULTILINE)


def binary() -> str | None:
    return shutil.which("chromium")


def unavailable() -> str | None:
    """Why this machine cannot run headless Chromium, or None when it can (installing it first)."""
    if binary() is None:
        if shutil.which("apt-get") is None:
            return "chromium is not installed and there is no apt-get to install it"
        if os.geteuid() != 0:
            return "chromium is not installed, and installing it with apt-get needs root"
        result = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", PACKAGE],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0 or binary() is None:
            return f"apt-get install {PACKAGE} failed: {result.stderr.strip()[-300:]}"
    return None


@dataclass(frozen=True)
class Visit:
    """What one headless run of a page left: its DOM after the scripts ran (dump-dom runs only) and every
    console message, uncaught exceptions included."""

    dom: str
    console: list[str]


def _run(url: str, *flags: str) -> Visit:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [str(binary()), *FLAGS, f"--user-data-dir={profile}", *flags, url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"chromium exited {result.returncode} on {url}:\n{result.stderr[-2000:]}")
    return Visit(result.stdout, CONSOLE.findall(result.stderr))


def dump_dom(page: Path, fragment: str = "") -> Visit:
    """Open `page` (with `#fragment` when given) and read back its DOM once its scripts have run."""
    return _run(page.resolve().as_uri() + (f"#{fragment}" if fragment else ""), "--dump-dom")


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2000) -> Visit:
    """A PNG of the first `height` pixels of `page` in a `width` wide window."""
    visit = _run(page.resolve().as_uri(), f"--screenshot={out}", f"--window-size={width},{height}")
    if not out.is_file():
        raise AssertionError(f"chromium wrote no screenshot of {page} at {out}")
    return visit
