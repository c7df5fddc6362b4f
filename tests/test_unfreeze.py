"""Gradual unfreezing: schedules, and what a phase switch keeps and changes."""

import csv
import os

import keras
import numpy as np
import pytest

import tfxfer
from tfxfer.freezing import parse_unfreeze, phase_at, resolve_phases
from tfxfer.optim import _slot_lists
from tests.conftest import random_images, run_cli, write_splits


def test_schedules_parse_and_resolve():
    phases = parse_unfreeze("head@0, stages:2@5,full@10")
    assert [str(p) for p in phases] == ["head@0", "stages:2@5", "full@10"]
    resolved = resolve_phases(phases, 20)
    assert [(start, str(policy)) for start, policy in resolved] == [(0, "head"), (5, "stages:2"), (10, "full")]
    assert [str(phase_at(resolved, e)) for e in (0, 4, 5, 9, 10, 19)] == ["head", "head", "stages:2", "stages:2", "full", "full"]
    lpft = resolve_phases(parse_unfreeze("head@0,full@25%"), 12)
    assert [start for start, _ in lpft] == [0, 3]
    assert [start for start, _ in resolve_phases(parse_unfreeze("head@0,full@25%"), 2)] == [0, 1]  # not 0.5 -> 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("full@3", "must start with a phase at 0"),
        ("head@0,full", "is not POLICY@EPOCH"),
        ("head@0,full@1.5", "is not POLICY@EPOCH"),
        ("head@0,fulll@2", "Unknown freeze policy"),
        ("head@0,full@150%", "past 100%"),
    ],
)
def test_bad_schedules_fail_in_one_sentence(text, message):
    with pytest.raises(tfxfer.TfxferError, match=message):
        parse_unfreeze(text)


def test_phases_that_collapse_in_a_short_run_fail():
    with pytest.raises(tfxfer.TfxferError, match="increasing epochs"):
        resolve_phases(parse_unfreeze("head@0,stages:1@10%,full@20%"), 4)


def _fit(model, epochs=1):
    x, y = random_images(32, seed=1), np.arange(32) % 3
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0)


def _slots(optimizer):
    """{weight path: [slot values]} of a built optimizer."""
    lists = [slots for _, slots in _slot_lists(optimizer)]
    return {w.path: [s[i].numpy().copy() for s in lists] for i, w in enumerate(optimizer._trainable_variables)}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_switching_phase_keeps_slots_anchors_and_bn_statistics(tiny_model_factory, optimizer):
    model = tiny_model_factory(freeze="head", l2sp=0.1)
    make = {"sgd": lambda lr: keras.optimizers.SGD(lr, momentum=0.9), "adam": keras.optimizers.Adam}[optimizer]
    model.compile(make(0.01), backbone_optimizer=make(0.001), loss="sparse_categorical_crossentropy")
    anchors = {path: value.numpy().copy() for path, value in model.penalty.anchors.items()}
    bn_before = {w.path: w.numpy().copy() for w in model.backbone.weights if "moving" in w.path}
    _fit(model)
    head_slots = _slots(model.head_optimizer)
    steps = int(model.optimizer.iterations.numpy())
    assert steps == 4 and int(model.head_optimizer.iterations.numpy()) == steps

    model.set_freeze("full")
    assert _slots(model.head_optimizer).keys() == head_slots.keys()
    for path, values in head_slots.items():  # the head's momentum / moments survive the switch
        assert all(np.array_equal(a, b) for a, b in zip(values, _slots(model.head_optimizer)[path]))
    fresh = _slots(model.backbone_optimizer)
    assert fresh and all(not v.any() for values in fresh.values() for v in values)  # new weights, zero slots
    # The backbone's optimizer took no step while frozen; its schedule starts where the head's is.
    assert int(model.head_optimizer.iterations.numpy()) == int(model.backbone_optimizer.iterations.numpy()) == steps

    _fit(model)
    assert int(model.backbone_optimizer.iterations.numpy()) == 2 * steps
    assert {p: v.numpy() for p, v in model.penalty.anchors.items()}.keys() == anchors.keys()
    assert all(np.array_equal(anchors[p], v.numpy()) for p, v in model.penalty.anchors.items())
    assert float(model.penalty()) > 0  # the backbone moved, and is pulled to the same anchors
    for w in model.backbone.weights:
        if "moving" in w.path:
            assert np.array_equal(bn_before[w.path], w.numpy()), f"BN statistic {w.path} moved"


@pytest.fixture
def folder(tmp_path):
    return write_splits(tmp_path / "data", train=12, test=3)


def _finetune(tmp_path, folder, *extra):
    args = ["finetune", "--data-dir", folder, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--lr", "0.01", "--output-dir", str(tmp_path / "runs"), *extra]
    return run_cli(*args)


def _phases(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as f:
        return [row["phase"] for row in csv.DictReader(f)]


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_finetune_logs_phases_and_resume_restores_the_phase(tmp_path, folder, monkeypatch):
    import tfxfer.training

    options = ("--unfreeze", "head@0,stages:1@1,full@2", "--epochs", "4", "--l2sp", "0.01", "--backbone-lr-mult", "0.1")
    result = _finetune(tmp_path, folder, *options, "--run-name", "whole")
    assert result.exit_code == 0, result.output
    assert "epoch 2: freeze stages:1" in result.output and "epoch 3: freeze full" in result.output
    assert _phases(tmp_path / "runs" / "whole") == ["head", "stages:1", "full", "full"]

    original = tfxfer.training.finetune
    monkeypatch.setattr(tfxfer.training, "finetune", lambda *a, **k: original(*a, callbacks=[_StopAfter(2)], **k))
    assert _finetune(tmp_path, folder, *options, "--run-name", "cut").exit_code == 130
    monkeypatch.setattr(tfxfer.training, "finetune", original)
    resumed = _finetune(tmp_path, folder, "--resume", "--run-name", "cut")
    assert resumed.exit_code == 0, resumed.output
    # Killed at a phase boundary: the checkpoint has the stages:1 optimizers, and full begins on resume.
    assert "resuming cut after epoch 2, freeze stages:1" in resumed.output and "epoch 3: freeze full" in resumed.output
    assert _phases(tmp_path / "runs" / "cut") == ["head", "stages:1", "full", "full"]


def test_freeze_that_contradicts_the_schedule_fails(tmp_path, folder):
    result = _finetune(tmp_path, folder, "--freeze", "full", "--unfreeze", "head@0,full@1")
    assert result.exit_code == 1 and "conflicts with --unfreeze" in result.output
