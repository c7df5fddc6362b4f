"""The data pre-flight: leaks, duplicates, labels and class sizes, on data written here."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import random_images, write_class_folder
from tfxfer import preflight
from tfxfer.data import DatasetInfo, load_splits
from tfxfer.data.splits import Split
from tfxfer.errors import TfxferError


def _csv(root, extra=(), owl_train=5):
    """A CSV of cat, dog and owl images with their own train, val and test rows (nothing is carved),
    `owl_train` owl training rows, and the rows `extra` after them."""
    write_class_folder(str(root / "images"), classes=("cat", "dog", "owl"), per_class=8)
    rows = ["path,label,split"]
    for name in ("cat", "dog", "owl"):
        files = sorted(os.listdir(root / "images" / name))
        rows += [f"images/{name}/{f},{name},train" for f in files[:owl_train if name == "owl" else 5]]
        rows += [f"images/{name}/{files[5]},{name},val"] + [f"images/{name}/{f},{name},test" for f in files[6:]]
    (root / "data.csv").write_text("\n".join(rows + list(extra)) + "\n")
    return load_splits(csv=str(root / "data.csv"))


def test_a_test_image_listed_again_as_a_training_row_is_a_leak(tmp_path):
    splits, info = _csv(tmp_path, ["images/cat/006.jpg,cat,train"])
    with pytest.raises(TfxferError) as refused:
        preflight.check(splits, info)
    assert str(refused.value) == (
        "1 test image is also in the training split (first: cat/006.jpg, listed in train and test), so the test "
        "accuracy would count images the model trained on; remove it from one split, or pass --allow-leaks "
        "(allow_leaks: true in the config's data section) to go on anyway.")

    report = preflight.check(splits, info, allow_leaks=True)
    assert report["leaks"] == {"count": 1, "examples": ["cat/006.jpg, listed in train and test"]}
    assert report["images"] == {"train": 16, "val": 3, "test": 6} and report["allow_leaks"] is True
    block = preflight.describe(report)
    assert block[0].startswith("preflight: 16 train, 3 val, 6 test images checked in ") and "1 finding(s)" in block[0]
    assert block[1] == ("  leak (allowed by --allow-leaks): 1 test image also in train (first: cat/006.jpg, listed in "
                        "train and test); the test accuracy counts them")


def test_a_copy_under_another_name_is_found_by_its_bytes(tmp_path):
    write_class_folder(str(tmp_path / "images"), classes=("cat", "dog", "owl"), per_class=8)
    (tmp_path / "copies").mkdir()
    shutil.copy(tmp_path / "images" / "dog" / "007.png", tmp_path / "copies" / "a.png")
    splits, info = _csv(tmp_path, ["copies/a.png,dog,train", "copies/a.png,dog,val"])
    report = preflight.check(splits, info, allow_leaks=True)
    assert report["leaks"] == {"count": 1, "examples": ["images/dog/007.png has the same bytes as copies/a.png"]}
    assert report["duplicates"] == {
        "train/val": {"count": 1, "examples": ["copies/a.png, listed in train and val"]},
        "val/test": {"count": 1, "examples": ["images/dog/007.png has the same bytes as copies/a.png"]},
    }
    assert report["label_conflicts"]["count"] == 0


def test_one_file_under_two_labels_and_a_tiny_class_are_warnings(tmp_path):
    splits, info = _csv(tmp_path, ["images/dog/000.jpg,cat,train"], owl_train=3)
    report = preflight.check(splits, info)  # no leak: no error
    assert report["label_conflicts"] == {"count": 1, "examples": ["dog/000.jpg as cat and dog"]}
    assert report["duplicates"] == {"train": {"count": 1, "examples": ["dog/000.jpg, listed twice"]}}
    assert report["classes"]["per_class"] == {"cat": 6, "dog": 5, "owl": 3} and report["classes"]["tiny"] == {"owl": 3}
    assert preflight.describe(report)[1:] == [
        "  warning: 1 exact duplicate within train (first: dog/000.jpg, listed twice)",
        "  warning: 1 image under two labels (first: dog/000.jpg as cat and dog)",
        "  warning: 1 class(es) with under 5 training images (owl 3)",
    ]


def test_each_file_is_read_once(tmp_path, monkeypatch):
    splits, info = _csv(tmp_path, ["images/cat/006.jpg,cat,train", "images/cat/000.jpg,cat,train"])
    opened = []

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(preflight, "open", counting_open, raising=False)
    preflight.check(splits, info, allow_leaks=True)
    assert len(opened) == len(set(opened)) == 8 * 3  # every listed file once, the two listed twice too


def test_arrays_and_records_are_hashed_as_the_pipeline_yields_them():
    images = random_images(6, size=8)
    labels = np.array([0, 0, 0, 1, 1, 1], np.int32)
    train = Split(6, labels, images)
    # Two test images equal training images 2 and 4; a record split holds an array's pixels the same way.
    records = tf.data.Dataset.from_tensor_slices((np.stack([images[2], images[4], random_images(1, 8, seed=5)[0]]),
                                                  np.array([0, 1, 1], np.int64)))
    info = DatasetInfo("arrays", ["a", "b"], 8, {"train": 6, "test": 3})
    splits = {"train": train, "val": Split(1, labels[:1], images[:1]), "test": Split(3, records=records)}
    report = preflight.check(splits, info, allow_leaks=True)
    assert report["leaks"] == {"count": 2, "examples": ["test #0 has the same bytes as train #2",
                                                        "test #1 has the same bytes as train #4"]}
    assert report["duplicates"]["train/val"]["examples"] == ["val #0 has the same bytes as train #0"]
    with pytest.raises(TfxferError, match=r"^2 test images are also in the training split \(first: test #0 has the "
                                          r"same bytes as train #2\).*remove them from one split"):
        preflight.check(splits, info)


def test_empty_and_imbalanced_classes():
    labels = np.array([0] * 40 + [1] * 3, np.int32)
    images = random_images(43, size=4)
    info = DatasetInfo("arrays", ["many", "few", "none"], 4, {"train": 43})
    report = preflight.check({"train": Split(43, labels, images), "val": Split(1, labels[:1], images[:1])}, info)
    classes = report["classes"]
    assert classes["empty"] == ["none"] and classes["tiny"] == {"few": 3}
    assert classes["imbalance"] == {"ratio": 13.33, "largest": ["many", 40], "smallest": ["few", 3]}
    assert preflight.describe(report)[-2:] == [
        "  warning: 1 class(es) with under 5 training images (few 3)",
        "  warning: imbalanced classes: many has 40 training images, few 3 (13.3x, above 10x); --class-weight "
        "balanced evens their loss",
    ]
    # Fewer labels per class than TINY_CLASS were asked for: those classes are not tiny.
    info.labels_per_class = 3
    assert preflight.check({"train": Split(43, labels, images)}, info)["classes"]["tiny"] == {}


def test_clean_data_says_so(shared_data):
    splits, info = load_splits(data_dir=str(shared_data))
    report = preflight.check(splits, info)
    assert report["leaks"]["count"] == report["label_conflicts"]["count"] == 0 and report["duplicates"] == {}
    assert preflight.describe(report)[0].endswith("; no leak, duplicate, label conflict or class problem")


def test_near_duplicates_in_feature_space():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 16)).astype(np.float32) + 5.0  # a shared positive part, as pooled activations have
    test = rng.normal(size=(4, 16)).astype(np.float32) + 5.0
    test[2] = train[7] + rng.normal(scale=0.01, size=16)
    test[3] = train[9] + rng.normal(scale=0.6, size=16)  # alike, below the threshold
    centred = train.mean(axis=0)
    a, b = test[3] - centred, train[9] - centred
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert 0.5 < cosine < preflight.NEAR_DUPLICATE_COSINE
    found = preflight.near_duplicates(train, test, name=lambda i: "abcd"[i] + ".png", chunk=3)
    assert found["count"] == 1 and found["threshold"] == preflight.NEAR_DUPLICATE_COSINE
    assert found["examples"] == ["c.png (cosine 1.000)"]
    assert preflight.near_duplicates(train, test, threshold=cosine - 0.01)["count"] == 2
    # Uncentred, the shared part alone makes every test image a near-duplicate.
    raw = (test / np.linalg.norm(test, axis=1, keepdims=True)) @ (train / np.linalg.norm(train, axis=1, keepdims=True)).T
    assert raw.max(axis=1).min() > preflight.NEAR_DUPLICATE_COSINE
