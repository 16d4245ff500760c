"""requirements.lock against pyproject.toml and against the installed environment.

pyproject.toml keeps ranges (for people who install ssit-dist into their own environment); requirements.lock
pins every package, transitive ones included, to the set this project was tested with (made by `make lock`
with pip-compile; `make setup` installs exactly it). Three checks keep the two honest:

- `stamp`: after pip-compile, record in the lock's header the requirements of pyproject.toml it was made
  from, so that a later change of pyproject.toml without relocking is seen and named;
- `check` (`make setup`, `make lint`, tests): pyproject.toml's requirements are the recorded ones, every one
  is satisfied by its pin, and every pin is needed by one of them (pip-compile's `# via` notes);
- `venv` (`make setup`): the environment holds exactly the lock's versions; packages the lock does not name
  are uninstalled.

Run as `python tests/helpers/lockfile.py stamp|check|venv`; a failed check exits 1 with what to do.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
STAMP_HEAD = "# Made from these requirements of pyproject.toml (`make lint` checks they still hold):"
STAMP_LINE = "#   "
PROJECT = "ssit-dist"
# Installed beside the lock, never by it: the installer itself (pinned in the Makefile) and the project.
NOT_LOCKED = {"pip", PROJECT}


class LockError(Exception):
    """The lock and pyproject.toml, or the lock and the environment, disagree; the message says what to do."""


@dataclass
class Pin:
    version: str
    via: list[str] = field(default_factory=list)


def project_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """Every requirement the lock must satisfy: dependencies, optional ones, build-system.requires."""
    data = tomllib.loads(pyproject.read_text())
    found = list(data["project"].get("dependencies", []))
    for extra in data["project"].get("optional-dependencies", {}).values():
        found += extra
    found += data.get("build-system", {}).get("requires", [])
    return sorted({str(Requirement(r)) for r in found}, key=str.lower)


def read_pins(lock: Path = LOCK) -> dict[str, Pin]:
    """name -> pinned version and what needs it, from pip-compile's output (`name==version`, `# via ...`)."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for number, line in enumerate(lock.read_text().splitlines(), 1):
        if match := re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)(\s*;.*)?", line.strip()):
            current = pins[canonicalize_name(match[1])] = Pin(match[2])
        elif current is not None and (via := re.fullmatch(r"\s+#\s+(?:via\s+)?(.+)", line)):
            if via[1].strip() != "via":
                current.via.append(via[1].strip())
        elif line.strip() and not line.startswith("#"):
            raise LockError(f"{lock}:{number}: not a pin of pip-compile's output: {line!r}; run `make lock`")
        if not line.strip():
            current = None
    return pins


def recorded_requirements(lock: Path = LOCK) -> list[str] | None:
    lines = lock.read_text().splitlines()
    if STAMP_HEAD not in lines:
        return None
    recorded = []
    for line in lines[lines.index(STAMP_HEAD) + 1 :]:
        if not line.startswith(STAMP_LINE):
            break
        recorded.append(line[len(STAMP_LINE) :].strip())
    return recorded


def stamp(lock: Path = LOCK, pyproject: Path = PYPROJECT) -> None:
    """Write the requirements the lock was just made from into its header."""
    lines = lock.read_text().splitlines()
    if STAMP_HEAD in lines:
        start = lines.index(STAMP_HEAD)
        end = start + 1
        while end < len(lines) and lines[end].startswith(STAMP_LINE):
            end += 1
        del lines[start:end]
    stamped = [STAMP_HEAD, *(STAMP_LINE + r for r in project_requirements(pyproject))]
    lock.write_text("\n".join(stamped + lines) + "\n")


def check(lock: Path = LOCK, pyproject: Path = PYPROJECT) -> None:
    """Raise LockError naming every disagreement between pyproject.toml and the lock."""
    problems = []
    wanted = project_requirements(pyproject)
    recorded = recorded_requirements(lock)
    if recorded is None:
        problems.append(f"{lock.name} does not say which requirements it was made from")
    else:
        problems += [f"pyproject.toml asks for {r}, the lock was made without it" for r in wanted if r not in recorded]
        problems += [
            f"the lock was made for {r}, pyproject.toml no longer asks for it" for r in recorded if r not in wanted
        ]
    pins = read_pins(lock)
    for text in wanted:
        requirement = Requirement(text)
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement.name} is required by pyproject.toml and missing from the lock")
        elif not requirement.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"{requirement.name}=={pin.version} in the lock does not satisfy pyproject.toml's {text}")
    needed = _needed(pins)
    problems += [
        f"{name}=={pins[name].version} is locked but nothing in pyproject.toml needs it"
        for name in sorted(set(pins) - needed)
    ]
    if problems:
        raise LockError(
            f"{lock.name} and {pyproject.name} disagree:\n  "
            + "\n  ".join(problems)
            + "\nRun `make lock` (it keeps every other pin) and commit requirements.lock with pyproject.toml."
        )


def _needed(pins: dict[str, Pin]) -> set[str]:
    """Pins reachable from pyproject.toml through the `# via` notes."""
    needed: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, pin in pins.items():
            if name in needed:
                continue
            for parent in pin.via:
                if parent.startswith(f"{PROJECT} (pyproject.toml") or canonicalize_name(parent) in needed:
                    needed.add(name)
                    changed = True
                    break
    return needed


def venv_mismatches(lock: Path = LOCK) -> tuple[list[str], list[str]]:
    """(packages installed at another version or missing, packages installed that the lock does not name)."""
    pins = read_pins(lock)
    # The environment's own site-packages only: a process that imported setuptools also sees the packages
    # vendored inside it on sys.path, and those are not installed.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    wrong = [
        f"{name}=={pin.version} (installed: {installed.get(name, 'nothing')})"
        for name, pin in sorted(pins.items())
        if installed.get(name) != pin.version
    ]
    extra = sorted(name for name in installed if name not in pins and name not in NOT_LOCKED)
    return wrong, extra


def sync_venv(lock: Path = LOCK) -> None:
    """Uninstall what the lock does not name, then require every pin to be installed at its version."""
    _, extra = venv_mismatches(lock)
    if extra:
        print(f"uninstalling what {lock.name} does not name: {' '.join(extra)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", *extra], check=True)
    wrong, extra = venv_mismatches(lock)
    if wrong or extra:
        raise LockError(
            f"this environment ({sys.prefix}) is not {lock.name}: "
            + "; ".join(wrong + [f"{name} (not in the lock)" for name in extra])
            + ". Start it afresh: make clean setup"
        )


def main(argv: list[str]) -> int:
    actions = {
        "stamp": lambda: stamp(LOCK, PYPROJECT),
        "check": lambda: check(LOCK, PYPROJECT),
        "venv": lambda: sync_venv(LOCK),
    }
    if len(argv) != 1 or argv[0] not in actions:
        print(f"usage: python tests/helpers/lockfile.py {'|'.join(actions)}", file=sys.stderr)
        return 2
    try:
        actions[argv[0]]()
    except LockError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
