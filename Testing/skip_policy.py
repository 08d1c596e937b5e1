"""A pytest plugin for CI: every skipped test must be on the list of allowed skips, each with its reason.

With ``LGSEG_ALLOWED_SKIPS`` set to the list (``.ci/run`` sets it to ``.ci/allowed-skips.txt``), the run ends with a
summary of every skip, and fails, naming the test, when a test skipped that the list does not allow: a test that
skips where it should run (data not found, a dependency missing) tests nothing, and a green run would hide it.
Without the variable (a developer's run) skips are only listed, as pytest's ``-ra`` does anyway.

The list has one line per allowed skip: a test id as pytest prints it (``fnmatch`` patterns allowed, e.g. for every
parameter of a test), then `` -- `` and why that test may skip in CI. Blank lines and ``#`` comments are ignored.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

ENVIRONMENT_VARIABLE = "LGSEG_ALLOWED_SKIPS"
_skipped: list[tuple[str, str]] = []


def read_allowed_skips(path: Path) -> dict[str, str]:
    """Test id pattern -> reason, from the list file; a line without a reason is an error."""
    allowed = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, separator, reason = line.partition(" -- ")
        if not separator or not pattern.strip() or not reason.strip():
            raise pytest.UsageError(f"{path}:{number}: write 'TEST_ID -- why it may skip in CI', not '{line}'")
        allowed[pattern.strip()] = reason.strip()
    return allowed


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _allowed_reason(nodeid: str, allowed: dict[str, str]) -> str | None:
    return next((reason for pattern, reason in allowed.items() if fnmatch.fnmatchcase(nodeid, pattern)), None)


def _unallowed(allowed: dict[str, str]) -> list[tuple[str, str]]:
    return [(nodeid, reason) for nodeid, reason in _skipped if _allowed_reason(nodeid, allowed) is None]


def _list_path() -> Path | None:
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    return Path(value) if value else None


def pytest_configure(config: pytest.Config) -> None:
    path = _list_path()
    if path is not None:
        if not path.is_file():
            raise pytest.UsageError(f"{ENVIRONMENT_VARIABLE}={path}: no such file")
        read_allowed_skips(path)  # a malformed list stops the run before any test


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, _reason(report)))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module skipped, e.g. by pytest.importorskip at its top
        _skipped.append((report.nodeid, _reason(report)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = _list_path()
    if path is not None and _unallowed(read_allowed_skips(path)) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    path = _list_path()
    if path is None:
        return
    allowed = read_allowed_skips(path)
    terminalreporter.section(f"skips ({len(_skipped)}; allowed ones are listed in {path})")
    for nodeid, reason in _skipped:
        why = _allowed_reason(nodeid, allowed)
        if why is None:
            terminalreporter.write_line(f"NOT ALLOWED  {nodeid}: {reason}", red=True)
        else:
            terminalreporter.write_line(f"allowed      {nodeid}: {reason} ({why})")
    for nodeid, reason in _unallowed(allowed):
        terminalreporter.write_line(
            f"error: {nodeid} skipped ({reason}) and is not an allowed skip; make it run here, or add it to {path} "
            "with the reason it may skip in CI", red=True, bold=True)
