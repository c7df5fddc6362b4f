"""A run killed with SIGKILL mid-epoch and resumed ends exactly as an unbroken run.

Both runs are subprocesses, as a user's would be. With op determinism on, the
final weights, both optimizers' state and history.csv must be identical: epoch
e's batches and augmentations depend only on the seed and e (`set_epoch`), and
the checkpoint holds the model, every optimizer (one per stage with
--lr-decay), the weight average and the schedules' step.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import write_splits

OPTIONS = [
    "--backbone", "resnet9", "--weights", "none", "--image-size", "32", "--epochs", "4", "--batch-size", "8",
    "--unfreeze", "head@0,full@1", "--l2sp", "0.01", "--backbone-lr-mult", "0.5", "--dropout", "0.2",
    "--augment", "flip_crop", "--seed", "5", "--deterministic", "--ema", "0.9", "--lr-decay", "0.7",
]
KILL_EPOCH, KILL_STEP = 2, 3  # 0-based: in the middle of the third of four epochs


def _run(args, cwd, kill=False):
    """`tfxfer finetune ARGS` in a fresh Python; with `kill`, through the library
    with a callback that SIGKILLs the process mid-epoch."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if not kill:
        command = [sys.executable, "-m", "tfxfer", "finetune", *args]
    else:
        script = textwrap.dedent(f"""
            import json, os, signal, sys
            import keras, tfxfer

            class Kill(keras.callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    self.epoch = epoch
                def on_train_batch_end(self, batch, logs=None):
                    if self.epoch == {KILL_EPOCH} and batch == {KILL_STEP}:
                        os.kill(os.getpid(), signal.SIGKILL)

            options = json.loads(sys.argv[1])
            tfxfer.finetune(tfxfer.load_config(**options), callbacks=[Kill()], verbose=0)
        """)
        command = [sys.executable, "-c", script, json.dumps(_as_options(args))]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _as_options(args):
    """`--name value` and `--flag` pairs as `{name: value}` for `load_config`."""
    options, i = {}, 0
    while i < len(args):
        key = args[i][2:].replace("-", "_")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            options[key], i = args[i + 1], i + 2
        else:
            options[key], i = True, i + 1
    return options


def _variables(run_dir):
    state = os.path.join(run_dir, "checkpoint")
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(state) or _last(state))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map() if "save_counter" not in name}


def _last(folder):
    with open(os.path.join(folder, "state.json")) as f:
        return os.path.join(os.path.dirname(folder), json.load(f)["checkpoint"])  # relative to the run folder


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_unbroken_run(tmp_path):
    data = write_splits(tmp_path / "data", train=20, test=4)
    common = [*OPTIONS, "--data-dir", data, "--output-dir", str(tmp_path / "runs")]

    unbroken = _run([*common, "--run-name", "unbroken"], tmp_path)
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]

    killed = _run([*common, "--run-name", "killed"], tmp_path, kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    killed_dir = tmp_path / "runs" / "killed"
    assert _last(killed_dir / "checkpoint").endswith(f"epoch-{KILL_EPOCH}")  # two epochs finished
    assert len((killed_dir / "history.csv").read_text().splitlines()) == 1 + KILL_EPOCH
    assert not (killed_dir / "export").exists() and not (killed_dir / "metrics.json").exists()

    resumed = _run(["--resume", "--run-name", "killed", "--output-dir", str(tmp_path / "runs")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming killed after epoch {KILL_EPOCH}" in resumed.stdout

    unbroken_dir = tmp_path / "runs" / "unbroken"
    assert (killed_dir / "history.csv").read_text() == (unbroken_dir / "history.csv").read_text()
    expected, got = _variables(unbroken_dir), _variables(killed_dir)
    assert sorted(got) == sorted(expected)
    assert any("optimizer" in name for name in got) and any("backbone_optimizer_3" in name for name in got)  # one per stage of resnet9
    assert any(name.startswith("ema/averages") for name in got)  # the weight average resumes too
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    leftovers = [f for _, _, files in os.walk(killed_dir) for f in files if f.startswith("tmp-")]
    assert not leftovers
