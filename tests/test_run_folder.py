"""A run folder belongs to one run: an OS lock while it works, --overwrite only
over a tfxfer run, and run names that stay inside --output-dir."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import run_cli, write_class_folder, write_splits

HOLD = """
import sys, time
from tfxfer.runs import RunFolderLock
lock = RunFolderLock(sys.argv[1])
assert lock.try_acquire(create=True)
lock.stamp()
print("held", flush=True)
time.sleep(600)
"""


def _snapshot(folder):
    """Every file under `folder` with a digest of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _finetune(tmp_path, folder, *extra):
    return run_cli("finetune", "--data-dir", folder, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                   "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--output-dir", tmp_path / "runs",
                   "--run-name", "r", *extra)


@pytest.fixture
def folder(tmp_path):
    root = str(tmp_path / "images")
    write_class_folder(root, per_class=8)
    return root


@pytest.mark.slow
def test_a_held_run_folder_is_refused_by_name_and_pid_and_resumes_after_its_holder_is_killed(tmp_path, folder):
    assert _finetune(tmp_path, folder).exit_code == 0
    run_dir = str(tmp_path / "runs" / "r")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(run_dir)
        for extra in (("--resume", "--epochs", "3"), ("--overwrite",), ()):
            result = _finetune(tmp_path, folder, *extra)
            assert result.exit_code == 1, extra
            assert f"is in use by PID {holder.pid}, started at" in result.output, result.output
            assert "Traceback" not in result.output
        assert _snapshot(run_dir) == before  # not a byte written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock: resume just works.
    result = _finetune(tmp_path, folder, "--resume", "--epochs", "3")
    assert result.exit_code == 0, result.output
    with open(os.path.join(run_dir, "history.csv")) as f:
        assert len(f.read().strip().splitlines()) == 1 + 3


@pytest.mark.slow
def test_two_commands_with_one_run_name_at_once(tmp_path):
    """Two real `tfxfer finetune` processes: the second is refused, the first's run is whole."""
    tfxfer = os.path.join(os.path.dirname(sys.executable), "tfxfer")
    out = tmp_path / "runs"
    command = [tfxfer, "finetune", "--dataset", "digits", "--backbone", "simplecnn", "--weights", "none",
               "--epochs", "3", "--output-dir", str(out), "--run-name", "same"]
    first = subprocess.Popen(command + ["--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = out / "same" / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and "PID" in lock.read_text()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command + ["--seed", "2", "--lr", "0.01"], capture_output=True, text=True, timeout=300)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-2000:]
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"in use by PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    saved = yaml.safe_load(open(out / "same" / "config.yaml"))
    assert saved["run"]["seed"] == 1 and saved["optim"]["lr"] == 0.01


@pytest.mark.slow
def test_overwrite_replaces_only_a_tfxfer_run(tmp_path, folder):
    foreign = tmp_path / "runs" / "r"
    foreign.mkdir(parents=True)
    (foreign / "thesis.txt").write_text("three years of work")
    result = _finetune(tmp_path, folder, "--overwrite")
    assert result.exit_code == 1 and "replaces only a tfxfer run folder" in result.output and "thesis.txt" in result.output
    assert sorted(os.listdir(foreign)) == ["thesis.txt"]  # no lock file left either
    # A config.yaml that tfxfer did not write is no licence either.
    (foreign / "thesis.txt").unlink()
    (foreign / "config.yaml").write_text("title: my thesis\n")
    result = _finetune(tmp_path, folder, "--overwrite")
    assert result.exit_code == 1 and "not a tfxfer config" in result.output
    assert sorted(os.listdir(foreign)) == ["config.yaml"]
    # A real run is replaced.
    (foreign / "config.yaml").unlink()
    assert _finetune(tmp_path, folder).exit_code == 0
    assert _finetune(tmp_path, folder, "--overwrite", "--epochs", "1").exit_code == 0
    with open(foreign / "history.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 1


@pytest.mark.parametrize("name", ["../..", "..", "a/b", "/tmp/x"])
def test_run_names_stay_inside_the_output_folder(tmp_path, folder, name):
    result = run_cli("finetune", "--data-dir", folder, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                     "--epochs", "1", "--output-dir", tmp_path / "runs" / "inner", "--run-name", name)
    assert result.exit_code == 1 and "must be a plain folder name" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_before_it_begins_leaves_no_folder(tmp_path, folder):
    result = _finetune(tmp_path, folder, "--classes", "cat,unicorn")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "r").exists()


def test_a_study_folder_in_use_is_refused(tmp_path):
    data = write_splits(tmp_path / "data", train=4, test=2, classes=("cat", "dog"))
    study_dir = tmp_path / "studies" / "s"
    study_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(study_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cli("study", "--data-dir", data, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                         "--epochs", "1", "--strategies", "scratch", "--seeds", "0", "--output-dir",
                         tmp_path / "studies", "--name", "s")
        assert result.exit_code == 1 and f"Study folder {study_dir} is in use by PID {holder.pid}" in result.output
        assert os.listdir(study_dir) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.parametrize("extra, weights, saved, line", [
    ((), "none", "auto", "BatchNorm: trains (auto: random weights"),
    (("--train-bn",), "none", "on", "BatchNorm: trains (--train-bn on)"),
    (("--no-train-bn",), "none", "off", "BatchNorm: frozen (--train-bn off)"),
    (("--train-bn", "off"), "none", "off", "BatchNorm: frozen (--train-bn off)"),
])
def test_train_bn_auto_trains_from_random_weights_and_says_why(tmp_path, folder, extra, weights, saved, line):
    result = _finetune(tmp_path, folder, "--epochs", "1", *extra)
    assert result.exit_code == 0, result.output
    assert line in result.output
    config = yaml.safe_load(open(tmp_path / "runs" / "r" / "config.yaml"))
    assert config["transfer"]["train_bn"] == saved
    spec = yaml.safe_load(open(tmp_path / "runs" / "r" / "backbone.json"))
    assert spec["settings"]["train_bn"] == (saved != "off")


@pytest.mark.slow
def test_train_bn_auto_keeps_pretrained_statistics_frozen(tmp_path, folder):
    from tfxfer.freezing import resolve_train_bn

    assert resolve_train_bn("auto", "imagenet") == (False, "auto: pretrained statistics are kept")
    assert resolve_train_bn("auto", "saved_models/src")[0] is False
    assert resolve_train_bn("auto", "none")[0] is True
    # From a pretrained tfxfer run, auto keeps BatchNorm frozen.
    assert _finetune(tmp_path, folder, "--epochs", "1", "--train-bn").exit_code == 0
    result = run_cli("finetune", "--data-dir", folder, "--weights", tmp_path / "runs" / "r", "--epochs", "1",
                     "--batch-size", "8", "--output-dir", tmp_path / "runs", "--run-name", "from-r")
    assert result.exit_code == 0, result.output
    assert "BatchNorm: frozen (auto: pretrained statistics are kept)" in result.output
