import glob
import os

import keras
import numpy as np
import pytest
import yaml

import tfxfer
from tfxfer import runs
from tfxfer.config import load_config
from tfxfer.optim import make_optimizer, make_optimizers, make_schedule
from tests.conftest import random_images


def test_cosine_schedule_warms_up_then_decays():
    schedule = make_schedule(0.1, "cosine", total_steps=100, warmup_steps=10)
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(55)) == pytest.approx(0.05, rel=1e-3)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)


def _backbone_movement(tiny_model_factory, mult):
    keras.utils.set_random_seed(0)
    model = tiny_model_factory(freeze="full")
    config = load_config(dataset="digits", optimizer="adam", lr=0.01, backbone_lr_mult=mult)
    head, backbone = make_optimizers(config, model, steps_per_epoch=4)
    model.compile(optimizer=head, backbone_optimizer=backbone, loss="sparse_categorical_crossentropy")
    start = [w.numpy().copy() for w in model.backbone.trainable_weights]
    head_start = model.head.kernel.numpy().copy()
    model.fit(random_images(32), np.arange(32) % 3, batch_size=8, epochs=1, verbose=0)
    moved = sum(np.abs(w.numpy() - s).sum() for w, s in zip(model.backbone.trainable_weights, start))
    return moved, np.abs(model.head.kernel.numpy() - head_start).sum(), backbone


def test_make_optimizer_sgd_is_keras_sgd_with_momentum():
    optimizer = make_optimizer("sgd", 0.05, weight_decay=1e-4)
    assert type(optimizer) is keras.optimizers.SGD and optimizer.momentum == 0.9


def test_backbone_lr_mult_uses_its_own_optimizer_and_survives_adam(tiny_model_factory):
    full, head_full, none = _backbone_movement(tiny_model_factory, 1.0)
    slow, head_slow, separate = _backbone_movement(tiny_model_factory, 0.01)
    assert none is None and separate is not None
    # Scaled gradients would leave Adam's steps unchanged; a scaled lr shrinks them.
    assert slow < full / 20
    assert head_slow > head_full / 3


@pytest.mark.parametrize("mult", [1.0, 0.5])
def test_no_weight_decay_on_the_backbone_while_l2sp_is_on(tiny_model_factory, mult):
    model = tiny_model_factory(freeze="full", l2sp=0.1)
    config = load_config(dataset="digits", optimizer="adamw", lr=0.1, weight_decay=0.5, l2sp=0.1, backbone_lr_mult=mult)
    head, backbone = make_optimizers(config, model, steps_per_epoch=1)
    model.compile(optimizer=head, backbone_optimizer=backbone, loss="sparse_categorical_crossentropy")
    # Zero gradients: AdamW moves a weight only through its weight decay.
    pairs = [(np.zeros(w.shape, "float32"), w) for w in model.trainable_weights]
    before = {w.path: w.numpy().copy() for w in model.trainable_weights}
    backbone_ids = {id(w) for w in model.backbone.trainable_weights}
    model.optimizer.apply_gradients(pairs)
    assert (model.head_optimizer is head) and (model.backbone_optimizer is backbone)
    for w in model.trainable_weights:
        changed = not np.array_equal(before[w.path], w.numpy())
        assert changed == (id(w) not in backbone_ids and w.path == "head/kernel"), w.path


def test_config_layers_defaults_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\nlr: 0.1\nfreeze: stages:2\ntrain-bn: true\n")
    config = load_config(str(path), lr=0.5, epochs=None)
    assert (config.optim.lr, config.transfer.freeze, config.transfer.train_bn, config.optim.epochs) == (0.5, "stages:2", "on", 5)
    assert runs.default_run_name(config) == "digits-resnet50-stages2"


