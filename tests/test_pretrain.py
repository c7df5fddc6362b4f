import copy
import csv
import dataclasses
import glob
import json
import os

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import tfxfer
from tfxfer import budget
from tfxfer.backbones.pretrained import find_pretrained
from tfxfer.cli import main
from tfxfer.config import PretrainConfig, load_config, option
from tfxfer.errors import TfxferError
from tfxfer.pretext import get_method, list_methods, register_method
from tests.conftest import write_class_folder

QUIET = {"verbose": 0, "log": lambda *_: None}


@pytest.fixture
def source(tmp_path):
    write_class_folder(str(tmp_path / "source"), classes=("ant", "bee", "cat", "dog"), per_class=12)
    return str(tmp_path / "source")


def _pretrain_config(tmp_path, source, **overrides):
    values = dict(data_dir=source, backbone="simplecnn", epochs=2, batch_size=8, output_dir=str(tmp_path / "runs"))
    return load_config(kind=PretrainConfig, **{**values, **overrides})


def _rows(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def test_supervised_pretrain_hands_its_backbone_to_finetune(tmp_path, source):
    result = tfxfer.pretrain(_pretrain_config(tmp_path, source, classes="ant,bee,cat"), **QUIET)
    assert result.run_dir.endswith("source-simplecnn-supervised")
    saved = {w.path: w.numpy() for w in result.model.backbone.weights}
    spec = json.load(open(os.path.join(result.run_dir, "backbone.json")))
    assert spec["backbone"] == "simplecnn" and spec["image_size"] == 32 and spec["method"] == "supervised"
    assert spec["source"]["classes"] == ["ant", "bee", "cat"] and spec["source"]["num_images"]["train"] > 0
    assert spec["preprocessing"].endswith("scale_unit") and spec["metrics"]["monitor"] == "val_accuracy"
    assert len(_rows(result.run_dir)) == 2

    keras.backend.clear_session(free_memory=False)
    # No --backbone, no --image-size: both come from backbone.json.
    config = load_config(data_dir=source, classes="dog,bee", weights=result.run_dir, l2sp=0.1, epochs=1,
                         batch_size=8, output_dir=str(tmp_path / "runs"), run_name="target")
    model = tfxfer.build_model("simplecnn", num_classes=2, weights=result.run_dir, image_size=32, l2sp=0.1)
    for w in model.backbone.weights:
        np.testing.assert_array_equal(w.numpy(), saved[w.path])  # exactly the saved weights
    assert float(model.penalty()) == 0.0  # the anchors are the pretrained weights
    finetuned = tfxfer.finetune(config, **QUIET)
    assert finetuned.model.backbone_name == "simplecnn" and finetuned.model.image_size == 32


def test_weights_file_beside_its_spec_and_finetune_runs_are_accepted(tmp_path, pretrained_backbone):
    pretrained, source = pretrained_backbone
    weights_file, spec = find_pretrained(os.path.join(pretrained, "backbone.weights.h5"))
    assert spec == json.load(open(os.path.join(pretrained, "backbone.json")))
    first = tfxfer.finetune(load_config(data_dir=source, weights=weights_file, epochs=1, batch_size=8,
                                        output_dir=str(tmp_path / "runs"), run_name="first"), **QUIET)
    keras.backend.clear_session(free_memory=False)
    # A finetune run folder is a backbone too: its head is dropped.
    second = tfxfer.finetune(load_config(data_dir=source, classes="ant,bee", weights=first.run_dir, epochs=1,
                                         batch_size=8, output_dir=str(tmp_path / "runs"), run_name="second"), **QUIET)
    assert second.model.num_classes == 2
    start = tfxfer.build_model("simplecnn", num_classes=2, weights=first.run_dir, image_size=32)
    for a, b in zip(first.model.backbone.weights, start.backbone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_conflicting_backbone_or_size_is_one_sentence(tmp_path, pretrained_backbone):
    pretrained, source = pretrained_backbone
    for flag, value in (("backbone", "resnet9"), ("image_size", 40)):
        config = load_config(data_dir=source, weights=pretrained, output_dir=str(tmp_path / "runs"), **{flag: value})
        with pytest.raises(tfxfer.TfxferError, match=f"--{flag.replace('_', '-')} {value} conflicts with --weights"):
            tfxfer.finetune(config, **QUIET)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["supervised", *(pytest.param(m, marks=pytest.mark.slow) for m in ("simclr", "autoencoder"))])
def test_killed_pretrain_resumes(tmp_path, source, method):
    config = _pretrain_config(tmp_path, source, method=method, epochs=3, run_name="p")
    with pytest.raises(KeyboardInterrupt):
        tfxfer.pretrain(config, callbacks=[_Interrupt()], **QUIET)
    run_dir = os.path.join(str(tmp_path / "runs"), "p")
    assert not os.path.exists(os.path.join(run_dir, "backbone.weights.h5"))  # nothing half-finished to trust
    keras.backend.clear_session(free_memory=False)
    resumed = load_config(kind=PretrainConfig, run_name="p", output_dir=str(tmp_path / "runs"), validate=False)
    lines = []
    result = tfxfer.pretrain(resumed, resume=True, verbose=0, log=lines.append)
    assert "resuming p after epoch 1" in lines
    assert [row["epoch"] for row in _rows(run_dir)] == ["0", "1", "2"]
    assert os.path.exists(result.weights)
    if method == "autoencoder":
        assert sorted(os.listdir(os.path.join(run_dir, "reconstructions"))) == [f"epoch_00{i}.png" for i in (1, 2, 3)]
    if method == "simclr":
        assert "val_knn_accuracy" in _rows(run_dir)[-1] and "embedding_std" in _rows(run_dir)[-1]


@pytest.mark.slow
def test_unlabelled_flat_folder_works_for_simclr_only(tmp_path):
    write_class_folder(str(tmp_path / "tmp"), classes=("x",), per_class=16)
    flat = tmp_path / "flat"
    os.rename(tmp_path / "tmp" / "x", flat)
    config = lambda method: load_config(kind=PretrainConfig, data_dir=str(flat), backbone="simplecnn", method=method,  # noqa: E731
                                        epochs=1, batch_size=8, output_dir=str(tmp_path / "runs"), run_name=method)
    result = tfxfer.pretrain(config("simclr"), **QUIET)
    assert result.spec["source"]["classes"] == ["unlabelled"] and result.spec["metrics"]["monitor"] == "loss"
    with pytest.raises(tfxfer.TfxferError, match="trains on labels"):
        tfxfer.pretrain(config("supervised"), **QUIET)


def test_pretrain_leaves_the_callers_config_as_it_was(tmp_path, source, monkeypatch):
    monkeypatch.setattr(budget, "measure_seconds_per_step", lambda model, dataset, seconds: 760.0)
    config = _pretrain_config(tmp_path, source, time_budget="2h")
    before = copy.deepcopy(config)
    result = tfxfer.pretrain(config, **QUIET)
    assert config == before and (config.run.run_name, config.optim.epochs) == (None, 2)
    # 6 train + 1 eval batches an epoch: 7200 / (760 * 6.33) = 1.5 epochs.
    saved = yaml.safe_load(open(os.path.join(result.run_dir, "config.yaml")))
    assert (saved["run"]["run_name"], saved["optim"]["epochs"]) == ("source-simplecnn-supervised", 1)
    assert len(_rows(result.run_dir)) == 1


@pytest.mark.slow
def test_time_budget_picks_fewer_pretrain_epochs_on_a_slower_step(tmp_path, source, monkeypatch):
    picked = {}
    for seconds in (60.0, 240.0):
        monkeypatch.setattr(budget, "measure_seconds_per_step", lambda model, dataset, seconds, s=seconds: s)
        config = _pretrain_config(tmp_path, source, time_budget="2h", run_name=f"b{int(seconds)}")
        picked[seconds] = len(_rows(tfxfer.pretrain(config, **QUIET).run_dir))
        keras.backend.clear_session(free_memory=False)
    # 44 train images (6 batches of 8) + 1 eval batch an epoch: 7200 / (60 * 6.33) = 18.9
    # epochs, 7200 / (240 * 6.33) = 4.7, whatever the start-up took (under a minute).
    assert picked == {60.0: 18, 240.0: 4}


def test_pretrain_cli(tmp_path, source):
    result = CliRunner().invoke(main, ["pretrain", "--data-dir", source, "--backbone", "simplecnn", "--method", "simclr",
                                       "--epochs", "1", "--batch-size", "8", "--output-dir", str(tmp_path / "runs"),
                                       "--tensorboard"])
    assert result.exit_code == 0, result.output
    assert "fine-tune it with: tfxfer finetune --weights" in result.output
    assert "tensorboard --logdir" in result.output and glob.glob(str(tmp_path / "runs" / "*" / "tensorboard" / "**" / "events.*"), recursive=True)
    bad = CliRunner().invoke(main, ["pretrain", "--data-dir", source, "--method", "simclear"])
    assert bad.exit_code == 1 and "did you mean 'simclr'" in bad.output


@pytest.mark.slow
def test_same_seed_gives_identical_simclr_history(tmp_path, source):
    histories = []
    for name in ("a", "b"):
        keras.backend.clear_session(free_memory=False)
        result = tfxfer.pretrain(_pretrain_config(tmp_path, source, method="simclr", seed=5, run_name=name), **QUIET)
        histories.append(_rows(result.run_dir))
    assert histories[0] == histories[1] and float(histories[0][0]["loss"]) > 0


@dataclasses.dataclass
class _SharpenOptions:
    sharpen: float = option(1.0, "Sharpen: a made-up strength, recorded in backbone.json.")

    def validate(self):
        if not self.sharpen > 0:
            raise TfxferError(f"sharpen must be > 0, got {self.sharpen}.")


def test_a_method_registered_from_outside_brings_its_own_options(tmp_path, source):
    supervised = get_method("supervised")
    if "sharpen" not in list_methods():
        register_method(dataclasses.replace(
            supervised, name="sharpen", options=_SharpenOptions,
            settings=lambda config: {"sharpen": config.pretext.sharpen},
        ))
    config = _pretrain_config(tmp_path, source, method="sharpen", sharpen=2.5, epochs=1, classes="ant,bee")
    assert config.pretext.sharpen == 2.5 and "--sharpen" in CliRunner().invoke(main, ["pretrain", "--help"]).output
    yaml_file = tmp_path / "sharpen.yaml"
    yaml_file.write_text("pretext:\n  method: sharpen\n  sharpen: 0.5\n")
    assert load_config(str(yaml_file), PretrainConfig, data_dir=source).pretext.sharpen == 0.5
    with pytest.raises(TfxferError, match="sharpen must be > 0, got -1"):
        _pretrain_config(tmp_path, source, method="sharpen", sharpen=-1)
    bad = CliRunner().invoke(main, ["pretrain", "--data-dir", source, "--method", "sharpen", "--sharpen", "0"])
    assert bad.exit_code == 1 and "sharpen must be > 0, got 0" in bad.output and "Traceback" not in bad.output
    result = tfxfer.pretrain(config, **QUIET)
    assert json.load(open(os.path.join(result.run_dir, "backbone.json")))["settings"]["sharpen"] == 2.5
    # The built-in methods' options stay in force, and a name taken by another option is refused.
    assert config.pretext.temperature == 0.2 and config.pretext.denoise == 0.0
    clash = dataclasses.make_dataclass("Clash", [("lr", float, option(0.1, "lr again"))])
    with pytest.raises(ValueError, match="'lr' of Clash is already an option"):
        register_method(dataclasses.replace(supervised, name="clash", options=clash))
