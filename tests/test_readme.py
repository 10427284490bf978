"""The README's commands stay true: CI runs exactly its test command, and the jobs it names exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI = REPO / ".ci" / "run"
CI_BEGIN = "# --- README: tests ---"
CI_END = "# --- end ---"


def _readme_test_command() -> str:
    """The command under the README's "run the tests" comment in its first bash block."""
    lines = README.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and "run the tests" in line:
            command = lines[i + 1].strip()
            assert command and not command.startswith(("#", "```")), (
                f"README line {i + 2}: no command under {line!r}"
            )
            return command
    raise AssertionError("README.md has no '# ... run the tests' line above its test command")


def _ci_commands() -> list[str]:
    """The non-comment lines between the README markers of .ci/run."""
    lines = CI.read_text().splitlines()
    assert lines.count(CI_BEGIN) == 1 and lines.count(CI_END) == 1, (
        f".ci/run: needs one {CI_BEGIN!r} and one {CI_END!r}"
    )
    block = lines[lines.index(CI_BEGIN) + 1 : lines.index(CI_END)]
    return [line.strip() for line in block if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    assert "pytest" in command, command
    assert _ci_commands() == [command]


def test_jobs_named_in_readme_exist():
    names = set(re.findall(r"\bjobs/[\w*]+\.py\b", README.read_text()))
    assert "jobs/rckd_pretrain.py" in names
    missing = [name for name in sorted(names) if not list(REPO.glob(name))]
    assert not missing, f"README.md names jobs that do not exist: {missing}"