@pytest.mark.parametrize(
    "values, message",
    [({"lerning_rate": 1}, "Unknown config key 'lerning_rate'"), ({"epochs": "many"}, "must be a whole number"), ({"train_bn": "yes"}, "train-bn"), ({"lr": -1.0}, "must be > 0")],
)
def test_bad_config_values_fail_clearly(values, message):
    with pytest.raises(tfxfer.TfxferError, match=message):
        load_config(dataset="digits", **values)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: null\n", "Config key lr cannot be null; it takes a number, e.g. 0.01."),
        ("optimizer: ~\n", "Config key optimizer cannot be null; it takes one of sgd, adam, adamw"),
        ("epochs: 2.5\n", "Config key epochs must be a whole number, got 2.5."),
        ("epochs: true\n", "Config key epochs must be a whole number, got True."),
        ("lr: .nan\n", "lr must be a number or auto, got NaN"),
        ("lr: 0.1\nepochs: 3\nlr: 0.2\n", "YAML error at line 4, column 1: the key 'lr' is given twice."),
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", "the key 'lr' is given twice"),
    ],
)
def test_bad_yaml_values_are_one_sentence_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: digits\n" + text)
    with pytest.raises(tfxfer.TfxferError) as error:
        load_config(str(path))
    assert message in str(error.value)


def test_every_shipped_config_loads():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
    assert len(paths) >= 3
    for path in paths:
        with open(path) as f:
            keys = set(yaml.safe_load(f))
        kind = (tfxfer.StudyConfig if keys & {"strategies", "seeds"} else
                tfxfer.PretrainConfig if "method" in keys else tfxfer.FinetuneConfig)
        # A config may leave the data to the command line (the CIFAR study does).
        data = {} if keys & {"dataset", "data_dir"} else {"data_dir": "some/folder"}
        tfxfer.load_config(path, kind, **data)


def test_recipe_classic_fills_only_what_was_not_given():
    tuned = load_config(dataset="digits")
    classic = load_config(dataset="digits", recipe="classic")
    assert (classic.optim.lr, classic.optim.schedule, classic.data.augment) == (1e-3, "constant", "none")
    assert tuned.transfer.recipe == "tuned" and "lr" not in classic.explicit
    mixed = load_config(dataset="digits", recipe="classic", lr=0.05, strategy="full+schedule=cosine")
    assert (mixed.optim.lr, mixed.optim.schedule, mixed.data.augment) == (0.05, "cosine", "none")
    with pytest.raises(tfxfer.TfxferError, match="recipe"):
        load_config(dataset="digits", recipe="fancy")


def test_home_and_environment_variables_expand_in_every_path_option(tmp_path, monkeypatch):
    from tfxfer.config import FinetuneConfig, PretrainConfig

    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DATA", str(data))
    (home / "run.yaml").write_text("data:\n  data_dir: $DATA/images\nrun:\n  output_dir: ~/runs\n")
    config = load_config("~/run.yaml", weights="${DATA}/w.weights.h5", feature_cache="~/cache",
                         tfds_data_dir="~/tfds", tfds_manual_dir="$DATA/manual", mlflow="~/mlruns")
    assert config.data.data_dir == str(data / "images") and config.run.output_dir == str(home / "runs")
    assert config.model.weights == str(data / "w.weights.h5") and config.transfer.feature_cache == str(home / "cache")
    assert (config.data.tfds_data_dir, config.data.tfds_manual_dir) == (str(home / "tfds"), str(data / "manual"))
    assert config.run.mlflow == str(home / "mlruns")
    other = load_config(csv="~/labels.csv", weights="imagenet", feature_cache="auto", kind=FinetuneConfig)
    assert other.data.csv == str(home / "labels.csv") and (other.model.weights, other.transfer.feature_cache) == ("imagenet", "auto")
    assert load_config(tfrecord="$DATA/*.tfrecord").data.tfrecord == str(data / "*.tfrecord")
    # Every option that names a file or folder is marked so, in every command.
    for kind in (FinetuneConfig, PretrainConfig):
        paths = {name for name, (_, field, _) in kind.fields().items() if field.metadata.get("path")}
        assert paths == {"data_dir", "csv", "tfrecord", "tfds_data_dir", "tfds_manual_dir", "weights", "mlflow",
                         "output_dir"} | ({"feature_cache"} if kind is FinetuneConfig else set())
