"""The CI rule that a test may only skip when the list of allowed skips says why (Testing/skip_policy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTING = Path(__file__).resolve().parent
TESTS = """
import pytest

def test_runs():
    pass

def test_needs_data():
    pytest.skip("data set not found")
"""


def _pytest(folder: Path, allowed: str) -> subprocess.CompletedProcess:
    (folder / "test_scratch.py").write_text(TESTS)
    (folder / "allowed.txt").write_text(allowed)
    env = dict(os.environ, LGSEG_ALLOWED_SKIPS=str(folder / "allowed.txt"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTING), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "skip_policy", "-p", "no:cacheprovider",
                           "test_scratch.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_that_is_not_allowed_fails_the_run_and_names_the_test(tmp_path):
    result = _pytest(tmp_path, "# nothing may skip\n")
    assert result.returncode == 1, result.stdout
    assert "1 passed, 1 skipped" in result.stdout
    assert ("error: test_scratch.py::test_needs_data skipped (data set not found) and is not an allowed skip"
            in result.stdout)


def test_an_allowed_skip_passes_with_its_reason_in_the_summary(tmp_path):
    result = _pytest(tmp_path, "test_scratch.py::test_needs_* -- needs a GPU\n")
    assert result.returncode == 0, result.stdout
    assert "allowed      test_scratch.py::test_needs_data: data set not found (needs a GPU)" in result.stdout


def test_an_allowed_skip_needs_a_reason(tmp_path):
    result = _pytest(tmp_path, "test_scratch.py::test_needs_data\n")
    assert result.returncode != 0 and "TEST_ID -- why it may skip in CI" in result.stderr

