"""`make test` cleans up after itself: pytest run with this project's configuration leaves none
of a passing session's temporary files, and of a failing one only the failed tests' (and the
session fixtures'), until the next failing session replaces them."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

SESSION = """
import pytest


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared")
    (path / "data").write_bytes(b"x" * 1_000_000)
    return path


def test_writes(tmp_path, shared):
    (tmp_path / "checkpoint").write_bytes(b"x" * 1_000_000)


def test_maybe_fails(tmp_path):
    (tmp_path / "evidence").write_text("kept for a look")
    assert not {fail}
"""


def leftovers(tmp: os.PathLike) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), tmp) for d, _, files in os.walk(tmp) for f in files
    )


def test_a_passing_session_leaves_no_temporary_files(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    system_tmp = tmp_path / "tmp"  # where pytest's basetemp goes: $TMPDIR
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp)}

    def session(fail: bool) -> subprocess.CompletedProcess:
        (tests / "test_session.py").write_text(SESSION.format(fail=fail))
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            + ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), str(tests)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    passing = session(fail=False)
    assert passing.returncode == 0, passing.stdout[-2000:]
    assert leftovers(system_tmp) == []

    failing = session(fail=True)
    assert failing.returncode == 1
    kept = leftovers(system_tmp)  # the failed test's file, and the session fixture's
    assert [os.path.basename(p) for p in kept] == ["data", "evidence"], kept

    again = session(fail=False)  # adds nothing; the failed session's stay for a look
    assert again.returncode == 0
    assert leftovers(system_tmp) == kept

    failing = session(fail=True)  # replaces them: at most one session's files are ever kept
    assert failing.returncode == 1
    assert [os.path.basename(p) for p in leftovers(system_tmp)] == ["data", "evidence"]
    assert set(leftovers(system_tmp)).isdisjoint(kept)
