"""The everyday options: early stopping and --monitor, class weights, label
smoothing, the augmentation menu, TensorBoard."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score

import tfxfer
from tfxfer import atomic
from tests.conftest import run_cli, write_class_folder
from tfxfer.data.augment import parse_augment
from tfxfer.data.pipeline import set_epoch
from tfxfer.losses import Crossentropy
from tfxfer.metrics import Accuracy, MacroF1


def _history(run_dir):
    import csv

    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def folder(tmp_path):
    write_class_folder(str(tmp_path / "data"), classes=("cat", "dog", "owl"), per_class=12)
    return tmp_path / "data"


def _finetune(tmp_path, folder, *extra):
    return run_cli("finetune", "--data-dir", folder, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                   "--batch-size", "8", "--output-dir", tmp_path / "runs", "--run-name", "r", *extra)


# --- loss and metrics, against hand computations ---------------------------------------------------


def test_crossentropy_with_ids_soft_labels_and_smoothing():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), 16).astype("float32")
    ids = rng.integers(0, 4, 16)
    plain = Crossentropy(4)(ids, probabilities).numpy()
    expected = keras.losses.SparseCategoricalCrossentropy()(ids, probabilities).numpy()
    assert plain == pytest.approx(expected, rel=1e-5)

    soft = rng.dirichlet(np.ones(4), 16).astype("float32")
    eps = 0.1
    targets = soft * (1 - eps) + eps / 4
    by_hand = np.mean(-(targets * np.log(probabilities)).sum(axis=1))
    assert Crossentropy(4, label_smoothing=eps)(soft, probabilities).numpy() == pytest.approx(by_hand, rel=1e-4)


def test_accuracy_and_macro_f1_match_scikit_learn():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(5), 200).astype("float32")
    probabilities[:, 4] *= 0.01  # class 4 is never predicted
    ids = rng.integers(0, 5, 200)
    f1 = MacroF1(5)
    for start in range(0, 200, 64):  # accumulated over batches, as in an epoch
        f1.update_state(ids[start:start + 64], probabilities[start:start + 64])
    expected = f1_score(ids, probabilities.argmax(1), average="macro", labels=range(5), zero_division=0)
    assert float(f1.result()) == pytest.approx(expected, abs=1e-6)
    accuracy = Accuracy()
    accuracy.update_state(np.eye(5)[ids], probabilities)  # one-hot labels give the same accuracy
    assert float(accuracy.result()) == pytest.approx(np.mean(probabilities.argmax(1) == ids))


# --- stopping and selection ---------------------------------------------------------------------


def test_early_stopping_on_val_loss_stops_and_keeps_the_best_epoch(tmp_path, folder):
    # A learning rate this small changes nothing that the monitor can see: no epoch beats the first.
    result = _finetune(tmp_path, folder, "--epochs", "6", "--lr", "1e-12", "--monitor", "val_loss", "--early-stopping", "2")
    assert result.exit_code == 0, result.output
    assert "early stopping after epoch 3: no better val_loss for 2 epochs (best: epoch 1" in result.output
    assert len(_history(tmp_path / "runs" / "r")) == 3
    metrics = atomic.read_json(tmp_path / "runs" / "r" / "metrics.json")
    assert metrics["best_epoch"] == 1 and metrics["epochs"] == 3


def test_monitor_val_macro_f1_logs_it_and_picks_the_best_epoch_by_it(tmp_path, folder):
    result = _finetune(tmp_path, folder, "--epochs", "3", "--lr", "0.05", "--monitor", "val_macro_f1")
    assert result.exit_code == 0, result.output
    rows = _history(tmp_path / "runs" / "r")
    scores = [float(r["val_macro_f1"]) for r in rows]
    # The highest macro-F1; among tied epochs, the lowest val_loss (then the first).
    best = min(range(len(rows)), key=lambda e: (-scores[e], float(rows[e]["val_loss"]), e))
    assert atomic.read_json(tmp_path / "runs" / "r" / "metrics.json")["best_epoch"] == 1 + best


def test_balanced_class_weights_are_reported_and_used(tmp_path):
    root = tmp_path / "data"
    write_class_folder(str(root), classes=("common", "rare"), per_class=6)
    write_class_folder(str(tmp_path / "more"), classes=("common",), per_class=18, seed=3)
    for f in (tmp_path / "more" / "common").iterdir():
        f.rename(root / "common" / f"extra-{f.name}")
    result = run_cli("finetune", "--data-dir", root, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                     "--epochs", "1", "--val-fraction", "0.25", "--class-weight", "balanced",
                     "--output-dir", tmp_path / "runs", "--run-name", "w")
    assert result.exit_code == 0, result.output
    # 24 common and 6 rare images; 18 + 4 after a quarter per class is carved for validation.
    assert "training images per class: common 18, rare 4" in result.output or "training images per class: common 18, rare 5" in result.output
    line = next(l for l in result.output.splitlines() if l.startswith("class weights (balanced)"))
    common, rare = (float(part.split()[-1]) for part in line.split(": ")[1].split(", "))
    assert rare / common == pytest.approx(18 / 4, rel=0.3)


# --- augmentation -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["flip", "crop", "flip_crop", "rotate:20", "zoom:0.2", "color:0.3", "randaugment", "mixup", "cutmix",
                                  "flip,crop,mixup:0.4"])
def test_each_augmentation_keeps_the_batch_contract_and_replays_by_epoch(tmp_path, text):
    write_class_folder(str(tmp_path / "d"), classes=("a", "b", "c"), per_class=4)

    def epochs(start, n):
        train = tfxfer.load_dataset(data_dir=str(tmp_path / "d"), image_size=32, batch_size=4, seed=2, augment=text)[0]
        set_epoch(train, start)
        return [list(train.as_numpy_iterator()) for _ in range(n)]

    first = epochs(0, 2)
    for images, labels in first[0]:
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        if "mix" in text:
            assert labels.shape == (images.shape[0], 3) and np.allclose(labels.sum(1), 1, atol=1e-5)
        else:
            assert labels.shape == (images.shape[0],)
    again = epochs(1, 1)[0]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first[1], again))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first[0], first[1]))


@pytest.mark.parametrize("text, message", [("flop", "did you mean 'flip'"), ("rotate:x", "must be a number"),
                                           ("zoom:-1", "must be above 0")])
def test_bad_augmentation_text_is_one_sentence(text, message):
    with pytest.raises(tfxfer.TfxferError, match=message):
        parse_augment(text)


def test_augmented_label_smoothed_run_exports_a_model_without_augmentation(tmp_path, folder):
    result = _finetune(tmp_path, folder, "--epochs", "1", "--augment", "flip,crop,rotate,cutmix", "--label-smoothing", "0.1",
                       "--deterministic")
    assert result.exit_code == 0, result.output
    loaded = tf.saved_model.load(str(tmp_path / "runs" / "r" / "export" / "1"))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    serve = loaded.signatures["serving_default"]
    once, twice = serve(images=tf.constant(images)), serve(images=tf.constant(images))
    np.testing.assert_array_equal(once["probabilities"].numpy(), twice["probabilities"].numpy())  # nothing random inside
    model = keras.models.load_model(str(tmp_path / "runs" / "r" / "model.keras"))
    assert not [layer for layer in model._flatten_layers() if type(layer).__name__.startswith(("Random", "RandAugment", "Mix", "Cut"))]


# --- TensorBoard --------------------------------------------------------------------------------


def test_tensorboard_writes_scalars_the_l2sp_term_learning_rate_and_images(tmp_path, folder):
    result = _finetune(tmp_path, folder, "--epochs", "2", "--l2sp", "0.01", "--tensorboard")
    assert result.exit_code == 0, result.output
    log_dir = tmp_path / "runs" / "r" / "tensorboard"
    assert f"tensorboard --logdir {log_dir}" in result.output
    tags = set()
    for path in glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch_loss", "epoch_accuracy", "epoch_l2sp", "epoch_lr", "a training batch"} <= tags, tags
    assert "lr" in _history(tmp_path / "runs" / "r")[0]
