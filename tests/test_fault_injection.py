"""SIGKILL at seeded random moments of finetune, pretrain and study, each
continued as a user would; the end must equal an unbroken run (`tests/fault_injection.py`)."""

import pytest

from tests.fault_injection import PHASES, drive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.mark.parametrize("command", sorted(PHASES))
def test_killed_runs_end_as_an_unbroken_run(tmp_path, command):
    lines = []
    report = drive(command, str(tmp_path), kills=len(PHASES[command]), seed=0, log=lines.append)
    log = "\n".join(lines)
    landed = [where for _, where in report["kills"]]
    # Every kill is accounted for: it landed inside a named phase of the run, or between two of them.
    assert set(landed) <= set(PHASES[command]) | {"between phases"}, log
    # Each phase the run goes through was really hit by at least one kill, and most kills hit what was aimed at.
    assert set(PHASES[command]) <= set(landed), log
    hits = sum(armed == where for armed, where in report["kills"])
    assert hits > len(report["kills"]) / 2, log
    assert report["mismatches"] == [] and report["leftovers"] == [], log
