"""`--distribute`: two worker processes on localhost train as one process would.

The cluster is two `tfxfer finetune --distribute multiworker` processes with
the standard `TF_CONFIG`, each given its own output folder as two machines
would have. The run: resnet9 (BatchNorm training, so the synchronized batch
statistics matter), LP-FT (`head@0,full@1`) with a backbone optimizer, L2-SP,
and a last global batch that splits unevenly (205 images, batches of 50). It
must match one process with the same global batch within the stated tolerance:
only the order of the sums differs (all-reduce of two half-batch gradients
against one whole-batch gradient).
"""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tfxfer import distributed
from tfxfer.errors import TfxferError

OPTIONS = [
    "--dataset", "digits", "--backbone", "resnet9", "--weights", "none", "--max-train-examples", "205",
    "--epochs", "2", "--batch-size", "50", "--l2sp", "0.01", "--unfreeze", "head@0,full@1", "--train-bn",
    "--backbone-lr-mult", "0.5", "--feature-cache", "off", "--deterministic", "--run-name", "r",
    # The tolerances below are float32's; auto is bfloat16 on CPUs that have it.
    "--precision", "float32",
]
# Measured: history within 4e-6 relative; test probabilities within 3.1e-5 on one CPU and 1.3e-4 on an
# AVX512-BF16 EPYC (two replicas' gradient sums round differently from one batch's, and the kernels differ).
HISTORY_RTOL, HISTORY_ATOL = 1e-4, 1e-6
PROBABILITY_ATOL = 5e-4


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _command(args):
    return [sys.executable, "-m", "tfxfer", "finetune", *args]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _history(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_history(got, expected):
    assert [row.keys() for row in got] == [row.keys() for row in expected]
    for row, want in zip(got, expected):
        for key, value in want.items():
            if key == "phase":
                assert row[key] == value
            else:
                np.testing.assert_allclose(float(row[key]), float(value), rtol=HISTORY_RTOL, atol=HISTORY_ATOL,
                                           err_msg=key)


@pytest.mark.slow
def test_two_workers_match_one_process(tmp_path):
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    outputs = [tmp_path / "chief", tmp_path / "worker1"]
    workers = [
        subprocess.Popen(
            _command([*OPTIONS, "--distribute", "multiworker", "--output-dir", str(outputs[i])]),
            env=_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "worker 0 of 2 worker(s), 2 replica(s) in all" in logs[0]
    assert ".worker-1: training done; the chief wrote the run folder" in logs[1]

    # Only the chief wrote a run; the other worker's copy is gone.
    assert os.listdir(outputs[0]) == ["r"]
    assert os.listdir(outputs[1]) == []
    chief = outputs[0] / "r"
    for name in ("metrics.json", "history.csv", "best.weights.h5", "model.keras", "export"):
        assert (chief / name).exists(), name

    single = subprocess.run(_command([*OPTIONS, "--output-dir", str(tmp_path / "single")]), env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    history = _history(chief)
    _assert_same_history(history, _history(tmp_path / "single" / "r"))

    # Freezing: the probe epoch leaves the backbone at its start on every
    # replica (L2-SP distance exactly 0); the fine-tuning epoch moves it.
    assert [row["phase"] for row in history] == ["head", "full"]
    assert float(history[0]["l2sp"]) == 0.0 and float(history[1]["l2sp"]) > 0.0

    got = np.load(chief / "test_predictions.npz")
    expected = np.load(tmp_path / "single" / "r" / "test_predictions.npz")
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=PROBABILITY_ATOL)


def test_mirrored_runs_the_distributed_loop_like_one_process(tmp_path):
    """On one device, `mirrored` is one replica through tfxfer's own loop: the
    same numbers as Keras's `fit`, to float round-off."""
    import tfxfer

    common = dict(dataset="digits", backbone="simplecnn", weights="none", epochs=2, batch_size=64,
                  max_train_examples=300, l2sp=0.01, freeze="stages:1", seed=3)
    runs = {}
    for distribute in ("none", "mirrored"):
        config = tfxfer.load_config(**common, distribute=distribute, output_dir=str(tmp_path), run_name=distribute)
        runs[distribute] = tfxfer.finetune(config, verbose=0, log=lambda message: None)
    _assert_same_history(_history(runs["mirrored"].run_dir), _history(runs["none"].run_dir))
    assert runs["mirrored"].metrics["test"]["accuracy"] == pytest.approx(runs["none"].metrics["test"]["accuracy"], abs=0.01)


@pytest.mark.parametrize("tf_config, message", [
    (None, "TF_CONFIG environment variable, which is not set"),
    ("{not json", "TF_CONFIG must be JSON like"),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "lists no workers"),
])
def test_multiworker_without_a_cluster_says_what_to_set(monkeypatch, tf_config, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if tf_config is not None:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(TfxferError, match=message):
        distributed.make_strategy("multiworker")


def test_replica_slices_cover_each_global_batch_in_order():
    import tensorflow as tf

    batches = tf.data.Dataset.range(205).batch(50)
    for total in (2, 3):
        per_replica = [
            list(distributed.replica_slices(batches, r, 1, total).as_numpy_iterator()) for r in range(total)
        ]
        for step, batch in enumerate(batches.as_numpy_iterator()):
            joined = np.concatenate([per_replica[r][step] for r in range(total)])
            np.testing.assert_array_equal(joined, batch)
    # Two replicas on one worker take consecutive slices of each batch.
    local = list(distributed.replica_slices(batches, 0, 2, 2).as_numpy_iterator())
    assert [len(s) for s in local[-2:]] == [3, 2]


def test_pretrain_refuses_multiworker_in_one_sentence(tmp_path):
    import tfxfer
    from tfxfer.config import PretrainConfig

    config = tfxfer.load_config(kind=PretrainConfig, dataset="digits", backbone="simplecnn", distribute="multiworker",
                                output_dir=str(tmp_path))
    with pytest.raises(TfxferError, match="multiworker is for finetune"):
        tfxfer.pretrain(config, log=lambda message: None)
    assert os.listdir(tmp_path) == []
