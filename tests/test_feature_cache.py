"""Feature caching for frozen backbones: same logits, same training, full export."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from tfxfer.feature_cache import HeadModel, extract_features
from tests.conftest import random_images, run_cli, write_splits


def test_cached_path_gives_the_logits_of_the_full_model(tiny_model_factory):
    import tensorflow as tf

    model = tiny_model_factory(freeze="head")
    images, labels = random_images(20, seed=3), np.arange(20) % 3
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    features, cached_labels = extract_features(model, dataset)
    assert features.shape == (20, 16) and np.array_equal(cached_labels, labels)
    head = HeadModel(model)
    assert np.abs(head.predict(features, verbose=0) - model.predict(images, verbose=0)).max() < 1e-4
    assert head.trainable_weights == model.trainable_weights  # the same variables: training one trains the other


@pytest.fixture
def folder(tmp_path):
    return write_splits(tmp_path / "data", train=8, test=4)


def _finetune(tmp_path, folder, name, *extra):
    # One batch holds the whole training split, so the order of examples cannot matter.
    args = ["finetune", "--data-dir", folder, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--freeze", "head", "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--head-l2", "0.001",
            "--output-dir", str(tmp_path / "runs"), "--run-name", name, *extra]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return result.output, tmp_path / "runs" / name


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_training_on_the_cache_matches_training_through_the_backbone(tmp_path, folder):
    plain_output, plain = _finetune(tmp_path, folder, "plain", "--feature-cache", "off")
    cached_output, cached = _finetune(tmp_path, folder, "cached")  # auto: head, no augmentation
    assert "feature cache" not in plain_output and "the head trains on them for epochs 1-3" in cached_output
    a, b = np.load(plain / "test_predictions.npz"), np.load(cached / "test_predictions.npz")
    assert np.array_equal(a["labels"], b["labels"])
    assert np.abs(a["probabilities"] - b["probabilities"]).max() < 1e-4
    ha, hb = _history(plain), _history(cached)
    assert list(ha[0]) == list(hb[0])  # same columns, head_l2 included
    for row_a, row_b in zip(ha, hb):
        for key in ("loss", "val_loss", "head_l2"):
            assert float(row_a[key]) == pytest.approx(float(row_b[key]), abs=1e-4)
    # The export is the whole model: it takes images, through the backbone.
    metrics = json.loads((cached / "metrics.json").read_text())
    assert metrics["export_max_abs_diff"] < 1e-5 and (cached / "export" / "1" / "saved_model.pb").exists()


@pytest.mark.slow
def test_a_cache_folder_is_reused_and_lp_ft_uses_the_cache_in_its_probe(tmp_path, folder):
    cache = str(tmp_path / "features")
    # A test image copied into train: the pre-flight finds it by its bytes, and near itself in the cached features.
    shutil.copy(os.path.join(folder, "test", "cat", "001.png"), os.path.join(folder, "train", "cat", "copy.png"))
    first, run = _finetune(tmp_path, folder, "a", "--feature-cache", cache, "--allow-leaks")
    assert first.count("written to") == 3 and len(os.listdir(cache)) == 3  # train, validation and test features
    preflight = json.loads((run / "metrics.json").read_text())["preflight"]
    assert preflight["leaks"]["count"] == 1 and preflight["near_duplicates"]["count"] >= 1
    assert "test/cat/001.png (cosine 1.000)" in preflight["near_duplicates"]["examples"], preflight
    second, _ = _finetune(tmp_path, folder, "b", "--feature-cache", cache, "--allow-leaks")
    assert second.count("read from") == 3

    output, run = _finetune(tmp_path, folder, "lpft", "--unfreeze", "head@0,full@2", "--freeze", "head",
                            "--allow-leaks")
    assert "the head trains on them for epochs 1-2" in output and "epoch 3: freeze full" in output
    assert [row["phase"] for row in _history(run)] == ["head", "head", "full"]


@pytest.mark.slow
def test_augmentation_turns_auto_off_and_an_explicit_cache_says_what_it_skips(tmp_path, folder):
    output, _ = _finetune(tmp_path, folder, "aug", "--augment", "flip_crop")
    assert "feature cache" not in output
    output, _ = _finetune(tmp_path, folder, "aug-cached", "--augment", "flip_crop", "--feature-cache", "memory")
    assert "features of un-augmented images" in output and "the head trains on them" in output
