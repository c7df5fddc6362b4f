"""SIGKILL at seeded random moments of finetune, pretrain and study, each
continued as a user would; the end must equal an unbroken run (`tests/fault_injection.py`)."""

import pytest

from tests.fault_injection import PHASES, drive


@pytest.mark.parametrize("command", sorted(PHASES))
def test_killed_runs_end_as_an_unbroken_run(tmp_path, command):
    lines = []
    report = drive(command, str(tmp_path), kills=len(PHASES[command]), seed=0, log=lines.append)
    assert [armed for armed, _ in report["kills"]] == PHASES[command], "\n".join(lines)
    assert report["mismatches"] == [] and report["leftovers"] == [], "\n".join(lines)
