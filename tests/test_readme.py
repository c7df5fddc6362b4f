"""The README's Python example is run exactly as written."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    script = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert len(script.strip().splitlines()) <= 12
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", result.stdout).group(1))
    assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "saved_models" / "digits-api" / "export" / "1" / "saved_model.pb").exists()
