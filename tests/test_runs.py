import copy
import csv
import dataclasses
import os

import keras
import pytest
import yaml
from click.testing import CliRunner

import tfxfer
from tfxfer import atomic, budget
from tfxfer.cli import main
from tfxfer.budget import parse_duration
from tfxfer.config import FinetuneConfig, PretrainConfig, RunConfig, StudyConfig, load_config
from tfxfer.data.augment import AUGMENTATIONS
from tfxfer.optim import OPTIMIZERS
from tests.conftest import write_class_folder


@pytest.fixture
def folder(tmp_path):
    write_class_folder(str(tmp_path / "data"), classes=("cat", "dog", "owl"), per_class=16)
    return str(tmp_path / "data")


def _config(tmp_path, folder, **overrides):
    values = dict(data_dir=folder, backbone="tiny", weights="none", image_size=32, epochs=1, batch_size=8, lr=0.01,
                  output_dir=str(tmp_path / "runs"), run_name="r")
    return load_config(**{**values, **overrides})


def _rows(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def test_every_option_has_help_and_choices_come_from_their_module():
    fields = FinetuneConfig.fields()
    assert all(field.metadata["help"] for _, field, _ in fields.values())
    assert fields["optimizer"][1].metadata["choices"] is OPTIMIZERS
    assert all(name in fields["augment"][1].metadata["help"] for name in AUGMENTATIONS if name != "none")
    result = CliRunner().invoke(main, ["finetune", "--help"])
    for name in fields:
        assert "--" + name.replace("_", "-") in result.output, name
    assert "One of: sgd, adam, adamw" in " ".join(result.output.split())


def test_grouped_and_flat_yaml_agree_and_the_saved_config_is_grouped(tmp_path, folder):
    flat, grouped = tmp_path / "flat.yaml", tmp_path / "grouped.yaml"
    flat.write_text("dataset: digits\nlr: 0.1\nfreeze: head\n")
    grouped.write_text("data: {dataset: digits}\noptim: {lr: 0.1}\ntransfer: {freeze: head}\n")
    assert load_config(str(flat)).to_dict() == load_config(str(grouped)).to_dict()

    result = tfxfer.finetune(_config(tmp_path, folder), verbose=0, log=lambda *_: None)
    saved = yaml.safe_load(open(os.path.join(result.run_dir, "config.yaml")))
    assert set(saved) == {"data", "model", "transfer", "optim", "run"}
    assert saved["optim"]["lr"] == 0.01 and saved["model"]["backbone"] == "tiny"


def test_configs_are_frozen_and_a_changed_option_is_a_copy():
    config = load_config(dataset="digits", lr=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(kind=PretrainConfig, dataset="digits").pretext.temperature = 0.5  # the merged group too
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(kind=StudyConfig, dataset="digits").study.seeds = "1"
    changed = config.with_options(lr=0.5, run_name="x")
    assert (changed.optim.lr, changed.run.run_name) == (0.5, "x") and (config.optim.lr, config.run.run_name) == (0.1, None)
    assert changed.explicit == config.explicit == {"dataset", "lr"}  # what the user set, not what a run decided
    with pytest.raises(tfxfer.TfxferError, match="Unknown config key 'lrr'; did you mean 'lr'"):
        config.with_options(lrr=0.5)
    assert RunConfig(mlflow="uri").tracking == "mlflow"  # normalised as the group is built


def test_finetune_never_changes_the_callers_config(tmp_path, pretrained_backbone, monkeypatch):
    # A run decides its name, the pretrained source's backbone and size, --lr auto's rate, the epochs of
    # its time budget and the policy its --unfreeze starts with: all in its config.yaml, none in `config`,
    # so a second finetune(config) runs what the first ran.
    pretrained, source = pretrained_backbone
    monkeypatch.setattr(budget, "measure_seconds_per_step", lambda model, dataset, seconds: 240.0)
    config = load_config(data_dir=source, weights=pretrained, lr="auto", time_budget="1h", unfreeze="head@0,full@1",
                         batch_size=8, output_dir=str(tmp_path / "runs"))
    before = copy.deepcopy(config)
    result = tfxfer.finetune(config, verbose=0, log=lambda *_: None)
    assert config == before and config.explicit == before.explicit
    assert (config.run.run_name, config.model.backbone, config.model.image_size, config.optim.lr, config.optim.epochs,
            config.transfer.freeze) == (None, "resnet50", None, "auto", 5, "full")
    saved = yaml.safe_load(open(os.path.join(result.run_dir, "config.yaml")))
    assert saved["run"]["run_name"] == "source-simplecnn-head-full" == os.path.basename(result.run_dir)
    assert (saved["model"]["backbone"], saved["model"]["image_size"]) == ("simplecnn", 32)
    assert isinstance(saved["optim"]["lr"], float) and saved["transfer"]["freeze"] == "head"
    # 44 train images (6 batches of 8) + 1 eval batch an epoch: 3600 / (240 * 6.33) = 2.4 epochs.
    assert saved["optim"]["epochs"] == len(_rows(result.run_dir)) == 2


def test_yaml_syntax_error_is_one_sentence_with_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: digits\nlr: [0.1\nepochs: 3\n")
    with pytest.raises(tfxfer.TfxferError, match=r"line \d+") as info:
        load_config(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_library_resume_reloads_the_saved_config(tmp_path, folder):
    tfxfer.finetune(_config(tmp_path, folder, epochs=1, freeze="stages:2", lr=0.05), verbose=0, log=lambda *_: None)
    keras.backend.clear_session(free_memory=False)
    # Only the run and the new length: the rest comes from the saved config.
    config = load_config(run_name="r", output_dir=str(tmp_path / "runs"), epochs=2, validate=False)
    result = tfxfer.finetune(config, resume=True, verbose=0, log=lambda *_: None)
    assert [row["epoch"] for row in _rows(result.run_dir)] == ["0", "1"]
    saved = yaml.safe_load(open(os.path.join(result.run_dir, "config.yaml")))
    assert saved["transfer"]["freeze"] == "stages:2" and saved["optim"]["lr"] == 0.05


def test_resume_with_a_conflicting_option_says_so(tmp_path, folder):
    tfxfer.finetune(_config(tmp_path, folder), verbose=0, log=lambda *_: None)
    with pytest.raises(tfxfer.TfxferError, match=r"--lr 0.5 \(saved: 0.01\) conflicts"):
        tfxfer.finetune(_config(tmp_path, folder, lr=0.5, epochs=2), resume=True, verbose=0)
    cli = CliRunner().invoke(main, ["finetune", "--resume", "--run-name", "r", "--output-dir", str(tmp_path / "runs"), "--freeze", "head"])
    assert cli.exit_code == 1 and "--freeze head (saved: full) conflicts" in cli.output


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration_is_one_sentence():
    with pytest.raises(tfxfer.TfxferError, match="write it as 90s, 20m or 1.5h"):
        parse_duration("twenty minutes")


def test_plan_epochs_fits_whole_epochs_in_what_is_left():
    # 100 steps of 0.1 s and 30 eval batches (a third of a step each): 11 s an epoch.
    assert budget.plan_epochs(120, 0.1, 100, eval_steps_per_epoch=30) == 10
    assert budget.plan_epochs(120, 0.1, 100, eval_steps_per_epoch=30, spent_seconds=21) == 9
    assert budget.plan_epochs(120, 0.2, 100, eval_steps_per_epoch=30) == 5  # a slower step: fewer epochs
    assert budget.plan_epochs(5, 1.0, 100) == 1  # never zero


@pytest.mark.parametrize("step_seconds, epochs", [(120.0, 4), (240.0, 2)])
def test_time_budget_picks_fewer_epochs_for_a_slower_step(tmp_path, folder, monkeypatch, step_seconds, epochs):
    # Injected step time: 6 train + 1 eval batches an epoch; a 1 h budget holds
    # 3600 / (t * 6.33) epochs whatever the start-up took (under 9 minutes).
    measured = []
    monkeypatch.setattr(budget, "measure_seconds_per_step",
                        lambda model, dataset, seconds: measured.append(seconds) or step_seconds)
    lines = []
    result = tfxfer.finetune(_config(tmp_path, folder, time_budget="1h", epochs=99), verbose=0, log=lines.append)
    assert len(_rows(result.run_dir)) == epochs
    saved = yaml.safe_load(open(os.path.join(result.run_dir, "config.yaml")))
    assert saved["optim"]["epochs"] == epochs and saved["optim"]["time_budget"] == "1h"
    assert any(f"-> {epochs} epochs" in line for line in lines)
    assert measured == [30.0]  # the most a budget spends timing the step


@pytest.mark.slow
def test_a_short_budget_times_the_step_for_a_tenth_of_it(tmp_path, folder, monkeypatch):
    measured = []
    monkeypatch.setattr(budget, "measure_seconds_per_step", lambda model, dataset, seconds: measured.append(seconds) or 0.01)
    tfxfer.finetune(_config(tmp_path, folder, time_budget="10s"), verbose=0, log=lambda message: None)
    assert measured == [1.0]


def test_measuring_the_step_trains_nothing(tiny_model_factory):
    import numpy as np
    import tensorflow as tf

    model = tiny_model_factory(freeze="full")
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    before = [v.numpy().copy() for v in model.variables]
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8)
    data = tf.data.Dataset.from_tensor_slices((images, np.arange(16) % 3)).batch(8)
    seconds = budget.measure_seconds_per_step(model, data, seconds=0.5, max_steps=20)
    assert seconds > 0
    for a, b in zip(before, model.variables):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(model.optimizer.iterations.numpy()) == 0


def test_budget_guard_stops_a_run_that_falls_behind(tiny_model_factory):
    import time

    import numpy as np

    model = tiny_model_factory()
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    lines = []
    guard = budget.BudgetGuard(deadline=time.time(), log=lines.append)  # already used up
    history = model.fit(np.zeros((8, 32, 32, 3), np.uint8), np.zeros(8), epochs=3, callbacks=[guard], verbose=0)
    assert len(history.history["loss"]) == 1 and guard.stopped_after == 1
    assert lines == ["time budget: stopping after epoch 1, the next one would end past the budget"]


def test_resume_does_not_silently_drop_a_new_time_budget(tmp_path, folder):
    tfxfer.finetune(_config(tmp_path, folder), verbose=0, log=lambda *_: None)
    with pytest.raises(tfxfer.TfxferError, match=r"--time-budget 10m \(saved: None\) conflicts"):
        tfxfer.finetune(_config(tmp_path, folder, time_budget="10m"), resume=True, verbose=0)


def test_a_nan_loss_stops_the_run_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, folder):
    class Poison(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if self.epoch == 1 and batch == 1:
                self.model.head.kernel.assign(self.model.head.kernel * float("nan"))

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

    with pytest.raises(tfxfer.TfxferError, match=r"loss became nan at epoch 2, step 2; .*last finished epoch") as info:
        tfxfer.finetune(_config(tmp_path, folder, epochs=3), callbacks=[Poison()], verbose=0, log=lambda *_: None)
    assert "\n" not in str(info.value)
    run_dir = tmp_path / "runs" / "r"
    assert atomic.read_json(run_dir / "checkpoint" / "state.json")["epoch"] == 1
    assert [row["epoch"] for row in _rows(run_dir)] == ["0"]
    keras.backend.clear_session(free_memory=False)
    # The kept checkpoint is good: resuming trains on to the end.
    result = tfxfer.finetune(load_config(run_name="r", output_dir=str(tmp_path / "runs"), validate=False),
                             resume=True, verbose=0, log=lambda *_: None)
    assert [row["epoch"] for row in _rows(result.run_dir)] == ["0", "1", "2"]


def test_history_rows_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    from tfxfer.callbacks import HistoryLogger

    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,1.5\n1,1.25\n2,1.0\n")  # epoch 2 logged, then killed before its checkpoint
    logger = HistoryLogger(str(path), keep_epochs=2)
    logger.on_epoch_end(2, {"loss": 0.75})
    assert path.read_text() == "epoch,loss\n0,1.5\n1,1.25\n2,0.75\n"


@pytest.mark.parametrize("monitor, mode, expected_best", [
    ("val_accuracy", "max", 3),  # 0.9 ties from epoch 2 on: the lowest val_loss among them
    ("val_loss", "min", 4),      # no tie-break: the lowest loss
])
def test_best_epoch_breaks_accuracy_ties_by_validation_loss_and_survives_resume(tmp_path, monitor, mode, expected_best):
    from tfxfer.callbacks import RunCheckpoint

    epochs = [(0.8, 0.9), (0.9, 0.6), (0.9, 0.4), (0.7, 0.3), (0.9, 0.5)]  # (val_accuracy, val_loss)
    variable = keras.Variable(0.0)

    def save_best(path):
        with open(path, "w") as f:
            f.write(str(float(variable.numpy())))

    def checkpoint():
        return RunCheckpoint(str(tmp_path), {"v": variable}, save_best, str(tmp_path / "best.h5"), monitor, mode)

    first = checkpoint()
    for epoch, (accuracy, loss) in enumerate(epochs[:3]):
        variable.assign(epoch + 1)
        first.on_epoch_end(epoch, {"val_accuracy": accuracy, "val_loss": loss})
    resumed = checkpoint()  # a new process: the tie's loss comes from state.json
    assert resumed.restore() == 3
    for epoch, (accuracy, loss) in enumerate(epochs[3:], start=3):
        variable.assign(epoch + 1)
        resumed.on_epoch_end(epoch, {"val_accuracy": accuracy, "val_loss": loss})
    assert resumed.best_epoch == expected_best
    assert (tmp_path / "best.h5").read_text() == str(float(expected_best))  # the best weights are that epoch's


def test_op_determinism_turns_on_and_off():
    # set_op_determinism reads TensorFlow's private config module, as Keras does:
    # this fails if TensorFlow moves the switch or its query.
    from tensorflow.python.framework import config as tf_config

    from tfxfer.runs import set_op_determinism

    try:
        set_op_determinism(True)
        assert tf_config.is_op_determinism_enabled()
    finally:
        set_op_determinism(False)
    assert not tf_config.is_op_determinism_enabled()


def test_a_resumed_run_reads_the_class_order_it_recorded_and_refuses_other_classes(tmp_path):
    from tfxfer.runs import load_data, trained_classes

    data = tmp_path / "data"
    write_class_folder(str(data), classes=("1", "2", "10"), per_class=2, size=8)
    run = tmp_path / "runs" / "r"
    (run / "checkpoint").mkdir(parents=True)
    assert trained_classes(run) is None  # killed before its first checkpoint: nothing trained yet
    atomic.write_json(run / "metrics.json", {"val": {"class_names": ["1", "10", "2"]}})  # a finished run of before
    assert trained_classes(run) == ["1", "10", "2"]
    atomic.write_json(run / "checkpoint" / "state.json", {"epoch": 1, "class_names": ["2", "1", "10"]})
    assert trained_classes(run) == ["2", "1", "10"]
    config = _config(tmp_path, str(data), val_fraction=0.5)
    info = load_data(config, log=lambda line: None, model_classes=["2", "1", "10"])[3]
    assert info.class_names == ["2", "1", "10"]
    with pytest.raises(tfxfer.TfxferError) as error:
        load_data(config, log=lambda line: None, model_classes=["1", "2", "3"])
    assert str(error.value) == ("The classes of data differ from the ones the run trained on (new: 10; missing: 3); "
                                "resume it on the data it started with.")


@pytest.mark.slow
def test_a_run_keeps_the_class_ids_it_trained_with_when_resumed_and_evaluated(tmp_path, monkeypatch):
    """Class folders 1, 2 and 10 sort as numbers now; a run made when they sorted as text (1, 10, 2), which
    recorded no class order in its checkpoint, must go on with its own ids."""
    from tests.conftest import run_cli
    from tfxfer.data import folders

    data = tmp_path / "data"
    for split, n, seed in (("train", 4, 0), ("Valid", 2, 1), ("test", 2, 2)):
        write_class_folder(str(data / split), classes=("1", "2", "10"), per_class=n, size=8, seed=seed)
    run = tmp_path / "runs" / "r"
    args = ("finetune", "--data-dir", data, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--output-dir", tmp_path / "runs", "--run-name", "r")
    with monkeypatch.context() as earlier:
        earlier.setattr(folders, "class_order", sorted)
        first = run_cli(*args, "--epochs", "1")
    assert first.exit_code == 0, first.output
    assert "splits: train train/, val Valid/, test test/" in first.output
    state = atomic.read_json(run / "checkpoint" / "state.json")
    assert state.pop("class_names") == ["1", "10", "2"]
    atomic.write_json(run / "checkpoint" / "state.json", state)

    def true_classes_are_the_folders(predictions):
        with open(predictions, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 6 and all(row["true"] == row["file"].split(os.sep)[-2] for row in rows)

    evaluated = run_cli("evaluate", "--model", run, "--data-dir", data, "--output", tmp_path / "eval")
    assert evaluated.exit_code == 0, evaluated.output
    true_classes_are_the_folders(tmp_path / "eval" / "predictions.csv")
    resumed = run_cli(*args, "--epochs", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert atomic.read_json(run / "metrics.json")["test"]["class_names"] == ["1", "10", "2"]
    assert atomic.read_json(run / "checkpoint" / "state.json")["class_names"] == ["1", "10", "2"]
    true_classes_are_the_folders(run / "predictions.csv")


def test_a_run_interrupted_before_it_recorded_its_class_order_resumes_in_text_order(tmp_path):
    # Such a run trained with the classes sorted as text (1, 10, 2): integer names must not be renumbered.
    from tests.conftest import write_class_folder
    from tfxfer.config import load_config
    from tfxfer.runs import Run, save_config

    write_class_folder(str(tmp_path / "data"), classes=("1", "2", "10"), per_class=4)
    config = load_config(data_dir=str(tmp_path / "data"), backbone="tiny", weights="none", image_size=32,
                         output_dir=str(tmp_path / "runs"), run_name="old")
    os.makedirs(tmp_path / "runs" / "old")
    save_config(str(tmp_path / "runs" / "old"), config)  # what an interrupted run left: no checkpoint yet
    with Run.open(config, resume=True, log=lambda message: None) as run:
        assert run.load_data()[3].class_names == ["1", "10", "2"]
    with Run.open(load_config(data_dir=str(tmp_path / "data"), backbone="tiny", weights="none", image_size=32,
                              output_dir=str(tmp_path / "runs"), run_name="new"), log=lambda message: None) as run:
        assert run.load_data()[3].class_names == ["1", "2", "10"]  # a new run sorts them as numbers
