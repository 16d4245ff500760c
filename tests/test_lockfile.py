"""requirements.lock: it agrees with pyproject.toml, a change of one without the other is caught and named
(with what to do), and this environment holds exactly the lock (what `make setup` promises)."""

from __future__ import annotations

from pathlib import Path

import pytest

import lockfile
from lockfile import LOCK, PYPROJECT, LockError, check, read_pins, venv_mismatches

HERE = Path(__file__).resolve().parent


def edited(tmp_path: Path, path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    copy = tmp_path / path.name
    copy.write_text(text.replace(old, new, 1))
    return copy


def test_the_lock_agrees_with_pyproject_and_pins_every_package() -> None:
    check()
    pins = read_pins()
    # Transitive dependencies are pinned too, the tools that judge the code among them.
    for name in ("torch", "numpy", "opencv-contrib-python-headless", "mypy", "ruff", "setuptools", "filelock"):
        assert name in pins, name


def test_this_environment_is_exactly_the_lock() -> None:
    wrong, extra = venv_mismatches()
    assert not wrong and not extra, (wrong, extra)


def test_a_changed_pin_in_pyproject_is_named_and_says_to_relock(tmp_path: Path) -> None:
    # Widened, so that the locked version still satisfies it: only the record of what the lock was made
    # from can tell.
    pyproject = edited(tmp_path, PYPROJECT, '"timm>=1.0,<2"', '"timm>=1.0,<3"')
    with pytest.raises(LockError) as caught:
        check(LOCK, pyproject)
    assert "timm<3,>=1.0" in str(caught.value) and "make lock" in str(caught.value)
    # Narrowed below the locked version: named with the version that no longer fits.
    pyproject = edited(tmp_path, PYPROJECT, '"numpy>=1.24,<3"', '"numpy>=1.24,<2"')
    with pytest.raises(LockError, match=r"numpy==[\d.]+ in the lock does not satisfy pyproject.toml's numpy<2"):
        check(LOCK, pyproject)


def test_a_dependency_added_to_one_side_only_is_named(tmp_path: Path) -> None:
    pyproject = edited(tmp_path, PYPROJECT, '"rich>=13.0,<16",', '"rich>=13.0,<16",\n    "requests>=2",')
    with pytest.raises(LockError, match="requests is required by pyproject.toml and missing from the lock"):
        check(LOCK, pyproject)
    lock = edited(tmp_path, LOCK, "absl-py==", "leftpad==1.0\n    # via nothing-here\nabsl-py==")
    with pytest.raises(LockError, match="leftpad==1.0 is locked but nothing in pyproject.toml needs it"):
        check(lock, PYPROJECT)


def test_make_lint_runs_the_check_and_fails_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    makefile = (HERE.parent / "Makefile").read_text()
    lint = makefile[makefile.index("\nlint:") :].split("\n\n")[0]
    assert "$(PY) tests/helpers/lockfile.py check" in lint
    # What that command does on a checkout whose pyproject.toml changed without a new lock.
    monkeypatch.setattr(lockfile, "PYPROJECT", edited(tmp_path, PYPROJECT, '"timm>=1.0,<2"', '"timm>=1.1,<2"'))
    assert lockfile.main(["check"]) == 1
    message = capsys.readouterr().err
    assert "timm<2,>=1.1" in message and "Run `make lock`" in message
    monkeypatch.setattr(lockfile, "PYPROJECT", PYPROJECT)
    assert lockfile.main(["check"]) == 0
