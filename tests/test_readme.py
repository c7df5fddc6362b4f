"""The README's Python example is run exactly as written."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    script = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert len(script.strip().splitlines()) <= 13
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", result.stdout).group(1))
    assert accuracy >= 0.8, result.stdout[-2000:]  # ten digit classes: chance is 0.1; it reaches about 0.97
    assert (tmp_path / "saved_models" / "digits-api" / "export" / "1" / "saved_model.pb").exists()
    # What a user sees beside the numbers: no Keras warning, no TensorFlow start-up lines.
    for noise in ("UserWarning", "shuffle=True", "absl::InitializeLog", "cudart_stub", "oneDNN"):
        assert noise not in result.stderr, result.stderr[-3000:]


def _bash_lines(readme):
    return [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()]


@pytest.mark.slow
def test_readme_first_finetune_line_works_on_its_own(tmp_path):
    """The first line that runs `tfxfer finetune` runs offline, from a fresh folder, as written."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    line = next(line for line in _bash_lines(readme) if re.match(r"\s*(\.venv/bin/)?tfxfer finetune ", line))
    command = line.split("#")[0].strip().replace(".venv/bin/", "")
    tfxfer = os.path.join(os.path.dirname(sys.executable), "tfxfer")
    result = subprocess.run(command.replace("tfxfer", tfxfer, 1), shell=True, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    assert "test accuracy" in result.stdout and list(tmp_path.glob("saved_models/*/export/1/saved_model.pb"))
